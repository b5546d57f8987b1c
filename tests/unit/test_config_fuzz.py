"""Property-based: thousands of random and mutated configs never produce a traceback.

Whatever a user writes, `validate` answers with findings or success. The library path
(``load_config(..., strict=False)`` on a file) gets most examples; a few go through the click
command. Inputs: random YAML text, real configs with keys misspelt, values of the wrong type,
garbage nested in ``datasets``, random overrides. Where validation succeeds, the batch-size
identity must hold; and ``--fix`` must never change what a config means.
"""

from __future__ import annotations

import copy
import itertools
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from click.testing import CliRunner
from config_fixtures import GOOD_CONFIG
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from limits_fixtures import (
    EXTREME_NUMBERS,
    SURROGATE_KEY,
    alias_bomb,
    huge_file,
    junk_keys,
    map_bomb,
    run_bounded,
)

from hellbender.cli import main
from hellbender.config.findings import ConfigError, Finding
from hellbender.config.fix import fix_file
from hellbender.config.hardware import Hardware
from hellbender.config.load import load_config, read_config
from hellbender.config.schema import DatasetConfig, HellbenderConfig

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").rglob("*.yaml"))
TOP_KEYS = sorted(HellbenderConfig.model_fields)
DATASET_KEYS = sorted(DatasetConfig.model_fields)
CODE = re.compile(r"^HB\d{3}$")
MODEL_CONFIG_KEYS = ["max_position_embeddings", "rope_scaling"]
LOCAL_MODEL = "@local-model"  # replaced by a real folder with a config.json in the workdir

SEEDS: list[dict[str, Any]] = [
    {"base_model": "org/model", "datasets": [{"path": "data.jsonl", "type": "alpaca"}]},
    {
        "base_model": "org/model",
        "datasets": [{"path": "chat.jsonl", "type": "chat_template", "roles_to_train": ["assistant"]}],
        "adapter": "lora",
        "lora_target_linear": True,
        "sample_packing": True,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 4,
        "val_set_size": 0.1,
        "evals_per_epoch": 2,
    },
    *(yaml.safe_load(p.read_text()) for p in EXAMPLES),
]

# libyaml's emitter when available: writing the file is test overhead, not what is under test
Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=Dumper, allow_unicode=True, sort_keys=False)


FUZZ = settings(
    deadline=None,
    database=None,  # keep the repository clean; failures print their reproducing example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

hardware = st.builds(
    Hardware,
    cuda=st.booleans(),
    cuda_bf16=st.booleans(),
    cuda_fp8=st.booleans(),
    cpu_bf16=st.booleans(),
    description=st.just("fuzzed hardware"),
)
worlds = st.sampled_from([1, 2, 3, 8])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        ["auto", "lora", "qlora", "sdpa", "flash_attention_2", "alpaca", "chat_template", "", "~", "0x1F"]
    ),
)
garbage = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(
                st.text(max_size=12), st.integers(), st.sampled_from([*DATASET_KEYS, *MODEL_CONFIG_KEYS])
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=12,
)


@st.composite
def near_key(draw: st.DrawFn, keys: list[str]) -> str:
    """A real key with one character inserted, deleted or replaced: the typos users make."""
    key = draw(st.sampled_from(keys))
    i = draw(st.integers(min_value=0, max_value=len(key)))
    op = draw(st.sampled_from(["insert", "delete", "replace", "case"]))
    char = draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz_0123456789-. "))
    if op == "insert":
        return key[:i] + char + key[i:]
    if op == "delete" and len(key) > 1:
        return key[:i] + key[i + 1 :]
    if op == "case":
        return key.upper()
    return key[:i] + char + key[i + 1 :]


