"""TiledMLP: the MLP's intermediates exist one shard of tokens at a time, in forward and backward.

Tolerances (fp32): gradients rtol 1e-4 / atol 1e-6 against the plain MLP computed in the same
test — sharding the tokens only changes the order of the weight-gradient sums.
"""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hellbender.kernels import optimized
from hellbender.kernels.model_parts import decoder_layers
from hellbender.testing.configs import resolved_config
from hellbender.testing.tiny import build_tiny_model


class _WidestRows(TorchDispatchMode):
    """Most token rows of any op output that is an MLP intermediate: last dim ``width``
    (intermediate_size), not shaped like a weight or a weight's gradient."""

    def __init__(self, width: int, weight_shapes: set[tuple[int, ...]]) -> None:
        super().__init__()
        self.width = width
        self.weight_shapes = weight_shapes
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(t, torch.Tensor)
                and t.dim() >= 2
                and t.shape[-1] == self.width
                and tuple(t.shape) not in self.weight_shapes
            ):
                self.rows = max(self.rows, t.numel() // self.width)
        return out


def test_mlp_intermediates_exist_one_shard_at_a_time() -> None:
    """The plain MLP creates (tokens × intermediate_size) tensors; the tiled one never more than
    one shard's rows of them — neither in the forward nor in the backward's recomputation."""
    model = build_tiny_model(vocab_size=300, seed=0).train()
    mlp = decoder_layers(model)[0].mlp
    hidden, width = model.config.hidden_size, model.config.intermediate_size
    weight_shapes = {tuple(p.shape) for p in mlp.parameters()} | {
        tuple(p.shape)[::-1] for p in mlp.parameters()
    }
    tokens, shards = 2 * 60, 8
    x = torch.randn(2, 60, hidden, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def run() -> tuple[int, list[torch.Tensor]]:
        mlp.zero_grad(set_to_none=True)
        x.grad = None
        with _WidestRows(width, weight_shapes) as seen:
            mlp(x).pow(2).sum().backward()
        return seen.rows, [x.grad.clone(), *(p.grad.clone() for p in mlp.parameters())]

    plain_rows, plain_grads = run()
    with optimized(model, resolved_config(base_model="tiny", tiled_mlp=True, tiled_mlp_num_shards=shards)):
        assert "forward" in vars(mlp)  # the tiled forward is what runs
        tiled_rows, tiled_grads = run()

    assert plain_rows == tokens  # the reference does materialise full intermediates
    assert 0 < tiled_rows <= math.ceil(tokens / shards)  # 15 rows: one shard
    for got, ref in zip(tiled_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
