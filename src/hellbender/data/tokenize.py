"""Rendered text → ``input_ids`` + ``labels``, with exact masking; then length rules.

**Spans to tokens.** A :class:`~hellbender.data.formats.base.Rendered` says which *characters*
are trained. The text is tokenized once with offsets, and a token is trained when the characters
it covers overlap a trained span. A token's characters are ``[min(start, end of the tokens
before it), end)``: that equals its offsets for ordinary tokenizers and also recovers the leading
whitespace that tokenizers with ``trim_offsets`` cut off (whose whitespace-only tokens would
otherwise have empty offsets and never be trained). Tokens the tokenizer adds itself (BOS) have
empty offsets and are never trained. With a cumulative sum over a per-character mask, every
token is decided in O(1), so a sample costs O(characters + tokens).

**End of turn.** For each ``(after, limit)`` in ``Rendered.eot`` the first special token (with
``eot_tokens``: the first of those tokens or the EOS) starting in ``[after, limit)`` — with only
whitespace tokens before it — is trained, together with that whitespace. That token is what the
model must emit to end its turn. A sample that asks for end-of-turn tokens and gets none is flagged
(``_no_eot``): its template's end-of-turn marker is plain text to this tokenizer, and preparation
warns about it instead of silently training none.

**Labels are not shifted**: ``labels[i]`` is ``input_ids[i]`` or -100; the loss shifts.

**Lengths.** Longer than ``sequence_len``: dropped (``too_long``) or truncated, per
``excess_length_strategy``; ``completion`` texts are split into chunks instead. Then shorter than
``min_sample_len`` → ``too_short``; no trained token left → ``no_trained_tokens``. Dropped rows
stay in the output as empty rows with a status so the caller can count them per reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from hellbender.data.errors import BadRow, DataError
from hellbender.data.formats.base import PromptFormat, Rendered

# The label of a token that is not trained: transformers' convention, and the ignore_index of every
# loss in hellbender (the plain loss, the chunked/cut/Liger kernels). Defined here, where labels are
# made; everything later imports it.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Limits:
    """The length rules of one run."""

    sequence_len: int
    min_sample_len: int
    excess_length_strategy: str  # "drop" | "truncate"


@dataclass
class Sample:
    """One tokenized sample, or the reason it was dropped (``status`` is "" when kept)."""

    input_ids: np.ndarray  # int64
    labels: np.ndarray  # int64, IGNORE_INDEX where not trained
    status: str = ""
    truncated: bool = False
    chunk: int = 0  # index of this piece within a chunked text


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that can close a turn: the tokenizer's special tokens, including added special ones."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", False))
    return frozenset(ids)


def backend_of(tokenizer: Any) -> Any:
    """The Rust tokenizer: offsets are needed, and only fast tokenizers give them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; exact label masking needs character "
            "offsets, which only fast (Rust) tokenizers give. Set tokenizer_use_fast: true."
        )
    return backend


def trained_mask(
    rendered: Rendered,
    ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    special_ids: frozenset[int],
) -> tuple[np.ndarray, int]:
    """Boolean mask over ``ids``: which tokens are trained (see the module docstring), and how
    many of the end-of-turn tokens ``rendered.eot`` asks for were found."""
    n = len(ids)
    if n == 0:
        return np.zeros(0, dtype=bool), 0
    text = rendered.text
    # fromiter over the flattened pairs: half the cost of np.asarray on a list of tuples.
    offs = np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * n).reshape(n, 2)
    starts, ends = offs[:, 0], offs[:, 1]
    before = np.concatenate(([0], np.maximum.accumulate(ends)[:-1]))
    region_start = np.minimum(starts, before)
    # Per-character coverage by trained spans, as a difference array turned into a prefix sum.
    diff = np.zeros(len(text) + 1, dtype=np.int64)
    for s, e in rendered.trained:
        if e > s:
            diff[s] += 1
            diff[e] -= 1
    covered = np.cumsum(diff[:-1]) > 0
    prefix = np.concatenate(([0], np.cumsum(covered)))
    mask = (prefix[ends] - prefix[region_start]) > 0
    # Starts are sorted except for tokens a post-processor appends with offsets (0, 0); the running
    # maximum is sorted always and equal to the starts everywhere else.
    sorted_starts = np.maximum.accumulate(starts)
    found = 0
    for after, limit in rendered.eot:
        first = int(np.searchsorted(sorted_starts, after, side="left"))
        k = first
        while k < n and sorted_starts[k] < limit:
            if ids[k] in special_ids:
                mask[first : k + 1] = True
                found += 1
                break
            if not text[region_start[k] : ends[k]].isspace():
                break  # something other than whitespace follows the content: no end-of-turn token
            k += 1
    return mask, found


