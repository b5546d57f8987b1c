"""Split ≡ unsplit: how an optimizer step is cut into micro-batches must not change its gradient.

The same 8 samples of different lengths (with different numbers of trained tokens) make one
optimizer step as micro_batch_size × gradient_accumulation_steps = 1×8, 2×4 and 8×1, padded and
packed. With token-exact normalization (every micro-batch's loss *sum* divided by the trained
tokens of the whole step) all of them give the gradient of the plain mean loss over all trained
tokens, computed as reference in the test by running each sample alone. The same test shows that
the common mean-of-micro-batch-means is *not* split-invariant — so this test can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hellbender.train.loss import causal_lm_loss_sum, step_normalizer
from transformers import LlamaForCausalLM

from hellbender.data.packing import IGNORE_INDEX, BatchSampler, Collator
from hellbender.models.attention import model_inputs
from hellbender.testing.tiny import build_tiny_model

VOCAB = 128
LENGTHS = [14, 3, 9, 20, 6, 11, 4, 17]
SEQ_LEN = 24
ATTN = "sdpa"


def tiny_llama() -> LlamaForCausalLM:
    """The project's tiny Llama (seed 0); ``pad_token_id=None`` keeps every embedding row trainable."""
    return build_tiny_model(
        seed=0, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=None, attn_implementation=ATTN
    )


def make_samples() -> list[dict]:
    rng = np.random.default_rng(11)
    samples = []
    for n in LENGTHS:
        ids = rng.integers(1, VOCAB, size=n).tolist()
        labels = list(ids)
        prompt = int(rng.integers(0, n // 2 + 1))  # different trained-token counts per sample
        labels[:prompt] = [IGNORE_INDEX] * prompt
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return g


def reference_grad(model: LlamaForCausalLM, samples: list[dict]) -> torch.Tensor:
    """Gradient of the mean next-token loss over all trained tokens, each sample run alone."""
    total, count = torch.zeros(()), 0
    for s in samples:
        logits = model(input_ids=torch.tensor([s["input_ids"]]), use_cache=False).logits[0]
        lab = torch.tensor(s["labels"])
        total = total + F.cross_entropy(logits[:-1], lab[1:], ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((lab[1:] != IGNORE_INDEX).sum())
    (total / count).backward()
    return flat_grad(model)


def one_step_grad(
    model: LlamaForCausalLM, samples: list[dict], *, packing: bool, micro_batch_size: int, mean_of_means: bool = False
) -> tuple[torch.Tensor, int]:
    """All samples as ONE optimizer step of micro-batches; returns the gradient and #micro-batches."""
    sampler = BatchSampler(
        LENGTHS, sequence_len=SEQ_LEN, micro_batch_size=micro_batch_size, sample_packing=packing, seed=0
    )
    collate = Collator(0, sequence_len=SEQ_LEN, pad_to_sequence_len=packing, attn_implementation=ATTN)
    micro_batches = [collate([[samples[i] for i in row] for row in mb]) for mb in sampler]
    n_step = step_normalizer(micro_batches)
    for batch in micro_batches:
        logits = model(**model_inputs(batch, ATTN)).logits
        loss_sum = causal_lm_loss_sum(logits, batch["labels"])
        if mean_of_means:
            loss = loss_sum / batch["num_trained_tokens"] / len(micro_batches)
        else:
            loss = loss_sum / n_step
        loss.backward()
    return flat_grad(model), len(micro_batches)


@pytest.mark.parametrize("packing", [False, True])
def test_split_equals_unsplit(packing: bool) -> None:
    model = tiny_llama()
    samples = make_samples()
    ref = reference_grad(model, samples)

    n_rows = len(next(iter(BatchSampler(
        LENGTHS, sequence_len=SEQ_LEN, micro_batch_size=len(LENGTHS), sample_packing=packing, seed=0
    ))))
    if packing:
        assert n_rows < len(LENGTHS), "packing must actually put several samples in a row"
    # Unpacked: 1×8, 2×4, 8×1. Packed: the rows split the same three ways (1×R, 2×R/2, R×1).
    splits = [1, 2, n_rows]
    grads = {}
    for mbs in splits:
        g, n_micro = one_step_grad(model, samples, packing=packing, micro_batch_size=mbs)
        assert n_micro == -(-n_rows // mbs)
        grads[mbs] = g
        torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-4, msg=f"micro_batch_size={mbs}")

    # The mean of per-micro-batch means weighs micro-batches, not tokens: split-dependent.
    mom = {mbs: one_step_grad(model, samples, packing=packing, micro_batch_size=mbs, mean_of_means=True)[0] for mbs in splits}
    torch.testing.assert_close(mom[n_rows], ref, atol=1e-6, rtol=1e-4)  # one micro-batch: it IS the mean
    for mbs in splits[:-1]:
        gap = (mom[mbs] - ref).abs().max().item()
        assert gap > 1e3 * max((grads[mbs] - ref).abs().max().item(), 1e-9), f"mbs={mbs}: gap {gap}"
        assert not torch.allclose(mom[mbs], ref, atol=1e-5, rtol=1e-3)
