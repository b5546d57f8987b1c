"""What the machine offers, as far as the config cares: CUDA, bf16, fp8.

The probe is its own module so that both :mod:`hellbender.config.normalize` (which resolves
``bf16: auto``) and :mod:`hellbender.config.rules` (which judges hardware-dependent options) can
take a :class:`Hardware` without importing each other. Tests pass a hand-made ``Hardware`` to
exercise every branch on a CPU machine.
"""

from __future__ import annotations

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
