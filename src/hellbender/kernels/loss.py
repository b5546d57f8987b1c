"""The training loss with whichever head + loss implementation the config picked.

:func:`loss_sum` is what the training loop calls instead of ``model(...).logits`` followed by
``causal_lm_loss_sum``. It returns the same quantity — the fp32 **sum** of next-token
cross-entropy over trained tokens (labels != -100 after the shift) — computed one of these ways:

========================================  ====================================================
config                                    how
========================================  ====================================================
(none)                                    forward → full logits → ``causal_lm_loss_sum``
``liger_cross_entropy``                   forward → full logits → Liger's CE kernel (GPU)
``chunked_cross_entropy`` / ``tiled_mlp``  decoder → hidden states → chunked head + CE (own)
``cut_cross_entropy``                     decoder → hidden states → Cut Cross-Entropy
``liger_fused_linear_cross_entropy``      decoder → hidden states → Liger fused head + CE (GPU)
========================================  ====================================================

The last three never materialise the (tokens × vocab) logits. ``tiled_mlp`` implies the chunked
loss (the "tiled loss" of the ALST recipe): at the sequence lengths where tiling the MLP matters,
the logits are the biggest single activation left. Only one replacement may be on (rule HB117).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hellbender.config.schema import HellbenderConfig
from hellbender.kernels.chunked_ce import chunked_linear_cross_entropy_sum, shifted_targets
from hellbender.kernels.model_parts import decoder, output_head

LOSS_KEYS: tuple[str, ...] = (
    "chunked_cross_entropy",
    "cut_cross_entropy",
    "liger_cross_entropy",
    "liger_fused_linear_cross_entropy",
)


def loss_method(cfg: HellbenderConfig) -> str:
    """Which implementation :func:`loss_sum` uses: plain, chunked, cut, liger or liger_fused_linear."""
    on = [k for k in LOSS_KEYS if getattr(cfg, k)]
    if len(on) > 1:
        raise ValueError(f"more than one loss replacement is on: {', '.join(on)} (keep one; rule HB117)")
    if not on:
        return "chunked" if cfg.tiled_mlp else "plain"
    return {
        "chunked_cross_entropy": "chunked",
        "cut_cross_entropy": "cut",
        "liger_cross_entropy": "liger",
        "liger_fused_linear_cross_entropy": "liger_fused_linear",
    }[on[0]]


def _plain_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # The loop's own loss, so "plain" here and in the loop can never drift apart.
    from hellbender.train.loss import causal_lm_loss_sum

    return causal_lm_loss_sum(logits, labels)


def hidden_states(model: nn.Module, model_inputs: Mapping[str, Any]) -> torch.Tensor:
    """The decoder's final (normed) hidden states (B, T, H) — everything but the head."""
    out = decoder(model)(**model_inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def loss_sum(
    model: nn.Module, model_inputs: Mapping[str, Any], labels: torch.Tensor, cfg: HellbenderConfig
) -> torch.Tensor:
    """fp32 sum of the causal-LM loss over trained tokens of one micro-batch.

    ``model_inputs``: what the model's forward takes (input_ids, attention_mask / position_ids /
    varlen kwargs from :func:`hellbender.models.attention.model_inputs`), *without* labels.
    ``labels`` (B, T), unshifted, -100 where not trained. Divide by the step's trained-token
    count as with ``causal_lm_loss_sum``.
    """
    if "labels" in model_inputs:
        raise ValueError("loss_sum: pass labels separately, not in model_inputs (the model would compute its own loss)")
    method = loss_method(cfg)
    inputs = {"use_cache": False, **model_inputs}
    if method in ("plain", "liger"):
        logits = model(**inputs).logits
        if method == "plain":
            return _plain_loss_sum(logits, labels)
        from hellbender.kernels.liger import liger_cross_entropy_sum

        return liger_cross_entropy_sum(logits, labels)

    hidden = hidden_states(model, inputs)
    head = output_head(model)
    labels = labels.to(hidden.device)
    if method == "chunked":
        return chunked_linear_cross_entropy_sum(
            hidden,
            head.weight,
            shifted_targets(labels),
            bias=head.bias,
            num_chunks=cfg.chunked_cross_entropy_num_chunks,
            softcap=head.softcap,
        )
    if method == "cut":
        from hellbender.kernels.cut_ce import cut_cross_entropy_sum

        return cut_cross_entropy_sum(hidden, head, labels)
    from hellbender.kernels.liger import liger_fused_linear_cross_entropy_sum

    return liger_fused_linear_cross_entropy_sum(hidden, head, labels)
