"""Every optimization changes cost, never results: loss and gradients equal the plain path.

For each option (alone and in combinations) a tiny Llama — plain or with a LoRA adapter — is
trained for one micro-batch twice on the same weights: once through the plain path (full logits,
``causal_lm_loss_sum``) and once with :func:`apply_optimizations` + :func:`loss_sum` +
:func:`activation_offloading`. The test also checks that the optimized code really ran (its
autograd node is in the graph) and, where the option exists to save memory, that autograd keeps
fewer bytes for the backward than the plain path does.

Tolerances (fp32): loss rtol 1e-5; gradients rtol 1e-4 / atol 1e-6 — recomputation and chunking
only change the order of floating-point sums (observed differences are ~1e-7 to 1e-6).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hellbender.config.schema import ResolvedConfig
from hellbender.kernels import activation_offloading, optimized
from hellbender.kernels.chunked_ce import chunk_bounds
from hellbender.kernels.model_parts import decoder_layers
from hellbender.testing.configs import loss_sum, resolved_config
from hellbender.testing.probes import graph_node_names, saved_storage_bytes
from hellbender.testing.tiny import build_tiny_model

VOCAB = 500
B, T = 2, 24


def _model(lora: bool) -> torch.nn.Module:
    model = build_tiny_model(vocab_size=VOCAB, seed=0)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=4,
                lora_alpha=8,
                lora_dropout=0.0,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ),
        )
        # B starts at zero in peft, which would make every A-gradient zero and the test blind.
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.train()


def _batch(seed: int = 0, n_pad: int = 3) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded batch: a masked prompt in row 0, padding at the end of row 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (B, T), generator=g)
    attention = torch.ones(B, T, dtype=torch.long)
    labels = ids.clone()
    labels[0, :5] = -100
    if n_pad:
        ids[1, -n_pad:] = 3
        attention[1, -n_pad:] = 0
        labels[1, -n_pad:] = -100
    return {"input_ids": ids, "attention_mask": attention}, labels


def _cfg(lora: bool, **options: Any) -> ResolvedConfig:
    extra = {"adapter": "lora", "lora_dropout": 0.0} if lora else {}
    return resolved_config(base_model="tiny", **extra, **options)


def _step(model: torch.nn.Module, cfg: ResolvedConfig):
    inputs, labels = _batch()
    model.zero_grad(set_to_none=True)
    # The innermost saved-tensor hooks win: offloading (when on) must be the inner one, and the
    # byte counter then sees nothing — it is only compared for the options that keep tensors.
    with saved_storage_bytes(model) as saved:
        with activation_offloading(model, cfg.activation_offloading, min_bytes=0) as stats:
            loss = loss_sum(model, inputs, labels, cfg)
            nodes = graph_node_names(loss)
            loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, nodes, sum(saved.values()), stats


# (options, needs a LoRA adapter, autograd node that proves the optimization ran, saves memory?)
CASES: list[tuple[dict[str, Any], bool, str | None, bool]] = [
    ({"chunked_cross_entropy": True}, False, "ChunkedLinearCrossEntropyBackward", True),
    (
        {"chunked_cross_entropy": True, "chunked_cross_entropy_num_chunks": 5},
        True,
        "ChunkedLinearCrossEntropyBackward",
        True,
    ),
    ({"gradient_checkpointing": True}, False, None, True),
    ({"gradient_checkpointing": "selective"}, False, None, True),
    (
        {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
        True,
        None,
        True,
    ),
    ({"gradient_checkpointing": True}, True, None, True),
    ({"tiled_mlp": True, "tiled_mlp_num_shards": 3}, False, "TiledMLPFunctionBackward", True),
    ({"tiled_mlp": True}, True, "TiledMLPFunctionBackward", True),
    ({"lora_mlp_kernel": True}, True, "LoRAGatedMLPBackward", True),
    ({"lora_qkv_kernel": True}, True, "LoRAProjectionsBackward", True),
    ({"lora_o_kernel": True}, True, "LoRAProjectionsBackward", True),
    ({"gradient_checkpointing": True, "activation_offloading": "disk"}, False, None, False),
    ({"gradient_checkpointing": True, "activation_offloading": True}, False, None, False),
    (
        {
            "lora_mlp_kernel": True,
            "lora_qkv_kernel": True,
            "lora_o_kernel": True,
            "tiled_mlp": True,
            "tiled_mlp_num_shards": 2,
            "gradient_checkpointing": "selective",
        },
        True,
        "LoRAProjectionsBackward",
        True,
    ),
    (
        {
            "gradient_checkpointing": True,
            "activation_offloading": "disk",
            "chunked_cross_entropy": True,
            "lora_mlp_kernel": True,
        },
        True,
        "ChunkedLinearCrossEntropyBackward",
        False,
    ),
]


@pytest.mark.parametrize(
    ("options", "lora", "node", "saves"), CASES, ids=lambda v: str(v) if isinstance(v, dict) else None
)
def test_optimization_matches_plain_path(
    options: dict[str, Any], lora: bool, node: str | None, saves: bool
) -> None:
    model = _model(lora)
    ref_loss, ref_grads, _, ref_saved, _ = _step(model, _cfg(lora))
    cfg = _cfg(lora, **options)
    with optimized(model, cfg):
        loss, grads, nodes, saved, stats = _step(model, cfg)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name in ref_grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
    if node is not None:
        assert node in nodes, sorted(nodes)
    if saves:
        assert saved < ref_saved, (saved, ref_saved)
    if options.get("activation_offloading") == "disk":
        assert stats.tensors > 0 and stats.restored == stats.tensors
    if options.get("activation_offloading") is True:
        assert stats.mode == "cpu-noop" and stats.tensors == 0
    # Undo leaves the model exactly as it was: the plain path gives the plain numbers again.
    again_loss, again_grads, _, _, _ = _step(model, _cfg(lora))
    assert again_loss.item() == ref_loss.item()
    assert all(torch.equal(again_grads[n], ref_grads[n]) for n in ref_grads)


class _Shapes(TorchDispatchMode):
    """Records (op, output shape) of every aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(first, torch.Tensor):
            self.log.append((str(func), tuple(first.shape)))
        return out


