"""Optimizers and schedules: compared with transformers' schedule functions and torch's AdamW."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from hellbender.config.hardware import Hardware
from hellbender.config.normalize import normalize
from hellbender.config.schema import HellbenderConfig
from hellbender.train.optim import build_optimizer, build_scheduler, param_groups, warmup_steps


def make_cfg(**values: object) -> HellbenderConfig:
    raw = HellbenderConfig.model_validate(
        {"base_model": "x", "datasets": [{"path": "x"}], "bf16": False, **values}
    )
    return normalize(raw, world_size=1, hardware=Hardware())[0]


def lr_trace(
    scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer, n: int
) -> list[float]:
    out = []
    for _ in range(n):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def one_param_optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize("total", [1, 7, 50])
@pytest.mark.parametrize("warmup", [0, 1, 5])
@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_match_transformers(kind: str, warmup: int, total: int) -> None:
    cfg = make_cfg(lr_scheduler=kind, warmup_steps=warmup, learning_rate=3e-4)
    ours_opt = one_param_optimizer(cfg.learning_rate)
    ours = build_scheduler(cfg, ours_opt, total)
    ref_opt = one_param_optimizer(cfg.learning_rate)
    if kind == "cosine":
        ref = get_cosine_schedule_with_warmup(ref_opt, warmup, total)
    elif kind == "linear":
        ref = get_linear_schedule_with_warmup(ref_opt, warmup, total)
    else:
        ref = get_constant_schedule_with_warmup(ref_opt, warmup)
    assert lr_trace(ours, ours_opt, total + 2) == pytest.approx(
        lr_trace(ref, ref_opt, total + 2), rel=1e-12, abs=0
    )


@pytest.mark.parametrize("ratio", [0.1, 0.5])
def test_cosine_min_lr_ratio_matches_transformers(ratio: float) -> None:
    total, warmup = 40, 4
    cfg = make_cfg(lr_scheduler="cosine", warmup_steps=warmup, cosine_min_lr_ratio=ratio, learning_rate=1e-3)
    ours_opt, ref_opt = one_param_optimizer(1e-3), one_param_optimizer(1e-3)
    ours = build_scheduler(cfg, ours_opt, total)
    ref = get_cosine_with_min_lr_schedule_with_warmup(ref_opt, warmup, total, min_lr_rate=ratio)
    got, want = lr_trace(ours, ours_opt, total + 1), lr_trace(ref, ref_opt, total + 1)
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert min(got[warmup:]) == pytest.approx(ratio * 1e-3)


def test_warmup_ratio_rounds_up_like_hf() -> None:
    # HF TrainingArguments.get_warmup_steps: ceil(ratio × total).
    assert warmup_steps(make_cfg(warmup_ratio=0.1), 25) == math.ceil(0.1 * 25)
    assert warmup_steps(make_cfg(warmup_steps=7), 25) == 7
    assert warmup_steps(make_cfg(), 25) == 0


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.embed = torch.nn.Embedding(10, 4)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_weight_decay_skips_biases_and_norms_and_frozen() -> None:
    model = Tiny()
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed == {"proj.weight", "embed.weight"}
    assert plain == {"proj.bias", "norm.weight", "norm.bias"}

    # The effect: with zero gradients, AdamW only decays, and only the decayed group.
    cfg = make_cfg(optimizer="adamw_torch", weight_decay=0.5, learning_rate=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(cfg, model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.1 * 0.5) if name in decayed else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)


def regression_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_fused", "adamw_8bit", "sgd"])
def test_every_optimizer_reduces_the_loss(name: str) -> None:
    torch.manual_seed(0)
    # 64×64 = 4096 weights: bitsandbytes keeps 8-bit state only for tensors of >= 4096 elements.
    model = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64)
    y = x @ torch.randn(64, 64) * 0.1
    cfg = make_cfg(optimizer=name, learning_rate=2.0 if name == "sgd" else 1e-2)
    opt = build_optimizer(cfg, model)
    first = float(regression_loss(model, x, y))
    for _ in range(30):
        loss = regression_loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(regression_loss(model, x, y)) < 0.5 * first
    if name == "adamw_8bit":
        assert opt.state[model.weight]["state1"].dtype == torch.uint8


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_fused"])
def test_adamw_variants_equal_torch_reference(name: str) -> None:
    torch.manual_seed(0)
    model = Tiny()
    ref = Tiny()
    ref.load_state_dict(model.state_dict())
    cfg = make_cfg(optimizer=name, learning_rate=1e-2, weight_decay=0.0, adam_beta2=0.99, adam_epsilon=1e-6)
    ours = build_optimizer(cfg, model)
    reference = torch.optim.AdamW(
        [p for p in ref.parameters() if p.requires_grad],
        lr=1e-2,
        betas=(0.9, 0.99),
        eps=1e-6,
        weight_decay=0.0,
    )
    x = torch.randn(8, 4)
    for _ in range(3):
        for m, opt in ((model, ours), (ref, reference)):
            m.norm(m.proj(x)).pow(2).sum().backward()
            m.embed(torch.arange(10)).sum().backward()
            opt.step()
            opt.zero_grad()
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
