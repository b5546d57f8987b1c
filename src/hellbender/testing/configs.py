"""Resolved configs for tests and benchmarks that build a model by hand instead of loading one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hellbender.config.hardware import Hardware
from hellbender.config.normalize import normalize
from hellbender.config.schema import HellbenderConfig, ResolvedConfig
from hellbender.kernels.loss import build_loss


def resolved_config(**values: Any) -> ResolvedConfig:
    """``values`` as a user would write them, normalized for one CPU process (fp32 unless asked).

    Derived keys (``compute_dtype``, ...) may be given too: they replace what normalize derived,
    for tests of a later stage that need e.g. a bf16 model without a bf16 machine.
    """
    derived = set(ResolvedConfig.model_fields) - set(HellbenderConfig.model_fields)
    user = {k: v for k, v in values.items() if k not in derived}
    cfg = normalize(HellbenderConfig(**user), world_size=1, hardware=Hardware())[0]
    forced = {k: v for k, v in values.items() if k in derived}
    return ResolvedConfig.model_validate({**dict(cfg), **forced}) if forced else cfg


def loss_sum(
    model: nn.Module, model_inputs: Mapping[str, Any], labels: torch.Tensor, cfg: ResolvedConfig
) -> torch.Tensor:
    """The loss the training loop computes for ``cfg`` (its ``loss_method``), in one call."""
    return build_loss(cfg.loss_method, num_chunks=cfg.chunked_cross_entropy_num_chunks)(
        model, model_inputs, labels
    )
