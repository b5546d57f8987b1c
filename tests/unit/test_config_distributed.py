"""The distributed config surface (issue 11): FSDP2 and DDP options, ``distributed_strategy``, the
rules that refuse what a strategy cannot do, Axolotl's FSDP1 spellings and their ``--fix``.

Every config goes through the real path (YAML file → load → normalize → rules, or the
``hellbender validate`` command) with the world size and the hardware passed in, so multi-process
configs are checked on this one-CPU machine without launching anything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from config_fixtures import GOOD_CONFIG, write_config

from hellbender.cli import main
from hellbender.config.deepspeed import DeepSpeedConfigError, LoopValues, complete, offloads
from hellbender.config.findings import ConfigError, Finding
from hellbender.config.hardware import Hardware
from hellbender.config.load import load_config, read_config
from hellbender.config.schema import FSDPConfig, HellbenderConfig, MixedPrecisionPolicy, ResolvedConfig

CPU = Hardware(description="CPU")
A100 = Hardware(cuda=True, cuda_bf16=True, description="simulated A100")
ISOLATED_ENV: dict[str, str | None] = {
    "PYTORCH_ALLOC_CONF": None,
    "PYTORCH_CUDA_ALLOC_CONF": None,
    "WORLD_SIZE": "1",
}
BASE: dict[str, Any] = {
    "base_model": "org/some-model",
    "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
}
# The shape of Axolotl's deepspeed_configs/zero3.json: what the loop owns is left to "auto".
ZERO3_AUTO: dict[str, Any] = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}
FSDP2: dict[str, Any] = {
    "fsdp_version": 2,
    "fsdp_config": {"transformer_layer_cls_to_wrap": "LlamaDecoderLayer"},
}


def run(
    tmp_path: Path, extra: dict[str, Any], *, world: int = 2, hw: Hardware = A100
) -> tuple[ResolvedConfig, list[Finding]]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**BASE, **extra}, sort_keys=False))
    return load_config(path, world_size=world, hardware=hw, strict=False)


def hits(tmp_path: Path, extra: dict[str, Any], code: str, **kwargs: Any) -> list[Finding]:
    return [f for f in run(tmp_path, extra, **kwargs)[1] if f.code == code]


def load_errors(tmp_path: Path, text: str) -> list[Finding]:
    with pytest.raises(ConfigError) as info:
        read_config(write_config(tmp_path, text))
    return info.value.findings


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=ISOLATED_ENV, catch_exceptions=False)


def resolved_section(output: str) -> dict[str, Any]:
    body = output.split("# resolved config\n", 1)[1]
    return dict(yaml.safe_load(body.rsplit("\n", 2)[0]))


# ------------------------------------------------------------------ the schema


def test_fsdp_config_defaults_are_axolotls_fsdp2_names() -> None:
    fsdp = FSDPConfig()
    assert fsdp.offload_params is False and fsdp.cpu_ram_efficient_loading is False
    assert fsdp.auto_wrap_policy == "TRANSFORMER_BASED_WRAP"
    assert fsdp.transformer_layer_cls_to_wrap is None
    assert fsdp.reshard_after_forward is True
    assert fsdp.state_dict_type == "SHARDED_STATE_DICT"
    assert fsdp.final_state_dict_type == "FULL_STATE_DICT"
    assert fsdp.activation_checkpointing is False
    assert fsdp.mixed_precision_policy is None
    assert fsdp.cpu_offload_pin_memory is True and fsdp.min_num_params is None
    cfg = HellbenderConfig(base_model="m")
    assert cfg.ddp_timeout == 1800
    assert (cfg.ddp_find_unused_parameters, cfg.ddp_bucket_cap_mb, cfg.ddp_broadcast_buffers) == (None,) * 3


@pytest.mark.parametrize(
    ("value", "classes"),
    [
        ("LlamaDecoderLayer", ["LlamaDecoderLayer"]),
        (
            "JambaAttentionDecoderLayer,JambaMambaDecoderLayer",
            ["JambaAttentionDecoderLayer", "JambaMambaDecoderLayer"],
        ),
        ("A, B", ["A", "B"]),
        (["Qwen3DecoderLayer"], ["Qwen3DecoderLayer"]),
    ],
)
def test_layer_classes_take_a_string_or_a_list(value: Any, classes: list[str]) -> None:
    assert FSDPConfig(transformer_layer_cls_to_wrap=value).transformer_layer_cls_to_wrap == classes


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("fsdp_config: {transformer_layer_cls_to_wrap: ''}", "fsdp_config.transformer_layer_cls_to_wrap"),
        ("fsdp_config: {state_dict_type: LOCAL_STATE_DICT}", "fsdp_config.state_dict_type"),
        ("fsdp_config: {auto_wrap_policy: EVERYTHING}", "fsdp_config.auto_wrap_policy"),
        ("fsdp_config: {mixed_precision_policy: fp8}", "fsdp_config.mixed_precision_policy"),
        (
            "fsdp_config: {mixed_precision_policy: {reduce_dtype: fp8}}",
            "fsdp_config.mixed_precision_policy.reduce_dtype",
        ),
        ("fsdp_config: {min_num_params: 0}", "fsdp_config.min_num_params"),
        ("fsdp: [full_shard, everything]", "fsdp.1"),
        ("fsdp_version: 3", "fsdp_version"),
        ("ddp_timeout: 0", "ddp_timeout"),
        ("ddp_timeout: 100000000", "ddp_timeout"),
        ("ddp_bucket_cap_mb: 1.0e+29", "ddp_bucket_cap_mb"),
        ("ddp_find_unused_parameters: maybe", "ddp_find_unused_parameters"),
    ],
)
def test_bad_distributed_values_are_type_errors_naming_the_key(tmp_path: Path, line: str, key: str) -> None:
    findings = load_errors(tmp_path, GOOD_CONFIG + line + "\n")
    assert [(f.code, f.key) for f in findings] == [("HB008", key)], [f.render() for f in findings]


def test_an_fsdp_config_typo_gets_a_suggestion(tmp_path: Path) -> None:
    (finding,) = load_errors(tmp_path, GOOD_CONFIG + "fsdp_config:\n  ofload_params: true\n")
    assert finding.code == "HB004" and finding.key == "fsdp_config.ofload_params"
    assert "`offload_params`" in finding.message


def test_a_range_error_inside_fsdp_config_names_the_range(tmp_path: Path) -> None:
    (finding,) = load_errors(tmp_path, GOOD_CONFIG + "ddp_timeout: -5\n")
    assert "1 ≤ ddp_timeout ≤ 604800" in finding.message


def test_mixed_precision_policy_names_and_shorthand(tmp_path: Path) -> None:
    cfg, _ = read_config(
        write_config(tmp_path, GOOD_CONFIG + "fsdp_config:\n  mixed_precision_policy: {param_dtype: bf16}\n")
    )
    assert cfg.fsdp_config is not None
    assert cfg.fsdp_config.mixed_precision_policy == MixedPrecisionPolicy(param_dtype="bfloat16")
    both = FSDPConfig.model_validate({"mixed_precision_policy": "bf16"}).mixed_precision_policy
    assert both == MixedPrecisionPolicy(param_dtype="bfloat16", reduce_dtype="bfloat16")
    full = {"param_dtype": "bfloat16", "reduce_dtype": "float32"}
    assert FSDPConfig.model_validate({"mixed_precision_policy": full}).mixed_precision_policy == (
        MixedPrecisionPolicy(param_dtype="bfloat16", reduce_dtype="float32")
    )


def test_an_empty_value_inside_fsdp_config_takes_the_default(tmp_path: Path) -> None:
    """As at the top level: Axolotl's configs write `offload_params:` to mean "unset"."""
    cfg, _ = read_config(write_config(tmp_path, GOOD_CONFIG + "fsdp_config:\n  offload_params:\n"))
    assert cfg.fsdp_config is not None and cfg.fsdp_config.offload_params is False


