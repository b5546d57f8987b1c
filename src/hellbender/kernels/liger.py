"""``liger_*`` keys: Liger-Kernel's Triton kernels, patched into one model instance, reversibly.

Liger's own ``apply_liger_kernel_to_<arch>`` helpers replace *classes* in transformers' modeling
files, which affects every model built afterwards in the process and cannot be undone. Here each
kernel is patched into the instance instead (a module's ``forward``), through Liger's public
functional API (``liger_kernel.transformers.functional``), and recorded in a
:class:`~hellbender.kernels.patching.Patches` log. The one exception is RoPE: transformers calls
the modeling file's module-level ``apply_rotary_pos_emb`` from inside attention, so that global is
replaced (and restored by undo) — it affects other models of the same architecture in the
process while the patch is on, which the docs say.

Which kernel replaces what:

* ``liger_rms_norm``: every ``*RMSNorm`` module. The normalisation variant (Llama's ``w · x̂`` or
  Gemma's ``(1 + w) · x̂``) is *measured* on the module itself with a small probe, so a norm this
  file has never heard of is either matched exactly or refused.
* ``liger_glu_activation``: the gated MLP's ``act(gate(x)) * up(x)`` (SwiGLU for silu, GeGLU
  for gelu-tanh); the projections stay the model's own (LoRA included).
* ``liger_rope``: rotary embedding of q and k.
* ``liger_layer_norm``: every ``nn.LayerNorm`` with weight and bias.
* ``liger_cross_entropy`` / ``liger_fused_linear_cross_entropy``: loss functions, used by
  :func:`hellbender.kernels.loss.loss_sum`.

Liger's kernels are Triton GPU kernels: on a machine without CUDA every entry point raises a
clear error — except under Triton's CPU interpreter (``TRITON_INTERPRET=1``), which the tests use
to run the real kernels against the PyTorch reference.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from hellbender.data.tokenize import IGNORE_INDEX
from hellbender.errors import OptionError, UnavailableError
from hellbender.kernels.chunked_ce import compute_dtype_for, shifted_targets
from hellbender.kernels.model_parts import Head, decoder_layers, model_device, unwrap
from hellbender.kernels.patching import Patches

LIGER_KEYS: tuple[str, ...] = (
    "liger_rms_norm",
    "liger_glu_activation",
    "liger_rope",
    "liger_layer_norm",
    "liger_cross_entropy",
    "liger_fused_linear_cross_entropy",
)


def triton_interpreter_on() -> bool:
    """Triton's CPU interpreter runs the same kernels in numpy (slow; for tests and debugging)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class LigerFunctional(Protocol):
    """The part of ``liger_kernel.transformers.functional`` used here, called as it is called here.

    liger-kernel ships no type hints; this states what its functions take and return.
    """

    def liger_rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float, offset: float,
                       casting_mode: str, in_place: bool, /) -> torch.Tensor: ...

    def liger_swiglu(self, a: torch.Tensor, b: torch.Tensor, /) -> torch.Tensor: ...

    def liger_geglu(self, a: torch.Tensor, b: torch.Tensor, /) -> torch.Tensor: ...

    def liger_rope(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        position_ids: torch.Tensor | None,
        unsqueeze_dim: int,
        /,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def liger_layer_norm(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float, /
    ) -> torch.Tensor: ...

    def liger_cross_entropy(self, logits: torch.Tensor, target: torch.Tensor, /, *, ignore_index: int,
                            reduction: str) -> torch.Tensor: ...

    def liger_fused_linear_cross_entropy(
        self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, /, *,
        bias: torch.Tensor | None, ignore_index: int, reduction: str, softcap: float | None,
    ) -> torch.Tensor: ...


def require_liger(what: str, device: torch.device) -> LigerFunctional:
    """Import ``liger_kernel``'s functional API, or explain why it cannot run here."""
    if device.type != "cuda" and not triton_interpreter_on():
        raise UnavailableError(
            f"{what}: Liger kernels are Triton GPU kernels and the model is on {device.type}. "
            "Remove the liger_* keys on this machine (chunked_cross_entropy gives the same loss-memory "
            "saving on CPU), or set TRITON_INTERPRET=1 to run them (very slowly) in Triton's interpreter."
        )
    try:
        from liger_kernel.transformers import functional
    except ImportError as exc:
        raise UnavailableError(f"{what} needs liger-kernel: pip install 'hellbender[gpu]'") from exc
    api: LigerFunctional = functional
    return api


# ---------------------------------------------------------------- RMSNorm


def _rms_norm_variant(module: nn.Module) -> tuple[float, str, float]:
    """(offset, casting mode, eps) of an RMSNorm module, measured on the module itself.

    Liger's kernel computes ``x / rms(x) * (offset + w)``; Llama-style norms use offset 0 and
    Gemma-style norms offset 1. Rather than trusting class names, the module is run on a small
    probe and compared against both formulas computed here in fp32.
    """
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1 or eps is None:
        raise OptionError(f"liger_rms_norm: {type(module).__name__} has no 1-D weight / eps; cannot patch it")
    with torch.no_grad():
        gen = torch.Generator(device="cpu").manual_seed(0)
        probe = torch.randn(3, weight.shape[0], generator=gen).to(weight.device)
        got = module(probe.to(weight.dtype)).float()
        normed = probe * torch.rsqrt(probe.pow(2).mean(-1, keepdim=True) + float(eps))
        tol = 1e-4 if weight.dtype == torch.float32 else 5e-2
        for offset, casting in ((0.0, "llama"), (1.0, "gemma")):
            ref = normed * (offset + weight.float())
            if torch.allclose(got, ref, rtol=tol, atol=tol):
                return offset, casting, float(eps)
    raise OptionError(
        f"liger_rms_norm: {type(module).__name__} computes neither x̂·w nor x̂·(1+w); it is not patched "
        "(turn liger_rms_norm off for this model)."
    )


def patch_rms_norm(model: nn.Module, patches: Patches) -> int:
    """Route every ``*RMSNorm`` module through Liger's RMSNorm kernel; returns how many."""
    fn = require_liger("liger_rms_norm", model_device(model)).liger_rms_norm
    count = 0
    for module in unwrap(model).modules():
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        offset, casting, eps = _rms_norm_variant(module)

        def forward(x: torch.Tensor, _m: nn.Module = module, _o: float = offset, _c: str = casting,
                    _e: float = eps) -> torch.Tensor:
            weight = _m.weight
            assert isinstance(weight, torch.Tensor)  # checked by _rms_norm_variant
            # in_place=False: Liger's in-place backward overwrites dY, which is unsafe whenever the
            # same gradient also flows into a residual branch.
            return fn(x, weight, _e, _o, _c, False)

        patches.set_attr(module, "forward", forward)
        count += 1
    patches.note(f"liger_rms_norm: {count} RMSNorm modules")
    return count


# ---------------------------------------------------------------- gated MLP activation


def _glu_kernel(
    model: nn.Module, functional: LigerFunctional
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    config = getattr(unwrap(model), "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    act = getattr(text, "hidden_act", None) or getattr(text, "hidden_activation", None)
    if act in ("silu", "swish"):
        return functional.liger_swiglu
    if act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return functional.liger_geglu
    raise OptionError(f"liger_glu_activation: activation {act!r} has no Liger kernel (silu or gelu-tanh)")


def patch_glu(model: nn.Module, patches: Patches) -> int:
    """Replace ``act(gate(x)) * up(x)`` in every gated MLP by Liger's fused SwiGLU / GeGLU."""
    functional = require_liger("liger_glu_activation", model_device(model))
    kernel = _glu_kernel(model, functional)
    count = 0
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            continue

        # Any: the MLP's projections are whatever modules the model (or an adapter) put there.
        def forward(x: torch.Tensor, _m: Any = mlp) -> torch.Tensor:
            out: torch.Tensor = _m.down_proj(kernel(_m.gate_proj(x), _m.up_proj(x)))
            return out

        patches.set_attr(mlp, "forward", forward)
        count += 1
    if count == 0:
        raise OptionError(
            "liger_glu_activation: no gated MLP (gate_proj/up_proj/down_proj) found in the model"
        )
    patches.note(f"liger_glu_activation: {count} MLPs")
    return count


# ---------------------------------------------------------------- RoPE


def patch_rope(model: nn.Module, patches: Patches) -> int:
    """Replace the modeling file's ``apply_rotary_pos_emb`` by Liger's RoPE kernel."""
    functional = require_liger("liger_rope", model_device(model))
    modules: dict[str, Any] = {}
    for layer in decoder_layers(model):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            continue
        if "apply_rotary_pos_emb" not in type(attn).forward.__code__.co_names:
            raise OptionError(
                f"liger_rope: {type(attn).__name__} does not call apply_rotary_pos_emb; cannot patch"
            )
        modules[type(attn).__module__] = sys.modules[type(attn).__module__]
    for mod in modules.values():
        original = mod.apply_rotary_pos_emb
        params = list(inspect.signature(original).parameters)
        if params[:4] != ["q", "k", "cos", "sin"]:
            raise OptionError(
                f"liger_rope: {mod.__name__}.apply_rotary_pos_emb{params} is not the standard RoPE"
            )

        def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 position_ids: torch.Tensor | None = None, unsqueeze_dim: int = 1,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
            return functional.liger_rope(q, k, cos, sin, position_ids, unsqueeze_dim)

        patches.set_attr(mod, "apply_rotary_pos_emb", rope)
    if not modules:
        raise OptionError("liger_rope: no attention module (self_attn) found in the model")
    patches.note(f"liger_rope: {', '.join(sorted(modules))}.apply_rotary_pos_emb")
    return len(modules)


# ---------------------------------------------------------------- LayerNorm


def patch_layer_norm(model: nn.Module, patches: Patches) -> int:
    """Route every affine ``nn.LayerNorm`` (over the last dim) through Liger's LayerNorm kernel."""
    fn = require_liger("liger_layer_norm", model_device(model)).liger_layer_norm
    count = 0
    for module in unwrap(model).modules():
        if not isinstance(module, nn.LayerNorm) or module.weight is None or module.bias is None:
            continue
        if len(module.normalized_shape) != 1:
            continue

        def forward(x: torch.Tensor, _m: nn.LayerNorm = module) -> torch.Tensor:
            return fn(x, _m.weight, _m.bias, _m.eps)

        patches.set_attr(module, "forward", forward)
        count += 1
    # Llama-family models have no LayerNorm: say so instead of silently doing nothing.
    patches.note(
        f"liger_layer_norm: {count} LayerNorm modules" + (" (the model has none)" if count == 0 else "")
    )
    return count


# ---------------------------------------------------------------- losses


def liger_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed causal-LM loss from full logits (B, T, V) with Liger's cross-entropy kernel.

    Liger writes the gradient into its input in place; the input here is a fresh contiguous
    copy of the shifted logits, so nothing else sees that.
    """
    functional = require_liger("liger_cross_entropy", logits.device)
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return functional.liger_cross_entropy(
        shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    ).float()


def liger_fused_linear_cross_entropy_sum(
    hidden: torch.Tensor, head: Head, labels: torch.Tensor
) -> torch.Tensor:
    """Summed causal-LM loss of ``hidden`` (B, T, H) through ``head`` with Liger's fused head + loss."""
    functional = require_liger("liger_fused_linear_cross_entropy", hidden.device)
    targets = shifted_targets(labels.to(hidden.device)).reshape(-1)
    # One dtype for both operands: autocast's if it is on (as the plain head's matmul would run).
    cd = compute_dtype_for(hidden)
    flat = hidden.reshape(-1, hidden.shape[-1]).to(cd)
    return functional.liger_fused_linear_cross_entropy(
        flat,
        head.weight.to(cd),
        targets,
        bias=head.bias.to(cd) if head.bias is not None else None,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
        softcap=head.softcap,
    ).float()



# config key → its patch, in the order apply_optimizations applies them
PATCHES: dict[str, Callable[[nn.Module, Patches], int]] = {
    "liger_rms_norm": patch_rms_norm,
    "liger_glu_activation": patch_glu,
    "liger_rope": patch_rope,
    "liger_layer_norm": patch_layer_norm,
}
