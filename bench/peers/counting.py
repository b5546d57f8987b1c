"""Counting and timing inside a Hugging Face ``Trainer`` (TRL's and Axolotl's trainers are ones).

Imported in the TRL and Axolotl venvs (``bench/peers`` is put on ``PYTHONPATH``); it needs only
torch and transformers. :func:`attach` wraps one trainer's ``compute_loss`` and adds a callback;
:func:`attach_to_every_trainer` does it for every ``Trainer`` constructed afterwards (Axolotl
builds its trainer deep inside its CLI).

What is counted, per micro-batch that ``compute_loss`` sees while the model is in training mode,
i.e. the batches actually trained (a batch the data loader fetched ahead and never trained is
not seen here):

* trained tokens: labels that the shifted causal loss uses, ``labels[:, 1:] != -100`` (or
  ``shift_labels != -100`` when the batch carries pre-shifted labels);
* positions: ``input_ids.numel()``, every token slot the model processes, padding included;
* real tokens: positions less padding (``attention_mask == 0``; without a mask, slots holding the
  pad id with an ignored label), and documents per row (from ``position_ids`` not continuing) —
  what tells whether rows were packed.

Timing: ``on_train_begin`` → ``on_train_end`` of the trainer's callbacks (model loading and data
preparation happen before), plus the time of each optimizer step. At ``on_train_end`` the result
is written as JSON to the path in ``$PEER_RESULT``.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

IGNORE = -100


class Tally:
    def __init__(self) -> None:
        self.trained = 0
        self.positions = 0
        self.real = 0
        self.micro_batches = 0
        self.shapes: Counter[str] = Counter()
        self.docs_per_row: list[int] = []
        self.keys: set[str] = set()
        self.t_begin = 0.0
        self.t_end = 0.0
        self.step_t0 = 0.0
        self.step_seconds: list[float] = []
        self.losses: list[float] = []
        self.info: dict[str, Any] = {}
        self.pad_id: int | None = None

    def count(self, inputs: dict[str, Any]) -> None:
        ids = inputs["input_ids"]
        self.micro_batches += 1
        self.positions += int(ids.numel())
        self.shapes["x".join(str(d) for d in ids.shape)] += 1
        self.keys.update(inputs.keys())
        if inputs.get("shift_labels") is not None:
            self.trained += int((inputs["shift_labels"] != IGNORE).sum())
        else:
            self.trained += int((inputs["labels"][..., 1:] != IGNORE).sum())
        mask = inputs.get("attention_mask")
        labels = inputs.get("labels")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self.real += int((mask != 0).sum())
        elif self.pad_id is not None and isinstance(labels, torch.Tensor) and labels.shape == ids.shape:
            # No mask (packed rows carry position_ids instead): a padding slot holds the pad id and
            # an ignored label; a trained EOS (the same id here) has its label, prompts hold no pad id.
            self.real += int(ids.numel() - ((ids == self.pad_id) & (labels == IGNORE)).sum())
        else:
            self.real += int(ids.numel())
        pos = inputs.get("position_ids")
        if isinstance(pos, torch.Tensor):
            # A document starts where the position does not continue the previous one.
            starts = torch.ones_like(pos, dtype=torch.bool)
            starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                starts &= mask.bool()
            self.docs_per_row.extend(int(n) for n in starts.sum(dim=1))

    def result(self) -> dict[str, Any]:
        rows = self.docs_per_row
        return {
            "trained_tokens": self.trained,
            "positions": self.positions,
            "real_tokens": self.real,
            "micro_batches": self.micro_batches,
            "batch_shapes": dict(self.shapes),
            "batch_keys": sorted(self.keys),
            "docs_per_row_mean": sum(rows) / len(rows) if rows else None,
            "docs_per_row_max": max(rows) if rows else None,
            "loop_seconds": self.t_end - self.t_begin,
            "step_seconds": self.step_seconds,
            "losses": self.losses,
            **self.info,
        }


def _describe(model: Any, args: Any) -> dict[str, Any]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    config = getattr(model, "config", None)
    return {
        "args_bf16": bool(getattr(args, "bf16", False)),
        "args_fp16": bool(getattr(args, "fp16", False)),
        "trainable_dtype": str(trainable[0].dtype) if trainable else None,
        "frozen_dtype": str(frozen[0].dtype) if frozen else None,
        "trainable_params": sum(p.numel() for p in trainable),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "optimizer": getattr(args, "optim", None),
        "lr_scheduler": str(getattr(args, "lr_scheduler_type", None)),
        "gradient_checkpointing": bool(getattr(args, "gradient_checkpointing", False)),
        "torch_threads": torch.get_num_threads(),
    }


class _Callback(TrainerCallback):
    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if model is not None:
            self.tally.info.update(_describe(model, args))
        self.tally.t_begin = self.tally.step_t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        now = time.perf_counter()
        self.tally.step_seconds.append(now - self.tally.step_t0)
        self.tally.step_t0 = now

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.tally.losses.append(float(logs["loss"]))

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.tally.t_end = time.perf_counter()
        self.tally.info["global_step"] = int(state.global_step)
        path = os.environ.get("PEER_RESULT")
        if path:
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(self.tally.result(), fh)


def attach(trainer: Any, tally: Tally | None = None) -> Tally:
    """Count the micro-batches ``trainer`` trains on and time its loop."""
    tally = tally or Tally()
    tally.pad_id = getattr(getattr(trainer, "processing_class", None), "pad_token_id", None)
    inner = trainer.compute_loss

    def compute_loss(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if model.training:
            tally.count(inputs)
        return inner(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    trainer.add_callback(_Callback(tally))
    return tally


def attach_to_every_trainer() -> Tally:
    """Patch ``Trainer.__init__`` so every trainer built from now on is counted (one shared tally)."""
    tally = Tally()
    original = Trainer.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        attach(self, tally)

    Trainer.__init__ = __init__  # type: ignore[method-assign]
    return tally
