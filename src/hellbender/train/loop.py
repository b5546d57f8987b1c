"""The training loop: plain PyTorch, one function (:func:`train`), readable top to bottom.

Why not Hugging Face ``Trainer``: this loop must later run DDP/FSDP2 through ``torch.distributed``
on CPU ranks so that "N ranks ≡ 1 rank" is testable, and it must normalize the loss over every
trained token of an optimizer step (see :mod:`hellbender.train.loss`), which ``Trainer`` does not
do for packed, accumulated batches. The shape follows torchtune's single-device recipe: builders
produce the pieces (sampler, collator, optimizer, scheduler, logger), and the loop only wires them.

One optimizer step::

    micro-batches = the next gradient_accumulation_steps index lists of the sampler, collated
    n_step        = trained tokens of the whole step (all-reduced over ranks, later)
    for each micro-batch:  (loss_sum(micro-batch) / n_step).backward()
    stop if the loss is NaN/inf (or above loss_watchdog_threshold) — before the update
    clip the gradient norm, optimizer.step(), scheduler.step()
    log; evaluate / checkpoint when the schedule says so

The number of steps is computed before training from the sampler (exact per epoch, see
:func:`plan_steps`), so the learning-rate schedule, the progress bar and resume agree with what
actually runs.

Distributed hooks are deliberately minimal: a :class:`World` gives the rank, the world size and a
sum all-reduce; single-process it is the identity. Every place a rank-aware program differs
(token count, logging, checkpoint writing) goes through it.

Precision (bf16). The loop runs ``torch.autocast`` to the compute dtype whenever the trainable
weights are fp32 (fp32 master weights: a bf16 weight cannot absorb an update smaller than 1/256 of
itself, so pure-bf16 full fine-tuning silently stops learning at small learning rates), and no
autocast when the trainable weights are already low precision. A frozen LoRA base may be stored in
bf16. Measured on this 2-core AVX512-BF16 CPU, one thread, a 4-layer Llama at SmolLM2-135M width
(hidden 576, vocab 49152), seq 256 × batch 2, median ms per training step::

    OMP_NUM_THREADS=1 python bench/cpu_bf16.py --hidden 576 --layers 4 --vocab 49152 --seq 256 --batch 2

    full  fp32 3470 · autocast 2034 (1.71×) · bf16 weights 1580 (2.20×, but loses small updates)
    lora  fp32 2019 · autocast 1141 (1.77×) · bf16 weights 1438 (1.40×)
          · bf16 base + fp32 adapter + autocast 1180 (1.71×, half the base memory)

So autocast is chosen: fastest for LoRA, and for full fine-tuning the only exact option.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hellbender.config.schema import HellbenderConfig
from hellbender.data.packing import Collator, build_batch_sampler
from hellbender.kernels import activation_offloading, loss_sum
from hellbender.models.attention import model_inputs
from hellbender.train import checkpoint as ckpt
from hellbender.train.metrics import METRICS_FILE, RunLogger, peak_memory_bytes
from hellbender.train.optim import build_optimizer, build_scheduler


class TrainingStopped(RuntimeError):
    """The run was stopped on purpose (NaN/inf loss, loss watchdog); the last checkpoint is intact."""


@dataclass(frozen=True)
class World:
    """The ranks taking part. Single-process defaults; a distributed launcher supplies the real ones."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, value: float) -> float:
        if self.size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())


@dataclass
class TrainResult:
    global_step: int
    total_steps: int
    losses: dict[int, float] = field(default_factory=dict)  # step → mean loss over trained tokens
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    checkpoints: list[Path] = field(default_factory=list)
    resumed_from: Path | None = None
    trained_tokens: int = 0  # tokens that contributed to the loss, in the steps this call ran


# ---------------------------------------------------------------- data


class Samples:
    """Row access for a ``datasets.Dataset`` or a list of dicts (``input_ids``, ``labels``).

    A Dataset is read with one columnar ``ds[indices]`` per micro-batch: per-row ``ds[i]`` costs a
    Python round trip per sample, which dominates a tiny model's step.
    """

    def __init__(self, data: Any) -> None:
        self.data = data
        self._columnar = hasattr(data, "column_names")
        if self._columnar:
            self.data = data.select_columns(["input_ids", "labels"])
            self.lengths = (
                list(data["length"]) if "length" in data.column_names else [len(x) for x in data["input_ids"]]
            )
        else:
            self.lengths = [int(r.get("length", len(r["input_ids"]))) for r in data]

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, micro_batch: Sequence[Sequence[int]]) -> list[list[Mapping[str, Any]]]:
        if not self._columnar:
            return [[self.data[i] for i in row] for row in micro_batch]
        flat = [i for row in micro_batch for i in row]
        cols = self.data[flat]
        samples = [{"input_ids": a, "labels": b} for a, b in zip(cols["input_ids"], cols["labels"], strict=True)]
        out, pos = [], 0
        for row in micro_batch:
            out.append(samples[pos : pos + len(row)])
            pos += len(row)
        return out


