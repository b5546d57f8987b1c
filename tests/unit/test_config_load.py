"""Loading: YAML errors with positions, unknown keys with suggestions, type errors, overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from config_fixtures import GOOD_CONFIG, write_config

from hellbender.config.findings import ConfigError, Finding
from hellbender.config.hardware import Hardware
from hellbender.config.load import (
    AXOLOTL_KEYS_NOT_SUPPORTED,
    DERIVED_KEYS,
    apply_overrides,
    load_config,
    parse_yaml,
    read_config,
)

CPU = Hardware(description="CPU")


def load_errors(tmp_path: Path, text: str, overrides: list[str] | None = None) -> list[Finding]:
    """The findings of a config that must fail to load."""
    with pytest.raises(ConfigError) as info:
        read_config(write_config(tmp_path, text), overrides)
    return info.value.findings


def test_good_config_loads(tmp_path: Path) -> None:
    cfg, raw = read_config(write_config(tmp_path, GOOD_CONFIG))
    assert cfg.base_model == "org/some-model"
    assert cfg.datasets is not None and cfg.datasets[0].path == "data.jsonl"
    assert raw["micro_batch_size"] == 2


# ------------------------------------------------------------------ YAML syntax


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("base_model: x\ndatasets:\n  - path: a\n   type: alpaca\n", 4, 4),  # bad indentation
        ("base_model: x\nlora_r: [1, 2\nseed: 3\n", 3, 5),  # unclosed flow sequence
        ("base_model: 'x\nseed: 1\n", 3, 1),  # unterminated quote
        ("base_model: x\n\tseed: 1\n", 2, 1),  # tab indentation
    ],
)
def test_yaml_syntax_error_reports_line_and_column(tmp_path: Path, text: str, line: int, column: int) -> None:
    # reference position: PyYAML's own mark for the same text (0-based → 1-based)
    with pytest.raises(yaml.YAMLError) as raw_error:
        yaml.safe_load(text)
    assert isinstance(raw_error.value, yaml.MarkedYAMLError)
    mark = raw_error.value.problem_mark
    assert mark is not None
    assert (mark.line + 1, mark.column + 1) == (line, column)
    (finding,) = load_errors(tmp_path, text)
    assert finding.code == "HB001" and finding.severity == "error"
    assert f"line {line}, column {column}" in finding.message
    assert str(tmp_path / "cfg.yaml") in finding.message


def test_deeply_nested_yaml_is_a_finding_not_a_recursion_error(tmp_path: Path) -> None:
    (finding,) = load_errors(tmp_path, "base_model: x\nseed: " + "[" * 3000 + "]" * 3000 + "\n")
    assert finding.code == "HB001" and "nested too deeply" in finding.message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    (finding,) = load_errors(tmp_path, text)
    assert finding.code == "HB002"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        read_config(tmp_path / "missing.yaml")
    assert [f.code for f in info.value.findings] == ["HB000"]


def test_empty_file_reports_required_key(tmp_path: Path) -> None:
    findings = load_errors(tmp_path, "# nothing yet\n")
    assert [(f.code, f.key) for f in findings] == [("HB007", "base_model")]


# ------------------------------------------------------------------ unknown keys


def test_unknown_top_level_key_suggests_the_close_one(tmp_path: Path) -> None:
    (finding,) = load_errors(tmp_path, GOOD_CONFIG + "learning_rat: 0.001\n")
    assert finding.code == "HB004" and finding.key == "learning_rat"
    assert "Did you mean `learning_rate`" in finding.message
    assert "(line 6)" in finding.message
    assert "learning_rate" in finding.fix


def test_unknown_nested_dataset_key_suggests_the_close_one(tmp_path: Path) -> None:
    text = GOOD_CONFIG.replace("    type: alpaca\n", "    type: alpaca\n    field_mesages: conversations\n")
    (finding,) = load_errors(tmp_path, text)
    assert finding.code == "HB004" and finding.key == "datasets.0.field_mesages"
    assert "Did you mean `field_messages`" in finding.message
    assert "(line 5)" in finding.message


def test_unknown_key_in_user_defined_format_is_reported_once(tmp_path: Path) -> None:
    text = GOOD_CONFIG.replace(
        "    type: alpaca\n", "    type:\n      field_instrction: q\n      format: '{instruction}'\n"
    )
    findings = load_errors(tmp_path, text)
    assert [(f.code, f.key) for f in findings] == [("HB004", "datasets.0.type.field_instrction")]
    assert "field_instruction" in findings[0].message


def test_unknown_key_with_no_close_match_has_no_suggestion(tmp_path: Path) -> None:
    (finding,) = load_errors(tmp_path, GOOD_CONFIG + "zzqqxx: 1\n")
    assert finding.code == "HB004" and "Did you mean" not in finding.message


def test_every_unknown_key_is_reported_at_once(tmp_path: Path) -> None:
    findings = load_errors(tmp_path, GOOD_CONFIG + "lora_rr: 4\nseeed: 1\n")
    assert sorted(str(f.key) for f in findings) == ["lora_rr", "seeed"]


@pytest.mark.parametrize("key", sorted(AXOLOTL_KEYS_NOT_SUPPORTED))
def test_axolotl_only_key_is_named_as_unsupported(tmp_path: Path, key: str) -> None:
    (finding,) = load_errors(tmp_path, GOOD_CONFIG + f"{key}: 1\n")
    assert finding.code == "HB005" and finding.key == key
    assert AXOLOTL_KEYS_NOT_SUPPORTED[key] in finding.message
    assert "Did you mean" not in finding.message


@pytest.mark.parametrize(
    ("text", "key", "says"),
    [
        ("greater_is_better: true\n", "greater_is_better", "does not support yet."),
        ("dataloader_drop_last: true\n", "dataloader_drop_last", "does not support yet."),
        ("kd_alpha: 0.5\n", "kd_alpha", "Axolotl plugin"),
        ("optimizer: lion_8bit\n", "optimizer", "adamw_torch"),
        ("lr_scheduler: reduce_lr_on_plateau\n", "lr_scheduler", "cosine"),
    ],
)
def test_any_axolotl_key_or_value_is_named_as_unsupported_not_misspelled(
    tmp_path: Path, text: str, key: str, says: str
) -> None:
    """Axolotl's whole option list (hellbender.config.axolotl_keys), not just the keys with a
    hand-written reason: `greater_is_better` must not be told "did you mean" a hellbender key."""
    (finding,) = load_errors(tmp_path, GOOD_CONFIG + text)
    assert finding.code == "HB005" and finding.key == key, finding.render()
    assert says in finding.message + (finding.fix or "") and "Did you mean" not in finding.message


def test_axolotl_dataset_key_is_named_as_unsupported(tmp_path: Path) -> None:
    text = GOOD_CONFIG.replace("    type: alpaca\n", "    type: alpaca\n    drop_system_message: true\n")
    (finding,) = load_errors(tmp_path, text)
    assert finding.code == "HB005" and finding.key == "datasets.0.drop_system_message"


@pytest.mark.parametrize("key", sorted(AXOLOTL_KEYS_NOT_SUPPORTED))
def test_axolotl_only_key_left_empty_asks_for_nothing(tmp_path: Path, key: str) -> None:
    read_config(write_config(tmp_path, GOOD_CONFIG + f"{key}:\n"))


@pytest.mark.parametrize("key", sorted(DERIVED_KEYS))
def test_derived_key_cannot_be_set(tmp_path: Path, key: str) -> None:
    value = {"compute_dtype": "bfloat16", "loss_method": "chunked"}.get(key, 4)
    (finding,) = load_errors(tmp_path, GOOD_CONFIG + f"{key}: {value}\n")
    assert finding.code == "HB006" and finding.key == key


# ------------------------------------------------------------------ types and empty values


@pytest.mark.parametrize(
    ("line", "path", "given", "expected"),
    [
        ("lora_r: sixteen", "lora_r", "'sixteen'", "integer"),
        ("learning_rate: fast", "learning_rate", "'fast'", "number"),
        ("sample_packing: maybe", "sample_packing", "'maybe'", "boolean"),
        ("optimizer: adam_fancy", "optimizer", "'adam_fancy'", "adamw_torch"),
        ("micro_batch_size: 0", "micro_batch_size", "0", "greater than or equal to 1"),
        ("datasets: 5", "datasets", "5", "list"),
    ],
)
def test_type_error_names_path_value_and_expected_type(
    tmp_path: Path, line: str, path: str, given: str, expected: str
) -> None:
    text = GOOD_CONFIG.replace("micro_batch_size: 2\n", "") if path != "datasets" else "base_model: org/m\n"
    findings = load_errors(tmp_path, text + line + "\n")
    (finding,) = [f for f in findings if f.key == path]
    assert finding.code == "HB008"
    assert f"`{path}`" in finding.message and given in finding.message and expected in finding.message


@pytest.mark.parametrize(
    ("line", "path", "expected"),
    [
        ("bf16: autox", "bf16", ["a valid boolean", "'auto'"]),
        ("gradient_checkpointing: maybe", "gradient_checkpointing", ["a valid boolean", "'selective'"]),
        ("eval_steps: often", "eval_steps", ["a valid integer", "a valid number"]),
        ("lora_target_modules: 5", "lora_target_modules", ["a valid list", "a valid string"]),
    ],
)
def test_union_type_error_is_one_finding_at_the_users_key(
    tmp_path: Path, line: str, path: str, expected: list[str]
) -> None:
    """A key typed as a union is one finding at the key the user wrote (not `bf16.bool` and
    `bf16` separately), and it names every accepted type."""
    findings = load_errors(tmp_path, GOOD_CONFIG + line + "\n")
    assert [f.key for f in findings] == [path]
    assert all(e in findings[0].message for e in expected), findings[0].message


def test_union_type_error_inside_a_dataset(tmp_path: Path) -> None:
    text = GOOD_CONFIG.replace("    type: alpaca\n", "    type: alpacax\n    data_files: 3\n")
    findings = load_errors(tmp_path, text)
    assert sorted(f.key or "" for f in findings) == ["datasets.0.data_files", "datasets.0.type"]
    (type_finding,) = [f for f in findings if f.key == "datasets.0.type"]
    assert "'alpaca'" in type_finding.message and "user-defined format" in type_finding.message
    assert "Did you mean `alpaca`" in type_finding.message and "UserDefinedFormat" not in type_finding.message


def test_nested_type_error_names_the_dataset_path(tmp_path: Path) -> None:
    text = GOOD_CONFIG.replace("    type: alpaca\n", "    type: alpaca\n    roles_to_train: assistant\n")
    (finding,) = load_errors(tmp_path, text)
    assert finding.code == "HB008" and finding.key == "datasets.0.roles_to_train"
    assert "'assistant'" in finding.message and "list" in finding.message


def test_dataset_without_path_is_required(tmp_path: Path) -> None:
    text = "base_model: org/m\ndatasets:\n  - type: alpaca\n"
    findings = load_errors(tmp_path, text)
    assert [(f.code, f.key) for f in findings] == [("HB007", "datasets.0.path")]


def test_empty_values_mean_not_set(tmp_path: Path) -> None:
    """Axolotl's examples leave options empty (``fp16:``) to mean "default"."""
    text = (
        GOOD_CONFIG
        + "fp16:\ntf32:\ndebug:\nlora_fan_in_fan_out:\ndeepspeed:\nspecial_tokens:\nsequence_len:\n"
    )
    cfg, _ = read_config(write_config(tmp_path, text))
    assert cfg.fp16 is False and cfg.tf32 is False and cfg.sequence_len == 2048
    assert not {"fp16", "tf32", "lora_fan_in_fan_out", "sequence_len"} & cfg.model_fields_set
    text = GOOD_CONFIG.replace("    type: alpaca\n", "    type:\n    roles_to_train:\n    train_on_eos:\n")
    cfg, _ = read_config(write_config(tmp_path, text))
    assert cfg.datasets is not None
    assert (cfg.datasets[0].type, cfg.datasets[0].roles_to_train) == ("alpaca", ["assistant"])


