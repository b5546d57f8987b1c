"""Metrics sinks: metrics.jsonl, TensorBoard, W&B, MLflow, missing backends, the plot, peak memory."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from hellbender.config.hardware import Hardware
from hellbender.config.normalize import normalize
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
    assert [(r["step"], r["loss"]) for r in records] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 5.0),
        (6, 60.0),
    ]


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
def test_configured_but_missing_backend_is_an_error(
    tmp_path: Path, key: str, value: str, module: str
) -> None:
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


# ---------------------------------------------------------------- W&B and MLflow
#
# Neither package is installed in the test environment (and neither is a dependency), so each is
# replaced by a module that records calls. Their functions have the parameter names of the
# documented public API and no **kwargs, so a misspelt or invented keyword fails with TypeError:
#   wandb.init(entity, project, dir, id, name, notes, tags, config, group, job_type, mode, resume,
#     settings) -> Run; Run.log(data, step=None, commit=None); Run.finish(exit_code=None, quiet=None)
#     (docs.wandb.ai/ref/python/init, .../functions/finish)
#   mlflow.set_tracking_uri(uri); set_experiment(experiment_name=None, experiment_id=None);
#     start_run(run_id=None, experiment_id=None, run_name=None, nested=False, parent_run_id=None,
#     tags=None, description=None, log_system_metrics=None); log_dict(dictionary, artifact_file,
#     run_id=None); log_metrics(metrics, step=None, synchronous=None, run_id=None, timestamp=None);
#     end_run(status="FINISHED")  (mlflow.org/docs, python_api/mlflow)


class FakeWandb:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def init(self, entity=None, project=None, dir=None, id=None, name=None, notes=None, tags=None,
             config=None, group=None, job_type=None, mode=None, resume=None,
             settings=None) -> FakeWandb:  # fmt: skip
        assert mode in (None, "online", "offline", "disabled")
        assert resume in (None, True, False, "allow", "never", "must", "auto")
        assert config is None or isinstance(config, dict)
        json.dumps(config)  # W&B stores the config as JSON
        self.calls.append(("init", {"entity": entity, "project": project, "dir": dir, "id": id, "name": name,
                                    "config": config, "mode": mode, "resume": resume}))  # fmt: skip
        return self  # the Run

    def log(self, data: dict[str, Any], step: int | None = None, commit: bool | None = None) -> None:
        assert isinstance(data, dict) and isinstance(step, int)
        self.calls.append(("log", (step, data)))

    def finish(self, exit_code: int | None = None, quiet: bool | None = None) -> None:
        self.calls.append(("finish", exit_code))


class FakeMlflow:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.active = False

    def set_tracking_uri(self, uri: str) -> None:
        self.calls.append(("set_tracking_uri", uri))

    def set_experiment(self, experiment_name: str | None = None, experiment_id: str | None = None) -> None:
        self.calls.append(("set_experiment", experiment_name))

    def start_run(self, run_id=None, experiment_id=None, run_name=None, nested=False, parent_run_id=None,
                  tags=None, description=None, log_system_metrics=None) -> None:  # fmt: skip
        assert not self.active, "a run is already active"
        self.active = True
        self.calls.append(("start_run", run_name))

    def log_dict(self, dictionary: dict[str, Any], artifact_file: str, run_id: str | None = None) -> None:
        assert self.active and artifact_file.endswith((".json", ".yaml", ".yml"))
        json.dumps(dictionary)
        self.calls.append(("log_dict", (artifact_file, dictionary)))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, synchronous: bool | None = None,
                    run_id: str | None = None, timestamp: int | None = None) -> None:  # fmt: skip
        assert self.active and isinstance(step, int)
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values()), metrics
        self.calls.append(("log_metrics", (step, metrics)))

    def end_run(self, status: str = "FINISHED") -> None:
        assert self.active
        self.active = False
        self.calls.append(("end_run", status))


def install(monkeypatch: pytest.MonkeyPatch, name: str, fake: object) -> None:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)  # importlib's find_spec reads it
    for attr in dir(fake):
        if not attr.startswith("_") and callable(getattr(fake, attr)):
            setattr(module, attr, getattr(fake, attr))
    monkeypatch.setitem(sys.modules, name, module)


def test_wandb_and_mlflow_receive_every_record_of_a_training_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real (tiny) training run with both backends configured: each gets exactly the records of
    metrics.jsonl, in order, at their steps, and its run is opened once and closed once."""
    from hellbender.testing.tiny import build_tiny_model
    from hellbender.train.loop import train

    wandb, mlflow = FakeWandb(), FakeMlflow()
    install(monkeypatch, "wandb", wandb)
    install(monkeypatch, "mlflow", mlflow)
    out = tmp_path / "out"
    cfg = make_cfg(
        tmp_path / "cfg-dir", use_tensorboard=False, sequence_len=32, max_steps=4, eval_steps=2,
        save_strategy="no", wandb_project="proj", wandb_entity="team", wandb_name="run-a",
        wandb_run_id="id-1", wandb_mode="offline", mlflow_tracking_uri=f"file://{tmp_path}/mlruns",
        mlflow_experiment_name="exp", mlflow_run_name="run-a",
    )  # fmt: skip
    samples = [
        {"input_ids": list(range(5 + i, 15 + i)), "labels": list(range(5 + i, 15 + i))} for i in range(6)
    ]
    result = train(cfg, build_tiny_model(seed=0), samples[:4], samples[4:], pad_token_id=3, output_dir=out)

    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 2, 3, 4, 4]  # plan, train steps, evals at 2 and 4
    expected = [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in records]

    assert wandb.calls[0] == ("init", {"entity": "team", "project": "proj", "dir": str(out), "id": "id-1",
                                       "name": "run-a", "config": cfg.model_dump(mode="json"),
                                       "mode": "offline", "resume": "allow"})  # fmt: skip
    assert [c[1] for c in wandb.calls[1:-1]] == expected
    assert [c[0] for c in wandb.calls[1:-1]] == ["log"] * len(expected) and wandb.calls[-1] == (
        "finish",
        None,
    )
    assert [(step, data["loss"]) for step, data in expected if "loss" in data] == list(result.losses.items())

    assert mlflow.calls[:4] == [
        ("set_tracking_uri", f"file://{tmp_path}/mlruns"), ("set_experiment", "exp"), ("start_run", "run-a"),
        ("log_dict", ("config.resolved.json", cfg.model_dump(mode="json"))),
    ]  # fmt: skip
    floats = [(step, {k: float(v) for k, v in data.items()}) for step, data in expected]
    assert [c[1] for c in mlflow.calls[4:-1]] == floats
    assert mlflow.calls[-1] == ("end_run", "FINISHED") and not mlflow.active