def plan_steps(sampler: Any, cfg: HellbenderConfig, accumulation: int) -> list[int]:
    """Optimizer steps of every epoch that will run, exact, before training starts.

    An epoch's last step may hold fewer than ``accumulation`` micro-batches (the loss stays exact:
    it is normalized by the trained tokens actually in the step). A fractional ``num_epochs`` runs
    that fraction of the last epoch's steps. ``max_steps`` caps the total; set alone (without
    ``num_epochs`` in the config) it repeats epochs until reached, as in HF Trainer.
    """
    epochs_given = "num_epochs" in cfg.model_fields_set or cfg.max_steps is None
    limit = cfg.max_steps if cfg.max_steps is not None else math.inf
    epoch_limit = cfg.num_epochs if epochs_given else math.inf
    plan: list[int] = []
    total = 0
    while len(plan) < epoch_limit and total < limit:
        sampler.set_epoch(len(plan))
        steps = math.ceil(len(sampler) / accumulation)
        if steps == 0:
            raise ValueError("the training set is empty: no micro-batch to train on")
        fraction = epoch_limit - len(plan)
        if fraction < 1:
            steps = max(1, math.ceil(steps * fraction))
        steps = int(min(steps, limit - total))
        plan.append(steps)
        total += steps
    return plan


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast_context(cfg: HellbenderConfig, model: torch.nn.Module, device: torch.device) -> Any:
    """Autocast to the compute dtype when the trainable weights are kept in fp32, else nothing."""
    dtype = getattr(torch, cfg.compute_dtype or "float32")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if dtype == torch.float32 or not trainable or trainable[0].dtype != torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _forward_loss_sum(
    model: torch.nn.Module, batch: Mapping[str, Any], cfg: HellbenderConfig, amp: Callable[[], Any]
) -> torch.Tensor:
    """fp32 sum of the loss over the micro-batch's trained tokens, with the configured loss kernel
    (plain logits + cross-entropy, or chunked / cut / Liger; see :mod:`hellbender.kernels.loss`)."""
    dtype = torch.float32 if cfg.compute_dtype is None else getattr(torch, cfg.compute_dtype)
    with amp():
        inputs = model_inputs(batch, cfg.attn_implementation, dtype=dtype)
        return loss_sum(model, inputs, batch["labels"], cfg)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: Any,
    cfg: HellbenderConfig,
    pad_token_id: int,
    *,
    world: World = World(),
) -> dict[str, float]:
    """Mean loss over every trained token of ``data`` (and its perplexity), ``eval_batch_size`` rows."""
    samples = data if isinstance(data, Samples) else Samples(data)
    batch_size = cfg.eval_batch_size
    sampler = build_batch_sampler(
        samples.lengths,
        sequence_len=cfg.sequence_len,
        micro_batch_size=batch_size,
        sample_packing=bool(cfg.eval_sample_packing),
        seed=cfg.seed,
        shuffle=False,
    )
    collate = Collator(
        pad_token_id,
        sequence_len=cfg.sequence_len,
        pad_to_sequence_len=bool(cfg.pad_to_sequence_len),
        attn_implementation=cfg.attn_implementation,
        micro_batch_size=batch_size,  # with pad_to_sequence_len: filler rows keep every shape equal
    )
    device = next(model.parameters()).device
    amp = lambda: autocast_context(cfg, model, device)  # noqa: E731
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0.0
    for micro_batch in sampler:
        batch = _to(collate(samples.rows(micro_batch)), device)
        loss_sum += float(_forward_loss_sum(model, batch, cfg, amp))
        tokens += float(batch["num_trained_tokens"])
    model.train(was_training)
    loss_sum, tokens = world.all_reduce_sum(loss_sum), world.all_reduce_sum(tokens)
    loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 80.0)), "eval_tokens": tokens}


