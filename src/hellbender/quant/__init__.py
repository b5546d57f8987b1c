"""Quantized training: each feature built on the library made for it (torchao's float8 in
:mod:`hellbender.quant.fp8`), imported only when a config asks for it."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType


def import_torchao(name: str) -> ModuleType:
    """Import the torchao module ``name`` (ImportError when torchao is not installed).

    torchao's wheel ships CUDA-only kernel libraries (sm90 CUTLASS, MXFP8); without CUDA they cannot
    load, and torchao logs a warning per file on import. Expected there, so silenced on a machine
    without CUDA; with CUDA the warnings stay (they would mean a broken install).
    """
    import torch

    log = logging.getLogger("torchao")
    level = log.level
    if not torch.cuda.is_available():
        log.setLevel(logging.ERROR)
    try:
        return importlib.import_module(name)
    finally:
        log.setLevel(level)
