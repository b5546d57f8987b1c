"""Document-isolating attention inputs for every supported backend.

A packed row holds several documents. Each token must attend only to earlier tokens *of its own
document*; anything else silently trains on a context that does not exist at inference time.
:func:`model_inputs` turns a collated batch (see :mod:`hellbender.data.packing`) into the keyword
arguments of a Hugging Face causal-LM forward that enforce this exactly, per backend:

``eager``
    A 4D additive float mask (B, 1, L, L): 0 where allowed, ``finfo(dtype).min`` elsewhere.
    transformers returns a 4D mask untouched (``masking_utils._preprocess_mask_arguments``) and
    eager attention *adds* it to the scores — which is why it must be additive: a bool mask would
    be added as 0/1 and mask nothing.
``sdpa``
    A 4D bool mask (B, 1, L, L), True = attend, passed straight to
    ``scaled_dot_product_attention``.
``sdpa_documents`` (:data:`DOCUMENT_SDPA`: what training with ``attn_implementation: sdpa`` runs)
    No mask: the micro-batch's rows as one row, its document lengths (``document_lengths``, Python
    ints), and one causal ``scaled_dot_product_attention`` call per document
    (:func:`sdpa_per_document`). A dense
    block-diagonal mask costs as much as attention over the whole row — the kernel cannot skip
    what the mask forbids — while per-document calls compute only the Σ nᵢ² / 2 pairs that are
    allowed, and need neither the L × L mask nor GQA's repeated keys and values (bench/attention.py
    measures both). :func:`use_document_attention` switches a model to it.
``flex_attention``
    A document-causal ``BlockMask`` (``torch.nn.attention.flex_attention.create_block_mask``),
    also returned untouched by transformers; on CPU its KV tiling sidesteps a torch kernel bug
    (:func:`_cpu_flex_kv_block_size`). FlexAttention has no backward on CPU (torch 2.13):
    forward works, training does not (:func:`check_backend_trainable`).
``flash_attention_2`` / ``flash_attention_3``
    The varlen path of ``transformers.modeling_flash_attention_utils._flash_attention_forward``:
    no mask, explicit ``cu_seq_lens_q/k`` (int32, over the flattened rows) and
    ``max_length_q/k`` (int), plus per-document ``position_ids`` for RoPE. GPU only.
``xformers``
    Not a transformers backend: :func:`register_xformers_attention` registers an attention function
    that runs ``xformers.ops.memory_efficient_attention`` on the flattened rows with a
    ``BlockDiagonalCausalMask.from_seqlens`` bias, which :func:`model_inputs` builds once per batch
    and passes through the model's ``**kwargs``. GPU only.

Every call sets ``use_cache=False``. This matters: transformers 5.x also isolates packed documents
on its own when it sees restarting ``position_ids`` *and no mask* — but only when there is no KV
cache; with ``use_cache=True`` it falls back to a plain causal mask and documents leak into each
other without any warning. hellbender never relies on that detection: for every backend the
isolation comes from the explicit mask or varlen kwargs built here (tests check both facts).

Padding is part of its row's last document (see the packing module), so every query row has at
least one allowed key and no softmax row is fully masked.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from hellbender.config.schema import (
    DOCUMENT_ISOLATING_BACKENDS,
    GPU_ONLY_BACKENDS,
    PLAIN_CAUSAL_ATTENTION_MODELS,
)
from hellbender.errors import HellbenderError

__all__ = [
    "DOCUMENT_ISOLATING_BACKENDS",
    "DOCUMENT_LENGTHS_KWARG",
    "DOCUMENT_SDPA",
    "GPU_ONLY_BACKENDS",
    "XFORMERS_BIAS_KWARG",
    "AttentionBackendError",
    "attention_name",
    "backend_isolates_documents",
    "check_backend_trainable",
    "document_causal_mask",
    "document_lengths",
    "flash_varlen_kwargs",
    "flex_document_block_mask",
    "model_inputs",
    "register_block_diagonal_attention",
    "register_document_attention",
    "register_xformers_attention",
    "sdpa_per_document",
    "use_document_attention",
    "xformers_attn_bias",
    "xformers_seqlens",
]

# Name of the model-forward kwarg that carries the block-diagonal bias to the registered
# block-diagonal attention functions (transformers forwards unknown kwargs down to attention).
XFORMERS_BIAS_KWARG = "block_diagonal_bias"
# The per-document SDPA attention: its registered name, and the kwarg carrying each row's
# document lengths to it.
DOCUMENT_SDPA = "sdpa_documents"
DOCUMENT_LENGTHS_KWARG = "document_lengths"


class AttentionBackendError(HellbenderError, ValueError):
    """The chosen attention backend cannot do what was asked on this device / install."""


def backend_isolates_documents(attn_implementation: str) -> bool:
    """True when :func:`model_inputs` can keep packed documents apart for this backend.

    Config validation uses it: ``sample_packing`` with a backend for which this is False (an
    unknown or custom backend) is an error rather than a silent cross-document leak.
    """
    return attn_implementation in DOCUMENT_ISOLATING_BACKENDS


def _flash_available(attn_implementation: str) -> bool:
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    if attn_implementation == "flash_attention_2":
        return bool(is_flash_attn_2_available())
    return bool(is_flash_attn_3_available())


def check_backend_trainable(attn_implementation: str, device: torch.device | str) -> None:
    """Raise :class:`AttentionBackendError` with a clear fix when training cannot run here.

    * flash_attention_2/3 and xformers need a CUDA device and their package;
    * flex_attention has no backward pass on CPU in torch 2.13 (forward/eval works).

    Unknown backends are not judged here (whether they may be used *with packing* is
    :func:`backend_isolates_documents`'s question).
    """
    dev = torch.device(device)
    if attn_implementation in GPU_ONLY_BACKENDS:
        if dev.type != "cuda":
            raise AttentionBackendError(
                f"attn_implementation {attn_implementation!r} runs only on a CUDA GPU, but the device is "
                f"{dev}. Use attn_implementation: sdpa (it isolates packed documents exactly too)."
            )
        if attn_implementation == "xformers":
            if importlib.util.find_spec("xformers") is None:
                raise AttentionBackendError(
                    "attn_implementation 'xformers' needs the xformers package (pip install xformers), "
                    "or use sdpa / flash_attention_2."
                )
        elif not _flash_available(attn_implementation):
            package = "flash-attn" if attn_implementation == "flash_attention_2" else "flash-attn 3 (hopper)"
            raise AttentionBackendError(
                f"attn_implementation {attn_implementation!r} needs {package} installed for this CUDA "
                "setup; install it or use attn_implementation: sdpa."
            )
    if attn_implementation == "flex_attention" and dev.type == "cpu":
        raise AttentionBackendError(
            "attn_implementation 'flex_attention' cannot train on CPU: FlexAttention has no backward "
            "pass on CPU in this torch version (forward/evaluation works). Use sdpa on CPU."
        )


def _document_ids(batch: Mapping[str, Any]) -> torch.Tensor:
    doc: torch.Tensor = batch["document_ids"]
    if doc.dim() != 2:
        raise ValueError(f"document_ids must be (rows, width), got shape {tuple(doc.shape)}")
    return doc


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Bool (B, 1, L, L) mask: query q may see key k iff same document and k <= q."""
    length = document_ids.shape[1]
    pos = torch.arange(length, device=document_ids.device)
    causal = pos[None, :] <= pos[:, None]  # (q, k)
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # (B, q, k)
    return (same_doc & causal)[:, None, :, :]


def _eager_mask(document_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    allowed = document_causal_mask(document_ids)
    zero = torch.zeros((), dtype=dtype, device=document_ids.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


# torch's default BlockMask block size (``flex_attention._DEFAULT_SPARSE_BLOCK_SIZE``).
_FLEX_BLOCK_SIZE = 128


def _cpu_flex_kv_block_size(length: int) -> int:
    """KV block size of a CPU ``BlockMask`` over ``length`` keys: no KV tile may be 8 (mod 16) wide.

    Works around a torch bug (2.13 included) in inductor's CPU FlexAttention template. The CPU
    kernel splits the keys into tiles of the mask's KV block size (``min(block, length)`` wide, plus
    a shorter tail) and computes ``q @ k.T`` per tile with a micro-GEMM that walks the N (= key)
    axis in chunks of 16. For the last chunk of a tile that is exactly 8 wide, the transposed-B
    tail kernel (``CppMicroGemmFP32Vec``, ``..._ntail_transpose_b_kernel``) takes a path that reads
    and writes ``BLOCK_N = 16`` columns instead of 8 (no ``col < N`` guard): it reads 8 key rows
    past the tile and stores 8 floats past the score row. For the last query row of a full tile
    that store lands on the per-row running maxima of the online softmax, so the first 8 query
    rows of the tile get garbage: wrong values or NaN, depending on what the memory held.
    The path is taken only when ``Vectorized<float>`` has 8 lanes (AVX2; with AVX-512 it has 16
    and a 8-wide tail never qualifies) and the head dim is 8 or 16 (``K % 8 == 0 and K < 24``),
    so real models are not hit, hellbender's tiny test models are. Avoiding 8 (mod 16) wide
    tiles avoids that path for every head dim; the mask is the same, only its tiling changes.
    """
    for block in range(_FLEX_BLOCK_SIZE, 0, -1):  # the largest block that qualifies (128 usually)
        full = min(block, length)
        tail = length % block if length > block else 0
        if full % 16 != 8 and tail % 16 != 8:
            return block
    return 1  # not reached: block 1 gives tiles of width 1


def flex_document_block_mask(document_ids: torch.Tensor) -> Any:
    """A FlexAttention ``BlockMask`` equal to :func:`document_causal_mask`.

    Built with ``_compile=False``: the mask function only indexes a (B, L) tensor, and on CPU
    compiling it would cost far more than it saves. On CPU the KV block size comes from
    :func:`_cpu_flex_kv_block_size` (torch's compiled CPU kernel returns garbage otherwise for
    some lengths, e.g. 24 or 40, with head dim 8 or 16); elsewhere it is torch's default.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids

    def document_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (doc[b, q] == doc[b, kv]) & (kv <= q)

    rows, length = doc.shape
    block_size: int | tuple[int, int] = _FLEX_BLOCK_SIZE
    if doc.device.type == "cpu":
        block_size = (_FLEX_BLOCK_SIZE, _cpu_flex_kv_block_size(length))
    return create_block_mask(
        document_causal, rows, None, length, length, device=doc.device, BLOCK_SIZE=block_size
    )


def flash_varlen_kwargs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The kwargs transformers' flash varlen path reads (``FlashAttentionKwargs``).

    With ``cu_seq_lens_q/k`` and ``max_length_q/k`` all given and no attention mask,
    ``_flash_attention_forward`` flattens (B, L) into one stream and calls
    ``flash_attn_varlen_func`` with these boundaries — so a batch of several packed rows works,
    and padding (a segment tail) is computed but never seen by a real token.
    ``max_length`` is a Python int because flash-attn's varlen API wants an int (and an int
    avoids a device sync in every layer).
    """
    input_ids = batch["input_ids"]
    cu = batch["cu_seqlens"].to(device=input_ids.device, dtype=torch.int32)
    total = input_ids.shape[0] * input_ids.shape[1]
    if int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens covers {int(cu[-1])} tokens but the batch has {total}")
    max_len = int(batch["max_seqlen"])
    return {
        "position_ids": batch["position_ids"].to(input_ids.device),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max_len,
        "max_length_k": max_len,
    }


def xformers_seqlens(batch: Mapping[str, Any]) -> list[int]:
    """Segment lengths of the flattened rows, as ``BlockDiagonalCausalMask.from_seqlens`` wants."""
    seqlens = [int(n) for n in batch["seq_lens"].tolist()]
    total = batch["input_ids"].numel()
    if sum(seqlens) != total:
        raise ValueError(f"seq_lens covers {sum(seqlens)} tokens but the batch has {total}")
    return seqlens


def xformers_attn_bias(batch: Mapping[str, Any]) -> Any:
    """``BlockDiagonalCausalMask`` over the flattened rows (needs xformers)."""
    try:
        from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask
    except ImportError as err:  # pragma: no cover - depends on the install
        raise AttentionBackendError(
            "attn_implementation 'xformers' needs the xformers package (pip install xformers)."
        ) from err
    seqlens = xformers_seqlens(batch)
    # Recent xformers build the bias' seqstart tensors directly on the device (no copy per layer);
    # older ones take no `device` and move them inside memory_efficient_attention.
    if "device" in inspect.signature(BlockDiagonalCausalMask.from_seqlens).parameters:
        return BlockDiagonalCausalMask.from_seqlens(seqlens, device=batch["input_ids"].device)
    return BlockDiagonalCausalMask.from_seqlens(seqlens)


BlockDiagonalKernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, Any, float, float | None], torch.Tensor
]


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, L, D) → (B, H_kv·n_rep, L, D), the same head order as transformers' GQA."""
    if n_rep == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)


