"""Helpers of the chaos tests: filling a disk, and the tiny project of the killed-run test.

:func:`fill` fills a disk the way a real disk fills: a ballast file written until the kernel
answers ENOSPC, so every write after it fails exactly as on a full disk.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import os
from pathlib import Path
from types import ModuleType


@functools.cache
def killed_run_helpers() -> ModuleType:
    """``tests/e2e/test_e2e_killed_run.py`` (its project writers), imported under its own name."""
    path = Path(__file__).parents[1] / "e2e" / "test_e2e_killed_run.py"
    spec = importlib.util.spec_from_file_location("_chaos_killed_run_helpers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` up to the last byte with a ballast file, then give ``leave`` bytes back (delete
    the ballast to give all the space back)."""
    ballast = disk / "ballast"
    chunk = b"\0" * 65536
    with ballast.open("ab", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        for size in (4096, 512, 64, 8, 1):  # the last partial chunk's worth
            try:
                while True:
                    f.write(chunk[:size])
            except OSError:
                pass
    if leave:
        os.truncate(ballast, max(0, ballast.stat().st_size - leave))
    return ballast
