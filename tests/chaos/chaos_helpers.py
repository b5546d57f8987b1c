"""Helpers of the chaos tests: filling a disk.

:func:`fill` fills a disk the way a real disk fills: a ballast file written until the kernel
answers ENOSPC, so every write after it fails exactly as on a full disk.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


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