def test_distributed_strategy_is_derived_and_cannot_be_set(tmp_path: Path) -> None:
    (finding,) = load_errors(tmp_path, GOOD_CONFIG + "distributed_strategy: ddp\n")
    assert finding.code == "HB006"


# ------------------------------------------------------------------ distributed_strategy


@pytest.mark.parametrize(
    ("extra", "world", "strategy"),
    [
        ({}, 1, "single"),
        ({}, 2, "ddp"),
        ({}, 8, "ddp"),
        (FSDP2, 1, "single"),
        (FSDP2, 2, "fsdp2"),
        ({"fsdp_config": {}}, 2, "fsdp2"),
        ({"fsdp_version": 2}, 2, "fsdp2"),
        ({"fsdp": ["full_shard", "auto_wrap"]}, 4, "fsdp2"),
        ({"fsdp": []}, 2, "ddp"),  # an empty list asks for nothing
        ({"ddp": True}, 2, "ddp"),
        ({"deepspeed": "zero3.json"}, 2, "deepspeed"),
        ({"deepspeed": "zero3.json"}, 1, "single"),
    ],
)
def test_distributed_strategy(tmp_path: Path, extra: dict[str, Any], world: int, strategy: str) -> None:
    cfg, _ = run(tmp_path, extra, world=world)
    assert cfg.distributed_strategy == strategy


def test_fsdp_resolves_to_version_2_and_one_fsdp_config(tmp_path: Path) -> None:
    cfg, _ = run(tmp_path, {"fsdp": ["full_shard", "auto_wrap"]})
    assert cfg.fsdp_version == 2 and cfg.fsdp is None
    assert cfg.fsdp_config == FSDPConfig()  # the list asked for the defaults
    cfg, _ = run(tmp_path, {"fsdp_config": {"fsdp_version": 2, "offload_params": True}})
    assert cfg.fsdp_version == 2 and cfg.fsdp_config is not None
    assert cfg.fsdp_config.fsdp_version is None and cfg.fsdp_config.offload_params is True
    cfg, _ = run(tmp_path, {})
    assert cfg.fsdp_config is None and cfg.fsdp_version is None


def test_distributed_keys_are_no_longer_refused_as_not_implemented(tmp_path: Path) -> None:
    (tmp_path / "zero3.json").write_text(json.dumps(ZERO3_AUTO))
    for key in ("deepspeed", "fsdp_config", "fsdp_version", "fsdp", "ddp"):
        extra = {"fsdp": ["full_shard"]} if key == "fsdp" else {key: {} if key == "fsdp_config" else 2}
        if key == "ddp":
            extra = {"ddp": True}
        if key == "deepspeed":
            extra = {"deepspeed": str(tmp_path / "zero3.json")}
        assert not hits(tmp_path, extra, "HB199"), key


