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

from hellbender.config.schema import BNB_OPTIMIZERS, TORCHAO_OPTIMIZERS, ResolvedConfig
from hellbender.config.unfrozen import unfrozen_pattern
from hellbender.errors import OptionError, UnavailableError
from hellbender.quant import import_torchao


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


def freeze_except(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Train only the parameters whose name matches one of ``patterns`` (``unfrozen_parameters``);
    freeze the rest, so the optimizer (built after) never holds them. Returns the trained names.

    Names are those of ``model.named_parameters()`` before any wrapping (``model.layers.0…``).
    """
    compiled = [unfrozen_pattern(p) for p in patterns]
    trained: list[str] = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(c.match(name) for c in compiled))
        if param.requires_grad:
            trained.append(name)
    if not trained:
        raise OptionError(
            f"unfrozen_parameters {patterns} matches no parameter of the model, so nothing would train "
            f"(its names look like {next(iter(dict(model.named_parameters())), '?')!r})"
        )
    return trained


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
    if cfg.optimizer in BNB_OPTIMIZERS:
        return _bitsandbytes(cfg.optimizer, groups, lr, betas, cfg.adam_epsilon)
    if cfg.optimizer in TORCHAO_OPTIMIZERS:
        return _torchao(cfg.optimizer, groups, lr, betas, cfg.adam_epsilon)
    if cfg.optimizer == "sgd":
        # Plain SGD, as Axolotl's `sgd` (HF Trainer's): no momentum; weight decay is L2 here.
        return torch.optim.SGD(groups, lr=lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def _bitsandbytes(
    name: str, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float
) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW with 8-bit block-wise state (``adamw_8bit``), or its paged variants.

    Paged optimizers keep their state in CUDA unified memory, which the driver moves to CPU RAM
    when the GPU runs out; without CUDA, bitsandbytes (>= 0.48) runs the same update on ordinary
    tensors (the config rule HB195 says so). Tensors under 4096 elements keep 32-bit state
    (bitsandbytes' ``min_8bit_size``).
    """
    try:
        import bitsandbytes as bnb
    except ImportError as exc:  # the config rule HB144 reports this earlier; kept for API users
        raise UnavailableError(
            f"optimizer: {name} needs bitsandbytes, which is not installed: pip install 'hellbender[quant]'"
        ) from exc
    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[name]
    optimizer: torch.optim.Optimizer = cls(groups, lr=lr, betas=betas, eps=eps)
    return optimizer


def _torchao(
    name: str, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float
) -> torch.optim.Optimizer:
    """torchao's AdamW with 8-bit, 4-bit or fp8 (e4m3) block-wise state.

    The update runs in fp32 on the dequantized state and is compiled per parameter shape with
    ``torch.compile`` (so the first step of a new model pays a compile, on CPU too); tensors under
    4096 elements (or not a multiple of the block) keep fp32 state. Its learning rate is a tensor
    in each group (``group["lr"]``): the ``LambdaLR`` of :func:`build_scheduler` writes into it.
    """
    try:
        ao_optim = import_torchao("torchao.optim")
    except ImportError as exc:  # the config rule HB197 reports this earlier; kept for API users
        raise UnavailableError(
            f"optimizer: {name} needs torchao, which is not installed: pip install 'hellbender[torchao]'"
        ) from exc
    cls = {
        "adamw_torch_8bit": ao_optim.AdamW8bit,
        "adamw_torch_4bit": ao_optim.AdamW4bit,
        "adamw_torch_fp8": ao_optim.AdamWFp8,
    }[name]
    optimizer: torch.optim.Optimizer = cls(groups, lr=lr, betas=betas, eps=eps)
    return optimizer


# Optimizer-state bytes per trainable parameter, in theory: Adam's two moments at 4 bytes each, or
# quantized to 1 byte (8-bit, fp8) / half a byte (4-bit) plus one fp32 scale per block (256
# values for bitsandbytes and torchao's 8-bit and fp8, 128 for torchao's 4-bit). Tensors under 4096
# elements keep fp32 state in every low-bit optimizer; the code books (256 or 16 fp32 values per
# state, per tensor in torchao) and the step counters are left out. bench/memory.py measures them.
STATE_BYTES_PER_PARAM: dict[str, float] = {
    "adamw_torch": 8.0,
    "adamw_torch_fused": 8.0,
    "paged_adamw_32bit": 8.0,
    "adamw_8bit": 2 * (1 + 4 / 256),
    "paged_adamw_8bit": 2 * (1 + 4 / 256),
    "adamw_torch_8bit": 2 * (1 + 4 / 256),
    "adamw_torch_fp8": 2 * (1 + 4 / 256),
    "adamw_torch_4bit": 2 * (0.5 + 4 / 128),
    "sgd": 0.0,
}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's state tensors hold, as stored: a quantized state counts its codes,
    scales and code book (a tensor subclass is taken apart with ``__tensor_flatten__``), and a
    tensor shared by several parameters (bitsandbytes' code book) counts once."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(tensor: torch.Tensor) -> None:
        nonlocal total
        flatten = getattr(type(tensor), "__tensor_flatten__", None)
        if flatten is not None:
            names, _ = flatten(tensor)
            for inner in names:
                add(getattr(tensor, inner))
            return
        key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()

    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                add(value)
    return total


def warmup_steps(cfg: ResolvedConfig, total_steps: int) -> int:
    """Warm-up length: ``warmup_steps`` if given, else ``ceil(warmup_ratio × total)`` (HF's rounding)."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    if cfg.warmup_ratio is not None:
        return math.ceil(cfg.warmup_ratio * total_steps)
    return 0


# polynomial decays towards this learning rate, not to 0 (HF's ``lr_end`` default).
POLYNOMIAL_LR_END = 1e-7
# inverse_sqrt without warm-up decays on this timescale (HF's default).
INVERSE_SQRT_TIMESCALE = 10_000
# one_cycle starts at peak / ONE_CYCLE_DIV and ends at that / ONE_CYCLE_FINAL_DIV (torch's
# OneCycleLR defaults, which Axolotl keeps).
ONE_CYCLE_DIV = 25.0
ONE_CYCLE_FINAL_DIV = 1e4


def lr_multiplier(
    step: int,
    *,
    kind: str,
    total_steps: int,
    warmup: int,
    min_lr_ratio: float = 0.0,
    peak_lr: float = 1.0,
) -> float:
    """The factor on the peak learning rate after ``step`` scheduler steps (HF's definition).

    Every schedule but ``one_cycle`` and ``cosine_warmup_with_min_lr`` warms up linearly from 0 over
    ``warmup`` steps, then: ``constant``/``constant_with_warmup`` hold the peak; ``linear`` decays to
    0; ``cosine``/``cosine_with_min_lr`` follow half a cosine down to ``min_lr_ratio``;
    ``cosine_with_restarts`` is HF's hard-restart cosine with its default single cycle (0 after the
    end); ``polynomial`` decays linearly (power 1) to :data:`POLYNOMIAL_LR_END`; ``inverse_sqrt``
    decays as 1/sqrt(step / warmup); ``rex`` is Axolotl's REX curve z / (0.1 + 0.9 z) down to
    ``min_lr_ratio``. ``one_cycle`` is torch's ``OneCycleLR`` learning rate (cosine up over the
    warm-up from peak / 25, then cosine down to peak / 2.5e5); ``cosine_warmup_with_min_lr`` is HF's
    variant whose step count starts at 1.
    """
    if kind == "one_cycle":
        return _one_cycle(step, total_steps=total_steps, warmup=warmup)
    if kind == "cosine_warmup_with_min_lr":
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup + 1) / max(1, total_steps - warmup)
        return max(0.0, _half_cosine(progress) * (1.0 - min_lr_ratio) + min_lr_ratio)
    if step < warmup:
        return step / max(1, warmup)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    if kind in ("cosine", "cosine_with_min_lr"):
        return max(0.0, _half_cosine(progress) * (1.0 - min_lr_ratio) + min_lr_ratio)
    if kind == "cosine_with_restarts":
        return 0.0 if progress >= 1.0 else _half_cosine(progress % 1.0)
    if kind == "polynomial":
        if step > total_steps:
            return POLYNOMIAL_LR_END / peak_lr
        return ((peak_lr - POLYNOMIAL_LR_END) * (1.0 - progress) + POLYNOMIAL_LR_END) / peak_lr
    if kind == "inverse_sqrt":
        timescale = warmup or INVERSE_SQRT_TIMESCALE
        return 1.0 / math.sqrt((step + timescale - warmup) / timescale)
    if kind == "rex":
        if step >= total_steps:
            return min_lr_ratio
        z = (total_steps - step) / max(1, total_steps - warmup)
        return min_lr_ratio + (1.0 - min_lr_ratio) * z / (0.1 + 0.9 * z)
    raise ValueError(f"unknown lr_scheduler {kind!r}")


def _half_cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _one_cycle(step: int, *, total_steps: int, warmup: int) -> float:
    """torch ``OneCycleLR``'s learning rate over the peak (cosine annealing, two phases, the
    warm-up as ``pct_start``), as Axolotl configures it. Its momentum cycling is not applied:
    ``adam_beta1`` stays what the config says."""
    start, end = 1.0 / ONE_CYCLE_DIV, 1.0 / (ONE_CYCLE_DIV * ONE_CYCLE_FINAL_DIV)
    peak_step = float(warmup) - 1.0  # OneCycleLR: pct_start × total − 1
    last = float(total_steps) - 1.0
    if step <= peak_step:
        lo, hi, pct = start, 1.0, step / peak_step if peak_step > 0 else 1.0
    else:
        lo, hi = 1.0, end
        pct = min(1.0, (step - peak_step) / (last - peak_step)) if last > peak_step else 1.0
    return hi + (lo - hi) / 2.0 * (math.cos(math.pi * pct) + 1.0)


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
        peak_lr=cfg.learning_rate,
    )
    return LambdaLR(optimizer, fn)
