"""Many processes, end to end: two "machines" meeting through a c10d rendezvous, and a rank killed
with SIGKILL in the middle of a run.

Both run the real command (``hellbender train … --nproc-per-node``), one thread per rank, gloo.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from hellbender.testing.projects import (
    REPEAT_ROWS,
    kill_and_reap,
    start_logged,
    wait_for_file,
    write_tiny_project,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_multi_rank_test_at_a_time")]

LORA: dict[str, Any] = {
    "adapter": "lora",
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_target_linear": True,
    "learning_rate": 0.01,
    "logging_steps": 1,
    "ddp_timeout": 60,  # a rank that waits on a dead peer gives up within a minute
}


def env() -> dict[str, str]:
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONWARNINGS")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return {**base, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hellbender", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    for name in x:
        torch.testing.assert_close(x[name], y[name], rtol=0, atol=1e-6, msg=name)


def test_two_machines_meet_at_a_rendezvous_endpoint(tmp_path: Path) -> None:
    """Two torchrun invocations, one rank each, meet at 127.0.0.1 (c10d): as two machines would."""
    config = write_tiny_project(tmp_path, REPEAT_ROWS, max_steps=4, **LORA)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = []
    for rank in (0, 1):
        args = ["train", str(config), f"output_dir={tmp_path / 'nodes'}", "--nproc-per-node", "1",
                "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", endpoint]  # fmt: skip
        nodes.append(start_logged(command(*args), tmp_path / f"node{rank}.log", env()))
    for node in nodes:
        node.wait(timeout=600)
    logs = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert any("distributed: ddp over 2 ranks (gloo)" in log for log in logs), logs
    # The reference: one process, the same global batch (2 micro-batches per step).
    args = ["train", str(config), f"output_dir={tmp_path / 'single'}", "gradient_accumulation_steps=2"]
    single = subprocess.run(command(*args), capture_output=True, text=True, env=env(), timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    got, want = losses(tmp_path / "nodes"), losses(tmp_path / "single")
    assert got.keys() == want.keys() == {1, 2, 3, 4}
    assert all(abs(got[s] - want[s]) <= 1e-6 * abs(want[s]) for s in want), (got, want)
    assert_same_adapter(tmp_path / "nodes", tmp_path / "single")


def rank_pids(launcher: int, rank: int) -> list[int]:
    """Processes below ``launcher`` whose environment says RANK=<rank> (torchrun's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ and _descends(parent, launcher):
            found.append(int(entry.name))
    return found


def _descends(pid: int, ancestor: int) -> bool:
    for _ in range(10):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def test_a_killed_rank_stops_the_run_naming_it_and_the_run_resumes(tmp_path: Path) -> None:
    """SIGKILL rank 1 after the first checkpoint: the launcher stops within a bounded time, names
    the rank and the signal; the checkpoint left behind resumes (auto_resume) to the same result
    as one uninterrupted process with the same global batch."""
    steps = 40
    config = write_tiny_project(tmp_path, REPEAT_ROWS, max_steps=steps, save_steps=4, save_total_limit=2,
                                auto_resume_from_checkpoints=True, **LORA)  # fmt: skip
    out = tmp_path / "out"
    log = tmp_path / "launcher.log"
    launcher = start_logged(command("train", str(config), "--nproc-per-node", "2"), log, env())
    try:
        wait_for_file(launcher, out / "checkpoint-4" / "trainer_state.json", log, "the first checkpoint")
        victims = rank_pids(launcher.pid, 1)
        assert len(victims) == 1, victims
        assert not (out / "adapter_model.safetensors").exists(), "the run ended before the kill"
        killed_at = time.monotonic()
        os.kill(victims[0], signal.SIGKILL)
        launcher.wait(timeout=120)
        stopped_after = time.monotonic() - killed_at
    finally:
        kill_and_reap(launcher, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert launcher.returncode == 1, text[-3000:]
    assert stopped_after < 90, stopped_after
    last = text.strip().splitlines()[-1]
    assert last.startswith("ERROR: rank 1 (pid ") and "SIGKILL" in last, text[-3000:]
    assert "Traceback" not in text.split("ERROR: rank 1")[-1]
    assert not rank_pids(launcher.pid, 0) and not rank_pids(launcher.pid, 1)  # nothing left running
    assert not (out / "adapter_model.safetensors").exists()

    resumed = subprocess.run(command("train", str(config), "--nproc-per-node", "2"),
                             capture_output=True, text=True, env=env(), timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    args = ["train", str(config), f"output_dir={tmp_path / 'single'}", "gradient_accumulation_steps=2",
            "auto_resume_from_checkpoints=false"]  # fmt: skip
    single = subprocess.run(command(*args), capture_output=True, text=True, env=env(), timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    got, want = losses(out), losses(tmp_path / "single")
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    assert all(abs(got[s] - want[s]) <= 1e-6 * abs(want[s]) for s in want)
    assert_same_adapter(out, tmp_path / "single")