@pytest.mark.parametrize("world", [2, 4])
def test_world_size_identities_hold_with_several_processes(tmp_path: Path, world: int) -> None:
    cfg, findings = run(
        tmp_path, {**FSDP2, "micro_batch_size": 2, "gradient_accumulation_steps": 4}, world=world
    )
    assert cfg.data_parallel_size == world and cfg.batch_size == 2 * 4 * world
    cfg, findings = run(tmp_path, {"micro_batch_size": 2, "batch_size": 16}, world=2)
    assert cfg.gradient_accumulation_steps == 4 and [f.code for f in findings if f.code == "HB120"]
    _, findings = run(tmp_path, {"micro_batch_size": 2, "batch_size": 6}, world=2)
    assert [f.severity for f in findings if f.code == "HB121"] == ["error"]
    _, findings = run(tmp_path, {**FSDP2, "context_parallel_size": 2}, world=3)
    assert [f.severity for f in findings if f.code == "HB151"] == ["error"]


@pytest.mark.parametrize(
    ("extra", "world", "refused"),
    [
        ({**FSDP2, "dp_shard_size": 2}, 2, False),  # FSDP2 over every data-parallel rank: what runs
        ({**FSDP2, "dp_shard_size": 1}, 2, True),  # shard over 1, replicate over 2: HSDP
        ({**FSDP2, "dp_shard_size": 4}, 8, True),
        ({"dp_shard_size": 1}, 2, False),  # DDP shards nothing
        ({"dp_replicate_size": 1}, 2, False),
        ({**FSDP2, "dp_replicate_size": 2, "dp_shard_size": 2}, 4, True),
    ],
)
def test_n_d_sizes_that_describe_the_plain_run_are_accepted(
    tmp_path: Path, extra: dict[str, Any], world: int, refused: bool
) -> None:
    assert bool(hits(tmp_path, extra, "HB199", world=world)) is refused


# ------------------------------------------------------------------ FSDP1 spellings (normalize)


@pytest.mark.parametrize(
    ("extra", "warned"),
    [
        ({"fsdp_version": 1, "fsdp_config": {}}, True),
        ({"fsdp_config": {"offload_params": False}}, True),  # no version: Axolotl runs FSDP1
        ({"fsdp": ["full_shard"]}, True),
        ({"fsdp_version": 2, "fsdp_config": {}}, False),
        ({"fsdp_config": {"fsdp_version": 2}}, False),  # Axolotl's other place for the version
        ({"fsdp_version": 2}, False),
    ],
)
def test_hb160_fsdp1_runs_as_fsdp2_with_a_warning(
    tmp_path: Path, extra: dict[str, Any], warned: bool
) -> None:
    found = hits(tmp_path, extra, "HB160")
    assert [f.severity for f in found] == (["warning"] if warned else [])
    cfg, _ = run(tmp_path, extra)
    assert cfg.distributed_strategy == "fsdp2" and cfg.fsdp_version == 2


def test_hb161_fsdp_prefixed_keys_are_read_as_fsdp2_names(tmp_path: Path) -> None:
    legacy = {
        "fsdp_offload_params": True,
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_reshard_after_forward": False,
    }
    cfg, findings = run(tmp_path, {"fsdp_version": 2, "fsdp_config": legacy})
    (warning,) = [f for f in findings if f.code == "HB161"]
    assert warning.severity == "warning" and "fsdp_offload_params" in warning.message
    assert warning.key == "fsdp_config.fsdp_offload_params"
    fsdp = cfg.fsdp_config
    assert fsdp is not None
    assert fsdp.offload_params and fsdp.cpu_ram_efficient_loading and not fsdp.reshard_after_forward
    assert fsdp.transformer_layer_cls_to_wrap == ["LlamaDecoderLayer"]
    assert fsdp.state_dict_type == "FULL_STATE_DICT"
    assert all(getattr(fsdp, k) is None for k in legacy)  # one spelling left: the FSDP2 one


def test_hb161_top_level_final_state_dict_type(tmp_path: Path) -> None:
    cfg, findings = run(tmp_path, {**FSDP2, "fsdp_final_state_dict_type": "SHARDED_STATE_DICT"})
    assert [f.key for f in findings if f.code == "HB161"] == ["fsdp_final_state_dict_type"]
    assert cfg.fsdp_config is not None and cfg.fsdp_config.final_state_dict_type == "SHARDED_STATE_DICT"
    assert cfg.fsdp_final_state_dict_type is None


def test_hb162_the_fsdp_list_is_read_into_fsdp_config(tmp_path: Path) -> None:
    cfg, findings = run(tmp_path, {"fsdp": ["shard_grad_op", "auto_wrap", "offload"], "fsdp_version": 2})
    (warning,) = [f for f in findings if f.code == "HB162"]
    assert "offload as offload_params: true" in warning.message
    assert cfg.fsdp_config is not None
    assert cfg.fsdp_config.offload_params is True and cfg.fsdp_config.reshard_after_forward is False


def test_hb163_fsdp1_only_options_have_no_effect(tmp_path: Path) -> None:
    fsdp1 = {"sync_module_states": True, "fsdp_use_orig_params": False, "limit_all_gathers": True}
    cfg, findings = run(tmp_path, {"fsdp_version": 2, "fsdp_config": fsdp1})
    (warning,) = [f for f in findings if f.code == "HB163"]
    assert warning.severity == "warning" and "no effect" in warning.message
    assert "fsdp_config.fsdp_use_orig_params" in warning.message
    assert cfg.fsdp_config is not None and cfg.fsdp_config.sync_module_states is None
    assert not hits(tmp_path, FSDP2, "HB163")


