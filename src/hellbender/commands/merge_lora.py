"""``hellbender merge-lora``: fold the trained adapter into the base weights."""

from __future__ import annotations

from pathlib import Path

import torch

from hellbender.commands.trained import TrainedSource, load_for_use, trained_source
from hellbender.config.schema import ResolvedConfig
from hellbender.errors import MissingFileError, OptionError
from hellbender.train import checkpoint as ckpt


def run_merge_lora(cfg: ResolvedConfig, out_dir: str | Path | None = None) -> Path:
    """Fold the trained adapter into an unquantized base; write a plain HF folder (safetensors).

    The base is loaded unquantized even for QLoRA (merging into 4-bit weights would round the
    update away) and the merge is computed in fp32, then stored in the base checkpoint's dtype.
    Default destination: ``output_dir/merged``.
    """
    from transformers import AutoConfig

    from hellbender.models.adapters import merge_adapter

    if cfg.adapter is None:
        raise OptionError("merge-lora: the config trains no adapter (adapter is not set); nothing to merge")
    source = trained_source(cfg)
    if not source.trained:
        raise MissingFileError(
            f"merge-lora: no trained adapter in {cfg.output_dir} (adapter_config.json) "
            "and no lora_model_dir; train first"
        )
    merge_cfg = source.cfg.model_copy(
        update={"adapter": "lora", "load_in_4bit": False, "load_in_8bit": False, "compute_dtype": "float32"}
    )
    model, tokenizer = load_for_use(
        TrainedSource(merge_cfg, source.description, True, source.tokenizer_dir)
    )
    merged = merge_adapter(model)
    from hellbender.models.load import resolve_model_path

    stored = getattr(AutoConfig.from_pretrained(resolve_model_path(merge_cfg)), "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if isinstance(stored, torch.dtype) and stored != torch.float32:
        merged.to(stored)
    target = Path(out_dir) if out_dir is not None else Path(cfg.output_dir).expanduser() / "merged"
    target.mkdir(parents=True, exist_ok=True)
    ckpt.save_model_weights(merged, target)
    tokenizer.save_pretrained(str(target))
    return target


