"""Bounded work on hostile configs, finite ranges for every number, format strings checked as used.

Times are CPU times (``time.process_time``, or the child's own rusage): the work done, which a
busy machine does not change much, unlike the wall time.

Each test here failed before the limit it checks existed: an alias bomb took tens of seconds and
gigabytes, 100k unknown keys took minutes, ``num_epochs: .inf`` validated and then hung training,
``'{instruction!r:>{input}}'`` validated and then crashed a tokenization worker.
"""

from __future__ import annotations

import math
import time
import typing
from pathlib import Path
from typing import Any

import pytest
from config_fixtures import GOOD_CONFIG, write_config
from limits_fixtures import alias_bomb, huge_file, map_bomb, run_bounded
from pydantic import BaseModel

from hellbender.config.findings import ConfigError, Finding
from hellbender.config.load import (
    MAX_CONFIG_BYTES,
    MAX_YAML_NODES,
    load_config,
    parse_yaml,
    read_config,
    unknown_key_findings,
    validate_mapping,
)
from hellbender.config.schema import (
    DatasetConfig,
    FSDPConfig,
    HellbenderConfig,
    MessagePropertyMappings,
    MixedPrecisionPolicy,
    SpecialTokens,
    UserDefinedFormat,
)
from hellbender.data.errors import DataError
from hellbender.data.formats.user_defined import UserDefinedPromptFormat


def load_errors(tmp_path: Path, text: str, overrides: list[str] | None = None) -> list[Finding]:
    with pytest.raises(ConfigError) as info:
        read_config(write_config(tmp_path, text), overrides)
    return info.value.findings


def rendered(findings: list[Finding]) -> str:
    return "\n".join(f.render() for f in findings)


# ------------------------------------------------------------------ (3) alias expansion and size


def test_an_alias_bomb_is_refused_naming_the_limit() -> None:
    text = alias_bomb(levels=9)
    assert len(text) < 1000
    start = time.process_time()
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "bomb.yaml")
    assert time.process_time() - start < 2
    (finding,) = info.value.findings
    assert finding.code == "HB009" and f"{MAX_YAML_NODES:,}" in finding.message
    assert "bomb.yaml" in finding.message and "alias" in finding.message


def test_an_alias_bomb_through_validate_is_fast_small_and_quiet(tmp_path: Path) -> None:
    """The 9-level bomb used to take 26 s, 5 GB and print 1 GB (the expanded value in HB008)."""
    path = write_config(tmp_path, alias_bomb(levels=9))
    run = run_bounded(["validate", str(path)], tmp_path)
    assert run.code == 1 and "ERROR HB009" in run.text and "Traceback" not in run.text
    assert run.cpu_seconds < 5 and run.seconds < 30 and run.stdout_bytes < 2000
    assert run.peak_bytes < 400 << 20


def test_a_map_bomb_under_overrides_of_model_config_is_refused(tmp_path: Path) -> None:
    """An 866-byte map bomb used to pass validate and make train write a 4 MB resolved config."""
    text = map_bomb(levels=5)
    assert len(text) < 900
    findings = load_errors(tmp_path, text)
    assert [f.code for f in findings] == ["HB009"]


def test_plain_aliases_and_merge_keys_still_work(tmp_path: Path) -> None:
    text = (
        "base_model: m\n"
        "datasets:\n"
        "  - &ds {path: a.jsonl, type: completion}\n"
        "  - <<: *ds\n"
        "    path: b.jsonl\n"
        "  - *ds\n"
    )
    cfg, _ = read_config(write_config(tmp_path, text))
    assert cfg.datasets is not None
    assert [(d.path, d.type) for d in cfg.datasets] == [
        ("a.jsonl", "completion"),
        ("b.jsonl", "completion"),
        ("a.jsonl", "completion"),
    ]


@pytest.mark.parametrize(
    "value", ["&a [*a]", "&a {x: *a}", "&a [1, [2, *a]]"], ids=["list", "mapping", "nested"]
)
def test_an_alias_cycle_is_refused(tmp_path: Path, value: str) -> None:
    findings = load_errors(tmp_path, GOOD_CONFIG + f"overrides_of_model_config: {{x: {value}}}\n")
    assert [f.code for f in findings] == ["HB009"]
    assert "cycle" in findings[0].message or "contains it" in findings[0].message


def test_a_bomb_in_an_override_value_is_refused(tmp_path: Path) -> None:
    levels = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 7):
        levels.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    bomb = "[" + ", ".join(levels) + "]"
    findings = load_errors(tmp_path, GOOD_CONFIG, [f"overrides_of_model_config.x={bomb}"])
    assert [f.code for f in findings] == ["HB009"]