@pytest.mark.parametrize(("strategy", "reshard"), [("FULL_SHARD", True), ("SHARD_GRAD_OP", False)])
def test_hb164_sharding_strategy_is_reshard_after_forward(
    tmp_path: Path, strategy: str, reshard: bool
) -> None:
    for key in ("sharding_strategy", "fsdp_sharding_strategy"):
        cfg, findings = run(tmp_path, {"fsdp_version": 2, "fsdp_config": {key: strategy}})
        assert [f.severity for f in findings if f.code == "HB164"] == ["warning"]
        assert cfg.fsdp_config is not None
        assert cfg.fsdp_config.reshard_after_forward is reshard and cfg.fsdp_config.sharding_strategy is None


@pytest.mark.parametrize(
    "extra",
    [
        {"fsdp_config": {"offload_params": True, "fsdp_offload_params": False}},
        {"fsdp_config": {"sharding_strategy": "SHARD_GRAD_OP", "reshard_after_forward": True}},
        {"fsdp": ["shard_grad_op"], "fsdp_config": {"reshard_after_forward": True}},
        {"fsdp": ["full_shard", "shard_grad_op"]},
        {"fsdp_version": 2, "fsdp_config": {"fsdp_version": 1}},
        {
            "fsdp_final_state_dict_type": "FULL_STATE_DICT",
            "fsdp_config": {"final_state_dict_type": "SHARDED_STATE_DICT"},
        },
    ],
)
def test_hb165_two_spellings_that_disagree_are_an_error(tmp_path: Path, extra: dict[str, Any]) -> None:
    found = hits(tmp_path, extra, "HB165")
    assert [f.severity for f in found] == ["error"]
    assert found[0].fix


def test_hb165_two_spellings_that_agree_are_only_the_legacy_warning(tmp_path: Path) -> None:
    extra = {"fsdp_version": 2, "fsdp_config": {"offload_params": True, "fsdp_offload_params": True}}
    assert not hits(tmp_path, extra, "HB165") and hits(tmp_path, extra, "HB161")


@pytest.mark.parametrize(
    "extra",
    [
        {"fsdp": ["no_shard"]},
        {"fsdp": ["hybrid_shard", "auto_wrap"]},
        {"fsdp_config": {"sharding_strategy": "NO_SHARD"}},
        {"fsdp_config": {"fsdp_sharding_strategy": "HYBRID_SHARD"}},
    ],
)
def test_hb166_sharding_fsdp2_cannot_do_here_is_an_error(tmp_path: Path, extra: dict[str, Any]) -> None:
    assert [f.severity for f in hits(tmp_path, extra, "HB166")] == ["error"]


def test_hb173_activation_checkpointing_turns_on_gradient_checkpointing(tmp_path: Path) -> None:
    on = {"fsdp_version": 2, "fsdp_config": {"activation_checkpointing": True}}
    cfg, findings = run(tmp_path, on)
    assert cfg.gradient_checkpointing is True and not [f for f in findings if f.code == "HB173"]
    cfg, findings = run(tmp_path, {**on, "gradient_checkpointing": False})
    assert cfg.gradient_checkpointing is True
    assert [f.severity for f in findings if f.code == "HB173"] == ["info"]
    cfg, _ = run(tmp_path, {**on, "gradient_checkpointing": "selective"})
    assert cfg.gradient_checkpointing == "selective"
    cfg, _ = run(
        tmp_path, {"fsdp_version": 2, "fsdp_config": {"fsdp_activation_checkpointing": True}}, world=1
    )
    assert cfg.gradient_checkpointing is True  # on one process too, as Axolotl does
    cfg, _ = run(tmp_path, FSDP2)
    assert cfg.gradient_checkpointing is False


# ------------------------------------------------------------------ rules

QLORA = {"adapter": "qlora", "load_in_4bit": True, "lora_target_linear": True}
LORA_8BIT = {"adapter": "lora", "load_in_8bit": True, "lora_target_linear": True}


@pytest.mark.parametrize("quantized", [QLORA, LORA_8BIT])
def test_hb167_quantized_base_under_zero3(tmp_path: Path, quantized: dict[str, Any]) -> None:
    found = hits(tmp_path, {"deepspeed": ZERO3_AUTO, **quantized}, "HB167")
    assert [f.severity for f in found] == ["error"] and "DeepSpeed ZeRO-3" in found[0].message
    # FSDP2, ZeRO-2 and DDP keep the frozen quantized base whole on every rank
    zero2 = {**ZERO3_AUTO, "zero_optimization": {"stage": 2}}
    for extra in (FSDP2, {"deepspeed": zero2}, {}):
        assert not hits(tmp_path, {**extra, **quantized}, "HB167"), extra
    assert not hits(tmp_path, {"deepspeed": ZERO3_AUTO, **quantized}, "HB167", world=1)


@pytest.mark.parametrize("extra", [FSDP2, {"fsdp_version": 2}, {"fsdp": ["full_shard"]}])
def test_hb111_fsdp_with_deepspeed(tmp_path: Path, extra: dict[str, Any]) -> None:
    assert [f.severity for f in hits(tmp_path, {**extra, "deepspeed": "ds.json"}, "HB111")] == ["error"]
    assert not hits(tmp_path, extra, "HB111")


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "adamw_bnb_8bit"])
def test_hb168_bitsandbytes_optimizer_under_fsdp2(tmp_path: Path, optimizer: str) -> None:
    assert [f.severity for f in hits(tmp_path, {**FSDP2, "optimizer": optimizer}, "HB168")] == ["error"]
    assert not hits(tmp_path, {**FSDP2, "optimizer": "adamw_torch_fused"}, "HB168")
    assert not hits(tmp_path, {"optimizer": optimizer}, "HB168")  # DDP
    zero3 = {"deepspeed": ZERO3_AUTO, "optimizer": optimizer}
    assert [f.severity for f in hits(tmp_path, zero3, "HB168")] == ["error"]


