"""Context parallelism: one sequence split over the ranks of a CP group, attention exchanged between them.

With ``context_parallel_size: N`` every packed row of a micro-batch is cut into pieces, one share per
rank of the CP group; each rank runs the whole model on its share only, so activations shrink N
times. Everything in a decoder is per token except attention, which must still see the whole
sequence; two exchange strategies provide it, both exact:

``ring`` (:mod:`hellbender.distributed.ring_attention`)
    K/V blocks travel rank to rank with P2P send/recv; partial results merge by the online-softmax
    rule. Memory per rank stays O(L/N); works for any number of heads.
``ulysses``
    An all-to-all turns "all heads, L/N tokens" into "H/N heads, all L tokens", attention runs on
    the full sequence locally, and a second all-to-all turns it back. Needs the heads (and, after
    repeating them if needed, the K/V heads) divisible by N.

**Layouts** (how a row is cut; :func:`shard_indices`). ``zigzag``: the row is split into 2N chunks
and rank r keeps chunks r and 2N−1−r, so every rank holds as much early (cheap) as late
(expensive) causal work — Llama 3's load balancing. ``contiguous``: chunk r of N (rank r has r+1
blocks of work). ``stripe``: token t goes to rank t mod N. The length must divide by 2N (zigzag) or
N; :func:`pad_to_multiple` pads a batch the way the collator pads (a label that is never trained,
the row's last document) so it does.

**Packed documents stay isolated**: every mask is computed from the *global* token index and the
document id of each token (``document_causal``: same document and key index ≤ query index), so a
document that straddles a chunk boundary, or zigzag's reordering, changes nothing. Position ids
are the collator's global per-document ones, sharded like every other per-token tensor.

How a batch reaches the model (the training loop's side is ``docs/design/context_parallel.md``)::

    register_context_parallel_attention()            # once; model.set_attn_implementation(ATTENTION_NAME)
    cp = ContextParallelContext(batch["document_ids"], plan, group=cp_group)
    local = shard_batch(batch, cp.size, cp.rank, plan.layout)
    logits = model(**model_inputs(local, cp)).logits  # this rank's tokens only
    loss = cross_entropy_sum(logits, local["shift_labels"]) / trained_tokens_summed_over_all_ranks

The :class:`ContextParallelContext` travels to the attention function through the model's
``**kwargs`` (as the xformers bias does in :mod:`hellbender.models.attention`); it caches the
masks of the batch, so every layer, forward and backward, reuses them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hellbender.config.schema import ResolvedConfig
from hellbender.data.tokenize import IGNORE_INDEX
from hellbender.distributed.ring_attention import RingBlock, RingGroup, plan_ring_blocks, ring_attention
from hellbender.errors import HellbenderError
from hellbender.models.attention import AttentionBackendError

__all__ = [
    "ATTENTION_NAME",
    "AXOLOTL_RING_ATTN_FUNCS",
    "CONTEXT_PARALLEL_KWARG",
    "PER_TOKEN_KEYS",
    "ContextParallelContext",
    "ContextParallelError",
    "ContextParallelPlan",
    "Layout",
    "ShardingCollator",
    "Strategy",
    "TrainingInputs",
    "context_parallel_attention",
    "model_inputs",
    "pad_to_multiple",
    "plan_from_axolotl",
    "plan_from_config",
    "register_context_parallel_attention",
    "shard_batch",
    "shard_indices",
    "shard_multiple",
    "shard_sequence",
    "shift_labels",
    "ulysses_attention",
    "unshard_sequence",
    "use_context_parallel_attention",
]

Layout = Literal["zigzag", "contiguous", "stripe"]
Strategy = Literal["ring", "ulysses"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
STRATEGIES: tuple[str, ...] = get_args(Strategy)

# The name to give ``attn_implementation`` and the model-forward kwarg that carries the context.
ATTENTION_NAME = "hellbender_context_parallel"
CONTEXT_PARALLEL_KWARG = "context_parallel"
# The per-token tensors of a collated batch (see hellbender.data.packing.Collator), cut along dim 1.
PER_TOKEN_KEYS: tuple[str, ...] = ("input_ids", "labels", "position_ids", "document_ids")


class ContextParallelError(HellbenderError, ValueError):
    """A batch, model or option that context parallelism cannot handle as given; the message says why."""


# ------------------------------------------------------------------------------------------ sharding


def shard_multiple(cp_size: int, layout: Layout) -> int:
    """What the sequence length must be a multiple of: 2·cp for zigzag (2 chunks per rank), else cp."""
    if layout not in LAYOUTS:
        raise ContextParallelError(f"unknown context-parallel layout {layout!r}; one of {', '.join(LAYOUTS)}")
    if cp_size < 1:
        raise ContextParallelError(f"context_parallel_size must be at least 1, got {cp_size}")
    return 2 * cp_size if layout == "zigzag" else cp_size


def shard_indices(
    length: int, cp_size: int, rank: int, layout: Layout, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global token indices (ascending, long) that ``rank`` keeps of a row of ``length`` tokens.

    Raises :class:`ContextParallelError` when ``length`` is not a multiple of
    :func:`shard_multiple` (pad first with :func:`pad_to_multiple`): unequal shares would give the
    ranks tensors of different shapes and the collectives nothing to agree on.
    """
    multiple = shard_multiple(cp_size, layout)
    if length % multiple:
        raise ContextParallelError(
            f"a sequence of {length} tokens cannot be split for context_parallel_size {cp_size} with the "
            f"{layout} layout: the length must be a multiple of {multiple}. Pad the batch to a multiple "
            "(hellbender.distributed.context_parallel.pad_to_multiple, or a sequence_len that divides)."
        )
    if not 0 <= rank < cp_size:
        raise ContextParallelError(f"rank {rank} is outside a context-parallel group of {cp_size}")
    if layout == "stripe":
        return torch.arange(rank, length, cp_size, device=device)
    chunk = length // multiple
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    if layout == "contiguous":
        return first
    last = 2 * cp_size - 1 - rank
    return torch.cat([first, torch.arange(last * chunk, (last + 1) * chunk, device=device)])