@st.composite
def mutated_config(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[Any, Any] = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    # Few destructive mutations and more plausible values, so that a good share of the configs
    # get past loading and the normalization and rules see many combinations too.
    destructive = draw(st.integers(min_value=0, max_value=2))
    plausible = draw(st.integers(min_value=0 if destructive else 1, max_value=6))
    kinds = [
        *(
            draw(st.sampled_from(["typo", "wrong_type", "delete", "dataset_garbage", "dataset_key"]))
            for _ in range(destructive)
        ),
        *(["valid_value"] * plausible),
    ]
    for kind in draw(st.permutations(kinds)):
        if kind == "typo":
            data[draw(near_key(TOP_KEYS))] = draw(scalars)
        elif kind == "wrong_type":
            data[draw(st.sampled_from(TOP_KEYS))] = draw(garbage)
        elif kind == "delete" and data:
            data.pop(draw(st.sampled_from(sorted(data, key=str))), None)
        elif kind == "dataset_garbage":
            data[draw(st.sampled_from(["datasets", "test_datasets"]))] = draw(garbage)
        elif kind == "dataset_key":
            datasets = data.get("datasets")
            if isinstance(datasets, list) and datasets and isinstance(datasets[0], dict):
                key = draw(st.one_of(near_key(DATASET_KEYS), st.sampled_from(DATASET_KEYS)))
                datasets[0][key] = draw(garbage)
        else:  # a plausible value, so the rules (not just the loader) see many combinations
            key, value = draw(
                st.sampled_from(
                    [
                        ("micro_batch_size", st.integers(1, 8)),
                        ("gradient_accumulation_steps", st.integers(1, 8)),
                        ("batch_size", st.integers(1, 64)),
                        ("eval_batch_size", st.integers(1, 8)),
                        ("bf16", st.sampled_from([True, False, "auto"])),
                        ("fp16", st.booleans()),
                        ("sample_packing", st.booleans()),
                        ("pad_to_sequence_len", st.booleans()),
                        ("flash_attention", st.booleans()),
                        ("sdp_attention", st.booleans()),
                        (
                            "attn_implementation",
                            st.sampled_from(["eager", "sdpa", "flex_attention", "flash_attention_2"]),
                        ),
                        ("adapter", st.sampled_from(["lora", "qlora", None])),
                        ("load_in_4bit", st.booleans()),
                        ("context_parallel_size", st.integers(1, 4)),
                        ("tensor_parallel_size", st.integers(1, 4)),
                        ("warmup_ratio", st.floats(0, 0.9)),
                        ("overrides_of_model_config", garbage),
                        (
                            "base_model",
                            st.sampled_from(
                                ["~nobody_here/x", "/", ".", "x" * 300, "a.gguf", "", LOCAL_MODEL]
                            ),
                        ),
                    ]
                )
            )
            data[key] = draw(value)
    return data


def check_outcome(path: Path, overrides: list[str], hw: Hardware, world: int) -> None:
    """The property: findings or success, never any other exception."""
    try:
        cfg, findings = load_config(path, overrides, world_size=world, hardware=hw, strict=False)
    except ConfigError as exc:
        event("rejected while loading")
        assert exc.findings, "a ConfigError must carry at least one finding"
        assert any(f.severity == "error" for f in exc.findings)
        check_findings(exc.findings)
        return
    check_findings(findings)
    event(
        "loaded; rules ran"
        + (" and found errors" if any(f.severity == "error" for f in findings) else ", no errors")
    )
    if not any(f.severity == "error" for f in findings):
        dp = world // (cfg.context_parallel_size * cfg.tensor_parallel_size)
        assert cfg.batch_size == cfg.micro_batch_size * cfg.gradient_accumulation_steps * dp


def check_findings(findings: list[Finding]) -> None:
    for f in findings:
        assert CODE.match(f.code) and f.severity in {"error", "warning", "info"} and f.message
        f.render()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz")
    (path / "model").mkdir()
    (path / "model" / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 512}')
    return path


def with_local_model(data: Any, workdir: Path) -> Any:
    """Point the placeholder base_model at the workdir's model folder, so the model rule runs."""
    if isinstance(data, dict) and data.get("base_model") == LOCAL_MODEL:
        data["base_model"] = str(workdir / "model")
    return data


@settings(FUZZ, max_examples=700)
@given(data=mutated_config(), hw=hardware, world=worlds)
def test_mutated_configs_give_findings_never_tracebacks(
    workdir: Path, data: dict[str, Any], hw: Hardware, world: int
) -> None:
    path = workdir / "mutated.yaml"
    path.write_text(dump(with_local_model(data, workdir)))
    check_outcome(path, [], hw, world)


@settings(FUZZ, max_examples=500)
@given(
    text=st.one_of(
        st.text(max_size=300),
        st.text(alphabet=":-[]{}#&*!|>'\"%@`,? \n\tab01", max_size=200),
        # real configs cut or spliced at random places: mostly invalid YAML, sometimes not
        st.builds(
            lambda seed, cut, junk: (s := yaml.safe_dump(seed))[:cut] + junk + s[cut:],
            st.sampled_from(SEEDS),
            st.integers(0, 2000),
            st.text(alphabet=":-[]{}#\n '\"\t", max_size=5),
        ),
    ),
    world=worlds,
)
def test_random_yaml_text_gives_findings_never_tracebacks(workdir: Path, text: str, world: int) -> None:
    path = workdir / "random.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_outcome(path, [], Hardware(description="CPU"), world)


override_paths = st.one_of(
    st.text(max_size=20),
    near_key(TOP_KEYS),
    st.sampled_from(TOP_KEYS),
    st.builds(
        lambda i, k: f"datasets.{i}.{k}",
        st.sampled_from(["0", "1", "-1", "x", "²", "00", ""]),
        st.sampled_from(DATASET_KEYS),
    ),
    st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(TOP_KEYS), st.text(max_size=8)),
)
override_values = st.one_of(
    st.text(max_size=20), st.sampled_from(["[1, 2", "{a: 1}", "true", "null", "- x", "&a [*a]", "2e-5"])
)
plausible_overrides = st.sampled_from(
    [
        "lora_r=16",
        "micro_batch_size=3",
        "batch_size=12",
        "datasets.0.type=completion",
        "bf16=true",
        "sample_packing=true",
        "gradient_accumulation_steps=",
        "attn_implementation=eager",
        "flash_attention=true",
        "val_set_size=0.2",
    ]
)


