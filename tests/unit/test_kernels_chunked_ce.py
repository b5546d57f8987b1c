"""Chunked head + cross-entropy against the full-logits reference computed in the same test.

Tolerances (fp32): the loss is a sum of a few hundred terms of size ~5, computed in a different
order, so rtol 1e-5; gradients are compared with rtol 1e-4 / atol 1e-6 (summation-order noise).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hellbender.kernels.chunked_ce import (
    IGNORE_INDEX,
    chunk_bounds,
    chunked_linear_cross_entropy_sum,
    shifted_targets,
)
from hellbender.kernels.loss import causal_lm_loss_sum


def _data(n: int = 37, h: int = 16, v: int = 101, seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * 0.3).requires_grad_(True)
    b = (torch.randn(v, generator=g) * 0.1).requires_grad_(True) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.3] = IGNORE_INDEX
    return hidden, weight, b, targets


def _reference(hidden, weight, bias, targets, softcap=None):
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("num_chunks", [1, 3, 8, 100])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_loss_and_grads_match_full_logits(num_chunks: int, bias: bool, softcap: float | None) -> None:
    hidden, weight, b, targets = _data(bias=bias)
    ref = _reference(hidden, weight, b, targets, softcap)
    got = chunked_linear_cross_entropy_sum(
        hidden, weight, targets, bias=b, num_chunks=num_chunks, softcap=softcap
    )
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g_got, g_ref in zip(_grads(got, (hidden, weight, b)), _grads(ref, (hidden, weight, b)), strict=True):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-6)


def test_all_ignored_gives_zero_loss_and_zero_grads() -> None:
    hidden, weight, _, targets = _data()
    targets[:] = IGNORE_INDEX
    got = chunked_linear_cross_entropy_sum(hidden, weight, targets, num_chunks=4)
    assert got.item() == 0.0
    gh, gw = torch.autograd.grad(got, (hidden, weight))
    assert gh.abs().max().item() == 0.0 and gw.abs().max().item() == 0.0


def test_upstream_gradient_scale_is_applied() -> None:
    """The loop divides the sum by the step's token count: the backward must honour that factor."""
    hidden, weight, _, targets = _data()
    scale = 1.0 / 17
    ref = _reference(hidden, weight, None, targets) * scale
    got = chunked_linear_cross_entropy_sum(hidden, weight, targets, num_chunks=5) * scale
    for g_got, g_ref in zip(_grads(got, (hidden, weight)), _grads(ref, (hidden, weight)), strict=True):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-7)


def test_causal_wrapper_equals_the_loops_loss() -> None:
    """shifted_targets + chunked sum == hellbender.kernels.loss.causal_lm_loss_sum on full logits."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    labels[0, :4] = IGNORE_INDEX
    labels[1, 7:] = IGNORE_INDEX
    ref = causal_lm_loss_sum(hidden @ weight.T, labels)
    got = chunked_linear_cross_entropy_sum(hidden, weight, shifted_targets(labels), num_chunks=4)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g_got, g_ref in zip(_grads(got, (hidden, weight)), _grads(ref, (hidden, weight)), strict=True):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_is_as_accurate_as_the_plain_autocast_loss() -> None:
    """Under CPU autocast the chunks run in bf16 like the plain head would.

    bf16 rounding makes an exact comparison meaningless, so both are measured against the fp32
    result: the chunked gradients must be no further from it than the plain autocast ones
    (they are usually closer: the head gradient is accumulated in fp32 across chunks).
    """
    hidden, weight, _, targets = _data(n=64, h=32, v=200)
    exact = _reference(hidden, weight, None, targets)
    exact_grads = _grads(exact, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(
            F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        got = chunked_linear_cross_entropy_sum(hidden, weight, targets, num_chunks=4)
    torch.testing.assert_close(got, plain, rtol=1e-3, atol=1e-3)
    for g_got, g_plain, g_exact in zip(
        _grads(got, (hidden, weight)), _grads(plain, (hidden, weight)), exact_grads, strict=True
    ):
        assert g_got.dtype == torch.float32
        err_got = (g_got - g_exact).abs().max().item()
        err_plain = (g_plain - g_exact).abs().max().item()
        assert err_got <= 1.5 * err_plain + 1e-6, (err_got, err_plain)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produced."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_full_logits_never_exist() -> None:
    """Forward and backward never create a tensor of tokens × vocab elements (the whole point)."""
    n, v, chunks = 64, 400, 8
    hidden, weight, _, targets = _data(n=n, h=16, v=v)
    with _LargestTensor() as plain_mode:
        loss = _reference(hidden, weight, None, targets)
        loss.backward()
    with _LargestTensor() as chunked_mode:
        loss = chunked_linear_cross_entropy_sum(hidden, weight, targets, num_chunks=chunks)
        loss.backward()
    assert plain_mode.largest >= n * v  # the reference does materialise them
    assert chunked_mode.largest <= max(n * v // chunks, v * 16)  # one chunk of logits, or the weight


def test_chunk_bounds_cover_every_position_once() -> None:
    for n in (1, 7, 64, 65):
        for k in (1, 3, 8, 200):
            bounds = chunk_bounds(n, k)
            assert len(bounds) <= k
            covered = [i for s, e in bounds for i in range(s, e)]
            assert covered == list(range(n))


def test_shifted_targets() -> None:
    labels = torch.tensor([[5, 6, -100, 8], [1, 2, 3, 4]])
    assert shifted_targets(labels).tolist() == [[6, -100, 8, -100], [2, 3, 4, -100]]
