"""The training loop against a hand-written PyTorch reference, its step plan, schedules and stops."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hellbender.config.hardware import Hardware
from hellbender.config.normalize import normalize
from hellbender.config.schema import HellbenderConfig
from hellbender.data.packing import BatchSampler
from hellbender.errors import OptionError
from hellbender.testing.tiny import build_tiny_model
from hellbender.train import checkpoint as ckpt
from hellbender.train.loop import TrainingStopped, plan_steps, train

PAD = 3


def make_samples(n: int, seed: int = 0, lo: int = 5, hi: int = 20) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(4, 320) for _ in range(rng.randrange(lo, hi))]
        prompt = rng.randrange(1, len(ids) - 2)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def make_cfg(tmp_path: Path, hardware: Hardware | None = None, **values: object) -> HellbenderConfig:
    base = {
        "base_model": "x",
        "datasets": [{"path": "x"}],
        "bf16": False,
        "sequence_len": 64,
        "learning_rate": 1e-2,
        "output_dir": str(tmp_path),
        "use_tensorboard": False,
        "save_strategy": "no",
    }
    raw = HellbenderConfig.model_validate({**base, **values})
    return normalize(raw, world_size=1, hardware=hardware or Hardware())[0]


def trained_tokens(sample: dict[str, list[int]]) -> int:
    """Labels predicted after the shift; a document's first token is never predicted."""
    return sum(1 for x in sample["labels"][1:] if x != -100)


@pytest.mark.parametrize(
    ("optimizer", "max_grad_norm", "packing", "mbs", "gas"),
    [("sgd", None, True, 1, 3), ("sgd", 0.05, False, 2, 3), ("adamw_torch", 1.0, True, 1, 4)],
)
def test_one_step_equals_plain_pytorch(
    tmp_path: Path, optimizer: str, max_grad_norm: float | None, packing: bool, mbs: int, gas: int
) -> None:
    """One optimizer step over all samples equals: every sample alone, losses summed over all
    trained tokens / their count, clipped, one torch optimizer step. SGD makes any error in the
    loss normalization show up in the update (Adam's first step would hide a scale error)."""
    samples = make_samples(6)
    cfg = make_cfg(
        tmp_path, optimizer=optimizer, max_grad_norm=max_grad_norm, sample_packing=packing,
        micro_batch_size=mbs, gradient_accumulation_steps=gas, max_steps=1, learning_rate=0.5,
        adam_epsilon=1e-3,  # Adam's first step is lr·g/(|g|+eps): a large eps keeps it smooth in g
    )  # fmt: skip
    sampler = BatchSampler([len(s["input_ids"]) for s in samples], sequence_len=64,
                                  micro_batch_size=mbs, sample_packing=packing, seed=cfg.seed)  # fmt: skip
    assert len(sampler) <= gas, "the test needs the whole set in one optimizer step"

    model = build_tiny_model(seed=1)
    reference = build_tiny_model(seed=1)
    result = train(cfg, model, samples, None, pad_token_id=PAD)

    total = sum(trained_tokens(s) for s in samples)
    loss_sum = torch.zeros(())
    for s in samples:
        logits = reference(input_ids=torch.tensor([s["input_ids"]]), use_cache=False).logits[0]
        loss_sum = loss_sum + F.cross_entropy(
            logits[:-1], torch.tensor(s["labels"][1:]), ignore_index=-100, reduction="sum"
        )
    (loss_sum / total).backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(reference.parameters(), max_grad_norm)
    if optimizer == "sgd":
        ref_opt: torch.optim.Optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    else:
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.5, eps=1e-3, weight_decay=0.0)
    ref_opt.step()

    assert result.losses[1] == pytest.approx(float(loss_sum.detach() / total), rel=1e-6)
    assert result.trained_tokens == total
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6, msg=name)