def test_deep_nesting_is_refused_before_anything_recursive_sees_it(tmp_path: Path) -> None:
    nested = "[" * 150 + "]" * 150
    findings = load_errors(tmp_path, GOOD_CONFIG + "overrides_of_model_config: {x: " + nested + "}\n")
    assert [f.code for f in findings] == ["HB001"] and "nested too deeply" in findings[0].message


def test_a_config_file_over_the_size_limit_is_refused_before_parsing(tmp_path: Path) -> None:
    path = write_config(tmp_path, huge_file(MAX_CONFIG_BYTES + 10))
    start = time.process_time()
    with pytest.raises(ConfigError) as info:
        read_config(path)
    assert time.process_time() - start < 1
    (finding,) = info.value.findings
    assert finding.code == "HB000" and "1 MiB" in finding.message and str(path) in finding.message
    # just under the limit is a config like any other
    read_config(write_config(tmp_path, huge_file(MAX_CONFIG_BYTES - 200), "ok.yaml"))


@pytest.mark.parametrize(
    "line",
    [
        "lora_r: '" + "x" * 100_000 + "'",
        "lora_r: [" + ", ".join(["1"] * 20_000) + "]",
        "lora_r: {" + ", ".join(f"k{i}: v" for i in range(20_000)) + "}",
        "? " + "k" * 100_000 + "\n: 1",  # an explicit key: a plain one may not exceed 1024 chars
        "datasets:\n  - path: a\n    roles:\n      ? " + "r" * 100_000 + "\n      : [5]",
        "micro_batch_size: 0x" + "f" * 5000,
    ],
    ids=["long-string", "long-list", "big-mapping", "long-unknown-key", "long-nested-key", "huge-int"],
)
def test_values_and_keys_quoted_in_messages_are_truncated(tmp_path: Path, line: str) -> None:
    text = GOOD_CONFIG.replace("datasets:\n  - path: data.jsonl\n    type: alpaca\n", "") + line + "\n"
    if not line.startswith("datasets"):
        text += "datasets: [{path: a.jsonl}]\n"
    findings = load_errors(tmp_path, text)
    for finding in findings:
        assert len(finding.render()) < 600, finding.render()[:1000]


def test_an_unreadable_long_base_model_is_quoted_truncated(tmp_path: Path) -> None:
    # HB150 (model config not readable) quotes base_model: a 100k-character id stays one short line.
    text = GOOD_CONFIG.replace("base_model: org/some-model", "base_model: org/" + "m" * 100_000)
    assert text != GOOD_CONFIG
    _, findings = load_config(write_config(tmp_path, text), strict=False)
    hb150 = [f for f in findings if f.code == "HB150"]
    assert hb150 and all(len(f.render()) < 600 for f in hb150), [f.render()[:300] for f in hb150]


def test_100k_unknown_keys_answer_in_about_a_second() -> None:
    """Unknown keys used to cost quadratic time: 16k keys 6.7 s, 400k keys > 200 s."""
    data: dict[str, Any] = {"base_model": "m", "datasets": [{"path": "a.jsonl"}]}
    data.update({f"junk_{i}": i for i in range(100_000)})
    data["lora_rr"] = 4  # a typo among the junk still gets its suggestion
    data["lora_r"] = "big"  # and a known key's type error is still reported
    start = time.process_time()
    with pytest.raises(ConfigError) as info:
        validate_mapping(data)
    elapsed = time.process_time() - start
    assert elapsed < 3, f"{elapsed:.2f} s"
    findings = info.value.findings
    assert len(findings) < 60
    text = rendered(findings)
    assert "more unknown keys" in text and "100,001" in text
    assert "lora_r" in {f.key for f in findings}
    assert len(text) < 20_000


def test_unknown_key_findings_name_the_first_keys_and_count_the_rest() -> None:
    data = {f"zz{i}": 1 for i in range(200)}
    findings = unknown_key_findings({"lora_rr": 1, **data})
    assert findings[0].key == "lora_rr" and "Did you mean `lora_r`" in findings[0].message
    summary = findings[-1]
    assert summary.code == "HB004" and "more unknown keys" in summary.message
    shown = sum(1 for f in findings if f.key is not None)
    assert shown + int(summary.message.split()[2].replace(",", "")) == 201