def test_hb169_size_based_wrap_needs_a_size(tmp_path: Path) -> None:
    policy = {"fsdp_version": 2, "fsdp_config": {"auto_wrap_policy": "SIZE_BASED_WRAP"}}
    assert [f.severity for f in hits(tmp_path, policy, "HB169")] == ["error"]
    policy["fsdp_config"]["min_num_params"] = 100_000_000
    assert not hits(tmp_path, policy, "HB169")


@pytest.mark.parametrize(
    ("extra", "key", "hw"),
    [
        ({**FSDP2, "ddp_find_unused_parameters": True}, "ddp_find_unused_parameters", A100),
        ({**FSDP2, "ddp_bucket_cap_mb": 50}, "ddp_bucket_cap_mb", A100),
        ({**FSDP2, "ddp": True}, "ddp", A100),
        (
            {
                "fsdp_version": 2,
                "fsdp_config": {"auto_wrap_policy": "NO_WRAP", "transformer_layer_cls_to_wrap": "X"},
            },
            "fsdp_config.transformer_layer_cls_to_wrap",
            A100,
        ),
        ({"fsdp_version": 2, "fsdp_config": {"min_num_params": 1000}}, "fsdp_config.min_num_params", A100),
        (
            {"fsdp_version": 2, "fsdp_config": {"cpu_offload_pin_memory": False}},
            "fsdp_config.cpu_offload_pin_memory",
            A100,
        ),
        ({"fsdp_version": 2, "fsdp_config": {"offload_params": True}}, "fsdp_config.offload_params", CPU),
        ({"fsdp_final_state_dict_type": "FULL_STATE_DICT"}, "fsdp_final_state_dict_type", A100),
        (
            {"fsdp_version": 2, "fsdp_config": {"cpu_ram_efficient_loading": True}, **QLORA},
            "fsdp_config.cpu_ram_efficient_loading",
            A100,
        ),
        (
            {"fsdp_version": 2, "fsdp_config": {"final_state_dict_type": "SHARDED_STATE_DICT"}},
            "fsdp_config.final_state_dict_type",
            A100,
        ),
    ],
)
def test_hb170_options_without_effect_are_said(
    tmp_path: Path, extra: dict[str, Any], key: str, hw: Hardware
) -> None:
    found = hits(tmp_path, extra, "HB170", hw=hw)
    assert [(f.severity, f.key) for f in found] == [("warning", key)]


@pytest.mark.parametrize(
    "extra",
    [
        {**FSDP2, "ddp_timeout": 600},
        {"ddp_find_unused_parameters": True, "ddp_bucket_cap_mb": 50, "ddp_broadcast_buffers": False},
        {"fsdp_version": 2, "fsdp_config": {"offload_params": True, "cpu_offload_pin_memory": False}},
        {"fsdp_version": 2, "fsdp_config": {"auto_wrap_policy": "SIZE_BASED_WRAP", "min_num_params": 1000}},
    ],
)
def test_hb170_quiet_when_the_options_apply(tmp_path: Path, extra: dict[str, Any]) -> None:
    assert not hits(tmp_path, extra, "HB170")


@pytest.mark.parametrize(
    "extra",
    [
        FSDP2,
        {"ddp": True},
        {"ddp_find_unused_parameters": False},
        {"fsdp": ["full_shard"]},
        {"ddp_timeout": 60},
    ],
)
def test_hb171_distributed_options_on_one_process(tmp_path: Path, extra: dict[str, Any]) -> None:
    (info,) = hits(tmp_path, extra, "HB171", world=1)
    assert info.severity == "info" and "--nproc-per-node" in info.fix and "--world-size" in info.fix
    assert not hits(tmp_path, extra, "HB171", world=2)
    assert not hits(tmp_path, {"ddp": False}, "HB171", world=1)
    assert not hits(tmp_path, {}, "HB171", world=1)


def test_hb172_ddp_false_with_several_processes(tmp_path: Path) -> None:
    assert [f.severity for f in hits(tmp_path, {"ddp": False}, "HB172")] == ["error"]
    assert not hits(tmp_path, {"ddp": False}, "HB172", world=1)
    assert not hits(tmp_path, {"ddp": False, **FSDP2}, "HB172")
    assert not hits(tmp_path, {"ddp": True}, "HB172")


# ------------------------------------------------------------------ real Axolotl FSDP2 configs