def encode(
    rendered: Sequence[Rendered], tokenizer: Any, special_ids: frozenset[int] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokenize rendered rows (one batched call per ``add_special_tokens`` value) → (ids, labels)."""
    return [(ids, labels) for ids, labels, _ in encode_checked(rendered, tokenizer, special_ids)]


def encode_checked(
    rendered: Sequence[Rendered], tokenizer: Any, special_ids: frozenset[int] | None = None
) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """:func:`encode`, plus per row whether it asked for end-of-turn tokens and none was found."""
    backend = backend_of(tokenizer)
    special = special_token_ids(tokenizer) if special_ids is None else special_ids
    eos = tokenizer.eos_token_id
    out: list[tuple[np.ndarray, np.ndarray, bool] | None] = [None] * len(rendered)
    for add_special in (True, False):
        idx = [i for i, r in enumerate(rendered) if r.add_special_tokens == add_special]
        if not idx:
            continue
        encodings = backend.encode_batch([rendered[i].text for i in idx], add_special_tokens=add_special)
        for i, enc in zip(idx, encodings, strict=True):
            r = rendered[i]
            id_list = enc.ids  # each attribute access converts from Rust: read it once
            ids = np.fromiter(id_list, dtype=np.int64, count=len(id_list))
            mask, found_eot = trained_mask(r, id_list, enc.offsets, special)
            if r.append_eos and eos is not None:
                if len(ids) and ids[-1] == eos:  # the tokenizer's post-processor already closed the text
                    mask[-1] = True
                else:
                    ids = np.append(ids, eos)
                    mask = np.append(mask, True)
            out[i] = (ids, np.where(mask, ids, IGNORE_INDEX), bool(r.eot) and found_eot == 0)
    done = [row for row in out if row is not None]
    assert len(done) == len(out)  # every row has one add_special_tokens value
    return done


def _checked(ids: np.ndarray, labels: np.ndarray, limits: Limits, *, truncated: bool, chunk: int) -> Sample:
    if len(ids) < limits.min_sample_len:
        return Sample(_EMPTY, _EMPTY, "too_short", truncated, chunk)
    if not np.any(labels != IGNORE_INDEX):
        return Sample(_EMPTY, _EMPTY, "no_trained_tokens", truncated, chunk)
    return Sample(ids, labels, "", truncated, chunk)


_EMPTY = np.zeros(0, dtype=np.int64)


def apply_limits(ids: np.ndarray, labels: np.ndarray, limits: Limits, *, chunk: bool) -> list[Sample]:
    """Length rules for one tokenized row → one sample (kept or with a drop status), or chunks."""
    size = limits.sequence_len
    if len(ids) <= size:
        return [_checked(ids, labels, limits, truncated=False, chunk=0)]
    if chunk:
        return [
            _checked(ids[i : i + size], labels[i : i + size], limits, truncated=False, chunk=i // size)
            for i in range(0, len(ids), size)
        ]
    if limits.excess_length_strategy == "drop":
        return [Sample(_EMPTY, _EMPTY, "too_long")]
    return [_checked(ids[:size], labels[:size], limits, truncated=True, chunk=0)]


OUTPUT_COLUMNS = (
    "input_ids",
    "labels",
    "length",
    "_status",
    "_problem",
    "_idx",
    "_truncated",
    "_chunk",
    "_trained",
    "_no_eot",
)


def output_features() -> Any:
    """Features of :func:`tokenize_batch`'s output (int32 ids: half the disk of int64)."""
    from datasets import Features, List, Value

    return Features(
        {
            "input_ids": List(Value("int32")),
            "labels": List(Value("int32")),
            "length": Value("int32"),
            "_status": Value("string"),
            "_problem": Value("string"),
            "_idx": Value("int64"),
            "_truncated": Value("bool"),
            "_chunk": Value("int32"),
            "_trained": Value("int32"),
            "_no_eot": Value("bool"),  # end-of-turn tokens were asked for and none was found
        }
    )


def tokenize_batch(
    batch: Mapping[str, list[Any]],
    indices: list[int],
    *,
    fmt: PromptFormat,
    tokenizer: Any,
    limits: Limits,
) -> dict[str, list[Any]]:
    """``datasets.map(batched=True, with_indices=True)`` function: normalized rows → samples.

    A row that fails to render (a template error) becomes a row with status ``bad:<reason>`` and
    the problem text, so the main process can report it with its file and line.
    """
    out: dict[str, list[Any]] = {name: [] for name in OUTPUT_COLUMNS}

    def emit(sample: Sample, idx: int, problem: str = "", no_eot: bool = False) -> None:
        out["input_ids"].append(sample.input_ids)
        out["labels"].append(sample.labels)
        out["length"].append(len(sample.input_ids))
        out["_status"].append(sample.status)
        out["_problem"].append(problem)
        out["_idx"].append(idx)
        out["_truncated"].append(sample.truncated)
        out["_chunk"].append(sample.chunk)
        out["_trained"].append(int(np.count_nonzero(sample.labels != IGNORE_INDEX)))
        out["_no_eot"].append(no_eot)

    keys = list(batch)
    rendered: list[Rendered] = []
    rendered_idx: list[int] = []
    failures: dict[int, BadRow] = {}
    for i, idx in enumerate(indices):
        row = {k: batch[k][i] for k in keys}
        try:
            rendered.append(fmt.render(row))
            rendered_idx.append(idx)
        except BadRow as exc:
            failures[idx] = exc
    encoded = dict(zip(rendered_idx, encode_checked(rendered, tokenizer, fmt.eot_ids), strict=True))
    by_idx = dict(zip(rendered_idx, rendered, strict=True))
    for idx in indices:
        if idx in failures:
            emit(Sample(_EMPTY, _EMPTY, f"bad:{failures[idx].reason}"), idx, failures[idx].problem)
            continue
        ids, labels, no_eot = encoded[idx]
        for sample in apply_limits(ids, labels, limits, chunk=by_idx[idx].chunk):
            emit(sample, idx, no_eot=no_eot)
    return out