def test_empty_value_that_means_off_is_kept(tmp_path: Path) -> None:
    cfg, _ = read_config(write_config(tmp_path, GOOD_CONFIG + "max_grad_norm:\n"))
    assert cfg.max_grad_norm is None  # null turns clipping off; the default would be 1.0


def test_empty_required_key_is_reported_as_required(tmp_path: Path) -> None:
    findings = load_errors(tmp_path, GOOD_CONFIG.replace("base_model: org/some-model", "base_model:"))
    assert [(f.code, f.key) for f in findings] == [("HB007", "base_model")]


def test_empty_unknown_key_is_still_an_error(tmp_path: Path) -> None:
    (finding,) = load_errors(tmp_path, GOOD_CONFIG + "lora_fan_in_fanout:\n")
    assert finding.code == "HB004" and "lora_fan_in_fan_out" in finding.message


# ------------------------------------------------------------------ overrides


@pytest.mark.parametrize(
    ("override", "check"),
    [
        ("lora_r=16", lambda c: c.lora_r == 16),
        ("learning_rate=3e-4", lambda c: c.learning_rate == 3e-4),
        ("bf16=auto", lambda c: c.bf16 == "auto"),
        ("sample_packing=true", lambda c: c.sample_packing is True),
        ("datasets.0.path=other.jsonl", lambda c: c.datasets[0].path == "other.jsonl"),
        (
            "datasets.0.message_property_mappings.role=from",
            lambda c: c.datasets[0].message_property_mappings.role == "from",
        ),
        ("lora_target_modules=[q_proj, v_proj]", lambda c: c.lora_target_modules == ["q_proj", "v_proj"]),
        ("special_tokens.pad_token=<pad>", lambda c: c.special_tokens.pad_token == "<pad>"),
        (
            "overrides_of_model_config.rope_scaling={type: linear, factor: 2.0}",
            lambda c: c.overrides_of_model_config == {"rope_scaling": {"type": "linear", "factor": 2.0}},
        ),
        (
            "datasets=[{path: a.jsonl}, {path: b.jsonl, type: completion}]",
            lambda c: (
                [d.path for d in c.datasets] == ["a.jsonl", "b.jsonl"] and c.datasets[1].type == "completion"
            ),
        ),
        ("output_dir=out=dir", lambda c: c.output_dir == "out=dir"),
    ],
)
def test_override_values_are_yaml(tmp_path: Path, override: str, check: Any) -> None:
    cfg, _ = read_config(write_config(tmp_path, GOOD_CONFIG), [override])
    assert check(cfg)