def test_a_file_with_many_unknown_keys_costs_linear_time(tmp_path: Path) -> None:
    """Ten times the keys, about ten times the time (a ratio, so a busy machine does not matter;
    the best of two runs of each size, so one run slowed by the machine does not either: measured
    ×12 idle, ×43 once under CI load with single runs, and quadratic work would be ×100)."""

    def seconds(count: int) -> float:
        text = GOOD_CONFIG + "".join(f"k{i}: 1\n" for i in range(count))
        start = time.process_time()
        findings = load_errors(tmp_path, text)
        elapsed = time.process_time() - start
        assert len(findings) < 60 and f"{count:,}" in rendered(findings)
        return elapsed

    small = min(seconds(2_000) for _ in range(2))
    large = min(seconds(20_000) for _ in range(2))
    assert large < 25 * small + 0.5


def test_a_long_key_with_many_children_stays_cheap(tmp_path: Path) -> None:
    """Key paths are built for the lines of messages; a 200 kB key with 3,000 children must not
    build 3,000 paths of 200 kB each."""
    text = GOOD_CONFIG + "? " + "k" * 200_000 + "\n:\n" + "".join(f"  c{i}: 1\n" for i in range(3000))
    start = time.process_time()
    findings = load_errors(tmp_path, text)
    assert time.process_time() - start < 3
    assert all(len(f.render()) < 600 for f in findings)


# ------------------------------------------------------------------ (7) finite ranges


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("num_epochs: .inf", "num_epochs"),
        ("num_epochs: .nan", "num_epochs"),
        ("num_epochs: 1000000", "num_epochs"),
        ("max_steps: 100000000000000000000000000000", "max_steps"),
        ("lora_r: 1.0e+29", "lora_r"),
        ("lora_alpha: 100000000000000000000000000000", "lora_alpha"),
        ("val_set_size: .inf", "val_set_size"),
        ("val_set_size: .nan", "val_set_size"),
        ("sequence_len: 100000000000000000000000000000", "sequence_len"),
        ("eval_batch_size: 1.0e+29", "eval_batch_size"),
        ("gradient_accumulation_steps: 1000000000000", "gradient_accumulation_steps"),
        ("seed: -1", "seed"),
        ("seed: 4294967296", "seed"),
        ("learning_rate: .inf", "learning_rate"),
        ("learning_rate: .nan", "learning_rate"),
        ("learning_rate: 1.0e+39", "learning_rate"),
        ("weight_decay: .nan", "weight_decay"),
        ("max_grad_norm: .inf", "max_grad_norm"),
        ("warmup_steps: 100000000000000000000000000000", "warmup_steps"),
        ("eval_steps: .inf", "eval_steps"),
        ("save_steps: 1.0e+29", "save_steps"),
        ("evals_per_epoch: 1000000000", "evals_per_epoch"),
        ("logging_steps: 100000000000000000000000000000", "logging_steps"),
        ("loss_watchdog_threshold: .inf", "loss_watchdog_threshold"),
        ("chunked_cross_entropy_num_chunks: 1.0e+29", "chunked_cross_entropy_num_chunks"),
        ("dataset_num_proc: 100000000000000000000000000000", "dataset_num_proc"),
        ("peft_layers_to_transform: [1, -1]", "peft_layers_to_transform"),
        ("datasets: [{path: a.jsonl, shards: 0}]", "datasets.0.shards"),
    ],
)
def test_numbers_that_would_hang_or_crash_later_are_refused(tmp_path: Path, line: str, key: str) -> None:
    base = GOOD_CONFIG if not line.startswith("datasets") else "base_model: m\n"
    findings = load_errors(tmp_path, base + line + "\n")
    assert [(f.code, f.key) for f in findings] == [("HB008", key)], rendered(findings)
    assert f"`{key}`" in findings[0].message


def test_a_range_error_names_the_key_and_the_whole_range(tmp_path: Path) -> None:
    (finding,) = load_errors(tmp_path, GOOD_CONFIG + "lora_r: 100000000000000000000000000000\n")
    assert "lora_r" in finding.message and "1 ≤ lora_r ≤ 65536" in finding.message + finding.fix
    (finding,) = load_errors(tmp_path, GOOD_CONFIG + "seed: -1\n")
    assert "0 ≤ seed ≤ 4294967295" in finding.message + finding.fix


