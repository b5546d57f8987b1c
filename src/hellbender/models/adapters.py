"""peft adapters: LoRA, QLoRA (LoRA on a bitsandbytes 4-bit base), DoRA, rsLoRA.

One function turns the ``lora_*`` / ``peft_*`` keys of the config into a
:class:`peft.LoraConfig`; everything else is peft's own code. Choices made here:

* ``lora_target_linear`` = every ``nn.Linear`` (bitsandbytes' ``Linear4bit``/``Linear8bitLt``
  are subclasses) except the output head, listed explicitly by leaf name so the adapter config
  written next to the checkpoint says exactly what was adapted. The head is excluded because a
  low-rank update of the vocabulary projection is large and rarely helps; use
  ``lora_modules_to_save: [lm_head]`` to train it in full.
* A quantized base goes through ``prepare_model_for_kbit_training`` (freeze, fp32 norms) but
  *without* its gradient checkpointing, which would be the reentrant kind by default; the
  training loop enables checkpointing with :func:`enable_gradient_checkpointing`.
* ``lora_model_dir`` continues an existing adapter (``is_trainable=True``); its own
  ``adapter_config.json`` then defines rank, targets etc., not the ``lora_*`` keys.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from hellbender.errors import MissingFileError, ModelLoadError, OptionError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from hellbender.config.schema import ResolvedConfig

logger = logging.getLogger(__name__)


def _transformers_model(model: nn.Module) -> Any:
    """The transformers model inside a peft wrapper, or ``model`` itself.

    ``Any``: what is used of it (quantization flags, checkpointing switches) is looked up by name.
    """
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if get_base_model is not None else model


def is_quantized(model: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit base (also when wrapped in a peft model)."""
    base = _transformers_model(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def keep_bnb_cpu_weights_differentiable(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    bitsandbytes 0.50 on a CPU with AVX512-BF16 rewrites a ``Linear4bit`` weight, the first time
    it runs in eval mode without grad (an evaluation pass), into a layout served by a kernel that
    has no autograd formula. Every later training step then silently gets wrong gradients through
    the frozen base (measured on the tiny model: max LoRA-gradient error 0.42 for gradients of
    magnitude 0.74; torch only prints a warning). The training loop alternates train and eval, so
    the repacking is switched off; eval runs the same (differentiable) kernel as training.
    Returns the number of 4-bit layers touched.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - only reached for quantized models, which need bnb
        return 0
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(
                f"{name}: the 4-bit weight was already repacked for CPU inference (an eval pass ran "
                "before the adapter was applied); load the model again and apply the adapter first"
            )
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        count += 1
    return count


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer except the output head (``lora_target_linear``).

    A leaf name shared with the head (only ``lm_head`` in practice) is dropped, because peft
    matches target names by suffix and would adapt the head too.
    """
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    head = get_output_embeddings() if get_output_embeddings is not None else None
    head_leaf: str | None = None
    names: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if module is head:
            head_leaf = leaf
            continue
        names.add(leaf)
    names.discard(head_leaf)
    return sorted(names)


def lora_config_from(model: nn.Module, cfg: ResolvedConfig) -> Any:
    """Build the :class:`peft.LoraConfig` for ``cfg`` (no model is modified)."""
    from peft import LoraConfig, TaskType

    targets: list[str] | str | None
    explicit = cfg.lora_target_modules
    if cfg.lora_target_linear:
        if isinstance(explicit, str):
            raise OptionError(
                "lora_target_linear cannot be combined with a regex lora_target_modules; "
                "use a list of module names, or only one of the two"
            )
        targets = sorted(set(linear_module_names(model)) | set(explicit or []))
    else:
        targets = explicit
    if targets is None:
        logger.info("no lora_target_modules / lora_target_linear: peft's default targets for this model type")
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        modules_to_save=cfg.lora_modules_to_save,
        fan_in_fan_out=cfg.lora_fan_in_fan_out,
        use_dora=cfg.peft_use_dora,
        use_rslora=cfg.peft_use_rslora,
        layers_to_transform=cfg.peft_layers_to_transform,
        bias="none",
        # With tied input/output embeddings, a fully trained embed_tokens must stay tied to lm_head.
        ensure_weight_tying=tied and bool(cfg.lora_modules_to_save),
    )


def apply_adapter(model: PreTrainedModel, cfg: ResolvedConfig) -> nn.Module:
    """Wrap ``model`` in the peft adapter the config asks for; return it unchanged for full fine-tuning."""
    if cfg.adapter is None:
        if cfg.lora_model_dir:
            raise OptionError("lora_model_dir is set but adapter is not; set adapter: lora (or qlora)")
        return model
    if cfg.adapter not in ("lora", "qlora"):
        raise OptionError(f"adapter: {cfg.adapter!r} is not supported (lora, qlora)")
    if cfg.adapter == "qlora" and not getattr(model, "is_loaded_in_4bit", False):
        raise OptionError("adapter: qlora needs a 4-bit base model (load_in_4bit: true)")

    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if is_quantized(model):
        keep_bnb_cpu_weights_differentiable(model)
        # Checkpointing is the training loop's job (non-reentrant); see module docstring.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    if cfg.lora_model_dir:
        adapter_dir = Path(cfg.lora_model_dir).expanduser()
        if not (adapter_dir / "adapter_config.json").is_file():
            raise MissingFileError(f"lora_model_dir: no adapter_config.json in {adapter_dir}")
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: shapes of another base model
            raise ModelLoadError(
                f"lora_model_dir: cannot load the adapter in {adapter_dir} onto {cfg.base_model!r} "
                f"({' '.join(str(exc).split())[:300]}); was it trained on this base model?"
            ) from exc
        logger.info("continuing the adapter in %s", adapter_dir)
    else:
        peft_model = get_peft_model(model, lora_config_from(model, cfg))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("adapter %s: %d trainable parameters of %d", cfg.adapter, trainable, total)
    return peft_model


def skip_lora_input_casts(model: nn.Module) -> int:
    """Let peft's LoRA layers take their input in the dtype it arrives in; returns how many.

    peft casts a LoRA layer's input to the dtype of its A weight: under bf16 autocast with fp32
    adapter weights (hellbender's mixed precision) it turns each bf16 activation into fp32, and
    autocast turns it straight back into bf16 for the matmul — two full copies of the input per
    adapted projection, forward and backward, for bit-identical numbers (bf16 → fp32 → bf16 is
    exact). Only for runs under autocast: without it the cast is what makes the matmul's dtypes
    agree.
    """
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False
            count += 1
    return count


def merge_adapter(model: nn.Module, *, allow_quantized: bool = False) -> nn.Module:
    """Fold the LoRA update into the base weights and drop the peft wrapper (``merge_and_unload``).

    Merging into a 4/8-bit base requantizes ``W + BA`` and rounds most of the update away, so it
    is refused unless ``allow_quantized``: reload the base unquantized, load the adapter with
    ``lora_model_dir`` and merge that instead. A model without an adapter is returned as is.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        logger.info("merge_adapter: the model has no adapter; nothing to merge")
        return model
    if is_quantized(model) and not allow_quantized:
        raise ModelLoadError(
            "merge_adapter: the base model is quantized; merging would round the LoRA update into "
            "4/8-bit weights. Reload the base with load_in_4bit/load_in_8bit off, set lora_model_dir "
            "to the trained adapter, and merge that model."
        )
    merged: nn.Module = model.merge_and_unload()
    return merged


def enable_gradient_checkpointing(model: nn.Module, kwargs: dict[str, Any] | None = None) -> None:
    """Turn on activation checkpointing for a plain or peft-wrapped transformers model.

    Non-reentrant by default: it supports inputs that do not require grad (a frozen base under
    LoRA), keyword arguments and nested checkpoints, where the reentrant variant silently yields
    no gradients for the adapter unless the inputs are forced to require grad. Passing
    ``{"use_reentrant": True}`` is honoured and the input embeddings are then made to require
    grad for that reason. ``use_cache`` is switched off: a KV cache is useless in training and
    incompatible with recomputation.
    """
    options = {"use_reentrant": False, **(kwargs or {})}
    base = _transformers_model(model)
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:  # transformers < 5.x spelling
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if options["use_reentrant"]:
        base.enable_input_require_grads()
    if getattr(base, "config", None) is not None:
        base.config.use_cache = False


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that will receive gradients (handy for logs and tests)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]

