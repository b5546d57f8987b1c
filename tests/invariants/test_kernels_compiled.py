"""The two options that compile on first use: torch_compile, and cut_cross_entropy's CPU path.

Both pay a one-off compile (inductor generates and builds C++ on CPU: 15–50 s here), so each is
tested exactly once and marked slow. Tolerances (fp32): loss rtol 1e-5, gradients rtol 1e-4 /
atol 1e-6 — inductor fuses and reorders elementwise work, which changes roundings only.

Whether a later batch *recompiles* is decided by dynamo's guards on the compiled layer's inputs,
which are the same for every backend; that test uses the ``aot_eager`` backend (dynamo + AOT
autograd, no code generation) and takes seconds.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hellbender.config.schema import ResolvedConfig
from hellbender.kernels import optimized
from hellbender.testing.configs import loss_sum, resolved_config
from hellbender.testing.probes import graph_node_names
from hellbender.testing.tiny import build_tiny_model


def _step(model: torch.nn.Module, cfg: ResolvedConfig, ids: torch.Tensor, labels: torch.Tensor):
    model.zero_grad(set_to_none=True)
    loss = loss_sum(model, {"input_ids": ids}, labels, cfg)
    nodes = graph_node_names(loss)
    loss.backward()
    return (
        loss.detach(),
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        nodes,
    )


def _check(options: dict[str, Any]) -> set[str]:
    model = build_tiny_model(vocab_size=500, seed=0).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 500, (2, 24), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    ref_loss, ref_grads, _ = _step(model, resolved_config(base_model="tiny"), ids, labels)
    cfg = resolved_config(base_model="tiny", **options)
    with optimized(model, cfg):
        loss, grads, nodes = _step(model, cfg, ids, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)
    return nodes


@pytest.mark.slow
def test_torch_compile_with_checkpointing_matches_plain_path() -> None:
    """Regional compile of each decoder layer, checkpointed, chunked loss: same numbers, and the
    compiled graphs really ran (inductor's compiled backward node is in the graph)."""
    from torch._dynamo.utils import counters

    counters.clear()
    nodes = _check({"torch_compile": True, "gradient_checkpointing": True, "chunked_cross_entropy": True})
    assert counters["stats"]["unique_graphs"] >= 1
    assert "CompiledFunctionBackward" in nodes, sorted(nodes)


T = 24


def _padding_mask_batch(seed: int, n_pad: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A right-padded (2, T) batch with a 2D padding mask; n_pad=0 gives an all-ones mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 500, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    labels = ids.clone()
    if n_pad:
        ids[1, -n_pad:], mask[1, -n_pad:], labels[1, -n_pad:] = 3, 0, -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def _collated_batch(seed: int, lengths: list[list[int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What the training loop feeds the model: packed rows, Collator + model_inputs (4D mask)."""
    import numpy as np

    from hellbender.data.packing import Collator
    from hellbender.models.attention import model_inputs

    gen = np.random.default_rng(seed)
    rows = []
    for row in lengths:
        docs = [gen.integers(4, 500, n).tolist() for n in row]
        rows.append([{"input_ids": d, "labels": d} for d in docs])
    batch = Collator(3, sequence_len=T, pad_to_sequence_len=True, attn_implementation="sdpa")(rows)
    return model_inputs(batch, "sdpa"), batch["labels"]


BATCHES = {
    # padded, padded differently, then no padding at all (all-ones mask)
    "2d_padding_mask": [_padding_mask_batch(0, 3), _padding_mask_batch(1, 11), _padding_mask_batch(2, 0)],
    # packed + padded, packed, then every row one document filling sequence_len
    "collator": [
        _collated_batch(0, [[10, 5], [20]]),
        _collated_batch(1, [[T], [12, 12]]),
        _collated_batch(2, [[T], [T]]),
    ],
}


@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_torch_compile_does_not_recompile_when_a_batch_has_no_padding(kind: str) -> None:
    """With pad_to_sequence_len, three batches — the last without any padding — run on the graphs
    compiled for the first (error_on_recompile), and each gives the plain path's loss and
    gradients. Given a 2D all-ones mask, transformers' sdpa mask builder returns None instead of
    a mask; the compiled layer must still see a tensor of the same shape."""
    model = build_tiny_model(vocab_size=500, seed=0).train()
    padded = {"base_model": "tiny", "sequence_len": T, "pad_to_sequence_len": True}
    plain = resolved_config(**padded)

    def step(cfg: ResolvedConfig, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        model.zero_grad(set_to_none=True)
        loss = loss_sum(model, inputs, labels, cfg)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    refs = [step(plain, inputs, labels) for inputs, labels in BATCHES[kind]]
    cfg = resolved_config(**padded, torch_compile=True, torch_compile_backend="aot_eager")
    torch._dynamo.reset()  # no cache entries from other tests' models
    try:
        with torch._dynamo.config.patch(error_on_recompile=True), optimized(model, cfg):
            for (inputs, labels), (ref_loss, ref_grads) in zip(BATCHES[kind], refs, strict=True):
                loss, grads = step(cfg, inputs, labels)
                torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
                assert grads.keys() == ref_grads.keys()
                for name in ref_grads:
                    torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_cut_cross_entropy_matches_plain_path() -> None:
    pytest.importorskip("cut_cross_entropy")
    nodes = _check({"cut_cross_entropy": True})
    assert "CompiledFunctionBackward" in nodes  # cut's torch_compile implementation on CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cut_cross_entropy_triton_kernel_matches_plain_path_on_gpu() -> None:
    pytest.importorskip("cut_cross_entropy")
    model = build_tiny_model(vocab_size=500, seed=0).cuda().train()
    ids = torch.randint(4, 500, (2, 24), device="cuda")
    ref = loss_sum(model, {"input_ids": ids}, ids, resolved_config(base_model="tiny"))
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    cfg = resolved_config(base_model="tiny", cut_cross_entropy=True)
    with optimized(model, cfg):
        got = loss_sum(model, {"input_ids": ids}, ids, cfg)
        grads = torch.autograd.grad(got, list(model.parameters()))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)  # CCE skips sub-eps softmax blocks
