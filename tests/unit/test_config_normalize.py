"""Normalization: every derived value, computed from a YAML file through the real loader.

The hardware is passed in as a ``Hardware`` value, so every bf16/fp16 branch is exercised on this
CPU machine; the world size is passed in, so data-parallel arithmetic is checked for 1, 2 and 8
ranks without launching anything.
"""

from __future__ import annotations

import typing
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from hellbender.config.findings import Finding
from hellbender.config.hardware import Hardware
from hellbender.config.load import load_config
from hellbender.config.normalize import allocator_setting, configure_allocator_env, normalize
from hellbender.config.schema import HellbenderConfig

CPU = Hardware(description="CPU")
CPU_BF16 = Hardware(cpu_bf16=True, description="CPU with AMX")
CUDA_BF16 = Hardware(cuda=True, cuda_bf16=True, description="simulated A100")
CUDA_NO_BF16 = Hardware(cuda=True, cuda_bf16=False, description="simulated T4")

BASE: dict[str, Any] = {
    "base_model": "org/some-model",
    "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
}


def run(
    tmp_path: Path, extra: dict[str, Any], *, world: int = 1, hw: Hardware = CPU
) -> tuple[HellbenderConfig, list[Finding]]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**BASE, **extra}, sort_keys=False))
    return load_config(path, world_size=world, hardware=hw, strict=False)


def codes(findings: list[Finding], severity: str | None = None) -> list[str]:
    return [f.code for f in findings if severity is None or f.severity == severity]


# ------------------------------------------------------------------ batch size

WORLDS = [1, 2, 8]


@pytest.mark.parametrize("world", WORLDS)
def test_batch_size_is_derived(tmp_path: Path, world: int) -> None:
    cfg, findings = run(tmp_path, {"micro_batch_size": 3, "gradient_accumulation_steps": 5}, world=world)
    assert cfg.batch_size == 3 * 5 * world
    assert cfg.gradient_accumulation_steps == 5
    assert cfg.world_size == world
    assert "HB120" not in codes(findings)


@pytest.mark.parametrize("world", WORLDS)
def test_gradient_accumulation_defaults_to_one(tmp_path: Path, world: int) -> None:
    cfg, _ = run(tmp_path, {"micro_batch_size": 4}, world=world)
    assert cfg.gradient_accumulation_steps == 1
    assert cfg.batch_size == 4 * world


@pytest.mark.parametrize("world", WORLDS)
def test_deprecated_batch_size_derives_accumulation_with_warning(tmp_path: Path, world: int) -> None:
    mbs, batch = 2, 32
    cfg, findings = run(tmp_path, {"micro_batch_size": mbs, "batch_size": batch}, world=world)
    assert cfg.gradient_accumulation_steps == batch // (mbs * world)
    assert cfg.gradient_accumulation_steps * mbs * world == batch
    assert cfg.batch_size == batch
    warning = next(f for f in findings if f.code == "HB120")
    assert warning.severity == "warning" and warning.key == "batch_size"
    assert f"gradient_accumulation_steps: {cfg.gradient_accumulation_steps}" in warning.fix
    assert not codes(findings, "error")


@pytest.mark.parametrize("world", WORLDS)
def test_batch_size_not_divisible_is_an_error(tmp_path: Path, world: int) -> None:
    mbs = 2
    batch = mbs * world * 3 + 1  # never a multiple of mbs × world
    _, findings = run(tmp_path, {"micro_batch_size": mbs, "batch_size": batch}, world=world)
    assert codes(findings, "error") == ["HB121"]
    # the near-identical divisible config is fine
    _, ok = run(tmp_path, {"micro_batch_size": mbs, "batch_size": batch - 1}, world=world)
    assert "HB121" not in codes(ok)


@pytest.mark.parametrize("world", WORLDS)
def test_inconsistent_triple_is_an_error(tmp_path: Path, world: int) -> None:
    mbs, gas = 2, 4
    _, bad = run(
        tmp_path,
        {"micro_batch_size": mbs, "gradient_accumulation_steps": gas, "batch_size": mbs * gas * world + 2},
        world=world,
    )
    assert codes(bad, "error") == ["HB122"]
    cfg, good = run(
        tmp_path,
        {"micro_batch_size": mbs, "gradient_accumulation_steps": gas, "batch_size": mbs * gas * world},
        world=world,
    )
    assert not codes(good, "error")
    assert "HB120" in codes(good, "warning")  # consistent, but setting batch_size is still deprecated
    assert cfg.batch_size == mbs * gas * world


