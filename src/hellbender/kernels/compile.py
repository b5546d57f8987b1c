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

Patched through the module's ``_compiled_call_impl`` slot (what ``nn.Module.compile`` sets), so
``state_dict`` keys are unchanged and undo restores the eager call.
"""

from __future__ import annotations

import torch
from torch import nn

from hellbender.kernels.model_parts import decoder_layers
from hellbender.kernels.patching import Patches


def compile_layers(model: nn.Module, backend: str | None, patches: Patches) -> int:
    """Compile every decoder layer with ``backend`` (default inductor); returns how many."""
    backend = backend or "inductor"
    layers = decoder_layers(model)
    for layer in layers:
        patches.set_attr(layer, "_compiled_call_impl", torch.compile(layer._call_impl, backend=backend))
    patches.note(f"torch_compile: {len(layers)} decoder layers, backend {backend}")
    return len(layers)
