"""A whole tiny project on disk (model folder, JSONL data, YAML config) and child processes.

The end-to-end, chaos and CLI tests run the real commands on a real folder; these helpers write
that folder once, the same way for every test, and run a command in a child process whose death
(a SIGKILL at a chosen moment) is the point of the test.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from hellbender.testing.tiny import save_tiny_model_folder

WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight")
REPEAT_ROWS = [{"instruction": f"Repeat {w}.", "input": "", "output": f"{w} {w}."} for w in WORDS]


def write_tiny_project(
    root: Path,
    rows: Sequence[Mapping[str, Any]] = REPEAT_ROWS,
    *,
    config_name: str = "cfg.yaml",
    model_settings: Mapping[str, Any] | None = None,
    **settings: Any,
) -> Path:
    """Write ``root/model`` (a tiny random llama, unless already there), ``root/data.jsonl``
    (``rows``, alpaca-shaped) and ``root/<config_name>``; return the config's path.

    The config is the smallest one that trains on CPU in seconds: fp32, sequence_len 128,
    micro-batch 1, no TensorBoard, output in ``root/out``; ``settings`` add or replace keys.
    """
    if not (root / "model" / "config.json").exists():
        save_tiny_model_folder(root / "model", **(model_settings or {}))
    (root / "data.jsonl").write_text("".join(json.dumps(dict(r)) + "\n" for r in rows))
    config: dict[str, Any] = {
        "base_model": str(root / "model"),
        "datasets": [{"path": str(root / "data.jsonl"), "type": "alpaca"}],
        "dataset_prepared_path": str(root / "prepared"),
        "dataset_num_proc": 1,
        "bf16": False,
        "sequence_len": 128,
        "micro_batch_size": 1,
        "output_dir": str(root / "out"),
        "use_tensorboard": False,
        **settings,
    }
    path = root / config_name
    path.write_text(yaml.safe_dump(config))
    return path


def write_killed_run_project(root: Path, out: Path, **settings: Any) -> Path:
    """The project of the tests that kill a run and resume it (the killed-run e2e test and the
    chaos suite): :func:`write_tiny_project` with the model drawn at ``initializer_range`` 0.1 and
    a LoRA run of 12 steps (2 micro-batches each, lr 0.01, a checkpoint every 4) into ``out``; the
    config is ``root/<out.name>.yaml``. ``settings`` add or replace keys."""
    killed_run: dict[str, Any] = {
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,  # resuming must restore the RNG stream too
        "lora_target_linear": True,
        "gradient_accumulation_steps": 2,
        "learning_rate": 0.01,
        "max_steps": 12,
        "save_steps": 4,
        "output_dir": str(out),
    }
    return write_tiny_project(
        root,
        config_name=f"{out.name}.yaml",
        model_settings={"initializer_range": 0.1},
        **{**killed_run, **settings},
    )


def start_logged(args: Sequence[str], log: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start ``args`` with stdout and stderr going to the file ``log`` (not a pipe: a pipe nobody
    reads fills up and blocks the child, which a kill test would mistake for a hang)."""
    with log.open("wb") as sink:
        return subprocess.Popen(list(args), env=dict(env), stdout=sink, stderr=subprocess.STDOUT)


def wait_for_file(
    child: subprocess.Popen[bytes], marker: Path, log: Path, what: str, timeout: float = 240
) -> None:
    """Wait until ``marker`` exists while ``child`` is alive; fail with the child's log if it dies
    first, or with ``what`` did not happen if ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert child.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.02)


def kill_and_reap(child: subprocess.Popen[bytes], sig: int) -> int:
    """Send ``sig`` to ``child`` if it is still running; wait for it; return its exit code."""
    if child.poll() is None:
        child.send_signal(sig)
    return child.wait(timeout=60)
