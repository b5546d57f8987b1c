"""Ring attention: exact document-causal attention over a sequence split across the ranks of a group.

Each rank holds the queries, keys and values of its own tokens (any subset of the sequence: the
contiguous, zigzag and stripe layouts of :mod:`hellbender.distributed.context_parallel` are all
just index sets). The K/V blocks travel around the ring — rank r sends to r+1 and receives from
r−1 — so after ``size`` steps every rank has attended its queries to every block. Each step gives a
*partial* result over one block, its output and its log-sum-exp (lse); partial results merge by
the online-softmax rule::

    lse = logaddexp(lse_a, lse_b)
    out = out_a · exp(lse_a − lse) + out_b · exp(lse_b − lse)

which is exactly softmax over the union of the two key sets, whatever the order of the blocks.

**Masks come from global indices**, never from block positions: a query attends to a key iff both
belong to the same document and the key's global token index is ≤ the query's. Zigzag order,
documents that straddle chunk boundaries and packed rows are therefore exact without any special
case. The caller supplies, per ring step, a :class:`RingBlock`: the rows (queries) and columns
(keys) of that block that take part at all and the mask between them. Blocks with no allowed pair
are ``None`` and skipped (the K/V still travel: other ranks need them). Restricting a block to its
live rows and columns is what makes the zigzag layout balanced in practice: with zigzag every
off-diagonal block is exactly half live (either half of its keys or half of its queries), so every
rank computes the same amount; a contiguous split leaves rank r with r + 1 blocks.

**Backward** runs its own ring, as flash-attention's backward does, from the saved output and lse:
``P = exp(S − lse)`` recomputes the probabilities of any block without a second softmax, and
``dS = P ∘ (dP − rowsum(dO ∘ O))``. ``dK``/``dV`` accumulators travel *with their block*: after the
block's last visit they arrive back on the rank that owns it (one extra hop), so every rank ends
with the gradients of its own keys and values. K/V of the next step are received while the
current block is computed (non-blocking P2P); the accumulators can only move after the compute.

**Precision**: scores, probabilities, lse, the running output and every gradient accumulator are
float32 for bf16/fp16/fp32 inputs (float64 for float64 ones, so gradcheck can verify the
backward) — the merge of partial results is where low precision would compound; the output and
gradients are cast back to the input dtype at the end. This is a reference implementation in plain
matmuls: a GPU build would call a fused kernel per block with the same interface (rows/cols/mask
→ out, lse).

**GQA**: queries are viewed as (B, H_kv, G, L, D) and keys/values as (B, H_kv, 1, L, D), so a key
head is never repeated — neither on the wire (only H_kv heads travel) nor in memory; its gradient
is summed over the G query heads that read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

__all__ = [
    "RingBlock",
    "RingGroup",
    "attend_block",
    "document_causal",
    "merge_partial",
    "plan_ring_blocks",
    "ring_attention",
]

# Tags keep the two kinds of message of the backward apart on the same pair of ranks.
_KV_TAG = 0
_GRAD_TAG = 1


@dataclass(frozen=True)
class RingGroup:
    """The ranks of one ring: ``group`` (None = the default group), this rank's place in it, its size.

    P2P calls take *global* ranks; :meth:`peer` translates a position in the ring.
    """

    group: dist.ProcessGroup | None
    rank: int
    size: int

    def peer(self, offset: int) -> int:
        """Global rank of the ring position ``rank + offset`` (mod size)."""
        position = (self.rank + offset) % self.size
        group = self.group if self.group is not None else dist.group.WORLD
        return dist.get_global_rank(group, position) if group is not None else position

    def exchange(self, send: torch.Tensor, tag: int) -> tuple[torch.Tensor, list[dist.Work]]:
        """Start sending ``send`` to the next rank and receiving the previous rank's into a new buffer.

        Returns the buffer and the requests; the buffer is valid after every request's ``wait()``.
        """
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.peer(1), self.group, tag),
            dist.P2POp(dist.irecv, recv, self.peer(-1), self.group, tag),
        ]
        return recv, dist.batch_isend_irecv(ops)


@dataclass(frozen=True)
class RingBlock:
    """What one rank computes against one K/V block.

    ``rows``: indices of the local queries that may see at least one key of the block (None: all);
    ``cols``: indices of the block's keys that at least one local query may see (None: all);
    ``allowed``: bool (B, 1, 1, len(rows), len(cols)), the document-causal mask between them.
    """

    rows: torch.Tensor | None
    cols: torch.Tensor | None
    allowed: torch.Tensor


def document_causal(
    q_index: torch.Tensor, q_doc: torch.Tensor, k_index: torch.Tensor, k_doc: torch.Tensor
) -> torch.Tensor:
    """Bool (B, Lq, Lk): query i may see key j iff same document and global index j ≤ i.

    ``q_index``/``k_index`` are the global token indices (Lq,)/(Lk,) within the row, the same for
    every row of the batch; ``q_doc``/``k_doc`` the document ids (B, Lq)/(B, Lk).
    """
    same_doc = q_doc[:, :, None] == k_doc[:, None, :]
    causal = k_index[None, None, :] <= q_index[None, :, None]
    return same_doc & causal


def _live(any_along: torch.Tensor) -> torch.Tensor | None:
    """Indices where ``any_along`` is True, or None when all are (no gather needed)."""
    if bool(any_along.all()):
        return None
    return torch.nonzero(any_along).flatten()


def plan_ring_blocks(
    q_index: torch.Tensor,
    q_doc: torch.Tensor,
    block_indices: list[torch.Tensor],
    block_docs: list[torch.Tensor],
) -> list[RingBlock | None]:
    """One :class:`RingBlock` (or None when fully masked) per ring step.

    ``block_indices[s]``/``block_docs[s]`` describe the K/V block a rank holds at step ``s``, i.e.
    the block of ring position ``rank − s``. Computed once per batch and reused by every layer,
    forward and backward (the mask does not depend on the layer).
    """
    blocks: list[RingBlock | None] = []
    for k_index, k_doc in zip(block_indices, block_docs, strict=True):
        allowed = document_causal(q_index, q_doc, k_index, k_doc)  # (B, Lq, Lk)
        rows = _live(allowed.any(dim=2).any(dim=0))
        if rows is not None and rows.numel() == 0:
            blocks.append(None)
            continue
        cols = _live(allowed.any(dim=1).any(dim=0))
        if rows is not None:
            allowed = allowed.index_select(1, rows)
        if cols is not None:
            allowed = allowed.index_select(2, cols)
        blocks.append(RingBlock(rows, cols, allowed[:, None, None]))
    return blocks


def _select(x: torch.Tensor, dim: int, index: torch.Tensor | None) -> torch.Tensor:
    return x if index is None else x.index_select(dim, index)


def attend_block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: RingBlock, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention of ``q`` (B, Hk, G, Lq, D) over one block ``k``/``v`` (B, Hk, 1, Lk, D).

    All three in the accumulation dtype (float32 or wider).

    Returns the block's output (B, Hk, G, R, Dv) and lse (B, Hk, G, R) for its R live rows. A row
    with no allowed key in this block (possible when another batch row made it live) gets lse −inf
    and output 0, which the merge treats as "no contribution".
    """
    q = _select(q, 3, block.rows)
    k = _select(k, 3, block.cols)
    v = _select(v, 3, block.cols)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~block.allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)  # exp(−inf − 0) = 0: an empty row stays 0
    probs = torch.exp(scores - safe[..., None])
    return torch.matmul(probs, v), lse


