"""Split ≡ unsplit: how an optimizer step is cut into micro-batches must not change its gradient.

The same 8 samples of different lengths (with different numbers of trained tokens) make ONE
optimizer step of the real training loop, :func:`hellbender.train.loop.train`, as
micro_batch_size × gradient_accumulation_steps = 1×8, 2×4 and 8×1 unpacked, and 1×R, 2×⌈R/2⌉ and
R×1 packed (R = the packed rows of the 8 samples). The loop is run with plain SGD, a constant
learning rate and no clipping, so the gradient it applied is read back from the weights as
``(w_before - w_after) / lr``. With token-exact normalization (every micro-batch's loss *sum*
divided by the trained tokens of the whole step) every split must give the gradient of the plain
mean loss over all trained tokens, computed here as reference by plain PyTorch/HF running each
sample alone; the step loss the loop reports must be that mean loss.

The second test shows that the common mean-of-micro-batch-means is *not* split-invariant: it is
off by far more than the tolerance of the first test, so that test can fail. ``train()``
deliberately cannot compute that wrong quantity, so this half uses a small hand-written loop over
the loop's own pieces (its sampler, collator and loss function); only the normalization differs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from hellbender.config.schema import ResolvedConfig
from hellbender.data.packing import IGNORE_INDEX
from hellbender.testing.configs import resolved_config
from hellbender.testing.tiny import build_tiny_model
from hellbender.train.loop import Forward, Samples, batching, plan_steps, train

VOCAB = 128
LENGTHS = [14, 3, 9, 20, 6, 11, 4, 17]
SEQ_LEN = 24
ATTN = "sdpa"
PAD = 0  # never a sample token (they are drawn from 1..VOCAB-1)
LR = 1.0  # a power of two: (w_before - w_after) / LR adds no rounding of its own

# fp32 tolerances. The loop runs padded/packed batches through sdpa with block masks and sums the
# loss per micro-batch; the reference runs every sample alone and sums in another order. Both are
# fp32 computations of the same numbers, so they differ only by reduction-order rounding (~1e-7
# relative). Reading the gradient back from the weights adds up to half an ulp of w_after, / LR:
# ≤ 6e-8 for the RMSNorm gains (|w| = 1), the largest weights. Measured on every split: max
# |Δgrad| 5.8e-8 (that read-out rounding; gradients reach 0.07, median 5e-4) and |Δloss| ≤ 7e-7
# (loss 4.88). The tolerances leave >10× headroom and are still >2000× below the smallest error of
# the mean of micro-batch means (2.3e-3, packed 2×2), which the second test asserts is caught.
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4
LOSS_ATOL = 1e-5

# (micro_batch_size, id): 1 row per micro-batch, 2 rows, or all R rows; accumulation = ⌈R / rows⌉.
SPLITS = [pytest.param(1, id="1xR"), pytest.param(2, id="2xR/2"), pytest.param(None, id="Rx1")]


def tiny_llama() -> LlamaForCausalLM:
    """The project's tiny Llama (seed 0: every call gives the same weights); ``pad_token_id=None``
    keeps every embedding row trainable."""
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


def make_cfg(out: Path, *, packing: bool, micro_batch_size: int, accumulation: int) -> ResolvedConfig:
    """One epoch = one optimizer step of plain SGD (no momentum, no weight decay, no clipping)."""
    return resolved_config(
        base_model="tiny",
        bf16=False,
        attn_implementation=ATTN,
        sequence_len=SEQ_LEN,
        sample_packing=packing,
        micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=accumulation,
        num_epochs=1,
        optimizer="sgd",
        weight_decay=0.0,
        learning_rate=LR,
        lr_scheduler="constant",
        warmup_steps=0,
        max_grad_norm=None,
        seed=0,
        save_strategy="no",
        use_tensorboard=False,
        output_dir=str(out),
    )


def split_cfg(out: Path, packing: bool, micro_batch_size: int | None) -> tuple[ResolvedConfig, int, int]:
    """The config that puts all 8 samples in one step, split with ``micro_batch_size`` rows
    (``None``: all rows); returns it with the number of rows R and of micro-batches."""
    # The rows (bins when packed) do not depend on micro_batch_size: the sampler packs first, then
    # cuts the rows into micro-batches. So R is read with any micro_batch_size.
    probe = make_cfg(out, packing=packing, micro_batch_size=1, accumulation=1)
    sampler, _ = batching(Samples(make_samples()), probe, PAD)
    n_rows = sampler.num_rows()
    mbs = n_rows if micro_batch_size is None else micro_batch_size
    n_micro = math.ceil(n_rows / mbs)
    return make_cfg(out, packing=packing, micro_batch_size=mbs, accumulation=n_micro), n_rows, n_micro


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return g


def flat_weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def reference_grad(model: LlamaForCausalLM, samples: list[dict]) -> tuple[torch.Tensor, float, int]:
    """Gradient of the mean next-token loss over all trained tokens, each sample run alone;
    also that mean loss and the number of trained tokens."""
    total, count = torch.zeros(()), 0
    for s in samples:
        logits = model(input_ids=torch.tensor([s["input_ids"]]), use_cache=False).logits[0]
        lab = torch.tensor(s["labels"])
        total = total + F.cross_entropy(logits[:-1], lab[1:], ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((lab[1:] != IGNORE_INDEX).sum())
    loss = total / count
    loss.backward()
    return flat_grad(model), float(loss.detach()), count


@pytest.fixture(scope="module")
def reference() -> tuple[torch.Tensor, float, int]:
    return reference_grad(tiny_llama(), make_samples())


@pytest.mark.parametrize("micro_batch_size", SPLITS)
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_train_step_gradient_is_split_invariant(
    tmp_path: Path, reference: tuple[torch.Tensor, float, int], packing: bool, micro_batch_size: int | None
) -> None:
    ref_grad, ref_loss, ref_tokens = reference
    cfg, n_rows, n_micro = split_cfg(tmp_path, packing, micro_batch_size)
    if packing:
        assert 1 < n_rows < len(LENGTHS), "packing must actually put several samples in a row"
    else:
        assert n_rows == len(LENGTHS)

    # The plan of the real loop: all samples in one optimizer step of n_micro micro-batches.
    sampler, _ = batching(Samples(make_samples()), cfg, PAD)
    assert len(sampler) == n_micro
    assert sorted(i for mb in sampler for row in mb for i in row) == list(range(len(LENGTHS)))
    assert plan_steps(sampler, cfg).total == 1

    model = tiny_llama()
    before = flat_weights(model)
    forwards: list[int] = []  # rows of every forward the loop ran
    hook = model.register_forward_pre_hook(
        lambda _m, _args, kwargs: forwards.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        result = train(cfg, model, make_samples(), None, pad_token_id=PAD, output_dir=tmp_path)
    finally:
        hook.remove()

    assert result.total_steps == result.global_step == 1
    assert len(forwards) == n_micro, forwards  # the split really ran: n_micro micro-batches
    assert forwards[0] == cfg.micro_batch_size
    assert result.trained_tokens == ref_tokens

    applied = (before - flat_weights(model)) / LR  # SGD: w_after = w_before - LR * grad
    torch.testing.assert_close(applied, ref_grad, atol=GRAD_ATOL, rtol=GRAD_RTOL)
    assert result.losses[1] == pytest.approx(ref_loss, abs=LOSS_ATOL, rel=0)


def mean_of_means_grad(model: LlamaForCausalLM, cfg: ResolvedConfig) -> torch.Tensor:
    """The WRONG normalization, over the loop's own sampler, collator and loss function: every
    micro-batch's mean loss, averaged over the micro-batches of the step."""
    samples = Samples(make_samples())
    sampler, collate = batching(samples, cfg, PAD)
    forward = Forward.build(cfg, model)
    micro_batches = [collate(samples.rows(mb)) for mb in sampler]
    for batch in micro_batches:
        loss = forward.loss_sum(model, batch) / batch["num_trained_tokens"] / len(micro_batches)
        loss.backward()
    return flat_grad(model)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_mean_of_micro_batch_means_is_not_split_invariant(
    tmp_path: Path, reference: tuple[torch.Tensor, float, int], packing: bool
) -> None:
    ref_grad = reference[0]
    model = tiny_llama()
    # One micro-batch: the mean of means IS the token mean (and the hand-written loop is right).
    cfg, _, n_micro = split_cfg(tmp_path, packing, None)
    assert n_micro == 1
    torch.testing.assert_close(mean_of_means_grad(model, cfg), ref_grad, atol=GRAD_ATOL, rtol=GRAD_RTOL)
    # Several micro-batches: it weighs micro-batches, not tokens, and misses by far more than the
    # tolerance the first test allows the real loop.
    for mbs in (1, 2):
        cfg, _, n_micro = split_cfg(tmp_path, packing, mbs)
        assert n_micro > 1
        wrong = mean_of_means_grad(model, cfg)
        gap = (wrong - ref_grad).abs().max().item()
        assert gap > 1000 * GRAD_ATOL, f"micro_batch_size={mbs}: gap {gap}"
        assert not torch.allclose(wrong, ref_grad, atol=GRAD_ATOL, rtol=GRAD_RTOL)