# The FSDP parts of Axolotl's own documentation and examples, as written there.
AXOLOTL_FSDP2 = {
    # docs/multi-gpu.qmd, "Migrating from FSDP1 to FSDP2"
    "multi-gpu-migrated": """\
fsdp_version: 2
fsdp_config:
  offload_params: false
  cpu_ram_efficient_loading: true
  auto_wrap_policy: TRANSFORMER_BASED_WRAP
  transformer_layer_cls_to_wrap: Qwen3DecoderLayer
  state_dict_type: FULL_STATE_DICT
  reshard_after_forward: true
""",
    # docs/multi-node.qmd
    "multi-node": """\
fsdp_version: 2
fsdp_config:
  offload_params: true
  state_dict_type: FULL_STATE_DICT
  auto_wrap_policy: TRANSFORMER_BASED_WRAP
  transformer_layer_cls_to_wrap: LlamaDecoderLayer
  reshard_after_forward: true
""",
    # examples/gpt-oss/gpt-oss-20b-fft-fsdp2.yaml
    "gpt-oss-20b-fft-fsdp2": """\
gradient_checkpointing: true
fsdp_version: 2
fsdp_config:
  offload_params: false
  state_dict_type: SHARDED_STATE_DICT
  auto_wrap_policy: TRANSFORMER_BASED_WRAP
  transformer_layer_cls_to_wrap: GptOssDecoderLayer
  reshard_after_forward: true
#  cpu_ram_efficient_loading: true
""",
    # examples/falcon-e/falcon-e-3b-ft.yaml
    "falcon-e-3b-ft": """\
fsdp_version: 2
fsdp_config:
  offload_params: false
  auto_wrap_policy: TRANSFORMER_BASED_WRAP
  transformer_layer_cls_to_wrap: LlamaDecoderLayer
  state_dict_type: FULL_STATE_DICT
  reshard_after_forward: true
  activation_checkpointing: true
""",
    # examples/alst/llama3-8b-fsdp2-alst.yaml (without its context parallelism)
    "llama3-8b-fsdp2": """\
gradient_checkpointing: true
fsdp_version: 2
fsdp_config:
  offload_params: false  # offloading is currently not compatible with SP + torchao optimizer
  state_dict_type: SHARDED_STATE_DICT
  auto_wrap_policy: TRANSFORMER_BASED_WRAP
  transformer_layer_cls_to_wrap: LlamaDecoderLayer
  reshard_after_forward: true
""",
}


@pytest.mark.parametrize("name", sorted(AXOLOTL_FSDP2))
def test_axolotl_fsdp2_configs_validate_cleanly_for_two_ranks(tmp_path: Path, name: str) -> None:
    path = write_config(tmp_path, GOOD_CONFIG + AXOLOTL_FSDP2[name])
    result = invoke("validate", str(path), "--world-size", "2", "--resolved")
    assert result.exit_code == 0, result.output
    assert "0 error(s)" in result.output
    resolved = resolved_section(result.output)
    assert resolved["distributed_strategy"] == "fsdp2" and resolved["world_size"] == 2
    assert resolved["data_parallel_size"] == 2 and resolved["batch_size"] == 2 * 2
    # on a GPU machine not even a warning: every key is an FSDP2 key hellbender uses
    _, findings = load_config(path, world_size=2, hardware=A100, strict=False)
    assert [f.render() for f in findings if f.severity != "info"] == []
    # the resolved config is itself a valid config (derived keys aside)
    resolved.pop("distributed_strategy")
    for key in ("world_size", "data_parallel_size", "compute_dtype", "epochs_given", "loss_method"):
        resolved.pop(key)
    HellbenderConfig.model_validate(resolved)


def test_an_axolotl_fsdp2_config_with_fsdp1_keys_validates_with_warnings(tmp_path: Path) -> None:
    """examples/glm47-flash/lora_fsdp.yaml's FSDP part: the version inside fsdp_config, and
    FSDP1's sharding_strategy next to reshard_after_forward."""
    text = """\
fsdp_config:
  fsdp_version: 2
  offload_params: false
  cpu_ram_efficient_loading: false
  auto_wrap_policy: TRANSFORMER_BASED_WRAP
  transformer_layer_cls_to_wrap: Glm4MoeLiteDecoderLayer
  state_dict_type: FULL_STATE_DICT
  sharding_strategy: FULL_SHARD
  reshard_after_forward: true
  activation_checkpointing: true
"""
    path = write_config(tmp_path, GOOD_CONFIG + text)
    result = invoke("validate", str(path), "--world-size", "2")
    assert result.exit_code == 0, result.output
    assert "WARNING HB164" in result.output and "HB160" not in result.output
    assert invoke("validate", str(path), "--fix").exit_code == 0
    assert "sharding_strategy" not in path.read_text()
    assert "WARNING" not in invoke("validate", str(path), "--world-size", "2").output


# ------------------------------------------------------------------ validate --world-size


def test_validate_world_size_checks_the_config_for_n_ranks(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, GOOD_CONFIG + "gradient_accumulation_steps: 4\n" + AXOLOTL_FSDP2["multi-node"]
    )
    one = invoke("validate", str(path), "--resolved")
    assert one.exit_code == 0 and "INFO HB171" in one.output
    assert resolved_section(one.output)["distributed_strategy"] == "single"
    eight = invoke("validate", str(path), "--world-size", "8", "--resolved")
    resolved = resolved_section(eight.output)
    assert (resolved["world_size"], resolved["batch_size"], resolved["distributed_strategy"]) == (
        8,
        64,
        "fsdp2",
    )
    (tmp_path / "zero3.json").write_text(json.dumps(ZERO3_AUTO))
    zero3 = f"deepspeed: {tmp_path / 'zero3.json'}\n"
    qlora = write_config(tmp_path, GOOD_CONFIG + zero3 + "adapter: qlora\nload_in_4bit: true\n")
    assert "HB167" not in invoke("validate", str(qlora)).output
    refused = invoke("validate", str(qlora), "--world-size", "2")
    assert refused.exit_code == 1 and "ERROR HB167" in refused.output


def test_validate_world_size_wins_over_the_environment(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD_CONFIG)
    result = CliRunner().invoke(
        main,
        ["validate", str(path), "--world-size", "2", "--resolved"],
        env={**ISOLATED_ENV, "WORLD_SIZE": "x"},
    )
    assert result.exit_code == 0, result.output
    assert resolved_section(result.output)["distributed_strategy"] == "ddp"


