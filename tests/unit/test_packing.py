"""Unit tests of the packing sampler, the collator, the per-backend attention inputs and the loss.

References are computed independently in each test (a naive item-by-item best-fit decreasing, a
Python recount of labels, transformers' own helpers), never copied from the code under test.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hellbender.data.packing import (
    IGNORE_INDEX,
    BatchSampler,
    Collator,
    best_fit_decreasing,
)
from hellbender.kernels.loss import causal_lm_loss_sum
from hellbender.models.attention import (
    AttentionBackendError,
    backend_isolates_documents,
    check_backend_trainable,
    document_causal_mask,
    flash_varlen_kwargs,
    model_inputs,
    xformers_seqlens,
)


def naive_bfd_loads(lengths: list[int], capacity: int) -> list[int]:
    """Item-by-item best-fit decreasing over a plain list of bin loads (the textbook algorithm)."""
    loads: list[int] = []
    for size in sorted(lengths, reverse=True):
        best = -1
        for b, load in enumerate(loads):
            room = capacity - load
            if room >= size and (best < 0 or room < capacity - loads[best]):
                best = b
        if best < 0:
            loads.append(size)
        else:
            loads[best] += size
    return sorted(loads)


def make_samples(lengths: list[int], seed: int = 0, vocab: int = 128) -> list[dict]:
    rng = np.random.default_rng(seed)
    samples = []
    for n in lengths:
        ids = rng.integers(1, vocab, size=n).tolist()
        labels = list(ids)
        prompt = int(rng.integers(0, max(1, n // 2)))  # a masked "prompt" prefix of random length
        labels[:prompt] = [IGNORE_INDEX] * prompt
        samples.append({"input_ids": ids, "labels": labels})
    return samples


# ----------------------------------------------------------------------------------- bin packing


@settings(max_examples=150, deadline=None)
@given(
    capacity=st.integers(1, 64),
    data=st.data(),
)
def test_bfd_is_a_partition_within_capacity_and_matches_textbook_bfd(
    capacity: int, data: st.DataObject
) -> None:
    lengths = data.draw(st.lists(st.integers(1, capacity), min_size=0, max_size=80))
    seed = data.draw(st.integers(0, 3))
    bins = best_fit_decreasing(lengths, capacity, np.random.default_rng(seed))
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # Equal-room bins and equal-size items are interchangeable, so the grouped sweep must give
    # exactly the same multiset of bin loads as item-by-item BFD.
    assert sorted(sum(lengths[i] for i in b) for b in bins) == naive_bfd_loads(lengths, capacity)


def test_bfd_rejects_too_long_and_empty_samples() -> None:
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        best_fit_decreasing([3, 9], 8)
    with pytest.raises(ValueError, match="empty"):
        best_fit_decreasing([3, 0], 8)
    with pytest.raises(ValueError, match="more than sequence_len"):
        BatchSampler([3, 9], sequence_len=8, micro_batch_size=2, sample_packing=False, seed=0)


# ----------------------------------------------------------------------------------- sampler


LENGTHS = np.random.default_rng(7).integers(1, 64, size=203).tolist()


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_len_equals_iterated_micro_batches(packing: bool, drop_last: bool, micro_batch_size: int) -> None:
    for seed in (0, 1, 2):
        options = {
            "sequence_len": 64,
            "micro_batch_size": micro_batch_size,
            "sample_packing": packing,
            "seed": seed,
            "drop_last": drop_last,
        }
        sampler = BatchSampler(LENGTHS, **options)
        for epoch in (0, 1, 5):
            sampler.set_epoch(epoch)
            expected = len(sampler)
            batches = list(sampler)
            assert len(batches) == expected
            # A fresh sampler asked for len() without iterating agrees too (no hidden state).
            fresh = BatchSampler(LENGTHS, **options)
            fresh.set_epoch(epoch)
            assert len(fresh) == expected
            assert list(fresh) == batches
            rows = [row for b in batches for row in b]
            assert all(sum(LENGTHS[i] for i in row) <= 64 for row in rows)
            if not packing:
                assert all(len(row) == 1 for row in rows)
            if drop_last:
                assert all(len(b) == micro_batch_size for b in batches)
            else:
                assert all(len(b) == micro_batch_size for b in batches[:-1])
                assert sorted(i for row in rows for i in row) == list(range(len(LENGTHS)))


def test_sampler_is_deterministic_and_changes_every_epoch() -> None:
    # Many equal lengths: tie-breaking is where bin *contents* can change between epochs.
    lengths = [5, 7, 9, 11] * 40
    a = BatchSampler(lengths, sequence_len=32, micro_batch_size=2, sample_packing=True, seed=3)
    b = BatchSampler(lengths, sequence_len=32, micro_batch_size=2, sample_packing=True, seed=3)
    assert list(a) == list(b)
    epoch0 = list(a)
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch0 != epoch1
    bins0 = {tuple(sorted(row)) for batch in epoch0 for row in batch}
    bins1 = {tuple(sorted(row)) for batch in epoch1 for row in batch}
    assert bins0 != bins1
    a.set_epoch(0)
    assert list(a) == epoch0
    other_seed = BatchSampler(lengths, sequence_len=32, micro_batch_size=2, sample_packing=True, seed=4)
    assert list(other_seed) != epoch0


def test_no_shuffle_keeps_dataset_order_without_packing() -> None:
    s = BatchSampler(
        [3, 4, 5, 6, 7], sequence_len=8, micro_batch_size=2, sample_packing=False, seed=0, shuffle=False
    )
    assert list(s) == [[[0], [1]], [[2], [3]], [[4]]]


@pytest.mark.parametrize("packing", [True, False])
def test_efficiency_is_real_tokens_over_row_capacity(packing: bool) -> None:
    s = BatchSampler(LENGTHS, sequence_len=64, micro_batch_size=4, sample_packing=packing, seed=0)
    rows = [row for b in s for row in b]
    expected = sum(LENGTHS[i] for row in rows for i in row) / (len(rows) * 64)
    assert s.efficiency() == pytest.approx(expected)
    if packing:
        # Lower bound on the number of bins: ceil(total / capacity); BFD stays within 11/9 OPT + 1.
        lower = -(-sum(LENGTHS) // 64)
        assert len(rows) <= 11 * lower / 9 + 1


# ----------------------------------------------------------------------------------- collator


def rows_of(samples: list[dict], micro_batch: list[list[int]]) -> list[list[dict]]:
    return [[samples[i] for i in row] for row in micro_batch]


@pytest.mark.parametrize("pad_to_sequence_len", [True, False])
def test_collator_lays_out_documents(pad_to_sequence_len: bool) -> None:
    samples = make_samples([5, 3, 7, 2, 6], seed=1)
    micro_batch = [[0, 1], [2], [3, 4]]
    collate = Collator(
        0, sequence_len=16, pad_to_sequence_len=pad_to_sequence_len, attn_implementation="sdpa"
    )
    batch = collate(rows_of(samples, micro_batch))
    width = 16 if pad_to_sequence_len else 8
    assert batch["input_ids"].shape == (3, width)

    expected_cu = [0]
    doc = 0
    for r, row in enumerate(micro_batch):
        offset = 0
        for k, i in enumerate(row):
            s = samples[i]
            n = len(s["input_ids"])
            assert batch["input_ids"][r, offset : offset + n].tolist() == s["input_ids"]
            assert batch["labels"][r, offset].item() == IGNORE_INDEX
            assert batch["labels"][r, offset + 1 : offset + n].tolist() == s["labels"][1:]
            assert batch["position_ids"][r, offset : offset + n].tolist() == list(range(n))
            assert (batch["document_ids"][r, offset : offset + n] == doc).all()
            seg = n + (width - (offset + n) if k == len(row) - 1 else 0)  # padding joins the last doc
            expected_cu.append(expected_cu[-1] + seg)
            doc += 1
            offset += n
        pad = slice(offset, width)
        assert (batch["input_ids"][r, pad] == 0).all()
        assert (batch["labels"][r, pad] == IGNORE_INDEX).all()
        last = len(samples[row[-1]]["input_ids"])
        assert batch["position_ids"][r, pad].tolist() == list(range(last, last + width - offset))
    assert batch["cu_seqlens"].tolist() == expected_cu
    assert batch["seq_lens"].tolist() == np.diff(expected_cu).tolist()
    assert batch["max_seqlen"].item() == max(np.diff(expected_cu))
    # What the shifted loss will count: per document, labels[1:] != -100 (first label is never used).
    expected_trained = sum(sum(lab != IGNORE_INDEX for lab in s["labels"][1:]) for s in samples)
    assert (
        batch["num_trained_tokens"].item()
        == expected_trained
        == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    )
    assert batch["num_tokens"].item() == sum(len(s["input_ids"]) for s in samples)


def test_collator_rejects_bad_rows() -> None:
    samples = make_samples([5, 3, 9])
    collate = Collator(0, sequence_len=10, pad_to_sequence_len=True, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="more than sequence_len"):
        collate([[samples[0], samples[2]]])
    with pytest.raises(ValueError, match="labels"):
        collate([[{"input_ids": [1, 2, 3], "labels": [1, 2]}]])
    custom = Collator(0, sequence_len=10, pad_to_sequence_len=True, attn_implementation="my_custom_kernel")
    custom([[samples[0]], [samples[1]]])  # one document per row: fine for any backend
    with pytest.raises(ValueError, match="cannot keep packed documents"):
        custom([[samples[0], samples[1]]])


@pytest.mark.parametrize("packing", [True, False])
def test_constant_shapes_over_an_epoch_with_pad_to_sequence_len(packing: bool) -> None:
    # 61 samples: 30 bins packed, 61 rows unpacked; either way micro-batches of 4 leave a short last one.
    lengths = np.random.default_rng(3).integers(1, 40, size=61).tolist()
    samples = make_samples(lengths, seed=3)
    collate = Collator(
        0, sequence_len=40, pad_to_sequence_len=True, attn_implementation="sdpa", micro_batch_size=4
    )
    for drop_last in (False, True):
        sampler = BatchSampler(
            lengths, sequence_len=40, micro_batch_size=4, sample_packing=packing, seed=0, drop_last=drop_last
        )
        batches = [collate(rows_of(samples, mb)) for mb in sampler]
        assert len(batches) == len(sampler)
        if not drop_last:  # the case the filler rows exist for: a short last micro-batch
            assert len(sampler.micro_batches()[-1]) < 4
        # Every batch, the last one included, is exactly micro_batch_size × sequence_len.
        assert all(
            b[key].shape == (4, 40) for b in batches for key in ("input_ids", "labels", "position_ids")
        )
        assert all(int(b["cu_seqlens"][-1]) == 4 * 40 for b in batches)
        # Filler rows add no token, real or trained: every sample counted once, nothing more.
        assert sum(int(b["num_tokens"]) for b in batches) == sum(
            lengths[i] for mb in sampler for r in mb for i in r
        )


def test_filler_rows_change_neither_loss_nor_gradients() -> None:
    """A short micro-batch topped up with filler rows gives the loss and gradients of its real rows,
    compared with a plain reference: each document run alone, summed cross-entropy."""
    from hellbender.testing.tiny import build_tiny_model

    samples = make_samples([9, 5, 12, 4], seed=4)
    rows = [[samples[0], samples[1]], [samples[2], samples[3]]]  # 2 packed rows of a 4-row micro-batch
    filled = Collator(
        0, sequence_len=32, pad_to_sequence_len=True, attn_implementation="sdpa", micro_batch_size=4
    )
    batch = filled(rows)
    assert batch["input_ids"].shape == (4, 32)
    assert (batch["input_ids"][2:] == 0).all() and (batch["labels"][2:] == IGNORE_INDEX).all()
    assert batch["position_ids"][2:].tolist() == [list(range(32))] * 2
    own_docs = batch["document_ids"][2:, 0].tolist()
    assert len(set(own_docs)) == 2 and not set(own_docs) & set(batch["document_ids"][:2].reshape(-1).tolist())
    unfilled = Collator(0, sequence_len=32, pad_to_sequence_len=True, attn_implementation="sdpa")(rows)
    assert unfilled["input_ids"].shape == (2, 32)
    assert batch["num_trained_tokens"] == unfilled["num_trained_tokens"]
    assert batch["num_tokens"] == unfilled["num_tokens"]

    def loss_and_grads(
        run: Callable[[torch.nn.Module], torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = build_tiny_model(seed=3, vocab_size=128, num_hidden_layers=2, pad_token_id=None)
        loss = run(model)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    def reference(model: torch.nn.Module) -> torch.Tensor:
        total = torch.zeros(())
        for s in samples:
            logits = model(input_ids=torch.tensor([s["input_ids"]]), use_cache=False).logits[0]
            total = total + F.cross_entropy(logits[:-1], torch.tensor(s["labels"][1:]), reduction="sum")
        return total

    ref_loss, ref_grads = loss_and_grads(reference)
    for attn in ("sdpa", "eager"):
        loss, grads = loss_and_grads(
            lambda m, attn=attn: causal_lm_loss_sum(m(**model_inputs(batch, attn)).logits, batch["labels"])
        )
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for g, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def test_collator_without_fill_or_padding_keeps_the_rows_given() -> None:
    samples = make_samples([5, 3], seed=2)
    # micro_batch_size only fills rows when every row is padded to sequence_len anyway.
    by_longest = Collator(
        0, sequence_len=16, pad_to_sequence_len=False, attn_implementation="sdpa", micro_batch_size=4
    )
    assert by_longest([[samples[0]], [samples[1]]])["input_ids"].shape == (2, 5)
    filled = Collator(
        0, sequence_len=16, pad_to_sequence_len=True, attn_implementation="sdpa", micro_batch_size=1
    )
    with pytest.raises(ValueError, match="more than micro_batch_size=1"):
        filled([[samples[0]], [samples[1]]])


# ----------------------------------------------------------------------------------- attention


def test_backend_isolation_table() -> None:
    for name in ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "xformers"):
        assert backend_isolates_documents(name)
    for name in ("my_custom_kernel", "paged|eager", "flash_attention", ""):
        assert not backend_isolates_documents(name)


def test_check_backend_trainable_on_cpu() -> None:
    for ok in ("eager", "sdpa", "some_custom_backend"):
        check_backend_trainable(ok, "cpu")
    for gpu_only in ("flash_attention_2", "flash_attention_3", "xformers"):
        with pytest.raises(AttentionBackendError, match="CUDA"):
            check_backend_trainable(gpu_only, "cpu")
    with pytest.raises(AttentionBackendError, match="no backward"):
        check_backend_trainable("flex_attention", torch.device("cpu"))


def packed_batch() -> tuple[dict, list[list[dict]]]:
    samples = make_samples([6, 3, 5, 8, 2, 4], seed=5)
    rows = [[samples[0], samples[1], samples[4]], [samples[2]], [samples[3], samples[5]]]
    return Collator(0, sequence_len=16, pad_to_sequence_len=True, attn_implementation="sdpa")(rows), rows


def dense_block_causal(seqlens: list[int]) -> torch.Tensor:
    """Reference: causal blocks on the diagonal of a (T, T) matrix, built by plain loops."""
    total = sum(seqlens)
    m = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for n in seqlens:
        for q in range(n):
            m[start + q, start : start + q + 1] = True
        start += n
    return m


def test_document_causal_mask_matches_loop_reference() -> None:
    batch, _ = packed_batch()
    mask = document_causal_mask(batch["document_ids"])
    assert mask.shape == (3, 1, 16, 16)
    # Segments never cross a row (cu_seqlens is over the flattened rows), so the flattened
    # block-diagonal of the segments must equal block_diag of the per-row masks.
    expected = dense_block_causal(batch["seq_lens"].tolist())
    assert torch.equal(torch.block_diag(*mask[:, 0]), expected)


def test_flash_kwargs_agree_with_transformers_position_id_derivation() -> None:
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    batch, _rows = packed_batch()
    kwargs = flash_varlen_kwargs(batch)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert torch.equal(kwargs["cu_seq_lens_q"], cu_q) and torch.equal(kwargs["cu_seq_lens_k"], cu_k)
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["max_length_q"] == int(max_q) == kwargs["max_length_k"] == int(max_k)
    assert isinstance(kwargs["max_length_q"], int)
    assert torch.equal(kwargs["position_ids"], batch["position_ids"])
    # And with the document layout: boundaries at every document start of every row.
    doc_starts = (torch.diff(batch["document_ids"].reshape(-1), prepend=torch.tensor([-1])) != 0).nonzero()
    assert kwargs["cu_seq_lens_q"][:-1].tolist() == doc_starts.view(-1).tolist()
    with pytest.raises(AttentionBackendError, match="CUDA"):
        model_inputs(batch, "flash_attention_2")


def test_xformers_seqlens_describe_the_same_blocks() -> None:
    batch, _ = packed_batch()
    seqlens = xformers_seqlens(batch)
    assert sum(seqlens) == batch["input_ids"].numel()
    per_row = document_causal_mask(batch["document_ids"])[:, 0]
    assert torch.equal(dense_block_causal(seqlens), torch.block_diag(*per_row))
    with pytest.raises(AttentionBackendError, match="CUDA"):
        model_inputs(batch, "xformers")


def test_model_inputs_masks_per_backend() -> None:
    batch, _ = packed_batch()
    allowed = document_causal_mask(batch["document_ids"])
    sdpa = model_inputs(batch, "sdpa")
    assert sdpa["use_cache"] is False and sdpa["attention_mask"].dtype == torch.bool
    assert torch.equal(sdpa["attention_mask"], allowed)
    eager = model_inputs(batch, "eager", dtype=torch.bfloat16)
    assert eager["use_cache"] is False and eager["attention_mask"].dtype == torch.bfloat16
    assert torch.equal(eager["attention_mask"] == 0, allowed)
    assert (eager["attention_mask"][~allowed] == torch.finfo(torch.bfloat16).min).all()
    flex = model_inputs(batch, "flex_attention")
    assert flex["use_cache"] is False and tuple(flex["attention_mask"].shape) == (3, 1, 16, 16)
    with pytest.raises(AttentionBackendError, match="cannot isolate"):
        model_inputs(batch, "my_custom_kernel")


# ----------------------------------------------------------------------------------- loss


def test_loss_sum_and_count_match_transformers_mean_loss() -> None:
    from hellbender.testing.tiny import build_tiny_model

    model = build_tiny_model(
        seed=0, vocab_size=128, num_hidden_layers=1, max_position_embeddings=64, pad_token_id=None
    )
    # build_tiny_model leaves the global RNG untouched, so the ids get their own seeded generator.
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    labels[1, 9:] = IGNORE_INDEX
    out = model(input_ids=ids, labels=labels, use_cache=False)  # transformers' shifted mean loss
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())  # what the shifted loss counts
    total = causal_lm_loss_sum(out.logits, labels)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total / n, out.loss, atol=1e-6, rtol=1e-6)
    # bf16 logits are upcast before the log-softmax.
    half = causal_lm_loss_sum(out.logits.bfloat16(), labels)
    ref = F.cross_entropy(
        out.logits.bfloat16().float()[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), reduction="sum"
    )
    torch.testing.assert_close(half, ref)