@pytest.mark.parametrize(
    ("values", "epochs_seen"),
    [
        ({"num_epochs": 2, "gradient_accumulation_steps": 3, "micro_batch_size": 2}, 2),
        ({"num_epochs": 3, "gradient_accumulation_steps": 2, "sample_packing": True}, 3),
        ({"num_epochs": 1.5, "gradient_accumulation_steps": 2}, None),
        ({"max_steps": 17, "gradient_accumulation_steps": 2}, None),
        ({"max_steps": 4, "num_epochs": 3, "gradient_accumulation_steps": 2}, None),
    ],
)
def test_plan_equals_the_steps_taken(
    tmp_path: Path, values: dict[str, object], epochs_seen: int | None
) -> None:
    samples = make_samples(11, seed=3)
    cfg = make_cfg(tmp_path, learning_rate=1e-3, **values)
    sampler = BatchSampler([len(s["input_ids"]) for s in samples], sequence_len=64,
                                  micro_batch_size=cfg.micro_batch_size, sample_packing=cfg.sample_packing,
                                  seed=cfg.seed)  # fmt: skip
    plan = plan_steps(sampler, cfg)
    result = train(cfg, build_tiny_model(seed=0), samples, None, pad_token_id=PAD)
    assert result.total_steps == plan.total == result.global_step == len(result.losses)
    per_epoch = math.ceil(len(sampler) / cfg.gradient_accumulation_steps)
    if cfg.max_steps is not None:
        assert plan.total == min(cfg.max_steps, per_epoch * 3 if "num_epochs" in values else cfg.max_steps)
    if values.get("num_epochs") == 1.5:
        assert plan.steps_per_epoch[-1] == math.ceil(per_epoch * 0.5) and len(plan.steps_per_epoch) == 2
    if epochs_seen is not None:
        # Every trained token of every sample, exactly once per epoch.
        assert result.trained_tokens == epochs_seen * sum(trained_tokens(s) for s in samples)


def test_eval_and_save_schedules(tmp_path: Path) -> None:
    samples = make_samples(10, seed=4)  # mbs 1, gas 1: 10 steps per epoch, 2 epochs
    evals = make_samples(3, seed=5)
    cases = [
        ({"evals_per_epoch": 2}, {"evals": [5, 10, 15, 20]}),
        ({"eval_steps": 0.25}, {"evals": [5, 10, 15, 20]}),
        ({"eval_steps": 7}, {"evals": [7, 14, 20]}),  # the end of training is always evaluated
        ({"eval_strategy": "epoch", "save_steps": 6, "save_strategy": "steps"},
         {"evals": [10, 20], "saves": [6, 12, 18]}),
        ({"eval_strategy": "no", "saves_per_epoch": 2, "save_strategy": None, "save_total_limit": 3},
         {"evals": [], "saves": [5, 10, 15, 20], "kept": [10, 15, 20]}),
        ({"save_strategy": None}, {"evals": [20], "saves": [10, 20]}),  # default: a checkpoint per epoch
    ]  # fmt: skip
    for i, (values, want) in enumerate(cases):
        out = tmp_path / str(i)
        cfg = make_cfg(out, num_epochs=2, learning_rate=1e-3, **values)
        result = train(cfg, build_tiny_model(seed=0), samples, evals, pad_token_id=PAD)
        assert sorted(result.evals) == want["evals"], values
        assert [int(p.name.split("-")[1]) for p in result.checkpoints] == want.get("saves", []), values
        if "kept" in want:
            assert [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(out)] == want["kept"]


