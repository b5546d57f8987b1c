"""What the machine offers, as far as the config cares: CUDA, bf16, fp8.

The probe is its own module so that both :mod:`hellbender.config.normalize` (which resolves
``bf16: auto``) and :mod:`hellbender.config.rules` (which judges hardware-dependent options) can
take a :class:`Hardware` without importing each other. Tests pass a hand-made ``Hardware`` to
exercise every branch on a CPU machine.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Hardware:
    """What the machine can do, as far as the config cares."""

    cuda: bool = False
    cuda_bf16: bool = False
    cuda_fp8: bool = False
    cpu_bf16: bool = False
    description: str = "CPU"
    # False for a target named on the command line (``validate --target``): the machine the config
    # is checked for is not this one, so what is installed here says nothing about it
    local: bool = True
    memory_gb: float | None = None  # of one GPU, when known (a named target)


def _gpu(name: str, capability: tuple[int, int], memory_gb: float) -> Hardware:
    return Hardware(
        cuda=True,
        cuda_bf16=capability >= (8, 0),
        cuda_fp8=capability >= (8, 9),
        description=f"{name} (target)",
        local=False,
        memory_gb=memory_gb,
    )


# Machines a config can be checked for without being on them (``validate --target NAME``): a
# generic CUDA GPU (bf16 and fp8 assumed, so only what no GPU can do is refused), a CPU, and named
# GPUs with their compute capability and memory.
TARGETS: dict[str, Hardware] = {
    "cpu": Hardware(description="CPU (target)", local=False),
    "cuda": Hardware(
        cuda=True, cuda_bf16=True, cuda_fp8=True, description="a CUDA GPU (target)", local=False
    ),
    "t4": _gpu("NVIDIA T4", (7, 5), 16),
    "v100-16gb": _gpu("NVIDIA V100 16GB", (7, 0), 16),
    "v100-32gb": _gpu("NVIDIA V100 32GB", (7, 0), 32),
    "a10g": _gpu("NVIDIA A10G", (8, 6), 24),
    "a100-40gb": _gpu("NVIDIA A100 40GB", (8, 0), 40),
    "a100-80gb": _gpu("NVIDIA A100 80GB", (8, 0), 80),
    "l4": _gpu("NVIDIA L4", (8, 9), 24),
    "l40s": _gpu("NVIDIA L40S", (8, 9), 48),
    "rtx-3090": _gpu("NVIDIA RTX 3090", (8, 6), 24),
    "rtx-4090": _gpu("NVIDIA RTX 4090", (8, 9), 24),
    "h100-80gb": _gpu("NVIDIA H100 80GB", (9, 0), 80),
    "h200-141gb": _gpu("NVIDIA H200 141GB", (9, 0), 141),
    "b200-180gb": _gpu("NVIDIA B200 180GB", (10, 0), 180),
}


class UnknownTarget(ValueError):
    """A ``--target`` name that is not in :data:`TARGETS`."""


def target_hardware(name: str) -> Hardware:
    """The :class:`Hardware` of a named target (case-insensitive); :class:`UnknownTarget` names
    the closest names and every known one otherwise."""
    key = name.strip().lower().replace("_", "-")
    if key in TARGETS:
        return TARGETS[key]
    close = difflib.get_close_matches(key, list(TARGETS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownTarget(f"unknown target {name!r}.{hint} Known targets: {', '.join(TARGETS)}.")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


# Device nodes whose presence means a GPU driver is loaded (only then is torch imported to ask):
# NVIDIA on Linux, WSL2's GPU paravirtualization (NVIDIA under Windows), AMD ROCm (torch.cuda too).
GPU_DRIVER_NODES = ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/dxg", "/dev/kfd")


def detect_hardware() -> Hardware:
    """Probe the machine without importing torch unless a GPU driver is present.

    Importing torch costs about a second; ``validate`` must answer faster than that on the common
    CPU-only development machine, so the CUDA query happens only when a driver node exists.
    """
    flags = _cpu_flags()
    cpu_bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    if any(os.path.exists(node) for node in GPU_DRIVER_NODES):
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return Hardware(
                cuda=True,
                cuda_bf16=torch.cuda.is_bf16_supported(),
                cuda_fp8=(major, minor) >= (8, 9),
                cpu_bf16=cpu_bf16,
                description=torch.cuda.get_device_name(),
            )
    return Hardware(cpu_bf16=cpu_bf16, description="CPU with bf16" if cpu_bf16 else "CPU")
