"""Where training numbers go: progress bar, ``metrics.jsonl``, TensorBoard, W&B, MLflow, ``loss.png``.

Every sink has the same two methods (``log(step, metrics)`` and ``close()``) and
:class:`RunLogger` fans a record out to all of them, so the loop calls one object and never
knows which backends are on. ``metrics.jsonl`` is the source of truth (one JSON object per line,
flushed per record so a killed run keeps everything up to its last step); the plot is drawn from
it, not from memory, so ``loss.png`` also covers a resumed run's earlier half. Every checkpoint
carries a copy of it, from which a resumed run restores the records up to its step — also when it
resumes into another ``output_dir``.

A full disk never leaves a cut record behind: an append that fails is cut back to the last whole
line and raises a :class:`~hellbender.errors.DiskFullError`. A file whose last line was cut anyway
(by an older version, or by another tool) is read without it, with a warning naming the file, and
repaired when a run restores it; a broken line elsewhere is a :class:`MetricsFileError` naming the
file and the line.

Only the main rank logs (the loop constructs a :class:`RunLogger` with ``enabled=False`` on the
others), which keeps this module free of any distributed logic.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Mapping
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Protocol

from hellbender.config.schema import ResolvedConfig
from hellbender.errors import HellbenderError, UnavailableError
from hellbender.files import disk_full_error, is_disk_full, write_atomically

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


class MetricsFileError(HellbenderError, ValueError):
    """A ``metrics.jsonl`` with a line that is not a record (other than a cut last line)."""


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA ``max_memory_allocated`` on a GPU, else the peak RSS.

    ``ru_maxrss`` is the kernel's high-water mark of the resident set, so it needs no sampling
    thread (and no psutil); Linux reports KiB, macOS bytes.
    """
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class Sink(Protocol):
    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Append-only ``metrics.jsonl``: one record per line, flushed at once.

    On resume, records after the checkpoint's step are dropped first (:meth:`truncate_after`):
    they belong to the abandoned continuation and would draw a second, diverging curve.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: a record is on disk when log() returns, and one that failed leaves nothing
        # in a buffer for close() to write (and fail on) again.
        self._file = path.open("ab", buffering=0)

    @staticmethod
    def truncate_after(path: Path, step: int) -> None:
        JsonlSink.restore(path, path, step)

    @staticmethod
    def restore(source: Path, path: Path, step: int) -> None:
        """Make ``path`` hold the records of ``source`` up to ``step`` (``source`` may be ``path``)."""
        if not source.exists():
            return
        kept = [line for line, record in _parse(source) if record.get("step", 0) <= step]
        write_atomically(
            path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        data = memoryview((json.dumps(record) + "\n").encode())
        fd = self._file.fileno()
        end = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)  # no cut record: the file ends with the last whole one
            if is_disk_full(exc, self.path):
                raise disk_full_error(
                    self.path,
                    f"appending the step-{step} record to {self.path.name}",
                    len(data),
                    "It holds every record before this one. Free some space and continue the run "
                    "with auto_resume_from_checkpoints: true (from its newest checkpoint).",
                ) from exc
            raise

    def close(self) -> None:
        self._file.close()