def register_block_diagonal_attention(name: str, kernel: BlockDiagonalKernel) -> str:
    """Register ``name`` in transformers' ``AttentionInterface`` as flattened block-diagonal attention.

    The registered function flattens (B, H, L, D) query/key/value into one (1, B·L, H, D) stream,
    calls ``kernel(q, k, v, bias, dropout, scale)`` with the bias :func:`model_inputs` passed as
    ``block_diagonal_bias`` and returns (B, L, H, D) as transformers expects. It refuses to run
    without that bias: a silent plain-causal fallback would leak across packed documents.
    """
    from transformers import AttentionInterface

    def block_diagonal_attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        bias = kwargs.get(XFORMERS_BIAS_KWARG)
        if bias is None:
            raise AttentionBackendError(
                f"attention {name!r} needs the block-diagonal bias from "
                "hellbender.models.attention.model_inputs; call the model with model_inputs(batch, ...)."
            )
        if attention_mask is not None:
            raise AttentionBackendError(f"attention {name!r} takes no attention_mask (the bias replaces it)")
        b, h, length, d = query.shape
        n_rep = h // key.shape[1]
        q = query.transpose(1, 2).reshape(1, b * length, h, d)
        k = _repeat_kv(key, n_rep).transpose(1, 2).reshape(1, b * length, h, d)
        v = _repeat_kv(value, n_rep).transpose(1, 2).reshape(1, b * length, h, value.shape[-1])
        out = kernel(q, k, v, bias, dropout, scaling)
        return out.reshape(b, length, h, value.shape[-1]), None

    AttentionInterface.register(name, block_diagonal_attention)
    return name


