"""Axolotl configs as they are (issue 13): every real Axolotl key known, "off" values accepted,
Axolotl's spellings honoured, values refused in hellbender's words, GPU configs checked on a CPU
(`validate --target`), every layer reported in one round, and the legacy carry-over.

The configs here are written for these tests in Axolotl's style; none is copied from Axolotl.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from config_fixtures import GOOD_CONFIG, write_config

from hellbender.cli import main
from hellbender.config.axolotl_keys import (
    AXOLOTL_DATASET_KEYS,
    AXOLOTL_DATASET_TYPE_KEYS,
    AXOLOTL_TOP_LEVEL_KEYS,
)
from hellbender.config.carryover import AXOLOTL_NO_OP_KEYS, from_sharegpt, is_off
from hellbender.config.findings import ConfigError, Finding
from hellbender.config.hardware import TARGETS, Hardware, UnknownTarget, target_hardware
from hellbender.config.load import load_config, read_config, unknown_key_findings
from hellbender.config.schema import DatasetConfig, HellbenderConfig, ResolvedConfig

CPU = Hardware(description="CPU")
CUDA = TARGETS["cuda"]
ENV: dict[str, str | None] = {"PYTORCH_ALLOC_CONF": None, "PYTORCH_CUDA_ALLOC_CONF": None, "WORLD_SIZE": "1"}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=ENV, catch_exceptions=False)


def findings_of(tmp_path: Path, text: str, hw: Hardware = CUDA) -> list[Finding]:
    """Every finding of a config, whether it loads or not (errors and warnings when it does not)."""
    try:
        return load_config(write_config(tmp_path, text), world_size=1, hardware=hw, strict=False)[1]
    except ConfigError as exc:
        return exc.findings


def loaded(tmp_path: Path, text: str, hw: Hardware = CUDA) -> tuple[ResolvedConfig, list[Finding]]:
    return load_config(write_config(tmp_path, text), world_size=1, hardware=hw, strict=False)


def codes(findings: list[Finding], severity: str | None = None) -> set[str]:
    return {f.code for f in findings if severity is None or f.severity == severity}


# ------------------------------------------------------------------ every real Axolotl key is known


def test_no_axolotl_key_is_called_unknown() -> None:
    """Every top-level key of Axolotl's schema, plugins and legacy list: supported, or HB005 / a
    carry-over finding, never HB004 with a "did you mean"."""
    others = sorted(AXOLOTL_TOP_LEVEL_KEYS - set(ResolvedConfig.model_fields))
    for key in others:
        found = unknown_key_findings({"base_model": "m", key: "x"})
        assert found and {f.code for f in found} == {"HB005"}, (key, [f.render() for f in found])


@pytest.mark.parametrize(
    "key",
    [
        "expert_parallel_size",
        "liger_rms_norm_gated",
        "fused_attn_kernel",
        "dsv4_fp4_grouped_mode",
        "swanlab_log_completions",
        "nvfp4_merge_aware",
        "selective_checkpointing",
        "torch_empty_cache_steps",
    ],
)
def test_newer_axolotl_keys_name_the_feature(tmp_path: Path, key: str) -> None:
    found = findings_of(tmp_path, GOOD_CONFIG + f"{key}: 4\n")
    (finding,) = [f for f in found if f.key == key]
    assert finding.code == "HB005" and "Did you mean" not in finding.message


@pytest.mark.parametrize("key", sorted(AXOLOTL_DATASET_TYPE_KEYS - set(DatasetConfig.model_fields)))
def test_axolotl_preference_fields_in_a_dataset_entry_are_known(key: str) -> None:
    entry = {"path": "p.jsonl", key: "chosen"}
    (finding,) = unknown_key_findings({"base_model": "m", "datasets": [entry]})
    assert finding.code == "HB005" and "in a dataset entry" in finding.message
    assert key in AXOLOTL_DATASET_KEYS | AXOLOTL_DATASET_TYPE_KEYS


def test_a_real_typo_still_gets_a_suggestion(tmp_path: Path) -> None:
    (finding,) = [
        f for f in findings_of(tmp_path, GOOD_CONFIG + "context_parapllel_size: 2\n") if f.code == "HB004"
    ]
    assert "`context_parallel_size`" in finding.message and finding.severity == "error"


# ------------------------------------------------------------------ "off" values never block


@pytest.mark.parametrize(
    "line",
    [
        "use_kernels: false",
        "cosine_constant_lr_ratio: 0",
        "tokenizer_use_mistral_common: false",
        "pretrain_multipack_attn: true",
        "fix_untrained_tokens: []",
        "rl: ''",
        "plugins: []",
    ],
)
def test_an_axolotl_option_set_to_off_is_accepted(tmp_path: Path, line: str) -> None:
    cfg, found = loaded(tmp_path, GOOD_CONFIG + line + "\n")
    assert "HB010" in codes(found, "info") and not codes(found, "error")
    assert cfg.base_model == "org/some-model"


@pytest.mark.parametrize(
    "line",
    [
        "use_kernels: true",
        "cosine_constant_lr_ratio: 0.1",
        "fix_untrained_tokens: [1]",
        "pretrain_multipack_attn: false",
    ],
)
def test_an_axolotl_option_that_asks_for_something_is_refused_naming_it(tmp_path: Path, line: str) -> None:
    found = findings_of(tmp_path, GOOD_CONFIG + line + "\n")
    assert [(f.code, f.key) for f in found if f.severity == "error"] == [("HB005", line.split(":")[0])]


def test_is_off() -> None:
    assert all(is_off("k", v) for v in (None, False, 0, 0.0, "", [], {}))
    assert not any(is_off("k", v) for v in (True, 1, 0.5, "x", [0], {"a": 1}))
    assert is_off("pretrain_multipack_attn", True) and not is_off("use_kernels", True)
    assert not is_off("pretrain_multipack_attn", False)  # Axolotl's default is true: false asks


def test_an_off_value_in_a_dataset_entry_is_accepted(tmp_path: Path) -> None:
    text = GOOD_CONFIG.replace("    type: alpaca\n", "    type: alpaca\n    drop_system_message: false\n")
    _, found = loaded(tmp_path, text)
    assert "HB010" in codes(found) and not codes(found, "error")


@pytest.mark.parametrize("key", sorted(AXOLOTL_NO_OP_KEYS))
def test_no_op_legacy_keys_are_info_whatever_their_value(tmp_path: Path, key: str) -> None:
    _, found = loaded(tmp_path, GOOD_CONFIG + f"{key}: true\n")
    (note,) = [f for f in found if f.key == key]
    assert (note.code, note.severity) == ("HB012", "info") and AXOLOTL_NO_OP_KEYS[key] in note.message
    assert not codes(found, "error") and key not in ResolvedConfig.model_fields


def test_plugins_whose_features_are_keys_are_accepted(tmp_path: Path) -> None:
    text = GOOD_CONFIG + (
        "plugins:\n  - axolotl.integrations.liger.LigerPlugin\n"
        "  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin\n"
        "liger_rms_norm: true\ncut_cross_entropy: true\n"
    )
    cfg, found = loaded(tmp_path, text)
    assert "HB011" in codes(found, "info") and not codes(found, "error")
    assert cfg.liger_rms_norm and cfg.cut_cross_entropy


def test_other_plugins_are_named(tmp_path: Path) -> None:
    text = GOOD_CONFIG + (
        "plugins:\n  - axolotl.integrations.liger.LigerPlugin\n  - axolotl.integrations.kd.KDPlugin\n"
        "  - my_company.plugins.Magic\n"
    )
    (finding,) = [f for f in findings_of(tmp_path, text) if f.severity == "error"]
    assert finding.code == "HB005" and finding.key == "plugins"
    assert "KDPlugin` (knowledge distillation)" in finding.message and "Magic" in finding.message
    assert "LigerPlugin" not in finding.message


# ------------------------------------------------------------------ values in hellbender's words


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("bradley_terry.chat_template", "preference"),
        ("chat_template.default", "preference"),
        ("alpaca:chat", "type: alpaca"),
        ("pretrain", "type: completion"),
        ("jeopardy", "Use one of"),
        ("my_module.my_transform", "Use one of"),
    ],
)
def test_axolotl_dataset_types_are_named_as_not_supported(tmp_path: Path, kind: str, says: str) -> None:
    text = GOOD_CONFIG.replace("type: alpaca", f"type: {kind}")
    (finding,) = [f for f in findings_of(tmp_path, text) if f.severity == "error"]
    assert finding.code == "HB005" and finding.key == "datasets.0.type"
    assert f"Axolotl dataset type `{kind}` is not supported yet" in finding.message
    assert says in finding.fix and "should be" not in finding.message


def test_sharegpt_with_another_conversation_format_points_to_chat_template(tmp_path: Path) -> None:
    text = GOOD_CONFIG.replace("type: alpaca", "type: sharegpt\n    conversation: vicuna_v1.1")
    found = [f for f in findings_of(tmp_path, text) if f.key == "datasets.0.type"]
    assert found[0].code == "HB005" and "type: chat_template" in found[0].fix


@pytest.mark.parametrize(
    ("text", "key", "meant"),
    [
        (GOOD_CONFIG.replace("type: alpaca", "type: chat_templat"), "datasets.0.type", "chat_template"),
        (GOOD_CONFIG + "lr_scheduler: cosin\n", "lr_scheduler", "cosine"),
        (GOOD_CONFIG + "excess_length_strategy: trunc\n", "excess_length_strategy", "truncate"),
    ],
)
def test_a_misspelled_value_gets_a_suggestion(tmp_path: Path, text: str, key: str, meant: str) -> None:
    (finding,) = [f for f in findings_of(tmp_path, text) if f.severity == "error"]
    assert (finding.code, finding.key) == ("HB008", key)
    assert "Did you mean" in finding.message and meant in finding.message and meant in finding.fix


def test_a_hub_attention_kernel_is_named(tmp_path: Path) -> None:
    text = GOOD_CONFIG + "attn_implementation: kernels-community/flash-attn3\n"
    (finding,) = [f for f in findings_of(tmp_path, text) if f.severity == "error"]
    assert finding.code == "HB005" and "Hugging Face hub" in finding.message


def test_special_tokens_under_tokens_are_explained(tmp_path: Path) -> None:
    text = GOOD_CONFIG + "tokens:\n  bos_token: <s>\n  eos_token: </s>\n"
    (finding,) = [f for f in findings_of(tmp_path, text) if f.severity == "error"]
    assert finding.code == "HB008" and "special_tokens" in finding.fix and "valid list" not in finding.message


# ------------------------------------------------------------------ Axolotl spellings honoured


def test_model_config_is_overrides_of_model_config(tmp_path: Path) -> None:
    cfg, found = loaded(tmp_path, GOOD_CONFIG + "model_config:\n  rope_theta: 20000\n")
    assert cfg.overrides_of_model_config == {"rope_theta": 20000}
    assert ("HB014", "info") in {(f.code, f.severity) for f in found}


@pytest.mark.parametrize(
    ("line", "key", "value"),
    [
        ("model_revision: abc123", "revision_of_model", "abc123"),
        ("type_of_model: LlamaForCausalLM", "model_type", "LlamaForCausalLM"),
        ("evaluation_strategy: epoch", "eval_strategy", "epoch"),
    ],
)
def test_axolotl_aliases_are_read_as_ours(tmp_path: Path, line: str, key: str, value: str) -> None:
    cfg, found = loaded(tmp_path, GOOD_CONFIG + "val_set_size: 0.1\n" + line + "\n")
    assert getattr(cfg, key) == value and "HB014" in codes(found, "info") and not codes(found, "error")


def test_model_config_and_overrides_disagreeing_is_an_error(tmp_path: Path) -> None:
    text = GOOD_CONFIG + "model_config: {rope_theta: 1}\noverrides_of_model_config: {rope_theta: 2}\n"
    (finding,) = [f for f in findings_of(tmp_path, text) if f.severity == "error"]
    assert finding.code == "HB014" and "(line 6)" in finding.message and "(line 7)" in finding.message
    same = GOOD_CONFIG + "model_config: {rope_theta: 1}\noverrides_of_model_config: {rope_theta: 1}\n"
    assert not codes(findings_of(tmp_path, same), "error")


@pytest.mark.parametrize(
    ("lines", "checkpointing", "offloading"),
    [
        ("gradient_checkpointing: offload\n", True, True),
        ("gradient_checkpointing: offload_disk\n", True, "disk"),
        ("gradient_checkpointing: true\nactivation_offloading: legacy\n", True, True),
        ("gradient_checkpointing: true\n", True, False),
    ],
)
def test_checkpointing_spellings(tmp_path: Path, lines: str, checkpointing: Any, offloading: Any) -> None:
    cfg, found = loaded(tmp_path, GOOD_CONFIG + lines)
    assert (cfg.gradient_checkpointing, cfg.activation_offloading) == (checkpointing, offloading)
    assert ("HB014" in codes(found)) == (lines != "gradient_checkpointing: true\n")


def test_warmup_steps_below_one_is_a_ratio(tmp_path: Path) -> None:
    cfg, found = loaded(tmp_path, GOOD_CONFIG + "warmup_steps: 0.1\n")
    assert (cfg.warmup_steps, cfg.warmup_ratio) == (None, 0.1) and "HB014" in codes(found)
    cfg, found = loaded(tmp_path, GOOD_CONFIG + "warmup_steps: 10\n")
    assert (cfg.warmup_steps, cfg.warmup_ratio) == (10, None) and "HB014" not in codes(found)


def test_evals_per_epoch_zero_is_off_and_without_data_a_warning(tmp_path: Path) -> None:
    cfg, found = loaded(tmp_path, GOOD_CONFIG + "evals_per_epoch: 0\n")
    assert cfg.evals_per_epoch is None and "HB010" in codes(found) and "HB109" not in codes(found)
    cfg, found = loaded(tmp_path, GOOD_CONFIG + "evals_per_epoch: 2\n")
    assert cfg.evals_per_epoch == 2 and ("HB109", "warning") in {(f.code, f.severity) for f in found}


@pytest.mark.parametrize("key", ["wandb_watch", "wandb_log_model"])
def test_wandb_switches_set_to_false_are_off(tmp_path: Path, key: str) -> None:
    cfg, found = loaded(tmp_path, GOOD_CONFIG + f"{key}: false\n")
    assert getattr(cfg, key) is None and "HB010" in codes(found) and not codes(found, "error")
    assert "HB199" in codes(findings_of(tmp_path, GOOD_CONFIG + f"{key}: gradients\n"))


# ------------------------------------------------------------------ --target


def test_named_targets() -> None:
    assert target_hardware("H100-80GB").cuda_fp8 and not target_hardware("t4").cuda_bf16
    assert target_hardware("cuda").cuda and not target_hardware("cuda").local
    assert not target_hardware("cpu").cuda
    with pytest.raises(UnknownTarget, match="Did you mean h100-80gb"):
        target_hardware("h100-80")


def test_validate_target_judges_the_gpu_not_this_machine(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, GOOD_CONFIG + "attn_implementation: flash_attention_2\nliger_rms_norm: true\n"
    )
    here = invoke("validate", str(path), "--target", "cpu")
    assert here.exit_code == 1 and "ERROR HB130" in here.output and "ERROR HB134" in here.output
    gpu = invoke("validate", str(path), "--target", "cuda")
    assert gpu.exit_code == 0, gpu.output
    assert "a CUDA GPU (target)" in gpu.output  # the training dtype line names the target


def test_validate_target_named_gpu_without_bf16(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD_CONFIG + "bf16: true\n")
    assert invoke("validate", str(path), "--target", "a100-40gb").exit_code == 0
    old = invoke("validate", str(path), "--target", "t4")
    assert old.exit_code == 1 and "ERROR HB114" in old.output and "NVIDIA T4" in old.output


def test_validate_unknown_target_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["validate", str(write_config(tmp_path, GOOD_CONFIG)), "--target", "h10"]
    )
    assert result.exit_code == 2 and "Known targets" in result.output


@pytest.mark.parametrize(
    ("line", "code"), [("cut_cross_entropy: true", "HB119"), ("optimizer: adamw_8bit", "HB144")]
)
def test_packages_missing_here_are_warnings_for_a_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, code: str
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("cut_cross_entropy", "bitsandbytes") else real(name, *a),
    )
    text = GOOD_CONFIG + line + "\n"
    assert (code, "error") in {(f.code, f.severity) for f in findings_of(tmp_path, text, CPU)}
    assert (code, "warning") in {(f.code, f.severity) for f in findings_of(tmp_path, text, CUDA)}


# ------------------------------------------------------------------ every layer in one round


def test_unknown_key_does_not_hide_the_rules(tmp_path: Path) -> None:
    text = GOOD_CONFIG + "lora_rr: 4\nwarmup_steps: 5\nwarmup_ratio: 0.1\n"
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, text), world_size=1, hardware=CUDA)
    assert {f.code for f in info.value.findings} == {"HB004", "HB110"}


def test_type_error_does_not_hide_the_rules(tmp_path: Path) -> None:
    text = GOOD_CONFIG + "lora_r: many\nload_in_4bit: true\n"
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, text), world_size=1, hardware=CUDA)
    assert {f.code for f in info.value.findings} == {"HB008", "HB106"}


def test_a_refused_pretraining_dataset_does_not_also_say_no_datasets(tmp_path: Path) -> None:
    text = "base_model: m\npretraining_dataset:\n  - path: c4\n"
    found = findings_of(tmp_path, text)
    assert codes(found, "error") == {"HB005"}
    assert "HB137" in codes(findings_of(tmp_path, "base_model: m\n"))


# ------------------------------------------------------------------ legacy carry-over


def test_a_key_repeated_with_the_same_value_is_a_warning(tmp_path: Path) -> None:
    cfg, found = loaded(tmp_path, GOOD_CONFIG + "seed: 7\nseed: 7\n")
    (warning,) = [f for f in found if f.code == "HB013"]
    assert warning.severity == "warning" and "lines 6 and 7" in warning.message and cfg.seed == 7
    (error,) = findings_of(tmp_path, GOOD_CONFIG + "seed: 7\nseed: 8\n")
    assert error.code == "HB001" and "line 6" in error.message and "line 7" in error.message


def test_strict_false_makes_unknown_keys_warnings(tmp_path: Path) -> None:
    text = GOOD_CONFIG + "lora_rr: 4\nneftune_noise_alpha: 5\n"
    assert codes(findings_of(tmp_path, text), "error") == {"HB004", "HB005"}
    found = findings_of(tmp_path, text + "strict: false\n")
    assert codes(found, "warning") >= {"HB004"} and codes(found, "error") == {"HB005"}
    cfg, found = loaded(tmp_path, GOOD_CONFIG + "lora_rr: 4\nstrict: false\n")
    assert ("HB004", "warning") in {(f.code, f.severity) for f in found} and not cfg.strict


def test_allow_unknown_on_the_command_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD_CONFIG + "lora_rr: 4\n")
    assert invoke("validate", str(path)).exit_code == 1
    allowed = invoke("validate", str(path), "--allow-unknown")
    assert allowed.exit_code == 0 and "WARNING HB004" in allowed.output
    read_config(path, allow_unknown=True)
    with pytest.raises(ConfigError):
        read_config(path)


def test_sharegpt_runs_as_chat_template(tmp_path: Path) -> None:
    text = GOOD_CONFIG.replace(
        "type: alpaca", "type: sharegpt\n    conversation: chatml\n    field_human: person"
    )
    cfg, found = loaded(tmp_path, text)
    assert cfg.datasets is not None
    ds = cfg.datasets[0]
    assert (ds.type, ds.field_messages, ds.chat_template) == ("chat_template", "conversations", "chatml")
    assert (ds.message_property_mappings.role, ds.message_property_mappings.content) == ("from", "value")
    assert ds.roles is not None and "person" in ds.roles["user"] and "gpt" in ds.roles["assistant"]
    assert "HB014" in codes(found) and not codes(found, "error")
    assert from_sharegpt({"path": "p", "type": "sharegpt", "conversation": "vicuna_v1.1"}) is None
    plain = from_sharegpt({"path": "p", "type": "sharegpt"})
    assert plain is not None and "roles" not in plain  # the default roles read human and gpt


def test_fix_rewrites_sharegpt(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD_CONFIG.replace("type: alpaca", "type: sharegpt  # chats"))
    result = invoke("validate", str(path), "--fix")
    assert result.exit_code == 0 and "sharegpt → chat_template" in result.output
    text = path.read_text()
    assert "type: chat_template" in text and "field_messages: conversations" in text and "# chats" in text
    again = invoke("validate", str(path))
    assert "HB014" not in again.output and again.exit_code == 0


# ------------------------------------------------------------------ a corpus, through validate --target cuda

# (name, Axolotl-style config, exit code, codes that must be reported, codes that must not)
CORPUS: list[tuple[str, str, int, set[str], set[str]]] = [
    (
        "qlora-liger-cce",
        """\