def test_mlflow_gets_only_finite_numbers_and_wandb_starts_a_new_run_without_an_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb, mlflow = FakeWandb(), FakeMlflow()
    install(monkeypatch, "wandb", wandb)
    install(monkeypatch, "mlflow", mlflow)
    cfg = make_cfg(tmp_path, use_tensorboard=False, wandb_project="proj", mlflow_experiment_name="exp")
    logger = RunLogger(cfg, tmp_path, total_steps=2)
    logger.log(1, {"loss": 2.5, "epoch": 1})
    logger.log(2, {"loss": math.nan, "stopped": 1.0})
    logger.close()
    assert wandb.calls[0][1]["resume"] is None and wandb.calls[0][1]["id"] is None
    logged = [data for name, (_step, data) in (c for c in wandb.calls if c[0] == "log")]
    assert math.isnan(logged[1]["loss"]) and logged[1]["stopped"] == 1.0  # W&B takes NaN as it is
    # No tracking URI configured: MLflow keeps its own default; NaN is left out (MLflow wants floats).
    assert mlflow.calls[0] == ("set_experiment", "exp")
    metrics = [c[1] for c in mlflow.calls if c[0] == "log_metrics"]
    assert metrics == [(1, {"loss": 2.5, "epoch": 1.0}), (2, {"stopped": 1.0})]