def _xformers_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Any, dropout: float, scale: float | None
) -> torch.Tensor:
    import xformers.ops as xops

    out: torch.Tensor = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout, scale=scale)
    return out


def register_xformers_attention() -> str:
    """Make ``attn_implementation="xformers"`` available to transformers models; returns the name.

    Call once before ``model.set_attn_implementation("xformers")`` (models/load.py does).
    """
    if importlib.util.find_spec("xformers") is None:
        raise AttentionBackendError(
            "attn_implementation 'xformers' needs the xformers package (pip install xformers)."
        )
    return register_block_diagonal_attention("xformers", _xformers_kernel)


def document_lengths(batch: Mapping[str, Any]) -> list[list[int]]:
    """Each row's document lengths, in order (padding counts in its row's last document).

    Read from the collator's ``seq_lens``, whose segments never cross a row; one host read per
    micro-batch, so that no layer has to synchronise with the device to learn them.
    """
    width = int(batch["input_ids"].shape[1])
    rows: list[list[int]] = []
    row: list[int] = []
    filled = 0  # tokens of the current row covered so far
    for n in batch["seq_lens"].tolist():
        row.append(int(n))
        filled += int(n)
        if filled >= width:
            if filled != width:
                raise ValueError(f"seq_lens cross a row boundary (row of {width}: {row})")
            rows.append(row)
            row, filled = [], 0
    if row or len(rows) != batch["input_ids"].shape[0]:
        raise ValueError(f"seq_lens do not tile {batch['input_ids'].shape[0]} rows of {width} tokens")
    return rows


