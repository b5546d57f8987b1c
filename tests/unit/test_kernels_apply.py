"""apply_optimizations / undo_optimizations: reversible, state_dict-neutral, clear refusals."""

from __future__ import annotations

import pytest
import torch

from hellbender.config.schema import ResolvedConfig
from hellbender.kernels import (
    apply_optimizations,
    describe,
    optimized,
    undo_optimizations,
)
from hellbender.kernels.model_parts import decoder_layers, output_head
from hellbender.testing.configs import loss_sum, resolved_config
from hellbender.testing.tiny import build_tiny_model

EVERYTHING_CPU = {
    "gradient_checkpointing": "selective",
    "activation_offloading": "disk",
    "chunked_cross_entropy": True,
    "tiled_mlp": True,
    "tiled_mlp_num_shards": 2,
}


def _cfg(**options: object) -> ResolvedConfig:
    return resolved_config(base_model="tiny", **options)


def test_patches_keep_state_dict_and_undo_restores_every_attribute() -> None:
    model = build_tiny_model(seed=0)
    keys = list(model.state_dict())
    before = {name: dict(vars(m)) for name, m in model.named_modules()}
    apply_optimizations(model, _cfg(**EVERYTHING_CPU))
    assert list(model.state_dict()) == keys  # checkpoints are interchangeable with the plain model
    assert any("forward" in vars(layer.mlp) for layer in decoder_layers(model))
    assert describe(model)
    undo_optimizations(model)
    after = {name: dict(vars(m)) for name, m in model.named_modules()}
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
    assert describe(model) == []


def test_applying_twice_is_refused_and_a_failed_apply_leaves_nothing() -> None:
    model = build_tiny_model(seed=0)
    with optimized(model, _cfg(tiled_mlp=True)):
        with pytest.raises(RuntimeError, match="already applied"):
            apply_optimizations(model, _cfg(tiled_mlp=True))
    # a chunked loss over a LoRA-adapted head fails *after* tiled_mlp was patched: rolled back
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="not a plain Linear"):
        apply_optimizations(adapted, _cfg(adapter="lora", tiled_mlp=True))
    assert all("forward" not in vars(layer.mlp) for layer in decoder_layers(adapted))
    apply_optimizations(adapted, _cfg())  # and the model is not marked as optimized
    undo_optimizations(adapted)


def test_liger_on_cpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = build_tiny_model(seed=0)
    with pytest.raises(RuntimeError, match="Liger kernels are Triton GPU kernels and the model is on cpu"):
        apply_optimizations(model, _cfg(liger_rms_norm=True))
    ids = torch.randint(4, 320, (1, 8))
    with pytest.raises(RuntimeError, match="chunked_cross_entropy gives the same loss-memory saving"):
        loss_sum(model, {"input_ids": ids}, ids, _cfg(liger_fused_linear_cross_entropy=True))


def test_lora_kernels_without_an_adapter_are_noted_not_applied() -> None:
    model = build_tiny_model(seed=0)
    with optimized(model, _cfg(lora_mlp_kernel=True)):
        assert describe(model) == ["lora_mlp_kernel: ignored, the model has no LoRA adapter"]
        assert all("forward" not in vars(layer.mlp) for layer in decoder_layers(model))


def test_cpu_activation_offloading_is_noted_as_a_noop_at_apply_time() -> None:
    model = build_tiny_model(seed=0)
    with optimized(model, _cfg(gradient_checkpointing=True, activation_offloading=True)):
        notes = [line for line in describe(model) if line.startswith("activation_offloading")]
    assert len(notes) == 1 and "no-op on CPU" in notes[0]
    with optimized(model, _cfg(gradient_checkpointing=True, activation_offloading="disk")):
        notes = [line for line in describe(model) if line.startswith("activation_offloading")]
    assert len(notes) == 1 and "no-op" not in notes[0]


def test_loss_method_choice() -> None:
    assert _cfg().loss_method == "plain"
    assert _cfg(tiled_mlp=True).loss_method == "chunked"  # the tiled loss goes with the tiled MLP
    assert _cfg(cut_cross_entropy=True, tiled_mlp=True).loss_method == "cut"
    assert _cfg(liger_cross_entropy=True).loss_method == "liger"
    assert _cfg(liger_fused_linear_cross_entropy=True).loss_method == "liger_fused_linear"


def test_labels_inside_model_inputs_are_refused() -> None:
    model = build_tiny_model(seed=0)
    ids = torch.randint(4, 320, (1, 8))
    with pytest.raises(ValueError, match="pass labels separately"):
        loss_sum(model, {"input_ids": ids, "labels": ids}, ids, _cfg())


def test_output_head_refuses_lora_on_the_head_and_reads_softcap() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_model(seed=0), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="not a plain Linear"):
        output_head(model)
    with pytest.raises(ValueError, match="not a plain Linear"):
        apply_optimizations(model, _cfg(adapter="lora", chunked_cross_entropy=True))

    saved = get_peft_model(
        build_tiny_model(seed=0), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    head = output_head(saved)
    assert head.weight is saved.base_model.model.lm_head.modules_to_save["default"].weight

    capped = build_tiny_model(seed=0)
    capped.config.final_logit_softcapping = 30.0
    assert output_head(capped).softcap == 30.0