@pytest.mark.parametrize(
    ("world", "cp", "tp"),
    [(8, 2, 1), (8, 1, 2), (8, 2, 2), (8, 8, 1), (2, 2, 1)],
)
def test_context_and_tensor_parallel_reduce_data_parallel_size(
    tmp_path: Path, world: int, cp: int, tp: int
) -> None:
    dp = world // (cp * tp)
    cfg, findings = run(
        tmp_path,
        {
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 3,
            "context_parallel_size": cp,
            "tensor_parallel_size": tp,
        },
        world=world,
    )
    assert cfg.batch_size == 2 * 3 * dp
    assert "HB151" not in codes(findings)
    # deprecated batch_size divides by the data-parallel ranks only
    cfg, _ = run(
        tmp_path,
        {
            "micro_batch_size": 2,
            "batch_size": 2 * 3 * dp,
            "context_parallel_size": cp,
            "tensor_parallel_size": tp,
        },
        world=world,
    )
    assert cfg.gradient_accumulation_steps == 3


def test_sequence_parallel_degree_is_an_alias_of_context_parallel(tmp_path: Path) -> None:
    cfg, findings = run(tmp_path, {"micro_batch_size": 1, "sequence_parallel_degree": 4}, world=8)
    assert cfg.context_parallel_size == 4
    assert cfg.batch_size == 8 // 4
    assert "HB141" in codes(findings, "warning")


def test_world_not_divisible_by_model_parallel_is_an_error(tmp_path: Path) -> None:
    _, bad = run(tmp_path, {"context_parallel_size": 3}, world=8)
    assert "HB151" in codes(bad, "error")
    _, good = run(tmp_path, {"context_parallel_size": 4}, world=8)
    assert "HB151" not in codes(good)


# ------------------------------------------------------------------ eval batch, padding


def test_eval_batch_size_defaults_to_micro_batch_size(tmp_path: Path) -> None:
    cfg, findings = run(tmp_path, {"micro_batch_size": 3})
    assert cfg.eval_batch_size == 3
    assert "HB123" not in codes(findings)


def test_eval_batch_size_different_warns(tmp_path: Path) -> None:
    cfg, findings = run(tmp_path, {"micro_batch_size": 3, "eval_batch_size": 6, "val_set_size": 0.1})
    assert cfg.eval_batch_size == 6
    assert codes(findings, "warning") == ["HB123"]
    _, same = run(tmp_path, {"micro_batch_size": 3, "eval_batch_size": 3, "val_set_size": 0.1})
    assert "HB123" not in codes(same)


@pytest.mark.parametrize("packing", [True, False])
def test_pad_to_sequence_len_defaults_to_sample_packing(tmp_path: Path, packing: bool) -> None:
    cfg, _ = run(tmp_path, {"sample_packing": packing})
    assert cfg.pad_to_sequence_len is packing
    assert cfg.eval_sample_packing is packing


def test_explicit_pad_to_sequence_len_is_kept(tmp_path: Path) -> None:
    cfg, findings = run(tmp_path, {"sample_packing": True, "pad_to_sequence_len": False})
    assert cfg.pad_to_sequence_len is False
    assert "HB133" in codes(findings)


# ------------------------------------------------------------------ dtype


@pytest.mark.parametrize(
    ("hw", "expected"),
    [
        (CUDA_BF16, "bfloat16"),
        (CUDA_NO_BF16, "float16"),
        (CPU_BF16, "bfloat16"),
        (CPU, "float32"),
    ],
    ids=["cuda-bf16", "cuda-no-bf16", "cpu-bf16", "cpu-plain"],
)
def test_bf16_auto_resolves_from_hardware(tmp_path: Path, hw: Hardware, expected: str) -> None:
    cfg, findings = run(tmp_path, {"bf16": "auto"}, hw=hw)
    assert cfg.compute_dtype == expected
    assert cfg.bf16 is (expected == "bfloat16")
    shown = next(f for f in findings if f.code == "HB190")  # the resolved dtype is shown
    assert expected in shown.message and hw.description in shown.message


def test_bf16_is_auto_by_default(tmp_path: Path) -> None:
    cfg, _ = run(tmp_path, {}, hw=CUDA_NO_BF16)
    assert cfg.compute_dtype == "float16"