def test_later_override_wins(tmp_path: Path) -> None:
    cfg, _ = read_config(write_config(tmp_path, GOOD_CONFIG), ["lora_r=4", "lora_r=32"])
    assert cfg.lora_r == 32


def test_override_to_empty_means_not_set(tmp_path: Path) -> None:
    cfg, _ = read_config(write_config(tmp_path, GOOD_CONFIG), ["micro_batch_size="])
    assert cfg.micro_batch_size == 1


@pytest.mark.parametrize(
    ("override", "code"),
    [
        ("lora_r", "HB003"),  # no '='
        ("datasets.3.path=x", "HB003"),  # index out of range
        ("datasets.first.path=x", "HB003"),  # not an index
        ("datasets.²=x", "HB003"),  # a digit int() refuses
        ("micro_batch_size.x=1", "HB003"),  # through a scalar
        ("lora_r=[1, 2", "HB001"),  # YAML error in the value
        ("lora_r=abc", "HB008"),  # wrong type, found by validation
        ("lora_rr=8", "HB004"),  # unknown key, with a suggestion
    ],
)
def test_bad_overrides_are_findings(tmp_path: Path, override: str, code: str) -> None:
    findings = load_errors(tmp_path, GOOD_CONFIG, [override])
    assert [f.code for f in findings] == [code]