base_model: org/llama-ish
load_in_4bit: true
adapter: qlora
lora_r: 16
lora_alpha: 32
lora_target_linear: true
plugins:
  - axolotl.integrations.liger.LigerPlugin
  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin
liger_rms_norm: true
liger_glu_activation: true
cut_cross_entropy: true
datasets:
  - path: chats.jsonl
    type: chat_template
val_set_size: 0.05
evals_per_epoch: 4
gradient_checkpointing: offload
flash_attention: true
bf16: auto
tf32: true
remove_unused_columns: false
use_kernels: false
flash_attn_cross_entropy: false
cosine_constant_lr_ratio: 0
is_llama_derived_model: true
strict: false
""",
        0,
        {"HB010", "HB011", "HB012", "HB014", "HB102"},
        {"HB004", "HB005", "HB008", "HB130", "HB134", "HB116"},
    ),
    (
        "old-gptq-lora",
        """\
base_model: org/llama-gptq
gptq: false
gptq_groupsize:
gptq_model_v1:
gptq_disable_exllama: true
adapter: lora
lora_target_modules: [q_proj, v_proj]
sample_packing_seq_len_multiplier:
datasets:
  - path: data.jsonl
    type: sharegpt
    conversation: chatml
model_config:
  rope_scaling: {type: linear, factor: 2.0}
