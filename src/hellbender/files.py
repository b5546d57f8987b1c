"""Writing files so that a crash never leaves one half-written, and a full disk is one clear error.

The new content goes into a temporary sibling (same folder, so the same filesystem) and is then
renamed over the old file: ``os.replace`` is atomic on POSIX, so a reader — or the next run after a
kill — sees either the old file or the new one, never a truncated mix. Checkpoint folders have
their own, fsynced scheme in :mod:`hellbender.train.checkpoint`; this is for single files that are
rewritten in place (the resolved config, ``metrics.jsonl``, ``loss.png``, a ``--fix``ed YAML). A
temporary sibling is named ``.<name>.tmp``: one a killed run leaves behind is removed at the next
start (:func:`is_temporary`).

A full disk. Every place hellbender writes turns a failure caused by a full filesystem into one
:class:`~hellbender.errors.DiskFullError` naming the path, the space the write needed and the
space left (:func:`disk_full_error`). Recognising one (:func:`is_disk_full`) takes more than the
errno: torch's checkpoint writer raises a ``RuntimeError`` ("unexpected pos …") and safetensors
a ``SafetensorError``, neither carrying one. So a failed write counts as a full disk when the
exception (or one it was raised from) has errno ENOSPC/EDQUOT or says so in its text, or when it
has no errno at all and the filesystem is left with (almost) no space.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from hellbender.errors import DiskFullError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# How libraries that drop the errno still spell it (safetensors: "... (os error 28)").
_DISK_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
# A write that failed without an errno, leaving less than this free, failed because the disk filled.
NEARLY_FULL_BYTES = 4 * 2**20
TMP_SUFFIX = ".tmp"


def temporary_sibling(path: Path) -> Path:
    """Where :func:`write_atomically` writes ``path``'s new content before the rename."""
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


def is_temporary(path: Path) -> bool:
    """A temporary sibling of :func:`write_atomically` (a leftover, unless a write is under way)."""
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX) and len(path.name) > 5


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to write the new content to a temporary sibling, then rename it to ``path``.

    Whatever ``write`` returns (``Path.write_text``'s character count, ...) is ignored. If anything
    fails, the temporary file is removed and ``path`` keeps its old content; a full disk raises a
    :class:`~hellbender.errors.DiskFullError`.
    """
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        written = tree_bytes(tmp)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if is_disk_full(exc, path):
            # The old version's size is the best guess of the new one's; what fit is a lower bound.
            needed = max(written, tree_bytes(path))
            raise disk_full_error(path, f"writing {path.name}", needed) from exc
        raise
    return path


# ---------------------------------------------------------------- a full disk


def tree_bytes(path: Path) -> int:
    """Bytes in the file ``path`` or in every file under the folder ``path`` (0 if it is missing)."""
    try:
        if not path.is_dir():
            return path.stat().st_size if path.exists() else 0
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def free_bytes(path: Path) -> int | None:
    """Bytes this user may still write on the filesystem holding ``path`` (or its nearest existing
    parent); None if not even the root can be asked."""
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def is_disk_full(exc: BaseException, path: Path) -> bool:
    """Did writing to ``path`` fail with ``exc`` because its filesystem is full? (See the module.)"""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and all(link is not seen for seen in chain) and len(chain) < 16:
        chain.append(link)
        link = link.__cause__ or link.__context__
    for link in chain:
        if isinstance(link, OSError) and link.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(link) for text in _DISK_FULL_TEXTS):
            return True
    if isinstance(exc, OSError) and exc.errno is not None:
        return False  # another errno (permission, a missing folder, ...): not a full disk
    free = free_bytes(path)
    return free is not None and free < NEARLY_FULL_BYTES


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_full_error(path: Path, what: str, needed: int | None, advice: str = "") -> DiskFullError:
    """The one error a full disk gives: what was being written where, the space it needed (an
    estimate: the size of what was being written) and the space left now."""
    free = free_bytes(path)
    space = f"needs about {format_bytes(needed)}" if needed else "needs more space"
    left = f"only {format_bytes(free)} is free there" if free is not None else "the disk is full"
    advice = advice or "Free some space (or use a folder on a disk with room) and run again."
    return DiskFullError(f"disk full: {what} ({path}) {space}, but {left}. {advice}", str(path))
