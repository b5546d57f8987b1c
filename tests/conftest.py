"""Test-wide settings.

Threads are pinned deliberately: on a busy 2-core machine oversubscribed OpenMP was measured ten
times slower, so every test process uses exactly one intra-op thread (pytest-xdist supplies the
parallelism across processes instead).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def pytest_configure(config):
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return
    torch.set_num_threads(1)


@pytest.fixture
def one_multi_rank_test_at_a_time(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run the tests that start several ranks one at a time, across the xdist workers.

    Two of them at once put four or more busy processes on two cores, and gloo's timeouts start
    to count slowness as failure. (pytest-xdist's `xdist_group` would pin them to one worker,
    but with pytest 9 its `--dist loadgroup` no longer groups anything: measured, 3.8.0.) The lock
    file sits in the run's base temp folder, which every worker shares.
    """
    lock = tmp_path_factory.getbasetemp().parent / "multi-rank.lock"
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes, or the worker dies
        yield
