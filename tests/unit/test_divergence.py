"""A run that dies or explodes without ever producing a NaN is reported, not called a success.

Two shapes of divergence never trip the NaN stop: the gradients vanish exactly (the loss freezes,
often at ln(vocab), and nothing trains any more) and the loss explodes far above where it started
yet stays finite. The loop's watchdog notices both by default, warns once (log line, progress
line, a ``diverged`` record in metrics.jsonl), and the result carries the reason that the final
line of ``hellbender train`` repeats.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_train_loop import PAD, make_cfg, make_samples

from hellbender.cli import main
from hellbender.testing.projects import write_tiny_project
from hellbender.testing.tiny import build_tiny_model
from hellbender.train import loop
from hellbender.train.loop import TrainingStopped, train
from hellbender.train.metrics import read_metrics


def dead_model() -> torch.nn.Module:
    """A model whose output no trainable weight can reach: a zero, frozen final norm (and a frozen
    head) make every logit 0 — the loss sits at ln(vocab) and every gradient is exactly 0, what
    a learning rate of 1e3-1e6 does to a real model within a step or two."""
    model = build_tiny_model(seed=0)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.model.norm.weight.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    return model


def test_a_dead_run_is_reported_as_diverged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_cfg(tmp_path, max_steps=8, learning_rate=1e-2)
    with caplog.at_level(logging.WARNING, logger="hellbender"):
        result = train(cfg, dead_model(), make_samples(16), None, pad_token_id=PAD)
    assert result.global_step == 8  # warned, not stopped: no loss_watchdog_threshold was set
    assert all(loss == pytest.approx(math.log(320)) for loss in result.losses.values())
    assert result.diverged is not None
    assert "gradient norm" in result.diverged and "exactly 0" in result.diverged, result.diverged
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "diverged" in w]) == 1, warnings  # once, not every step
    flagged = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("diverged")]
    assert flagged == [loop.WATCHDOG_PATIENCE]


def test_an_exploding_run_is_reported_as_diverged(tmp_path: Path) -> None:
    """lr 5 on a full fine-tune: the loss goes from 5.8 to over a thousand and never reaches NaN."""
    cfg = make_cfg(tmp_path, max_steps=8, learning_rate=5.0, lr_scheduler="constant")
    result = train(cfg, build_tiny_model(seed=0), make_samples(16), None, pad_token_id=PAD)
    losses = list(result.losses.values())
    assert all(math.isfinite(x) for x in losses) and max(losses) > 100 * losses[0]
    assert result.global_step == 8
    assert result.diverged is not None and "loss" in result.diverged, result.diverged
    assert f"{losses[0]:.4f}" in result.diverged  # says what it started from


def test_a_healthy_run_is_not_flagged(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, max_steps=8, learning_rate=1e-2)
    result = train(cfg, build_tiny_model(seed=0), make_samples(16), None, pad_token_id=PAD)
    assert result.diverged is None
    assert not [r for r in read_metrics(tmp_path / "metrics.jsonl") if "diverged" in r]


def test_steps_without_trained_tokens_are_not_a_dead_run(tmp_path: Path) -> None:
    """A step whose samples are all prompt (no label) has a zero gradient by construction."""
    samples = [{"input_ids": s["input_ids"], "labels": [-100] * len(s["labels"])} for s in make_samples(8)]
    cfg = make_cfg(tmp_path, max_steps=6, learning_rate=1e-2)
    assert train(cfg, build_tiny_model(seed=0), samples, None, pad_token_id=PAD).diverged is None


def test_the_nan_stop_names_fp16_overflow_only_under_fp16(tmp_path: Path) -> None:
    # SGD at lr 10 without clipping: the gradient norm reaches NaN at step 6 (an fp32 run).
    cfg = make_cfg(tmp_path, optimizer="sgd", learning_rate=10.0, max_grad_norm=None, max_steps=10)
    with pytest.raises(TrainingStopped) as info:
        train(cfg, build_tiny_model(seed=0), make_samples(4, seed=7), None, pad_token_id=PAD)
    assert "fp16" not in str(info.value), str(info.value)
    assert "learning rate" in str(info.value)
    assert "fp16 overflow" in loop.stop_message("the loss is nan at step 3", compute_dtype="float16")
    assert "fp16" not in loop.stop_message("the loss is nan at step 3", compute_dtype="bfloat16")


def test_the_final_line_of_train_says_the_run_diverged(tmp_path: Path) -> None:
    path = write_tiny_project(
        tmp_path,
        gradient_accumulation_steps=2,
        learning_rate=10.0,  # a full fine-tune at lr 10: the loss explodes, finite all the way
        lr_scheduler="constant",
        max_steps=8,
        save_strategy="no",
    )
    env = {"PYTORCH_ALLOC_CONF": None, "PYTORCH_CUDA_ALLOC_CONF": None, "WORLD_SIZE": "1"}
    result = CliRunner().invoke(main, ["train", str(path)], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("trained 8/8 steps") and "WARNING: the run diverged: " in last, last
