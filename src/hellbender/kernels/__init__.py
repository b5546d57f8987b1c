"""Memory and speed optimizations: each one a config key, none of them changes the result.

Integration surface for the training loop::

    from hellbender.kernels import activation_offloading, apply_optimizations, loss_sum

    model = apply_optimizations(model, cfg)                 # after adapters, before the optimizer
    ...
    with activation_offloading(model, cfg.activation_offloading):
        loss = loss_sum(model, inputs, labels, cfg) / n_step_tokens
        loss.backward()

``undo_optimizations(model)`` (or ``with optimized(model, cfg):``) takes every patch off again.
See docs/optimizations.md for what each option costs and saves.
"""

from hellbender.kernels.loss import loss_method, loss_sum
from hellbender.kernels.offload import OffloadStats, activation_offloading
from hellbender.kernels.optimize import apply_optimizations, describe, optimized, undo_optimizations

__all__ = [
    "OffloadStats",
    "activation_offloading",
    "apply_optimizations",
    "describe",
    "loss_method",
    "loss_sum",
    "optimized",
    "undo_optimizations",
]
