"""``hellbender plan CONFIG``: the predicted peak memory per rank, before anything is loaded.

Reads the config and the model's config.json (or the GGUF header) only; see
:mod:`hellbender.plan.estimate` for the model of memory and :mod:`hellbender.plan.fit` for
``--fit``.
"""

from __future__ import annotations

import re
from typing import Any

from hellbender.config.hardware import TARGETS, Hardware
from hellbender.config.schema import ResolvedConfig
from hellbender.errors import OptionError
from hellbender.model_files import read_model_config
from hellbender.plan.estimate import GiB, MiB, Plan, predict
from hellbender.plan.shapes import ModelShape, model_shape

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|GB|G|MiB|MB|M|TiB|TB|T)?\s*$", re.IGNORECASE)
_UNITS = {
    "g": GiB,
    "gb": GiB,
    "gib": GiB,
    "m": MiB,
    "mb": MiB,
    "mib": MiB,
    "t": 1024 * GiB,
    "tb": 1024 * GiB,
    "tib": 1024 * GiB,
}


def parse_size(text: str) -> int:
    """``16GiB``, ``16GB``, ``16G``, ``800MiB`` → bytes (powers of two: GPU and RAM sizes are)."""
    match = _SIZE.match(text)
    if match is None:
        raise OptionError(f"{text!r} is not a memory size: write e.g. 16GiB, 24GB or 800MiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "GiB").lower()])


def device_target(device: str | None) -> tuple[str, Hardware | None, int | None]:
    """``--device``: ``cpu`` (default: this machine), ``cuda``, ``cuda:80GB`` or a named GPU
    (``h100-80gb``, ``t4``, … the targets of ``validate --target``). Returns the planner's target
    ("cpu"/"cuda"), the hardware that resolves ``bf16: auto``, and the device's memory if known."""
    if device is None or device == "cpu":
        return "cpu", None, None
    if device.lower().startswith("cuda:"):
        return "cuda", TARGETS["cuda"], parse_size(device.split(":", 1)[1])
    if device.lower() in TARGETS:
        hw = TARGETS[device.lower()]
        memory = int(hw.memory_gb * GiB) if hw.memory_gb else None
        return ("cuda" if hw.cuda else "cpu"), hw, memory
    names = ", ".join(sorted(TARGETS))
    raise OptionError(f"--device {device!r}: not a device; use cpu, cuda, cuda:80GB or one of {names}")


def shape_of(cfg: ResolvedConfig) -> ModelShape:
    """The model's shape from config.json or the GGUF header (no weights read)."""
    source = cfg.base_model_config or cfg.base_model
    config = read_model_config(source)
    if config is None:
        raise OptionError(
            f"base_model: cannot read the model config of {source!r} here (a folder with config.json "
            "or a .gguf file is needed; a hub id only when it is in the local cache)"
        )
    overrides: dict[str, Any] = dict(cfg.overrides_of_model_config or {})
    return model_shape(config, overrides)


def plan_for(cfg: ResolvedConfig, target: str) -> tuple[ModelShape, Plan]:
    shape = shape_of(cfg)
    return shape, predict(shape, cfg, target=target)


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def render(shape: ModelShape, plan: Plan, cfg: ResolvedConfig, memory: int | None = None) -> list[str]:
    """The human-readable breakdown."""
    lines = [
        f"model: {shape.model_type}, {shape.total_params / 1e6:.1f}M parameters, {shape.layers} layers, "
        f"hidden {shape.hidden}, vocab {shape.vocab}",
        f"run: micro_batch_size {cfg.micro_batch_size} × sequence_len {cfg.sequence_len}, "
        f"{cfg.adapter or 'full fine-tune'}, {cfg.compute_dtype}, optimizer {cfg.optimizer}, "
        f"world size {cfg.world_size} ({cfg.distributed_strategy})",
        "",
        f"{'component':34s} {'size':>11s}  phases         detail",
    ]
    for c in plan.components:
        phases = ",".join(p[0] for p in c.phases)  # l f b o
        lines.append(f"{c.name:34s} {_size(c.bytes):>11s}  {phases:13s}  {c.detail}")
    lines.append("")
    for phase in ("load", "forward", "backward", "optimizer"):
        lines.append(f"{phase:10s} {_size(plan.phase_bytes(phase)):>11s}")
    lines.append(f"peak: {_size(plan.peak_bytes)} per rank, in the {plan.peak_phase} phase")
    if memory is not None:
        verdict = "fits" if plan.peak_bytes <= memory else "does NOT fit"
        lines.append(f"device memory {_size(memory)}: {verdict} ({100 * plan.peak_bytes / memory:.0f}%)")
    lines += [f"note: {n}" for n in plan.notes]
    return lines
