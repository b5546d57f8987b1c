"""Skipping peft's input casts under autocast changes copies, not numbers.

peft casts a LoRA layer's input to its A weight's dtype (fp32 with hellbender's fp32 adapter
weights); under bf16 autocast the matmul casts it straight back. ``skip_lora_input_casts`` turns
that off: the loss and every gradient must be bit-identical (bf16 → fp32 → bf16 is exact), with
fewer dtype copies in the forward and backward.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hellbender.kernels.loss import causal_lm_loss_sum
from hellbender.models.adapters import skip_lora_input_casts
from hellbender.testing.tiny import build_tiny_model


class _Copies(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _lora_model() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model(vocab_size=300, seed=0, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # fp32 master weights, as hellbender trains them; B non-zero
                p.data = p.data.float()
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.train()


def _run(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    model.zero_grad(set_to_none=True)
    with _Copies() as copies:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = causal_lm_loss_sum(model(input_ids=ids, use_cache=False).logits, ids)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, copies.count


def test_skipping_lora_input_casts_is_bit_identical_with_fewer_copies() -> None:
    model = _lora_model()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    ref_loss, ref_grads, ref_copies = _run(model, ids)
    assert skip_lora_input_casts(model) == 14  # 7 projections × 2 layers
    loss, grads, copies = _run(model, ids)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    # one copy of each adapted projection's input in the forward and one of its gradient back
    assert copies <= ref_copies - 2 * 14, (copies, ref_copies)
