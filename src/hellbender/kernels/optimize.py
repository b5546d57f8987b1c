"""Apply every memory / speed optimization a config asks for to a model — and take them off again.

Order matters and is fixed here:

1. fused LoRA kernels (they replace peft's projection / MLP forwards),
2. Liger kernels (norms, gated activation, RoPE, LayerNorm),
3. tiled MLP (wraps whatever MLP forward steps 1–2 left, so it tiles the fused one),
4. gradient checkpointing (wraps whole decoder layers),
5. torch.compile (compiles each decoder layer including everything above).

The loss replacements (chunked / cut / Liger cross-entropy) are not patches: the loop calls the
function :func:`hellbender.kernels.loss.build_loss` returns. Activation offloading is a context the
loop enters around forward + backward (:func:`hellbender.kernels.offload.activation_offloading`).
Which combinations are allowed is decided by the config rules (HB108, HB117, HB118, HB119); what
is checked here is what only the model can tell: that a fused loss can reproduce its head, that
a LoRA kernel has LoRA layers to fuse.

Everything is recorded in a :class:`~hellbender.kernels.patching.Patches` log kept per model;
:func:`undo_optimizations` restores the model exactly (the tests rely on it to compare the
optimized path with the plain one on the same weights).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator

from torch import nn

from hellbender.config.schema import ResolvedConfig
from hellbender.kernels.liger import LIGER_KEYS
from hellbender.kernels.model_parts import decoder_layers, model_device, output_head
from hellbender.kernels.patching import Patches

logger = logging.getLogger(__name__)

_APPLIED: weakref.WeakKeyDictionary[nn.Module, Patches] = weakref.WeakKeyDictionary()


def _model_has_lora_layers(model: nn.Module) -> bool:
    return any(hasattr(m, "lora_A") and hasattr(m, "get_base_layer") for m in model.modules())


def apply_optimizations(model: nn.Module, cfg: ResolvedConfig) -> nn.Module:
    """Patch ``model`` in place for ``cfg``'s optimizations and return it.

    Raises ``ValueError`` / ``RuntimeError`` with the reason when an option cannot work on this
    model or machine (Liger without a GPU, a fused LoRA kernel over DoRA, ...); on error nothing
    stays patched.
    """
    if model in _APPLIED:
        raise RuntimeError(
            "optimizations are already applied to this model; call undo_optimizations(model) first"
        )
    patches = Patches()
    try:
        _apply(model, cfg, patches)
    except BaseException:
        patches.undo()
        raise
    _APPLIED[model] = patches
    return model


def _apply(model: nn.Module, cfg: ResolvedConfig, patches: Patches) -> None:
    device = model_device(model)
    liger_on = [k for k in LIGER_KEYS if getattr(cfg, k)]
    if liger_on:
        from hellbender.kernels.liger import require_liger

        require_liger(", ".join(liger_on), device)

    lora_kernels = [k for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel") if getattr(cfg, k)]
    if lora_kernels and not _model_has_lora_layers(model):
        patches.note(f"{', '.join(lora_kernels)}: ignored, the model has no LoRA adapter")
    elif lora_kernels:
        from hellbender.kernels import lora_fused

        for key in lora_kernels:
            lora_fused.PATCHES[key](model, patches)

    if liger_on:
        from hellbender.kernels import liger

        for key, patch in liger.PATCHES.items():
            if getattr(cfg, key):
                patch(model, patches)

    if cfg.tiled_mlp:
        from hellbender.kernels.tiled_mlp import patch_tiled_mlp

        patch_tiled_mlp(model, cfg.tiled_mlp_num_shards, patches)

    if cfg.gradient_checkpointing:
        from hellbender.kernels.checkpointing import enable_checkpointing

        enable_checkpointing(model, cfg.gradient_checkpointing, cfg.gradient_checkpointing_kwargs, patches)

    if cfg.activation_offloading is True and device.type == "cpu":
        patches.note(
            "activation_offloading: true is a no-op on CPU (the activations already live in CPU "
            "memory); activation_offloading: disk moves them out of RAM"
        )
    elif cfg.activation_offloading:
        patches.note(
            f"activation_offloading: {cfg.activation_offloading} (the loop's activation_offloading context)"
        )

    if cfg.loss_method in ("chunked", "cut", "liger_fused_linear"):
        output_head(model)  # refuses heads a fused loss cannot reproduce, before the first step
        patches.note(f"loss: {cfg.loss_method} (hellbender.kernels.loss.build_loss)")

    if cfg.fp8:  # swaps the layers' linear modules, so before torch.compile traces them
        from hellbender.quant.fp8 import convert_to_fp8

        converted, undo = convert_to_fp8(model, decoder_layers(model))
        patches.on_undo(undo)
        patches.note(f"fp8: {len(converted)} linear layers → torchao Float8Linear (tensorwise scaling)")

    if cfg.torch_compile:
        from hellbender.kernels.compile import compile_layers

        compile_layers(model, cfg.torch_compile_backend, patches)


def undo_optimizations(model: nn.Module) -> nn.Module:
    """Remove every patch :func:`apply_optimizations` made on ``model`` (no-op if none)."""
    patches = _APPLIED.pop(model, None)
    if patches is not None:
        patches.undo()
    return model


def describe(model: nn.Module) -> list[str]:
    """Human-readable list of what is applied to ``model`` (for the run log)."""
    patches = _APPLIED.get(model)
    return list(patches.applied) if patches is not None else []


@contextlib.contextmanager
def optimized(model: nn.Module, cfg: ResolvedConfig) -> Iterator[nn.Module]:
    """``with optimized(model, cfg) as m:`` — the optimizations on inside the block only."""
    apply_optimizations(model, cfg)
    try:
        yield model
    finally:
        undo_optimizations(model)
