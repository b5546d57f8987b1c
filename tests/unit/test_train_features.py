"""unfrozen_parameters, loss_watchdog_patience, early_stopping_patience and load_best_model_at_end:
each triggered, and its default shown unchanged, on a tiny random Llama."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.unit.test_train_loop import PAD, make_cfg, make_samples

from hellbender.config.unfrozen import UnfrozenPatternError, unfrozen_pattern
from hellbender.data.packing import BatchSampler, group_by_length
from hellbender.errors import OptionError
from hellbender.testing.tiny import build_tiny_model
from hellbender.train import loop
from hellbender.train.loop import Samples, TrainingStopped, batching, train
from hellbender.train.metrics import read_metrics
from hellbender.train.optim import build_optimizer, freeze_except

UNFROZEN = ["model.layers.1.mlp", "^lm_head.weight$"]
# a constant schedule: the first k steps of a longer run are exactly a k-step run
CONSTANT: dict[str, Any] = {"lr_scheduler": "constant", "warmup_steps": 0}
EVAL_EVERY_STEP: dict[str, Any] = {**CONSTANT, "eval_steps": 1, "val_set_size": 0.1}
SAMPLES, EVALS = make_samples(20, seed=1), make_samples(4, seed=2)


def matches_unfrozen(name: str) -> bool:
    """UNFROZEN written out by hand."""
    return name.startswith("model.layers.1.mlp.") or name == "lm_head.weight"


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------- unfrozen_parameters


def test_unfrozen_pattern_reads_dots_literally_from_the_start() -> None:
    pattern = unfrozen_pattern("model.layers.1.mlp")
    assert pattern.match("model.layers.1.mlp.up_proj.weight")
    assert not pattern.match("model.layers.1xmlp.up_proj.weight")  # `.` is a literal dot
    assert not pattern.match("x.model.layers.1.mlp.up_proj.weight")  # matched from the start
    assert unfrozen_pattern("model.layers.[0-9]+.mlp").match("model.layers.12.mlp.up_proj.weight")
    with pytest.raises(UnfrozenPatternError, match="row ranges"):
        unfrozen_pattern("^model.embed_tokens.weight$[:32000]")


def test_unfrozen_parameters_optimizer_holds_only_the_matching_ones() -> None:
    model = build_tiny_model(seed=0)
    trained = freeze_except(model, UNFROZEN)
    want = [n for n, _ in model.named_parameters() if matches_unfrozen(n)]
    assert trained == want and len(want) == 4
    cfg = make_cfg(Path("."), unfrozen_parameters=UNFROZEN)
    held = {id(p) for group in build_optimizer(cfg, model).param_groups for p in group["params"]}
    by_name = dict(model.named_parameters())
    assert held == {id(by_name[n]) for n in want}


def test_unfrozen_parameters_only_those_change_after_training(tmp_path: Path) -> None:
    samples = make_samples(12, seed=1)
    model = build_tiny_model(seed=0)
    before = weights(model)
    cfg = make_cfg(tmp_path, max_steps=2, unfrozen_parameters=UNFROZEN)
    train(cfg, model, samples, None, pad_token_id=PAD)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == {n for n in before if matches_unfrozen(n)}


def test_without_unfrozen_parameters_every_parameter_trains(tmp_path: Path) -> None:
    samples = make_samples(12, seed=1)
    model = build_tiny_model(seed=0)
    before = weights(model)
    train(make_cfg(tmp_path, max_steps=2), model, samples, None, pad_token_id=PAD)
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_unfrozen_parameters_matching_nothing_is_refused() -> None:
    with pytest.raises(OptionError, match="matches no parameter"):
        freeze_except(build_tiny_model(seed=0), ["^transformer.h"])


# ---------------------------------------------------------------- loss_watchdog_patience


def test_loss_watchdog_patience_stops_after_that_many_high_steps(tmp_path: Path) -> None:
    """Random init: every loss ≈ ln(320) ≈ 5.8 > 1.0, so patience 3 stops at step 3, after
    applying steps 1 and 2 (the default stops at step 1, before any update)."""
    samples = make_samples(20, seed=1)
    model = build_tiny_model(seed=0)
    cfg = make_cfg(tmp_path, max_steps=6, loss_watchdog_threshold=1.0, loss_watchdog_patience=3, **CONSTANT)
    with pytest.raises(TrainingStopped, match=r"at step 3 exceeds loss_watchdog_threshold 1\.0 for 3 steps"):
        train(cfg, model, samples, None, pad_token_id=PAD)
    reference = build_tiny_model(seed=0)  # the same run, two steps
    train(make_cfg(tmp_path / "ref", max_steps=2, **CONSTANT), reference, samples, None, pad_token_id=PAD)
    for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(got, want), name


def test_loss_watchdog_default_patience_stops_at_the_first_high_step(tmp_path: Path) -> None:
    samples = make_samples(20, seed=1)
    model = build_tiny_model(seed=0)
    before = weights(model)
    cfg = make_cfg(tmp_path, max_steps=6, loss_watchdog_threshold=1.0)
    assert cfg.loss_watchdog_patience is None
    with pytest.raises(TrainingStopped, match=r"at step 1 exceeds loss_watchdog_threshold 1\.0\."):
        train(cfg, model, samples, None, pad_token_id=PAD)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


class _Log:
    """Stands in for the RunLogger: records what a stop writes."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []
        self.progress = self

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.records.append((step, metrics))

    def message(self, text: str) -> None:
        pass