@pytest.mark.parametrize(
    ("options", "lora"),
    [
        ({"chunked_cross_entropy": True, "chunked_cross_entropy_num_chunks": 3}, False),
        ({"tiled_mlp": True}, False),
        ({"gradient_checkpointing": "selective", "tiled_mlp": True, "tiled_mlp_num_shards": 4}, False),
        ({"gradient_checkpointing": True}, False),
        ({"gradient_checkpointing": True, "activation_offloading": "disk"}, False),
        ({"lora_mlp_kernel": True, "lora_qkv_kernel": True, "lora_o_kernel": True}, True),
        (
            {"lora_mlp_kernel": True, "lora_qkv_kernel": True, "lora_o_kernel": True,
             "gradient_checkpointing": True, "activation_offloading": "disk", "chunked_cross_entropy": True},
            True,
        ),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else None,
)
def test_padded_batches_keep_every_shape_constant(options: dict[str, Any], lora: bool) -> None:
    """With pad_to_sequence_len, two batches with different trained tokens run identical shapes.

    Constant shapes are what lets torch.compile reuse its graph and the allocator reuse its
    blocks; chunking by *positions* (ignored tokens masked, not dropped) keeps them constant.
    The log covers forward, backward and (for disk offloading) the copies to and from disk.
    """
    model = _model(lora)
    cfg = _cfg(lora, sequence_len=T, pad_to_sequence_len=True, **options)
    logs = []
    with optimized(model, cfg):
        for seed, n_pad in ((0, 3), (1, 11)):
            inputs, labels = _batch(seed, n_pad)
            model.zero_grad(set_to_none=True)
            with activation_offloading(model, cfg.activation_offloading, min_bytes=0) as stats:
                with _Shapes() as shapes:
                    loss_sum(model, inputs, labels, cfg).backward()
            logs.append(shapes.log)
            if cfg.activation_offloading:
                assert stats.tensors > 0  # the offloading really ran inside the recorded step
    assert logs[0] == logs[1]


def _lora_dropout_mlp_model() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model(vocab_size=VOCAB, seed=0)
    m = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["gate_proj", "up_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    return m.train()


def test_tiled_mlp_replays_dropout_exactly() -> None:
    """Randomness inside a tiled MLP (LoRA dropout) is replayed in the recomputation.

    The reference is the untiled model run from the same RNG state: identical masks give
    identical losses and gradients; a recomputation with fresh masks would not.
    """
    model = _lora_dropout_mlp_model()
    plain = _cfg(True)
    torch.manual_seed(123)
    ref_loss, ref_grads, _, _, _ = _step(model, plain)
    # One shard: the tiled forward consumes the RNG stream in the same order as the plain one.
    cfg = _cfg(True, tiled_mlp=True, tiled_mlp_num_shards=1)
    with optimized(model, cfg):
        torch.manual_seed(123)
        loss, grads, nodes, _, _ = _step(model, cfg)
    assert "TiledMLPFunctionBackward" in nodes
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


@contextlib.contextmanager
def _plain_mlps_in_shards(model: torch.nn.Module, num_shards: int) -> Iterator[None]:
    """Each MLP applied shard by shard with autograd on (nothing recomputed): it draws the same
    dropout masks, in the same order, as a tiled forward with ``num_shards`` shards."""
    mlps = [layer.mlp for layer in decoder_layers(model)]
    for mlp in mlps:
        def sharded(x: torch.Tensor, fn=mlp.forward) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])
            out = torch.cat([fn(flat[s:e]) for s, e in chunk_bounds(flat.shape[0], num_shards)])
            return out.view(*x.shape[:-1], out.shape[-1])

        mlp.forward = sharded
    try:
        yield
    finally:
        for mlp in mlps:
            del mlp.forward