# ---------------------------------------------------------------- schedules of evaluation / saving


def _due(
    step: int,
    step_in_epoch: int,
    epoch_steps: int,
    *,
    strategy: str | None,
    every: float | None,
    per_epoch: int | None,
    total: int,
    default_epoch_end: bool,
) -> bool:
    """Whether an eval/save falls on this optimizer step.

    ``every`` < 1 is a fraction of all steps (HF's convention); ``per_epoch`` spreads N events
    evenly over each epoch, the last one at the epoch's end.
    """
    if strategy == "no":
        return False
    epoch_end = step_in_epoch == epoch_steps
    if strategy == "epoch":
        return epoch_end
    if every is not None:
        interval = math.ceil(every * total) if every < 1 else int(every)
        return step % max(1, interval) == 0
    if per_epoch is not None:
        marks = {max(1, round(k * epoch_steps / per_epoch)) for k in range(1, per_epoch + 1)}
        return step_in_epoch in marks
    return default_epoch_end and epoch_end


# ---------------------------------------------------------------- the loop


@dataclass
class _Step:
    """One optimizer step's worth of data: where it sits in the epoch and its micro-batches."""

    epoch: int
    first: int  # index of its first micro-batch in the epoch
    micro_batches: list[list[list[int]]]
    epoch_steps: int  # optimizer steps of the full epoch (for per-epoch schedules and the log)
    accumulation: int

    @property
    def done(self) -> int:
        """Micro-batches of the epoch consumed after this step (the data position to save)."""
        return self.first + len(self.micro_batches)

    @property
    def step_in_epoch(self) -> int:
        return -(-self.done // self.accumulation)


def _remaining_steps(sampler: Any, plan: list[int], accumulation: int, state: ckpt.TrainState) -> Any:
    """Yield the optimizer steps still to run, starting at the saved data position."""
    for epoch in range(state.epoch, len(plan)):
        sampler.set_epoch(epoch)
        micro_batches = list(sampler)
        epoch_steps = math.ceil(len(micro_batches) / accumulation)
        start = state.micro_batches_done if epoch == state.epoch else 0
        for first in range(start, min(len(micro_batches), plan[epoch] * accumulation), accumulation):
            yield _Step(epoch, first, micro_batches[first : first + accumulation], epoch_steps, accumulation)


def train(
    cfg: HellbenderConfig,
    model: torch.nn.Module,
    train_data: Any,
    eval_data: Any | None,
    *,
    pad_token_id: int,
    output_dir: Path | None = None,
    resume_from: Path | None = None,
    world: World = World(),
) -> TrainResult:
    """Train ``model`` in place on ``train_data`` (tokenized rows) and return what happened.

    Checkpoints go to ``output_dir`` (default ``cfg.output_dir``); ``resume_from`` is a checkpoint
    folder to continue from exactly. Memory options that patch the model (checkpointing, kernels)
    are applied by the caller (:func:`hellbender.kernels.apply_optimizations`); final outputs are
    written by :func:`hellbender.train.run.run_train`.
    """
    # ---- build the pieces
    out = Path(output_dir or cfg.output_dir)
    device = next(model.parameters()).device
    accumulation = cfg.gradient_accumulation_steps
    samples = Samples(train_data)
    eval_samples = Samples(eval_data) if eval_data is not None and len(eval_data) else None
    if cfg.save_strategy == "best" and eval_samples is None:
        raise ValueError("save_strategy: best needs an evaluation set (val_set_size or test_datasets)")
    sampler = build_batch_sampler(samples.lengths, sequence_len=cfg.sequence_len, micro_batch_size=cfg.micro_batch_size,
                                  sample_packing=cfg.sample_packing, seed=cfg.seed)  # fmt: skip
    # With pad_to_sequence_len every batch is (micro_batch_size, sequence_len): an epoch's short last
    # micro-batch gets filler rows (no trained token) rather than a new shape or dropped samples.
    collate = Collator(pad_token_id, sequence_len=cfg.sequence_len, pad_to_sequence_len=bool(cfg.pad_to_sequence_len),
                       attn_implementation=cfg.attn_implementation,
                       micro_batch_size=cfg.micro_batch_size)  # fmt: skip
    plan = plan_steps(sampler, cfg, accumulation)
    total = sum(plan)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, total)
    # fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type) if cfg.compute_dtype == "float16" else None
    state = ckpt.TrainState(total_steps=total, plan={"steps_per_epoch": plan, "accumulation": accumulation})
    result = TrainResult(global_step=0, total_steps=total)
    if resume_from is not None:
        _check_same_plan(resume_from, plan)
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, scaler=scaler)
        result.resumed_from = resume_from
    result.global_step = state.global_step
    params = [p for p in model.parameters() if p.requires_grad]
    amp = lambda: autocast_context(cfg, model, device)  # noqa: E731
    history = None
    if resume_from is not None:
        # The resumed run's metrics up to its step, from the checkpoint (or, for checkpoints written
        # before they carried a copy, from the folder they sit in): the new output_dir may be empty.
        history = resume_from / METRICS_FILE
        if not history.is_file():
            history = resume_from.parent / METRICS_FILE
    log = RunLogger(cfg, out, total_steps=total, initial_step=state.global_step, enabled=world.is_main,
                    history=history)  # fmt: skip
    if state.global_step == 0:  # a resumed run's file already holds its plan record
        _log_plan(log, sampler, plan, cfg)
    window = {"loss_sum": 0.0, "trained": 0.0, "tokens": 0.0, "time": 0.0}

    def save() -> None:
        if world.is_main:
            result.checkpoints.append(ckpt.save_checkpoint(
                out, model, optimizer, scheduler, state, scaler=scaler,
                save_only_model=cfg.save_only_model, save_total_limit=cfg.save_total_limit,
                metrics_file=out / METRICS_FILE,
            ))  # fmt: skip

    # ---- the loop
    model.train()
    try:
        for item in _remaining_steps(sampler, plan, accumulation, state):
            t0 = time.perf_counter()
            batches = [_to(collate(samples.rows(mb)), device) for mb in item.micro_batches]
            n_step = world.all_reduce_sum(float(sum(int(b["num_trained_tokens"]) for b in batches)))
            step_loss_sum = 0.0
            for batch in batches:
                # Offloading (when configured) must see both the forward that saves activations
                # and the backward that reads them back.
                with activation_offloading(model, cfg.activation_offloading):
                    part = _forward_loss_sum(model, batch, cfg, amp)
                    # Token-exact: every micro-batch is divided by the whole step's trained tokens.
                    scaled = part * world.size / max(n_step, 1.0)
                    (scaler.scale(scaled) if scaler else scaled).backward()
                step_loss_sum += float(part.detach())
            loss = world.all_reduce_sum(step_loss_sum) / max(n_step, 1.0)
            step = state.global_step + 1
            _stop_if_diverged(cfg, loss, step, log)  # before the update: the weights stay good
            lr = scheduler.get_last_lr()[0]
            grad_norm = _optimizer_step(params, optimizer, scaler, cfg.max_grad_norm, log, step, loss)
            scheduler.step()

            state.global_step, state.epoch, state.micro_batches_done = step, item.epoch, item.done
            result.global_step, result.losses[step] = step, loss
            result.trained_tokens += int(n_step)
            window["loss_sum"] += loss * n_step
            window["trained"] += n_step
            window["tokens"] += world.all_reduce_sum(float(sum(int(b["num_tokens"]) for b in batches)))
            window["time"] += time.perf_counter() - t0
            if step % cfg.logging_steps == 0 or step == total:
                _log_train(log, window, step, item.epoch + item.step_in_epoch / item.epoch_steps, lr, grad_norm)

            when = dict(step=step, step_in_epoch=item.step_in_epoch, epoch_steps=item.epoch_steps, total=total)
            if eval_samples is not None and (
                _due(**when, strategy=cfg.eval_strategy, every=cfg.eval_steps, per_epoch=cfg.evals_per_epoch,
                     default_epoch_end=False)
                or (step == total and cfg.eval_strategy != "no")
            ):  # fmt: skip
                metrics = evaluate(model, eval_samples, cfg, pad_token_id, world=world)
                result.evals[step] = metrics
                log.log(step, metrics)
                log.progress.message(f"eval step {step}: loss {metrics['eval_loss']:.4f} ppl {metrics['eval_ppl']:.2f}")
                improved = state.best_eval_loss is None or metrics["eval_loss"] < state.best_eval_loss
                if improved:
                    state.best_eval_loss = metrics["eval_loss"]
                if cfg.save_strategy == "best" and improved:
                    save()
            if cfg.save_strategy != "best" and _due(
                **when, strategy=cfg.save_strategy, every=cfg.save_steps, per_epoch=cfg.saves_per_epoch,
                default_epoch_end=True,
            ):  # fmt: skip
                save()
    finally:
        log.close()
    return result


