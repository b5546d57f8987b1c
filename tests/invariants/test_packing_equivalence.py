"""Packed ≡ unpacked: a packed micro-batch gives every document exactly what it gets alone.

Reference: each document run *alone* through the same tiny random Llama with transformers'
defaults (no mask, no position_ids: plain causal attention), its loss computed with plain
``F.cross_entropy`` in the test. The packed side goes through the real pipeline: sampler →
collator → ``model_inputs`` → model → ``causal_lm_loss_sum`` / step normalizer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from hellbender.data.packing import IGNORE_INDEX, BatchSampler, Collator
from hellbender.kernels.loss import causal_lm_loss_sum
from hellbender.models.attention import (
    DOCUMENT_SDPA,
    XFORMERS_BIAS_KWARG,
    AttentionBackendError,
    check_backend_trainable,
    document_causal_mask,
    flex_document_block_mask,
    model_inputs,
    register_block_diagonal_attention,
    use_document_attention,
    xformers_seqlens,
)
from hellbender.testing.tiny import build_tiny_model

VOCAB = 128
LENGTHS = [9, 4, 13, 6, 11, 3, 8, 5]
SEQ_LEN = 24

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_llama(attn: str, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """The project's tiny Llama (seed 0, so every call gives the same weights) on ``attn``.

    ``pad_token_id=None``: no embedding row is a frozen zero padding row, so every random token id
    of these tests is a regular token. ``DOCUMENT_SDPA``: an sdpa model switched as training
    switches it (:func:`use_document_attention`).
    """
    if attn == DOCUMENT_SDPA:
        model = tiny_llama("sdpa", dtype)
        assert use_document_attention(model)
        return model
    return build_tiny_model(
        seed=0,
        dtype=dtype,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        pad_token_id=None,
        attn_implementation=attn,
    )


def make_samples(lengths: list[int], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    samples = []
    for n in lengths:
        ids = rng.integers(1, VOCAB, size=n).tolist()
        labels = list(ids)
        prompt = int(rng.integers(0, n // 2 + 1))
        labels[:prompt] = [IGNORE_INDEX] * prompt
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def packed_micro_batch(attn: str) -> tuple[dict, list[list[int]], list[dict]]:
    samples = make_samples(LENGTHS)
    sampler = BatchSampler(
        LENGTHS, sequence_len=SEQ_LEN, micro_batch_size=len(LENGTHS), sample_packing=True, seed=0
    )
    (micro_batch,) = list(sampler)
    assert any(len(row) > 1 for row in micro_batch), "the test needs rows holding several documents"
    configured = "sdpa" if attn == DOCUMENT_SDPA else attn  # what the config says
    collate = Collator(0, sequence_len=SEQ_LEN, pad_to_sequence_len=True, attn_implementation=configured)
    batch = collate([[samples[i] for i in row] for row in micro_batch])
    return batch, micro_batch, samples


def doc_slices(micro_batch: list[list[int]], samples: list[dict]) -> list[tuple[int, int, int, int]]:
    """(sample index, row, start, length) of every document of the packed micro-batch."""
    out = []
    for r, row in enumerate(micro_batch):
        offset = 0
        for i in row:
            n = len(samples[i]["input_ids"])
            out.append((i, r, offset, n))
            offset += n
    return out


def reference_alone(
    model: LlamaForCausalLM, samples: list[dict]
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Per-document logits, and the token-exact mean loss of all documents, each run alone."""
    logits, loss_sum, count = [], torch.zeros(()), 0
    for s in samples:
        ids = torch.tensor([s["input_ids"]])
        lab = torch.tensor(s["labels"])
        out = model(input_ids=ids, use_cache=False).logits[0]
        logits.append(out)
        loss_sum = loss_sum + F.cross_entropy(out[:-1], lab[1:], ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((lab[1:] != IGNORE_INDEX).sum())
    return logits, loss_sum / count, count


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa", DOCUMENT_SDPA])
def test_packed_equals_unpacked_logits_losses_and_gradients(attn: str) -> None:
    model = tiny_llama(attn)
    batch, micro_batch, samples = packed_micro_batch(attn)

    ref_logits, ref_loss, ref_count = reference_alone(model, samples)
    ref_loss.backward()
    ref_grads = grads(model)

    # (per-document attention runs the rows as one: back to rows, which changes nothing else)
    logits = model(**model_inputs(batch, attn)).logits.reshape(*batch["input_ids"].shape, VOCAB)
    per_token = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(logits.shape[0], -1)
    for i, r, start, n in doc_slices(micro_batch, samples):
        torch.testing.assert_close(logits[r, start : start + n], ref_logits[i], atol=1e-5, rtol=1e-5)
        lab = torch.tensor(samples[i]["labels"])
        ref_tok = F.cross_entropy(ref_logits[i][:-1], lab[1:], ignore_index=IGNORE_INDEX, reduction="none")
        torch.testing.assert_close(per_token[r, start : start + n - 1], ref_tok, atol=1e-5, rtol=1e-5)

    assert batch["num_trained_tokens"].item() == ref_count
    loss = causal_lm_loss_sum(logits, batch["labels"]) / batch["num_trained_tokens"]
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    loss.backward()
    packed_grads = grads(model)
    assert packed_grads.keys() == ref_grads.keys()
    for name, g in packed_grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_position_ids_alone_leak_with_the_cache_but_model_inputs_do_not(attn: str) -> None:
    """transformers 5.x isolates packed documents from position_ids only without a KV cache.

    This pins the trap (so we notice if it changes) and shows that hellbender's inputs carry
    their own explicit mask, so isolation does not depend on ``use_cache`` at all.
    """
    model = tiny_llama(attn)
    model.eval()
    with torch.no_grad():
        batch, micro_batch, samples = packed_micro_batch(attn)
        ref_logits, _, _ = reference_alone(model, samples)
        ids, pos = batch["input_ids"], batch["position_ids"]
        implicit = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        leaky = model(input_ids=ids, position_ids=pos, use_cache=True).logits
        inputs = model_inputs(batch, attn)
        assert inputs["use_cache"] is False
        assert inputs["attention_mask"].dim() == 4
        ours = model(**inputs).logits
        inputs["use_cache"] = True  # even if a caller turned the cache back on
        ours_with_cache = model(**inputs).logits

    leaks = 0.0
    for i, r, start, n in doc_slices(micro_batch, samples):
        ref = ref_logits[i]
        torch.testing.assert_close(implicit[r, start : start + n], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[r, start : start + n], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_with_cache[r, start : start + n], ref, atol=1e-5, rtol=1e-5)
        if start > 0:
            leaks = max(leaks, (leaky[r, start : start + n] - ref).abs().max().item())
    assert leaks > 1e-2, "position_ids + use_cache=True no longer leaks: transformers changed, revisit"


def test_document_attention_without_lengths_is_plain_sdpa_or_refused() -> None:
    """The per-document function outside training: a forward that brings its own mask or a single
    unpacked sequence (generation, evaluation of one prompt) is transformers' SDPA, bit for bit;
    packed ``position_ids`` without the lengths are refused instead of attending across documents."""
    ours, reference = tiny_llama(DOCUMENT_SDPA), tiny_llama("sdpa")
    assert ours.config._attn_implementation == DOCUMENT_SDPA
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    padding = torch.ones_like(ids)
    padding[1, :3] = 0  # a left-padded row, as batched generation pads
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": padding}):
            want = reference(input_ids=ids, **kwargs).logits
            assert torch.equal(ours(input_ids=ids, **kwargs).logits, want)
        greedy = {"max_new_tokens": 5, "do_sample": False}
        generated = ours.generate(input_ids=ids[:1], **greedy)
        assert torch.equal(generated, reference.generate(input_ids=ids[:1], **greedy))
        batch, _, _ = packed_micro_batch(DOCUMENT_SDPA)
        with pytest.raises(AttentionBackendError, match="without their lengths"):
            ours(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)


def test_document_attention_is_not_saved_into_the_config(tmp_path) -> None:
    """Switching changes this process's attention function only: the saved config.json loads as a
    plain sdpa (or default) model anywhere."""
    model = tiny_llama(DOCUMENT_SDPA)
    model.save_pretrained(tmp_path)
    assert DOCUMENT_SDPA not in (tmp_path / "config.json").read_text()


@pytest.mark.slow
def test_flex_attention_forward_isolates_documents() -> None:
    """Forward only: FlexAttention has no backward on CPU (torch 2.13).

    The first run compiles FlexAttention for CPU (~30 s cold, a few seconds with a warm inductor
    cache), hence the `slow` mark. SEQ_LEN = 24 with head dim 8 is exactly the shape that torch's
    compiled CPU kernel gets wrong on AVX2 CPUs with its default 128-wide KV tiles (see the next test).
    """
    model = tiny_llama("flex_attention")
    reference = tiny_llama("eager")  # same seed → same weights
    batch, micro_batch, samples = packed_micro_batch("flex_attention")
    with torch.no_grad():
        ref_logits, _, _ = reference_alone(reference, samples)
        logits = model(**model_inputs(batch, "flex_attention")).logits
    for i, r, start, n in doc_slices(micro_batch, samples):
        torch.testing.assert_close(logits[r, start : start + n], ref_logits[i], atol=1e-5, rtol=1e-5)
    # Training with flex on CPU is refused up front, because torch itself cannot do it:
    with pytest.raises(AttentionBackendError, match="no backward"):
        check_backend_trainable("flex_attention", "cpu")
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        model(**model_inputs(batch, "flex_attention")).logits.sum().backward()


@pytest.mark.parametrize("length", [8, 16, 24, 40, 120, 128, 136, 200, 2056])
def test_flex_cpu_block_mask_has_no_kv_tile_8_mod_16_wide(length: int) -> None:
    """torch's compiled CPU FlexAttention corrupts the first 8 query rows of a tile (garbage or NaN)
    when a KV tile is 8 (mod 16) wide, on AVX2 CPUs, for head dim 8 or 16 (an unguarded 16-column
    store in inductor's transposed-B micro-GEMM tail; see ``_cpu_flex_kv_block_size``). The test
    above catches it only on such a CPU; this checks on any machine that hellbender's CPU
    BlockMask never tiles the keys that way, and that its blocks still cover every allowed pair.
    """
    doc_lens = [length // 2, length // 4, length - length // 2 - length // 4]
    doc = torch.repeat_interleave(torch.arange(3, dtype=torch.int32), torch.tensor(doc_lens))[None]
    mask = flex_document_block_mask(doc)
    q_block, kv_block = mask.BLOCK_SIZE
    tiles = [min(kv_block, length - n) for n in range(0, length, kv_block)]
    assert all(t % 16 != 8 for t in tiles), (kv_block, tiles)
    # Block level: a (q, kv) block is computed iff it holds at least one allowed pair.
    nq, nkv = -(-length // q_block), -(-length // kv_block)
    allowed = torch.zeros(nq * q_block, nkv * kv_block, dtype=torch.bool)
    allowed[:length, :length] = document_causal_mask(doc)[0, 0]
    expected = allowed.view(nq, q_block, nkv, kv_block).any(3).any(1)
    assert torch.equal(mask.to_dense()[0, 0].bool(), expected)


def test_registered_block_diagonal_attention_isolates_documents_on_cpu() -> None:
    """The xformers path minus the xformers kernel: the registered attention function (flattening,
    GQA, kwarg plumbing through the model) with a dense CPU kernel built from the same seqlens
    that ``BlockDiagonalCausalMask.from_seqlens`` receives. The real kernel runs in the GPU test."""

    def dense_kernel(q, k, v, seqlens, dropout, scale):  # (1, T, H, D), seqlens: list[int]
        doc = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens))
        t = torch.arange(doc.numel())
        allowed = (doc[:, None] == doc[None, :]) & (t[None, :] <= t[:, None])
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, scale=scale
        )
        return out.transpose(1, 2)

    name = register_block_diagonal_attention("hellbender_test_dense_block_diagonal", dense_kernel)
    model = tiny_llama(name)
    reference = tiny_llama("sdpa")
    batch, micro_batch, samples = packed_micro_batch("xformers")
    inputs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
        XFORMERS_BIAS_KWARG: xformers_seqlens(batch),
    }
    ref_logits, ref_loss, _ = reference_alone(reference, samples)
    ref_loss.backward()
    logits = model(**inputs).logits
    for i, r, start, n in doc_slices(micro_batch, samples):
        torch.testing.assert_close(logits[r, start : start + n], ref_logits[i], atol=1e-5, rtol=1e-5)
    (causal_lm_loss_sum(logits, batch["labels"]) / batch["num_trained_tokens"]).backward()
    ref_grads = dict(reference.named_parameters())
    for pname, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[pname].grad, atol=1e-5, rtol=1e-4, msg=pname)
    # Without the bias the function refuses instead of silently attending across documents.
    with pytest.raises(AttentionBackendError, match="block-diagonal bias"):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)


