"""Finding the pieces of a (possibly peft-wrapped) causal LM that the optimizations act on.

The optimizations need four things from a model: the transformers model inside any peft wrapper,
its repeated decoder layers, the decoder that produces the final hidden states, and the output
head's weight. They are found through transformers' own conventions (``get_base_model``,
``base_model_prefix``, ``get_output_embeddings``, ``GradientCheckpointingLayer``) rather than by
attribute names of one architecture, so Llama, Qwen, Mistral, SmolLM and friends all work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hellbender.errors import OptionError


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers ``PreTrainedModel`` inside a peft wrapper (LoRA layers stay injected)."""
    get_base_model = getattr(model, "get_base_model", None)
    if get_base_model is None:
        return model
    base: nn.Module = get_base_model()
    return base


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks, in order.

    transformers marks every repeated block as a ``GradientCheckpointingLayer``; that is exactly
    the granularity at which checkpointing, tiling and regional compilation make sense.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers: list[nn.Module] = [
        m for m in unwrap(model).modules() if isinstance(m, GradientCheckpointingLayer)
    ]
    if not layers:
        raise OptionError(
            f"{type(unwrap(model)).__name__} has no transformers decoder layers "
            "(GradientCheckpointingLayer); the memory optimizations need a transformers causal LM."
        )
    return layers


def decoder(model: nn.Module) -> nn.Module:
    """The base model that maps input ids to the final (normed) hidden states."""
    inner = unwrap(model)
    prefix = getattr(inner, "base_model_prefix", "model")
    base = getattr(inner, prefix, None)
    if not isinstance(base, nn.Module) or base is inner:
        raise OptionError(
            f"cannot find the decoder of {type(inner).__name__} (no `{prefix}` submodule); "
            "the chunked / fused losses need a *ForCausalLM model."
        )
    return base


@dataclass(frozen=True)
class Head:
    """What a fused head + loss needs: the projection and any transformation of its logits."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None


def output_head(model: nn.Module) -> Head:
    """The lm_head as (weight, bias, softcap), or a clear error for heads a fused loss cannot take.

    A fused head + loss replaces ``lm_head(hidden)`` by its own matmul, so it must know the exact
    function the head computes. Plain ``nn.Linear`` heads (tied or not) qualify; a head carrying
    LoRA, or a model that rescales its logits, does not and is refused instead of trained wrong.
    """
    inner = unwrap(model)
    get_output_embeddings = getattr(inner, "get_output_embeddings", None)
    # Any: a Linear, peft's modules_to_save wrapper, a LoRA layer... told apart below.
    head: Any = get_output_embeddings() if get_output_embeddings is not None else None
    config = getattr(inner, "config", None)
    # peft's modules_to_save wrapper trains a copy of the head: use the copy that is active.
    if hasattr(head, "modules_to_save") and hasattr(head, "active_adapters"):
        if getattr(head, "disable_adapters", False) or not head.active_adapters:
            head = head.original_module
        else:
            head = head.modules_to_save[head.active_adapters[0]]
    if not isinstance(head, nn.Linear) or hasattr(head, "base_layer"):
        raise OptionError(
            f"the output head is a {type(head).__name__}, not a plain Linear (LoRA on lm_head?); "
            "chunked/cut/fused cross-entropy compute the head themselves and need a plain Linear. "
            "Remove lm_head from lora_target_modules (use lora_modules_to_save) or turn the loss "
            "replacement off."
        )
    text_config = (
        config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    )
    for attr in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(text_config, attr, None) not in (None, 1, 1.0):
            raise OptionError(
                f"{type(inner).__name__} rescales its logits ({attr}); the chunked/cut/fused losses "
                "do not reproduce that. Turn the loss replacement off for this model."
            )
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return Head(weight=head.weight, bias=head.bias, softcap=float(softcap) if softcap else None)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (the first parameter decides)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
