"""Checkpoints that survive being killed at any moment, and resume that reproduces the run exactly.

A checkpoint is a folder ``output_dir/checkpoint-<step>`` holding

* the trainable weights in the same format as the final output (a peft adapter, or the full
  model via ``save_pretrained``; safetensors either way), so any checkpoint can be evaluated,
  merged or used as ``lora_model_dir`` directly;
* ``optimizer.pt`` and ``scheduler.pt`` (``state_dict``s), ``rng.pt`` (python, numpy, torch and
  CUDA generator states) — all loadable with ``torch.load(weights_only=True)``, so resuming
  never unpickles arbitrary objects;
* ``trainer_state.json`` with the step and the data position (epoch, micro-batches consumed);
* a copy of the run's ``metrics.jsonl`` up to this step, so a run resumed into another
  ``output_dir`` still has its whole history (metrics file and loss plot);
* the run's ``config.resolved.yaml``, so a resume can list every setting that changed since
  (:mod:`hellbender.train.run_config`).

Atomicity: everything is written into ``.tmp-checkpoint-<step>``, every file and the folder are
fsynced, and only then is the folder renamed to its final name (``rename`` is atomic on POSIX
filesystems) and the parent fsynced. A folder named ``checkpoint-*`` is therefore always
complete; ``trainer_state.json`` is written last as a second guard (e.g. for folders copied by
hand). Old checkpoints are removed by first renaming them to ``.trash-*``, so a kill during
deletion never leaves a half-deleted folder that looks like a checkpoint.

The final outputs of a run (weights, tokenizer) live directly in ``output_dir`` beside other
files, so they cannot be swapped in as one folder; :func:`publish_files` writes them into
``.tmp-final-output`` first and then moves each file over its old version (see there).

A full disk (:func:`hellbender.files.is_disk_full`) is one
:class:`~hellbender.errors.DiskFullError` naming the path, the space needed and the space free.
The half-written folder is removed at once (its space is what the user needs back); older
checkpoints are only rotated away after a new one is complete, so the newest stays; and a publish
that does not fit says where the trained weights are — the last step's checkpoint, or, when no
checkpoint holds them, a folder in the system's temporary folder they were written to instead.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hellbender.distributed.parallel import DEEPSPEED_DIR, OPTIMIZER_FILE, SHARDED_DIR
from hellbender.errors import DiskFullError, HellbenderError, MissingFileError
from hellbender.files import (
    NEARLY_FULL_BYTES,
    disk_full_error,
    free_bytes,
    is_disk_full,
    is_temporary,
    tree_bytes,
)

if TYPE_CHECKING:
    from torch.nn.modules.module import _IncompatibleKeys


class CheckpointError(HellbenderError, ValueError):
    """An output_dir or checkpoint that cannot be used as asked (a user-facing error)."""


CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
SCALER_FILE = "scaler.pt"
CONFIG_FILE = "config.resolved.yaml"  # the run's resolved config, in output_dir and in each checkpoint
FINAL_STAGING = f"{TMP_PREFIX}final-output"  # a .tmp- folder: removed as a leftover at the next start
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


@dataclass
class TrainState:
    """Where the run is: enough to continue it exactly.

    ``micro_batches_done`` counts the micro-batches of ``epoch`` already consumed; the sampler is
    deterministic for (seed, epoch), so skipping that many index lists restores the data stream
    without touching the data itself.
    """

    global_step: int = 0
    epoch: int = 0
    micro_batches_done: int = 0
    total_steps: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None  # the step of best_eval_loss (load_best_model_at_end)
    evals_without_improvement: int = 0  # in a row, for early_stopping_patience
    plan: dict[str, Any] = field(default_factory=dict)
    has_optimizer: bool = True

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------- weights


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def save_model_weights(
    model: torch.nn.Module, path: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """The adapter (peft format) or the full model (``save_pretrained``), safetensors only.

    ``state_dict``: the weights to write instead of the model's own tensors — a sharded model's
    weights gathered whole (:meth:`hellbender.distributed.parallel.Parallel.full_weights`).
    """
    from transformers.utils import logging as hf_logging

    path.mkdir(parents=True, exist_ok=True)
    # transformers draws a "Writing model shards" bar per save, which garbles our progress output.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # A peft model or a transformers PreTrainedModel: nn.Module declares neither's save_pretrained.
    saveable: Any = model
    given = {} if state_dict is None else {"state_dict": state_dict}
    try:
        if is_peft_model(model):
            saveable.save_pretrained(str(path), safe_serialization=True, **given)
        else:
            saveable.save_pretrained(str(path), **given)  # transformers 5: always safetensors
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy the weights saved by :func:`save_model_weights` into ``model``, in place.

    In place (``load_state_dict`` copies into the existing tensors), so the optimizer keeps
    pointing at the same parameters. Every trainable parameter must be covered: a checkpoint
    that silently leaves some weights at their initial values would resume a different run.
    """
    from safetensors.torch import load_file

    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        file = path / "adapter_model.safetensors"
        if not file.exists():
            raise MissingFileError(f"{path} holds no adapter_model.safetensors (was it a full fine-tune?)")
        # peft annotates the result as `namedtuple` (not a type); it is load_state_dict's result.
        result: _IncompatibleKeys = set_peft_model_state_dict(model, load_file(str(file)))
        if result.unexpected_keys:
            raise CheckpointError(f"{file}: keys the model does not have: {result.unexpected_keys[:5]}")
        return
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MissingFileError(f"{path} holds no *.safetensors model weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    result = model.load_state_dict(state, strict=False)
    loaded = {id(p) for n, p in model.named_parameters() if n not in set(result.missing_keys)}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in loaded]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not match the model (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )


