"""A real full disk (a small tmpfs, filled to the last byte) at each place a run writes.

Each case runs the real ``hellbender train`` (or ``preprocess``) command in-process with
``output_dir`` on the small disk and fills the disk at one moment: before a checkpoint, while
metrics are appended, before the final outputs are published, before the dataset cache is
written. Every case must end in one ``ERROR: disk full: …`` line (exit 1, no traceback, no crash
file) naming the path and the space, leave the last checkpoint loadable, and — once the space is
back — let the run continue to the same weights an uninterrupted run reaches.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from chaos_helpers import fill
from click.testing import CliRunner, Result
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hellbender.cli import BUG_NOTICE, CRASH_FILE_PREFIX, main
from hellbender.commands.train import run_train
from hellbender.config.load import load_config
from hellbender.testing.projects import write_killed_run_project
from hellbender.train import checkpoint as ckpt
from hellbender.train import metrics
from hellbender.train.metrics import read_metrics

pytestmark = pytest.mark.chaos

ENV: dict[str, str | None] = {"PYTORCH_ALLOC_CONF": None, "PYTORCH_CUDA_ALLOC_CONF": None, "WORLD_SIZE": "1"}
STEPS = 6


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the killed-run project's tiny model and data (written by :func:`write_config`)
    and of their prepared dataset cache."""
    return tmp_path_factory.mktemp("project")


def write_config(project: Path, out: Path, **extra: Any) -> Path:
    config = yaml.safe_load(write_killed_run_project(project, out, max_steps=STEPS, save_steps=2).read_text())
    config.update(extra)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def reference(project: Path) -> Path:
    """The output_dir of the same run, uninterrupted, on a disk with room."""
    out = project / "reference"
    cfg, _ = load_config(str(write_config(project, out)), world_size=1)
    run_train(cfg)
    return out


@pytest.fixture(autouse=True)
def system_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system's temporary folder (crash reports, weights kept elsewhere): fresh per test."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=ENV, catch_exceptions=False)