def sdpa_per_document(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: Sequence[Sequence[int]],
    *,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Causal attention within each document: (B, H, L, D) query, (B, H_kv, L, D) key/value →
    (B, L, H, D), as transformers' attention functions return it.

    One ``scaled_dot_product_attention(is_causal=True)`` per document, on views of the row (split,
    so the backward gathers the pieces with one concatenation). Grouped-query attention goes
    through ``enable_gqa``: the key/value heads are never copied.
    """
    if len(lengths) != query.shape[0]:
        raise ValueError(f"{len(lengths)} rows of document lengths for a batch of {query.shape[0]}")
    gqa = key.shape[1] != query.shape[1]
    rows = []
    for b, row in enumerate(lengths):
        sizes = list(row)
        pieces = zip(
            torch.split(query[b : b + 1], sizes, dim=2),
            torch.split(key[b : b + 1], sizes, dim=2),
            torch.split(value[b : b + 1], sizes, dim=2),
            strict=True,
        )
        outs = [
            F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout, scale=scale, enable_gqa=gqa
            )
            for q, k, v in pieces
        ]
        rows.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous()


def register_document_attention() -> str:
    """Register :data:`DOCUMENT_SDPA` in transformers' attention and mask interfaces; returns the name.

    With ``document_lengths`` (what :func:`model_inputs` passes for this name) every layer runs
    :func:`sdpa_per_document`. Without it (generation, or a caller that passes its own mask) the
    call is transformers' own SDPA attention, unchanged. transformers builds no mask for a name
    it is told to skip (a whole sequence without a padding mask, see ``documents_mask``), so a
    training forward costs no L × L mask either; with padding or a KV cache the mask is SDPA's
    own. A forward whose
    ``position_ids`` restart inside a row (packed documents) and that carries neither lengths nor
    a mask is refused: plain causal attention would let the documents see each other.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def documents_mask(
        *,
        q_length: int,
        kv_length: int,
        q_offset: Any = 0,
        kv_offset: Any = 0,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | None:
        # A whole sequence with no padding mask (a training or evaluation forward): no mask, the
        # attention function has the document lengths or attends causally. Anything else (padding,
        # a KV cache): SDPA's own mask, so generation behaves exactly as under ``sdpa``.
        if attention_mask is None and q_length == kv_length and not isinstance(q_offset, torch.Tensor):
            if q_offset == 0 and kv_offset == 0:
                return None
        mask: torch.Tensor | None = sdpa_mask(
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            attention_mask=attention_mask,
            **kwargs,
        )
        return mask

    def sdpa_documents(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        lengths = kwargs.pop(DOCUMENT_LENGTHS_KWARG, None)
        if lengths is None:
            position_ids = kwargs.get("position_ids")
            if (
                attention_mask is None
                and query.shape[2] > 1
                and isinstance(position_ids, torch.Tensor)
                and bool((position_ids[..., 1:] <= position_ids[..., :-1]).any())
            ):
                raise AttentionBackendError(
                    f"attention {DOCUMENT_SDPA!r} got packed documents (restarting position_ids) "
                    "without their lengths; call the model with model_inputs(batch, ...)."
                )
            out, _ = sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
            return out, None
        if attention_mask is not None:
            raise AttentionBackendError(
                f"attention {DOCUMENT_SDPA!r} takes document lengths or a mask, not both"
            )
        window = kwargs.get("sliding_window")
        if window is not None and max(max(row) for row in lengths) > window:
            raise AttentionBackendError(
                f"attention {DOCUMENT_SDPA!r} has no sliding window, and a document of this batch is "
                f"longer than the model's ({window} tokens)"
            )
        return sdpa_per_document(query, key, value, lengths, scale=scaling, dropout=dropout), None

    AttentionInterface.register(DOCUMENT_SDPA, sdpa_documents)
    AttentionMaskInterface.register(DOCUMENT_SDPA, documents_mask)
    return DOCUMENT_SDPA


def use_document_attention(model: torch.nn.Module) -> bool:
    """Switch an SDPA transformers model to :data:`DOCUMENT_SDPA`; False (and nothing changed)
    when the model does not attend through ``sdpa``, cannot switch, or is not a family of
    :data:`PLAIN_CAUSAL_ATTENTION_MODELS` (softcapping, attention sinks or other score changes
    that a plain SDPA call would drop keep the dense mask).

    Only the attention *function* changes (the parameters, and hence saved weights, do not), and
    only in this process: transformers does not write the implementation into ``config.json``.
    """
    config = getattr(model, "config", None)
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "model_type", None) not in PLAIN_CAUSAL_ATTENTION_MODELS:
        return False
    setter(register_document_attention())
    return True


def attention_name(model: torch.nn.Module, configured: str) -> str:
    """The attention implementation ``model`` runs (what :func:`model_inputs` must build inputs
    for): :data:`DOCUMENT_SDPA` once :func:`use_document_attention` switched it, else the
    configured one. Looks through DDP / DeepSpeed wrappers (``.module``)."""
    inner: Any = model
    while isinstance(getattr(inner, "module", None), torch.nn.Module):
        inner = inner.module
    config = getattr(inner, "config", None)
    if getattr(config, "_attn_implementation", None) == DOCUMENT_SDPA:
        return DOCUMENT_SDPA
    return configured


def model_inputs(
    batch: Mapping[str, Any], attn_implementation: str, *, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Keyword arguments for ``model(**model_inputs(batch, impl))`` with exact document isolation.

    ``batch`` is a :class:`hellbender.data.packing.Collator` output already on the model's device.
    ``dtype`` is the model's compute dtype (only the eager additive mask uses it). Labels are *not*
    included: the loss is computed by :mod:`hellbender.kernels.loss` and normalized token-exactly by the loop.
    """
    input_ids = batch["input_ids"]
    device = input_ids.device
    inputs: dict[str, Any] = {
        "input_ids": input_ids,
        "position_ids": batch["position_ids"].to(device),
        "use_cache": False,
    }
    if attn_implementation == "eager":
        inputs["attention_mask"] = _eager_mask(_document_ids(batch).to(device), dtype)
    elif attn_implementation == "sdpa":
        inputs["attention_mask"] = document_causal_mask(_document_ids(batch).to(device))
    elif attn_implementation == DOCUMENT_SDPA:
        # The rows as one: documents never cross a row, so attention is the same, and the loss can
        # then run the head on exactly the trained positions (hellbender.kernels.loss).
        inputs["input_ids"] = input_ids.reshape(1, -1)
        inputs["position_ids"] = inputs["position_ids"].reshape(1, -1)
        inputs[DOCUMENT_LENGTHS_KWARG] = [[n for row in document_lengths(batch) for n in row]]
    elif attn_implementation == "flex_attention":
        inputs["attention_mask"] = flex_document_block_mask(_document_ids(batch).to(device))
    elif attn_implementation in ("flash_attention_2", "flash_attention_3"):
        if device.type != "cuda":
            raise AttentionBackendError(
                f"{attn_implementation} runs only on CUDA tensors (batch is on {device}); use sdpa on CPU."
            )
        inputs.update(flash_varlen_kwargs(batch))
    elif attn_implementation == "xformers":
        if device.type != "cuda":
            raise AttentionBackendError(
                f"xformers runs only on CUDA tensors (batch is on {device}); use sdpa."
            )
        inputs[XFORMERS_BIAS_KWARG] = xformers_attn_bias(batch)
    else:
        # Unknown backend: safe only when every row is a single document (no packing), in which
        # case a causal model needs no more than what it does by default.
        n_docs = int(batch["seq_lens"].numel())
        if n_docs > input_ids.shape[0]:
            raise AttentionBackendError(
                f"attn_implementation {attn_implementation!r} cannot isolate packed documents; "
                "use sdpa, eager, flex_attention, flash_attention_2/3 or xformers, or disable sample_packing."
            )
        # Rows are right-padded and attention is causal, so no real token can see the padding:
        # no mask is needed (padding outputs are ignored by the loss).
    return inputs

