"""``lora_mlp_kernel`` / ``lora_qkv_kernel`` / ``lora_o_kernel``: fused LoRA forward and backward.

peft computes a LoRA linear as ``base(x) + B(A(dropout(x))) · s`` with ordinary modules, so
autograd keeps, per adapted projection, the input of ``A`` and the rank-r input of ``B``; around
the MLP it also keeps ``act(gate)`` and ``act(gate) · up`` (the input of ``down``). The custom
autograd Functions here compute the same numbers and save only what the backward cannot cheaply
recompute:

* MLP (gate, up, down): saves ``x``, ``gate`` and ``up``. ``act(gate)``, their product and every
  rank-r intermediate are recomputed in the backward (elementwise work and r-wide matmuls, cheap
  next to the saved 2 × tokens × intermediate_size). peft saves those plus ``act(gate)`` and the
  product: two full intermediate-size tensors per layer more.
* QKV: one Function for the three projections of the same input; saves ``x`` once and no rank-r
  intermediates (peft: ``x`` plus three tokens × r tensors), and gives one node instead of ~15.
* O: the same for the output projection alone.

Gradients of A and B follow from ``y = xWᵀ + s·(xAᵀ)Bᵀ``:
``dB = s·dYᵀ(xAᵀ)``, ``dA = s·(dY B)ᵀ x``, ``dx = dY W + s·(dY B) A``; the base weight is frozen.

Scope (checked when patching, with a clear error otherwise): vanilla LoRA (no DoRA / variants,
no ``lora_bias``, ``lora_dropout: 0`` — dropout would have to be replayed), frozen base weights
and biases, ``nn.Linear`` bases or bitsandbytes 4-bit bases (dequantized on the fly, as peft does
for merging). At call time a layer that is merged, disabled or has several active adapters falls back
to peft's own forward, so the fused path never computes something peft would not.
Autocast state is replayed in the backward so mixed-precision matmuls run in the same dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import nn

from hellbender.errors import OptionError
from hellbender.kernels.model_parts import decoder_layers
from hellbender.kernels.patching import Patches

if TYPE_CHECKING:
    from peft.tuners.lora.layer import LoraLayer


@dataclass(frozen=True)
class Proj:
    """One projection: its frozen base layer and, if adapted, the peft LoRA layer around it."""

    base: nn.Module
    lora: LoraLayer | None = None
    adapter: str | None = None

    @property
    def scaling(self) -> float:
        assert self.lora is not None and self.adapter is not None
        return float(self.lora.scaling[self.adapter])

    def lora_weights(self) -> list[torch.Tensor]:
        if self.lora is None:
            return []
        assert self.adapter is not None
        return [_weight(self.lora.lora_A[self.adapter]), _weight(self.lora.lora_B[self.adapter])]


def _weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as the tensor it is (``nn.Module`` attribute access is typed ``Tensor | Module``)."""
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w