def test_loss_watchdog_patience_counts_steps_in_a_row(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, loss_watchdog_threshold=1.0, loss_watchdog_patience=2)
    log: Any = _Log()
    high = 0
    for step, loss in enumerate([5.0, 0.5, 5.0, 0.9, 5.0], start=1):  # never two high in a row
        high = loop._stop_if_diverged(cfg, loss, step, log, high)
    assert high == 1 and log.records == []
    with pytest.raises(TrainingStopped, match="at step 7"):
        loop._stop_if_diverged(cfg, 5.0, 7, log, high)


# ---------------------------------------------------------------- early stopping and the best model


@pytest.fixture
def scripted_eval_losses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Evaluations return these eval_loss values in order (the stopping rules are what is tested,
    not how a tiny random model's eval loss happens to move)."""
    losses: list[float] = []

    def fake_evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
        value = losses.pop(0)
        return {"eval_loss": value, "eval_ppl": float(torch.tensor(value).exp()), "eval_tokens": 1.0}

    monkeypatch.setattr(loop, "evaluate", fake_evaluate)
    yield losses


def test_early_stopping_after_patience_evaluations_without_improvement(
    tmp_path: Path, scripted_eval_losses: list[float]
) -> None:
    scripted_eval_losses += [3.0, 2.0, 2.5, 2.0, 1.0, 0.5]  # 2.0 again is no improvement
    cfg = make_cfg(tmp_path, max_steps=6, early_stopping_patience=2, logging_steps=3, **EVAL_EVERY_STEP)
    result = train(cfg, build_tiny_model(seed=0), SAMPLES, EVALS, pad_token_id=PAD)
    assert result.stopped_early == 4 and result.global_step == 4
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [3, 4]  # the last, partial window logged too
    assert [r["step"] for r in records if "early_stopped" in r] == [4]
    assert sorted(result.evals) == [1, 2, 3, 4] and sorted(result.losses) == [1, 2, 3, 4]
    assert result.final_weights is None  # one process: the model itself holds the final weights


def test_without_early_stopping_the_run_goes_on(tmp_path: Path, scripted_eval_losses: list[float]) -> None:
    scripted_eval_losses += [3.0, 2.0, 2.5, 2.0, 2.6, 2.7]
    cfg = make_cfg(tmp_path, max_steps=6, **EVAL_EVERY_STEP)
    result = train(cfg, build_tiny_model(seed=0), SAMPLES, EVALS, pad_token_id=PAD)
    assert result.stopped_early is None and result.global_step == 6


def test_load_best_model_at_end_gives_the_best_evaluations_weights(
    tmp_path: Path, scripted_eval_losses: list[float]
) -> None:
    scripted_eval_losses += [3.0, 1.0, 2.0, 2.5]
    model = build_tiny_model(seed=0)
    cfg = make_cfg(tmp_path / "best", max_steps=4, load_best_model_at_end=True, **EVAL_EVERY_STEP)
    result = train(cfg, model, SAMPLES, EVALS, pad_token_id=PAD)
    assert result.global_step == 4 and result.best_step == 2
    scripted_eval_losses += [3.0, 1.0]
    reference = build_tiny_model(seed=0)  # the same run stopped at step 2
    reference_cfg = make_cfg(tmp_path / "ref", max_steps=2, **EVAL_EVERY_STEP)
    train(reference_cfg, reference, SAMPLES, EVALS, pad_token_id=PAD)
    for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(got, want), name


def test_without_load_best_the_final_weights_are_the_last(
    tmp_path: Path, scripted_eval_losses: list[float]
) -> None:
    scripted_eval_losses += [3.0, 1.0, 2.0, 2.5]
    model = build_tiny_model(seed=0)
    cfg = make_cfg(tmp_path / "last", max_steps=4, **EVAL_EVERY_STEP)
    result = train(cfg, model, SAMPLES, EVALS, pad_token_id=PAD)
    assert result.best_step is None
    scripted_eval_losses += [3.0, 1.0]
    reference = build_tiny_model(seed=0)
    reference_cfg = make_cfg(tmp_path / "ref", max_steps=2, **EVAL_EVERY_STEP)
    train(reference_cfg, reference, SAMPLES, EVALS, pad_token_id=PAD)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))


