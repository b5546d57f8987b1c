"""``cut_cross_entropy: true`` — Apple's Cut Cross-Entropy (the ``cut-cross-entropy`` package).

On a CUDA GPU this is CCE's Triton kernel: the head matmul and the log-sum-exp are fused in
SRAM, so the logits never exist in global memory, and the backward skips vocabulary blocks whose
softmax is below the dtype's resolution. On CPU the package only offers its ``torch_compile``
implementation, which computes the full logits inside one compiled graph: the same numbers (it
is the reference the tests compare against) but no memory saving — on CPU use
``chunked_cross_entropy`` for that.

The package is an optional extra (``pip install 'hellbender[gpu]'``); importing it needs Triton.
"""

from __future__ import annotations

import torch

from hellbender.errors import OptionError, UnavailableError
from hellbender.kernels.chunked_ce import compute_dtype_for
from hellbender.kernels.model_parts import Head


def cut_cross_entropy_sum(hidden: torch.Tensor, head: Head, labels: torch.Tensor) -> torch.Tensor:
    """Summed causal-LM loss of ``hidden`` (B, T, H) through ``head`` against unshifted ``labels`` (B, T)."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        raise UnavailableError(
            "cut_cross_entropy: true needs the cut-cross-entropy package (and Triton): "
            "pip install 'hellbender[gpu]' — or use chunked_cross_entropy: true, which needs nothing."
        ) from exc
    if head.bias is not None:
        raise OptionError("cut_cross_entropy does not support a biased lm_head; use chunked_cross_entropy.")
    # CCE wants both operands in one dtype; under autocast that is the autocast dtype, as the
    # plain head's matmul would be.
    cd = compute_dtype_for(hidden)
    e = hidden.to(cd).contiguous()
    c = head.weight.to(cd)
    impl = "cce" if e.is_cuda else "torch_compile"
    loss: torch.Tensor = linear_cross_entropy(  # cut-cross-entropy ships no type hints
        e, c, labels.to(e.device), shift=True, reduction="sum", softcap=head.softcap, impl=impl
    )
    return loss.float()
