"""``gradient_checkpointing``: recompute activations in the backward, fully or selectively.

``true``: every decoder layer runs under ``torch.utils.checkpoint`` (non-reentrant by default):
autograd keeps only each layer's input and re-runs the layer in the backward. Memory for
activations drops from (all intermediates × layers) to (one hidden state × layers + one layer's
intermediates); the price is one extra forward (~+30 % step time).

``selective``: the same, but the outputs of the expensive ops — matrix multiplications and the
attention kernel — are kept from the forward (PyTorch's selective activation checkpointing,
``create_selective_checkpoint_contexts``); only the cheap elementwise ops (norms, activations,
RoPE, residual adds, casts) are recomputed. Most of the recompute *time* is in the matmuls, so
this costs little time while still dropping the elementwise intermediates (which are the bulk of
a layer's saved tensors by count).

Why non-reentrant: the reentrant variant yields no gradients for the adapter when a layer's
inputs do not require grad (a frozen base under LoRA) unless the inputs are forced to, does not
support keyword arguments and cannot nest. ``gradient_checkpointing_kwargs`` is passed to
``torch.utils.checkpoint.checkpoint`` on top of ``use_reentrant: false``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from hellbender.errors import OptionError
from hellbender.kernels.model_parts import unwrap
from hellbender.kernels.patching import Patches

_aten = torch.ops.aten


def _ops(*names: str) -> frozenset[Any]:
    """The aten overloads that exist in this torch build (the SDPA backends vary by version)."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(_aten, packet, None), overload or "default", None)
        if op is not None:
            found.append(op)
    return frozenset(found)


# Outputs of these are kept by selective checkpointing. Everything else is recomputed.
SAVED_OPS: frozenset[Any] = _ops(
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_scaled_mm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward",
    "_efficient_attention_forward",
)


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep matmul and attention outputs, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context_fn() -> tuple[Any, Any]:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint`` implementing :func:`selective_policy`."""
    contexts: tuple[Any, Any] = create_selective_checkpoint_contexts(selective_policy)
    return contexts


def checkpoint_kwargs(mode: bool | str, user_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments for ``torch.utils.checkpoint.checkpoint`` for a config."""
    kwargs: dict[str, Any] = {"use_reentrant": False, **(user_kwargs or {})}
    if mode == "selective":
        if kwargs["use_reentrant"]:
            raise OptionError(
                "gradient_checkpointing: selective needs non-reentrant checkpointing; remove "
                "use_reentrant: true from gradient_checkpointing_kwargs"
            )
        if "context_fn" in kwargs:
            raise OptionError(
                "gradient_checkpointing: selective sets context_fn itself; remove it from the kwargs"
            )
        kwargs["context_fn"] = selective_context_fn
    return kwargs


def enable_checkpointing(model: nn.Module, mode: bool | str, user_kwargs: dict[str, Any] | None,
                         patches: Patches) -> None:
    """Turn on (full or selective) checkpointing of every decoder layer; undone by ``patches``.

    Uses transformers' own switch (``activation_checkpointing_enable``), which wraps each
    ``GradientCheckpointingLayer``'s forward with our checkpoint function; peft wrappers are
    looked through. The KV cache is turned off (useless in training, and a recomputed layer would
    update it twice). Undo restores the exact attributes transformers set (its own ``disable``
    would leave instance attributes behind).
    """
    kwargs = checkpoint_kwargs(mode, user_kwargs)
    base: Any = unwrap(model)  # a transformers model: its checkpointing switches are found by name
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise OptionError(
            f"gradient_checkpointing: {type(base).__name__} does not support gradient checkpointing"
        )
    had_input_grad_hook = bool(getattr(base, "_require_grads_hooks", None))
    for module in base.modules():
        if hasattr(module, "gradient_checkpointing"):
            for name in ("gradient_checkpointing", "_gradient_checkpointing_func"):
                # set_attr to the current value just records what to restore
                patches.set_attr(module, name, getattr(module, name, None))
    for name in ("_require_grads_hooks", "_require_grads_hook"):
        if name not in vars(base):
            def forget(n: str = name) -> None:
                vars(base).pop(n, None)

            patches.on_undo(forget)
    if not had_input_grad_hook and hasattr(base, "disable_input_require_grads"):
        # transformers hooks the input embeddings to require grad (needed only by the reentrant
        # variant); undo removes that hook again unless someone had installed it before.
        patches.on_undo(base.disable_input_require_grads)
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5 spelling
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(base, "config", None) is not None and getattr(base.config, "use_cache", None):
        patches.set_attr(base.config, "use_cache", False)
    kind = "selective (matmul + attention outputs kept)" if mode == "selective" else "full"
    patches.note(f"gradient_checkpointing: {kind}, use_reentrant={kwargs['use_reentrant']}")


def checkpoint_selective(fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` under selective checkpointing (used by tests and for custom blocks)."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=selective_context_fn)


__all__ = [
    "SAVED_OPS",
    "checkpoint_kwargs",
    "checkpoint_selective",
    "enable_checkpointing",
    "selective_context_fn",
    "selective_policy",
]