# ----------------------------------------------------------------------------------- GPU


def _gpu_packed_vs_alone(attn: str) -> None:
    check_backend_trainable(attn, "cuda")
    model = tiny_llama("sdpa", dtype=torch.bfloat16).cuda()
    model.set_attn_implementation(attn)  # on the GPU: transformers checks the kernel against the device
    batch, micro_batch, samples = packed_micro_batch(attn)
    batch = {k: v.cuda() for k, v in batch.items()}
    logits = model(**model_inputs(batch, attn, dtype=torch.bfloat16)).logits.float()
    for i, r, start, n in doc_slices(micro_batch, samples):
        alone = model(
            input_ids=torch.tensor([samples[i]["input_ids"]], device="cuda"), use_cache=False
        ).logits
        torch.testing.assert_close(logits[r, start : start + n], alone[0].float(), atol=2e-2, rtol=2e-2)
    loss = causal_lm_loss_sum(logits, batch["labels"]) / batch["num_trained_tokens"]
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("attn", ["flash_attention_2", "flash_attention_3"])
def test_flash_varlen_isolates_documents_on_gpu(attn: str) -> None:
    try:
        check_backend_trainable(attn, "cuda")
    except AttentionBackendError as err:
        pytest.skip(str(err))
    _gpu_packed_vs_alone(attn)


@pytest.mark.gpu
@cuda
def test_xformers_block_diagonal_isolates_documents_on_gpu() -> None:
    pytest.importorskip("xformers")
    from hellbender.models.attention import register_xformers_attention

    register_xformers_attention()
    _gpu_packed_vs_alone("xformers")
