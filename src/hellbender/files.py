"""Writing a file so that a crash never leaves it half-written.

The new content goes into a temporary sibling (same folder, so the same filesystem) and is then
renamed over the old file: ``os.replace`` is atomic on POSIX, so a reader — or the next run after a
kill — sees either the old file or the new one, never a truncated mix. Checkpoint folders have
their own, fsynced scheme in :mod:`hellbender.train.checkpoint`; this is for single files that are
rewritten in place (the resolved config, ``metrics.jsonl``, ``loss.png``, a ``--fix``ed YAML).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to write the new content to a temporary sibling, then rename it to ``path``.

    Whatever ``write`` returns (``Path.write_text``'s character count, ...) is ignored.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
    return path