def shard_sequence(x: torch.Tensor, cp_size: int, rank: int, layout: Layout, dim: int = 1) -> torch.Tensor:
    """``rank``'s share of ``x`` along ``dim`` (the sequence dimension; 1 for (B, L, ...))."""
    index = shard_indices(x.shape[dim], cp_size, rank, layout, device=x.device)
    return x.index_select(dim, index)


def unshard_sequence(shards: list[torch.Tensor], layout: Layout, dim: int = 1) -> torch.Tensor:
    """The inverse of :func:`shard_sequence`: the full tensor from every rank's share, in rank order.

    Differentiable (a concatenation and a permutation), so tests can compare gradients too.
    """
    cp_size = len(shards)
    length = sum(s.shape[dim] for s in shards)
    order = torch.cat([shard_indices(length, cp_size, r, layout) for r in range(cp_size)])
    inverse = torch.argsort(order).to(shards[0].device)
    return torch.cat(shards, dim=dim).index_select(dim, inverse)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the logits: ``out[:, t] = labels[:, t + 1]``, −100 at the end.

    The causal-LM loss shifts labels by one; after sharding, the next token of a rank's last token
    lives on another rank, so the shift must happen *before* the cut.
    """
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def pad_to_multiple(
    batch: Mapping[str, torch.Tensor], cp_size: int, layout: Layout, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """``batch`` with its rows padded at the end to a length :func:`shard_indices` accepts.

    The padding follows the collator's convention (:mod:`hellbender.data.packing`): pad tokens,
    label −100 (never trained), part of the row's last document with its position ids continuing —
    attention is causal, so no real token ever sees it, and the loss and every real token's output
    are unchanged. ``seq_lens``/``cu_seqlens``/``max_seqlen`` are recomputed; counts are unchanged.
    """
    length = batch["input_ids"].shape[1]
    multiple = shard_multiple(cp_size, layout)
    extra = -length % multiple
    out = dict(batch)
    if extra == 0:
        return out
    rows = batch["input_ids"].shape[0]
    steps = torch.arange(1, extra + 1, device=batch["position_ids"].device)
    fills: dict[str, torch.Tensor] = {
        "input_ids": torch.full((rows, extra), pad_token_id, dtype=batch["input_ids"].dtype),
        "labels": torch.full((rows, extra), IGNORE_INDEX, dtype=batch["labels"].dtype),
        "position_ids": batch["position_ids"][:, -1:] + steps,
        "document_ids": batch["document_ids"][:, -1:].expand(rows, extra),
    }
    for key, fill in fills.items():
        if key in batch:
            out[key] = torch.cat([batch[key], fill.to(batch[key].device)], dim=1)
    if "document_ids" in batch:
        _, counts = torch.unique_consecutive(out["document_ids"].flatten(), return_counts=True)
        out["seq_lens"] = counts.to(torch.int32)
        out["cu_seqlens"] = F.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)
        out["max_seqlen"] = counts.max().to(torch.long)
    return out


def shard_batch(
    batch: Mapping[str, torch.Tensor], cp_size: int, rank: int, layout: Layout
) -> dict[str, torch.Tensor]:
    """``rank``'s share of a collated batch: every per-token tensor cut along the sequence.

    Returns ``input_ids``, ``labels``, ``position_ids`` (the global per-document ones),
    ``document_ids`` and ``shift_labels`` (the loss targets, shifted before the cut, see
    :func:`shift_labels`) for this rank's tokens. The varlen boundaries (``cu_seqlens``, …)
    describe the whole row and are left out.

    The counts become this share's, so that summing them over the ranks — what the training loop
    already does over all ranks, data- and context-parallel alike — counts every token once:
    ``num_trained_tokens`` is the share's trained targets, ``(shift_labels != -100).sum()``, exact;
    ``num_tokens`` (real tokens, only ever summed for throughput logs) cannot be split from the
    tensors alone (padding carries its document's id), so rank 0 of the group carries the whole
    batch's count and the others 0.
    """
    length = batch["input_ids"].shape[1]
    index = shard_indices(length, cp_size, rank, layout, device=batch["input_ids"].device)
    out = {key: batch[key].index_select(1, index) for key in PER_TOKEN_KEYS if key in batch}
    if "labels" in batch:
        out["shift_labels"] = shift_labels(batch["labels"]).index_select(1, index)
        out["num_trained_tokens"] = (out["shift_labels"] != IGNORE_INDEX).sum()
    if "num_tokens" in batch:
        out["num_tokens"] = batch["num_tokens"] if rank == 0 else torch.zeros_like(batch["num_tokens"])
    return out


# -------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ContextParallelPlan:
    """How attention is exchanged (``strategy``), how rows are cut (``layout``), and for the ring,
    how many K/V heads travel at a time (``kv_head_stride``, None: all)."""

    strategy: Strategy = "ring"
    layout: Layout = "zigzag"
    kv_head_stride: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ContextParallelError(
                f"unknown context-parallel strategy {self.strategy!r}; one of {', '.join(STRATEGIES)}"
            )
        shard_multiple(1, self.layout)  # validates the name
        if self.kv_head_stride is not None:
            if self.kv_head_stride < 1:
                raise ContextParallelError(f"heads_k_stride must be at least 1, got {self.kv_head_stride}")
            if self.strategy != "ring":
                raise ContextParallelError("heads_k_stride applies to the ring strategy only, not to ulysses")


# Axolotl's ring_attn_func → (strategy, layout). Axolotl runs ring-flash-attn; here every value is
# the same exact attention, so they differ only in how rows are cut:
#   varlen_llama3  Llama 3's context parallelism (its report cuts rows in 2·N chunks, rank r
#                  keeping r and 2N−1−r: zigzag), with heads_k_stride K/V heads per exchange;
#   batch_ring     contiguous chunks, plain ring;
#   batch_zigzag   zigzag chunks, ring;
#   batch_stripe   token t on rank t mod N (Striped Attention), ring.
# Axolotl's batch_* functions take no packed rows; here every layout isolates packed documents.
AXOLOTL_RING_ATTN_FUNCS: dict[str, tuple[Strategy, Layout]] = {
    "varlen_llama3": ("ring", "zigzag"),
    "batch_ring": ("ring", "contiguous"),
    "batch_zigzag": ("ring", "zigzag"),
    "batch_stripe": ("ring", "stripe"),
}


def plan_from_axolotl(
    ring_attn_func: str | None,
    heads_k_stride: int | None = None,
    *,
    sample_packing: bool,
    num_key_value_heads: int | None = None,
) -> ContextParallelPlan:
    """The plan for Axolotl's ``ring_attn_func`` / ``heads_k_stride``, or a clear refusal.

    None picks Axolotl's default: ``varlen_llama3`` with sample packing, ``batch_ring`` without.
    ``heads_k_stride`` (Axolotl default 1, read by ``varlen_llama3`` only) becomes the ring's
    ``kv_head_stride`` for every value: heads are independent, so any stride gives the same
    result, only the size of the K/V blocks in flight; it must divide the model's K/V heads
    (checked when ``num_key_value_heads`` is given, else at the first forward).
    """
    name = ring_attn_func if ring_attn_func is not None else (
        "varlen_llama3" if sample_packing else "batch_ring"
    )  # fmt: skip
    if name not in AXOLOTL_RING_ATTN_FUNCS:
        raise ContextParallelError(
            f"ring_attn_func {name!r} is not one of Axolotl's values ({', '.join(AXOLOTL_RING_ATTN_FUNCS)})"
        )
    strategy, layout = AXOLOTL_RING_ATTN_FUNCS[name]
    if (
        heads_k_stride is not None
        and num_key_value_heads is not None
        and num_key_value_heads % heads_k_stride
    ):
        raise ContextParallelError(
            f"heads_k_stride {heads_k_stride} does not divide the model's {num_key_value_heads} key/value "
            f"heads; use a divisor of {num_key_value_heads} (1 exchanges one head at a time)"
        )
    return ContextParallelPlan(strategy, layout, heads_k_stride)


def plan_from_config(cfg: ResolvedConfig) -> ContextParallelPlan:
    """The plan a config asks for: ``context_parallel_strategy: ulysses`` (contiguous shares: Ulysses
    gathers the whole sequence, so the cut does not change its work), else the ring as Axolotl's
    ``ring_attn_func`` / ``heads_k_stride`` say (:func:`plan_from_axolotl`)."""
    if cfg.context_parallel_strategy == "ulysses":
        return ContextParallelPlan("ulysses", "contiguous")
    return plan_from_axolotl(cfg.ring_attn_func, cfg.heads_k_stride, sample_packing=cfg.sample_packing)


# ------------------------------------------------------------------------------ the training loop


class ShardingCollator:
    """A collator whose micro-batches are this rank's share (what the training loop feeds a rank).

    Every rank of a CP group collates the *same* micro-batch (the loop deals micro-batches by
    data-parallel rank), pads it to a length the layout can cut (:func:`pad_to_multiple`; a no-op
    for ``pad_to_sequence_len`` rows of a ``sequence_len`` rule HB153 accepted) and keeps its share
    (:func:`shard_batch`): ``shift_labels`` are the loss targets and ``num_trained_tokens`` the
    share's count, so the loop's sums over all ranks count each token once. The whole batch's
    document ids travel along as ``cp_document_ids``, from which :class:`TrainingInputs` builds the
    context. Holds no process group, so DataLoader workers can run it.
    """

    def __init__(
        self, collate: Callable[[Sequence[Sequence[Mapping[str, Any]]]], dict[str, torch.Tensor]],
        pad_token_id: int, plan: ContextParallelPlan, cp_size: int, cp_rank: int,
    ) -> None:  # fmt: skip
        self.collate, self.pad_token_id, self.plan = collate, pad_token_id, plan
        self.cp_size, self.cp_rank = cp_size, cp_rank

    def __call__(self, rows: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, torch.Tensor]:
        whole = pad_to_multiple(self.collate(rows), self.cp_size, self.plan.layout, self.pad_token_id)
        local = shard_batch(whole, self.cp_size, self.cp_rank, self.plan.layout)
        local["cp_document_ids"] = whole["document_ids"]
        return local


@dataclass(frozen=True)
class TrainingInputs:
    """The model inputs of a :class:`ShardingCollator` batch: its share's tokens, with the context
    of the whole batch (built per micro-batch, on the batch's device, over ``group``)."""

    plan: ContextParallelPlan
    group: dist.ProcessGroup | None

    def __call__(self, local_batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        context = ContextParallelContext(local_batch["cp_document_ids"], self.plan, group=self.group)
        return model_inputs(local_batch, context)


def use_context_parallel_attention(model: torch.nn.Module) -> None:
    """Make ``model`` attend through :func:`register_context_parallel_attention`'s function (every
    layer, the model's config included), before anything wraps or compiles it."""
    register_context_parallel_attention()
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise ContextParallelError(
            "context parallelism needs a transformers model (set_attn_implementation); got "
            f"{type(model).__name__}"
        )
    setter(ATTENTION_NAME)


# ------------------------------------------------------------------------------------ the context


class ContextParallelContext:
    """One batch's context-parallel metadata for this rank, and the masks derived from it (cached).

    ``document_ids`` is the *whole* batch's (B, L) tensor — every rank of a CP group collates the
    same micro-batch before taking its share, so building the masks of every block needs no
    communication. ``group`` is the CP process group (None: the default group); without an
    initialized process group the context is a group of one (the same code path, no exchange).

    Why the block metadata does not travel with the K/V blocks: a ring that only knows its own
    shard must send each block's global indices and document ids along with it, in every layer,
    forward and backward. Here they are known up front, so the masks of all blocks — and which of
    their rows and columns are live, what :mod:`~hellbender.distributed.ring_attention` computes —
    are built once per batch: no extra messages, and nothing recomputed per layer.
    """

    def __init__(
        self, document_ids: torch.Tensor, plan: ContextParallelPlan, group: dist.ProcessGroup | None = None
    ) -> None:
        if document_ids.dim() != 2:
            raise ContextParallelError(
                f"document_ids must be (rows, length), got {tuple(document_ids.shape)}"
            )
        distributed = dist.is_available() and dist.is_initialized()
        self.group = group
        self.size = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        self.plan = plan
        self.document_ids = document_ids
        self.length = document_ids.shape[1]
        self.local_index = shard_indices(self.length, self.size, self.rank, plan.layout, document_ids.device)
        self._ring_blocks: list[RingBlock | None] | None = None
        self._gathered_mask: torch.Tensor | None = None

    def indices_of(self, rank: int) -> torch.Tensor:
        """Global token indices held by ``rank`` of the group."""
        return shard_indices(self.length, self.size, rank, self.plan.layout, self.document_ids.device)

    @property
    def ring(self) -> RingGroup:
        return RingGroup(self.group, self.rank, self.size)

    def ring_blocks(self) -> list[RingBlock | None]:
        """The mask plan of each ring step (step s holds the block of rank − s); see ring_attention."""
        if self._ring_blocks is None:
            sources = [(self.rank - step) % self.size for step in range(self.size)]
            indices = [self.indices_of(src) for src in sources]
            docs = [self.document_ids.index_select(1, index) for index in indices]
            q_doc = self.document_ids.index_select(1, self.local_index)
            self._ring_blocks = plan_ring_blocks(self.local_index, q_doc, indices, docs)
        return self._ring_blocks

    def gathered_mask(self) -> torch.Tensor:
        """Bool (B, 1, L, L) document-causal mask in Ulysses' gathered order (rank 0's tokens first)."""
        if self._gathered_mask is None:
            order = torch.cat([self.indices_of(r) for r in range(self.size)])
            doc = self.document_ids.index_select(1, order)
            same_doc = doc[:, :, None] == doc[:, None, :]
            causal = order[None, None, :] <= order[None, :, None]
            self._gathered_mask = (same_doc & causal)[:, None]
        return self._gathered_mask


def model_inputs(local_batch: Mapping[str, torch.Tensor], cp: ContextParallelContext) -> dict[str, Any]:
    """Keyword arguments of a Hugging Face causal-LM forward on this rank's share of the batch.

    The model must use ``attn_implementation=ATTENTION_NAME`` (:func:`register_context_parallel_attention`).
    No attention mask: isolation comes from ``cp``. ``use_cache=False`` as everywhere in hellbender.
    """
    device = local_batch["input_ids"].device
    return {
        "input_ids": local_batch["input_ids"],
        "position_ids": local_batch["position_ids"].to(device),
        "use_cache": False,
        CONTEXT_PARALLEL_KWARG: cp,
    }


# --------------------------------------------------------------------------------------- ulysses


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` over dim 0 in equal splits; its gradient is the same exchange reversed.

    ``ctx`` is ``Any`` as in torch's own signature.
    """

    if TYPE_CHECKING:  # torch's ``Function.apply`` is unannotated; what it takes and gives here

        @classmethod
        def apply(cls, x: torch.Tensor, group: dist.ProcessGroup | None, /) -> torch.Tensor: ...

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()  # the exchange reads and writes flat memory; a permuted view would scramble it
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def _scatter_heads(x: torch.Tensor, cp: ContextParallelContext) -> torch.Tensor:
    """(B, H, L/N, D) on every rank → (B, H/N, L, D): rank j gets head group j of every rank's tokens."""
    b, heads, length, dim = x.shape
    n = cp.size
    send = x.reshape(b, n, heads // n, length, dim).transpose(0, 1)  # (N: head group, B, H/N, L/N, D)
    got = _AllToAll.apply(send, cp.group)  # (N: source rank = token share, B, H/N, L/N, D)
    return got.permute(1, 2, 0, 3, 4).reshape(b, heads // n, n * length, dim)


def _gather_heads(x: torch.Tensor, cp: ContextParallelContext) -> torch.Tensor:
    """The inverse of :func:`_scatter_heads`: (B, H/N, L, D) → (B, H, L/N, D)."""
    b, heads, length, dim = x.shape
    n = cp.size
    send = x.reshape(b, heads, n, length // n, dim).permute(2, 0, 1, 3, 4)  # (N: token share, B, H/N, ...)
    got = _AllToAll.apply(send, cp.group)  # (N: head group, B, H/N, L/N, D)
    return got.transpose(0, 1).reshape(b, n * heads, length // n, dim)


def ulysses_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cp: ContextParallelContext, scale: float
) -> torch.Tensor:
    """Document-causal attention by all-to-all over heads; (B, H, L/N, D) in and out.

    K/V heads: if N does not divide them they are repeated (each head r times in place, r the
    smallest factor making H_kv·r a multiple of N — it always divides H): query head h still reads
    the copy of its own K/V head, and autograd sums the copies' gradients back.
    """
    heads, kv_heads, n = query.shape[1], key.shape[1], cp.size
    if heads % n:
        raise ContextParallelError(
            "ulysses context parallelism needs the attention heads divisible by context_parallel_size: "
            f"{heads} heads over {n} ranks. Use the ring strategy, or a context_parallel_size "
            f"dividing {heads}."
        )
    repeat = math.lcm(kv_heads, n) // kv_heads
    if repeat > 1:
        key = key.repeat_interleave(repeat, dim=1)
        value = value.repeat_interleave(repeat, dim=1)
    if n > 1:
        query, key, value = (_scatter_heads(t, cp) for t in (query, key, value))
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=cp.gathered_mask(),
        scale=scale,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return _gather_heads(out, cp) if n > 1 else out


def context_parallel_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cp: ContextParallelContext, scale: float
) -> torch.Tensor:
    """Attention of this rank's tokens over the whole sequence, by ``cp.plan.strategy``; (B, H, L/N, D)."""
    expected = cp.local_index.numel()
    if query.shape[2] != expected:
        raise ContextParallelError(
            f"attention got {query.shape[2]} tokens per row but this rank's share of the batch is "
            f"{expected}: feed the model shard_batch(...)'s tensors, with the context of the same batch"
        )
    if cp.plan.strategy == "ulysses":
        return ulysses_attention(query, key, value, cp, scale)
    return ring_attention(query, key, value, cp.ring_blocks(), cp.ring, scale, cp.plan.kv_head_stride)


def register_context_parallel_attention(name: str = ATTENTION_NAME) -> str:
    """Register ``name`` in transformers' ``AttentionInterface``; returns it.

    The registered function reads the :class:`ContextParallelContext` from the forward's
    ``context_parallel`` kwarg (:func:`model_inputs` puts it there) and refuses to run without it:
    attending to the local share alone would silently train on a truncated context. transformers
    builds no mask for a name it does not know (``masking_utils._preprocess_mask_arguments``), so
    none is computed and thrown away.
    """
    from transformers import AttentionInterface

    def context_parallel_hf_attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        cp = kwargs.get(CONTEXT_PARALLEL_KWARG)
        if not isinstance(cp, ContextParallelContext):
            raise AttentionBackendError(
                f"attention {name!r} needs the batch's context-parallel context: call the model with "
                "hellbender.distributed.context_parallel.model_inputs(local_batch, context)"
            )
        if attention_mask is not None:
            raise AttentionBackendError(
                f"attention {name!r} takes no attention_mask (the context replaces it)"
            )
        if dropout:
            raise AttentionBackendError(
                f"attention {name!r} has no attention dropout; set attention_dropout to 0"
            )
        if kwargs.get("sliding_window") or not getattr(module, "is_causal", True):
            raise AttentionBackendError(f"attention {name!r} supports causal full attention only")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = context_parallel_attention(query, key, value, cp, scale)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, context_parallel_hf_attention)
    return name
