"""The output_dir guards on their own: the lock (across real processes), the folders a run reads,
the list of files hellbender wrote, and the resume policy of every config key.

The same guards are exercised through ``run_train`` and the CLI in ``tests/e2e/test_e2e_output_dir.py``
and ``tests/e2e/test_e2e_concurrent_runs.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hellbender.config.schema import ResolvedConfig
from hellbender.testing.configs import resolved_config
from hellbender.train import output_dir as outdir
from hellbender.train.checkpoint import CONFIG_FILE, CheckpointError
from hellbender.train.run_config import RESUME_POLICY, check_resume_config, resolved_config_text

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hellbender.train.output_dir import locked

    with locked(Path(sys.argv[1])):
        Path(sys.argv[2]).write_text("locked")
        time.sleep(600)
    """
)


def cfg_of(**values: object) -> ResolvedConfig:
    return resolved_config(**{"base_model": "org/model", "datasets": [{"path": "d.jsonl"}], **values})


def hold(folder: Path, marker: Path) -> subprocess.Popen[bytes]:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(marker)])
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    return child


# ---------------------------------------------------------------- the lock


def test_the_lock_refuses_another_process_naming_it_and_dies_with_it(tmp_path: Path) -> None:
    child = hold(tmp_path, tmp_path.parent / f"{tmp_path.name}.locked")
    try:
        holder = rf"in use by another hellbender run \(pid {child.pid} on "
        with pytest.raises(outdir.OutputDirInUseError, match=holder):
            with outdir.locked(tmp_path):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    with outdir.locked(tmp_path) as lock_file:  # SIGKILL released it: no stale lock
        assert lock_file.read_text().split()[0] == str(os.getpid())
    assert (tmp_path / outdir.LOCK_FILE).exists()  # the file stays; only the flock mattered


def test_the_lock_is_exclusive_within_one_process_too_and_released_after(tmp_path: Path) -> None:
    with outdir.locked(tmp_path):
        with pytest.raises(outdir.OutputDirInUseError, match=f"pid {os.getpid()}"):
            with outdir.locked(tmp_path):
                pass
    with outdir.locked(tmp_path):
        pass


def test_a_forked_child_does_not_keep_the_lock_alive(tmp_path: Path) -> None:
    """A tokenization worker forked during the run must not hold the folder after the run ends."""
    started = tmp_path.parent / f"{tmp_path.name}.child"
    with outdir.locked(tmp_path):
        child = os.fork()
        if child == 0:  # pragma: no cover - the child only waits to be killed
            started.write_text("forked")  # the fork handlers have run by now
            time.sleep(60)
            os._exit(0)
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    try:
        with outdir.locked(tmp_path):
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


# ---------------------------------------------------------------- the folders a run reads


def test_only_the_source_folder_itself_and_what_is_inside_it_are_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    cfg = cfg_of(base_model=str(model))
    # a name with the same prefix, a namesake elsewhere, the parent
    for out in (tmp_path / "model-out", tmp_path / "other" / "model", tmp_path):
        outdir.check_not_a_source(cfg, out)
    for out in (model, model / "a" / "b", tmp_path / "x" / ".." / "model"):
        with pytest.raises(CheckpointError, match="base_model folder"):
            outdir.check_not_a_source(cfg, out)
    outdir.check_not_a_source(cfg_of(base_model="org/model"), Path("org/model"))  # a hub id has no folder


# ---------------------------------------------------------------- the files hellbender wrote


def test_claim_refuses_foreign_files_and_records_its_own(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("mine")
    with pytest.raises(CheckpointError, match=r"holds README\.md, which hellbender did not write"):
        outdir.claim(tmp_path, ["README.md", "adapter_config.json"], "the final outputs")
    assert not (tmp_path / outdir.MANIFEST_FILE).exists()  # nothing recorded when refused
    outdir.claim(tmp_path, ["adapter_config.json"], "the final outputs")
    (tmp_path / "adapter_config.json").write_text("{}")
    outdir.claim(tmp_path, ["adapter_config.json", "loss.png"], "the final outputs")  # its own: fine
    assert (tmp_path / "README.md").read_text() == "mine"


def test_predicted_outputs_depend_on_adapter_or_full_model(tmp_path: Path) -> None:
    for name in ("config.json", "README.md", "model-00001-of-00002.safetensors", "notes.txt", "vocab.json"):
        (tmp_path / name).write_text("x")
    assert outdir.expected_outputs(cfg_of(adapter="lora", lora_target_linear=True), tmp_path) == [
        "README.md", "vocab.json",
    ]  # fmt: skip
    assert outdir.expected_outputs(cfg_of(), tmp_path) == [
        "config.json", "model-00001-of-00002.safetensors", "vocab.json",
    ]  # fmt: skip


# ---------------------------------------------------------------- what a resume may change


def test_every_config_key_has_a_resume_policy() -> None:
    """A new config key must be classified for resume here (refuse / apply / accept / ignore)."""
    keys = set(ResolvedConfig.model_fields)
    assert sorted(keys - set(RESUME_POLICY)) == []
    assert sorted(set(RESUME_POLICY) - keys) == []


def test_the_resume_policies_of_the_keys_the_issue_names() -> None:
    policy = {key: p for key, (p, _) in RESUME_POLICY.items()}
    refused = "learning_rate lr_scheduler warmup_steps micro_batch_size batch_size datasets"
    assert {policy[k] for k in [*refused.split(), "seed"]} == {"refuse"}
    # How a step is spread over ranks and micro-batches may change when batch_size does not: a
    # checkpoint resumes on another world size (tests/invariants/test_distributed.py).
    spread = "gradient_accumulation_steps world_size data_parallel_size distributed_strategy fsdp_config"
    assert {policy[k] for k in spread.split()} == {"accept"}
    assert {policy[k] for k in "logging_steps save_steps eval_steps output_dir debug".split()} == {"accept"}


def test_resume_config_comparison(tmp_path: Path) -> None:
    old = cfg_of(learning_rate=1e-4, logging_steps=1)
    (tmp_path / CONFIG_FILE).write_text(resolved_config_text(old))
    assert check_resume_config(old, tmp_path) == []
    moved = cfg_of(learning_rate=1e-4, logging_steps=1, output_dir="out2", auto_resume_from_checkpoints=True)
    assert [str(c) for c in check_resume_config(moved, tmp_path) or []] == ["output_dir: ./outputs → out2"]
    changes = check_resume_config(cfg_of(learning_rate=1e-4, logging_steps=5, max_grad_norm=0.3), tmp_path)
    assert [(str(c), c.policy) for c in changes or []] == [
        ("max_grad_norm: 1.0 → 0.3", "apply"), ("logging_steps: 1 → 5", "accept"),
    ]  # fmt: skip
    with pytest.raises(CheckpointError, match=r"learning_rate: 0\.0001 → 0\.001 \(the checkpoint's"):
        check_resume_config(cfg_of(learning_rate=1e-3, logging_steps=1), tmp_path)
    assert check_resume_config(old, tmp_path / "nowhere") is None  # a checkpoint without a config