@settings(FUZZ, max_examples=300)
@given(
    seed=st.sampled_from(SEEDS),
    overrides=st.lists(
        st.one_of(
            st.text(max_size=30),
            st.builds(lambda p, v: f"{p}={v}", override_paths, override_values),
            plausible_overrides,
        ),
        max_size=4,
    ),
)
def test_random_overrides_give_findings_never_tracebacks(
    workdir: Path, seed: dict[str, Any], overrides: list[str]
) -> None:
    path = workdir / "overridden.yaml"
    path.write_text(dump(seed))
    check_outcome(path, overrides, Hardware(description="CPU"), 1)


@settings(FUZZ, max_examples=30)
@given(data=mutated_config(), resolved=st.booleans(), fix=st.booleans())
def test_cli_validate_exits_0_or_1_never_a_traceback(
    workdir: Path, data: dict[str, Any], resolved: bool, fix: bool
) -> None:
    path = workdir / "cli.yaml"
    path.write_text(dump(data))
    args = ["validate", str(path), *(["--resolved"] if resolved else []), *(["--fix"] if fix else [])]
    env = {"PYTORCH_ALLOC_CONF": None, "PYTORCH_CUDA_ALLOC_CONF": None, "WORLD_SIZE": "1"}
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code in (0, 1), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


