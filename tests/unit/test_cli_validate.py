"""`hellbender validate` and `hellbender config-schema` through click's runner and the real binary."""

from __future__ import annotations

import difflib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result
from config_fixtures import GOOD_CONFIG, write_config

from hellbender.cli import main
from hellbender.config.load import DERIVED_KEYS
from hellbender.config.schema import HellbenderConfig

# The group callback sets the allocator variable in os.environ; passing both names to the runner
# makes click restore them afterwards, so no test leaks environment into another.
ISOLATED_ENV: dict[str, str | None] = {
    "PYTORCH_ALLOC_CONF": None,
    "PYTORCH_CUDA_ALLOC_CONF": None,
    "WORLD_SIZE": "1",
}

GOOD = GOOD_CONFIG + "gradient_accumulation_steps: 4\n"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=ISOLATED_ENV, catch_exceptions=False)


def resolved_section(output: str) -> dict:
    """The YAML printed after '# resolved config', without the summary line."""
    body = output.split("# resolved config\n", 1)[1]
    return yaml.safe_load(body.rsplit("\n", 2)[0])


# ------------------------------------------------------------------ exit codes and output


def test_valid_config_exits_0(tmp_path: Path) -> None:
    result = invoke("validate", str(write_config(tmp_path, GOOD)))
    assert result.exit_code == 0, result.output
    assert "0 error(s)" in result.output
    assert "HB190" in result.output  # the resolved dtype is shown


def test_rule_error_exits_1_and_prints_the_finding(tmp_path: Path) -> None:
    result = invoke("validate", str(write_config(tmp_path, GOOD + "warmup_steps: 5\nwarmup_ratio: 0.1\n")))
    assert result.exit_code == 1
    assert "ERROR HB110" in result.output and "fix:" in result.output
    assert "1 error(s)" in result.output


def test_warnings_alone_exit_0(tmp_path: Path) -> None:
    result = invoke("validate", str(write_config(tmp_path, GOOD + "max_steps: 10\nnum_epochs: 2\n")))
    assert result.exit_code == 0
    assert "WARNING HB140" in result.output and "1 warning(s)" in result.output


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (GOOD + "learning_rat: 0.1\n", "HB004"),
        (GOOD + "rl: dpo\n", "HB005"),
        (GOOD + "lora_r: [1\n", "HB001"),
        (GOOD + "lora_r: big\n", "HB008"),
    ],
)
def test_load_errors_exit_1(tmp_path: Path, text: str, code: str) -> None:
    result = invoke("validate", str(write_config(tmp_path, text)))
    assert result.exit_code == 1
    assert f"ERROR {code}" in result.output


def test_overrides_on_the_command_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD)
    result = invoke("validate", str(path), "lora_r=32", "datasets.0.path=other.jsonl", "--resolved")
    assert result.exit_code == 0, result.output
    resolved = resolved_section(result.output)
    assert resolved["lora_r"] == 32
    assert resolved["datasets"][0]["path"] == "other.jsonl"
    assert path.read_text() == GOOD  # overrides never touch the file
    bad = invoke("validate", str(path), "micro_batch_size=zero")
    assert bad.exit_code == 1 and "HB008" in bad.output


def test_resolved_prints_every_derived_value(tmp_path: Path) -> None:
    result = invoke("validate", str(write_config(tmp_path, GOOD + "sample_packing: true\n")), "--resolved")
    assert result.exit_code == 0, result.output
    resolved = resolved_section(result.output)
    assert resolved["batch_size"] == 2 * 4 * 1
    assert resolved["eval_batch_size"] == 2
    assert resolved["pad_to_sequence_len"] is True
    assert resolved["attn_implementation"] == "sdpa"
    assert resolved["compute_dtype"] in {"bfloat16", "float32"}
    assert resolved["loss_method"] == "plain" and resolved["data_parallel_size"] == 1
    # the resolved config is itself a complete, valid config (derived keys aside)
    for key in DERIVED_KEYS:
        resolved.pop(key)
    HellbenderConfig.model_validate(resolved)