# ---------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- durability helpers


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (files first, then their folders)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _remove_dir(path: Path) -> None:
    """Rename to ``.trash-*`` (atomic) before deleting, so a kill mid-delete leaves no look-alike."""
    if not path.exists():
        return
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    _fsync_path(path.parent)
    shutil.rmtree(trash)


# ---------------------------------------------------------------- save / find / load


def temporary_checkpoint(output_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before its atomic rename."""
    return output_dir / f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{step}"


def _write_training_state(
    path: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None = None,
    optimizer_state: dict[str, Any] | None = None,
    without_optimizer: bool = False,  # its shards are written already
) -> None:
    if not without_optimizer:
        saved = optimizer.state_dict() if optimizer_state is None else optimizer_state
        torch.save(saved, path / OPTIMIZER_FILE)
    torch.save(scheduler.state_dict(), path / SCHEDULER_FILE)
    if scaler is not None:  # fp16 loss scaling: the current scale is part of the run's state
        torch.save(scaler.state_dict(), path / SCALER_FILE)


def save_checkpoint(
    output_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    *,
    scaler: torch.amp.GradScaler | None = None,
    save_only_model: bool = False,
    save_total_limit: int | None = None,
    metrics_file: Path | None = None,
    resolved_config: str | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    sharded: bool = False,
) -> Path:
    """Write ``checkpoint-<global_step>`` atomically, then drop the oldest beyond the limit.

    ``metrics_file`` (the run's ``metrics.jsonl``, every record up to this step) is copied in;
    ``resolved_config`` (the text of the run's ``config.resolved.yaml``) is written in.
    ``weights`` and ``optimizer_state``, when given, are written instead of the model's and the
    optimizer's own (a sharded run's, gathered whole on the rank that writes). ``sharded``: every
    rank has already written its shards of both into :func:`temporary_checkpoint`'s folder (see
    :meth:`hellbender.distributed.parallel.Parallel.write_sharded`); the rest is written beside them.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
    tmp = temporary_checkpoint(output_dir, state.global_step)
    if tmp.exists() and not sharded:
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(exist_ok=sharded)
        if not sharded:
            save_model_weights(model, tmp, weights)
        if not save_only_model:
            _write_training_state(
                tmp, optimizer, scheduler, scaler, optimizer_state, without_optimizer=sharded
            )
        torch.save(capture_rng_state(), tmp / RNG_FILE)
        if metrics_file is not None and metrics_file.is_file():
            shutil.copyfile(metrics_file, tmp / metrics_file.name)
        if resolved_config is not None:
            (tmp / CONFIG_FILE).write_text(resolved_config, encoding="utf-8")
        _write_json(tmp / STATE_FILE, asdict(state) | {"has_optimizer": not save_only_model})
        _fsync_tree(tmp)
    except Exception as exc:
        if not is_disk_full(exc, tmp):
            raise  # left as a kill leaves it: the next start removes it
        shutil.rmtree(tmp, ignore_errors=True)  # nothing in it is usable, and its space is needed
        raise _checkpoint_disk_full(
            output_dir, final, model, optimizer, save_only_model, metrics_file
        ) from exc
    _remove_dir(final)  # only when re-saving the same step; the new copy is complete already
    os.rename(tmp, final)
    _fsync_path(output_dir)
    if save_total_limit is not None:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            _remove_dir(old)
    return final


def _checkpoint_disk_full(
    output_dir: Path,
    final: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    save_only_model: bool,
    metrics_file: Path | None,
) -> DiskFullError:
    needed = _tensor_bytes(_saved_tensors(model)) + 64 * 1024  # + RNG, scheduler, JSON
    if not save_only_model:
        needed += _tensor_bytes(list(optimizer.state.values()))
    if metrics_file is not None:
        needed += tree_bytes(metrics_file)
    previous = find_latest_checkpoint(output_dir)
    intact = f"{previous.name} is intact" if previous is not None else "no earlier checkpoint exists"
    return disk_full_error(
        final,
        f"writing {final.name}",
        needed,
        f"Nothing was lost: {intact}. Free some space (or lower save_total_limit, or use an "
        "output_dir on a disk with room) and continue with auto_resume_from_checkpoints: true.",
    )


def _saved_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """What :func:`save_model_weights` writes: the trainable (adapter) weights, or every one."""
    if is_peft_model(model):
        return [p for p in model.parameters() if p.requires_grad]
    return list(model.state_dict().values())


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in ``obj`` (nested dicts, lists, tuples), shared storage counted once."""
    seen: set[int] = set()

    def walk(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            if x.data_ptr() in seen:
                return 0
            seen.add(x.data_ptr())
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, list | tuple):
            return sum(walk(v) for v in x)
        return 0

    return walk(obj)


def publish_files(output_dir: Path, write: Callable[[Path], None]) -> list[Path]:
    """Write files into ``output_dir`` such that a crash never leaves a half-written one there.

    ``write(folder)`` writes everything into the staging folder ``.tmp-final-output``, which is
    fsynced once complete; only then does each file replace its old version in ``output_dir``
    with ``os.replace`` (atomic per file). A crash while writing leaves the old files untouched
    (the staging leftover is removed by :func:`remove_incomplete` at the next start). A crash
    during the renames, which write no data, can leave some files new and some old — each one
    complete. Returns the published paths.

    A full disk while writing raises a :class:`~hellbender.errors.DiskFullError` saying where the
    trained weights are: in the newest checkpoint if it holds the last step; else ``write`` is
    called once more into a folder in the system's temporary folder, when that disk has room.
    """
    staging = output_dir / FINAL_STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        write(staging)
        _fsync_tree(staging)
    except Exception as exc:
        if not is_disk_full(exc, staging):
            raise  # left as a kill leaves it: the next start removes it
        written = tree_bytes(staging)
        shutil.rmtree(staging, ignore_errors=True)  # nothing in it is usable, and its space is needed
        raise _unpublished(output_dir, write, written) from exc
    published = []
    for src in sorted(staging.iterdir()):
        dest = output_dir / src.name
        if src.is_dir():
            _remove_dir(dest)  # os.replace cannot replace a non-empty folder
        os.replace(src, dest)
        published.append(dest)
    _fsync_path(output_dir)
    staging.rmdir()
    return published


def _unpublished(output_dir: Path, write: Callable[[Path], None], written: int) -> DiskFullError:
    """The error of a publish the disk had no room for, once the trained weights are safe somewhere
    (if any disk has room for them)."""
    newest = find_latest_checkpoint(output_dir)
    needed = written
    if newest is not None:
        needed = max(written, sum(tree_bytes(p) for p in newest.glob("*.safetensors")))
        state = read_state(newest)
        if state.global_step >= state.total_steps:
            return disk_full_error(
                output_dir,
                "writing the final outputs",
                needed,
                f"The trained weights are safe in {newest}, the last step's checkpoint: free some "
                "space and run again with auto_resume_from_checkpoints: true (nothing is left to "
                "train, so it only writes the outputs), or use that folder as it is.",
            )
    kept = _write_elsewhere(write, written)
    if kept is not None:
        where = f"so they were written to {kept} instead (move them into output_dir once there is room)"
    else:
        where = "and no other disk had room for them: they are lost"
    older = f" {newest.name} holds an earlier step." if newest is not None else ""
    return disk_full_error(
        output_dir,
        "writing the final outputs",
        max(needed, tree_bytes(kept)) if kept is not None else needed,
        f"No checkpoint holds the trained weights, {where}.{older} Free some space before the next run.",
    )


def _write_elsewhere(write: Callable[[Path], None], written: int) -> Path | None:
    """``write`` into a new folder of the system's temporary folder; None if that fails too.

    ``write`` may also record the written names in ``output_dir``
    (:func:`hellbender.train.output_dir.claim`), which a full disk refuses after the files are
    written: a full disk anywhere else than in the new folder leaves them kept.
    """
    import tempfile

    root = Path(tempfile.gettempdir())
    free = free_bytes(root)
    if free is None or free < 2 * written + NEARLY_FULL_BYTES:
        return None
    folder = Path(tempfile.mkdtemp(prefix="hellbender-unpublished-", dir=root))
    try:
        write(folder)
    except Exception as exc:
        where = exc.filename if isinstance(exc, DiskFullError) else None
        if where is None or Path(where).is_relative_to(folder) or not any(folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
            return None
    return folder


def is_sharded(path: Path) -> bool:
    """The checkpoint holds its weights as shards (no model or adapter file to load directly)."""
    return (path / SHARDED_DIR).is_dir() or (path / DEEPSPEED_DIR).is_dir()


def is_complete(path: Path) -> bool:
    return path.is_dir() and _CHECKPOINT_RE.match(path.name) is not None and (path / STATE_FILE).is_file()


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (by step, not by modification time)."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if is_complete(p)]
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    """The global step a ``checkpoint-<step>`` folder was written at (from its name)."""
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def find_latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_incomplete(output_dir: Path) -> list[Path]:
    """Delete leftovers of a killed run (``.tmp-*`` and ``.trash-*`` folders, and the ``.<name>.tmp``
    files of :func:`hellbender.files.write_atomically`). Main rank only."""
    removed: list[Path] = []
    if output_dir.is_dir():
        for p in sorted(output_dir.iterdir()):
            if p.is_dir() and (p.name.startswith(TMP_PREFIX) or p.name.startswith(TRASH_PREFIX)):
                shutil.rmtree(p)
                removed.append(p)
            elif p.is_file() and is_temporary(p):
                p.unlink()
                removed.append(p)
    return removed


def read_state(path: Path) -> TrainState:
    if not is_complete(path):
        raise MissingFileError(
            f"{path} is not a complete hellbender checkpoint (a folder checkpoint-<step> with {STATE_FILE})"
        )
    return TrainState.from_json(json.loads((path / STATE_FILE).read_text(encoding="utf-8")))


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    scaler: torch.amp.GradScaler | None = None,
    restore: Callable[[Path], None] | None = None,
) -> TrainState:
    """Restore weights, optimizer, scheduler, RNG (and the fp16 loss scaler) from ``path``.

    Call this after the optimizer and scheduler are built and just before the first step, so the
    RNG state restored here is the one the next step draws from. ``restore``: how this run takes
    its weights and optimizer state back instead (a run spread over ranks:
    :meth:`hellbender.distributed.parallel.Parallel.restore`).
    """
    state = read_state(path)
    if not state.has_optimizer:
        raise CheckpointError(
            f"{path} was written with save_only_model: true (no optimizer state), so the run cannot "
            "be resumed exactly. Start a new run from its weights instead (lora_model_dir or base_model)."
        )
    if restore is not None:
        restore(path)
    else:
        load_model_weights(model, path)
        optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True))
    scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
    if scaler is not None and (path / SCALER_FILE).is_file():
        scaler.load_state_dict(torch.load(path / SCALER_FILE, weights_only=True))
    restore_rng_state(torch.load(path / RNG_FILE, weights_only=True))
    return state


# ---------------------------------------------------------------- which run an output_dir holds


def resolve_resume(resume_from_checkpoint: str | None, auto_resume: bool, output_dir: Path) -> Path | None:
    """The checkpoint to continue from: ``resume_from_checkpoint``, else (with
    ``auto_resume_from_checkpoints``) the newest complete one in ``output_dir``, else None."""
    if resume_from_checkpoint:
        path = Path(resume_from_checkpoint).expanduser()
        if not is_complete(path):
            raise CheckpointError(
                f"resume_from_checkpoint: {path} is not a complete checkpoint (expected a folder "
                f"checkpoint-<step> holding {STATE_FILE})"
            )
        return path
    if auto_resume:
        return find_latest_checkpoint(output_dir)
    return None


def check_output_dir(output_dir: Path, resume: Path | None) -> None:
    """Refuse to mix two runs' checkpoints in one ``output_dir`` (nothing is ever deleted here).

    Without a resume, earlier checkpoints belong to another run: rotation and auto-resume would
    pick its higher-numbered ones. Resuming from an earlier checkpoint while later ones exist
    would re-save over the same step numbers, and ``save_total_limit`` would keep the abandoned
    run's (higher) steps while deleting the new ones.
    """
    earlier = list_checkpoints(output_dir)
    if resume is None and earlier:
        raise CheckpointError(
            f"output_dir {output_dir} already holds checkpoints of an earlier run "
            f"({', '.join(p.name for p in earlier)}). Set auto_resume_from_checkpoints: true to continue "
            "that run, or use another output_dir (or delete the checkpoint folders) to start a new one."
        )
    later = [p for p in earlier if resume is not None and step_of(p) > step_of(resume)]
    if resume is not None and later:
        raise CheckpointError(
            f"output_dir {output_dir} holds checkpoints after {resume.name}, the one to resume from "
            f"({', '.join(p.name for p in later)}). Move them out of output_dir (or delete them) to "
            "continue from the earlier one, or resume from the latest."
        )
