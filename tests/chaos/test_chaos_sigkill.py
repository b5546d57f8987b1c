"""SIGKILLs at random moments of a run, then a resume, give exactly the uninterrupted run.

``tests/e2e/test_e2e_killed_run.py`` kills at one chosen moment (mid-checkpoint); here the moments
are drawn at random (seeded, so a failure reproduces): the real ``hellbender train`` command runs
in a child process, auto-resuming into the same ``output_dir`` each time, and is killed
:data:`KILLS` times at a random delay after its training starts — while loading, stepping,
appending metrics, writing a checkpoint or rotating one, whatever the moment holds. Each step is
slowed a little so the kills spread over the run, and the child waits after publishing so no kill
comes too late. A last resume finishes the run; every loss in ``metrics.jsonl`` and the final
adapter must then equal the uninterrupted run's (``==``, ``torch.equal``).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hellbender.commands.train import run_train
from hellbender.config.load import load_config
from hellbender.testing.projects import kill_and_reap, start_logged, wait_for_file, write_killed_run_project
from hellbender.train import checkpoint as ckpt
from hellbender.train.metrics import read_metrics

pytestmark = pytest.mark.chaos

KILLS = 3
SEED = 20240611
STEPS = 24
MAX_DELAY = 1.2  # seconds after training starts; a step takes ≥ 0.06 s in the child

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import hellbender.commands.train as train_command
    from hellbender.train import checkpoint as ckpt, loop

    marker = Path(sys.argv[2])
    real_train, real_step, real_publish = train_command.train, loop._optimizer_step, ckpt.publish_files

    def announcing(*args, **kwargs):  # training (setup included) starts now
        marker.write_text("started")
        return real_train(*args, **kwargs)

    def slowed(*args, **kwargs):
        time.sleep(0.06)
        return real_step(*args, **kwargs)

    def then_wait(*args, **kwargs):  # a kill drawn after the end still kills a live process
        published = real_publish(*args, **kwargs)
        time.sleep(600)
        return published

    train_command.train, loop._optimizer_step, ckpt.publish_files = announcing, slowed, then_wait
    from hellbender.cli import main
    main(["train", sys.argv[1]])
    """
)


def loss_records(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_random_sigkills_then_resume_equal_the_uninterrupted_run(tmp_path: Path) -> None:
    settings = {"max_steps": STEPS, "save_steps": 3, "save_total_limit": 2, "logging_steps": 1}

    straight_cfg, _ = load_config(
        str(write_killed_run_project(tmp_path, tmp_path / "straight", **settings)), world_size=1
    )
    straight = run_train(straight_cfg)  # also builds the dataset cache every child reuses

    out = tmp_path / "killed"
    config = write_killed_run_project(tmp_path, out, auto_resume_from_checkpoints=True, **settings)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WORLD_SIZE": "1"}
    rng = random.Random(SEED)
    progress = []
    for kill in range(KILLS):
        marker = tmp_path / f"started-{kill}"
        log = tmp_path / f"child-{kill}.log"
        child = start_logged([sys.executable, "-c", CHILD, str(config), str(marker)], log, env)
        try:
            wait_for_file(child, marker, log, "the start of training")
            time.sleep(rng.uniform(0.0, MAX_DELAY))
            assert child.poll() is None, log.read_text()[-3000:]
        finally:
            kill_and_reap(child, signal.SIGKILL)
        assert child.returncode == -signal.SIGKILL, log.read_text()[-3000:]
        latest = ckpt.find_latest_checkpoint(out)
        progress.append(ckpt.step_of(latest) if latest is not None else 0)
    assert len(progress) == KILLS

    cfg, _ = load_config(str(config), world_size=1)
    resumed = run_train(cfg)
    assert resumed.global_step == STEPS
    assert resumed.losses == {k: v for k, v in straight.losses.items() if k in resumed.losses}
    assert loss_records(out) == loss_records(tmp_path / "straight")  # every step once, equal
    adapter = load_file(out / "adapter_model.safetensors")
    reference = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    assert adapter.keys() == reference.keys()
    assert all(torch.equal(adapter[k], reference[k]) for k in adapter), progress
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp", ".trash"))]
