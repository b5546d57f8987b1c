"""Whether the Hugging Face hub may be reached: one answer for models and datasets alike.

transformers, datasets and huggingface_hub each read their own variable (``TRANSFORMERS_OFFLINE``,
``HF_DATASETS_OFFLINE``, ``HF_HUB_OFFLINE``). A user who sets any one of them means "no network";
answering that question differently for models and for data would load one offline and try the
network for the other. The environment is read at each call (huggingface_hub reads it once, at
import time, so a variable set later would otherwise be missed).
"""

from __future__ import annotations

import os

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """True when any of :data:`OFFLINE_VARIABLES` is set to a true value."""
    if any(os.environ.get(name, "").strip().lower() in _TRUE for name in OFFLINE_VARIABLES):
        return True
    try:
        from huggingface_hub import is_offline_mode
    except ImportError:  # pragma: no cover - huggingface_hub is a transformers dependency
        return False
    return bool(is_offline_mode())
