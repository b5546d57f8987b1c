"""Gradient checkpointing: full recomputes the layer, selective recomputes only the cheap ops.

The backward pass is watched op by op (a TorchDispatchMode): the plain path runs each matmul's
backward only; full checkpointing additionally re-runs the forward matmuls; selective
checkpointing must not re-run any matmul (their outputs were kept) but must re-run the cheap
elementwise ops (that is the memory it saves).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hellbender.kernels import optimized
from hellbender.kernels.checkpointing import SAVED_OPS, checkpoint_kwargs
from hellbender.kernels.model_parts import decoder_layers
from hellbender.testing.configs import loss_sum, resolved_config
from hellbender.testing.tiny import build_tiny_model

MATMULS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default"}


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops(**options: Any) -> Counter[str]:
    model = build_tiny_model(vocab_size=300, seed=0).train()
    cfg = resolved_config(base_model="tiny", **options)
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with optimized(model, cfg):
        loss = loss_sum(model, {"input_ids": ids}, ids, cfg)
        with _OpCounter() as counter:
            loss.backward()
    return counter.ops


def test_selective_keeps_matmuls_and_recomputes_cheap_ops() -> None:
    plain = _backward_ops()
    full = _backward_ops(gradient_checkpointing=True)
    selective = _backward_ops(gradient_checkpointing="selective")

    def matmuls(c: Counter[str]) -> int:
        return sum(n for op, n in c.items() if op in MATMULS)

    assert matmuls(full) > matmuls(plain)  # full checkpointing re-runs the forward matmuls
    assert matmuls(selective) == matmuls(plain)  # selective kept every one of them
    sdpa = "aten._scaled_dot_product_flash_attention_for_cpu.default"  # the attention forward kernel
    assert full[sdpa] > plain[sdpa] == selective[sdpa] == 0
    # ...but it does recompute the elementwise work: RMSNorm's rsqrt and SwiGLU's silu.
    for op in ("aten.rsqrt.default", "aten.silu.default"):
        assert selective[op] > plain[op], op
        assert selective[op] == full[op], op


def test_checkpointing_is_on_while_applied_and_off_after_undo() -> None:
    model = build_tiny_model(seed=0)
    cfg = resolved_config(base_model="tiny", gradient_checkpointing="selective")
    with optimized(model, cfg):
        assert all(layer.gradient_checkpointing for layer in decoder_layers(model))
        assert model.config.use_cache is False
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))
    assert model.config.use_cache is True
    assert not getattr(model, "_require_grads_hooks", None)


def test_kwargs_default_to_non_reentrant_and_selective_refuses_reentrant() -> None:
    assert checkpoint_kwargs(True, None) == {"use_reentrant": False}
    assert checkpoint_kwargs(True, {"use_reentrant": True}) == {"use_reentrant": True}
    assert "context_fn" in checkpoint_kwargs("selective", {"preserve_rng_state": False})
    with pytest.raises(ValueError, match="non-reentrant"):
        checkpoint_kwargs("selective", {"use_reentrant": True})


def test_saved_ops_cover_matmul_and_this_builds_sdpa() -> None:
    assert torch.ops.aten.mm.default in SAVED_OPS
    # On CPU, SDPA dispatches to the flash-for-CPU kernel: its outputs must be kept too.
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default in SAVED_OPS
