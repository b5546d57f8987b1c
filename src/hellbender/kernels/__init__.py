"""Memory and speed optimizations: each one a config key, none of them changes the result.

Integration surface for the training loop::

    from hellbender.kernels import activation_offloading, apply_optimizations, build_loss

    model = apply_optimizations(model, cfg)                 # after adapters, before the optimizer
    loss_fn = build_loss(cfg.loss_method, num_chunks=cfg.chunked_cross_entropy_num_chunks)
    ...
    with activation_offloading(model, cfg.activation_offloading):
        loss = loss_fn(model, inputs, labels) / n_step_tokens
        loss.backward()

``undo_optimizations(model)`` (or ``with optimized(model, cfg):``) takes every patch off again.
See docs/optimizations.md for what each option costs and saves.
"""

from hellbender.kernels.loss import LossFn, build_loss, causal_lm_loss_sum
from hellbender.kernels.offload import OffloadStats, activation_offloading
from hellbender.kernels.optimize import apply_optimizations, describe, optimized, undo_optimizations

__all__ = [
    "LossFn",
    "OffloadStats",
    "activation_offloading",
    "apply_optimizations",
    "build_loss",
    "causal_lm_loss_sum",
    "describe",
    "optimized",
    "undo_optimizations",
]
