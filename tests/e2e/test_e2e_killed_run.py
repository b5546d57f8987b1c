"""A run SIGKILLed while writing a checkpoint resumes from the last complete one, exactly.

The child process is the real ``hellbender train`` command; the only thing the test adds is a
pause inside the second checkpoint write (after the weights and the optimizer state are on disk,
before the state file and the rename), announced through a marker file so the parent can kill the
child at exactly that moment. The parent then resumes with ``auto_resume_from_checkpoints`` and
compares every loss after the resume point, and the final adapter, with an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hellbender.commands.train import run_train
from hellbender.config.load import load_config
from hellbender.testing.projects import kill_and_reap, start_logged, wait_for_file
from hellbender.testing.projects import write_killed_run_project as write_project
from hellbender.train import checkpoint as ckpt
from hellbender.train.metrics import read_metrics
from hellbender.train.output_dir import LOCK_FILE, MANIFEST_FILE

CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hellbender.train import checkpoint as ckpt

    marker = Path(sys.argv[2])
    original = ckpt._write_training_state
    calls = []

    def pausing(path, *args, **kwargs):
        original(path, *args, **kwargs)
        calls.append(path)
        if len(calls) == 2:  # mid-write of the second checkpoint: weights + optimizer written
            marker.write_text(str(path))
            time.sleep(600)

    ckpt._write_training_state = pausing
    from hellbender.cli import main
    main(["train", sys.argv[1]])
    """
)


def test_sigkill_during_checkpoint_write_then_auto_resume(tmp_path: Path) -> None:
    killed_out = tmp_path / "killed"
    marker = tmp_path / "paused"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WORLD_SIZE": "1"}
    log = tmp_path / "child.log"
    config = write_project(tmp_path, killed_out)
    child = start_logged([sys.executable, "-c", CHILD, str(config), str(marker)], log, env)
    try:
        wait_for_file(child, marker, log, "the pause in the second checkpoint write")
    finally:
        kill_and_reap(child, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL

    # The first checkpoint is complete; the second exists only as a temporary folder.
    assert [p.name for p in ckpt.list_checkpoints(killed_out)] == ["checkpoint-4"]
    assert (killed_out / ".tmp-checkpoint-8").is_dir()
    assert not (killed_out / "checkpoint-8").exists()

    cfg, _ = load_config(write_project(tmp_path, killed_out, auto_resume_from_checkpoints=True), world_size=1)
    resumed = run_train(cfg)
    assert resumed.resumed_from == killed_out / "checkpoint-4"
    assert not (killed_out / ".tmp-checkpoint-8").exists()

    straight_cfg, _ = load_config(write_project(tmp_path, tmp_path / "straight"), world_size=1)
    straight = run_train(straight_cfg)
    assert resumed.losses == {k: v for k, v in straight.losses.items() if k > 4}
    adapter = load_file(killed_out / "adapter_model.safetensors")
    reference = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    assert adapter.keys() == reference.keys()
    assert all(torch.equal(adapter[k], reference[k]) for k in adapter)
    # metrics.jsonl tells one continuous story: steps 1-4 from the killed process, 5-12 resumed.
    steps = [r["step"] for r in read_metrics(killed_out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 13))


def test_a_crash_during_the_final_write_keeps_the_previous_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished run is continued (auto-resume: nothing left to train, the outputs are written
    again) and dies with the new adapter file half-written. The previous outputs must be
    untouched and loadable; the next start clears the leftover and writes them whole.

    An exception stands in for the kill: nothing between it and the files cleans up, so the disk
    is left as a SIGKILL at that moment would leave it.
    """
    out = tmp_path / "final"
    cfg, _ = load_config(write_project(tmp_path, out, max_steps=2, save_steps=2, lora_dropout=0.0,
                                       auto_resume_from_checkpoints=True), world_size=1)  # fmt: skip
    run_train(cfg)
    outputs = ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json")
    before = {name: (out / name).read_bytes() for name in outputs}

    real_save = ckpt.save_model_weights

    def dies_half_way(model: torch.nn.Module, path: Path, *rest: object) -> None:
        real_save(model, path)
        weights = path / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        raise OSError("killed while writing the final adapter (simulated)")

    monkeypatch.setattr(ckpt, "save_model_weights", dies_half_way)
    with pytest.raises(OSError, match="simulated"):
        run_train(cfg)
    monkeypatch.setattr(ckpt, "save_model_weights", real_save)
    assert {name: (out / name).read_bytes() for name in outputs} == before
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")), str(out))

    assert run_train(cfg).resumed_from == out / "checkpoint-2"  # nothing left to train: outputs only
    kept = {LOCK_FILE, MANIFEST_FILE}  # the run's lock and its list of outputs, not leftovers
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name not in kept]
    assert {name: (out / name).read_bytes() for name in outputs} == before  # the same weights, whole