@pytest.mark.parametrize("bad", ["0", "-1", "two", "100000"])
def test_validate_world_size_must_be_a_positive_count(tmp_path: Path, bad: str) -> None:
    result = invoke("validate", str(write_config(tmp_path, GOOD_CONFIG)), "--world-size", bad)
    assert result.exit_code == 2 and "--world-size" in result.output


# ------------------------------------------------------------------ validate --fix

# examples/llama-2/qlora-fsdp.yml's FSDP part (Axolotl's FSDP1 form), with a full fine-tune.
FSDP1_BEFORE = """\
base_model: org/some-model
datasets:
  - path: data.jsonl
    type: alpaca
micro_batch_size: 2
gradient_checkpointing: true
fsdp:
  - full_shard
  - auto_wrap
fsdp_config:
  fsdp_limit_all_gathers: true
  fsdp_sync_module_states: true
  fsdp_offload_params: true  # CPU memory
  fsdp_use_orig_params: false
  fsdp_cpu_ram_efficient_loading: true
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_state_dict_type: FULL_STATE_DICT
  # fsdp_cpu_offload_pin_memory: false  # uncomment to enable swap memory usage when RAM is insufficient
seed: 7
"""
FSDP1_AFTER = """\
base_model: org/some-model
datasets:
  - path: data.jsonl
    type: alpaca
micro_batch_size: 2
gradient_checkpointing: true
fsdp_version: 2
fsdp_config:
  reshard_after_forward: true
  offload_params: true # CPU memory
  cpu_ram_efficient_loading: true
  auto_wrap_policy: TRANSFORMER_BASED_WRAP
  transformer_layer_cls_to_wrap: LlamaDecoderLayer
  state_dict_type: FULL_STATE_DICT
  # fsdp_cpu_offload_pin_memory: false  # uncomment to enable swap memory usage when RAM is insufficient
seed: 7
"""


def test_fix_rewrites_axolotl_fsdp1_to_fsdp2_keeping_comments(tmp_path: Path) -> None:
    path = write_config(tmp_path, FSDP1_BEFORE)
    before, findings = load_config(path, world_size=2, hardware=A100, strict=False)
    assert {"HB160", "HB161", "HB162", "HB163"} <= {f.code for f in findings}
    result = invoke("validate", str(path), "--fix", "--world-size", "2")
    assert result.exit_code == 0, result.output
    assert "fixed: fsdp: [full_shard, auto_wrap] → fsdp_version: 2" in result.output
    assert "fixed: removed FSDP1-only fsdp_config keys" in result.output
    assert path.read_text() == FSDP1_AFTER
    after, later = load_config(path, world_size=2, hardware=A100, strict=False)
    assert not {"HB160", "HB161", "HB162", "HB163", "HB164"} & {f.code for f in later}
    assert after.fsdp_config == before.fsdp_config and after.distributed_strategy == "fsdp2"


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (
            "fsdp_version: 1  # old\nfsdp_config:\n  fsdp_version: 1\n  offload_params: false\n",
            "fsdp_version: 2  # old\nfsdp_config:\n  fsdp_version: 2\n  offload_params: false\n",
        ),
        (
            "fsdp_config:\n  offload_params: false\n",
            "fsdp_version: 2\nfsdp_config:\n  offload_params: false\n",
        ),
        (
            "fsdp_config:\n  fsdp_version: 1\n",
            "fsdp_config:\n  fsdp_version: 2\n",
        ),
        (
            "fsdp:\n  - shard_grad_op\n  - offload\nseed: 1\n",
            "fsdp_version: 2\nfsdp_config:\n  reshard_after_forward: false\n  offload_params: true\n"
            "seed: 1\n",
        ),
        (
            "fsdp_version: 2\nfsdp_config:\n  sharding_strategy: SHARD_GRAD_OP\n  offload_params: true\n",
            "fsdp_version: 2\nfsdp_config:\n  reshard_after_forward: false\n  offload_params: true\n",
        ),
        (
            "fsdp_version: 2\nfsdp_config:\n  fsdp_offload_params: true\n  offload_params: true\n",
            "fsdp_version: 2\nfsdp_config:\n  offload_params: true\n",
        ),
        (
            "fsdp_version: 2\nfsdp_final_state_dict_type: FULL_STATE_DICT\nseed: 1\n",
            "fsdp_version: 2\nfsdp_config:\n  final_state_dict_type: FULL_STATE_DICT\nseed: 1\n",
        ),
    ],
    ids=[
        "version-1",
        "no-version",
        "nested-version",
        "fsdp-list",
        "sharding-strategy",
        "both-spellings",
        "final",
    ],
)
def test_fix_fsdp_rewrites(tmp_path: Path, before: str, after: str) -> None:
    path = write_config(tmp_path, GOOD_CONFIG + before)
    old, _ = load_config(path, world_size=2, hardware=A100, strict=False)
    result = invoke("validate", str(path), "--fix", "--world-size", "2")
    assert result.exit_code == 0, result.output
    assert path.read_text() == GOOD_CONFIG + after
    new, findings = load_config(path, world_size=2, hardware=A100, strict=False)
    assert [f.render() for f in findings if f.severity != "info"] == []
    assert new.fsdp_config == old.fsdp_config and new.fsdp_version == old.fsdp_version == 2


@pytest.mark.parametrize(
    "text",
    [
        "fsdp_config:\n  offload_params: true\n  fsdp_offload_params: false\n",  # HB165
        "fsdp_version: 2\nfsdp_config:\n  fsdp_version: 1\n",  # HB165
        "fsdp:\n  - no_shard\nfsdp_config:\n  fsdp_offload_params: true\n",  # HB166
    ],
    ids=["legacy-disagrees", "versions-disagree", "no-shard"],
)
def test_fix_leaves_conflicting_fsdp_spellings_alone(tmp_path: Path, text: str) -> None:
    path = write_config(tmp_path, GOOD_CONFIG + text)
    result = invoke("validate", str(path), "--fix", "--world-size", "2")
    assert result.exit_code == 1 and "fixed:" not in result.output
    assert path.read_text() == GOOD_CONFIG + text


