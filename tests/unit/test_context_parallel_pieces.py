"""The pieces of context parallelism that need no second process: how rows are cut and put back,
how a batch is padded and sharded, the masks of the ring's blocks, the online-softmax merge, the
ring and Ulysses on a group of one, the registered transformers attention, and the mapping of
Axolotl's ``ring_attn_func``. (N real ranks ≡ 1 process is tests/invariants/test_context_parallel.py.)"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from hellbender.data.packing import Collator
from hellbender.data.tokenize import IGNORE_INDEX
from hellbender.distributed.context_parallel import (
    ATTENTION_NAME,
    ContextParallelContext,
    ContextParallelError,
    ContextParallelPlan,
    Layout,
    context_parallel_attention,
    model_inputs,
    pad_to_multiple,
    plan_from_axolotl,
    register_context_parallel_attention,
    shard_batch,
    shard_indices,
    shard_sequence,
    shift_labels,
    unshard_sequence,
)
from hellbender.distributed.ring_attention import (
    RingBlock,
    RingGroup,
    attend_block,
    document_causal,
    merge_partial,
    plan_ring_blocks,
    ring_attention,
)
from hellbender.models import attention
from hellbender.models.attention import AttentionBackendError
from hellbender.testing.tiny import build_tiny_model

LAYOUTS: list[Layout] = ["zigzag", "contiguous", "stripe"]
PAD = 3


def collated(lengths_per_row: list[list[int]], width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in lengths_per_row:
        row = []
        for n in lengths:
            ids = torch.randint(4, 320, (n,), generator=g).tolist()
            row.append({"input_ids": ids, "labels": [IGNORE_INDEX, *ids[1:]]})
        rows.append(row)
    collate = Collator(PAD, sequence_len=width, pad_to_sequence_len=True, attn_implementation="sdpa")
    return collate(rows)


# ------------------------------------------------------------------------------------- sharding


def test_zigzag_gives_rank_r_chunks_r_and_2cp_minus_1_minus_r() -> None:
    # 16 tokens, cp 2: chunks of 4, rank 0 keeps chunks 0 and 3, rank 1 keeps 1 and 2
    assert shard_indices(16, 2, 0, "zigzag").tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert shard_indices(16, 2, 1, "zigzag").tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert shard_indices(8, 4, 1, "zigzag").tolist() == [1, 6]
    assert shard_indices(8, 2, 1, "contiguous").tolist() == [4, 5, 6, 7]
    assert shard_indices(8, 2, 1, "stripe").tolist() == [1, 3, 5, 7]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_the_shares_partition_the_row_and_unshard_inverts_shard(layout: Layout, cp: int) -> None:
    length = 2 * cp * 3
    shares = [shard_indices(length, cp, r, layout) for r in range(cp)]
    assert sorted(torch.cat(shares).tolist()) == list(range(length))
    assert {len(s) for s in shares} == {length // cp}
    x = torch.randn(2, length, 5, requires_grad=True)
    back = unshard_sequence([shard_sequence(x, cp, r, layout) for r in range(cp)], layout)
    assert torch.equal(back, x)
    back.sum().backward()  # differentiable, each element used once
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))


def test_a_length_that_does_not_divide_is_refused_with_the_fix() -> None:
    with pytest.raises(ContextParallelError, match=r"multiple of 8.*pad_to_multiple"):
        shard_indices(20, 4, 0, "zigzag")
    with pytest.raises(ContextParallelError, match="multiple of 3"):
        shard_indices(20, 3, 0, "contiguous")
    shard_indices(20, 4, 0, "contiguous")  # 20 = 4 × 5: fine without zigzag's two chunks per rank
    with pytest.raises(ContextParallelError, match="outside"):
        shard_indices(16, 2, 2, "zigzag")
    with pytest.raises(ContextParallelError, match="unknown context-parallel layout"):
        shard_indices(16, 2, 0, "diagonal")  # type: ignore[arg-type]


def test_padding_to_a_multiple_follows_the_collators_convention() -> None:
    batch = collated([[5, 7], [9]], width=14)
    padded = pad_to_multiple(batch, 2, "zigzag", PAD)
    assert padded["input_ids"].shape == (2, 16)
    assert torch.equal(padded["input_ids"][:, 14:], torch.full((2, 2), PAD))
    assert (padded["labels"][:, 14:] == IGNORE_INDEX).all()
    # the padding continues the row's last document: same id, positions counting on
    assert torch.equal(padded["document_ids"][:, 14:], batch["document_ids"][:, -1:].expand(2, 2))
    assert torch.equal(padded["position_ids"][:, 14:], batch["position_ids"][:, -1:] + torch.tensor([1, 2]))
    assert padded["cu_seqlens"].tolist() == [0, 5, 16, 32] and padded["seq_lens"].tolist() == [5, 11, 16]
    assert int(padded["max_seqlen"]) == 16 and torch.equal(
        padded["num_trained_tokens"], batch["num_trained_tokens"]
    )
    assert pad_to_multiple(padded, 2, "zigzag", PAD)["input_ids"].shape == (2, 16)  # already a multiple


def test_padding_changes_no_real_tokens_logits() -> None:
    batch = collated([[5, 7], [9]], width=14)
    padded = pad_to_multiple(batch, 4, "zigzag", PAD)
    model = build_tiny_model(seed=0)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = model(**attention.model_inputs(batch, "sdpa")).logits
        longer = model(**attention.model_inputs(padded, "sdpa")).logits
    torch.testing.assert_close(longer[:, :14], plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_sharded_batch_keeps_global_positions_shifted_labels_and_the_global_count(layout: Layout) -> None:
    batch = collated([[5, 7, 4], [9, 3]], width=16)
    shares = [shard_batch(batch, 4, r, layout) for r in range(4)]
    for key in ("input_ids", "labels", "position_ids", "document_ids"):
        assert torch.equal(unshard_sequence([s[key] for s in shares], layout), batch[key])
    targets = unshard_sequence([s["shift_labels"] for s in shares], layout)
    assert torch.equal(targets[:, :-1], batch["labels"][:, 1:]) and (targets[:, -1] == IGNORE_INDEX).all()
    assert torch.equal(targets, shift_labels(batch["labels"]))
    # the counts are the shares': summed over the ranks, every token is counted once
    assert all(int(s["num_trained_tokens"]) == int((s["shift_labels"] != IGNORE_INDEX).sum()) for s in shares)
    assert sum(int(s["num_trained_tokens"]) for s in shares) == int(batch["num_trained_tokens"])
    assert sum(int(s["num_tokens"]) for s in shares) == int(batch["num_tokens"])
    assert "cu_seqlens" not in shares[0]


# ----------------------------------------------------------------------------------------- masks


def test_document_causal_from_global_indices_is_the_dense_document_mask() -> None:
    batch = collated([[5, 7, 4], [16]], width=16)
    docs = batch["document_ids"]
    index = torch.arange(16)
    dense = attention.document_causal_mask(docs)[:, 0]
    assert torch.equal(document_causal(index, docs, index, docs), dense)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    got = document_causal(index[perm], docs[:, perm], index[perm], docs[:, perm])  # any order of tokens
    assert torch.equal(got, dense[:, perm][:, :, perm])


def blocks_of(
    docs: torch.Tensor, cp: int, rank: int, layout: Layout
) -> tuple[torch.Tensor, list[torch.Tensor], list[RingBlock | None]]:
    length = docs.shape[1]
    q_index = shard_indices(length, cp, rank, layout)
    sources = [(rank - s) % cp for s in range(cp)]
    k_indices = [shard_indices(length, cp, src, layout) for src in sources]
    blocks = plan_ring_blocks(q_index, docs[:, q_index], k_indices, [docs[:, i] for i in k_indices])
    return q_index, k_indices, blocks


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("packed", [True, False])
def test_the_ring_blocks_cover_exactly_the_dense_mask(layout: Layout, packed: bool) -> None:
    batch = collated([[5, 9, 7, 11], [20, 12]] if packed else [[23], [32]], width=32)
    docs, cp = batch["document_ids"], 4
    dense = attention.document_causal_mask(docs)[:, 0]
    for rank in range(cp):
        q_index, k_indices, blocks = blocks_of(docs, cp, rank, layout)
        for k_index, block in zip(k_indices, blocks, strict=True):
            want = dense[:, q_index][:, :, k_index]
            got = torch.zeros_like(want)
            if block is not None:
                rows = block.rows if block.rows is not None else torch.arange(len(q_index))
                cols = block.cols if block.cols is not None else torch.arange(len(k_index))
                got[:, rows[:, None], cols[None, :]] = block.allowed[:, 0, 0]
            else:
                assert not want.any()
            assert torch.equal(got, want)


def live_area(block: RingBlock | None) -> int:
    return 0 if block is None else int(block.allowed.shape[-1] * block.allowed.shape[-2])


def test_zigzag_balances_the_causal_work_and_contiguous_skips_future_blocks() -> None:
    docs = torch.zeros(1, 32, dtype=torch.int32)  # one document: plain causal attention
    cp = 4
    zigzag = [sum(live_area(b) for b in blocks_of(docs, cp, r, "zigzag")[2]) for r in range(cp)]
    assert len(set(zigzag)) == 1  # every rank computes the same area
    contiguous = [blocks_of(docs, cp, r, "contiguous")[2] for r in range(cp)]
    # rank r sees blocks r, r−1, …, 0 (steps 0..r); blocks of later tokens are skipped outright
    assert [sum(b is not None for b in blocks) for blocks in contiguous] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------ online softmax


def test_merging_partial_blocks_in_any_order_is_softmax_over_all_keys() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 6, 4, generator=g, dtype=torch.float64)  # (B, H_kv, G, L, D)
    k = torch.randn(1, 2, 1, 10, 4, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 1, 10, 5, generator=g, dtype=torch.float64)
    allowed = torch.rand(1, 6, 10, generator=g) < 0.6
    allowed[:, :, 0] = True  # every query sees at least one key overall
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~allowed[:, None, None], float("-inf"))
    want = torch.softmax(scores, dim=-1) @ v
    splits = [range(0, 3), range(3, 4), range(4, 10)]
    for order in itertools.permutations(splits):
        out = torch.zeros(1, 2, 3, 6, 5, dtype=torch.float64)
        lse = torch.full((1, 2, 3, 6), float("-inf"), dtype=torch.float64)
        for keys in order:
            cols = torch.tensor(list(keys))
            block = RingBlock(None, cols, allowed[:, :, cols][:, None, None])
            out, lse = merge_partial(out, lse, *attend_block(q, k, v, block, 0.5))
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), rtol=1e-12, atol=1e-12)


def test_an_empty_block_or_row_adds_nothing_and_no_nan() -> None:
    out, lse = torch.randn(2, 3), torch.randn(2)
    nothing = (torch.zeros(2, 3), torch.full((2,), float("-inf")))
    merged, merged_lse = merge_partial(out, lse, *nothing)
    assert torch.equal(merged, out) and torch.equal(merged_lse, lse)
    empty, empty_lse = merge_partial(*nothing, *nothing)
    assert not empty.isnan().any() and (empty == 0).all() and torch.isinf(empty_lse).all()


# ----------------------------------------------------------------------- a group of one process


def dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: torch.Tensor, scale: float
) -> torch.Tensor:
    mask = attention.document_causal_mask(docs)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def test_ring_attention_of_one_rank_has_exact_gradients() -> None:
    """gradcheck in float64: the hand-written backward (P from lse, dS, GQA sums) is the derivative."""
    docs = collated([[3, 5], [8]], width=8)["document_ids"]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.arange(8)
    blocks = plan_ring_blocks(index, docs, [index], [docs])

    def ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ring_attention(q, k, v, blocks, RingGroup(None, 0, 1), 0.5)

    assert torch.autograd.gradcheck(ring, (q, k, v))
    torch.testing.assert_close(ring(q, k, v), dense_reference(q, k, v, docs, 0.5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("strategy", "stride"), [("ring", None), ("ring", 1), ("ulysses", None)])
def test_both_strategies_on_a_group_of_one_equal_dense_attention(strategy: Any, stride: int | None) -> None:
    docs = collated([[5, 7, 4], [16]], width=16)["document_ids"]
    cp = ContextParallelContext(docs, ContextParallelPlan(strategy, "zigzag", stride))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 16, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    inputs = [q, k, v]
    refs = [t.detach().clone().requires_grad_() for t in inputs]
    out = context_parallel_attention(q, k, v, cp, scale=8**-0.5)
    want = dense_reference(refs[0], refs[1], refs[2], docs, 8**-0.5)
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-6)
    for got_t, want_t in zip(inputs, refs, strict=True):
        assert got_t.grad is not None and want_t.grad is not None
        torch.testing.assert_close(got_t.grad, want_t.grad, rtol=1e-5, atol=2e-6)


def test_bf16_inputs_accumulate_in_fp32_and_come_back_in_bf16() -> None:
    docs = collated([[5, 7, 4], [16]], width=16)["document_ids"]
    cp = ContextParallelContext(docs, ContextParallelPlan("ring", "zigzag"))
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, 16, 8, generator=g).bfloat16().requires_grad_() for h in (4, 2, 2))
    out = context_parallel_attention(q, k, v, cp, scale=8**-0.5)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and all(
        t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v)
    )
    # against fp32 math on the same bf16 values: only the final rounding to bf16 differs
    want = dense_reference(q.detach().float(), k.detach().float(), v.detach().float(), docs, 8**-0.5)
    torch.testing.assert_close(out.float(), want, rtol=8e-3, atol=8e-3)


def test_a_share_that_does_not_match_the_context_is_refused() -> None:
    docs = torch.zeros(1, 16, dtype=torch.int32)
    cp = ContextParallelContext(docs, ContextParallelPlan())
    x = torch.randn(1, 2, 8, 4)
    with pytest.raises(ContextParallelError, match=r"8 tokens per row but this rank's share .* is 16"):
        context_parallel_attention(x, x, x, cp, 0.5)


def test_ulysses_refuses_heads_that_do_not_divide_by_the_group() -> None:
    docs = torch.zeros(1, 12, dtype=torch.int32)
    cp = ContextParallelContext(docs, ContextParallelPlan("ulysses", "contiguous"))
    cp.size = 3  # the check comes before any exchange, so no process group is needed to reach it
    cp.local_index = shard_indices(12, 3, 0, "contiguous")
    x = torch.randn(1, 4, 4, 8)
    with pytest.raises(ContextParallelError, match=r"4 heads over 3 ranks.*ring strategy"):
        context_parallel_attention(x, x, x, cp, 0.5)


def test_a_ring_head_stride_must_divide_the_kv_heads() -> None:
    docs = torch.zeros(1, 8, dtype=torch.int32)
    cp = ContextParallelContext(docs, ContextParallelPlan("ring", "zigzag", kv_head_stride=3))
    q, kv = torch.randn(1, 4, 8, 4), torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="heads_k_stride 3 must divide the 2 key/value heads"):
        context_parallel_attention(q, kv, kv, cp, 0.5)


# ------------------------------------------------------------------- the transformers attention


def test_the_registered_attention_on_one_rank_equals_sdpa_logits_and_gradients() -> None:
    """CP 1 ≡ the plain model: the same logits and parameter gradients through the registered function."""
    register_context_parallel_attention()
    batch = collated([[5, 7, 4], [16]], width=16)
    results = []
    for impl in ("sdpa", ATTENTION_NAME):
        model = build_tiny_model(seed=0)
        model.set_attn_implementation(impl)
        if impl == "sdpa":
            logits = model(**attention.model_inputs(batch, "sdpa")).logits
        else:
            cp = ContextParallelContext(batch["document_ids"], ContextParallelPlan())
            logits = model(**model_inputs(shard_batch(batch, 1, 0, "zigzag"), cp)).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_registered_attention_refuses_to_run_without_the_context() -> None:
    register_context_parallel_attention()
    model = build_tiny_model(seed=0)
    model.set_attn_implementation(ATTENTION_NAME)
    with pytest.raises(AttentionBackendError, match="context-parallel context"):
        model(input_ids=torch.tensor([[5, 6, 7, 8]]), use_cache=False)


# ---------------------------------------------------------------------- Axolotl's ring_attn_func


@pytest.mark.parametrize(
    ("value", "layout"),
    [
        ("varlen_llama3", "zigzag"),
        ("batch_ring", "contiguous"),
        ("batch_zigzag", "zigzag"),
        ("batch_stripe", "stripe"),
    ],
)
def test_every_axolotl_ring_attn_func_maps_to_a_ring_layout(value: str, layout: Layout) -> None:
    plan = plan_from_axolotl(value, 1, sample_packing=True, num_key_value_heads=2)
    assert plan == ContextParallelPlan("ring", layout, kv_head_stride=1)


def test_axolotls_defaults_and_refusals() -> None:
    assert plan_from_axolotl(None, sample_packing=True) == ContextParallelPlan("ring", "zigzag")
    assert plan_from_axolotl(None, sample_packing=False) == ContextParallelPlan("ring", "contiguous")
    with pytest.raises(
        ContextParallelError, match=r"'batch_rign' is not one of Axolotl's values.*varlen_llama3"
    ):
        plan_from_axolotl("batch_rign", sample_packing=True)
    with pytest.raises(ContextParallelError, match="heads_k_stride 3 does not divide the model's 8"):
        plan_from_axolotl("varlen_llama3", 3, sample_packing=True, num_key_value_heads=8)
    with pytest.raises(ContextParallelError, match="at least 1"):
        plan_from_axolotl("varlen_llama3", 0, sample_packing=True)
    with pytest.raises(ContextParallelError, match="ring strategy only"):
        ContextParallelPlan("ulysses", "contiguous", kv_head_stride=2)
    with pytest.raises(ContextParallelError, match="unknown context-parallel strategy"):
        ContextParallelPlan("tree", "zigzag")  # type: ignore[arg-type]