# ---------------------------------------------------------------- group_by_length


@pytest.mark.parametrize(("n", "batch_size"), [(7, 2), (40, 3), (500, 2)])
def test_group_by_length_matches_transformers_on_the_same_permutation(
    monkeypatch: pytest.MonkeyPatch, n: int, batch_size: int
) -> None:
    from transformers import trainer_pt_utils

    rng = random.Random(n)
    lengths = [rng.randrange(1, 30) for _ in range(n)]  # ties included
    order = list(range(n))
    rng.shuffle(order)
    # transformers draws its permutation with torch.randperm: hand it ours
    monkeypatch.setattr(trainer_pt_utils.torch, "randperm", lambda *a, **k: torch.tensor(order))
    want = trainer_pt_utils.get_length_grouped_indices(lengths, batch_size)
    assert group_by_length(order, lengths, batch_size) == want
    assert sorted(want) == list(range(n))


def sampler(lengths: list[int], group: int, seed: int = 3) -> BatchSampler:
    return BatchSampler(
        lengths, sequence_len=64, micro_batch_size=2, sample_packing=False, seed=seed, length_group=group
    )


def spread(batches: list[list[list[int]]], lengths: list[int]) -> int:
    """Σ over micro-batches of (longest − shortest sample): the padding that grouping saves."""
    return sum(max(lengths[r[0]] for r in b) - min(lengths[r[0]] for r in b) for b in batches)


def test_group_by_length_sampler_keeps_every_sample_once_and_is_deterministic() -> None:
    rng = random.Random(0)
    lengths = [rng.randrange(1, 64) for _ in range(101)]
    plain, grouped = sampler(lengths, 0), sampler(lengths, 4)
    for epoch in range(3):
        plain.set_epoch(epoch)
        grouped.set_epoch(epoch)
        batches = list(grouped)
        assert len(batches) == len(plain)  # the same step plan
        assert sorted(r[0] for b in batches for r in b) == list(range(101))  # every sample once
        again = sampler(lengths, 4)
        again.set_epoch(epoch)
        assert list(again) == batches  # (seed, epoch) decides: what exact resume needs
        assert spread(batches, lengths) < spread(list(plain), lengths) / 2
    grouped.set_epoch(0)
    first = list(grouped)
    grouped.set_epoch(1)
    assert list(grouped) != first  # a new order each epoch
    assert lengths[first[0][0][0]] == max(lengths)  # the longest sample first (fail early on memory)


