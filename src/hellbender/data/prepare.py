"""``datasets:`` → tokenized, label-masked train / eval sets, cached on disk. The one entry point.

Per dataset entry: read rows with their locations (:mod:`~hellbender.data.sources`), check and
normalize them in this process (bad rows stop the run or are skipped and written to the rejects
file), then render + tokenize + apply the length rules in ``dataset_num_proc`` worker processes
(:func:`hellbender.data.tokenize.tokenize_batch` through ``datasets.map``). Then merge the
entries, drop exact duplicates if asked, shuffle with ``seed``, split off the evaluation set,
and save everything into a content-keyed cache folder, atomically (:mod:`~hellbender.data.cache`).

The returned datasets have exactly three columns: ``input_ids``, ``labels`` (aligned with
``input_ids``, not shifted; -100 where not trained) and ``length``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hellbender.config.schema import DatasetConfig, ResolvedConfig
from hellbender.data.cache import (
    atomic_folder,
    cache_ingredients,
    cache_key,
    is_complete,
    prepared_root,
    tokenizer_fingerprint,
    write_meta,
)
from hellbender.data.errors import BadRow, DataError
from hellbender.data.formats import PromptFormat, build_format
from hellbender.data.report import DatasetStats, PrepReport, length_percentiles, save_histogram
from hellbender.data.sources import Location, Source, resolve_source
from hellbender.data.tokenize import Limits, output_features, tokenize_batch

FINAL_COLUMNS = ["input_ids", "labels", "length"]
REJECTS_FILE = "rejects.jsonl"
REPORT_FILE = "report.json"
HISTOGRAM_FILE = "lengths.png"
MAP_BATCH_SIZE = 256
# Below this many rows per process, starting workers costs more than it saves.
MIN_ROWS_PER_PROCESS = 64

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """What the training loop gets: the datasets, the report and where the cache is."""

    train: Any  # datasets.Dataset
    eval: Any | None  # datasets.Dataset | None
    report: PrepReport
    cache_dir: Path
    from_cache: bool


@dataclass
class _Entry:
    """One dataset entry on its way through preparation."""

    config: DatasetConfig
    source: Source
    fmt: PromptFormat
    stats: DatasetStats


def prepare_datasets(cfg: ResolvedConfig, tokenizer: Any, *, rebuild: bool = False) -> PreparedData:
    """Prepare (or reuse from the cache) the training and evaluation sets of ``cfg``.

    Raises :class:`DataError` for anything that stops preparation: a missing file, an offline hub
    id, an unusable template, a bad row under ``on_bad_row: error`` (named by file and line), or
    no training sample left.
    """
    train, evaluation, ingredients = _plan(cfg, tokenizer)
    final = prepared_root(cfg).resolve() / cache_key(ingredients)
    if not rebuild and is_complete(final):
        return load_prepared(final, from_cache=True)
    with atomic_folder(final) as tmp:
        _build(cfg, tokenizer, train, evaluation, tmp, final)
        write_meta(tmp, ingredients)  # last: its presence marks the folder complete
    return load_prepared(final, from_cache=False)


def cache_key_for(cfg: ResolvedConfig, tokenizer: Any) -> tuple[str, dict[str, Any]]:
    """The cache key of ``cfg`` with ``tokenizer``, and what it is made of (nothing is built)."""
    _, _, ingredients = _plan(cfg, tokenizer)
    return cache_key(ingredients), ingredients


def _plan(cfg: ResolvedConfig, tokenizer: Any) -> tuple[list[_Entry], list[_Entry], dict[str, Any]]:
    """Resolve every dataset entry and its format, and compute the cache ingredients."""
    if not cfg.datasets:
        raise DataError("no training datasets: `datasets:` is empty.")
    train = [_entry(ds, cfg, tokenizer, "train") for ds in cfg.datasets]
    evaluation = [_entry(ds, cfg, tokenizer, "eval") for ds in cfg.test_datasets or []]
    ingredients = cache_ingredients(
        cfg,
        tokenizer_fingerprint(tokenizer),
        [_ingredient(e) for e in train],
        [_ingredient(e) for e in evaluation],
    )
    return train, evaluation, ingredients


def load_prepared(folder: Path, *, from_cache: bool) -> PreparedData:
    """Open a complete cache folder (memory-mapped; nothing is copied)."""
    import datasets

    report = PrepReport.from_json((folder / REPORT_FILE).read_text())
    report.from_cache = from_cache
    train = datasets.load_from_disk(str(folder / "train"))
    evaluation = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").exists() else None
    return PreparedData(train=train, eval=evaluation, report=report, cache_dir=folder, from_cache=from_cache)


def _entry(ds: DatasetConfig, cfg: ResolvedConfig, tokenizer: Any, split: str) -> _Entry:
    fmt = build_format(ds, cfg, tokenizer)
    return _Entry(ds, resolve_source(ds), fmt, DatasetStats(name=ds.path, split=split, format=fmt.name))


def _ingredient(e: _Entry) -> dict[str, Any]:
    return {
        "config": e.config.model_dump(mode="json"),
        "source": e.source.fingerprint(),
        "format": e.fmt.identity(),
    }


# ------------------------------------------------------------------ building


class _Rejects:
    """The rejects file (JSON Lines), opened on the first rejected row."""

    def __init__(self, path: Path, final_path: Path) -> None:
        self.path = path
        self.final_path = final_path
        self._file: Any = None
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self._file = self.path.open("w", encoding="utf-8")
        self._file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _build(
    cfg: ResolvedConfig, tokenizer: Any, train: list[_Entry], evaluation: list[_Entry], tmp: Path, final: Path
) -> None:
    import datasets

    scratch = tmp / ".scratch"
    scratch.mkdir()
    rejects = _Rejects(tmp / REJECTS_FILE, final / REJECTS_FILE)
    limits = Limits(cfg.sequence_len, cfg.min_sample_len, cfg.excess_length_strategy)
    num_proc = cfg.dataset_num_proc  # derived by normalize (dataset_processes, else the CPU count)
    try:
        train_parts = [
            _process(e, i, cfg, tokenizer, limits, num_proc, scratch, rejects) for i, e in enumerate(train)
        ]
        eval_parts = [
            _process(e, i, cfg, tokenizer, limits, num_proc, scratch, rejects)
            for i, e in enumerate(evaluation)
        ]
    finally:
        rejects.close()

    if cfg.dataset_exact_deduplication:
        seen: set[bytes] = set()
        train_parts = [_dedup(part, e.stats, seen) for part, e in zip(train_parts, train, strict=True)]
        # Evaluation rows that also occur in training would measure memorization, not learning.
        eval_seen = set(seen)
        eval_parts = [
            _dedup(part, e.stats, eval_seen) for part, e in zip(eval_parts, evaluation, strict=True)
        ]
    for part, e in zip(train_parts + eval_parts, train + evaluation, strict=True):
        e.stats.kept = len(part.dataset)
        e.stats.tokens = int(np.sum(part.lengths))
        e.stats.trained_tokens = int(np.sum(part.trained))

    train_ds = datasets.concatenate_datasets([p.dataset for p in train_parts])
    eval_ds = datasets.concatenate_datasets([p.dataset for p in eval_parts]) if eval_parts else None
    # Per-sample token counts travel beside the datasets (reading a column back from a dataset
    # with an indices mapping goes row by row).
    train_lengths = np.concatenate([p.lengths for p in train_parts])
    train_trained = np.concatenate([p.trained for p in train_parts])
    eval_lengths = np.concatenate([p.lengths for p in eval_parts]) if eval_parts else np.zeros(0, np.int64)
    eval_trained = np.concatenate([p.trained for p in eval_parts]) if eval_parts else np.zeros(0, np.int64)
    report = PrepReport(datasets=[e.stats for e in train + evaluation], sequence_len=cfg.sequence_len)
    if len(train_ds) == 0:
        report.cache_dir = "(not written)"
        raise DataError("no training sample is left after preparation.\n" + report.render())
    if eval_ds is not None and len(eval_ds) == 0:
        report.cache_dir = "(not written)"
        raise DataError(
            "no evaluation sample is left after preparing `test_datasets` (every row was bad or "
            "dropped; see below).\n" + report.render()
        )

    order = np.arange(len(train_ds))
    if cfg.shuffle_merged_datasets:
        order = np.random.default_rng(cfg.seed).permutation(len(train_ds))
    if eval_ds is None and cfg.val_set_size > 0:
        n_eval = _eval_count(cfg.val_set_size, len(train_ds))
        # The order is already random when shuffling; otherwise draw the evaluation rows at random
        # too, so they do not all come from the last dataset.
        pick = (
            order
            if cfg.shuffle_merged_datasets
            else np.random.default_rng(cfg.seed).permutation(len(train_ds))
        )
        eval_idx = np.sort(pick[:n_eval])
        eval_ds, eval_lengths, eval_trained = (
            train_ds.select(eval_idx),
            train_lengths[eval_idx],
            train_trained[eval_idx],
        )
        order = order[np.isin(order, eval_idx, invert=True)]
        report.eval_from = f"val_set_size={cfg.val_set_size:g}"
    elif eval_ds is not None:
        report.eval_from = "test_datasets"
    train_ds, train_lengths, train_trained = (
        train_ds.select(order),
        train_lengths[order],
        train_trained[order],
    )

    train_ds.save_to_disk(str(tmp / "train"))
    if eval_ds is not None:
        eval_ds.save_to_disk(str(tmp / "eval"))
    shutil.rmtree(scratch, ignore_errors=True)

    report.train_samples, report.train_tokens = len(train_ds), int(train_lengths.sum())
    report.train_trained_tokens = int(train_trained.sum())
    if eval_ds is not None:
        report.eval_samples = len(eval_ds)
        report.eval_tokens = int(eval_lengths.sum())
        report.eval_trained_tokens = int(eval_trained.sum())
    report.length_percentiles = length_percentiles(train_lengths)
    save_histogram(train_lengths, cfg.sequence_len, tmp / HISTOGRAM_FILE)
    report.histogram = str(final / HISTOGRAM_FILE)
    report.cache_dir = str(final)
    report.rejects_file = str(rejects.final_path) if rejects.count else None
    (tmp / REPORT_FILE).write_text(report.to_json())


def _eval_count(val_set_size: float, n: int) -> int:
    count = math.ceil(val_set_size * n) if val_set_size < 1 else int(val_set_size)
    if count >= n:
        raise DataError(
            f"val_set_size {val_set_size:g} leaves no training sample ({n} samples in all); lower it."
        )
    return max(count, 1)


@dataclass
class _Part:
    """The kept samples of one dataset entry, with per-sample token counts for the report."""

    dataset: Any
    lengths: np.ndarray
    trained: np.ndarray
    hashes: list[bytes]


def _process(
    e: _Entry,
    index: int,
    cfg: ResolvedConfig,
    tokenizer: Any,
    limits: Limits,
    num_proc: int,
    scratch: Path,
    rejects: _Rejects,
) -> _Part:
    """Read, check, tokenize and filter one dataset entry; count everything on the way."""
    import datasets

    features = e.fmt.features()
    columns: dict[str, list[Any]] = {name: [] for name in features}
    wheres: list[str] = []

    def bad(where: Location, exc: BadRow, *, raw: str | None = None, value: Any = None) -> None:
        if cfg.on_bad_row == "error":
            raise DataError(
                f"{where}: {exc.problem} [{exc.reason}] (dataset {e.config.path!r}, type {e.fmt.name}).\n"
                "    fix: correct the row, or set `on_bad_row: skip` to skip bad rows (they are counted "
                "and written to a rejects file)."
            )
        e.stats.add_bad(exc.reason)
        record = {"dataset": e.config.path, "split": e.stats.split, **where.as_dict(), "reason": exc.reason}
        record["problem"] = exc.problem
        record["raw" if raw is not None else "value"] = raw if raw is not None else value
        rejects.write(record)

    records = list(e.source.records())
    if not records and e.stats.split == "eval":
        # An evaluation on nothing measures nothing (and an empty eval split cannot even be saved
        # and loaded back); a training dataset may be empty as long as another one is not.
        raise DataError(
            f"test dataset {e.config.path!r} has no rows: remove it from `test_datasets`, or point it "
            "at the evaluation data."
        )
    if e.config.shards and e.config.shards > 1:
        records = records[: math.ceil(len(records) / e.config.shards)]
    for rec in records:
        e.stats.rows_read += 1
        if rec.error is not None:
            bad(rec.where, rec.error, raw=rec.raw)
            continue
        try:
            row = e.fmt.normalize(rec.value)
        except BadRow as exc:
            bad(rec.where, exc, value=rec.value)
            continue
        for name in columns:
            columns[name].append(row[name])
        wheres.append(json.dumps(rec.where.as_dict()))

    normalized = datasets.Dataset.from_dict(columns, features=features)
    if len(normalized) == 0:
        empty = datasets.Dataset.from_dict({c: [] for c in FINAL_COLUMNS}, features=_final_features())
        return _Part(empty, np.zeros(0, np.int64), np.zeros(0, np.int64), [])
    procs = max(1, min(num_proc, len(normalized) // MIN_ROWS_PER_PROCESS))
    mapped = normalized.map(
        tokenize_batch,
        batched=True,
        batch_size=MAP_BATCH_SIZE,
        with_indices=True,
        num_proc=procs if procs > 1 else None,
        fn_kwargs={"fmt": e.fmt, "tokenizer": tokenizer, "limits": limits},
        remove_columns=normalized.column_names,
        features=output_features(),
        cache_file_name=str(scratch / f"{e.stats.split}-{index}.arrow"),
        load_from_cache_file=False,
        new_fingerprint=hashlib.sha256(f"{scratch}-{e.stats.split}-{index}".encode()).hexdigest()[:16],
        desc=f"Tokenizing {e.config.path} ({procs} process{'es' if procs > 1 else ''})",
    )
    table = mapped.data.table
    status = table.column("_status").to_pylist()
    for i, st in enumerate(status):
        if st.startswith("bad:"):
            idx = table.column("_idx")[i].as_py()
            where = Location(**json.loads(wheres[idx]))
            bad(where, BadRow(st[4:], table.column("_problem")[i].as_py()), value=normalized[idx])
    counts = Counter(s for s in status if s and not s.startswith("bad:"))
    for reason, n in counts.items():
        e.stats.add_dropped(reason, n)
    status_arr = np.asarray(status, dtype=object)
    keep = np.flatnonzero(status_arr == "")
    chunk = table.column("_chunk").to_numpy()
    e.stats.extra_chunks = int(np.count_nonzero(chunk > 0))
    e.stats.truncated = int(np.count_nonzero(table.column("_truncated").to_numpy(zero_copy_only=False)[keep]))
    e.stats.no_eot = int(np.count_nonzero(table.column("_no_eot").to_numpy(zero_copy_only=False)[keep]))
    if e.stats.no_eot:
        _warn_no_eot(e, len(keep))
    lengths = table.column("length").to_numpy()[keep].astype(np.int64)
    trained = table.column("_trained").to_numpy()[keep].astype(np.int64)
    kept = mapped.select(keep).select_columns(FINAL_COLUMNS)
    hashes = _hashes(table, keep) if cfg.dataset_exact_deduplication else []
    return _Part(kept, lengths, trained, hashes)


def _warn_no_eot(e: _Entry, kept: int) -> None:
    """Once per dataset: train_on_eos asked for end-of-turn tokens and the tokenizer has none.

    An end-of-turn token is a *special* token right after a content. A custom template whose
    markers (e.g. ``<|eot_id|>``) are not special tokens of this tokenizer is tokenized as plain
    text, so the model would never be trained to end its turn; say so rather than train silently.
    """
    logger.warning(
        "dataset %r: train_on_eos: %s asks for end-of-turn tokens, but in %s of %s samples no special "
        "token follows a trained content, so none is trained (the model would not learn to stop). The "
        "chat template's end-of-turn marker is probably plain text to this tokenizer. Use a template "
        "written with the tokenizer's own special tokens (e.g. chat_template: tokenizer_default), make "
        "the marker a special token (special_tokens: eos_token), or set train_on_eos: none.",
        e.config.path,
        e.config.train_on_eos,
        f"{e.stats.no_eot:,}",
        f"{kept:,}",
    )


def _final_features() -> Any:
    from datasets import Features

    out = output_features()
    return Features({c: out[c] for c in FINAL_COLUMNS})


def _hashes(table: Any, rows: np.ndarray) -> list[bytes]:
    """A digest of (input_ids, labels) per row: duplicates are the same tokens trained the same way."""
    ids = table.column("input_ids").combine_chunks()
    labels = table.column("labels").combine_chunks()
    id_off, id_val = ids.offsets.to_numpy(), ids.values.to_numpy()
    lab_off, lab_val = labels.offsets.to_numpy(), labels.values.to_numpy()
    out = []
    for r in rows:
        h = hashlib.blake2b(id_val[id_off[r] : id_off[r + 1]].tobytes(), digest_size=16)
        h.update(b"|")
        h.update(lab_val[lab_off[r] : lab_off[r + 1]].tobytes())
        out.append(h.digest())
    return out


def _dedup(part: _Part, stats: DatasetStats, seen: set[bytes]) -> _Part:
    """Drop rows whose digest is in ``seen`` (or repeats within the part); the first one stays."""
    keep = []
    for i, digest in enumerate(part.hashes):
        if digest in seen:
            continue
        seen.add(digest)
        keep.append(i)
    dropped = len(part.hashes) - len(keep)
    if dropped == 0:
        return part
    stats.add_dropped("duplicate", dropped)
    idx = np.asarray(keep, dtype=np.int64)
    return _Part(
        part.dataset.select(idx), part.lengths[idx], part.trained[idx], [part.hashes[i] for i in keep]
    )