def test_missing_or_unreadable_file_exits_1_with_a_finding(tmp_path: Path) -> None:
    result = invoke("validate", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 1 and "ERROR HB000" in result.output and "nope.yaml" in result.output
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_bytes(GOOD.encode("utf-16"))
    result = invoke("validate", str(utf16))
    assert result.exit_code == 1 and "not UTF-8" in result.output


def test_a_key_given_twice_is_an_error_with_its_lines(tmp_path: Path) -> None:
    result = invoke(
        "validate", str(write_config(tmp_path, GOOD + "learning_rate: 0.1\nlearning_rate: 0.2\n"))
    )
    assert result.exit_code == 1 and "ERROR HB001" in result.output
    assert "'learning_rate' a second time" in result.output


@pytest.mark.parametrize("world", ["abc", "0", "-2"])
def test_a_bad_world_size_in_the_environment_is_a_finding(tmp_path: Path, world: str) -> None:
    result = CliRunner().invoke(
        main, ["validate", str(write_config(tmp_path, GOOD))], env={**ISOLATED_ENV, "WORLD_SIZE": world}
    )
    assert result.exit_code == 1 and "ERROR HB152" in result.output and repr(world) in result.output


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ({}, "expandable_segments:True,roundup_power2_divisions:16"),
        ({"PYTORCH_CUDA_ALLOC_CONF": "mine"}, None),
        ({"PYTORCH_ALLOC_CONF": "mine"}, "mine"),
    ],
)
def test_the_cli_sets_the_allocator_variable_only_when_unset(
    tmp_path: Path, preset: dict[str, str], expected: str | None
) -> None:
    """The real process: what torch would read after the CLI's group callback ran."""
    import os

    script = (
        "import os, sys\n"
        "from hellbender.cli import main\n"
        "try:\n"
        "    main(['validate', sys.argv[1]])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('ALLOC=' + repr(os.environ.get('PYTORCH_ALLOC_CONF')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    done = subprocess.run(
        [sys.executable, "-c", script, str(write_config(tmp_path, GOOD))],
        env={**env, **preset},
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"ALLOC={expected!r}" in done.stdout, done.stdout + done.stderr


# ------------------------------------------------------------------ --fix

BEFORE = """\
# My run: comments and order must survive --fix
base_model: org/some-model  # the base
datasets:
  - path: data.jsonl   # local file
    type: alpaca

micro_batch_size: 2
batch_size: 16  # effective batch
# attention
xformers_attention:
flash_attention: true   # fast
learning_rate: 0.0002 # peak
"""


def test_fix_rewrites_batch_size_and_legacy_flags_keeping_comments_and_order(tmp_path: Path) -> None:
    path = write_config(tmp_path, BEFORE)
    result = invoke("validate", str(path), "--fix")
    assert "fixed: batch_size → gradient_accumulation_steps: 8" in result.output
    after = path.read_text()
    # expected: exactly the two edits, every comment and every other line as written
    expected = BEFORE.replace(
        "batch_size: 16  # effective batch", "gradient_accumulation_steps: 8 # effective batch"
    ).replace(
        "xformers_attention:\nflash_attention: true   # fast", "attn_implementation: flash_attention_2 # fast"
    )
    assert after == expected
    # the findings that were fixed are gone; the run itself was re-validated on the new file
    assert "HB120" not in result.output and "HB102" not in result.output
    again = invoke("validate", str(path), "--resolved")
    resolved = resolved_section(again.output)
    assert resolved["batch_size"] == 16 and resolved["gradient_accumulation_steps"] == 8
    assert resolved["attn_implementation"] == "flash_attention_2"


def test_fix_removes_redundant_batch_size_keeping_its_comments(tmp_path: Path) -> None:
    text = GOOD + "batch_size: 8  # redundant\n# seed below\nseed: 7\n"
    path = write_config(tmp_path, text)
    result = invoke("validate", str(path), "--fix")
    assert "fixed: removed batch_size" in result.output
    # the removed line's comments become full lines before the next key
    assert path.read_text() == GOOD + "# redundant\n# seed below\nseed: 7\n"
    assert "HB120" not in invoke("validate", str(path)).output


@pytest.mark.parametrize(
    ("before", "after"),
    [
        # lists at column 0 under their key, a flow list of a one-key mapping, a long line
        (
            "base_model: m\ndatasets:\n- path: a.jsonl\n  type: alpaca\nsdp_attention: true\nchat_template: '"
            + "x" * 200
            + "'\n",
            "base_model: m\ndatasets:\n- path: a.jsonl\n  type: alpaca\nattn_implementation: sdpa\n"
            "chat_template: '"
            + "x" * 200
            + "'\n",
        ),
        (
            "base_model: m\ndatasets: [{path: a.jsonl}]\nmicro_batch_size: 2\nbatch_size: 8\n\n"
            "# end\nseed: 1\n",
            "base_model: m\ndatasets: [{path: a.jsonl}]\nmicro_batch_size: 2\n"
            "gradient_accumulation_steps: 4\n\n# end\nseed: 1\n",
        ),
        (
            "base_model: m\nspecial_tokens:\n    pad_token: <pad>\ndatasets:\n    - path: a.jsonl\n"
            "flash_attention: false\n",
            "base_model: m\nspecial_tokens:\n    pad_token: <pad>\ndatasets:\n    - path: a.jsonl\n",
        ),
    ],
    ids=["zero-indented-list", "flow-list", "four-space-layout"],
)
def test_fix_keeps_the_files_own_layout(tmp_path: Path, before: str, after: str) -> None:
    path = write_config(tmp_path, before)
    result = invoke("validate", str(path), "--fix")
    assert "fixed:" in result.output
    assert path.read_text() == after


@pytest.mark.parametrize(
    "text",
    [
        GOOD.replace("gradient_accumulation_steps: 4\n", "")
        + "batch_size: 7  # not divisible by 2\n",  # HB121
        GOOD + "batch_size: 99\n",  # HB122: contradicts the other two
        GOOD + "flash_attention: true\nxformers_attention: true\n",  # HB101: which one is meant?
    ],
    ids=["not-divisible", "inconsistent", "two-backends"],
)
def test_fix_leaves_ambiguous_findings_alone(tmp_path: Path, text: str) -> None:
    path = write_config(tmp_path, text)
    result = invoke("validate", str(path), "--fix")
    assert result.exit_code == 1
    assert "fixed:" not in result.output
    assert path.read_text() == text


def test_fix_refuses_overrides(tmp_path: Path) -> None:
    """A fix computed from overridden values would write what the file never said."""
    path = write_config(tmp_path, GOOD_CONFIG + "batch_size: 16\n")
    before = path.read_text()
    result = invoke("validate", str(path), "micro_batch_size=4", "--fix")
    assert result.exit_code == 1 and "cannot be combined" in result.output
    assert path.read_text() == before


@pytest.mark.parametrize("word", ["off", "no", "'false'", '"no"'])
def test_fix_reads_yaml_1_1_false_words_as_false(tmp_path: Path, word: str) -> None:
    """`flash_attention: off` is false to the config loader (YAML 1.1); --fix must not turn it on."""
    path = write_config(tmp_path, GOOD + f"flash_attention: {word}\n")
    result = invoke("validate", str(path), "--fix")
    assert result.exit_code == 0, result.output
    text = path.read_text()
    assert "flash_attention" not in text and "attn_implementation" not in text


def test_fix_through_a_symlink_rewrites_the_target_and_keeps_its_mode(tmp_path: Path) -> None:
    target = write_config(tmp_path, GOOD_CONFIG + "batch_size: 16\n", "real.yaml")
    target.chmod(0o600)
    link = tmp_path / "link.yaml"
    link.symlink_to(target)
    assert invoke("validate", str(link), "--fix").exit_code == 0
    assert link.is_symlink() and (target.stat().st_mode & 0o777) == 0o600
    assert "\nbatch_size" not in target.read_text() and "gradient_accumulation_steps: 8" in target.read_text()


def test_fix_without_anything_to_fix_leaves_file_byte_identical(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD + "# trailing comment\n")
    invoke("validate", str(path), "--fix")
    assert path.read_text() == GOOD + "# trailing comment\n"


# ------------------------------------------------------------------ config-schema and the binary


def test_config_schema_is_valid_json_of_every_option() -> None:
    result = invoke("config-schema")
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert set(schema["properties"]) == set(HellbenderConfig.model_fields)
    assert "base_model" in schema["required"]
    assert schema["additionalProperties"] is False  # unknown keys are errors
    assert not DERIVED_KEYS & set(schema["properties"])  # derived by normalize, not for users


def test_help_lists_the_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "validate" in result.output and "config-schema" in result.output


def test_installed_entry_point_exit_codes(tmp_path: Path) -> None:
    exe = shutil.which("hellbender", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the hellbender console script is not installed next to this interpreter")
    good = subprocess.run(
        [exe, "validate", str(write_config(tmp_path, GOOD))], capture_output=True, text=True
    )
    assert good.returncode == 0, good.stdout + good.stderr
    bad = subprocess.run(
        [exe, "validate", str(write_config(tmp_path, GOOD + "lora_rr: 4\n", "bad.yaml"))],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "Did you mean `lora_r`" in bad.stdout


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").rglob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_fix_on_examples_changes_only_the_fixed_lines(tmp_path: Path, example: Path) -> None:
    """On real Axolotl-style files every changed line is a fixed key; nothing else moves."""
    original = example.read_text()
    path = write_config(tmp_path, original, example.name)
    invoke("validate", str(path), "--fix")
    changed = [
        line[1:]
        for line in difflib.unified_diff(
            original.splitlines(), path.read_text().splitlines(), lineterm="", n=0
        )
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    fixed_keys = ("batch_size", "gradient_accumulation_steps", "attn_implementation", "flash_attention",
                  "flex_attention", "sdp_attention", "xformers_attention", "eager_attention")
    assert all(line.split(":", 1)[0].strip() in fixed_keys for line in changed), changed


# ------------------------------------------------------------------ inputs that used to crash


def test_a_surrogate_key_is_a_finding_not_a_crash(tmp_path: Path) -> None:
    from limits_fixtures import SURROGATE_KEY, SURROGATE_VALUE

    for text in (SURROGATE_KEY, SURROGATE_VALUE):
        result = CliRunner().invoke(main, ["validate", str(write_config(tmp_path, text))], env=ISOLATED_ENV)
        assert result.exit_code == 1, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert "ERROR HB0" in result.output and "Traceback" not in result.output


def test_a_surrogate_in_an_override_or_the_path_is_a_finding(tmp_path: Path) -> None:
    """Command-line bytes that are not UTF-8 reach Python as lone surrogates."""
    path = write_config(tmp_path, GOOD)
    for args in (
        ["validate", str(path), "\udcff=1"],
        ["validate", str(path), "chat_template=\udcff"],
        ["validate", str(tmp_path / "missing-\udcff.yaml")],
    ):
        result = CliRunner().invoke(main, args, env=ISOLATED_ENV)
        assert result.exit_code in (0, 1), repr(result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert "\\udcff" in result.output


@pytest.mark.parametrize("command", ["validate", "preprocess", "train", "evaluate"])
def test_a_directory_as_the_config_is_hb000_exit_1(tmp_path: Path, command: str) -> None:
    result = invoke(command, str(tmp_path))
    assert result.exit_code == 1 and "ERROR HB000" in result.output and str(tmp_path) in result.output


def test_dev_zero_is_a_finding_quickly_not_a_memory_error(tmp_path: Path) -> None:
    from limits_fixtures import run_bounded

    run = run_bounded(["validate", "/dev/zero"], tmp_path)
    assert run.code == 1 and "ERROR HB000" in run.text and "Traceback" not in run.text
    assert run.cpu_seconds < 5 and run.seconds < 30 and run.peak_bytes < 400 << 20


def test_fix_on_a_pipe_is_a_finding(tmp_path: Path) -> None:
    from limits_fixtures import run_bounded

    fixable = (GOOD + "batch_size: 8\n").encode()
    run = run_bounded(["validate", "/dev/stdin", "--fix"], tmp_path, stdin=fixable)
    assert run.code == 1 and "ERROR HB000" in run.text and "regular file" in run.text, run.text
    assert "Traceback" not in run.text and "HB007" not in run.text
    # without --fix a pipe is read like any file
    run = run_bounded(["validate", "/dev/stdin"], tmp_path, stdin=GOOD.encode())
    assert run.code == 0, run.text


@pytest.mark.parametrize(
    "line",
    ["seed: 1" + "0" * 5000, "seed: 2001-13-45", "seed: !!binary 'not base64!'"],
    ids=["huge-int", "bad-date", "bad-binary"],
)
def test_scalars_python_cannot_build_are_yaml_findings(tmp_path: Path, line: str) -> None:
    """A 5001-digit int (Python's str→int limit) or an impossible date used to crash (exit 2)."""
    path = write_config(tmp_path, GOOD + line + "\n")
    result = CliRunner().invoke(main, ["validate", str(path)], env=ISOLATED_ENV)
    assert result.exit_code == 1, result.output
    assert "ERROR HB001" in result.output and "line 7" in result.output
