"""The training loop: plain PyTorch, one function (:func:`train`), readable top to bottom.

Why not Hugging Face ``Trainer``: this loop must later run DDP/FSDP2 through ``torch.distributed``
on CPU ranks so that "N ranks ≡ 1 rank" is testable, and it must normalize the loss over every
trained token of an optimizer step (see "Token-exact loss" below), which ``Trainer`` does not
do for packed, accumulated batches. The shape follows torchtune's single-device recipe: builders
produce the pieces (sampler, collator, optimizer, scheduler, logger), and the loop only wires them.

One optimizer step::

    micro-batches = this rank's share of the next gradient_accumulation_steps × ranks index
                    lists of the sampler, collated
    n_step        = trained tokens of the whole step, summed over the ranks
    for each micro-batch:  (loss_fn(micro-batch) * world_size / n_step).backward()
    stop if the loss is NaN/inf (or above loss_watchdog_threshold for loss_watchdog_patience
    steps in a row) — before the update
    clip the gradient norm, optimizer.step(), scheduler.step()
    watch for a dead or exploding run (see :class:`_Watchdog`): warn once, remember why
    log; evaluate / checkpoint when the schedule says so; after early_stopping_patience
    evaluations without a lower eval_loss, end the run as if it were its last step

Token-exact loss. The quantity trained on is the mean cross-entropy over **every trained token of
one optimizer step**: the same number whether the step is one big batch or many micro-batches,
packed or padded, on one rank or many. A mean of per-micro-batch means is *not* that number (a
micro-batch with 10 trained tokens would weigh as much as one with 1000, so the gradient would
depend on how the data happened to be split). So the loss function returns a **sum**, and every
micro-batch is divided by the trained tokens of the whole step, known before the first backward
because the micro-batches are drawn first. Data-parallel engines *average* gradients over the W
ranks, so each rank scales by W: the averaged gradient is ``Σ_r grad(loss_sum_r) / N``, exact. A
step without a trained token divides by 1 (its loss sum is 0: a zero gradient, not NaN).
"Trained token" means a label != -100 *after the shift*; the collator counts exactly those.

Everything that can be decided before the first step is: the number of steps (exact per epoch,
see :func:`plan_steps`), the steps that evaluate and the steps that save (:func:`scheduled_steps`),
the loss function and the autocast context. So the learning-rate schedule, the progress bar and
resume agree with what actually runs, and the loop body does only the work of a step.

Many ranks. The loop never branches on the strategy's name. A
:class:`~hellbender.distributed.world.World` gives the rank, the world size and a sum all-reduce
(single-process: the identity); a :class:`~hellbender.distributed.parallel.Parallel` (DDP, FSDP2,
or the plain model) runs forward and backward, keeps gradients local until a step's last
micro-batch, computes the global gradient norm, and gathers what a checkpoint saves. Every rank
draws the same micro-batches from the same sampler and takes its share of each step
(:func:`rank_batches`), so N ranks with ``gradient_accumulation_steps`` G train exactly what one
process with N × G does (tests/invariants/test_distributed.py). With context parallelism the
micro-batches are dealt by data-parallel rank, each rank of a CP group takes its share of the
sequence (:func:`batching`) and its share's trained-token count, and :class:`Forward` feeds the
share with its ring/Ulysses context: the token sums and the ``world.size`` scaling above stay
exact as they are (tests/invariants/test_context_parallel_training.py).

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
import functools
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hellbender.config.schema import MAX_EPOCHS, ResolvedConfig
from hellbender.data.errors import EmptyTrainingSetError
from hellbender.data.packing import BatchSampler, Collator
from hellbender.data.tokenize import IGNORE_INDEX
from hellbender.distributed.context_parallel import ShardingCollator, TrainingInputs, plan_from_config
from hellbender.distributed.parallel import Parallel, wrap_model
from hellbender.distributed.world import World, rank_device
from hellbender.errors import HellbenderError, OptionError
from hellbender.kernels import LossFn, activation_offloading, build_loss
from hellbender.models.attention import attention_name, model_inputs
from hellbender.plan.estimate import predicted_peak_bytes
from hellbender.train import checkpoint as ckpt
from hellbender.train.hub import ModelPusher, pushes_model
from hellbender.train.metrics import METRICS_FILE, RunLogger, peak_memory_bytes
from hellbender.train.optim import build_optimizer, build_scheduler, freeze_except
from hellbender.train.run_config import check_resume_config, resolved_config_text
from hellbender.train.samples import eval_prompts, generate, write_samples

Autocast = Callable[[], AbstractContextManager[Any]]
# rows of samples → one collated micro-batch (a Collator, or its context-parallel share)
Collate = Callable[[Sequence[Sequence[Mapping[str, Any]]]], dict[str, Any]]

logger = logging.getLogger(__name__)

# Consecutive steps a sign of divergence must last before the watchdog reports it (the same idea
# as loss_watchdog_patience, which counts steps above the user's loss_watchdog_threshold).
WATCHDOG_PATIENCE = 3
# A loss this many times its first value (at least EXPLOSION_FACTOR × 0.1) has exploded.
EXPLOSION_FACTOR = 100.0


class TrainingStopped(HellbenderError, RuntimeError):
    """The run was stopped on purpose (NaN/inf loss, loss watchdog); the last checkpoint is intact."""


@dataclass
class TrainResult:
    global_step: int
    total_steps: int
    losses: dict[int, float] = field(default_factory=dict)  # step → mean loss over trained tokens
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    checkpoints: list[Path] = field(default_factory=list)
    resumed_from: Path | None = None
    trained_tokens: int = 0  # tokens that contributed to the loss, in the steps this call ran
    diverged: str | None = None  # why the watchdog thinks the run diverged (it ran on), else None
    stopped_early: int | None = None  # the step early_stopping_patience ended the run at, else None
    best_step: int | None = None  # the step whose weights are the final ones (load_best_model_at_end)
    # A run spread over ranks: its final weights gathered whole on rank 0 (what to save; {} on
    # the other ranks). None in one process, where the model's own tensors are whole.
    final_weights: dict[str, torch.Tensor] | None = None


# ---------------------------------------------------------------- data


class Samples:
    """Row access for a ``datasets.Dataset`` or a list of dicts (``input_ids``, ``labels``).

    A Dataset is read with one columnar ``ds[indices]`` per micro-batch: per-row ``ds[i]`` costs a
    Python round trip per sample, which dominates a tiny model's step.
    """

    def __init__(self, data: Any) -> None:
        self.data = data
        self._columnar = hasattr(data, "column_names")
        self.lengths: list[int]
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
        samples: list[Mapping[str, Any]] = [
            {"input_ids": a, "labels": b} for a, b in zip(cols["input_ids"], cols["labels"], strict=True)
        ]
        out: list[list[Mapping[str, Any]]] = []
        pos = 0
        for row in micro_batch:
            out.append(samples[pos : pos + len(row)])
            pos += len(row)
        return out


def batching(
    samples: Samples,
    cfg: ResolvedConfig,
    pad_token_id: int,
    *,
    evaluation: bool = False,
    world: World = World(),
) -> tuple[BatchSampler, Collate]:
    """The sampler and collator of the training (or, with ``evaluation``, the eval) data.

    With ``pad_to_sequence_len`` every batch is (micro_batch_size, sequence_len): an epoch's short
    last micro-batch gets filler rows (no trained token) rather than a new shape or dropped samples.
    With context parallelism (``world.cp_size`` > 1) a batch is this rank's share of the sequence
    (:class:`~hellbender.distributed.context_parallel.ShardingCollator`).
    """
    rows = cfg.eval_batch_size if evaluation else cfg.micro_batch_size
    sampler = BatchSampler(
        samples.lengths,
        sequence_len=cfg.sequence_len,
        micro_batch_size=rows,
        sample_packing=cfg.eval_sample_packing if evaluation else cfg.sample_packing,
        seed=cfg.seed,
        shuffle=not evaluation,
        # HF groups the samples of one optimizer step (all ranks: every rank draws from this sampler)
        length_group=(
            cfg.micro_batch_size * cfg.gradient_accumulation_steps * cfg.data_parallel_size
            if cfg.group_by_length and not evaluation
            else 0
        ),
    )
    collate = Collator(
        pad_token_id,
        sequence_len=cfg.sequence_len,
        pad_to_sequence_len=cfg.pad_to_sequence_len,
        attn_implementation=cfg.attn_implementation,
        micro_batch_size=rows,
    )
    if world.cp_size > 1:
        plan = plan_from_config(cfg)
        return sampler, ShardingCollator(collate, pad_token_id, plan, world.cp_size, world.cp_rank)
    return sampler, collate


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def rank_batches(
    group: Sequence[list[list[int]]], samples: Samples, collate: Collate, world: World, device: torch.device
) -> list[dict[str, Any]]:
    """This rank's micro-batches of ``group`` (the micro-batches every rank takes together),
    collated, on ``device``.

    Data-parallel rank r takes micro-batches r, r + D, r + 2D, … (D data-parallel ranks: all W
    ranks, or W ÷ cp with context parallelism, whose CP group shares each micro-batch and
    ``collate`` cuts it), so the ranks together take each exactly once. When D does not divide the
    group (an epoch's last step), the ranks short of one get a *filler*: a real micro-batch with
    every label ignored and its counts zeroed. It adds nothing to the loss or the gradient, but
    every rank runs the same number of forwards and backwards — which DDP's gradient all-reduce
    and FSDP2's all-gathers require of them.
    """
    mine = list(group[world.dp_rank :: world.dp_size])
    rounds = math.ceil(len(group) / world.dp_size)
    batches = [_to(collate(samples.rows(mb)), device) for mb in mine]
    if len(mine) < rounds:
        batches.append(_filler(_to(collate(samples.rows(group[0])), device)))
    return batches


def _filler(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` trained on nothing: every label ignored, no token counted."""
    ignored: dict[str, Any] = {
        k: torch.full_like(batch[k], IGNORE_INDEX) for k in ("labels", "shift_labels") if k in batch
    }
    return {
        **batch,
        **ignored,
        "num_trained_tokens": torch.zeros_like(batch["num_trained_tokens"]),
        "num_tokens": torch.zeros_like(batch["num_tokens"]),
    }


# ---------------------------------------------------------------- what runs when, decided up front


@dataclass(frozen=True)
class StepPlan:
    """The optimizer steps of the run, per epoch, known before the first one runs."""

    steps_per_epoch: list[int]  # steps that run in each epoch (the last may be cut short)
    epoch_lengths: list[int]  # steps a whole epoch has (per-epoch schedules place events on it)

    @property
    def total(self) -> int:
        return sum(self.steps_per_epoch)


def plan_steps(sampler: BatchSampler, cfg: ResolvedConfig) -> StepPlan:
    """Optimizer steps of every epoch that will run, exact, before training starts.

    An epoch's last step may hold fewer than ``gradient_accumulation_steps`` micro-batches (the
    loss stays exact: it is normalized by the trained tokens actually in the step). A fractional
    ``num_epochs`` runs that fraction of the last epoch's steps. ``max_steps`` caps the total; set
    alone (``epochs_given`` false) it repeats epochs until reached, as in the HF Trainer.

    One step takes ``gradient_accumulation_steps`` micro-batches on each data-parallel rank, so
    ``gradient_accumulation_steps × data_parallel_size`` of the epoch's micro-batches.
    """
    accumulation = cfg.gradient_accumulation_steps * cfg.data_parallel_size
    limit = cfg.max_steps if cfg.max_steps is not None else math.inf
    epoch_limit = cfg.num_epochs if cfg.epochs_given else math.inf
    steps_per_epoch: list[int] = []
    epoch_lengths: list[int] = []
    total = 0  # running sum: max_steps may be 10^9, so no re-summing per epoch
    while len(steps_per_epoch) < epoch_limit and total < limit:
        if len(steps_per_epoch) >= MAX_EPOCHS:
            # Only max_steps set, on a small training set: each epoch re-packs the data, so
            # a plan of millions of epochs would hang before the first step. Say so instead.
            raise OptionError(
                f"max_steps {cfg.max_steps} needs more than {MAX_EPOCHS} passes over this training "
                f"set ({total} steps in the first {MAX_EPOCHS}); lower max_steps or add data"
            )
        sampler.set_epoch(len(steps_per_epoch))
        length = math.ceil(len(sampler) / accumulation)
        if length == 0:
            raise EmptyTrainingSetError("the training set is empty: no micro-batch to train on")
        steps = length
        fraction = epoch_limit - len(steps_per_epoch)
        if fraction < 1:
            steps = max(1, math.ceil(steps * fraction))
        runs = int(min(steps, limit - total))
        steps_per_epoch.append(runs)
        epoch_lengths.append(length)
        total += runs
    return StepPlan(steps_per_epoch, epoch_lengths)


def step_interval(every: float, total: int) -> int:
    """Steps between two events given as ``*_steps``: a count, or below 1 a fraction of the run's
    ``total`` steps (as in the HF Trainer, whose configs use both)."""
    return max(1, math.ceil(every * total) if every < 1 else int(every))


def scheduled_steps(
    plan: StepPlan,
    *,
    strategy: str | None,
    every: float | None,
    per_epoch: int | None,
    default_epoch_end: bool,
) -> frozenset[int]:
    """The global steps on which an evaluation (or a checkpoint) falls.

    ``strategy`` ``no`` never, ``epoch`` at each epoch's end; else ``every`` N steps (< 1: that
    fraction of all steps, HF's convention), else ``per_epoch`` events spread evenly over each
    epoch (the last at its end), else at each epoch's end if ``default_epoch_end``. An epoch cut
    short by ``num_epochs`` or ``max_steps`` never reaches its end.
    """
    if strategy == "no":
        return frozenset()
    if strategy != "epoch" and every is not None:
        interval = step_interval(every, plan.total)
        return frozenset(range(interval, plan.total + 1, interval))
    due: set[int] = set()
    before = 0  # global steps of the earlier epochs
    for runs, length in zip(plan.steps_per_epoch, plan.epoch_lengths, strict=True):
        if strategy != "epoch" and per_epoch is not None:
            in_epoch = {max(1, round(k * length / per_epoch)) for k in range(1, per_epoch + 1)}
        elif strategy == "epoch" or default_epoch_end:
            in_epoch = {length}
        else:
            in_epoch = set()
        due |= {before + s for s in in_epoch if s <= runs}
        before += runs
    return frozenset(due)


# ---------------------------------------------------------------- forward, built once


def autocast_for(cfg: ResolvedConfig, model: torch.nn.Module, device: torch.device) -> Autocast:
    """The precision context of every forward: autocast to the compute dtype when the trainable
    weights are kept in fp32 (fp32 master weights), else nothing. Decided once, at setup."""
    dtype = getattr(torch, cfg.compute_dtype)
    trainable = next((p for p in model.parameters() if p.requires_grad), None)
    if dtype == torch.float32 or trainable is None or trainable.dtype != torch.float32:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class Forward:
    """Everything a forward pass needs that does not change between micro-batches.

    ``inputs`` turns a collated micro-batch into the model's keyword arguments and ``targets`` names
    the batch's loss targets: the attention backend's masks and ``labels``, or — with context
    parallelism — this rank's share with its ring/Ulysses context and the pre-shifted
    ``shift_labels`` (:class:`~hellbender.distributed.context_parallel.TrainingInputs`). Chosen once
    at setup, so :meth:`loss_sum` is the same code for both.
    """

    loss_fn: LossFn
    autocast: Autocast
    inputs: Callable[[Mapping[str, Any]], Mapping[str, Any]]
    targets: str = "labels"

    @classmethod
    def build(
        cls,
        cfg: ResolvedConfig,
        model: torch.nn.Module,
        device: torch.device | None = None,
        world: World = World(),
    ) -> Forward:
        device = device or next(model.parameters()).device
        shifted = world.cp_size > 1
        inputs: Callable[[Mapping[str, Any]], Mapping[str, Any]] = (
            TrainingInputs(plan_from_config(cfg), world.cp_group)
            if shifted
            else functools.partial(
                model_inputs,
                attn_implementation=attention_name(model, cfg.attn_implementation),
                dtype=getattr(torch, cfg.compute_dtype),
            )
        )
        return cls(
            loss_fn=build_loss(
                cfg.loss_method, num_chunks=cfg.chunked_cross_entropy_num_chunks, shifted=shifted
            ),
            autocast=autocast_for(cfg, model, device),
            inputs=inputs,
            targets="shift_labels" if shifted else "labels",
        )

    def loss_sum(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """fp32 sum of the loss over the micro-batch's trained tokens."""
        with self.autocast():
            return self.loss_fn(model, self.inputs(batch), batch[self.targets])


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: Any,
    cfg: ResolvedConfig,
    pad_token_id: int,
    *,
    world: World = World(),
    forward: Forward | None = None,
    loss_sum: Callable[[Mapping[str, Any]], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean loss over every trained token of ``data`` (and its perplexity), ``eval_batch_size`` rows.

    Spread over ranks, each evaluates its share of the micro-batches (:func:`rank_batches`) and
    the sums are added up: every rank returns the same numbers. ``loss_sum``: how a batch's loss
    is computed (a training run's :meth:`~hellbender.distributed.parallel.Parallel.loss_sum`);
    default ``forward`` (built from ``cfg`` if not given) on ``model``.
    """
    samples = data if isinstance(data, Samples) else Samples(data)
    sampler, collate = batching(samples, cfg, pad_token_id, evaluation=True, world=world)
    if loss_sum is None:
        loss_sum = functools.partial((forward or Forward.build(cfg, model)).loss_sum, model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, tokens = 0.0, 0.0
    micro_batches = list(sampler)
    for first in range(0, len(micro_batches), world.dp_size):
        # One micro-batch per rank at a time: only this rank's and, at most, one filler in memory.
        group = micro_batches[first : first + world.dp_size]
        for batch in rank_batches(group, samples, collate, world, device):
            total_loss += float(loss_sum(batch))
            tokens += float(batch["num_trained_tokens"])
    model.train(was_training)
    total_loss, tokens = world.all_reduce_sum(total_loss), world.all_reduce_sum(tokens)
    loss = total_loss / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 80.0)), "eval_tokens": tokens}


# ---------------------------------------------------------------- the loop


@dataclass
class _Step:
    """One optimizer step's worth of data: where it sits in the epoch and its micro-batches."""

    epoch: int
    first: int  # index of its first micro-batch in the epoch
    micro_batches: list[list[list[int]]]
    epoch_length: int  # optimizer steps of the whole epoch

    @property
    def done(self) -> int:
        """Micro-batches of the epoch consumed after this step (the data position to save)."""
        return self.first + len(self.micro_batches)

    def epoch_progress(self, accumulation: int) -> float:
        """Epochs completed after this step, fractional (for the log)."""
        return self.epoch + math.ceil(self.done / accumulation) / self.epoch_length


def _remaining_steps(
    sampler: BatchSampler, plan: StepPlan, accumulation: int, state: ckpt.TrainState
) -> Iterator[_Step]:
    """Yield the optimizer steps still to run, starting at the saved data position."""
    for epoch in range(state.epoch, len(plan.steps_per_epoch)):
        sampler.set_epoch(epoch)
        micro_batches = list(sampler)
        start = state.micro_batches_done if epoch == state.epoch else 0
        end = min(len(micro_batches), plan.steps_per_epoch[epoch] * accumulation)
        for first in range(start, end, accumulation):
            yield _Step(epoch, first, micro_batches[first : first + accumulation], plan.epoch_lengths[epoch])


class _StepData(torch.utils.data.Dataset[list[dict[str, Any]]]):
    """Step ``i`` → this rank's collated micro-batches of ``steps[i]``, on the CPU (what a
    DataLoader worker builds)."""

    def __init__(self, steps: list[_Step], samples: Samples, collate: Collate, world: World) -> None:
        self.steps, self.samples, self.collate, self.world = steps, samples, collate, world

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        group = self.steps[index].micro_batches
        return rank_batches(group, self.samples, self.collate, self.world, torch.device("cpu"))


def _as_is(item: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return item


def _step_batches(run: _Run, group: int) -> Iterator[tuple[_Step, list[dict[str, Any]]]]:
    """Each remaining step with this rank's collated micro-batches, on the run's device.

    ``dataloader_num_workers`` 0: collated here, when the step runs. Otherwise a torch DataLoader
    collates the steps in worker processes, ``dataloader_prefetch_factor`` steps ahead per worker,
    into page-locked memory when ``dataloader_pin_memory`` and the run is on CUDA (elsewhere
    pinning does nothing). The loader only maps step i to its batches, in order: the steps, their
    micro-batches and hence the losses are the same with or without workers.
    """
    cfg = run.cfg
    steps = _remaining_steps(run.sampler, run.plan, group, run.state)
    if cfg.dataloader_num_workers == 0:
        for item in steps:
            yield item, rank_batches(item.micro_batches, run.samples, run.collate, run.world, run.device)
        return
    items = list(steps)
    loader = torch.utils.data.DataLoader(
        _StepData(items, run.samples, run.collate, run.world),
        batch_size=None,
        shuffle=False,
        collate_fn=_as_is,
        num_workers=cfg.dataloader_num_workers,
        pin_memory=cfg.dataloader_pin_memory and run.device.type == "cuda",
        prefetch_factor=cfg.dataloader_prefetch_factor,
    )
    for item, batches in zip(items, loader, strict=True):
        yield item, [_to(batch, run.device) for batch in batches]


@dataclass
class _LogWindow:
    """What accumulates between two log lines (``logging_steps`` optimizer steps)."""

    loss_sum: float = 0.0  # Σ loss × trained tokens
    trained: float = 0.0
    tokens: float = 0.0
    seconds: float = 0.0

    def add(self, loss: float, trained: float, tokens: float, seconds: float) -> None:
        self.loss_sum += loss * trained
        self.trained += trained
        self.tokens += tokens
        self.seconds += seconds


class _Run:
    """One training run: its pieces, and everything decided before its first step.

    Built once by :func:`train`: the sampler and the exact step plan, the steps that evaluate and
    save, the loss function and autocast context (:class:`Forward`), the optimizer, scheduler and
    loss scaler, the restored state of a resumed run, and the logger.
    """

    def __init__(
        self,
        cfg: ResolvedConfig,
        model: torch.nn.Module,
        train_data: Any,
        eval_data: Any | None,
        *,
        pad_token_id: int,
        out: Path,
        resume_from: Path | None,
        world: World,
        tokenizer: Any | None = None,
    ) -> None:
        self.cfg, self.model, self.out, self.pad_token_id, self.world = cfg, model, out, pad_token_id, world
        self.tokenizer = tokenizer
        # The hub repository is created before the first step: a run that cannot push fails now.
        self.hub = ModelPusher(cfg) if pushes_model(cfg) and world.is_main else None
        if world.size != cfg.world_size:
            raise OptionError(
                f"this run has {world.size} rank(s) but its config was resolved for world_size "
                f"{cfg.world_size}: load the config in the process that trains (WORLD_SIZE is read then)"
            )
        if world.cp_size != cfg.context_parallel_size:
            raise OptionError(
                f"this run's ranks form context-parallel groups of {world.cp_size} but its config asks for "
                f"context_parallel_size {cfg.context_parallel_size}: join the ranks with "
                "hellbender.distributed.world.process_group(timeout, cfg.context_parallel_size)"
            )
        # A rank whose model is still on the meta device (rank 0 alone loaded the weights, which
        # reach this rank when the model is sharded) runs on its own device.
        self.device = next(model.parameters()).device
        if self.device.type == "meta":
            self.device = rank_device(world)
        self.samples = Samples(train_data)
        self.eval_samples = Samples(eval_data) if eval_data is not None and len(eval_data) else None
        if cfg.save_strategy == "best" and self.eval_samples is None:
            raise OptionError("save_strategy: best needs an evaluation set (val_set_size or test_datasets)")
        self.sampler, self.collate = batching(self.samples, cfg, pad_token_id, world=world)
        self.plan = plan_steps(self.sampler, cfg)
        self.eval_at: frozenset[int] = frozenset()  # global steps that evaluate
        if self.eval_samples is not None and cfg.eval_strategy != "no":  # and always after the last step
            self.eval_at = frozenset({self.plan.total}) | scheduled_steps(
                self.plan,
                strategy=cfg.eval_strategy,
                every=cfg.eval_steps,
                per_epoch=cfg.evals_per_epoch,
                default_epoch_end=False,
            )
        self.save_at: frozenset[int] = frozenset()  # global steps that checkpoint (best: decided at eval)
        if cfg.save_strategy != "best":
            self.save_at = scheduled_steps(
                self.plan,
                strategy=cfg.save_strategy,
                every=cfg.save_steps,
                per_epoch=cfg.saves_per_epoch,
                default_epoch_end=True,
            )
        if resume_from is not None:
            _check_same_plan(resume_from, self.plan, cfg)
            if not ckpt.is_sharded(resume_from):
                # Into the whole model on every rank, before it is spread over them.
                ckpt.load_model_weights(model, resume_from)
        self.forward = Forward.build(cfg, model, self.device, world)
        # DDP wraps the model; FSDP2 replaces its parameters by shards: before the optimizer.
        self.parallel: Parallel = wrap_model(model, cfg, world, self.device, self.forward.loss_sum)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg, model)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.plan.total)
        self.parallel.prepare(self.optimizer)  # DeepSpeed starts its engine on the optimizer
        # fp16 needs loss scaling (its range underflows small gradients); bf16 and fp32 do not.
        # DeepSpeed scales fp16 losses itself (its fp16 block).
        fp16 = cfg.compute_dtype == "float16" and not self.parallel.steps_itself
        self.scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.state = ckpt.TrainState(
            total_steps=self.plan.total,
            plan={
                "steps_per_epoch": self.plan.steps_per_epoch,
                "accumulation": cfg.gradient_accumulation_steps,
            },
        )
        if resume_from is not None:
            self.state = ckpt.load_checkpoint(
                resume_from,
                model,
                self.optimizer,
                self.scheduler,
                scaler=self.scaler,
                restore=functools.partial(self.parallel.restore, self.optimizer),
            )
        self.log = RunLogger(
            cfg,
            out,
            total_steps=self.plan.total,
            initial_step=self.state.global_step,
            enabled=world.is_main,
            history=_metrics_history(resume_from),
        )
        if self.state.global_step == 0:  # a resumed run's file already holds its plan record
            _log_plan(self.log, self.sampler, self.plan, cfg)

    def save(self) -> Path | None:
        """Checkpoint the run at its current step: every rank gathers, the main rank writes.

        The other ranks go on only once the checkpoint is complete (or stop at once if writing
        failed on the main rank), so no rank is ever past a checkpoint that does not exist.
        """
        optimizer = None if self.cfg.save_only_model else self.optimizer
        weights, optimizer_state = None, None
        if self.parallel.shards_checkpoint(optimizer is not None):  # every rank writes its shards
            tmp = ckpt.temporary_checkpoint(self.out, self.state.global_step)
            with self.world.main_first("preparing a checkpoint folder"):
                if self.world.is_main:
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
            self.parallel.write_sharded(optimizer, tmp)
        else:
            weights = self.parallel.full_weights(trainable_only=self.parallel.trainable_only)
            if optimizer is not None:
                optimizer_state = self.parallel.optimizer_state(optimizer)
        path = None
        with self.world.main_first("writing a checkpoint"):
            if self.world.is_main:
                path = ckpt.save_checkpoint(
                    self.out,
                    self.model,
                    self.optimizer,
                    self.scheduler,
                    self.state,
                    scaler=self.scaler,
                    save_only_model=self.cfg.save_only_model,
                    save_total_limit=self.cfg.save_total_limit,
                    metrics_file=self.out / METRICS_FILE,
                    resolved_config=resolved_config_text(self.cfg),
                    weights=weights,
                    optimizer_state=optimizer_state,
                    sharded=self.parallel.shards_checkpoint(optimizer is not None),
                )
                if self.hub is not None:
                    self.hub.checkpoint_saved(path, self.state.global_step)
        return path

    def evaluate(self, step: int) -> dict[str, float]:
        """Evaluate and log the result."""
        metrics = evaluate(
            self.parallel.module,
            self.eval_samples,
            self.cfg,
            self.pad_token_id,
            world=self.world,
            loss_sum=self.parallel.loss_sum,
        )
        self.log.log(step, metrics)
        self.log.progress.message(
            f"eval step {step}: loss {metrics['eval_loss']:.4f} ppl {metrics['eval_ppl']:.2f}"
        )
        if self.cfg.eval_table_size and self.eval_samples is not None and self.world.is_main:
            self.write_eval_samples(step, self.eval_samples, self.cfg.eval_table_size)
        return metrics

    def write_eval_samples(self, step: int, samples: Samples, count: int) -> Path:
        """Greedy generations for the first ``count`` eval prompts (main rank only: the model is
        whole there, rule HB182), written next to the metrics."""
        rows = (samples.rows([[i]])[0][0] for i in range(len(samples)))
        prompts = eval_prompts(rows, count)
        completions = generate(
            self.model,
            prompts,
            max_new_tokens=self.cfg.eval_max_new_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=getattr(self.tokenizer, "eos_token_id", None),
            autocast=self.forward.autocast(),
        )
        path = write_samples(self.out, step, prompts, completions, self.tokenizer)
        self.log.progress.message(f"eval step {step}: {len(prompts)} sample generations in {path.name}")
        return path


def train(
    cfg: ResolvedConfig,
    model: torch.nn.Module,
    train_data: Any,
    eval_data: Any | None,
    *,
    pad_token_id: int,
    output_dir: Path | None = None,
    resume_from: Path | None = None,
    world: World = World(),
    tokenizer: Any | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train_data`` (tokenized rows) and return what happened.

    Checkpoints go to ``output_dir`` (default ``cfg.output_dir``); ``resume_from`` is a checkpoint
    folder to continue from exactly; ``tokenizer`` (optional) decodes the ``eval_table_size``
    generations into text. Memory options that patch the model (checkpointing, kernels)
    are applied by the caller (:func:`hellbender.kernels.apply_optimizations`); final outputs are
    written by :func:`hellbender.commands.train.run_train`.
    """
    out = Path(output_dir or cfg.output_dir)
    if cfg.unfrozen_parameters:
        # Before the model is wrapped and the optimizer built: both see only what trains.
        unfrozen = freeze_except(model, cfg.unfrozen_parameters)
        if world.is_main:
            tensors = sum(1 for _ in model.parameters())
            logger.info("unfrozen_parameters: %d of %d parameter tensors train", len(unfrozen), tensors)
    run = _Run(
        cfg,
        model,
        train_data,
        eval_data,
        pad_token_id=pad_token_id,
        out=out,
        resume_from=resume_from,
        world=world,
        tokenizer=tokenizer,
    )
    result = TrainResult(run.state.global_step, run.plan.total, resumed_from=resume_from)
    group = cfg.gradient_accumulation_steps * cfg.data_parallel_size  # micro-batches per step, all ranks
    window = _LogWindow()
    watchdog = _Watchdog(trainable=bool(run.params))
    high_loss_steps = 0  # in a row above loss_watchdog_threshold
    best = _BestWeights(run, resume_from) if cfg.load_best_model_at_end else None
    model.train()
    try:
        for item, batches in _step_batches(run, group):
            t0 = time.perf_counter()
            loss, trained, tokens = _accumulate_gradients(run.parallel, batches, cfg, run.scaler)
            step = run.state.global_step + 1
            # before the update: the weights stay good
            high_loss_steps = _stop_if_diverged(cfg, loss, step, run.log, high_loss_steps)
            lr = float(run.scheduler.get_last_lr()[0])  # typed float | Tensor; our schedules give floats
            grad_norm = _optimizer_step(run, step, loss)
            run.scheduler.step()
            if result.diverged is None:
                result.diverged = watchdog.check(step, loss, grad_norm, trained)
                if result.diverged is not None:
                    _warn_diverged(run.log, step, result.diverged)

            run.state.global_step, run.state.epoch, run.state.micro_batches_done = step, item.epoch, item.done
            result.global_step, result.losses[step] = step, loss
            result.trained_tokens += int(trained)
            window.add(loss, trained, tokens, time.perf_counter() - t0)
            if step % step_interval(cfg.logging_steps, run.plan.total) == 0 or step == run.plan.total:
                memory = _memory_check(cfg, model) if step == run.plan.total else None
                _log_train(run.log, window, step, item.epoch_progress(group), lr, grad_norm, memory)
                window = _LogWindow()
            stop_early = False
            if step in run.eval_at:
                metrics = result.evals[step] = run.evaluate(step)
                best_loss = run.state.best_eval_loss
                if best_loss is None or metrics["eval_loss"] < best_loss:
                    run.state.best_eval_loss, run.state.best_step = metrics["eval_loss"], step
                    run.state.evals_without_improvement = 0
                    if best is not None:
                        best.keep(step)
                    if cfg.save_strategy == "best":
                        _keep(result, run.save())
                else:
                    run.state.evals_without_improvement += 1
                stop_early = _early_stop(run, step)
            if step in run.save_at:
                _keep(result, run.save())
            if stop_early:
                if window.seconds > 0:  # steps since the last log line: logged, not lost
                    memory = _memory_check(cfg, model)
                    _log_train(run.log, window, step, item.epoch_progress(group), lr, grad_norm, memory)
                result.stopped_early = step
                break
        result.final_weights = run.parallel.full_weights(trainable_only=run.parallel.trainable_only)
        if best is not None:
            result.best_step = best.restore(result)
    finally:
        run.log.close()
    return result


def _accumulate_gradients(
    parallel: Parallel,
    batches: list[dict[str, Any]],
    cfg: ResolvedConfig,
    scaler: torch.amp.GradScaler | None,
) -> tuple[float, float, float]:
    """Forward + backward this rank's micro-batches of one step, token-exact (see the module
    docstring); gradients are averaged over the ranks in the last backward only.

    Returns the step's loss (mean over its trained tokens, all ranks), its trained tokens and its
    real tokens (both summed over the ranks).
    """
    world = parallel.world
    n_step = world.all_reduce_sum(float(sum(int(b["num_trained_tokens"]) for b in batches)))
    step_loss_sum = 0.0
    for index, batch in enumerate(batches):
        # Offloading (when configured) must see both the forward that saves activations and the
        # backward that reads them back.
        last = index == len(batches) - 1
        with activation_offloading(parallel.model, cfg.activation_offloading), parallel.gradient_sync(last):
            part = parallel.loss_sum(batch)
            scaled = part * world.size / max(n_step, 1.0)
            parallel.backward(scaler.scale(scaled) if scaler else scaled)
        step_loss_sum += float(part.detach())
    loss = world.all_reduce_sum(step_loss_sum) / max(n_step, 1.0)
    tokens = world.all_reduce_sum(float(sum(int(b["num_tokens"]) for b in batches)))
    return loss, n_step, tokens


def _keep(result: TrainResult, checkpoint: Path | None) -> None:
    if checkpoint is not None:
        result.checkpoints.append(checkpoint)


def _metrics_history(resume_from: Path | None) -> Path | None:
    """The resumed run's metrics up to its step: the copy in the checkpoint, or (checkpoints
    written before they carried one) the file of the folder it sits in. The new output_dir may be
    empty."""
    if resume_from is None:
        return None
    history = resume_from / METRICS_FILE
    return history if history.is_file() else resume_from.parent / METRICS_FILE


def _log_plan(log: RunLogger, sampler: BatchSampler, plan: StepPlan, cfg: ResolvedConfig) -> None:
    """Say what the run will do before it does it: steps, and how full the rows are.

    The packing efficiency (real tokens / rows × sequence_len, of the first epoch) is the fraction
    of compute spent on real tokens when rows are padded to ``sequence_len``; a low value means
    sample_packing (or a shorter sequence_len) would train faster. Recorded as step 0 of
    ``metrics.jsonl`` (and the other sinks) so it stays with the run's numbers.
    """
    sampler.set_epoch(0)  # plan_steps left it at the last epoch; epoch 0 is iterated first anyway
    epochs = len(plan.steps_per_epoch)
    record = {
        "packing_efficiency": sampler.efficiency(),
        "total_steps": plan.total,
        "epochs": epochs,
        "rows_per_epoch": sampler.num_rows(),
        "micro_batches_per_epoch": len(sampler),
    }
    log.log(0, record)
    log.progress.message(
        f"plan: {plan.total} optimizer steps over {epochs} epoch(s); {sampler.num_rows()} rows of up to "
        f"{cfg.sequence_len} tokens in {len(sampler)} micro-batches per epoch; packing efficiency "
        f"{record['packing_efficiency']:.1%} (sample_packing {'on' if cfg.sample_packing else 'off'})"
    )


def _check_same_plan(resume_from: Path, plan: StepPlan, cfg: ResolvedConfig) -> None:
    """Refuse a resume that cannot continue the checkpointed run: another step plan (the data
    itself may have changed under the same config), or settings a resume cannot honour
    (:func:`hellbender.train.run_config.check_resume_config`; ``run_train`` checks those before
    loading anything and reports the accepted ones, this covers every caller of :func:`train`)."""
    previous = ckpt.read_state(resume_from)
    if previous.plan.get("steps_per_epoch") != plan.steps_per_epoch:
        raise ckpt.CheckpointError(
            f"{resume_from} belongs to a run planned as {previous.plan.get('steps_per_epoch')} steps per "
            f"epoch, but this config plans {plan.steps_per_epoch}: data, batch size, sequence_len or the run "
            "length changed, so the run cannot continue exactly. Start a new output_dir instead."
        )
    check_resume_config(cfg, resume_from)


def _optimizer_step(run: _Run, step: int, loss: float) -> float:
    """Clip and apply the accumulated gradients; return the gradient norm before clipping.

    A non-finite norm stops the run — except under fp16 loss scaling, where an overflow is
    expected now and then: the scaler skips that update and lowers the scale.
    """
    optimizer, scaler = run.optimizer, run.scaler
    if run.parallel.steps_itself:  # DeepSpeed: clips and steps in its engine, skips a non-finite step
        norm = run.parallel.optimizer_step()
        if not math.isfinite(norm) and run.cfg.compute_dtype != "float16":  # fp16: its scaler's skip
            _stop(
                run.log,
                step,
                f"the gradient norm is {norm} at step {step} (loss {loss:.4f})",
                compute_dtype=run.cfg.compute_dtype,
            )
        return norm
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm, norm = run.parallel.grad_norm(run.params)
    if not math.isfinite(norm) and scaler is None:
        _stop(
            run.log,
            step,
            f"the gradient norm is {norm} at step {step} (loss {loss:.4f})",
            compute_dtype=run.cfg.compute_dtype,
        )
    if run.cfg.max_grad_norm:
        torch.nn.utils.clip_grads_with_norm_(run.params, run.cfg.max_grad_norm, grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def stop_message(reason: str, *, compute_dtype: str) -> str:
    """What a stopped run says; fp16 overflow is a likely cause only when computing in fp16."""
    causes = (
        "a learning rate too high for this model, a bad sample, or fp16 overflow"
        if compute_dtype == "float16"
        else "a learning rate too high for this model or a bad sample"
    )
    return (
        f"training stopped: {reason}. Nothing from this step was applied and the last checkpoint is "
        f"intact. Likely causes: {causes}; lower learning_rate, set max_grad_norm, or resume from the "
        "last checkpoint."
    )


def _stop(log: RunLogger, step: int, reason: str, *, compute_dtype: str) -> None:
    message = stop_message(reason, compute_dtype=compute_dtype)
    log.log(step, {"stopped": 1.0})
    log.progress.message(message)
    raise TrainingStopped(message)


def _stop_if_diverged(cfg: ResolvedConfig, loss: float, step: int, log: RunLogger, high_steps: int) -> int:
    """Stop on a NaN/inf loss, or once the loss has exceeded ``loss_watchdog_threshold`` for
    ``loss_watchdog_patience`` steps in a row (default 1: the first); return that run of steps."""
    if not math.isfinite(loss):
        log.log(step, {"loss": loss})
        _stop(log, step, f"the loss is {loss} at step {step}", compute_dtype=cfg.compute_dtype)
    threshold = cfg.loss_watchdog_threshold
    if threshold is None or loss <= threshold:
        return 0
    high_steps += 1
    patience = cfg.loss_watchdog_patience or 1
    if high_steps >= patience:
        log.log(step, {"loss": loss})
        in_a_row = f" for {high_steps} steps in a row" if patience > 1 else ""
        _stop(
            log,
            step,
            f"the loss {loss:.4f} at step {step} exceeds loss_watchdog_threshold {threshold}{in_a_row}",
            compute_dtype=cfg.compute_dtype,
        )
    return high_steps


def _early_stop(run: _Run, step: int) -> bool:
    """True once ``early_stopping_patience`` evaluations in a row have not lowered eval_loss (the
    HF EarlyStoppingCallback's rule, threshold 0); said on the log and in metrics.jsonl."""
    patience = run.cfg.early_stopping_patience
    if patience is None or run.state.evals_without_improvement < patience:
        return False
    run.log.log(step, {"early_stopped": 1.0})
    run.log.progress.message(
        f"early stopping at step {step}: eval_loss has not improved on {run.state.best_eval_loss:.4f} "
        f"(step {run.state.best_step}) for {patience} evaluation(s)"
    )
    return True


class _BestWeights:
    """The trained weights of the best evaluation so far (``load_best_model_at_end``), in host
    memory: the trainable tensors in one process (the frozen ones never change), the gathered
    weights on rank 0 of a run spread over ranks. A run resumed past its best step takes them from
    that step's checkpoint when it is still on disk."""

    def __init__(self, run: _Run, resume_from: Path | None) -> None:
        self.run = run
        # where the best step's checkpoint may be: this run's folder, or the resumed run's
        self.folders = [run.out] + ([resume_from.parent] if resume_from is not None else [])
        self.step: int | None = None
        self.weights: dict[str, torch.Tensor] | None = None
        self.in_model = True  # restored into the model (one process), else as the final weights

    def keep(self, step: int) -> None:
        parallel = self.run.parallel
        # A collective spread over ranks (every rank evaluates, so every rank is here); None in
        # one process, where the model's own tensors are whole.
        gathered = parallel.full_weights(trainable_only=parallel.trainable_only)
        self.in_model = gathered is None
        if gathered is None:
            named = self.run.model.named_parameters()
            gathered = {n: p for n, p in named if p.requires_grad}
        self.weights = {n: t.detach().to("cpu", copy=True) for n, t in gathered.items()}
        self.step = step

    def restore(self, result: TrainResult) -> int | None:
        """Make the best weights the run's final ones; return their step (None: no evaluation)."""
        state = self.run.state
        if state.best_step is None or state.best_step == state.global_step:
            return state.best_step  # the last weights are the best ones
        if self.weights is None or self.step != state.best_step:  # resumed after the best step
            self._from_checkpoint(state.best_step)
        elif self.in_model:
            with torch.no_grad():
                for name, param in self.run.model.named_parameters():
                    if name in self.weights:
                        param.copy_(self.weights[name])
        else:
            result.final_weights = self.weights
        self.run.log.progress.message(
            f"load_best_model_at_end: the final weights are those of step {state.best_step} "
            f"(eval_loss {state.best_eval_loss:.4f})"
        )
        return state.best_step

    def _from_checkpoint(self, step: int) -> None:
        found = [f / f"{ckpt.CHECKPOINT_PREFIX}{step}" for f in self.folders]
        found = [f for f in found if f.is_dir() and not ckpt.is_sharded(f)]
        if self.run.world.size > 1 or not found:
            raise OptionError(
                f"load_best_model_at_end: the best weights (step {step}) were evaluated before this "
                f"run resumed, and no checkpoint-{step} in {', '.join(map(str, self.folders))} holds "
                "them whole to load in one process; the last checkpoint is intact"
            )
        ckpt.load_model_weights(self.run.model, found[0])


class _Watchdog:
    """Notices a run that diverged without a NaN, which the stops above never see.

    * dead: the gradient norm is exactly 0 for :data:`WATCHDOG_PATIENCE` steps in a row although
      there are trainable weights and trained tokens — what a far too high learning rate does once
      it has saturated every activation (the loss then freezes, typically at ln(vocab));
    * exploding: the loss stays above :data:`EXPLOSION_FACTOR` × its first value (this process's
      first step) for :data:`WATCHDOG_PATIENCE` steps in a row.

    Steps without a trained token (their gradient is 0 by construction) are skipped.
    """

    def __init__(self, *, trainable: bool, patience: int = WATCHDOG_PATIENCE) -> None:
        self.trainable, self.patience = trainable, patience
        self.first_loss: float | None = None
        self.zero_steps: list[int] = []
        self.high_steps: list[int] = []

    def check(self, step: int, loss: float, grad_norm: float, trained: float) -> str | None:
        """The reason the run diverged, once the evidence of ``patience`` steps is in; else None."""
        if trained <= 0 or not math.isfinite(loss):
            return None
        if self.first_loss is None:
            self.first_loss = loss
        limit = EXPLOSION_FACTOR * max(self.first_loss, 0.1)
        self.zero_steps = [*self.zero_steps, step] if self.trainable and grad_norm == 0.0 else []
        self.high_steps = [*self.high_steps, step] if loss > limit else []
        if len(self.zero_steps) >= self.patience:
            return (
                f"the gradient norm was exactly 0 for {len(self.zero_steps)} steps in a row (steps "
                f"{self.zero_steps[0]}-{step}, loss {loss:.4f}): the model has stopped learning, "
                "typically after a learning rate far too high; lower learning_rate"
            )
        if len(self.high_steps) >= self.patience:
            return (
                f"the loss stayed above {EXPLOSION_FACTOR:g}× its first value {self.first_loss:.4f} for "
                f"{len(self.high_steps)} steps in a row (steps {self.high_steps[0]}-{step}, loss "
                f"{loss:.4f} at step {step}); lower learning_rate"
            )
        return None


def _warn_diverged(log: RunLogger, step: int, reason: str) -> None:
    """Say it once (main rank): a warning on the log, a ``diverged`` record in metrics.jsonl."""
    if log.enabled:
        logger.warning("WARNING: the run diverged at step %d: %s", step, reason)
        log.log(step, {"diverged": 1.0})


def _memory_check(cfg: ResolvedConfig, model: torch.nn.Module) -> dict[str, float]:
    """Every run checks the memory planner: the predicted and the measured peak side by side, in
    the log and in the last metrics.jsonl record (``hellbender plan`` makes the same prediction
    before launch)."""
    measured = peak_memory_bytes()
    config = getattr(getattr(model, "config", None), "to_dict", None)
    on_gpu = torch.cuda.is_available()
    predicted = predicted_peak_bytes(cfg, config() if config is not None else {}, on_gpu=on_gpu)
    if predicted is None:
        logger.info("memory: measured peak %.0f MiB (not a model hellbender plan models)", measured / 2**20)
        return {"measured_peak_bytes": measured}
    logger.info(
        "memory: predicted peak %.0f MiB, measured %.0f MiB (%+.1f%%)",
        predicted / 2**20,
        measured / 2**20,
        100 * (predicted - measured) / max(measured, 1),
    )
    return {"predicted_peak_bytes": predicted, "measured_peak_bytes": measured}


def _log_train(
    log: RunLogger,
    window: _LogWindow,
    step: int,
    epoch: float,
    lr: float,
    grad_norm: float,
    memory: Mapping[str, float] | None = None,
) -> None:
    seconds = max(window.seconds, 1e-9)
    metrics = {
        "loss": window.loss_sum / max(window.trained, 1.0),
        "lr": lr,
        "grad_norm": grad_norm,
        "epoch": round(epoch, 4),
        "trained_tokens_per_s": window.trained / seconds,
        "tokens_per_s": window.tokens / seconds,
        "peak_memory_mb": peak_memory_bytes() / 2**20,
        **(memory or {}),
    }
    log.log(step, metrics)
    log.progress.update(
        step,
        f"loss {metrics['loss']:.4f} lr {lr:.2e} gnorm {grad_norm:.3f} "
        f"{metrics['trained_tokens_per_s']:.0f} tok/s mem {metrics['peak_memory_mb']:.0f} MB",
    )
