"""``torch_compile: true`` — regional compilation: each decoder layer is compiled, not the model.

Why per layer: all decoder layers run the same code on same-shaped tensors, so torch.compile
traces and optimizes the layer *once* and reuses the result for every layer (parameters are
graph inputs, not constants). Compiling the whole model instead unrolls every layer into one
graph — a cold start that grows with depth — and breaks at the first Python construct the tracer
does not follow. Regional compilation also leaves the head and the loss in eager mode, which is
what the chunked / fused losses want (they call the decoder directly).

``pad_to_sequence_len`` keeps the shapes constant, so the first step's compile is reused for
every later step; without it each new sequence length may trigger a recompile (after the second
distinct shape torch.compile switches to a dynamic-shape graph).

Constant shapes are not enough: the layer's inputs must also keep their *type*. Given a 2D padding
mask, transformers' sdpa mask builder returns ``None`` instead of a mask when no token of the
batch is padding (sdpa's ``is_causal`` then does the masking), so a padded batch followed by a
full one would recompile the layer for ``attention_mask=None``. With compilation on, a 2D mask is
therefore turned into the 4D bool mask (causal and not padding) before the decoder sees it; a 4D
mask is passed to the layers untouched. The training loop's own masks are 4D already
(:func:`hellbender.models.attention.model_inputs`); this covers callers that pass a 2D one.

Patched through the module's ``_compiled_call_impl`` slot (what ``nn.Module.compile`` sets), so
``state_dict`` keys are unchanged and undo restores the eager call.
"""

from __future__ import annotations

import torch
from torch import nn

from hellbender.kernels.model_parts import decoder, decoder_layers
from hellbender.kernels.patching import Patches


def compile_layers(model: nn.Module, backend: str | None, patches: Patches) -> int:
    """Compile every decoder layer with ``backend`` (default inductor); returns how many."""
    backend = backend or "inductor"
    layers = decoder_layers(model)
    for layer in layers:
        patches.set_attr(layer, "_compiled_call_impl", torch.compile(layer._call_impl, backend=backend))
    _keep_sdpa_mask_a_tensor(decoder(model), patches)
    patches.note(f"torch_compile: {len(layers)} decoder layers, backend {backend}")
    return len(layers)


def causal_padding_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """Bool (B, 1, T, T) mask from a 2D (B, T) padding mask: query q sees key k iff k <= q and k
    is not padding — the mask transformers builds for sdpa when some token is padding."""
    length = padding_mask.shape[1]
    pos = torch.arange(length, device=padding_mask.device)
    causal = pos[None, :] <= pos[:, None]  # (q, k)
    return causal[None, None] & padding_mask.bool()[:, None, None, :]


def _keep_sdpa_mask_a_tensor(base: nn.Module, patches: Patches) -> None:
    forward = base.forward

    def forward_with_4d_mask(*args: object, **kwargs: object) -> object:
        mask = kwargs.get("attention_mask")
        if (
            isinstance(mask, torch.Tensor)
            and mask.dim() == 2
            and getattr(base.config, "_attn_implementation", None) == "sdpa"
        ):
            kwargs["attention_mask"] = causal_padding_mask(mask)
        return forward(*args, **kwargs)

    patches.set_attr(base, "forward", forward_with_4d_mask)
