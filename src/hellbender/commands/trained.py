"""Finding a run's trained result and loading it for use (evaluate, merge-lora, inference).

Which weights the after-training commands use: the trained result in ``output_dir`` (an adapter
with ``adapter_config.json``, or a full model with ``config.json``); for an adapter run without
one there, ``lora_model_dir``. ``evaluate`` and ``inference`` fall back to the untrained base
model (and say so), which is how a "before" number is measured; ``merge-lora`` refuses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hellbender.config.schema import ResolvedConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def pick_device(model: torch.nn.Module) -> torch.device:
    """The device to run on: where a quantized model was placed, else this rank's GPU, else CPU."""
    current = next(model.parameters()).device
    if current.type != "cpu" or not torch.cuda.is_available():
        return current
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@dataclass
class TrainedSource:
    """Where the trained weights are, and the config that loads them."""

    cfg: ResolvedConfig
    description: str
    trained: bool
    tokenizer_dir: Path | None


def trained_source(cfg: ResolvedConfig) -> TrainedSource:
    """Find the trained result of ``cfg`` (see the module docstring for the order)."""
    out = Path(cfg.output_dir).expanduser()
    tok_dir = out if (out / "tokenizer_config.json").is_file() else None
    if cfg.adapter is not None:
        if (out / "adapter_config.json").is_file():
            return TrainedSource(
                cfg.model_copy(update={"lora_model_dir": str(out)}), f"adapter in {out}", True, tok_dir
            )
        if cfg.lora_model_dir:
            return TrainedSource(cfg, f"adapter in {cfg.lora_model_dir}", True, None)
    elif (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return TrainedSource(
            cfg.model_copy(update={"base_model": str(out)}), f"fine-tuned model in {out}", True, tok_dir
        )
    base = cfg.model_copy(update={"adapter": None, "lora_model_dir": None})
    return TrainedSource(base, f"the base model {cfg.base_model} (no trained weights in {out})", False, None)


def load_for_use(source: TrainedSource) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    from hellbender.models.load import load_model, load_tokenizer

    cfg = source.cfg
    if source.tokenizer_dir is not None:
        # The saved tokenizer is the one training used (it may have added tokens / a pad token).
        cfg = cfg.model_copy(update={"tokenizer_config": str(source.tokenizer_dir)})
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    device = pick_device(model)
    if next(model.parameters()).device != device:
        model.to(device)
    model.eval()
    return model, tokenizer