def test_tiled_mlp_replays_dropout_exactly_over_several_shards() -> None:
    """With 3 shards each shard's dropout masks must be replayed in its own recomputation (a
    replay that restarted the RNG per shard, or did not restore it, would give other masks).
    Plain path: the same MLPs run per shard with autograd on, from the same seed."""
    model = _lora_dropout_mlp_model()
    shards = 3
    with _plain_mlps_in_shards(model, shards):
        torch.manual_seed(123)
        ref_loss, ref_grads, _, _, _ = _step(model, _cfg(True))
        torch.manual_seed(124)
        other_seed_loss = _step(model, _cfg(True))[0]
    assert other_seed_loss.item() != ref_loss.item()  # the masks do change the numbers
    cfg = _cfg(True, tiled_mlp=True, tiled_mlp_num_shards=shards)
    with optimized(model, cfg):
        torch.manual_seed(123)
        loss, grads, nodes, _, _ = _step(model, cfg)
    assert "TiledMLPFunctionBackward" in nodes
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_packed_rows_through_the_real_collator_match_plain_path() -> None:
    """Packed rows (document-isolating sdpa mask, restarting position ids from the real collator
    and ``model_inputs``) reach the decoder intact on the hidden-state loss path too."""
    import numpy as np

    from hellbender.data.packing import Collator
    from hellbender.models.attention import model_inputs

    gen = np.random.default_rng(0)
    docs = []
    for n in (7, 9, 5, 12, 6):
        ids = gen.integers(4, VOCAB, n)
        labels = ids.copy()
        labels[: n // 3] = -100  # a masked prompt
        docs.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    rows = [[docs[0], docs[1], docs[2]], [docs[3], docs[4]]]
    batch = Collator(3, sequence_len=T + 8, pad_to_sequence_len=True, attn_implementation="sdpa")(rows)
    inputs = model_inputs(batch, "sdpa")
    labels = batch["labels"]
    model = _model(True)
    options = {
        "chunked_cross_entropy": True,
        "gradient_checkpointing": True,
        "tiled_mlp": True,
        "tiled_mlp_num_shards": 3,
        "lora_mlp_kernel": True,
        "lora_qkv_kernel": True,
        "lora_o_kernel": True,
    }

    def run(cfg: ResolvedConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = loss_sum(model, inputs, labels, cfg)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = run(_cfg(True))
    with optimized(model, _cfg(True, **options)):
        loss, grads = run(_cfg(True, **options))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["plain", "chunked"])
@pytest.mark.parametrize("attn", ["sdpa", "sdpa_documents"])
@pytest.mark.parametrize("lora", [False, True])
def test_loss_on_trained_positions_only_equals_full_logits(method: str, attn: str, lora: bool) -> None:
    """The plain and chunked losses run the head only where a token is trained (and per-document
    attention runs a micro-batch's rows as one row): the loss and every gradient equal the full
    logits of the untouched model through ``causal_lm_loss_sum``, and the head really ran on fewer
    rows than there are positions."""
    import numpy as np

    from hellbender.data.packing import Collator
    from hellbender.kernels.loss import build_loss, causal_lm_loss_sum
    from hellbender.models.attention import model_inputs, use_document_attention

    gen = np.random.default_rng(1)
    docs = []
    for n in (7, 9, 5, 12, 6):
        ids = gen.integers(4, VOCAB, n)
        labels = ids.copy()
        labels[: n // 2] = -100  # a masked prompt
        docs.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    rows = [[docs[0], docs[1], docs[2]], [docs[3], docs[4]]]
    batch = Collator(3, sequence_len=T + 8, pad_to_sequence_len=True, attn_implementation="sdpa")(rows)
    model = _model(lora)

    def grads() -> dict[str, torch.Tensor]:
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    ref = causal_lm_loss_sum(model(**model_inputs(batch, "sdpa")).logits, batch["labels"])
    ref.backward()
    ref_grads = grads()
    if attn == "sdpa_documents":
        assert use_document_attention(model)
    with _Shapes() as shapes:
        loss = build_loss(method, num_chunks=2)(model, model_inputs(batch, attn), batch["labels"])
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    got = grads()
    assert got.keys() == ref_grads.keys() and got
    for name in ref_grads:
        torch.testing.assert_close(got[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    head_rows = sum(shape[-2] for op, shape in shapes.log if shape and shape[-1] == VOCAB and "mm" in op)
    positions = batch["input_ids"].numel()
    trained = int((batch["labels"] != -100).sum())
    assert 0 < head_rows < positions and head_rows >= trained - 2, (head_rows, positions, trained)
