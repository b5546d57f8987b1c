"""What a user sees after preprocessing: the summary table, the length histogram, debug examples.

The report is plain data (:class:`PrepReport`), saved as JSON beside the prepared data, so a run
that reuses the cache shows exactly the table the building run showed.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hellbender.data.errors import BAD_ROW_REASONS, DROP_REASONS

if TYPE_CHECKING:
    from rich.text import Text


@dataclass
class DatasetStats:
    """Counts for one ``datasets:`` / ``test_datasets:`` entry."""

    name: str
    split: str  # "train" | "eval"
    format: str
    rows_read: int = 0
    bad: dict[str, int] = field(default_factory=dict)  # skipped bad rows, by reason
    dropped: dict[str, int] = field(default_factory=dict)  # by DROP_REASONS key
    truncated: int = 0
    extra_chunks: int = 0  # samples added by splitting long completion texts
    no_eot: int = 0  # kept samples where train_on_eos asked for end-of-turn tokens and none was found
    kept: int = 0  # samples kept
    tokens: int = 0
    trained_tokens: int = 0

    def add_bad(self, reason: str, n: int = 1) -> None:
        self.bad[reason] = self.bad.get(reason, 0) + n

    def add_dropped(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


@dataclass
class PrepReport:
    """The outcome of preparing the datasets."""

    datasets: list[DatasetStats]
    sequence_len: int
    train_samples: int = 0
    eval_samples: int = 0
    train_tokens: int = 0
    train_trained_tokens: int = 0
    eval_tokens: int = 0
    eval_trained_tokens: int = 0
    length_percentiles: dict[str, int] = field(default_factory=dict)  # p50 p90 p99 max of train
    cache_dir: str = ""
    from_cache: bool = False
    rejects_file: str | None = None
    histogram: str | None = None
    eval_from: str = ""  # "val_set_size=…" | "test_datasets" | ""

    # -------------------------------------------------------------- persistence

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PrepReport:
        data = json.loads(text)
        data["datasets"] = [DatasetStats(**d) for d in data["datasets"]]
        return cls(**data)

    # -------------------------------------------------------------- totals

    def bad_total(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for d in self.datasets:
            total.update(d.bad)
        return total

    def dropped_total(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for d in self.datasets:
            total.update(d.dropped)
        return total

    # -------------------------------------------------------------- rendering

    def table(self) -> Any:
        """The counts as a rich table: one row per dataset, numbers only, so it fits 80 columns.

        Which reasons make up "bad" and "dropped" is listed under the table
        (:meth:`reason_lines`).
        """
        from rich import box
        from rich.table import Table

        table = Table(
            title="Prepared datasets" + (" (from cache)" if self.from_cache else ""),
            title_justify="left",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            padding=(0, 1, 0, 0),
        )
        table.add_column("dataset", overflow="fold", min_width=12)
        table.add_column("split", no_wrap=True)
        for col in ("read", "kept", "bad", "dropped", "trunc.", "tokens", "trained"):
            table.add_column(col, justify="right", no_wrap=True)
        for d, label in zip(self.datasets, _labels([d.name for d in self.datasets]), strict=True):
            kept = f"{d.kept:,}" + (f" (+{d.extra_chunks:,})" if d.extra_chunks else "")
            table.add_row(
                label,
                d.split,
                f"{d.rows_read:,}",
                kept,
                f"{sum(d.bad.values()):,}",
                f"{sum(d.dropped.values()):,}",
                f"{d.truncated:,}",
                _compact(d.tokens),
                _compact(d.trained_tokens),
            )
        return table

    def reason_lines(self) -> list[str]:
        """Per dataset, what the bad and dropped counts consist of."""
        lines = []
        for d in self.datasets:
            parts = []
            if d.bad:
                parts.append("bad rows skipped: " + _reasons(d.bad, BAD_ROW_REASONS))
            if d.dropped:
                parts.append("dropped: " + _reasons(d.dropped, DROP_REASONS))
            if d.extra_chunks:
                parts.append(f"long texts split into {d.extra_chunks:,} extra chunks")
            if d.no_eot:
                parts.append(
                    f"WARNING: no end-of-turn token found to train in {d.no_eot:,} of {d.kept:,} samples"
                )
            if parts:
                lines.append(f"{_short(d.name)} ({d.split}): " + "; ".join(parts))
        return lines

    def summary_lines(self) -> list[str]:
        """The lines printed under the table: totals, lengths, where things are."""
        lines = [
            f"train: {self.train_samples:,} samples, {self.train_tokens:,} tokens "
            f"({self.train_trained_tokens:,} trained)",
        ]
        if self.eval_samples or self.eval_from:
            lines.append(
                f"eval: {self.eval_samples:,} samples, {self.eval_tokens:,} tokens "
                f"({self.eval_trained_tokens:,} trained){' from ' + self.eval_from if self.eval_from else ''}"
            )
        if self.length_percentiles:
            p = self.length_percentiles
            lines.append(
                f"sample length (tokens): p50 {p['p50']:,}  p90 {p['p90']:,}  p99 {p['p99']:,}  "
                f"max {p['max']:,}  (sequence_len {self.sequence_len:,})"
            )
        lines.append(f"cache: {self.cache_dir}" + (" (reused)" if self.from_cache else ""))
        if self.histogram:
            lines.append(f"length histogram: {self.histogram}")
        if self.rejects_file:
            lines.append(f"rejected rows: {self.rejects_file}")
        return lines

    def print(self, console: Any | None = None) -> None:
        """Print to a rich console (colour on a terminal)."""
        from rich.console import Console

        console = console or Console()
        console.print(self.table())
        for line in self.reason_lines() + self.summary_lines():
            console.print(line, highlight=False, markup=False, soft_wrap=True)

    def render(self, width: int = 100) -> str:
        """The table and summary as plain text (for logs and tests)."""
        import io

        from rich.console import Console

        buf = io.StringIO()
        self.print(Console(file=buf, width=width, color_system=None, force_terminal=False))
        return buf.getvalue()


def _compact(n: int) -> str:
    """Token counts in 4-6 characters (12.3k, 190.4M): exact totals are printed under the table."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= limit:
            return f"{n / limit:.1f}{suffix}"
    return str(n)


