"""Fused LoRA kernels: same numbers as peft, fewer saved bytes, refusals and fallbacks.

Reference: peft's own LoRA modules on the same weights, in the same test. fp32 tolerances:
loss rtol 1e-5, gradients rtol 1e-4 / atol 1e-6 (only the order of sums differs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hellbender.config.schema import ResolvedConfig
from hellbender.kernels import apply_optimizations, optimized, undo_optimizations
from hellbender.kernels.model_parts import decoder_layers
from hellbender.testing.configs import loss_sum, resolved_config
from hellbender.testing.probes import graph_node_names, saved_storage_bytes
from hellbender.testing.tiny import build_tiny_model, save_tiny_model_folder

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KERNELS = {"lora_mlp_kernel": True, "lora_qkv_kernel": True, "lora_o_kernel": True}


def _randomize_b(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _lora(dropout: float = 0.0, targets: list[str] | None = None, **kw: Any) -> torch.nn.Module:
    model = get_peft_model(
        build_tiny_model(vocab_size=300, seed=0),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets or ALL, **kw),
    )
    _randomize_b(model)
    return model.train()


def _cfg(**options: Any) -> ResolvedConfig:
    return resolved_config(base_model="tiny", adapter="lora", **options)


def _ids() -> torch.Tensor:
    return torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def test_fused_mlp_saves_only_x_gate_and_up() -> None:
    model = _lora()
    mlp = decoder_layers(model)[0].mlp
    n, hidden, inter = 40, 32, 64
    x = torch.randn(n, hidden, requires_grad=True)
    with saved_storage_bytes(model) as peft_saved:
        peft_out = mlp(x)
    with optimized(model, _cfg(lora_mlp_kernel=True)):
        with saved_storage_bytes(model) as fused_saved:
            fused_out = mlp(x)
    assert "LoRAGatedMLPBackward" in graph_node_names(fused_out)
    assert sum(fused_saved.values()) == n * (hidden + 2 * inter) * 4  # x, gate(x), up(x) in fp32
    # peft additionally keeps act(gate), act(gate)·up and the rank-4 intermediates.
    assert sum(peft_saved.values()) >= sum(fused_saved.values()) + 2 * n * inter * 4
    g = torch.randn_like(peft_out)
    ref = torch.autograd.grad(peft_out, [x, *[p for p in mlp.parameters() if p.requires_grad]], g)
    got = torch.autograd.grad(fused_out, [x, *[p for p in mlp.parameters() if p.requires_grad]], g)
    torch.testing.assert_close(fused_out, peft_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_partially_adapted_layers_and_gelu_activation_match_peft() -> None:
    """Only some projections carry LoRA (others are plain frozen Linears); a non-SiLU activation."""
    model = get_peft_model(
        build_tiny_model(vocab_size=300, seed=0, hidden_act="gelu_pytorch_tanh"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    )
    _randomize_b(model)
    model.train()
    ids = _ids()
    plain = _cfg()
    ref = loss_sum(model, {"input_ids": ids}, ids, plain)
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad])
    cfg = _cfg(**KERNELS)
    with optimized(model, cfg):
        got = loss_sum(model, {"input_ids": ids}, ids, cfg)
        nodes = graph_node_names(got)
        grads = torch.autograd.grad(got, [p for p in model.parameters() if p.requires_grad])
    assert {"LoRAGatedMLPBackward", "LoRAProjectionsBackward"} <= nodes
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_disabled_adapter_falls_back_to_peft() -> None:
    """Inside peft's disable_adapter() the fused path must not add the LoRA update."""
    model = _lora()
    ids = _ids()
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(input_ids=ids).logits
    with optimized(model, _cfg(**KERNELS)):
        with model.disable_adapter():
            logits = model(input_ids=ids).logits
        assert "LoRAGatedMLPBackward" not in graph_node_names(logits)
        adapted = model(input_ids=ids).logits
    torch.testing.assert_close(logits, base_logits)
    assert not torch.allclose(adapted, base_logits)  # the adapter does change the output


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"dropout": 0.1}, "lora_dropout: 0"), ({"use_dora": True}, "DoRA")],
)
def test_unsupported_adapters_are_refused(kwargs: dict[str, Any], message: str) -> None:
    model = _lora(**kwargs)
    with pytest.raises(ValueError, match=message):
        apply_optimizations(model, _cfg(lora_mlp_kernel=True))
    # nothing stays patched after the refusal
    assert "forward" not in vars(decoder_layers(model)[0].mlp)
    apply_optimizations(model, _cfg())
    undo_optimizations(model)