def test_apply_overrides_builds_missing_mappings() -> None:
    data: dict[str, Any] = {"base_model": "m"}
    apply_overrides(data, ["fsdp_config.reshard_after_forward=true", "fsdp_config.offload=false"])
    assert data == {"base_model": "m", "fsdp_config": {"reshard_after_forward": True, "offload": False}}


def test_parse_yaml_empty_is_empty_mapping() -> None:
    assert parse_yaml("") == {}
    assert parse_yaml("# only a comment\n") == {}


def test_load_config_strict_raises_with_every_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD_CONFIG + "warmup_steps: 5\nwarmup_ratio: 0.1\nfp16: true\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, world_size=1, hardware=CPU)
    assert {f.code for f in info.value.findings} == {"HB110", "HB115"}
    assert all(f.severity == "error" for f in info.value.findings)
    _, findings = load_config(path, world_size=1, hardware=CPU, strict=False)
    assert {"HB110", "HB115"} <= {f.code for f in findings}


def test_validation_does_not_import_torch(tmp_path: Path) -> None:
    """Keeps `hellbender validate` fast: loading a config must not pull in torch or transformers."""
    import subprocess
    import sys

    path = write_config(tmp_path, GOOD_CONFIG)
    probe = (
        "import sys\n"
        "from hellbender.config.load import load_config\n"
        f"load_config({str(path)!r}, strict=False)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("key", ["save_strategy", "eval_strategy"])
def test_unquoted_no_strategy_means_no(tmp_path: Path, key: str) -> None:
    """YAML 1.1 reads `save_strategy: no` as false; Axolotl configs write it unquoted."""
    cfg, _ = read_config(write_config(tmp_path, GOOD_CONFIG + f"{key}: no\n"))
    assert getattr(cfg, key) == "no"


def test_unknown_keys_and_type_errors_are_reported_together(tmp_path: Path) -> None:
    """One round of fixes: a misspelled key does not hide a known key's wrong type."""
    text = (
        GOOD_CONFIG.replace("    type: alpaca\n", "    type: 5\n    typo_key: 1\n")
        + "learning_rat: 1\nlora_r: big\n"
    )
    findings = load_errors(tmp_path, text)
    assert sorted((f.code, f.key) for f in findings) == [
        ("HB004", "datasets.0.typo_key"),
        ("HB004", "learning_rat"),
        ("HB008", "datasets.0.type"),
        ("HB008", "lora_r"),
    ]