@st.composite
def raw_config_file(draw: st.DrawFn) -> bytes:
    """What PyYAML-built configs never contain: raw bytes, other encodings, a key given twice,
    and YAML 1.1 truth values spelled as words."""
    text = dump(draw(st.sampled_from(SEEDS)))
    kind = draw(st.sampled_from(["bytes", "utf16", "duplicate", "yaml11"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "utf16":
        return text.encode("utf-16")
    if kind == "duplicate":
        lines = text.splitlines(keepends=True)
        i = draw(st.integers(0, len(lines) - 1))
        return "".join([*lines[: i + 1], lines[i], *lines[i + 1 :]]).encode()
    flag = draw(
        st.sampled_from(["flash_attention", "sdp_attention", "sample_packing", "bf16", "load_in_4bit"])
    )
    word = draw(st.sampled_from(["off", "on", "yes", "no", "Off", "'false'", '"no"', "y", "n"]))
    return (text + f"{flag}: {word}\n").encode()


@settings(FUZZ, max_examples=60)
@given(
    content=raw_config_file(),
    world=st.sampled_from(["", "abc", "0", "-2", " 2 ", "1", "8"]),
    fix=st.booleans(),
)
def test_cli_raw_files_and_bad_environment_never_a_traceback(
    workdir: Path, content: bytes, world: str, fix: bool
) -> None:
    path = workdir / "raw.yaml"
    path.write_bytes(content)
    args = ["validate", str(path), *(["--fix"] if fix else [])]
    env = {"PYTORCH_ALLOC_CONF": None, "PYTORCH_CUDA_ALLOC_CONF": None, "WORLD_SIZE": world}
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code in (0, 1), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if (world.strip() and not world.strip().isdecimal()) or world.strip() == "0":
        assert result.exit_code == 1


# YAML 1.1 spellings, written into the file as they are: PyYAML (which reads the config) takes the
# bare words as booleans, ruamel (which rewrites it) as strings; quoted ones are strings to both
# and pydantic reads them as booleans.
FLAG_WORDS = ["true", "false", "off", "on", "yes", "no", "'false'", '"no"', "'true'", ""]


@settings(FUZZ, max_examples=150)
@given(
    mbs=st.integers(1, 4),
    gas=st.one_of(st.none(), st.integers(1, 4)),
    batch=st.one_of(st.none(), st.integers(1, 48)),
    flags=st.dictionaries(
        st.sampled_from(
            ["flash_attention", "sdp_attention", "xformers_attention", "eager_attention", "flex_attention"]
        ),
        st.sampled_from(FLAG_WORDS),
        max_size=3,
    ),
    attn=st.one_of(st.none(), st.sampled_from(["sdpa", "eager", "flash_attention_2"])),
    world=worlds,
)
def test_fix_never_changes_what_a_config_means(
    workdir: Path,
    mbs: int,
    gas: int | None,
    batch: int | None,
    flags: dict[str, str],
    attn: str | None,
    world: int,
) -> None:
    data: dict[str, Any] = {
        "base_model": "org/model",
        "datasets": [{"path": "d.jsonl"}],
        "micro_batch_size": mbs,
        "gradient_accumulation_steps": gas,
        "batch_size": batch,
        "attn_implementation": attn,
    }
    path = workdir / "fixme.yaml"
    flag_lines = "".join(f"{flag}: {word}\n" for flag, word in flags.items())
    path.write_text("# user comment\n" + yaml.safe_dump(data, sort_keys=False) + flag_lines)
    gpu = Hardware(cuda=True, cuda_bf16=True, description="simulated GPU")
    before, findings = load_config(path, world_size=world, hardware=gpu, strict=False)
    if any(f.severity == "error" for f in findings):
        return  # --fix only rewrites configs whose meaning is unambiguous
    shutil.copy(path, workdir / "fixme.orig")
    fix_file(path, before, read_config(path)[0])
    after, later = load_config(path, world_size=world, hardware=gpu, strict=False)
    assert not any(f.severity == "error" for f in later)
    for key in ("batch_size", "gradient_accumulation_steps", "micro_batch_size", "attn_implementation"):
        assert getattr(after, key) == getattr(before, key), key
    assert not {"HB120", "HB102"} & {f.code for f in later}
    assert path.read_text().startswith("# user comment\n")


# ------------------------------------------------------------------ hostile inputs: bounded work
# Alias bombs, a 5 MB file, surrogates, extreme numbers: each is answered with findings, in
# bounded time and memory. The files go through the real command in a memory-limited child (so a
# regression fails the test instead of exhausting the machine); the random variations run here.

HOSTILE: dict[str, Callable[[], str]] = {
    "alias-bomb": lambda: alias_bomb(levels=9),
    "alias-bomb-as-datasets": lambda: alias_bomb(levels=9, key="datasets"),
    "map-bomb": lambda: map_bomb(levels=6),
    "5-MB-file": lambda: huge_file(5 << 20),
    "junk-keys": lambda: junk_keys(70_000),
    "surrogate-key": lambda: SURROGATE_KEY,
    "extreme-numbers": lambda: GOOD_CONFIG
    + "".join(f"{key}: {value}\n" for key, value in zip(NUMERIC_KEYS, itertools.cycle(EXTREME_NUMBERS))),
}
NUMERIC_KEYS = sorted(
    name
    for name, field in HellbenderConfig.model_fields.items()
    if {int, float} & {field.annotation, *get_args(field.annotation)}
)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_files_get_findings_in_bounded_time_and_memory(tmp_path: Path, name: str) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_text(HOSTILE[name](), encoding="utf-8")
    run = run_bounded(["validate", str(path), "--resolved"], tmp_path)
    assert run.code == 1, run.text[-3000:]
    assert "Traceback" not in run.text and "ERROR HB" in run.text
    assert run.cpu_seconds < 5 and run.seconds < 30, f"{run.cpu_seconds:.1f} s CPU, {run.seconds:.1f} s"
    assert run.peak_bytes < 300 << 20, f"{run.peak_bytes >> 20} MiB"
    assert run.stdout_bytes < 50_000


HOSTILE_LINES = [
    '"\\ud800": 1\n',
    'chat_template: "\\udfff"\n',
    '"\\ud83d\\ude00x": [1]\n',
    "datasets: [{path: '\\udcff'}]\n",
    "overrides_of_model_config: {max_position_embeddings: .inf, rope_scaling: .nan}\n",
    "overrides_of_model_config: &o {x: *o}\n",
    "tokens: &t [*t]\n",
]


@settings(FUZZ, max_examples=120)
@given(
    values=st.dictionaries(
        st.sampled_from(NUMERIC_KEYS),
        st.one_of(
            st.sampled_from(EXTREME_NUMBERS),
            st.floats().map(repr).map(lambda r: {"inf": ".inf", "-inf": "-.inf", "nan": ".nan"}.get(r, r)),
            st.integers(min_value=-(2**80), max_value=2**80).map(str),
        ),
        min_size=1,
        max_size=4,
    ),
    extra=st.lists(st.sampled_from(HOSTILE_LINES), max_size=2, unique=True),
    bomb=st.one_of(
        st.none(),
        st.builds(
            lambda levels, width, key: alias_bomb(levels, width, key).removeprefix(GOOD_CONFIG),
            st.integers(1, 12),
            st.integers(1, 12),
            st.sampled_from(["lora_r", "overrides_of_model_config", "tokens", "special_tokens", "junk"]),
        ),
    ),
)
def test_extreme_numbers_surrogates_and_bombs_give_findings_never_tracebacks(
    workdir: Path, values: dict[str, str], extra: list[str], bomb: str | None
) -> None:
    lines = "".join(f"{key}: {value}\n" for key, value in values.items())
    text = GOOD_CONFIG + lines + "".join(line for line in extra if line.split(":")[0] not in values)
    text += bomb or ""  # a key given twice is a finding too
    path = workdir / "extreme.yaml"
    path.write_text(text, encoding="utf-8")
    start = time.process_time()
    check_outcome(path, [], Hardware(description="CPU"), 1)
    assert time.process_time() - start < 5
