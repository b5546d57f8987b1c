"""``fp8: true``: the decoder layers' linear layers compute in float8, through torchao.

torchao's float8 training API (:func:`torchao.float8.convert_to_float8_training`) swaps each chosen
``nn.Linear`` for a ``Float8Linear`` that keeps the same weight ``Parameter`` (so the optimizer,
the state dict keys and checkpoints are unchanged) and, in forward and backward, casts the input,
the weight and the output gradient to float8 with one dynamic scale per tensor (e4m3 forward,
e5m2 gradients) before ``torch._scaled_mm``. Master weights, gradients and optimizer state stay in
their usual precision. It runs on CUDA GPUs with fp8 tensor cores (compute capability ≥ 8.9) and on
CPU (torch's CPU ``_scaled_mm``; the config rule HB105 refuses older GPUs).

What is converted: the ``nn.Linear`` layers inside the repeated decoder layers whose both
dimensions are multiples of 16 (``_scaled_mm``'s requirement on CUDA). Left in their precision:
the output head and the embeddings (the layers most sensitive to fp8's 3-bit mantissa, which
torchao's recipes also keep in high precision), and LoRA's low-rank ``lora_A``/``lora_B`` (tiny
matmuls with nothing to gain); a LoRA layer's frozen ``base_layer`` is converted.

:func:`convert_to_fp8` returns how to swap the original modules (holding the same parameters) back;
:func:`hellbender.kernels.apply_optimizations` records it, so ``undo_optimizations`` restores the
model exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from hellbender.errors import UnavailableError
from hellbender.quant import import_torchao

# torch._scaled_mm wants both matrix dimensions divisible by 16.
FP8_ALIGNMENT = 16


def _convertible(module: nn.Module, fqn: str) -> bool:
    return (
        type(module) is nn.Linear
        and "lora_" not in fqn
        and module.in_features % FP8_ALIGNMENT == 0
        and module.out_features % FP8_ALIGNMENT == 0
    )


def convert_to_fp8(model: nn.Module, layers: Sequence[nn.Module]) -> tuple[list[str], Callable[[], None]]:
    """Swap the linear layers inside ``layers`` (the model's decoder layers) for torchao's
    ``Float8Linear``. Returns the converted modules' names and a function that swaps the original
    modules back."""
    try:
        float8 = import_torchao("torchao.float8")
    except ImportError as exc:  # the config rule HB197 reports this earlier; kept for API users
        raise UnavailableError(
            "fp8 needs torchao, which is not installed: pip install 'hellbender[torchao]'"
        ) from exc

    in_layers = {id(m) for layer in layers for m in layer.modules()}
    chosen = {
        fqn: module
        for fqn, module in model.named_modules()
        if id(module) in in_layers and _convertible(module, fqn)
    }
    if not chosen:
        raise UnavailableError(
            "fp8: no linear layer of the decoder layers has both dimensions divisible by "
            f"{FP8_ALIGNMENT}, so nothing would run in float8"
        )

    def only_chosen(module: nn.Module, fqn: str) -> bool:
        return chosen.get(fqn) is module

    float8.convert_to_float8_training(model, module_filter_fn=only_chosen, config=float8.Float8LinearConfig())
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for fqn, old in chosen.items():
        parent_name, _, attr = fqn.rpartition(".")
        parent = model.get_submodule(parent_name)
        if getattr(parent, attr) is not old:
            swapped.append((parent, attr, old))

    def undo() -> None:
        for parent, attr, old in reversed(swapped):
            setattr(parent, attr, old)

    return [fqn for fqn, old in chosen.items() if any(o is old for _, _, o in swapped)], undo