@pytest.mark.parametrize(
    ("extra", "hw", "expected"),
    [
        ({"bf16": False}, CUDA_BF16, "float32"),
        ({"bf16": True}, CPU, "bfloat16"),
        ({"fp16": True}, CUDA_BF16, "float16"),
        ({"bf16": False, "fp16": True}, CUDA_NO_BF16, "float16"),
    ],
)
def test_explicit_dtype_wins_over_hardware(
    tmp_path: Path, extra: dict[str, Any], hw: Hardware, expected: str
) -> None:
    cfg, _ = run(tmp_path, extra, hw=hw)
    assert cfg.compute_dtype == expected


# ------------------------------------------------------------------ attention

# The Axolotl meaning of each legacy flag (written out here, not imported, so a wrong mapping in
# the code cannot agree with itself).
LEGACY = {
    "flash_attention": "flash_attention_2",
    "flex_attention": "flex_attention",
    "sdp_attention": "sdpa",
    "xformers_attention": "xformers",
    "eager_attention": "eager",
}


def test_attention_defaults_to_sdpa(tmp_path: Path) -> None:
    cfg, findings = run(tmp_path, {})
    assert cfg.attn_implementation == "sdpa"
    assert not {"HB101", "HB102"} & set(codes(findings))


@pytest.mark.parametrize(("flag", "backend"), LEGACY.items())
def test_legacy_attention_flag_maps_with_warning(tmp_path: Path, flag: str, backend: str) -> None:
    cfg, findings = run(tmp_path, {flag: True}, hw=CUDA_BF16)
    assert cfg.attn_implementation == backend
    warning = next(f for f in findings if f.code == "HB102")
    assert warning.severity == "warning" and warning.key == flag and backend in warning.fix
    assert "HB101" not in codes(findings)


@pytest.mark.parametrize("flag", LEGACY)
def test_legacy_flag_false_is_silent(tmp_path: Path, flag: str) -> None:
    cfg, findings = run(tmp_path, {flag: False})
    assert cfg.attn_implementation == "sdpa"
    assert "HB102" not in codes(findings)


def test_two_legacy_flags_are_an_error(tmp_path: Path) -> None:
    _, findings = run(tmp_path, {"flash_attention": True, "xformers_attention": True}, hw=CUDA_BF16)
    error = next(f for f in findings if f.code == "HB101")
    assert error.severity == "error"
    assert "flash_attention_2" in error.message and "xformers" in error.message


def test_legacy_flag_disagreeing_with_attn_implementation_is_an_error(tmp_path: Path) -> None:
    _, bad = run(tmp_path, {"attn_implementation": "sdpa", "flash_attention": True}, hw=CUDA_BF16)
    assert "HB101" in codes(bad, "error")
    cfg, agree = run(
        tmp_path, {"attn_implementation": "flash_attention_2", "flash_attention": True}, hw=CUDA_BF16
    )
    assert "HB101" not in codes(agree)
    assert cfg.attn_implementation == "flash_attention_2"


# ------------------------------------------------------------------ allocator environment


@pytest.mark.parametrize(
    ("version", "variable"),
    [
        ("2.13.0+cpu", "PYTORCH_ALLOC_CONF"),
        ("2.9.0", "PYTORCH_ALLOC_CONF"),
        ("3.0.1", "PYTORCH_ALLOC_CONF"),
        ("2.8.0+cu128", "PYTORCH_CUDA_ALLOC_CONF"),
        ("2.5.1", "PYTORCH_CUDA_ALLOC_CONF"),
        ("2.2.0", "PYTORCH_CUDA_ALLOC_CONF"),
    ],
)
def test_allocator_variable_depends_on_torch_version(version: str, variable: str) -> None:
    setting = allocator_setting(version)
    assert setting is not None
    name, value = setting
    assert name == variable
    assert "expandable_segments:True" in value.split(",")


@pytest.mark.parametrize("version", ["2.1.2", "1.13.1", None, "", "nightly"])
def test_allocator_setting_absent_for_old_or_unknown_torch(version: str | None) -> None:
    assert allocator_setting(version) is None


def test_allocator_env_set_when_user_set_neither() -> None:
    environ: dict[str, str] = {"UNRELATED": "1"}
    name = configure_allocator_env(environ)
    expected = allocator_setting(metadata.version("torch"))
    assert expected is not None
    assert name == expected[0]
    assert environ == {"UNRELATED": "1", expected[0]: expected[1]}