def test_eval_loss_is_token_exact(tmp_path: Path) -> None:
    """eval_loss = Σ loss over all trained tokens of the eval set / their count (any batching)."""
    from hellbender.train.loop import evaluate

    evals = make_samples(7, seed=6)
    model = build_tiny_model(seed=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in evals:
            logits = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
            total += float(F.cross_entropy(logits[:-1], torch.tensor(s["labels"][1:]), reduction="sum"))
            count += trained_tokens(s)
    for packing, batch in ((False, 3), (True, 2)):
        cfg = make_cfg(tmp_path, eval_batch_size=batch, eval_sample_packing=packing)
        metrics = evaluate(model, evals, cfg, PAD)
        assert metrics["eval_loss"] == pytest.approx(total / count, rel=1e-5)
        assert metrics["eval_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    samples = make_samples(4, seed=7)
    # A huge SGD step blows the weights up; the loss of the next step overflows to inf/NaN.
    cfg = make_cfg(tmp_path, optimizer="sgd", learning_rate=1e30, max_grad_norm=None, max_steps=10,
                   save_steps=1, save_strategy="steps")  # fmt: skip
    model = build_tiny_model(seed=0)
    with pytest.raises(TrainingStopped, match=r"the loss is (nan|inf) at step (\d+)") as info:
        train(cfg, model, samples, None, pad_token_id=PAD)
    bad_step = int(str(info.value).split(" at step ")[1].split(".")[0].split()[0])
    last = ckpt.find_latest_checkpoint(tmp_path)
    assert last is not None and last.name == f"checkpoint-{bad_step - 1}"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # Nothing of the diverged step was applied: the live weights are the checkpoint's.
    saved = build_tiny_model(seed=5)
    ckpt.load_model_weights(saved, last)
    for (name, a), (_, b) in zip(model.named_parameters(), saved.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    records = (tmp_path / "metrics.jsonl").read_text()
    assert '"stopped": 1.0' in records


def test_loss_watchdog(tmp_path: Path) -> None:
    samples = make_samples(4, seed=8)
    cfg = make_cfg(tmp_path, max_steps=5, loss_watchdog_threshold=1.0)  # random-init loss ≈ ln(320) ≈ 5.8
    with pytest.raises(TrainingStopped, match=r"exceeds loss_watchdog_threshold 1\.0"):
        train(cfg, build_tiny_model(seed=0), samples, None, pad_token_id=PAD)


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path: Path) -> None:
    samples = make_samples(6, seed=9)
    losses = {}
    for name, hw, bf16 in (("fp32", Hardware(), False), ("bf16", Hardware(cpu_bf16=True), True)):
        cfg = make_cfg(tmp_path / name, hardware=hw, bf16=bf16, max_steps=4, micro_batch_size=2)
        model = build_tiny_model(seed=0)
        losses[name] = list(train(cfg, model, samples, None, pad_token_id=PAD).losses.values())
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert cfg.compute_dtype == "bfloat16"
    assert losses["bf16"] != losses["fp32"]  # autocast really ran in bf16 ...
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)  # ... and trains the same model


def test_memory_options_run_through_the_loop_unchanged(tmp_path: Path) -> None:
    """Chunked cross-entropy, selective checkpointing and activation offloading to disk change
    memory, not numbers: the loop's losses and weights match the plain run."""
    from hellbender.kernels import apply_optimizations

    samples = make_samples(6, seed=10)
    options = {"chunked_cross_entropy": True, "chunked_cross_entropy_num_chunks": 3,
               "gradient_checkpointing": "selective", "activation_offloading": "disk"}  # fmt: skip
    results = {}
    for name, values in (("plain", {}), ("optimized", options)):
        # SGD, so a weight differs from the plain run by lr × the gradient difference; Adam
        # divides by sqrt(v) and turns a 1e-9 rounding difference on a near-zero gradient into a
        # full-size step, which says nothing about the optimization under test.
        cfg = make_cfg(
            tmp_path / name, max_steps=3, micro_batch_size=2, optimizer="sgd", learning_rate=0.5, **values
        )
        model = apply_optimizations(build_tiny_model(seed=0), cfg)
        result = train(cfg, model, samples, None, pad_token_id=PAD)
        results[name] = (list(result.losses.values()), [p.detach().clone() for p in model.parameters()])
    # Not bit-identical (the chunked loss sums in a different order): the other path really ran.
    assert results["optimized"][0] != results["plain"][0]
    assert results["optimized"][0] == pytest.approx(results["plain"][0], rel=1e-5)
    for a, b in zip(results["optimized"][1], results["plain"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_matches_cpu(tmp_path: Path) -> None:
    """The same loop on a GPU: batches follow the model's device and the losses match the CPU run
    (the CPU side of this logic is every other test in this file); peak memory is CUDA's."""
    from hellbender.train.metrics import peak_memory_bytes

    samples = make_samples(6, seed=11)
    losses = {}
    for device in ("cpu", "cuda"):
        cfg = make_cfg(tmp_path / device, max_steps=3, micro_batch_size=2, sample_packing=True)
        model = build_tiny_model(seed=0).to(device)
        losses[device] = list(train(cfg, model, samples, None, pad_token_id=PAD).losses.values())
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-4)
    assert peak_memory_bytes() == torch.cuda.max_memory_allocated()


def test_every_batch_has_the_same_shape_with_pad_to_sequence_len(tmp_path: Path) -> None:
    """5 samples, micro-batch 2: the last training micro-batch (and the last eval batch of 3 samples)
    holds one sample, yet the model only ever sees (2, sequence_len) batches; the losses equal those
    of a run without pad_to_sequence_len (same rows, padded only to the longest, never filled)."""
    from hellbender.train.loop import evaluate

    samples, evals = make_samples(5, seed=12), make_samples(3, seed=13)
    shapes: dict[str, list[tuple[int, ...]]] = {}
    runs = {}
    for pad in (True, False):
        cfg = make_cfg(tmp_path / str(pad), micro_batch_size=2, pad_to_sequence_len=pad, num_epochs=1,
                       optimizer="sgd", learning_rate=0.5)  # fmt: skip
        model = build_tiny_model(seed=0)
        seen: list[tuple[int, ...]] = []
        record = lambda _module, args, _out, seen=seen: seen.append(tuple(args[0].shape))  # noqa: E731
        model.get_input_embeddings().register_forward_hook(record)
        result = train(cfg, model, samples, None, pad_token_id=PAD)
        metrics = evaluate(model, evals, cfg, PAD)
        shapes[str(pad)], runs[pad] = seen, (list(result.losses.values()), metrics["eval_loss"])
    assert len(shapes["True"]) == 3 + 2 and set(shapes["True"]) == {(2, 64)}
    assert (1, 64) not in shapes["False"] and shapes["False"][2][0] == 1  # the short batch really exists
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-5)


def test_packing_efficiency_is_logged_before_the_first_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Step 0 of metrics.jsonl is the plan, with the packing efficiency recomputed here by hand:
    real tokens / (rows × sequence_len) of epoch 0's packed rows."""
    from hellbender.train.metrics import read_metrics

    samples = make_samples(9, seed=14)
    cfg = make_cfg(tmp_path, sample_packing=True, micro_batch_size=2, max_steps=2)
    train(cfg, build_tiny_model(seed=0), samples, None, pad_token_id=PAD)
    sampler = BatchSampler([len(s["input_ids"]) for s in samples], sequence_len=64, micro_batch_size=2,
                                  sample_packing=True, seed=cfg.seed)  # fmt: skip
    rows = [row for mb in sampler for row in mb]
    expected = sum(len(samples[i]["input_ids"]) for row in rows for i in row) / (len(rows) * 64)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[0]["step"] == 0 and records[0]["packing_efficiency"] == pytest.approx(expected)
    assert records[0]["rows_per_epoch"] == len(rows) and records[0]["total_steps"] == 2
    assert [r["step"] for r in records[1:]] == [1, 2]
    assert f"packing efficiency {expected:.1%}" in capsys.readouterr().err


def test_resuming_into_another_output_dir_keeps_the_whole_metrics_history(tmp_path: Path) -> None:
    """A run resumed from the checkpoint of step 3 into a new folder: its metrics.jsonl holds steps
    1-3 as the first run logged them (from the checkpoint's copy) and 4-6 equal to the first run's."""
    import shutil

    from hellbender.train.metrics import read_metrics

    samples = make_samples(6, seed=15)
    values = {"max_steps": 6, "save_steps": 3, "save_strategy": "steps", "logging_steps": 1}
    first = train(
        make_cfg(tmp_path / "a", **values), build_tiny_model(seed=0), samples, None, pad_token_id=PAD
    )
    original = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in original] == list(range(7))  # the plan record, then steps 1-6

    def resume_into(name: str, checkpoint: Path) -> list[dict]:
        result = train(make_cfg(tmp_path / name, **values), build_tiny_model(seed=1), samples, None,
                       pad_token_id=PAD, resume_from=checkpoint)  # fmt: skip
        assert result.losses == {k: v for k, v in first.losses.items() if k > 3}
        return read_metrics(tmp_path / name / "metrics.jsonl")

    resumed = resume_into("b", tmp_path / "a" / "checkpoint-3")
    assert resumed[:4] == original[:4]
    assert [(r["step"], r["loss"]) for r in resumed[4:]] == [(r["step"], r["loss"]) for r in original[4:]]

    # A checkpoint copied away from its run, without the metrics copy (as written before
    # checkpoints carried one): nothing to restore from, the new file starts at the resume step.
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "moved" / "checkpoint-3")
    (tmp_path / "moved" / "checkpoint-3" / "metrics.jsonl").unlink()
    assert [r["step"] for r in resume_into("c", tmp_path / "moved" / "checkpoint-3")] == [4, 5, 6]
    # ... but in its run's folder, that folder's metrics.jsonl serves.
    (tmp_path / "a" / "checkpoint-3" / "metrics.jsonl").unlink()
    assert resume_into("d", tmp_path / "a" / "checkpoint-3")[:4] == original[:4]