def _lora_with_biases(bias: str) -> torch.nn.Module:
    """LoRA on every projection of a tiny Llama whose projections have (nonzero) biases;
    peft's ``bias`` decides which biases train."""
    model = get_peft_model(
        build_tiny_model(vocab_size=300, seed=0, attention_bias=True, mlp_bias=True),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL, bias=bias),
    )
    _randomize_b(model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("base_layer.bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.train()


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_trainable_base_bias_is_refused(kernel: str) -> None:
    """The fused Functions return no gradient for the base layer's bias: a trainable one must be
    refused, not silently left untrained (peft's bias='all' makes them trainable)."""
    model = _lora_with_biases("all")
    assert any(p.requires_grad for n, p in model.named_parameters() if n.endswith("base_layer.bias"))
    with pytest.raises(ValueError, match="bias is trainable"):
        apply_optimizations(model, _cfg(**{kernel: True}))
    layer = decoder_layers(model)[0]
    assert "forward" not in vars(layer.mlp) and "forward" not in vars(layer.self_attn)


def test_frozen_base_bias_matches_peft() -> None:
    """A frozen bias (peft's default bias='none') is fused: it is added in the forward and the
    loss and LoRA gradients equal peft's."""
    model = _lora_with_biases("none")
    ids = _ids()

    def step(cfg: ResolvedConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = loss_sum(model, {"input_ids": ids}, ids, cfg)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = step(_cfg())
    with optimized(model, _cfg(**KERNELS)):
        loss, grads = step(_cfg(**KERNELS))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


def test_autocast_bf16_is_as_accurate_as_peft_under_autocast() -> None:
    """fp32 adapters under bf16 autocast (the LoRA mixed-precision recipe): both paths round in
    bf16, so each is compared with the fp32 result; the fused one must be no further from it."""
    model = _lora()
    ids = _ids()
    params = [p for p in model.parameters() if p.requires_grad]
    plain = _cfg()
    exact = torch.autograd.grad(loss_sum(model, {"input_ids": ids}, ids, plain), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_grads = torch.autograd.grad(loss_sum(model, {"input_ids": ids}, ids, plain), params)
    cfg = _cfg(**KERNELS)
    with optimized(model, cfg), torch.autocast("cpu", dtype=torch.bfloat16):
        fused_grads = torch.autograd.grad(loss_sum(model, {"input_ids": ids}, ids, cfg), params)
    err_peft = max(
        (a - e).abs().max().item() / (e.abs().max().item() + 1e-12)
        for a, e in zip(peft_grads, exact, strict=True)
    )
    err_fused = max(
        (a - e).abs().max().item() / (e.abs().max().item() + 1e-12)
        for a, e in zip(fused_grads, exact, strict=True)
    )
    assert err_peft > 0  # autocast really ran in bf16
    assert err_fused <= 1.5 * err_peft + 1e-4, (err_fused, err_peft)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # bitsandbytes quantizes in blocks of 64 inputs: hidden size must be a multiple of 64.
    return save_tiny_model_folder(tmp_path_factory.mktemp("fused-qlora") / "base", seed=0,
                                  hidden_size=64, intermediate_size=128)


def test_qlora_4bit_base_matches_peft(tiny_folder: Path) -> None:
    """A bitsandbytes 4-bit base is dequantized on the fly by the fused kernels, as bnb does."""
    import bitsandbytes as bnb

    from hellbender.models.load import load_model, load_tokenizer

    cfg = resolved_config(base_model=str(tiny_folder), adapter="qlora", load_in_4bit=True, lora_r=4,
                           lora_alpha=8, lora_target_linear=True, compute_dtype="float32",
                           attn_implementation="sdpa", **KERNELS)
    model = load_model(cfg, load_tokenizer(cfg))
    assert isinstance(decoder_layers(model)[0].mlp.gate_proj.base_layer, bnb.nn.Linear4bit)
    _randomize_b(model)
    model.train()
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    plain = cfg.model_copy(update=dict.fromkeys(KERNELS, False))
    ref = loss_sum(model, {"input_ids": ids}, ids, plain)
    ref_grads = torch.autograd.grad(ref, params)
    with optimized(model, cfg):
        got = loss_sum(model, {"input_ids": ids}, ids, cfg)
        assert "LoRAGatedMLPBackward" in graph_node_names(got)
        grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