def merge_partial(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The online-softmax merge of two partial results over disjoint key sets.

    Either side may be empty (lse −inf, output 0); both empty stays empty (no 0·inf NaN).
    """
    new_lse = torch.logaddexp(lse, block_lse)
    empty = torch.isinf(new_lse)
    base = new_lse.masked_fill(empty, 0.0)
    old_weight = torch.exp(lse - base).masked_fill(empty, 0.0)
    new_weight = torch.exp(block_lse - base).masked_fill(empty, 0.0)
    return out * old_weight[..., None] + block_out * new_weight[..., None], new_lse


def _pack(*tensors: torch.Tensor) -> torch.Tensor:
    """One flat buffer: one message per step instead of one per tensor."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(flat: torch.Tensor, *like: torch.Tensor) -> list[torch.Tensor]:
    parts, start = [], 0
    for t in like:
        parts.append(flat[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return parts


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs, the input's own dtype when wider (float64 stays exact)."""
    return torch.promote_types(x.dtype, torch.float32)


def _wait(requests: list[dist.Work]) -> None:
    for request in requests:
        request.wait()


class _RingAttention(torch.autograd.Function):
    """Forward and backward ring passes; see the module docstring for the algorithm.

    ``ctx`` is ``Any`` as in torch's own signature: at run time it is the autograd node, whose
    ``saved_tensors`` and the attributes set here no static class declares.
    """

    if TYPE_CHECKING:  # torch's ``Function.apply`` is unannotated; what it takes and gives here

        @classmethod
        def apply(
            cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            blocks: list[RingBlock | None], ring: RingGroup, scale: float, /,
        ) -> torch.Tensor: ...  # fmt: skip

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        blocks: list[RingBlock | None],
        ring: RingGroup,
        scale: float,
    ) -> torch.Tensor:
        acc = _accumulation_dtype(q)
        q32 = q.to(acc)
        out = torch.zeros((*q.shape[:-1], v.shape[-1]), dtype=acc, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
        kv = _pack(k, v)
        for step, block in enumerate(blocks):
            pending: list[dist.Work] = []
            if step + 1 < ring.size:  # the next block arrives while this one is computed
                next_kv, pending = ring.exchange(kv, _KV_TAG)
            if block is not None:
                k_s, v_s = _unpack(kv, k, v)
                block_out, block_lse = attend_block(q32, k_s.to(acc), v_s.to(acc), block, scale)
                if block.rows is None:
                    out, lse = merge_partial(out, lse, block_out, block_lse)
                else:
                    o, l_ = merge_partial(
                        out.index_select(3, block.rows), lse.index_select(3, block.rows), block_out, block_lse
                    )
                    out.index_copy_(3, block.rows, o)
                    lse.index_copy_(3, block.rows, l_)
            if pending:
                _wait(pending)
                kv = next_kv
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.blocks, ctx.ring, ctx.scale = blocks, ring, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        blocks: list[RingBlock | None] = ctx.blocks
        ring: RingGroup = ctx.ring
        scale: float = ctx.scale
        acc = _accumulation_dtype(q)
        q32, d_out = q.to(acc), grad_out.to(acc)
        delta = (d_out * out).sum(dim=-1)  # rowsum(dO ∘ O), (B, Hk, G, Lq)
        d_q = torch.zeros_like(q32)
        kv = _pack(k, v)
        # The accumulators of the block currently held; they travel with it around the ring.
        grads = torch.zeros(kv.shape, dtype=acc, device=kv.device)
        for step, block in enumerate(blocks):
            pending: list[dist.Work] = []
            if step + 1 < ring.size:
                next_kv, pending = ring.exchange(kv, _KV_TAG)
            if block is not None:
                k_s, v_s = _unpack(kv, k, v)
                d_k, d_v = _unpack(grads, k, v)
                _block_backward(q32, k_s.to(acc), v_s.to(acc), d_out, delta, lse, block, scale, d_q, d_k, d_v)
            # Hand this block's accumulators on with it; after the last step they reach its owner.
            if ring.size > 1:
                grads, grad_requests = ring.exchange(grads, _GRAD_TAG)
                _wait(pending + grad_requests)
            if pending:
                kv = next_kv
        d_k, d_v = _unpack(grads, k, v)
        return d_q.to(q.dtype), d_k.to(k.dtype), d_v.to(v.dtype), None, None, None


def _block_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    d_out: torch.Tensor,
    delta: torch.Tensor,
    lse: torch.Tensor,
    block: RingBlock,
    scale: float,
    d_q: torch.Tensor,
    d_k: torch.Tensor,
    d_v: torch.Tensor,
) -> None:
    """Add one block's contribution to ``d_q`` (local queries) and ``d_k``/``d_v`` (the block's keys)."""
    rows, cols = block.rows, block.cols
    q_r, do_r = _select(q, 3, rows), _select(d_out, 3, rows)
    delta_r, lse_r = _select(delta, 3, rows), _select(lse, 3, rows)
    k_c, v_c = _select(k, 3, cols), _select(v, 3, cols)
    scores = torch.matmul(q_r, k_c.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~block.allowed, float("-inf"))
    probs = torch.exp(scores - lse_r[..., None])  # the final lse is finite: every query sees itself
    dv_c = torch.matmul(probs.transpose(-1, -2), do_r).sum(dim=2, keepdim=True)
    d_scores = probs * (torch.matmul(do_r, v_c.transpose(-1, -2)) - delta_r[..., None])
    dq_r = torch.matmul(d_scores, k_c) * scale
    dk_c = torch.matmul(d_scores.transpose(-1, -2), q_r).sum(dim=2, keepdim=True) * scale
    if rows is None:
        d_q.add_(dq_r)
    else:
        d_q.index_add_(3, rows, dq_r)
    if cols is None:
        d_k.add_(dk_c)
        d_v.add_(dv_c)
    else:
        d_k.index_add_(3, cols, dk_c)
        d_v.index_add_(3, cols, dv_c)


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    blocks: list[RingBlock | None],
    ring: RingGroup,
    scale: float,
    kv_head_stride: int | None = None,
) -> torch.Tensor:
    """Document-causal attention of local ``query`` (B, H, L, D) over the whole ring's keys/values.

    ``key``/``value`` are (B, H_kv, L, D) with H divisible by H_kv (GQA). ``blocks`` come from
    :func:`plan_ring_blocks`. ``kv_head_stride`` (Axolotl's ``heads_k_stride``) runs the ring on
    that many K/V heads at a time: heads are independent, so the result is the same and only the
    size of the blocks in flight changes. Returns (B, H, L, Dv), differentiable in all three inputs.
    """
    b, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    if len(blocks) != ring.size:
        raise ValueError(f"{len(blocks)} block plans for a ring of {ring.size} ranks: one per step is needed")
    stride = kv_head_stride or kv_heads
    if stride < 1 or kv_heads % stride:
        raise ValueError(f"heads_k_stride {stride} must divide the {kv_heads} key/value heads")
    group_size = heads // kv_heads
    q = query.reshape(b, kv_heads, group_size, length, dim)
    k, v = key[:, :, None], value[:, :, None]
    outs = [
        _RingAttention.apply(
            q[:, h : h + stride], k[:, h : h + stride], v[:, h : h + stride], blocks, ring, scale
        )
        for h in range(0, kv_heads, stride)
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.reshape(b, heads, length, value.shape[-1])
