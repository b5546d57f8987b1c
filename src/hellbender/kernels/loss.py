"""The training loss with whichever head + loss implementation the config picked.

:func:`build_loss` returns what the training loop calls instead of ``model(...).logits`` followed
by ``causal_lm_loss_sum``; it is built once, at setup. Every variant returns the same quantity —
the fp32 **sum** of next-token cross-entropy over trained tokens (labels != -100 after the
shift) — computed one of these ways:

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
loss (the "tiled loss" of the ALST recipe; derived as ``loss_method`` by
:func:`hellbender.config.normalize.normalize`). Only one replacement may be on (rule HB117).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hellbender.config.schema import LossMethod
from hellbender.data.tokenize import IGNORE_INDEX
from hellbender.kernels.chunked_ce import chunked_linear_cross_entropy_sum, shifted_targets
from hellbender.kernels.model_parts import decoder, output_head, unwrap

# (model, model inputs without labels, labels) → fp32 loss sum over the trained tokens
LossFn = Callable[[nn.Module, Mapping[str, Any], torch.Tensor], torch.Tensor]


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, *, shifted: bool = False) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained tokens, accumulated in fp32: the reference
    every other method is tested against.

    ``logits`` (B, L, V) in any float dtype, ``labels`` (B, L) aligned with the inputs (not
    shifted; -100 = not trained). With ``shifted``, ``labels`` are already the next-token targets
    aligned with the logits (``labels[:, t]`` is what position t predicts, as
    :func:`~hellbender.kernels.chunked_ce.shifted_targets` builds them): context parallelism cuts a
    row after shifting, so a rank's last target lives in the next rank's tokens. A **sum**, never a
    mean: the loop divides by the trained tokens of the whole optimizer step (see
    :mod:`hellbender.train.loop`). Logits are upcast to fp32 before the softmax: in bf16 the
    log-sum-exp over a large vocabulary loses enough precision to bias the loss.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    if shifted:
        flat = logits.reshape(-1, logits.shape[-1]).float()
        targets = labels.reshape(-1).to(flat.device)
        return F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def hidden_states(model: nn.Module, model_inputs: Mapping[str, Any]) -> torch.Tensor:
    """The decoder's final (normed) hidden states (B, T, H) — everything but the head."""
    out = decoder(model)(**model_inputs)
    hidden: torch.Tensor = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden


def build_loss(method: LossMethod, *, num_chunks: int = 8, shifted: bool = False) -> LossFn:
    """The loss function for ``method`` (``cfg.loss_method``), chosen once at setup.

    The returned function takes ``model``, ``model_inputs`` (what the model's forward takes:
    input_ids, attention_mask / position_ids / varlen kwargs from
    :func:`hellbender.models.attention.model_inputs`, *without* labels) and ``labels`` (B, T),
    unshifted, -100 where not trained. It returns the fp32 sum of the causal-LM loss over the
    trained tokens; the loop divides by the step's trained-token count. ``num_chunks`` is
    ``cfg.chunked_cross_entropy_num_chunks`` (used by the chunked method only).

    ``shifted``: the function takes next-token targets aligned with the logits instead of labels
    (context parallelism's ``shift_labels``, see :func:`causal_lm_loss_sum`); the plain and
    chunked methods only (the others shift inside their kernels; rule HB156 refuses them with
    context parallelism).
    """
    if shifted and method not in ("plain", "chunked"):
        raise ValueError(f"loss method {method!r} takes unshifted labels only (plain and chunked take both)")

    def inputs_of(model_inputs: Mapping[str, Any]) -> dict[str, Any]:
        if "labels" in model_inputs:
            raise ValueError(
                "pass labels separately, not in model_inputs (the model would compute its own loss)"
            )
        return {"use_cache": False, **model_inputs}

    def targets_of(inputs: Mapping[str, Any], labels: torch.Tensor) -> torch.Tensor:
        # Next-token targets in the layout of the model's inputs, which may hold the micro-batch's
        # rows as one (model_inputs flattens them for per-document attention): a row starts a
        # document, whose first label is never trained, so the targets are the same either way.
        device = inputs["input_ids"].device
        shape = inputs["input_ids"].shape
        if shifted:
            return labels.to(device).reshape(shape)
        return shifted_targets(labels.to(device).reshape(shape))

    if method == "plain":

        def plain(model: nn.Module, model_inputs: Mapping[str, Any], labels: torch.Tensor) -> torch.Tensor:
            inputs = inputs_of(model_inputs)
            targets = targets_of(inputs, labels)
            keep = trained_positions(targets) if takes_logits_to_keep(model) else None
            if keep is not None:
                # The head and the softmax only where a token is trained: the same sum for less work.
                inputs["logits_to_keep"] = keep
                targets = targets[:, keep]
            logits = model(**inputs).logits
            return causal_lm_loss_sum(logits, targets, shifted=True)

        return plain
    if method == "liger":
        from hellbender.kernels.liger import liger_cross_entropy_sum

        def liger(model: nn.Module, model_inputs: Mapping[str, Any], labels: torch.Tensor) -> torch.Tensor:
            inputs = inputs_of(model_inputs)
            return liger_cross_entropy_sum(model(**inputs).logits, labels.reshape(inputs["input_ids"].shape))

        return liger
    if method == "chunked":

        def chunked(model: nn.Module, model_inputs: Mapping[str, Any], labels: torch.Tensor) -> torch.Tensor:
            inputs = inputs_of(model_inputs)
            hidden = hidden_states(model, inputs)
            head = output_head(model)
            targets = targets_of(inputs, labels)
            keep = trained_positions(targets)
            return chunked_linear_cross_entropy_sum(
                hidden[:, keep],
                head.weight,
                targets[:, keep],
                bias=head.bias,
                num_chunks=num_chunks,
                softcap=head.softcap,
            )

        return chunked
    if method == "cut":
        from hellbender.kernels.cut_ce import cut_cross_entropy_sum as fused_sum
    else:
        from hellbender.kernels.liger import liger_fused_linear_cross_entropy_sum as fused_sum

    def fused(model: nn.Module, model_inputs: Mapping[str, Any], labels: torch.Tensor) -> torch.Tensor:
        inputs = inputs_of(model_inputs)
        hidden = hidden_states(model, inputs)
        return fused_sum(hidden, output_head(model), labels.to(hidden.device).reshape(hidden.shape[:-1]))

    return fused


def trained_positions(targets: torch.Tensor) -> torch.Tensor:
    """Sequence positions (1D, ascending) where some row has a trained target.

    Only these need the output head and the softmax: with ``train_on_inputs: false`` the prompts,
    the padding and each document's last token need neither, and the head with its softmax is
    the largest single cost of a small model's step. At least one position is kept (its target
    may be ignored), so a micro-batch without a trained token still runs every parameter that a
    data-parallel engine expects in the backward.
    """
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=targets.device)
    return keep


_LOGITS_TO_KEEP: dict[type, bool] = {}


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM inside ``model`` (DDP/DeepSpeed/peft wrappers looked through) takes
    transformers' ``logits_to_keep`` argument, which runs the head on chosen positions only."""
    wrapped: Any = model
    while isinstance(getattr(wrapped, "module", None), nn.Module):
        wrapped = wrapped.module
    inner = unwrap(wrapped)
    kind = type(inner)
    if kind not in _LOGITS_TO_KEEP:
        _LOGITS_TO_KEEP[kind] = "logits_to_keep" in inspect.signature(inner.forward).parameters
    return _LOGITS_TO_KEEP[kind]