activation_offloading: legacy
gradient_checkpointing: true
warmup_steps: 0.1
wandb_watch: false
evals_per_epoch: 0
""",
        0,
        {"HB012", "HB014", "HB010"},
        {"HB004", "HB005", "HB008", "HB199"},
    ),
    (
        "dpo-refused-by-feature",
        """\
base_model: org/model
rl: dpo
datasets:
  - path: prefs.jsonl
    type: chat_template.default
    field_chosen: chosen
    field_rejected: rejected
plugins:
  - axolotl.integrations.kd.KDPlugin
attn_implementation: kernels-community/vllm-flash-attn3
""",
        1,
        {"HB005"},
        {"HB004", "HB008"},
    ),
    (
        "typos-and-rules-together",
        """\
base_model: org/model
datasets:
  - path: data.jsonl
    type: alpacca
lr_schedular: cosine
warmup_steps: 10
warmup_ratio: 0.1
""",
        1,
        {"HB004", "HB008", "HB110"},
        {"HB005"},
    ),
]


@pytest.mark.parametrize(
    ("name", "text", "exit_code", "present", "absent"), CORPUS, ids=[c[0] for c in CORPUS]
)
def test_axolotl_style_corpus_validates_for_cuda(
    tmp_path: Path, name: str, text: str, exit_code: int, present: set[str], absent: set[str]
) -> None:
    path = write_config(tmp_path, text, f"{name}.yaml")
    result = invoke("validate", str(path), "--target", "cuda")
    reported = {
        word for line in result.output.splitlines() for word in line.split()[1:2] if word.startswith("HB")
    }
    assert result.exit_code == exit_code, result.output
    assert present <= reported, (present - reported, result.output)
    assert not absent & reported, (absent & reported, result.output)


def test_the_schema_default_is_strict() -> None:
    assert HellbenderConfig.model_fields["strict"].default is True


def test_train_allow_unknown_turns_only_unknown_keys_into_warnings(tmp_path: Path) -> None:
    """`train --allow-unknown` loads as validate does: an unknown key no longer stops the run, the
    other errors still do (fp16 on this CPU, before anything is loaded)."""
    path = write_config(tmp_path, GOOD_CONFIG + "lora_rr: 4\nfp16: true\n")
    strict = CliRunner().invoke(main, ["train", str(path)], env=ENV)
    assert strict.exit_code == 1 and "ERROR HB004" in strict.output and "ERROR HB115" in strict.output
    allowed = CliRunner().invoke(main, ["train", "--allow-unknown", str(path)], env=ENV)
    assert allowed.exit_code == 1 and "HB004" not in allowed.output and "ERROR HB115" in allowed.output



def test_a_sharegpt_entry_formats_sharegpt_rows(tmp_path: Path) -> None:
    """The carried-over entry reads Axolotl's sharegpt rows through the chat_template format:
    `from`/`value` turns under `conversations`, a custom human name, only the gpt turns trained."""
    from data_fixtures import smollm2_tokenizer

    from hellbender.data.formats import build_format

    entry = "type: sharegpt\n    conversation: chatml\n    field_human: person"
    cfg, _ = loaded(tmp_path, GOOD_CONFIG.replace("type: alpaca", entry))
    assert cfg.datasets is not None
    fmt = build_format(cfg.datasets[0], cfg, smollm2_tokenizer())
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "person", "value": "Name a colour."},
            {"from": "gpt", "value": "Blue."},
        ]
    }
    rendered = fmt.render(fmt.normalize(row))
    assert "<|im_start|>user\nName a colour." in rendered.text
    assert [rendered.text[a:b] for a, b in rendered.trained] == ["Blue."]


def test_an_axolotl_cloud_launch_config_is_named_as_such(tmp_path: Path) -> None:
    text = "provider: modal\ngpu: h100\ngpu_count: 2\nsecrets: [HF_TOKEN]\n"
    found = findings_of(tmp_path, text)
    assert {f.code for f in found} == {"HB005"} and len(found) == 4
    assert all("cloud-launch config" in f.message for f in found)