def _log_plan(log: RunLogger, sampler: Any, plan: list[int], cfg: HellbenderConfig) -> None:
    """Say what the run will do before it does it: steps, and how full the rows are.

    The packing efficiency (real tokens / rows × sequence_len, of the first epoch) is the fraction
    of compute spent on real tokens when rows are padded to ``sequence_len``; a low value means
    sample_packing (or a shorter sequence_len) would train faster. Recorded as step 0 of
    ``metrics.jsonl`` (and the other sinks) so it stays with the run's numbers.
    """
    sampler.set_epoch(0)  # plan_steps left it at the last epoch; epoch 0 is iterated first anyway
    plan_record = {
        "packing_efficiency": sampler.efficiency(),
        "total_steps": sum(plan),
        "epochs": len(plan),
        "rows_per_epoch": sampler.num_rows(),
        "micro_batches_per_epoch": len(sampler),
    }
    log.log(0, plan_record)
    log.progress.message(
        f"plan: {sum(plan)} optimizer steps over {len(plan)} epoch(s); {sampler.num_rows()} rows of up to "
        f"{cfg.sequence_len} tokens in {len(sampler)} micro-batches per epoch; packing efficiency "
        f"{plan_record['packing_efficiency']:.1%} (sample_packing {'on' if cfg.sample_packing else 'off'})"
    )