def assert_disk_full_error(result: Result, *expected: str, sized: bool = True) -> str:
    """Exit 1 and one line: the path, the space needed (unless nothing of it could be written, so
    there is nothing to estimate it from) and the space free."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and BUG_NOTICE not in result.output, result.output
    [line] = [x for x in result.stderr.splitlines() if x.startswith("ERROR")]
    assert line.startswith("ERROR: disk full: "), line
    assert ("needs about" if sized else "needs") in line and "free there" in line, line
    for text in expected:
        assert text in line, line
    return line


def fill_before(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str, disk: Path, call: int = 1, leave: int = 0
) -> None:
    """Fill ``disk`` (but ``leave`` bytes) right before the ``call``-th call of ``module.name``."""
    real: Callable[..., Any] = getattr(module, name)
    calls = []

    def filling(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == call:
            fill(disk, leave)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, filling)


def loss_records(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def assert_same_adapter(folder: Path, reference: Path) -> None:
    got = load_file(folder / "adapter_model.safetensors")
    want = load_file(reference / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


# No byte left: the first mkdir fails (an OSError with ENOSPC). 12 KiB left: the folder is made and
# the weights do not fit — safetensors raises its own SafetensorError, which carries no errno.
@pytest.mark.parametrize("leave", [0, 12 * 1024], ids=["no-byte-left", "12KiB-left"])
def test_a_full_disk_at_a_checkpoint(
    project: Path,
    reference: Path,
    small_disk: Path,
    system_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    leave: int,
) -> None:
    out = small_disk / "out"
    config = write_config(project, out, auto_resume_from_checkpoints=True)
    fill_before(monkeypatch, ckpt, "save_checkpoint", small_disk, call=2, leave=leave)
    result = invoke("train", str(config))
    line = assert_disk_full_error(result, str(out / "checkpoint-4"), "checkpoint-2 is intact")
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")], line  # its space is back
    assert not list(system_tmp.glob(f"{CRASH_FILE_PREFIX}*")) and not list(out.glob(f"{CRASH_FILE_PREFIX}*"))
    base = AutoModelForCausalLM.from_pretrained(str(project / "model"))
    PeftModel.from_pretrained(base, str(out / "checkpoint-2"))  # the previous checkpoint loads

    monkeypatch.undo()
    (small_disk / "ballast").unlink()
    result = invoke("train", str(config))
    assert result.exit_code == 0, result.output
    assert_same_adapter(out, reference)
    assert loss_records(out) == loss_records(reference)


def test_a_full_disk_while_appending_metrics_and_a_cut_line_left_by_it(
    project: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    out = small_disk / "out"
    # Long runs of records without a checkpoint: the metrics file is what hits the full disk.
    config = write_config(project, out, max_steps=60, save_steps=60, logging_steps=1)
    fill_before(monkeypatch, metrics.JsonlSink, "log", small_disk, call=3)
    assert_disk_full_error(invoke("train", str(config)), str(out / "metrics.jsonl"))
    records = read_metrics(out / "metrics.jsonl")  # every line whole
    assert records and all(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines())
    monkeypatch.undo()

    # What the disk did to the file before: an append cut mid-record (the old sink, another tool).
    cut_by = None
    try:
        with (out / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": 99, "loss": 1.0, "note": "x" * 9000}) + "\n")
    except OSError as exc:
        cut_by = exc
    assert cut_by is not None
    with pytest.raises(ValueError, match="Unterminated string"):
        json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])

    # That folder is not bricked: the next run warns, repairs the file and trains.
    (small_disk / "ballast").unlink()
    result = invoke("train", str(write_config(project, out, max_steps=2, save_strategy="no")))
    assert result.exit_code == 0, result.output
    assert "was cut short" in result.stderr and str(out / "metrics.jsonl") in result.stderr
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2]


def test_a_full_disk_at_the_final_publish_without_checkpoints_keeps_the_weights(
    project: Path, reference: Path, small_disk: Path, system_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = small_disk / "out"
    config = write_config(project, out, save_strategy="no")
    fill_before(monkeypatch, ckpt, "publish_files", small_disk)
    line = assert_disk_full_error(invoke("train", str(config)), str(out), "No checkpoint holds")
    [kept] = [p for p in system_tmp.iterdir() if p.name.startswith("hellbender-unpublished-")]
    assert str(kept) in line
    assert_same_adapter(kept, reference)  # the trained weights, whole, where the error says
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]


def test_a_full_disk_at_the_final_publish_keeps_the_last_checkpoint(
    project: Path, reference: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = small_disk / "out"
    config = write_config(project, out, save_total_limit=1, auto_resume_from_checkpoints=True)
    fill_before(monkeypatch, ckpt, "publish_files", small_disk)
    assert_disk_full_error(invoke("train", str(config)), str(out), f"checkpoint-{STEPS}")
    assert [p.name for p in ckpt.list_checkpoints(out)] == [f"checkpoint-{STEPS}"]
    assert_same_adapter(out / f"checkpoint-{STEPS}", reference)

    monkeypatch.undo()
    (small_disk / "ballast").unlink()
    result = invoke("train", str(config))  # nothing left to train: only the outputs are written
    assert result.exit_code == 0, result.output
    assert_same_adapter(out, reference)


def test_a_full_disk_while_writing_the_dataset_cache(project: Path, small_disk: Path) -> None:
    prepared = small_disk / "prepared"
    prepared.mkdir()
    config = write_config(project, small_disk / "out", dataset_prepared_path=str(prepared))
    fill(small_disk)
    result = invoke("preprocess", str(config))
    assert_disk_full_error(result, str(prepared), "dataset_prepared_path", sized=False)
    assert list(prepared.iterdir()) == []  # no half-written cache folder left behind