def test_group_by_length_run_resumes_exactly(tmp_path: Path) -> None:
    samples = make_samples(24, seed=4, lo=4, hi=40)
    values = {"max_steps": 6, "save_steps": 3, "save_strategy": "steps", "group_by_length": True}
    first = train(make_cfg(tmp_path / "a", **values), build_tiny_model(seed=0), samples, None,
                  pad_token_id=PAD)  # fmt: skip
    plain = train(make_cfg(tmp_path / "p", max_steps=6), build_tiny_model(seed=0), samples, None,
                  pad_token_id=PAD)  # fmt: skip
    assert first.losses != plain.losses  # another order of the same samples
    resumed = train(make_cfg(tmp_path / "b", **values), build_tiny_model(seed=1), samples, None,
                    pad_token_id=PAD, resume_from=tmp_path / "a" / "checkpoint-3")  # fmt: skip
    assert resumed.losses == {k: v for k, v in first.losses.items() if k > 3}


def test_group_by_length_default_keeps_the_plain_shuffle() -> None:
    cfg = make_cfg(Path("."))
    assert cfg.group_by_length is False
    train_sampler, _ = batching(Samples(make_samples(30, seed=5)), cfg, PAD)
    reference = BatchSampler(
        [len(s["input_ids"]) for s in make_samples(30, seed=5)],
        sequence_len=cfg.sequence_len,
        micro_batch_size=cfg.micro_batch_size,
        sample_packing=False,
        seed=cfg.seed,
    )
    assert list(train_sampler) == list(reference)


def test_early_stopped_run_writes_the_best_weights_as_its_outputs(
    tmp_path: Path, scripted_eval_losses: list[float]
) -> None:
    """Through run_train: early stopping ends the run at step 4 (two evaluations without a lower
    eval_loss after step 2), and the final model.safetensors is checkpoint-2's, not the last."""
    from safetensors.torch import load_file

    from hellbender.commands.train import run_train
    from hellbender.config.load import load_config
    from hellbender.testing.projects import REPEAT_ROWS, write_tiny_project

    scripted_eval_losses += [3.0, 1.0, 2.0, 2.5, 0.5, 0.4]
    path = write_tiny_project(
        tmp_path,
        REPEAT_ROWS * 3,
        val_set_size=0.25,
        max_steps=6,
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        early_stopping_patience=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )
    cfg, _ = load_config(path, world_size=1)
    result = run_train(cfg)
    assert (result.stopped_early, result.best_step, result.global_step) == (4, 2, 4)
    out = tmp_path / "out"
    final = load_file(str(out / "model.safetensors"))
    best, last = load_file(str(out / "checkpoint-2" / "model.safetensors")), load_file(
        str(out / "checkpoint-4" / "model.safetensors")
    )
    assert final.keys() == best.keys()
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert any(not torch.equal(final[k], last[k]) for k in final)
    assert not (out / "checkpoint-5").exists()


def test_load_best_after_resuming_past_the_best_step_reads_its_checkpoint(
    tmp_path: Path, scripted_eval_losses: list[float]
) -> None:
    """The best step (2) was evaluated before the resume (from step 3, into another folder): its
    weights come from the first run's checkpoint-2."""
    values = {"max_steps": 4, "save_strategy": "steps", "save_steps": 1, "load_best_model_at_end": True}
    scripted_eval_losses += [3.0, 1.0, 2.0, 2.5]
    first = build_tiny_model(seed=0)
    train(make_cfg(tmp_path / "a", **values, **EVAL_EVERY_STEP), first, SAMPLES, EVALS, pad_token_id=PAD)
    scripted_eval_losses += [2.5]  # step 4 again
    resumed = build_tiny_model(seed=1)
    result = train(make_cfg(tmp_path / "b", **values, **EVAL_EVERY_STEP), resumed, SAMPLES, EVALS,
                   pad_token_id=PAD, resume_from=tmp_path / "a" / "checkpoint-3")  # fmt: skip
    assert result.best_step == 2 and result.global_step == 4
    for (name, got), want in zip(resumed.named_parameters(), first.parameters(), strict=True):
        assert torch.equal(got, want), name  # both hold step 2's weights