def _labels(names: list[str]) -> list[str]:
    """Short table labels: the last path component, or more of the path where two would collide."""
    for depth in range(1, 6):
        labels = ["/".join(Path(n).parts[-depth:]) or n for n in names]
        if len(set(labels)) == len(set(names)):
            return labels
    return names


def _short(name: str, width: int = 40) -> str:
    """Long paths keep their informative end (the file name) in the table."""
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _reasons(counts: dict[str, int], names: dict[str, str]) -> str:
    if not counts:
        return "-"
    return ", ".join(f"{names.get(k, k)}: {v:,}" for k, v in sorted(counts.items()) if v)


def length_percentiles(lengths: np.ndarray) -> dict[str, int]:
    if len(lengths) == 0:
        return {}
    q = np.percentile(lengths, [50, 90, 99], method="lower")
    return {"p50": int(q[0]), "p90": int(q[1]), "p99": int(q[2]), "max": int(lengths.max())}


def histogram_bins(lengths: np.ndarray, sequence_len: int, count: int = 60) -> np.ndarray:
    """Bin edges from 0 to the larger of ``sequence_len`` and the longest sample.

    The x axis always reaches ``sequence_len`` (its marker line is drawn there), so bins fitted
    to the data's own range would be slivers when the samples are much shorter than
    ``sequence_len``: 100 samples of 30-40 tokens at 2048 drew bars under one pixel wide. Fixed
    bins over the whole axis keep every bar at least 1/60 of its width.
    """
    top = max(sequence_len, int(lengths.max()) if len(lengths) else 0, 1)
    return np.linspace(0, top, count + 1)


def histogram_figure(lengths: np.ndarray, sequence_len: int) -> Any:
    """The histogram of sample lengths with ``sequence_len`` marked, as a matplotlib ``Figure``.

    Uses matplotlib's object API with the Agg canvas directly: no pyplot, so no global backend
    switch that could disturb other plotting in the same process.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if len(lengths):
        # a list: matplotlib's stubs type bin edges as a Sequence, which an ndarray is not
        ax.hist(lengths, bins=histogram_bins(lengths, sequence_len).tolist(), color="#4C72B0")
    ax.axvline(sequence_len, color="#C44E52", linestyle="--", label=f"sequence_len = {sequence_len}")
    ax.set_xlabel("sample length (tokens)")
    ax.set_ylabel("samples")
    ax.set_title(f"{len(lengths):,} training samples")
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def save_histogram(lengths: np.ndarray, sequence_len: int, path: Path) -> Path:
    """A PNG histogram of sample lengths with ``sequence_len`` marked."""
    histogram_figure(lengths, sequence_len).savefig(path)
    return path


def format_example(input_ids: list[int], labels: list[int], tokenizer: Any, *, color: bool) -> Text | str:
    """One sample with its trained tokens highlighted.

    With ``color``: a rich ``Text`` (trained runs green on a terminal). Without: a string with each
    trained run in [brackets]. Runs are decoded whole, so multi-byte characters split over tokens
    still print correctly.
    """
    from rich.text import Text

    runs: list[tuple[bool, list[int]]] = []
    for tok, label in zip(input_ids, labels, strict=True):
        trained = label != -100
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(tok)
        else:
            runs.append((trained, [tok]))
    pieces: list[tuple[bool, str]] = [
        (trained, tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
        for trained, ids in runs
    ]
    if not color:
        return "".join(f"[{piece}]" if trained else piece for trained, piece in pieces)
    text = Text()
    for trained, piece in pieces:
        text.append(piece, style="bold green" if trained else "dim")
    return text
