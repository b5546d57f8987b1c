"""``tiled_mlp: true`` — the MLP run over the tokens in shards, recomputed shard by shard in backward.

Why: at long sequence lengths the MLP's intermediate activations (``gate``, ``up``, ``act(gate)``,
their product: 4 × tokens × intermediate_size, with intermediate ≈ 3–4 × hidden) are the biggest
activations of a layer, far bigger than the layer's input. The MLP is position-wise, so it can be
computed on a slice of tokens at a time without changing any number. This is the idea of the
ALST recipe's TiledMLP (Arctic Long Sequence Training), written here from the idea:

* forward: with autograd off, run the MLP on each shard of tokens and concatenate the outputs;
  only the MLP's *input* is saved, so one shard's intermediates exist at a time;
* backward: for each shard, recompute its forward with autograd on and backpropagate that
  shard's slice of the output gradient straight away, collecting the input gradient and the
  gradients of the MLP's trainable parameters (LoRA weights included), then free the shard.

Parameter gradients are returned through autograd (the parameters are inputs of the Function),
not written into ``.grad`` behind autograd's back, so gradient accumulation, hooks and clipping
see ordinary gradients. They are summed over shards in fp32. RNG and autocast state are replayed,
so dropout inside the MLP draws the same masks in the recomputation.

Costs: one extra MLP forward per step (≈ +1/3 of the MLP's compute). Shapes stay constant for a
constant token count (``pad_to_sequence_len``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hellbender.errors import OptionError
from hellbender.kernels.chunked_ce import chunk_bounds
from hellbender.kernels.model_parts import decoder_layers
from hellbender.kernels.patching import Patches


def auto_num_shards(num_tokens: int, hidden_size: int) -> int:
    """ALST's default: about ``hidden_size`` tokens per shard, so a shard's intermediates are ~square."""
    return max(1, math.ceil(num_tokens / max(1, hidden_size)))


class TiledMLPFunction(torch.autograd.Function):
    """``fn`` applied to token shards of ``x``; recomputed per shard in backward.

    ``ctx`` is ``Any`` as in torch's own signature: at run time it is the autograd node, whose
    ``saved_tensors`` / ``needs_input_grad`` and the attributes set here no static class declares.
    """

    if TYPE_CHECKING:  # torch's ``Function.apply`` is unannotated; what it takes and gives here

        @classmethod
        def apply(
            cls, fn: Callable[[torch.Tensor], torch.Tensor], num_shards: int, x: torch.Tensor,
            *params: torch.Tensor,
        ) -> torch.Tensor: ...

    @staticmethod
    def forward(
        ctx: Any,
        fn: Callable[[torch.Tensor], torch.Tensor],
        num_shards: int,
        x: torch.Tensor,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        device_type = x.device.type
        ctx.fn = fn
        ctx.num_shards = num_shards
        ctx.device_type = device_type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        flat = x.reshape(-1, x.shape[-1])
        outs = [fn(flat[s:e]) for s, e in chunk_bounds(flat.shape[0], num_shards)]
        ctx.save_for_backward(x, *params)
        out = torch.cat(outs, dim=0)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *params = ctx.saved_tensors
        need_x = ctx.needs_input_grad[2]
        need_p = list(ctx.needs_input_grad[3:])
        flat = x.detach().reshape(-1, x.shape[-1])
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat) if need_x else None
        grad_p: list[torch.Tensor | None] = [
            torch.zeros(p.shape, dtype=torch.float32, device=p.device) if need else None
            for p, need in zip(params, need_p, strict=True)
        ]
        wanted = [p for p, need in zip(params, need_p, strict=True) if need]
        enabled, dtype = ctx.autocast
        # Restore the RNG the forward started from, then undo that after the replay.
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
                for s, e in chunk_bounds(flat.shape[0], ctx.num_shards):
                    x_c = flat[s:e].detach().requires_grad_(need_x)
                    y_c = ctx.fn(x_c)
                    inputs = ([x_c] if need_x else []) + wanted
                    if not inputs:
                        break
                    # allow_unused: an input the MLP does not reach gets None (torch's stubs say Tensor).
                    grads: Sequence[torch.Tensor | None] = torch.autograd.grad(
                        y_c, inputs, grad_flat[s:e], allow_unused=True
                    )
                    if need_x:
                        assert grad_x is not None
                        grad_x[s:e] = grads[0] if grads[0] is not None else 0
                        grads = grads[1:]
                    it = iter(grads)
                    for i, need in enumerate(need_p):
                        if need:
                            g, acc = next(it), grad_p[i]
                            if g is not None and acc is not None:  # acc: allocated where needed
                                acc += g.float()
                    del y_c, grads
        out_p = [g.to(p.dtype) if g is not None else None for g, p in zip(grad_p, params, strict=True)]
        return (None, None, grad_x.view_as(x) if grad_x is not None else None, *out_p)


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, num_shards: int | None
          ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A forward that runs ``fn`` (the module's MLP forward) through :class:`TiledMLPFunction`."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        shards = num_shards or auto_num_shards(x.numel() // x.shape[-1], x.shape[-1])
        trainable = [p for p in module.parameters() if p.requires_grad]
        return TiledMLPFunction.apply(fn, shards, x, *trainable)

    return forward


def patch_tiled_mlp(model: nn.Module, num_shards: int | None, patches: Patches) -> int:
    """Tile the MLP of every decoder layer (wrapping whatever forward it has now, e.g. a fused LoRA one)."""
    count = 0
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        patches.set_attr(mlp, "forward", tiled(mlp.forward, mlp, num_shards))
        count += 1
    if count == 0:
        raise OptionError("tiled_mlp: no decoder layer has an `mlp` submodule")
    patches.note(f"tiled_mlp: {count} MLPs, {num_shards or 'auto'} shards")
    return count