@pytest.mark.parametrize("user_var", ["PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"])
def test_allocator_env_left_alone_when_user_set_either(user_var: str) -> None:
    environ = {user_var: "max_split_size_mb:128"}
    assert configure_allocator_env(environ) is None
    assert environ == {user_var: "max_split_size_mb:128"}


def test_installed_torch_reads_the_variable_we_set() -> None:
    """The variable chosen for the installed torch is one its C++ allocator config actually reads."""
    import torch

    setting = allocator_setting(torch.__version__)
    assert setting is not None
    lib_dir = Path(torch.__file__).parent / "lib"
    libs = sorted(lib_dir.glob("libc10*.so*")) + sorted(lib_dir.glob("c10*.dll"))
    if not libs:
        pytest.skip("no c10 library found to inspect")
    blob = b"".join(p.read_bytes() for p in libs)
    assert setting[0].encode() in blob


# ---------------------------------------------------------------- Axolotl spellings


def test_adamw_bnb_8bit_is_adamw_8bit(tmp_path: Path) -> None:
    cfg, _ = run(tmp_path, {"optimizer": "adamw_bnb_8bit"})
    assert cfg.optimizer == "adamw_8bit"
    cfg, _ = run(tmp_path, {"optimizer": "adamw_torch"})
    assert cfg.optimizer == "adamw_torch"


def test_legacy_message_fields_map_to_property_mappings(tmp_path: Path) -> None:
    legacy = {
        "path": "c.jsonl",
        "type": "chat_template",
        "message_field_role": "from",
        "message_field_content": "value",
    }
    cfg, findings = run(tmp_path, {"datasets": [legacy, {"path": "d.jsonl", "type": "chat_template"}]})
    first, second = cfg.datasets
    assert (first.message_property_mappings.role, first.message_property_mappings.content) == (
        "from",
        "value",
    )
    assert first.message_field_role is None and first.message_field_content is None
    assert (second.message_property_mappings.role, second.message_property_mappings.content) == (
        "role",
        "content",
    )
    assert [f.key for f in findings if f.code == "HB141"] == ["datasets.0.message_field_role"]
    cfg, findings = run(tmp_path, {"datasets": [{"path": "d.jsonl", "type": "chat_template"}]})
    assert not [f for f in findings if f.code == "HB141"]


# ------------------------------------------------------------------ the resolved config


def test_a_resolved_config_comes_only_out_of_normalize() -> None:
    """Derived fields have no defaults: a ResolvedConfig cannot be made without deriving them."""
    from pydantic import ValidationError

    from hellbender.config.schema import ResolvedConfig

    with pytest.raises(ValidationError) as info:
        ResolvedConfig(base_model="x")
    missing = {e["loc"][0] for e in info.value.errors() if e["type"] == "missing"}
    assert {
        "compute_dtype",
        "data_parallel_size",
        "epochs_given",
        "loss_method",
        "eval_batch_size",
    } <= missing


def test_every_derived_value_is_set_and_never_optional() -> None:
    cfg, _ = normalize(HellbenderConfig(base_model="x"), world_size=1, hardware=Hardware())
    derived = set(type(cfg).model_fields) - set(HellbenderConfig.model_fields)
    overridden = {"gradient_accumulation_steps", "batch_size", "eval_batch_size", "pad_to_sequence_len",
                  "eval_sample_packing", "dataset_num_proc", "attn_implementation", "context_parallel_size"}
    for name in derived | overridden:
        assert getattr(cfg, name) is not None, name
        assert type(None) not in typing.get_args(type(cfg).model_fields[name].annotation), name


@pytest.mark.parametrize(
    ("values", "given"),
    [
        ({}, True),
        ({"max_steps": 5}, False),
        ({"max_steps": 5, "num_epochs": 1}, True),
        ({"num_epochs": 2}, True),
    ],
)
def test_epochs_given(values: dict[str, object], given: bool) -> None:
    cfg, _ = normalize(HellbenderConfig(base_model="x", **values), world_size=1, hardware=Hardware())
    assert cfg.epochs_given is given


def test_data_parallel_size_divides_out_the_model_parallel_ranks() -> None:
    raw = HellbenderConfig(base_model="x", micro_batch_size=2, tensor_parallel_size=2)
    cfg, _ = normalize(raw, world_size=8, hardware=Hardware())
    assert cfg.data_parallel_size == 4 and cfg.batch_size == 2 * 1 * 4