@pytest.mark.parametrize(
    "line",
    [
        "seed: 0",
        "seed: 4294967295",
        "num_epochs: 1000",
        "num_epochs: 0.5",
        "max_steps: 1000000000",
        "lora_r: 65536\nadapter: lora",
        "sequence_len: 1048576",
        "val_set_size: 0.05",
        "val_set_size: 5000",
        "learning_rate: 0.001",
        "max_grad_norm: 0",
    ],
)
def test_sensible_extremes_are_still_accepted(tmp_path: Path, line: str) -> None:
    read_config(write_config(tmp_path, GOOD_CONFIG + line + "\n"))


def _numeric(annotation: Any) -> bool:
    """int or float, alone or in a union (`int | None`, `int | float | None`)."""
    return annotation in (int, float) or any(arg in (int, float) for arg in typing.get_args(annotation))


def _bounds(field: Any) -> tuple[bool, bool]:
    def has(*names: str) -> bool:
        return any(getattr(m, name, None) is not None for m in field.metadata for name in names)

    return has("ge", "gt"), has("le", "lt")


MODELS: list[type[BaseModel]] = [
    HellbenderConfig,
    DatasetConfig,
    UserDefinedFormat,
    MessagePropertyMappings,
    SpecialTokens,
    FSDPConfig,
    MixedPrecisionPolicy,
]


@pytest.mark.parametrize("model", MODELS, ids=[m.__name__ for m in MODELS])
def test_every_numeric_option_has_a_finite_range(model: type[BaseModel]) -> None:
    assert model.model_config.get("allow_inf_nan") is False
    unbounded = [
        name
        for name, field in model.model_fields.items()
        if _numeric(field.annotation) and _bounds(field) != (True, True)
    ]
    assert unbounded == []


# ------------------------------------------------------------------ (7) user-defined formats

BAD_FORMATS = [
    "{instruction!r:>{input}}",
    "{instruction!r}",
    "{input!s}",
    "{instruction:>10}",
    "{instruction:{input}}",
    "{instruction[0]}",
    "{instruction.upper}",
    "{}",
    "{0}",
    "{question}",
    "{instruction",
    "}",
]


@pytest.mark.parametrize("fmt", BAD_FORMATS)
def test_a_format_string_the_pipeline_cannot_render_is_a_finding(tmp_path: Path, fmt: str) -> None:
    quoted = fmt.replace("'", "''")
    for key in ("format", "no_input_format"):
        text = f"base_model: m\ndatasets:\n  - path: a.jsonl\n    type:\n      {key}: '{quoted}'\n"
        findings = load_errors(tmp_path, text)
        assert [(f.code, f.key) for f in findings] == [("HB008", f"datasets.0.type.{key}")], rendered(
            findings
        )


@pytest.mark.parametrize("fmt", BAD_FORMATS)
def test_the_prompt_format_refuses_them_up_front_too(fmt: str) -> None:
    spec = UserDefinedFormat.model_construct(**{**UserDefinedFormat().model_dump(), "format": fmt})
    with pytest.raises(DataError, match="`format`"):
        UserDefinedPromptFormat(spec, train_on_inputs=False)


@pytest.mark.parametrize(
    "fmt",
    ["{instruction}", "<<{system}>> {instruction}\n{input}", "{{literal}} {instruction}", "no fields", ""],
)
def test_good_format_strings_render_as_the_pipeline_renders_them(tmp_path: Path, fmt: str) -> None:
    quoted = fmt.replace("'", "''").replace("\n", "\\n")
    text = f'base_model: m\ndatasets:\n  - path: a.jsonl\n    type:\n      format: "{quoted}"\n'
    cfg, _ = read_config(write_config(tmp_path, text))
    assert cfg.datasets is not None and isinstance(cfg.datasets[0].type, UserDefinedFormat)
    prompt_format = UserDefinedPromptFormat(cfg.datasets[0].type, train_on_inputs=False)
    # values that would mean something to str.format if they were ever parsed as format strings
    row = {"instruction": "{input}", "input": "!r", "system": "{0}", "output": " o"}
    rendered_row = prompt_format.render(row)
    expected = fmt.format(instruction="{input}", input="!r", system="{0}")
    assert rendered_row.text == expected + " o"


def test_ranges_are_finite_numbers() -> None:
    for name, field in HellbenderConfig.model_fields.items():
        for meta in field.metadata:
            for attr in ("ge", "gt", "le", "lt"):
                value = getattr(meta, attr, None)
                if value is not None:
                    assert math.isfinite(value), name


def test_bounded_run_helper_reports(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD_CONFIG)
    run = run_bounded(["validate", str(path)], tmp_path)
    assert run.code == 0 and run.seconds > 0 and run.cpu_seconds > 0 and run.peak_bytes > 10 << 20