# ------------------------------------------------------------------ the DeepSpeed JSON


def test_deepspeed_autos_are_filled_from_the_config() -> None:
    raw = {**ZERO3_AUTO, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    values = LoopValues(
        micro_batch_size=2,
        gradient_accumulation_steps=3,
        data_parallel_size=4,
        max_grad_norm=0.5,
        compute_dtype="bfloat16",
        hidden_size=64,
    )
    done = complete(raw, values)
    config = done.config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (2, 3)
    assert config["train_batch_size"] == 2 * 3 * 4 and config["gradient_clipping"] == 0.5
    # bf16 compute stays hellbender's autocast over fp32 master weights: DeepSpeed's bf16 mode off
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64 and zero["stage3_param_persistence_threshold"] == 640
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert done.stage == 3 and done.ignored == ["optimizer"] and "optimizer" not in config
    assert raw["train_batch_size"] == "auto"  # the user's mapping is not modified
    # No value given at all: the loop's own are written in (DeepSpeed would otherwise assume 1).
    bare = complete({"zero_optimization": {"stage": 2}}, values).config
    assert bare["train_batch_size"] == 24 and bare["gradient_clipping"] == 0.5
    assert bare["zero_optimization"] == {"stage": 2}  # no auto asked for: nothing added


def test_deepspeed_offload_accepts_hellbenders_optimizer() -> None:
    values = LoopValues(1, 1, 2, None, "float32")
    raw = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}
    config = complete(raw, values).config
    assert config["zero_force_ds_cpu_optimizer"] is False and config["gradient_clipping"] == 0.0
    assert offloads(config) == ["zero_optimization.offload_optimizer"]
    assert "zero_force_ds_cpu_optimizer" not in complete({"zero_optimization": {"stage": 2}}, values).config


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu is 4 but hellbender's micro"),
        ({"train_batch_size": 3}, "train_batch_size is 3"),
        ({"gradient_clipping": 2.0}, "gradient_clipping is 2.0 but hellbender's max_grad_norm gives 1.0"),
        ({"bf16": {"enabled": True}}, "bf16.enabled is true but the run computes in float32"),
        ({"zero_optimization": {"stage": 4}}, "stage 4 is not 0, 1, 2 or 3"),
        ({"zero_optimization": {"stage": "auto"}}, "stage 'auto' is not"),
        ({"communication_data_type": "auto"}, 'no value to fill "auto" for communication_data_type'),
    ],
)
def test_deepspeed_contradictions_are_errors(raw: dict[str, Any], words: str) -> None:
    with pytest.raises(DeepSpeedConfigError, match=re.escape(words)):
        complete(raw, LoopValues(2, 2, 2, 1.0, "float32"))


def test_agreeing_explicit_values_are_accepted() -> None:
    raw = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 8, "gradient_clipping": 1}
    assert complete(raw, LoopValues(2, 2, 2, 1.0, "float32")).config["train_batch_size"] == 8


def test_hb174_unreadable_or_contradicting_json(tmp_path: Path) -> None:
    missing = hits(tmp_path, {"deepspeed": str(tmp_path / "nope.json")}, "HB174")
    assert [f.severity for f in missing] == ["error"] and "is not a file" in missing[0].message
    broken = [("bad.json", "{not json", "not readable JSON"), ("list.json", "[1]", "not an object")]
    for name, text, words in broken:
        (tmp_path / name).write_text(text)
        assert words in hits(tmp_path, {"deepspeed": str(tmp_path / name)}, "HB174")[0].message
    batch = {**ZERO3_AUTO, "train_micro_batch_size_per_gpu": 8}
    assert hits(tmp_path, {"deepspeed": batch, "micro_batch_size": 2}, "HB174")
    assert not hits(tmp_path, {"deepspeed": batch, "micro_batch_size": 8}, "HB174")
    (tmp_path / "zero3.json").write_text(json.dumps(ZERO3_AUTO))
    assert not hits(tmp_path, {"deepspeed": str(tmp_path / "zero3.json")}, "HB174")


def test_hb175_optimizer_and_scheduler_blocks_are_not_used(tmp_path: Path) -> None:
    blocks = {**ZERO3_AUTO, "optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}}
    found = hits(tmp_path, {"deepspeed": blocks}, "HB175")
    assert [f.severity for f in found] == ["warning"] and "optimizer and scheduler block" in found[0].message
    assert not hits(tmp_path, {"deepspeed": ZERO3_AUTO}, "HB175")


def test_hb176_offload_without_a_gpu(tmp_path: Path) -> None:
    offload = {**ZERO3_AUTO, "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    assert [f.severity for f in hits(tmp_path, {"deepspeed": offload}, "HB176", hw=CPU)] == ["warning"]
    assert not hits(tmp_path, {"deepspeed": offload}, "HB176", hw=A100)
    assert not hits(tmp_path, {"deepspeed": ZERO3_AUTO}, "HB176", hw=CPU)


def test_hb171_deepspeed_in_one_process(tmp_path: Path) -> None:
    found = hits(tmp_path, {"deepspeed": ZERO3_AUTO}, "HB171", world=1)
    assert [f.key for f in found] == ["deepspeed"]
