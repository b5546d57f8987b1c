"""Metrics sinks: metrics.jsonl, TensorBoard, missing backends, the plot, peak memory."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from hellbender.config.normalize import Hardware, normalize
from hellbender.config.schema import HellbenderConfig
from hellbender.train.metrics import (
    JsonlSink,
    Progress,
    RunLogger,
    build_sinks,
    peak_memory_bytes,
    plot_losses,
    read_metrics,
)


def make_cfg(tmp_path: Path, **values: object) -> HellbenderConfig:
    raw = HellbenderConfig.model_validate(
        {"base_model": "x", "datasets": [{"path": "x"}], "bf16": False, "output_dir": str(tmp_path), **values}
    )
    return normalize(raw, world_size=1, hardware=Hardware())[0]


def test_jsonl_records_and_truncation_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    for step in range(1, 6):
        sink.log(step, {"loss": 1.0 / step})
    sink.log(6, {"loss": math.nan})
    sink.close()
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[1]["loss"] == 0.5 and records[5]["loss"] == "nan"
    JsonlSink.truncate_after(path, 3)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_run_logger_continues_a_resumed_file(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, use_tensorboard=False)
    first = RunLogger(cfg, tmp_path, total_steps=10)
    for step in range(1, 8):
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = RunLogger(cfg, tmp_path, total_steps=10, initial_step=5)  # checkpoint at step 5
    resumed.log(6, {"loss": 60.0})
    resumed.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0)]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_is_on_by_default_when_installed(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sinks = build_sinks(make_cfg(tmp_path), tmp_path)
    assert len(sinks) == 2
    for sink in sinks:
        sink.log(3, {"loss": 2.5, "eval_loss": 3.0})
        sink.close()
    acc = EventAccumulator(str(tmp_path / "runs"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "eval/loss"}
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(3, 2.5)]
    assert len(build_sinks(make_cfg(tmp_path, use_tensorboard=False), tmp_path)) == 1


@pytest.mark.parametrize(
    ("key", "value", "module"),
    [("wandb_project", "p", "wandb"), ("mlflow_tracking_uri", "file:///tmp/x", "mlflow")],
)
def test_configured_but_missing_backend_is_an_error(tmp_path: Path, key: str, value: str, module: str) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    with pytest.raises(RuntimeError, match=f"{key}.*pip install {module}"):
        build_sinks(make_cfg(tmp_path, use_tensorboard=False, **{key: value}), tmp_path)


def test_plot_draws_train_and_eval(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    for step in range(1, 11):
        sink.log(step, {"loss": 3.0 - 0.1 * step})
        if step % 5 == 0:
            sink.log(step, {"eval_loss": 3.1 - 0.1 * step})
    sink.close()
    out = plot_losses(path, tmp_path / "loss.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_losses(tmp_path / "missing.jsonl", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_peak_memory_sees_an_allocation() -> None:
    import os

    import torch

    before = peak_memory_bytes()
    current = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    # Enough to lift the resident set 64 MiB above the previous peak (ones() touches every page).
    block = torch.ones((before - current + 64 * 2**20) // 4)
    after = peak_memory_bytes()
    assert after - before >= 32 * 2**20
    del block


def test_plain_progress_lines_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(total_steps=4, initial_step=0)
    progress.update(2, "loss 1.0")
    progress.close()
    err = capsys.readouterr().err
    assert "step 2/4 loss 1.0 eta" in err
    json.dumps(err)  # plain text, no control sequences that break a log file
    assert "\x1b" not in err
