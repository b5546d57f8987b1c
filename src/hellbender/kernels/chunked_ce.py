"""Head projection + cross-entropy computed chunk by chunk, never holding the full logits.

Why: for a causal LM the logits are the largest activation of the whole step. SmolLM2 at 2048
tokens has a (2048 × 49152) logits tensor — 400 MB in fp32, plus the same again for its softmax
gradient — while every hidden state of a layer is 4.7 MB. The loss only needs, per token, the
log-sum-exp over the vocabulary and the target's logit, so the forward can walk the tokens in
chunks, keep those two numbers and drop each chunk's logits. The backward recomputes one chunk's
logits at a time from the saved hidden states and the saved log-sum-exp, turns them into the
softmax gradient ``softmax - onehot`` and immediately contracts it into the gradients of the
hidden states and of the head weight. Peak extra memory: one chunk of logits (plus its gradient),
instead of the whole tensor twice.

Exactness: the same math as ``F.cross_entropy(logits.float(), targets, reduction="sum")`` on the
full logits, with the log-sum-exp and the softmax evaluated in fp32 as the plain loss does; only
the summation order differs (fp32 rounding, ~1e-6 relative). The head-weight gradient is
accumulated across chunks in fp32.

Shapes stay constant: the chunking is over *all* positions (ignored ones are masked, not
removed), so with ``pad_to_sequence_len`` every step runs the same chunk shapes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hellbender.data.tokenize import IGNORE_INDEX


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with the hidden state that predicts them: ``targets[:, t] = labels[:, t+1]``.

    The last position predicts nothing and gets ``IGNORE_INDEX``. Shifting the labels instead of
    slicing the hidden states avoids copying a (B, T-1, H) view into a contiguous tensor.
    """
    targets = labels.new_full(labels.shape, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def chunk_bounds(n: int, num_chunks: int) -> list[tuple[int, int]]:
    """``num_chunks`` (at most) contiguous [start, end) ranges covering ``range(n)``."""
    size = max(1, math.ceil(n / max(1, num_chunks)))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def compute_dtype_for(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``t`` runs in: autocast's if autocast is on for its device, else its own."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def _chunk_logits(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of one chunk (after an optional tanh soft-cap) and the tanh, kept for its derivative."""
    z = F.linear(h, w, b).float()
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of ``CE(hidden @ weight.T + bias, target)``, chunked, recomputed in backward.

    Saved for backward: the inputs (already alive anyway: hidden states are the decoder's output,
    the weight is a parameter) and one fp32 log-sum-exp per token. Nothing of size vocab.

    ``ctx`` is ``Any`` as in torch's own signature: at run time it is the autograd node, whose
    ``saved_tensors`` / ``needs_input_grad`` and the attributes set here no static class declares.
    """

    if TYPE_CHECKING:  # torch's ``Function.apply`` is unannotated; what it takes and gives here

        @classmethod
        def apply(
            cls, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            targets: torch.Tensor, num_chunks: int, softcap: float | None, /,
        ) -> torch.Tensor: ...

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        num_chunks: int,
        softcap: float | None,
    ) -> torch.Tensor:
        cd = compute_dtype_for(hidden)
        h, w = hidden.to(cd), weight.to(cd)
        b = bias.to(cd) if bias is not None else None
        n = h.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s, e in chunk_bounds(n, num_chunks):
            z, _ = _chunk_logits(h[s:e], w, b, softcap)
            lse_c = torch.logsumexp(z, dim=-1)
            t = targets[s:e]
            valid = t != IGNORE_INDEX
            picked = z.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += torch.where(valid, lse_c - picked, torch.zeros_like(lse_c)).sum()
            lse[s:e] = lse_c
            del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.num_chunks = num_chunks
        ctx.softcap = softcap
        ctx.compute_dtype = cd
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cd: torch.dtype = ctx.compute_dtype
        softcap: float | None = ctx.softcap
        h, w = hidden.to(cd), weight.to(cd)
        b = bias.to(cd) if bias is not None else None
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulation across chunks: a bf16 running sum would round every chunk's update.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        g_out = grad_total.float()
        for s, e in chunk_bounds(h.shape[0], ctx.num_chunks):
            h_c = h[s:e]
            z, tanh_z = _chunk_logits(h_c, w, b, softcap)
            t = targets[s:e]
            valid = (t != IGNORE_INDEX).float()
            # d(lse - z_t)/dz = softmax(z) - onehot(t), only on trained positions.
            grad_z = torch.exp(z - lse[s:e].unsqueeze(1))
            grad_z.scatter_add_(1, t.clamp(min=0).unsqueeze(1), -torch.ones_like(valid).unsqueeze(1))
            grad_z.mul_((valid * g_out).unsqueeze(1))
            if tanh_z is not None:  # d(c·tanh(u/c))/du = 1 - tanh²
                grad_z.mul_(1.0 - tanh_z * tanh_z)
            del z, tanh_z
            g = grad_z.to(cd)
            if grad_h is not None:
                grad_h[s:e] = (g @ w).to(hidden.dtype)
            if grad_w is not None:
                if cd == torch.float32:
                    grad_w.addmm_(g.t(), h_c)
                else:
                    grad_w += (g.t() @ h_c).float()
            if grad_b is not None:
                grad_b += grad_z.sum(0)
            del grad_z, g
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
        )


def chunked_linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    num_chunks: int = 8,
    softcap: float | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` against already aligned ``targets``.

    ``hidden`` (..., H) and ``targets`` (...) with ``IGNORE_INDEX`` for skipped positions. Returns
    an fp32 scalar: the sum (not the mean) over non-ignored positions.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match targets {tuple(targets.shape)}")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t = targets.reshape(-1).to(flat_h.device)
    return ChunkedLinearCrossEntropy.apply(flat_h, weight, bias, flat_t, int(num_chunks), softcap)
