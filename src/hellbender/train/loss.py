"""Token-exact loss normalization for causal language modelling.

The quantity we train on is the mean cross-entropy over **every trained token of one optimizer
step** — the same number whether the step is one big batch or many micro-batches, packed or
padded, on one rank or many. A mean of per-micro-batch means is *not* that number: a micro-batch
with 10 trained tokens would weigh as much as one with 1000, so the gradient would depend on how
the data happened to be split (and on packing, which changes how many tokens share a batch).

Contract for the training loop::

    micro_batches = [next(data) for _ in range(gradient_accumulation_steps)]
    n_step = step_normalizer(micro_batches)           # trained tokens of the whole step
    for mb in micro_batches:
        logits = model(**model_inputs(mb, impl)).logits
        loss = causal_lm_loss_sum(logits, mb["labels"]) / max(n_step, 1)
        loss.backward()                                # gradients add up to d(mean over step)
    optimizer.step()

* ``causal_lm_loss_sum`` returns a **sum** (fp32) over trained tokens, never a mean.
* The divisor is the **total** count of the step, known before the first backward because the
  micro-batches are drawn first (they are small: token ids only).
* Data parallel (later): the divisor is the all-reduced sum over ranks, ``N = Σ_r n_r``. DDP and
  FSDP *average* gradients over the W ranks, so each rank must scale its loss by W:
  ``loss = loss_sum * W / N``. Then the averaged gradient is ``Σ_r grad(loss_sum_r) / N`` — exact.
* A step with no trained token at all (N == 0) divides by 1: its loss sum is 0, so the gradient
  is zero instead of NaN.
* The reported step loss is ``Σ loss_sum / N`` (not the mean of the micro-batch losses).

"Trained token" means a label != -100 *after the shift* (label at position t+1 predicted from
position t): :func:`count_trained_tokens` counts exactly what :func:`causal_lm_loss_sum` sums.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "causal_lm_loss_sum", "count_trained_tokens", "step_normalizer"]


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained tokens, accumulated in fp32.

    ``logits`` (B, L, V) in any float dtype, ``labels`` (B, L) aligned with the inputs (not
    shifted; -100 = not trained). Logits are upcast to fp32 before the softmax: in bf16 the
    log-sum-exp over a large vocabulary loses enough precision to bias the loss.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def count_trained_tokens(labels: torch.Tensor) -> int:
    """Number of labels the shifted loss counts: labels[:, 1:] != -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def step_normalizer(micro_batches: Iterable[Mapping[str, Any]]) -> int:
    """Total trained tokens of one optimizer step (this rank), the divisor of every micro-batch.

    Uses the collator's ``num_trained_tokens`` when present and recounts from ``labels``
    otherwise. Across ranks, all-reduce (sum) the result before dividing (see module docstring).
    """
    total = 0
    for mb in micro_batches:
        n = mb.get("num_trained_tokens")
        total += int(n) if n is not None else count_trained_tokens(mb["labels"])
    return total