def test_scheduled_steps_are_decided_from_the_plan() -> None:
    """Eval/save steps are computed before the loop from the step plan (StepPlan)."""
    from hellbender.train.loop import StepPlan, scheduled_steps

    # 2 full epochs of 10 steps, then half of a third (num_epochs 2.5): its end is never reached
    plan = StepPlan(steps_per_epoch=[10, 10, 5], epoch_lengths=[10, 10, 10])

    def due(
        strategy: str | None = None,
        every: float | None = None,
        per_epoch: int | None = None,
        default_epoch_end: bool = False,
    ) -> list[int]:
        return sorted(
            scheduled_steps(
                plan, strategy=strategy, every=every, per_epoch=per_epoch, default_epoch_end=default_epoch_end
            )
        )

    assert due(strategy="no", every=5) == []
    assert due(strategy="epoch") == [10, 20]
    assert due(every=10) == [10, 20]
    assert due(every=0.4) == [10, 20]  # a fraction of all 25 steps: every ceil(10) steps
    assert due(every=0.5) == [13]
    assert due(per_epoch=2) == [5, 10, 15, 20, 25]  # the cut epoch keeps its mid-point (step 5 of it)
    assert due(default_epoch_end=True) == [10, 20]
    assert due() == []


def test_max_steps_alone_beyond_the_epoch_cap_is_refused_quickly(tmp_path: Path) -> None:
    # 11 samples, mbs 1: 11 steps per epoch; 10^9 steps would need ~10^8 re-packed epochs.
    samples = make_samples(11, seed=3)
    cfg = make_cfg(tmp_path, max_steps=10**9)
    lengths = [len(s["input_ids"]) for s in samples]
    sampler = BatchSampler(lengths, sequence_len=64, micro_batch_size=1, sample_packing=False, seed=cfg.seed)
    with pytest.raises(OptionError, match="max_steps 1000000000 needs more than 1000 passes"):
        plan_steps(sampler, cfg)
    # At the cap itself the plan still holds: 1000 epochs of 11 steps.
    assert plan_steps(sampler, make_cfg(tmp_path, max_steps=11_000)).total == 11_000


@pytest.mark.parametrize(("logging_steps", "logged"), [(0.25, [2, 4, 6, 8]), (0.5, [4, 8]), (3, [3, 6, 8])])
def test_logging_steps_below_one_is_a_fraction_of_the_run(
    tmp_path: Path, logging_steps: float, logged: list[int]
) -> None:
    """As in the HF Trainer: logging_steps 0.25 logs every quarter of the run (8 steps: every 2);
    1 or more is a count. The last step is always logged."""
    from hellbender.train.metrics import read_metrics

    cfg = make_cfg(tmp_path, max_steps=8, logging_steps=logging_steps)
    train(cfg, build_tiny_model(seed=0), make_samples(8, seed=3), None, pad_token_id=PAD)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == logged
