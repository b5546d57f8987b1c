"""What a run may do to its ``output_dir``: hold it alone, stay out of the folders it reads from, and
never replace a file it did not write.

* **One run per folder.** :func:`locked` takes an exclusive ``flock`` on ``output_dir/.hellbender.lock``
  for the whole run and writes the holder's pid (and host) into it; a second run into the folder
  is refused with that pid. The lock belongs to the open file, so the kernel releases it when the
  process ends in any way, SIGKILL included: there is never a stale lock to clean up, and the file
  itself stays (deleting it on exit would race with a run that has just opened it).
* **Not into the model.** :func:`check_not_a_source` refuses an ``output_dir`` that is — or is
  inside — a folder the run reads (``base_model``, ``base_model_config``, ``tokenizer_config``,
  ``lora_model_dir``), comparing real paths, so a symlink or a relative path does not hide it.
* **Only its own files.** ``output_dir/.hellbender-outputs.json`` lists every file hellbender put
  directly into ``output_dir``. :func:`claim` refuses to write a name that exists but is not on
  that list, and otherwise records the names *before* they are written, so a crash in between
  leaves at most a listed name that was never written. A resumed run, or a new run once the old
  checkpoints are gone, replaces its own earlier outputs freely. The clash is looked for before
  training; if such a file appears during the run, the finished outputs are kept in a new
  ``unpublished-outputs-<time>`` folder instead (:func:`keep_unpublished`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from hellbender.config.schema import ResolvedConfig
from hellbender.files import write_atomically
from hellbender.train.checkpoint import CONFIG_FILE, CheckpointError

logger = logging.getLogger(__name__)

LOCK_FILE = ".hellbender.lock"
MANIFEST_FILE = ".hellbender-outputs.json"
# The keys naming folders a run reads from; its outputs must never land in them.
SOURCE_KEYS = ("base_model", "base_model_config", "tokenizer_config", "lora_model_dir")
# Written directly into output_dir while the run goes (the metrics file and plot: train/metrics.py).
RUN_FILES = (CONFIG_FILE, "metrics.jsonl", "loss.png")
# What the final publish is expected to write, checked before training so a clash does not cost a
# whole run. The staged files themselves are checked again (claim) before anything is replaced.
_ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json", "README.md"}
_MODEL_FILES = {"model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json"}
_TOKENIZER_FILES = set(
    "tokenizer.json tokenizer_config.json special_tokens_map.json added_tokens.json chat_template.jinja "
    "chat_template.json vocab.json merges.txt tokenizer.model".split()
)
_MODEL_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")


class OutputDirInUseError(CheckpointError):
    """Another run holds the lock of this output_dir."""


class ForeignFileError(CheckpointError):
    """A file the run would write exists in output_dir, and hellbender did not write it."""


# ---------------------------------------------------------------- one run per folder

# Lock files this process holds open. A forked child (a tokenization worker) inherits them and
# closes its copies at once: the lock then lives exactly as long as this process, never longer.
_held: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _holder(fd: int) -> str:
    words = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
    if not words:
        return "pid not recorded yet"
    return f"pid {words[0]} on {words[1]}" if len(words) > 1 else f"pid {words[0]}"


@contextlib.contextmanager
def locked(output_dir: Path) -> Iterator[Path]:
    """Hold ``output_dir`` exclusively until the block ends (or the process dies); yield the lock file.

    Raises :class:`OutputDirInUseError` naming the holder when another process has it. A
    filesystem that cannot lock at all gets a warning, not a refusal.
    """
    path = output_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CheckpointError(f"output_dir: cannot create {path} ({exc.strerror or exc})") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputDirInUseError(
                f"output_dir {output_dir} is in use by another hellbender run ({_holder(fd)}; lock file "
                f"{path}). Two runs in one folder would mix their checkpoints and outputs: wait for that "
                "run to end or stop it, or use another output_dir."
            ) from None
        except OSError as exc:  # e.g. ENOLCK / EOPNOTSUPP on a filesystem without locks
            logger.warning(
                "output_dir %s: cannot lock %s (%s); nothing stops a second run from writing into it",
                output_dir, path, exc.strerror or exc,
            )  # fmt: skip
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        _held.add(fd)
        yield path
    finally:
        _held.discard(fd)
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------- not into the folders the run reads


def check_not_a_source(cfg: ResolvedConfig, output_dir: Path) -> None:
    """Refuse an ``output_dir`` that is, or is inside, a local folder the run reads from.

    Only local folders are compared: a hub id or a ``.gguf`` file has no folder outputs could go to.
    """
    target = output_dir.expanduser().resolve()
    for key in SOURCE_KEYS:
        value = getattr(cfg, key)
        source = Path(value).expanduser() if value else None
        if source is None or not source.is_dir():
            continue
        source = source.resolve()
        if target == source or source in target.parents:
            where = "is" if target == source else "is inside"
            raise CheckpointError(
                f"output_dir {output_dir} {where} the {key} folder {source}: the run would write its "
                f"weights, tokenizer and checkpoints among the files it reads. Set output_dir to a "
                "folder outside it."
            )


# ---------------------------------------------------------------- only its own files


def _written_by_hellbender(output_dir: Path) -> set[str]:
    path = output_dir / MANIFEST_FILE
    if not path.is_file():
        return set()
    try:
        names = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path} (the list of files hellbender wrote into output_dir) cannot be read ({exc}); "
            "delete it together with the outputs it listed, or use another output_dir"
        ) from exc
    return {str(n) for n in names}


def _refuse_foreign(output_dir: Path, names: Iterable[str], when: str) -> set[str]:
    """The names hellbender wrote before; raise if one of ``names`` exists but is not among them."""
    ours = _written_by_hellbender(output_dir)
    foreign = sorted(n for n in set(names) - ours if os.path.lexists(output_dir / n))
    if foreign:
        raise ForeignFileError(
            f"output_dir {output_dir} holds {', '.join(foreign)}, which hellbender did not write, and "
            f"{when} would replace {'it' if len(foreign) == 1 else 'them'}. hellbender never replaces "
            f"a file it did not write (the ones it did are listed in {MANIFEST_FILE}): move "
            f"{'it' if len(foreign) == 1 else 'them'} out of output_dir, or use another output_dir."
        )
    return ours


def claim(output_dir: Path, names: Iterable[str], when: str) -> None:
    """Refuse if a file of ``names`` exists in ``output_dir`` and hellbender did not write it; else
    record ``names`` as hellbender's before they are written. ``when`` says what would write them."""
    names = set(names)
    ours = _refuse_foreign(output_dir, names, when)
    if names - ours:
        text = json.dumps({"files": sorted(ours | names)}, indent=1) + "\n"
        write_atomically(output_dir / MANIFEST_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def keep_unpublished(staging: Path) -> Path | None:
    """Give the staged outputs of a refused publish a lasting name in output_dir (a new folder:
    nothing is replaced), so a finished run is not lost; None when there is nothing staged."""
    if not staging.is_dir() or not any(staging.iterdir()):
        return None
    kept = stem = staging.parent / f"unpublished-outputs-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 0
    while os.path.lexists(kept):
        n += 1
        kept = stem.with_name(f"{stem.name}-{n}")
    os.rename(staging, kept)
    return kept


def expected_outputs(cfg: ResolvedConfig, output_dir: Path) -> list[str]:
    """The files of ``output_dir`` that this run's final outputs are expected to replace."""
    names = _TOKENIZER_FILES | (_ADAPTER_FILES if cfg.adapter else _MODEL_FILES)
    return sorted(
        p.name for p in output_dir.iterdir()
        if p.name in names or (not cfg.adapter and _MODEL_SHARD.match(p.name))
    )  # fmt: skip


def check_before_training(cfg: ResolvedConfig, output_dir: Path) -> None:
    """Before anything is written: claim the files the run writes as it goes, and refuse now (not
    after training) when the final outputs are expected to replace a file hellbender did not write."""
    _refuse_foreign(output_dir, expected_outputs(cfg, output_dir), "the trained weights and tokenizer")
    claim(output_dir, RUN_FILES, "this run's resolved config, metrics and loss plot")
