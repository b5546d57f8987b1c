"""Every lr_scheduler beyond cosine/linear/constant: against transformers' get_scheduler where it has
the schedule, else against the formula (Axolotl's REX) or torch's OneCycleLR, computed here."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from transformers.optimization import get_scheduler

from hellbender.config.hardware import Hardware
from hellbender.config.normalize import normalize
from hellbender.config.schema import HellbenderConfig, ResolvedConfig
from hellbender.train.optim import build_scheduler

PEAK = 3e-4


def make_cfg(**values: object) -> ResolvedConfig:
    raw = HellbenderConfig.model_validate(
        {"base_model": "x", "datasets": [{"path": "x"}], "bf16": False, "learning_rate": PEAK, **values}
    )
    return normalize(raw, world_size=1, hardware=Hardware())[0]


def one_param_optimizer(lr: float = PEAK) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def lr_trace(scheduler: Any, optimizer: torch.optim.Optimizer, n: int) -> list[float]:
    """The learning rate of optimizer steps 1..n (read before each step, as the loop logs it)."""
    out = []
    for _ in range(n):
        out.append(float(scheduler.get_last_lr()[0]))
        optimizer.step()
        scheduler.step()
    return out


def ours(total: int, **values: object) -> list[float]:
    optimizer = one_param_optimizer()
    return lr_trace(build_scheduler(make_cfg(**values), optimizer, total), optimizer, total)


# (our lr_scheduler, transformers' name, its scheduler_specific_kwargs)
HF_EQUIVALENTS: list[tuple[str, str, dict[str, Any]]] = [
    ("constant_with_warmup", "constant_with_warmup", {}),
    ("cosine_with_restarts", "cosine_with_restarts", {}),
    ("polynomial", "polynomial", {}),
    ("inverse_sqrt", "inverse_sqrt", {}),
    ("cosine_with_min_lr", "cosine_with_min_lr", {"min_lr_rate": 0.0}),
    ("cosine_warmup_with_min_lr", "cosine_warmup_with_min_lr", {"min_lr_rate": 0.0}),
]


@pytest.mark.parametrize("total", [1, 9, 40])
@pytest.mark.parametrize("warmup", [0, 1, 5])
@pytest.mark.parametrize(("kind", "hf_name", "kwargs"), HF_EQUIVALENTS)
def test_schedules_match_transformers_get_scheduler(
    kind: str, hf_name: str, kwargs: dict[str, Any], warmup: int, total: int
) -> None:
    if kind == "polynomial" and warmup >= total:
        # transformers divides by zero on a run no longer than its warm-up; ours stays in range
        assert all(0 <= lr <= PEAK for lr in ours(total, lr_scheduler=kind, warmup_steps=warmup))
        return
    ref_opt = one_param_optimizer()
    ref = get_scheduler(
        hf_name,
        ref_opt,
        num_warmup_steps=warmup,
        num_training_steps=total,
        scheduler_specific_kwargs=kwargs or None,
    )
    assert ours(total, lr_scheduler=kind, warmup_steps=warmup) == pytest.approx(
        lr_trace(ref, ref_opt, total), rel=1e-12, abs=1e-18
    )


@pytest.mark.parametrize("kind", ["cosine_with_min_lr", "cosine_warmup_with_min_lr"])
def test_min_lr_schedules_take_cosine_min_lr_ratio(kind: str) -> None:
    total, warmup, ratio = 30, 3, 0.2
    ref_opt = one_param_optimizer()
    ref = get_scheduler(
        kind,
        ref_opt,
        num_warmup_steps=warmup,
        num_training_steps=total,
        scheduler_specific_kwargs={"min_lr_rate": ratio},
    )
    got = ours(total, lr_scheduler=kind, warmup_steps=warmup, cosine_min_lr_ratio=ratio)
    assert got == pytest.approx(lr_trace(ref, ref_opt, total), rel=1e-12)
    assert min(got[warmup:]) > ratio * PEAK * 0.999


def rex_reference(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Axolotl's RexLR written out: linear warm-up, then min + (1 - min) · z / (0.1 + 0.9 z) with
    z the fraction of the post-warm-up steps still to run."""
    if step < warmup:
        return PEAK * step / warmup
    if step >= total:
        return PEAK * min_ratio
    z = (total - step) / (total - warmup)
    return PEAK * (min_ratio + (1 - min_ratio) * z / (0.1 + 0.9 * z))


@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
@pytest.mark.parametrize("warmup", [0, 4])
def test_rex_follows_axolotl_formula(warmup: int, min_ratio: float) -> None:
    total = 25
    want = [rex_reference(k, total=total, warmup=warmup, min_ratio=min_ratio) for k in range(total)]
    got = ours(total, lr_scheduler="rex", warmup_steps=warmup, cosine_min_lr_ratio=min_ratio)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)
    # REX decays more slowly than linear early on: above the straight line at mid-run
    assert got[(total + warmup) // 2] > PEAK * 0.5


@pytest.mark.parametrize("total", [10, 33])
@pytest.mark.parametrize("warmup", [0, 3])
def test_one_cycle_matches_torch_one_cycle_lr(warmup: int, total: int) -> None:
    ref_opt = one_param_optimizer()
    # as Axolotl builds it: pct_start = warm-up / total, cosine annealing; momentum is not cycled here
    ref = torch.optim.lr_scheduler.OneCycleLR(
        ref_opt,
        max_lr=PEAK,
        total_steps=total,
        pct_start=warmup / total,
        anneal_strategy="cos",
        cycle_momentum=False,
    )
    got = ours(total, lr_scheduler="one_cycle", warmup_steps=warmup)
    assert got == pytest.approx(lr_trace(ref, ref_opt, total), rel=1e-9)
    assert got[0] == pytest.approx(PEAK / 25 if warmup else got[0])
    assert max(got) <= PEAK * (1 + 1e-12)


def test_inverse_sqrt_formula_after_warmup() -> None:
    total, warmup = 50, 4
    got = ours(total, lr_scheduler="inverse_sqrt", warmup_steps=warmup)
    assert got[warmup:] == pytest.approx([PEAK / math.sqrt(k / warmup) for k in range(warmup, total)])


def test_default_scheduler_is_still_cosine() -> None:
    total, warmup = 20, 2
    cfg = make_cfg(warmup_steps=warmup)
    assert cfg.lr_scheduler == "cosine"
    ref_opt = one_param_optimizer()
    ref = get_scheduler("cosine", ref_opt, num_warmup_steps=warmup, num_training_steps=total)
    assert ours(total, warmup_steps=warmup) == pytest.approx(lr_trace(ref, ref_opt, total), rel=1e-12)
