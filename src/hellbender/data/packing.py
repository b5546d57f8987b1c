"""Sample packing: a bin-packing batch sampler and a collator that keeps documents apart.

Two halves, used together by the training loop::

    sampler = BatchSampler(lengths, sequence_len=2048, micro_batch_size=4,
                           sample_packing=True, seed=cfg.seed)
    collate = Collator(tokenizer.pad_token_id, sequence_len=2048, pad_to_sequence_len=True,
                       attn_implementation="sdpa", micro_batch_size=4)
    for epoch in range(num_epochs):
        sampler.set_epoch(epoch)
        steps_this_epoch = len(sampler)          # exact, known before the first batch
        for micro_batch in sampler:              # list of rows, a row = list of sample indices
            batch = collate([[dataset[i] for i in row] for row in micro_batch])

**Sampler.** With packing, samples are bin-packed into rows of at most ``sequence_len`` tokens by
best-fit decreasing (BFD). BFD has the same worst-case guarantee as first-fit decreasing
(≤ 11/9·OPT + 6/9 bins) and typically packs as tightly or better. Because token lengths are small
integers it can be run *per distinct length* with buckets indexed by remaining capacity: one sort,
one Python step per item and one vectorized scan of the capacity table per distinct length,
instead of a scan over all open bins for every item. 100k samples pack in well under a second
(bench/packing.py: ~0.1 s, 99.99% full on a long-tailed distribution at sequence_len 2048).
Every epoch draws a new random order among samples of equal length (so bin *contents* change
cheaply) and a new bin order. The
number of micro-batches is computed by actually packing the epoch, so ``len()`` is exact, never an
estimate; it is cached, so asking for it costs nothing extra when iterating afterwards.

**Collator.** It lays the documents of a row side by side and produces everything any attention
backend needs to keep them apart (see :mod:`hellbender.models.attention`, which turns these into
the backend-specific kwargs):

* ``position_ids`` restart at 0 for every document, so RoPE sees each document as if it were alone.
* ``document_ids`` number the documents of the whole micro-batch; block-diagonal masks are built
  from them on the device (cheaper than shipping an L×L mask through the data loader).
* ``cu_seqlens`` / ``seq_lens`` / ``max_seqlen`` describe the same segments for varlen kernels,
  over the *flattened* (rows × width) token stream.
* The first label of every document is set to -100: after the loss's shift it would be predicted
  from the last token of the *previous* document. In an unpacked row it is dropped by the shift
  anyway, so packed and unpacked training count exactly the same tokens.

Filler rows: with ``pad_to_sequence_len`` and a ``micro_batch_size``, a micro-batch with fewer
rows (the last one of an epoch) is topped up with rows of pure padding, so *every* batch has the
shape (micro_batch_size, sequence_len) and a compiled or shape-specialized model never sees a new
shape. A filler row is a document of its own (own document id, positions 0..W-1, its own segment in
``cu_seqlens``) with every label -100: no real token can attend to it and it has no trained token,
so the loss and the gradients are those of the real rows alone (it only costs its compute).

Padding (at the end of a row) is attached to the row's last document: its position ids simply
continue and it shares that document's segment. This is harmless — attention is causal, so no
real token ever looks at the later padding, and padding labels are -100 — and it has two
benefits: every query row of every mask has at least one allowed key (no all-masked softmax rows
that turn into NaN), and ``cu_seqlens`` is *exactly* what transformers derives from
``position_ids`` on its own flash path, so both routes agree.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from hellbender.config.schema import DOCUMENT_ISOLATING_BACKENDS
from hellbender.data.tokenize import IGNORE_INDEX
from hellbender.errors import OptionError

__all__ = [
    "BatchSampler",
    "Collator",
    "best_fit_decreasing",
]


def best_fit_decreasing(
    lengths: Sequence[int] | np.ndarray, capacity: int, rng: np.random.Generator | None = None
) -> list[list[int]]:
    """Pack items of integer ``lengths`` into bins of ``capacity`` by best-fit decreasing.

    Items are taken longest first; each goes into the open bin whose remaining room is the
    smallest that still fits it (a new bin if none does). ``rng`` only breaks ties between items
    of equal length (a random order among them), which changes bin contents from epoch to epoch
    without hurting the packing.

    Why per-length groups: all items of one length ``s`` are placed in a single sweep over the
    remaining capacities ``c >= s`` in increasing order. Placing an item in a bin with room ``c``
    leaves ``c - s``, which is smaller than every capacity still to be visited and (if ``>= s``)
    the new best fit — so BFD would keep filling that same bin, ``c // s`` items at a time. The
    sweep therefore reproduces item-by-item BFD exactly while touching each item once in Python.

    Returns the bins as lists of item indices (in placement order).
    """
    sizes = np.asarray(lengths, dtype=np.int64)
    n = int(sizes.shape[0])
    if n == 0:
        return []
    if capacity <= 0:
        raise ValueError(f"bin capacity must be positive, got {capacity}")
    too_long = np.flatnonzero(sizes > capacity)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(
            f"sample {i} has {int(sizes[i])} tokens, more than sequence_len={capacity}; "
            f"{too_long.size} sample(s) are too long. Truncate or drop them before packing."
        )
    empty = np.flatnonzero(sizes <= 0)
    if empty.size:
        raise ValueError(f"sample {int(empty[0])} is empty; drop empty samples before packing.")

    candidates = rng.permutation(n) if rng is not None else np.arange(n)
    # Stable sort on the (possibly shuffled) order: longest first, ties in the shuffled order.
    order = candidates[np.argsort(-sizes[candidates], kind="stable")]
    sorted_sizes = sizes[order]
    # Group boundaries of equal sizes (sorted_sizes is non-increasing).
    change = np.flatnonzero(np.diff(sorted_sizes)) + 1
    starts = np.concatenate(([0], change)).tolist()
    ends = [*change.tolist(), n]
    group_sizes = sorted_sizes[starts].tolist()
    items = order.tolist()

    bins: list[list[int]] = []
    # buckets[c]: bins whose remaining room is exactly c; `open_room[c]` mirrors "bucket non-empty"
    # so numpy can find the candidate capacities of a group in one vectorized call.
    buckets: list[list[int]] = [[] for _ in range(capacity + 1)]
    open_room = np.zeros(capacity + 1, dtype=bool)

    for size, pos, end in zip(group_sizes, starts, ends, strict=True):
        for room in (np.flatnonzero(open_room[size:]) + size).tolist():
            bucket = buckets[room]
            per_bin = room // size
            while bucket and pos < end:
                b = bucket.pop()
                take = min(per_bin, end - pos)
                bins[b].extend(items[pos : pos + take])
                pos += take
                rest = room - take * size
                if rest > 0:
                    buckets[rest].append(b)
                    open_room[rest] = True
            if not bucket:
                open_room[room] = False
            if pos == end:
                break
        per_new = capacity // size
        while pos < end:
            take = min(per_new, end - pos)
            b = len(bins)
            bins.append(items[pos : pos + take])
            pos += take
            rest = capacity - take * size
            if rest > 0:
                buckets[rest].append(b)
                open_room[rest] = True
    return bins


def group_by_length(order: list[int], lengths: Sequence[int], batch_size: int) -> list[int]:
    """``order`` (a random permutation) regrouped so that consecutive ``batch_size`` samples have
    similar lengths: the HF Trainer's ``group_by_length`` (its ``get_length_grouped_indices``).

    The permutation is cut into mega-batches of ``min(n // (4 × batch_size), 50)`` (at least 1)
    batches, each sorted longest first (stable), and the longest sample of all is swapped to the
    front so that a run that does not fit in memory fails on its first step. Still a permutation:
    every sample once per epoch, and as deterministic as ``order``.
    """
    mega_batch_mult = max(1, min(len(order) // (batch_size * 4), 50))
    size = mega_batch_mult * batch_size
    megabatches = [
        sorted(order[i : i + size], key=lambda index: lengths[index], reverse=True)
        for i in range(0, len(order), size)
    ]
    if not megabatches:
        return []
    maxima = [lengths[megabatch[0]] for megabatch in megabatches]
    longest = maxima.index(max(maxima))  # the first of equal maxima, as torch.argmax
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [index for megabatch in megabatches for index in megabatch]


class BatchSampler:
    """Yields micro-batches (``list`` of rows, a row = ``list`` of sample indices) for one epoch.

    ``len(sampler)`` is the exact number of micro-batches the *current* epoch (see
    :meth:`set_epoch`) yields. With packing the count may differ by a little from one epoch to the
    next (different tie-breaking gives different bins); it is always exact for the epoch set.

    Each micro-batch has ``micro_batch_size`` rows except the last one of an epoch, which may have
    fewer unless ``drop_last`` (with ``pad_to_sequence_len`` the :class:`Collator` tops it up with
    filler rows instead, so no sample is dropped).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        sequence_len: int,
        micro_batch_size: int,
        sample_packing: bool,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        length_group: int = 0,
    ) -> None:
        if sequence_len <= 0:
            raise ValueError(f"sequence_len must be positive, got {sequence_len}")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        self._lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        too_long = np.flatnonzero(self._lengths > sequence_len)
        if too_long.size:
            i = int(too_long[0])
            raise ValueError(
                f"sample {i} has {int(self._lengths[i])} tokens, more than sequence_len={sequence_len} "
                f"({too_long.size} such samples); truncate or drop them before batching."
            )
        if (self._lengths <= 0).any():
            raise ValueError(f"sample {int(np.flatnonzero(self._lengths <= 0)[0])} is empty; drop it first.")
        self.sequence_len = sequence_len
        self.micro_batch_size = micro_batch_size
        self.sample_packing = sample_packing
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        # group_by_length: samples per optimizer step (0: off); shuffled samples only
        self.length_group = length_group
        self._epoch = 0
        # (epoch, micro-batches): the plan is computed once per epoch and shared by len()/iter().
        self._plan: tuple[int, list[list[list[int]]]] | None = None

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order (and, with packing, bins) ``len``/``iter`` describe."""
        if epoch != self._epoch:
            self._epoch = int(epoch)
            self._plan = None

    def _rng(self) -> np.random.Generator:
        # Seeding with (seed, epoch) makes every epoch independent and reproducible without any
        # state carried between epochs (which is what exact resume needs).
        return np.random.default_rng(np.random.SeedSequence([int(self.seed), self._epoch]))

    def _rows(self) -> list[list[int]]:
        rng = self._rng() if self.shuffle else None
        if self.sample_packing:
            rows = best_fit_decreasing(self._lengths, self.sequence_len, rng)
            if rng is not None:
                rows = [rows[i] for i in rng.permutation(len(rows)).tolist()]
            return rows
        order = rng.permutation(len(self._lengths)) if rng is not None else np.arange(len(self._lengths))
        if rng is not None and self.length_group:
            return [[i] for i in group_by_length(order.tolist(), self._lengths.tolist(), self.length_group)]
        return [[i] for i in order.tolist()]

    def micro_batches(self) -> list[list[list[int]]]:
        """The whole plan of the current epoch (computed once, then cached)."""
        if self._plan is None or self._plan[0] != self._epoch:
            rows = self._rows()
            mbs = self.micro_batch_size
            stop = len(rows) - len(rows) % mbs if self.drop_last else len(rows)
            batches = [rows[i : i + mbs] for i in range(0, stop, mbs)]
            self._plan = (self._epoch, batches)
        return self._plan[1]

    def __len__(self) -> int:
        return len(self.micro_batches())

    def __iter__(self) -> Iterator[list[list[int]]]:
        # Iterate over a snapshot so a set_epoch() during iteration cannot change this epoch.
        yield from list(self.micro_batches())

    def num_rows(self) -> int:
        """Rows yielded this epoch (bins with packing, samples without)."""
        return sum(len(b) for b in self.micro_batches())

    def efficiency(self) -> float:
        """Real tokens / capacity of the rows yielded this epoch, capacity = rows × sequence_len.

        This is the fraction of compute spent on real tokens when rows are padded to
        ``sequence_len`` (the packed default). Without packing it shows what padding costs.
        """
        used = [i for batch in self.micro_batches() for row in batch for i in row]
        capacity = self.num_rows() * self.sequence_len
        return float(self._lengths[used].sum()) / capacity if capacity else 0.0


class Collator:
    """Turn rows of tokenized samples into one micro-batch of tensors.

    Input: ``list`` of rows, a row = ``list`` of sample dicts with ``input_ids`` and ``labels``
    (aligned, *not* shifted; -100 = not trained). A row with several samples is a packed row.

    Output (all tensors; B = number of rows, W = width):

    ``input_ids`` (B, W) long, padded with ``pad_token_id``;
    ``labels`` (B, W) long, -100 on padding and on the first token of every document;
    ``position_ids`` (B, W) long, restarting at 0 per document, continuing through padding;
    ``document_ids`` (B, W) int32, a micro-batch-wide document number per token (padding belongs to
    the row's last document);
    ``seq_lens`` (S,) int32 segment lengths over the flattened B×W stream, ``cu_seqlens`` (S+1,)
    int32 their cumulative sums (``cu_seqlens[-1] == B*W``), ``max_seqlen`` 0-d long;
    ``num_trained_tokens`` 0-d long: labels that the shifted loss counts, i.e.
    ``(labels[:, 1:] != -100).sum()``;
    ``num_tokens`` 0-d long: real (non-padding) tokens.

    Width: ``sequence_len`` with ``pad_to_sequence_len``, otherwise the longest row of this
    micro-batch. Rows: with ``pad_to_sequence_len`` and ``micro_batch_size`` given, always
    ``micro_batch_size`` (a shorter micro-batch gets filler rows, see the module docstring), so
    every batch has exactly the shape (micro_batch_size, sequence_len); otherwise the rows given.

    The attention masks themselves are built by :func:`hellbender.models.attention.model_inputs`
    on the device, from ``document_ids`` / ``cu_seqlens``.
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        sequence_len: int,
        pad_to_sequence_len: bool,
        attn_implementation: str,
        micro_batch_size: int | None = None,
    ) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: set a pad token on the tokenizer before collating.")
        self.pad_token_id = int(pad_token_id)
        self.sequence_len = int(sequence_len)
        self.pad_to_sequence_len = pad_to_sequence_len
        self.attn_implementation = attn_implementation
        # Rows every batch is filled up to; None (or padding to the longest row) keeps the rows given.
        self.fill_rows_to = micro_batch_size if pad_to_sequence_len else None

    def __call__(self, rows: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty micro-batch")
        ids_rows: list[list[np.ndarray]] = []
        label_rows: list[list[np.ndarray]] = []
        row_lengths: list[int] = []
        for r, row in enumerate(rows):
            if not row:
                raise ValueError(f"row {r} of the micro-batch has no sample")
            ids_row, label_row = [], []
            for k, sample in enumerate(row):
                ids = np.asarray(sample["input_ids"], dtype=np.int64).reshape(-1)
                labels = np.asarray(sample["labels"], dtype=np.int64).reshape(-1)
                if ids.shape != labels.shape:
                    raise ValueError(
                        f"row {r}, sample {k}: {ids.size} input_ids but {labels.size} labels "
                        "(labels must be aligned with input_ids, not shifted)"
                    )
                if ids.size == 0:
                    raise ValueError(f"row {r}, sample {k} is empty")
                ids_row.append(ids)
                label_row.append(labels)
            total = sum(a.size for a in ids_row)
            if total > self.sequence_len:
                raise ValueError(f"row {r} has {total} tokens, more than sequence_len={self.sequence_len}")
            if len(row) > 1 and self.attn_implementation not in DOCUMENT_ISOLATING_BACKENDS:
                raise OptionError(
                    f"attn_implementation {self.attn_implementation!r} cannot keep packed documents "
                    "apart; use sdpa, eager, flex_attention, flash_attention_2/3 or xformers, or "
                    "disable sample_packing"
                )
            ids_rows.append(ids_row)
            label_rows.append(label_row)
            row_lengths.append(total)

        width = self.sequence_len if self.pad_to_sequence_len else max(row_lengths)
        n_rows = len(rows)
        if self.fill_rows_to is not None and n_rows > self.fill_rows_to:
            raise ValueError(
                f"the micro-batch has {n_rows} rows, more than micro_batch_size={self.fill_rows_to}"
            )
        total_rows = max(n_rows, self.fill_rows_to or 0)
        input_ids = np.full((total_rows, width), self.pad_token_id, dtype=np.int64)
        labels = np.full((total_rows, width), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.empty((total_rows, width), dtype=np.int64)
        document_ids = np.empty((total_rows, width), dtype=np.int32)
        seq_lens: list[int] = []
        doc = 0
        for r in range(n_rows):
            offset = 0
            for ids, lab in zip(ids_rows[r], label_rows[r], strict=True):
                n = ids.size
                end = offset + n
                input_ids[r, offset:end] = ids
                labels[r, offset:end] = lab
                # Never predict a document's first token (from the previous document's last one).
                labels[r, offset] = IGNORE_INDEX
                position_ids[r, offset:end] = np.arange(n)
                document_ids[r, offset:end] = doc
                seq_lens.append(n)
                doc += 1
                offset = end
            if offset < width:
                # Padding joins the row's last document (see the module docstring for why).
                last_len = ids_rows[r][-1].size
                position_ids[r, offset:] = np.arange(last_len, last_len + width - offset)
                document_ids[r, offset:] = doc - 1
                seq_lens[-1] += width - offset
        for r in range(n_rows, total_rows):
            # A filler row: pure padding, a document of its own, no trained label (see the module docstring).
            position_ids[r] = np.arange(width)
            document_ids[r] = doc
            seq_lens.append(width)
            doc += 1

        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
        cu_seqlens = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(seq_lens_t, 0)
        labels_t = torch.from_numpy(labels)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": labels_t,
            "position_ids": torch.from_numpy(position_ids),
            "document_ids": torch.from_numpy(document_ids),
            "seq_lens": seq_lens_t,
            "cu_seqlens": cu_seqlens,
            "max_seqlen": torch.tensor(max(seq_lens), dtype=torch.long),
            "num_trained_tokens": (labels_t[:, 1:] != IGNORE_INDEX).sum(),
            "num_tokens": torch.tensor(sum(row_lengths), dtype=torch.long),
        }
