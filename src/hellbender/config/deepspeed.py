"""The DeepSpeed JSON of a config (`deepspeed: path.json` or a mapping), read and completed.

Axolotl's bundled ``deepspeed_configs/zero*.json`` leave most values to ``"auto"``, which
HF Trainer fills from its own arguments. hellbender fills them from its resolved keys instead
(the table in docs/distributed.md), so one config file decides the batch, the clipping and the
precision, and DeepSpeed never disagrees with the loop about them:

* ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``train_batch_size`` and
  ``gradient_clipping`` come from ``micro_batch_size``, ``gradient_accumulation_steps``, their
  product with the data-parallel ranks, and ``max_grad_norm``. An explicit value that differs is
  an error (as in HF): the loop owns the batch, DeepSpeed only books it.
* ``bf16.enabled: "auto"`` is *false*: hellbender keeps fp32 master weights under its own bf16
  autocast, which is what makes N ranks compute one rank's update (DeepSpeed's bf16 mode keeps
  bf16 gradients, measured not to be exact across world sizes). An explicit ``true`` is honoured.
* ZeRO-3's bucket sizes follow the model's ``hidden_size`` as HF does.
* ``optimizer`` and ``scheduler`` blocks are not used: hellbender builds both from its keys
  (``optimizer``, ``learning_rate``, ``lr_scheduler``…) and hands the optimizer to DeepSpeed.

Nothing here imports DeepSpeed: the config rules use it to check a config without it installed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hellbender.config.schema import ResolvedConfig

AUTO = "auto"
# Keys whose explicit value must equal hellbender's: the batch and the clipping are the loop's.
MUST_AGREE = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
)
# ZeRO-3 sizes that HF (and so Axolotl's "auto") derive from the model's hidden size.
HIDDEN_SIZE_KEYS = (
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)
# DeepSpeed prints throughput every `steps_per_print` steps; hellbender logs its own.
QUIET_STEPS_PER_PRINT = 10**9


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed JSON cannot be read, or contradicts the hellbender config."""


@dataclass(frozen=True)
class LoopValues:
    """The hellbender values an ``"auto"`` is filled from."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    data_parallel_size: int
    max_grad_norm: float | None
    compute_dtype: str  # bfloat16 | float16 | float32
    hidden_size: int | None = None


def loop_values(cfg: ResolvedConfig, hidden_size: Any) -> LoopValues:
    """The values of ``cfg`` (and the model's ``hidden_size``, when known) that fill "auto"."""
    known = isinstance(hidden_size, int) and not isinstance(hidden_size, bool)
    return LoopValues(
        micro_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        data_parallel_size=cfg.data_parallel_size,
        max_grad_norm=cfg.max_grad_norm,
        compute_dtype=cfg.compute_dtype,
        hidden_size=hidden_size if known else None,
    )


@dataclass
class Completed:
    """The JSON DeepSpeed gets, and what was ignored on the way (for a warning)."""

    config: dict[str, Any]
    ignored: list[str] = field(default_factory=list)

    @property
    def stage(self) -> int:
        return zero_stage(self.config)


def read_deepspeed_config(value: str | dict[str, Any]) -> dict[str, Any]:
    """The mapping of ``deepspeed:`` (a path to a JSON file, relative to the working directory as
    in Axolotl, or the mapping itself)."""
    if isinstance(value, dict):
        return copy.deepcopy(value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise DeepSpeedConfigError(f"deepspeed: {value!r} is not a file")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeepSpeedConfigError(f"deepspeed: {value!r} is not readable JSON ({exc})") from exc
    if not isinstance(loaded, dict):
        raise DeepSpeedConfigError(
            f"deepspeed: {value!r} holds a JSON {type(loaded).__name__}, not an object"
        )
    return loaded


def zero_stage(config: dict[str, Any]) -> int:
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"deepspeed: zero_optimization.stage {stage!r} is not 0, 1, 2 or 3")
    return stage


def offloads(config: dict[str, Any]) -> list[str]:
    """The ``zero_optimization.offload_*`` blocks that move something to the CPU (or NVMe)."""
    zero = config.get("zero_optimization") or {}
    out = []
    for key in ("offload_optimizer", "offload_param"):
        block = zero.get(key) if isinstance(zero, dict) else None
        if isinstance(block, dict) and block.get("device") not in (None, "none"):
            out.append(f"zero_optimization.{key}")
    return out


def complete(raw: dict[str, Any], values: LoopValues) -> Completed:
    """``raw`` with every ``"auto"`` filled from ``values``; raises on a contradiction."""
    config = copy.deepcopy(raw)
    zero_stage(config)
    fills: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": values.micro_batch_size,
        "gradient_accumulation_steps": values.gradient_accumulation_steps,
        "train_batch_size": values.micro_batch_size
        * values.gradient_accumulation_steps
        * values.data_parallel_size,
        "gradient_clipping": float(values.max_grad_norm or 0.0),
        "fp16.enabled": values.compute_dtype == "float16",
        "bf16.enabled": False,  # hellbender's autocast over fp32 master weights (module docstring)
    }
    if values.hidden_size:
        size = values.hidden_size
        sizes = (size * size, int(0.9 * size * size), 10 * size)
        fills.update(zip(HIDDEN_SIZE_KEYS, sizes, strict=True))
    else:  # the model's width is not known (its config unreadable here): DeepSpeed's defaults
        for key in HIDDEN_SIZE_KEYS:
            if _get(config, key) == AUTO:
                _delete(config, key)
    problems = []
    for key, value in fills.items():
        current = _get(config, key)
        if current == AUTO or (current is None and key in MUST_AGREE):
            _set(config, key, value)
        elif key in MUST_AGREE and _differs(current, value):
            hellbender_key = {
                "train_micro_batch_size_per_gpu": "micro_batch_size",
                "gradient_accumulation_steps": "gradient_accumulation_steps",
                "train_batch_size": "batch_size (micro_batch_size × gradient_accumulation_steps × ranks)",
                "gradient_clipping": "max_grad_norm",
            }[key]
            problems.append(f"{key} is {current!r} but hellbender's {hellbender_key} gives {value!r}")
    for dtype, name in (("fp16", "float16"), ("bf16", "bfloat16")):
        if _get(config, f"{dtype}.enabled") is True and values.compute_dtype != name:
            problems.append(f"{dtype}.enabled is true but the run computes in {values.compute_dtype}")
    left = [
        key
        for key, value in _leaves(config)
        if value == AUTO and not key.startswith(("optimizer.", "scheduler."))
    ]
    if left:
        problems.append(f'no value to fill "auto" for {", ".join(left)}')
    if problems:
        raise DeepSpeedConfigError("deepspeed: " + "; ".join(problems))
    ignored: list[str] = [block for block in ("optimizer", "scheduler") if block in config]
    for block in ignored:
        del config[block]
    if offloads(config):
        # The optimizer is hellbender's (torch AdamW), handed to DeepSpeed; with ZeRO-Offload
        # DeepSpeed refuses a client optimizer unless told that this is intended.
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    config.setdefault("steps_per_print", QUIET_STEPS_PER_PRINT)
    return Completed(config, ignored)


def _differs(current: Any, value: Any) -> bool:
    if isinstance(value, float):
        return not isinstance(current, (int, float)) or float(current) != value
    return bool(current != value)


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _delete(config: dict[str, Any], dotted: str) -> None:
    *path, last = dotted.split(".")
    parent = _get(config, ".".join(path)) if path else config
    if isinstance(parent, dict):
        parent.pop(last, None)


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    node = config
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value


def _leaves(config: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