def _bias(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    assert b is None or isinstance(b, torch.Tensor)
    return b


def _base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a dense ``dtype`` tensor: the parameter itself, or a dequantized copy.

    bitsandbytes 4/8-bit weights are dequantized on the fly (never saved for backward: the
    backward dequantizes again), as bitsandbytes' own matmul does for a batch of tokens.
    """
    w = base.weight
    if type(w).__name__ in ("Params4bit", "Int8Params") or hasattr(base, "W_q"):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(base).to(dtype)
    return _weight(base)


def _is_lora_linear(module: nn.Module) -> TypeGuard[LoraLayer]:
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # pragma: no cover - peft is a core dependency
        return False
    return isinstance(module, LoraLayer) and hasattr(module, "lora_A")


def make_proj(module: nn.Module, what: str) -> Proj:
    """Describe ``module`` (a peft LoRA Linear or a plain Linear) or refuse it with the reason."""
    if not _is_lora_linear(module):
        if isinstance(module, nn.Linear):
            if module.weight.requires_grad:
                raise OptionError(f"{what}: {type(module).__name__} has a trainable base weight; the fused "
                                  "LoRA kernels are for adapters over a frozen base")
            _refuse_trainable_bias(module, what)
            return Proj(base=module)
        raise OptionError(f"{what}: cannot fuse a {type(module).__name__}")
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    if len(adapters) != 1:
        raise OptionError(f"{what}: needs exactly one active LoRA adapter, found {adapters}")
    adapter = adapters[0]
    if adapter in getattr(module, "lora_variant", {}):
        raise OptionError(
            f"{what}: DoRA / LoRA variants are not fused; set peft_use_dora: false or turn the kernel off"
        )
    if not isinstance(module.lora_dropout[adapter], nn.Identity):
        raise OptionError(f"{what}: needs lora_dropout: 0 (the fused kernels do not replay dropout)")
    if module.lora_B[adapter].bias is not None:
        raise OptionError(f"{what}: lora_bias is not supported by the fused kernels")
    if getattr(module, "fan_in_fan_out", False):
        raise OptionError(f"{what}: fan_in_fan_out layers are not supported by the fused kernels")
    base = module.get_base_layer()
    if getattr(base, "weight", None) is None or base.weight.requires_grad:
        raise OptionError(f"{what}: the base weight must exist and be frozen")
    _refuse_trainable_bias(base, what)
    return Proj(base=base, lora=module, adapter=adapter)


def _refuse_trainable_bias(base: nn.Module, what: str) -> None:
    # The Functions return gradients for x and the LoRA weights only: a trainable bias would
    # silently get none.
    bias = getattr(base, "bias", None)
    if bias is not None and bias.requires_grad:
        raise OptionError(
            f"{what}: the base layer's bias is trainable (peft bias='all' / 'lora_only'?); the "
            "fused LoRA kernels do not compute bias gradients. Freeze it or turn the kernel off"
        )


def _usable_now(projs: tuple[Proj, ...]) -> bool:
    """Whether the adapters are in the state the fused math assumes (else fall back to peft)."""
    for p in projs:
        if p.lora is None:
            continue
        layer = p.lora
        if layer.disable_adapters or layer.merged or list(layer.active_adapters) != [p.adapter]:
            return False
    return True


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _proj_forward(x: torch.Tensor, p: Proj, ab: list[torch.Tensor]) -> torch.Tensor:
    """``base(x) + B(A(x))·s`` in peft's order of dtype casts."""
    y = F.linear(x, _base_weight(p.base, x.dtype), _bias(p.base))
    if p.lora is None:
        return y
    a, b = ab
    x_l = x.to(a.dtype)
    return (y + F.linear(F.linear(x_l, a), b) * p.scaling).to(y.dtype)


def _proj_backward(
    x: torch.Tensor, gy: torch.Tensor, p: Proj, ab: list[torch.Tensor], need_x: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dA, dB) of one projection, recomputing the rank-r intermediate ``x Aᵀ``."""
    w = _base_weight(p.base, gy.dtype)
    gx = gy.to(w.dtype) @ w if need_x else None
    if p.lora is None:
        return gx, None, None
    a, b = ab
    s = p.scaling
    x_l = x.to(a.dtype).reshape(-1, x.shape[-1])
    gy_l = gy.to(b.dtype).reshape(-1, gy.shape[-1]) * s
    xa = F.linear(x_l, a)
    grad_b = gy_l.t() @ xa
    g_xa = gy_l @ b
    grad_a = g_xa.t() @ x_l
    if need_x:
        assert gx is not None
        gx = gx + (g_xa @ a).to(gx.dtype).view_as(gx)
    return gx, grad_a.to(a.dtype), grad_b.to(b.dtype)


def _split_ab(projs: tuple[Proj, ...], ab: tuple[torch.Tensor, ...]) -> list[list[torch.Tensor]]:
    out: list[list[torch.Tensor]] = []
    i = 0
    for p in projs:
        n = 2 if p.lora is not None else 0
        out.append(list(ab[i:i + n]))
        i += n
    return out


class LoRAProjections(torch.autograd.Function):
    """Several LoRA projections of one input (q, k, v — or o alone); saves only the input.

    ``ctx`` is ``Any`` as in torch's own signature (here and in :class:`LoRAGatedMLP`): at run time
    it is the autograd node, whose ``saved_tensors`` / ``needs_input_grad`` and the attributes set
    here no static class declares.
    """

    if TYPE_CHECKING:  # torch's ``Function.apply`` is unannotated; what it takes and gives here

        @classmethod
        def apply(
            cls, x: torch.Tensor, projs: tuple[Proj, ...], *ab: torch.Tensor
        ) -> tuple[torch.Tensor, ...]: ...

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, projs: tuple[Proj, ...], *ab: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        ctx.projs = projs
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, *ab)
        return tuple(_proj_forward(x, p, w) for p, w in zip(projs, _split_ab(projs, ab), strict=True))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        x, *ab = ctx.saved_tensors
        projs: tuple[Proj, ...] = ctx.projs
        need_x = ctx.needs_input_grad[0]
        enabled, dtype = ctx.autocast
        grad_x: torch.Tensor | None = None
        grad_ab: list[torch.Tensor | None] = []
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            for p, w, gy in zip(projs, _split_ab(projs, tuple(ab)), grads, strict=True):
                if gy is None:
                    grad_ab += [None] * len(w)
                    continue
                gx, ga, gb = _proj_backward(x, gy, p, w, need_x)
                if gx is not None:
                    grad_x = gx if grad_x is None else grad_x + gx
                if p.lora is not None:
                    grad_ab += [ga, gb]
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return (grad_x, None, *grad_ab)


def _silu_grad(e: torch.Tensor) -> torch.Tensor:
    sig = torch.sigmoid(e)
    return sig * (1 + e * (1 - sig))


class LoRAGatedMLP(torch.autograd.Function):
    """``down(act(gate(x)) * up(x))`` with LoRA on any of the three; saves x, gate(x), up(x)."""

    if TYPE_CHECKING:  # torch's ``Function.apply`` is unannotated; what it takes and gives here

        @classmethod
        def apply(
            cls, x: torch.Tensor, projs: tuple[Proj, ...], act: Callable[[torch.Tensor], torch.Tensor],
            is_silu: bool, *ab: torch.Tensor,
        ) -> torch.Tensor: ...

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        projs: tuple[Proj, Proj, Proj],
        act: Callable[[torch.Tensor], torch.Tensor],
        is_silu: bool,
        *ab: torch.Tensor,
    ) -> torch.Tensor:
        wg, wu, wd = _split_ab(projs, ab)
        gate = _proj_forward(x, projs[0], wg)
        up = _proj_forward(x, projs[1], wu)
        out = _proj_forward(act(gate) * up, projs[2], wd)
        ctx.projs, ctx.act, ctx.is_silu = projs, act, is_silu
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, gate, up, *ab)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, gate, up, *ab = ctx.saved_tensors
        projs: tuple[Proj, Proj, Proj] = ctx.projs
        wg, wu, wd = _split_ab(projs, tuple(ab))
        enabled, dtype = ctx.autocast
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            if ctx.is_silu:
                a = F.silu(gate)
                h = a * up
                g_h, ga_d, gb_d = _proj_backward(h, grad_out, projs[2], wd, True)
                assert g_h is not None
                g_h = g_h.to(up.dtype)
                g_up = g_h * a
                g_gate = g_h * up * _silu_grad(gate)
            else:  # any other activation: its derivative by autograd on the recomputed value
                with torch.enable_grad():
                    gate_ = gate.detach().requires_grad_(True)
                    a_ = ctx.act(gate_)
                a = a_.detach()
                h = a * up
                g_h, ga_d, gb_d = _proj_backward(h, grad_out, projs[2], wd, True)
                assert g_h is not None
                g_h = g_h.to(up.dtype)
                g_up = g_h * a
                (g_gate,) = torch.autograd.grad(a_, gate_, g_h * up)
            del h
            need_x = ctx.needs_input_grad[0]
            gx_g, ga_g, gb_g = _proj_backward(x, g_gate, projs[0], wg, need_x)
            gx_u, ga_u, gb_u = _proj_backward(x, g_up, projs[1], wu, need_x)
        grad_x = (gx_g + gx_u).to(x.dtype) if need_x and gx_g is not None and gx_u is not None else None
        grad_ab: list[torch.Tensor | None] = []
        for p, ga, gb in zip(projs, (ga_g, ga_u, ga_d), (gb_g, gb_u, gb_d), strict=True):
            if p.lora is not None:
                grad_ab += [ga, gb]
        return (grad_x, None, None, None, *grad_ab)


def _ab(projs: tuple[Proj, ...]) -> list[torch.Tensor]:
    return [w for p in projs for w in p.lora_weights()]


# ---------------------------------------------------------------- patching


def _has_lora(projs: tuple[Proj, ...]) -> bool:
    return any(p.lora is not None for p in projs)


def patch_lora_mlp(model: nn.Module, patches: Patches) -> int:
    """Fuse the gated MLP of every layer whose gate/up/down carry LoRA."""
    count = 0
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            continue
        projs = tuple(make_proj(getattr(mlp, n), f"lora_mlp_kernel (layer {i} {n})")
                      for n in ("gate_proj", "up_proj", "down_proj"))
        if not _has_lora(projs):
            continue
        act = mlp.act_fn
        is_silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
        original = mlp.forward

        def forward(x: torch.Tensor, _p: tuple[Proj, ...] = projs, _act: Any = act, _s: bool = is_silu,
                    _orig: Callable[..., torch.Tensor] = original) -> torch.Tensor:
            if not _usable_now(_p):
                return _orig(x)
            return LoRAGatedMLP.apply(x, _p, _act, _s, *_ab(_p))

        patches.set_attr(mlp, "forward", forward)
        count += 1
    patches.note(f"lora_mlp_kernel: {count} MLPs")
    return count


class _PendingQKV:
    """The q/k/v the fused kernel computed for the attention call in progress.

    The attention module's own forward (not rewritten here) calls ``q_proj(x)``, ``k_proj(x)``,
    ``v_proj(x)``; each patched projection returns its precomputed output when called with that
    very tensor, and computes normally otherwise.
    """

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.out: dict[str, torch.Tensor] = {}


def patch_lora_qkv(model: nn.Module, patches: Patches) -> int:
    """Compute q, k, v of every attention with one fused LoRA Function."""
    count = 0
    names = ("q_proj", "k_proj", "v_proj")
    for i, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in names):
            continue
        projs = tuple(make_proj(getattr(attn, n), f"lora_qkv_kernel (layer {i} {n})") for n in names)
        if not _has_lora(projs):
            continue
        pending = _PendingQKV()
        for name in names:
            proj_module = getattr(attn, name)
            own = proj_module.forward

            def proj_forward(x: torch.Tensor, *args: Any, _name: str = name,
                             _own: Callable[..., torch.Tensor] = own,
                             _pending: _PendingQKV = pending, **kwargs: Any) -> torch.Tensor:
                if _pending.x is x and _name in _pending.out and not args and not kwargs:
                    return _pending.out.pop(_name)
                return _own(x, *args, **kwargs)

            patches.set_attr(proj_module, "forward", proj_forward)
        original = attn.forward

        def attn_forward(hidden_states: torch.Tensor, *args: Any, _p: tuple[Proj, ...] = projs,
                         _pending: _PendingQKV = pending, _orig: Callable[..., Any] = original,
                         **kwargs: Any) -> Any:
            if not _usable_now(_p):
                return _orig(hidden_states, *args, **kwargs)
            q, k, v = LoRAProjections.apply(hidden_states, _p, *_ab(_p))
            _pending.x, _pending.out = hidden_states, {"q_proj": q, "k_proj": k, "v_proj": v}
            try:
                return _orig(hidden_states, *args, **kwargs)
            finally:
                _pending.x, _pending.out = None, {}

        patches.set_attr(attn, "forward", attn_forward)
        count += 1
    patches.note(f"lora_qkv_kernel: {count} attention modules")
    return count


def patch_lora_o(model: nn.Module, patches: Patches) -> int:
    """Fuse the LoRA output projection of every attention."""
    count = 0
    for i, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        o = getattr(attn, "o_proj", None) if attn is not None else None
        if o is None:
            continue
        proj = make_proj(o, f"lora_o_kernel (layer {i} o_proj)")
        if proj.lora is None:
            continue
        original = o.forward

        def forward(x: torch.Tensor, *args: Any, _p: tuple[Proj, ...] = (proj,),
                    _orig: Callable[..., torch.Tensor] = original, **kwargs: Any) -> torch.Tensor:
            if args or kwargs or not _usable_now(_p):
                return _orig(x, *args, **kwargs)
            (y,) = LoRAProjections.apply(x, _p, *_ab(_p))
            return y

        patches.set_attr(o, "forward", forward)
        count += 1
    patches.note(f"lora_o_kernel: {count} output projections")
    return count


# config key → its patch, in the order apply_optimizations applies them
PATCHES: dict[str, Callable[[nn.Module, Patches], int]] = {
    "lora_mlp_kernel": patch_lora_mlp,
    "lora_qkv_kernel": patch_lora_qkv,
    "lora_o_kernel": patch_lora_o,
}