def _check_same_plan(resume_from: Path, plan: list[int]) -> None:
    previous = ckpt.read_state(resume_from)
    if previous.plan.get("steps_per_epoch") != plan:
        raise ValueError(
            f"{resume_from} belongs to a run planned as {previous.plan.get('steps_per_epoch')} steps per "
            f"epoch, but this config plans {plan}: data, batch size, sequence_len or the run length "
            "changed, so the run cannot continue exactly. Start a new output_dir instead."
        )


def _optimizer_step(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    max_grad_norm: float | None,
    log: RunLogger,
    step: int,
    loss: float,
) -> float:
    """Clip and apply the accumulated gradients; return the gradient norm before clipping.

    A non-finite norm stops the run — except under fp16 loss scaling, where an overflow is
    expected now and then: the scaler skips that update and lowers the scale.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if not torch.isfinite(grad_norm) and scaler is None:
        _stop(log, step, f"the gradient norm is {float(grad_norm)} at step {step} (loss {loss:.4f})")
    if max_grad_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def _stop(log: RunLogger, step: int, reason: str) -> None:
    message = (
        f"training stopped: {reason}. Nothing from this step was applied and the last checkpoint is "
        "intact. Likely causes: a learning rate too high for this model, a bad sample, or fp16 "
        "overflow; lower learning_rate, set max_grad_norm, or resume from the last checkpoint."
    )
    log.log(step, {"stopped": 1.0})
    log.progress.message(message)
    raise TrainingStopped(message)


def _stop_if_diverged(cfg: HellbenderConfig, loss: float, step: int, log: RunLogger) -> None:
    if not math.isfinite(loss):
        log.log(step, {"loss": loss})
        _stop(log, step, f"the loss is {loss} at step {step}")
    if cfg.loss_watchdog_threshold is not None and loss > cfg.loss_watchdog_threshold:
        log.log(step, {"loss": loss})
        _stop(log, step, f"the loss {loss:.4f} at step {step} exceeds loss_watchdog_threshold {cfg.loss_watchdog_threshold}")


def _log_train(
    log: RunLogger, window: dict[str, float], step: int, epoch: float, lr: float, grad_norm: float
) -> None:
    seconds = max(window["time"], 1e-9)
    metrics = {
        "loss": window["loss_sum"] / max(window["trained"], 1.0),
        "lr": lr,
        "grad_norm": grad_norm,
        "epoch": round(epoch, 4),
        "trained_tokens_per_s": window["trained"] / seconds,
        "tokens_per_s": window["tokens"] / seconds,
        "peak_memory_mb": peak_memory_bytes() / 2**20,
    }
    log.log(step, metrics)
    log.progress.update(
        step,
        f"loss {metrics['loss']:.4f} lr {lr:.2e} gnorm {grad_norm:.3f} "
        f"{metrics['trained_tokens_per_s']:.0f} tok/s mem {metrics['peak_memory_mb']:.0f} MB",
    )
    for key in window:
        window[key] = 0.0