def _jsonable(value: Any) -> Any:
    # JSON has no NaN/inf; write them as strings so a diverged step is still recorded and readable.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, int | float):
                self._writer.add_scalar(_tb_tag(key), value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _tb_tag(key: str) -> str:
    # TensorBoard groups scalars by the prefix before "/": train/loss next to eval/loss.
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


class WandbSink:
    def __init__(self, cfg: ResolvedConfig, output_dir: Path) -> None:
        import wandb

        self._wandb = wandb
        self._run = wandb.init(
            project=cfg.wandb_project,
            entity=cfg.wandb_entity,
            name=cfg.wandb_name,
            id=cfg.wandb_run_id,
            mode=cfg.wandb_mode,
            resume="allow" if cfg.wandb_run_id else None,
            # Beside metrics.jsonl: the loop may write to another folder than cfg.output_dir.
            dir=str(output_dir),
            config=cfg.model_dump(mode="json"),
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowSink:
    def __init__(self, cfg: ResolvedConfig) -> None:
        import mlflow

        self._mlflow = mlflow
        if cfg.mlflow_tracking_uri:
            mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
        if cfg.mlflow_experiment_name:
            mlflow.set_experiment(cfg.mlflow_experiment_name)
        mlflow.start_run(run_name=cfg.mlflow_run_name)
        # The whole config as one artifact: MLflow params are capped at 500 characters each.
        mlflow.log_dict(cfg.model_dump(mode="json"), "config.resolved.json")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        finite = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        self._mlflow.log_metrics(finite, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


def _require(module: str, key: str, extra: str = "logging") -> None:
    if find_spec(module) is None:
        raise UnavailableError(
            f"`{key}` is set, so metrics go to {module}, but {module} is not installed: "
            f"pip install {module} (or pip install 'hellbender[{extra}]'), or remove `{key}`."
        )


def build_sinks(cfg: ResolvedConfig, output_dir: Path) -> list[Sink]:
    """The configured sinks. A backend that is configured but missing is an error, not a skip:
    a user who set ``wandb_project`` and finds no run afterwards has lost the run's record."""
    sinks: list[Sink] = [JsonlSink(output_dir / METRICS_FILE)]
    use_tb = cfg.use_tensorboard
    if use_tb is None:
        use_tb = find_spec("tensorboard") is not None
    elif use_tb:
        _require("tensorboard", "use_tensorboard")
    if use_tb:
        sinks.append(TensorBoardSink(output_dir / "runs"))
    if cfg.wandb_project:
        _require("wandb", "wandb_project")
        sinks.append(WandbSink(cfg, output_dir))
    if cfg.mlflow_tracking_uri or cfg.mlflow_experiment_name:
        _require("mlflow", "mlflow_tracking_uri" if cfg.mlflow_tracking_uri else "mlflow_experiment_name")
        sinks.append(MlflowSink(cfg))
    return sinks


class Progress:
    """A rich progress bar with ETA on a terminal; one plain line per logged step elsewhere.

    rich draws nothing useful into a CI log or a pipe, so there the same facts are printed as
    text lines (to stderr, keeping stdout for results).
    """

    def __init__(self, total_steps: int, initial_step: int = 0, *, enabled: bool = True) -> None:
        from rich.console import Console

        self.total = total_steps
        self.enabled = enabled
        self._console = Console(stderr=True)
        self._start = time.perf_counter()
        self._start_step = initial_step
        self._bar: Any = None
        if enabled and self._console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self._console,
            )
            self._task = self._bar.add_task("train", total=total_steps, completed=initial_step, info="")
            self._bar.start()

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
            return
        done = step - self._start_step
        elapsed = time.perf_counter() - self._start
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        self._console.print(
            f"step {step}/{self.total} {info} eta {_fmt_seconds(eta)}", highlight=False, soft_wrap=True
        )

    def message(self, text: str) -> None:
        if self.enabled:
            self._console.print(text, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _fmt_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class RunLogger:
    """One object the loop talks to: sinks plus the progress bar; a no-op on non-main ranks.

    ``history``: the ``metrics.jsonl`` of the run being resumed (a checkpoint's copy); its records
    up to ``initial_step`` replace ``output_dir/metrics.jsonl``. Without it, that file is only cut
    back to ``initial_step``.
    """

    def __init__(
        self,
        cfg: ResolvedConfig,
        output_dir: Path,
        *,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        history: Path | None = None,
    ) -> None:
        self.enabled = enabled
        self.sinks: list[Sink] = []
        if enabled:
            path = output_dir / METRICS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            JsonlSink.restore(
                history if history is not None and history.is_file() else path, path, initial_step
            )
            self.sinks = build_sinks(cfg, output_dir)
        self.progress = Progress(total_steps, initial_step, enabled=enabled)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        self.progress.close()
        for sink in self.sinks:
            sink.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [record for _, record in _parse(path)]


def _parse(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Every record of ``path`` with its line. A cut last line — a write the disk had no room for
    — is dropped with a warning; any other line that is not a JSON object is an error."""
    lines = [
        (number, line)
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if line.strip()
    ]
    parsed: list[tuple[str, dict[str, Any]]] = []
    for number, line in lines:
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as exc:  # json.JSONDecodeError included
            if number == lines[-1][0]:
                logger.warning(
                    "%s: its last line (line %d) was cut short, as a full disk or a killed write "
                    "leaves it; dropped it: %.80s",
                    path, number, line,
                )  # fmt: skip
                break
            raise MetricsFileError(
                f"{path}, line {number}: not a metrics record ({exc}). Fix or delete that line, or "
                "delete the file (the run's history of metrics goes with it)."
            ) from exc
        parsed.append((line, record))
    return parsed


def plot_losses(metrics_path: Path, out_path: Path) -> Path | None:
    """Draw train and eval loss against the optimizer step into ``out_path`` (PNG).

    Uses matplotlib's Agg backend through the object API (no pyplot global state), so it works
    headless and never touches a user's interactive backend. Returns None when there is nothing
    to draw.
    """
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), int | float)]
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), int | float)]
    if not train and not evals:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return write_atomically(out_path, lambda tmp: fig.savefig(tmp, format="png"))  # never a truncated PNG
