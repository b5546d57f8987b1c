"""Two ``hellbender train`` processes never share one ``output_dir``; a killed one leaves no stale lock.

Real processes throughout. A "live run" is the real ``hellbender train`` command paused right after
its first checkpoint (announced through a marker file) until the test creates a "go" file, so the
second run starts while the first one provably holds the folder and has a checkpoint in it — the
case where ``auto_resume_from_checkpoints`` used to resume from a live run's checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from hellbender.commands.train import run_train
from hellbender.config.load import load_config
from hellbender.testing.projects import kill_and_reap, start_logged, wait_for_file
from hellbender.train import checkpoint as ckpt

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WORLD_SIZE": "1"}
HELLBENDER = str(Path(sys.executable).with_name("hellbender"))  # the installed console script
LOCK_FILE = ".hellbender.lock"

PAUSED_RUN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hellbender.train import checkpoint as ckpt

    marker, go = Path(sys.argv[2]), Path(sys.argv[3])
    original = ckpt.save_checkpoint

    def pausing(*args, **kwargs):
        path = original(*args, **kwargs)
        if not marker.exists():  # after the first complete checkpoint
            marker.write_text(str(path))
            while not go.exists():
                time.sleep(0.05)
        return path

    ckpt.save_checkpoint = pausing
    from hellbender.cli import main
    main(["train", sys.argv[1]])
    """
)

LOCK_HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\\n".encode())
    open(sys.argv[2], "w").write("locked")
    time.sleep(600)
    """
)


def write_config(root: Path, base_settings: dict[str, object], out: Path) -> Path:
    config = {
        **base_settings,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_linear": True,
        "learning_rate": 0.01,
        "max_steps": 4,
        "save_steps": 2,
        "output_dir": str(out),
    }
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli_train(config: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HELLBENDER, "train", str(config), *overrides], env=ENV, capture_output=True, text=True, timeout=300
    )


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_train_into_a_locked_output_dir_is_refused_naming_the_holder(
    tmp_path: Path, base_settings: dict[str, object]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    config = write_config(tmp_path, base_settings, out)
    locked, log = tmp_path / "locked", tmp_path / "holder.log"
    holder = start_logged([sys.executable, "-c", LOCK_HOLDER, str(out / LOCK_FILE), str(locked)], log, ENV)
    try:
        wait_for_file(holder, locked, log, "taking the lock", timeout=30)
        result = cli_train(config)
    finally:
        kill_and_reap(holder, signal.SIGKILL)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, result.stderr
    assert f"pid {holder.pid}" in errors[0] and str(out) in errors[0]
    assert "outputs in" not in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written, nothing removed


def test_a_live_run_keeps_its_output_dir_to_itself(tmp_path: Path, base_settings: dict[str, object]) -> None:
    out = tmp_path / "out"
    config = write_config(tmp_path, base_settings, out)
    marker, go, log = tmp_path / "paused", tmp_path / "go", tmp_path / "live.log"
    live = start_logged([sys.executable, "-c", PAUSED_RUN, str(config), str(marker), str(go)], log, ENV)
    try:
        wait_for_file(live, marker, log, "the pause after the first checkpoint")
        assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
        before = files_of(out)
        second = cli_train(config)
        resuming = cli_train(config, "auto_resume_from_checkpoints=true")
        assert files_of(out) == before  # neither touched the live run's folder
        go.write_text("go")
        live.wait(timeout=240)
    finally:
        kill_and_reap(live, signal.SIGKILL)
    for result in (second, resuming):
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"pid {live.pid}" in result.stderr, result.stderr
        assert "in use by another hellbender run" in result.stderr
        assert "outputs in" not in result.stdout
    assert live.returncode == 0, log.read_text()[-3000:]
    assert "trained 4/4 steps" in log.read_text()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]


def test_a_sigkilled_run_leaves_no_stale_lock(tmp_path: Path, base_settings: dict[str, object]) -> None:
    out = tmp_path / "out"
    config = write_config(tmp_path, base_settings, out)
    marker, log = tmp_path / "paused", tmp_path / "killed.log"
    args = [sys.executable, "-c", PAUSED_RUN, str(config), str(marker), str(tmp_path / "never")]
    killed = start_logged(args, log, ENV)
    try:
        wait_for_file(killed, marker, log, "the pause after the first checkpoint")
        assert (out / LOCK_FILE).read_text().split()[0] == str(killed.pid)  # it held the folder
    finally:
        kill_and_reap(killed, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL

    # The lock file stays behind with the dead pid in it; the lock itself died with the process.
    assert (out / LOCK_FILE).read_text().split()[0] == str(killed.pid)
    cfg, _ = load_config(config, ["auto_resume_from_checkpoints=true"], world_size=1)
    resumed = run_train(cfg)
    assert resumed.resumed_from == out / "checkpoint-2"
    assert resumed.global_step == 4
    assert (out / LOCK_FILE).read_text().split()[0] == str(os.getpid())
