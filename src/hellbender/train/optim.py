"""Optimizers and learning-rate schedules, built from the config by two small functions.

Builders rather than classes: :func:`build_optimizer` and :func:`build_scheduler` return plain
``torch.optim`` objects, so the loop, checkpointing (``state_dict``) and a later FSDP2/DDP wrapper
treat them like any PyTorch optimizer.

Schedules follow the Hugging Face convention exactly (the learning rate of optimizer step ``k``,
counted from 1, is ``peak × multiplier(k - 1)``; warm-up starts at 0): Axolotl users get the same
curves they had, and the unit tests compare against ``transformers.optimization`` directly.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from hellbender.config.schema import ResolvedConfig
from hellbender.errors import OptionError, UnavailableError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters into a decayed and a non-decayed group.

    Biases and normalization weights are not decayed: they are 1-D scale/shift parameters whose
    pull towards zero changes the function rather than regularizing it (pulling an RMSNorm gain
    to 0 silences the layer). The rule "1-D, or named like a bias/norm" is what HF Trainer and
    torchtune apply too. Frozen parameters (a LoRA base) are left out: the optimizer never holds
    state for them.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lowered = name.lower()
        if param.ndim < 2 or lowered.endswith(".bias") or "norm" in lowered:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: ResolvedConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over the model's trainable parameters."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise OptionError("the model has no trainable parameters (is every parameter frozen?)")
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    lr = cfg.learning_rate
    if cfg.optimizer == "adamw_torch":
        # foreach: one kernel per parameter group instead of one per tensor (torch's default on CUDA;
        # chosen explicitly so CPU and GPU run the same algorithm).
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=cfg.adam_epsilon, foreach=True)
    if cfg.optimizer == "adamw_torch_fused":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=cfg.adam_epsilon, fused=True)
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:  # the config rule HB144 reports this earlier; kept for API users
            raise UnavailableError(
                "optimizer: adamw_8bit needs bitsandbytes, which is not installed: "
                "pip install 'hellbender[quant]'"
            ) from exc
        # bitsandbytes >= 0.48 runs the 8-bit optimizer on CPU as well (checked in the unit tests).
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=cfg.adam_epsilon)
    if cfg.optimizer == "sgd":
        # Plain SGD, as Axolotl's `sgd` (HF Trainer's): no momentum; weight decay is L2 here.
        return torch.optim.SGD(groups, lr=lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def warmup_steps(cfg: ResolvedConfig, total_steps: int) -> int:
    """Warm-up length: ``warmup_steps`` if given, else ``ceil(warmup_ratio × total)`` (HF's rounding)."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    if cfg.warmup_ratio is not None:
        return math.ceil(cfg.warmup_ratio * total_steps)
    return 0


def lr_multiplier(
    step: int, *, kind: str, total_steps: int, warmup: int, min_lr_ratio: float = 0.0
) -> float:
    """The factor on the peak learning rate after ``step`` scheduler steps (HF's definition).

    Linear warm-up from 0, then cosine (down to ``min_lr_ratio``), linear (down to 0) or constant.
    """
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    if kind == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    raise ValueError(f"unknown lr_scheduler {kind!r}")


def build_scheduler(cfg: ResolvedConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    """A ``LambdaLR`` over :func:`lr_multiplier`; stepped once per optimizer step.

    The lambda is a ``functools.partial`` of a module-level function, so the scheduler's
    ``state_dict`` holds only numbers and resumes exactly.
    """
    fn = partial(
        lr_multiplier,
        kind=cfg.lr_scheduler,
        total_steps=total_steps,
        warmup=warmup_steps(cfg, total_steps),
        min_lr_ratio=cfg.cosine_min_lr_ratio,
    )
    return LambdaLR(optimizer, fn)
