"""``hellbender plan --fit BUDGET``: the cheapest change of a config that fits a memory budget.

The search keeps the global batch (micro-batch × accumulation × data-parallel ranks) and what is
learned (data, learning rate, adapter, precision). It combines the memory options that cost only
time, each with a slowdown factor taken from the measured step times of docs/optimizations.md
(SmolLM2-135M, seq 1024–2048, this CPU class):

==============================  =========  ===================================================
change                          factor     measured step-time ratio it rounds
==============================  =========  ===================================================
chunked loss                    1.00       0.92–0.97
selective checkpointing         1.00       0.87–0.93
full checkpointing              1.15       1.06–1.16
TiledMLP                        1.05       0.95–1.09
disk activation offloading      1.20       1.15–1.17 (with checkpointing)
8-bit optimizer state (GPU)     1.05       (an extra quantize per step; CPU: not proposed)
micro-batch halved (×2 accum.)  1.05       per halving: smaller matmuls, more loop overhead
FSDP2 sharding (several ranks)  1.10       one all-gather and reduce-scatter per layer
==============================  =========  ===================================================

Every combination is predicted (a few hundred, each a formula: milliseconds in all), and the one
with the least total factor that fits wins; ties go to the smaller peak. A change that alters what
is learned — LoRA on a 4-bit base (QLoRA) — is only tried with ``allow_quantized_base``, and is
always reported as such.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from hellbender.config.schema import ResolvedConfig
from hellbender.plan.estimate import Plan, predict
from hellbender.plan.shapes import ModelShape

# bitsandbytes' block-wise 8-bit AdamW (CPU and CUDA); torchao's is warned about with trained
# embeddings (HB194), which a full fine-tune has.
EIGHT_BIT = {"cpu": "adamw_8bit", "cuda": "adamw_8bit"}


@dataclass(frozen=True)
class Fit:
    """The chosen change (config keys → new values), its slowdown factor and its prediction."""

    changes: dict[str, Any]
    factor: float
    plan: Plan
    changes_learning: bool = False


def _divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _candidates(
    cfg: ResolvedConfig, target: str, world: int, allow_quantized_base: bool
) -> list[tuple[dict[str, Any], float, bool]]:
    """(changes, factor, changes what is learned) for every combination of the options."""
    per_rank = cfg.micro_batch_size * cfg.gradient_accumulation_steps
    micro = [m for m in _divisors(per_rank) if m <= cfg.micro_batch_size]
    checkpointing: list[tuple[Any, float]] = [(cfg.gradient_checkpointing, 1.0)]
    if not cfg.gradient_checkpointing:
        checkpointing += [("selective", 1.0), (True, 1.15)]
    elif cfg.gradient_checkpointing == "selective":
        checkpointing += [(True, 1.15)]
    loss: list[tuple[bool, float]] = [(False, 1.0)]
    if cfg.loss_method == "plain":
        loss.append((True, 1.0))
    tiled: list[tuple[bool, float]] = [(cfg.tiled_mlp, 1.0)] + ([(True, 1.05)] if not cfg.tiled_mlp else [])
    offload: list[tuple[Any, float]] = [(cfg.activation_offloading, 1.0)]
    if cfg.activation_offloading != "disk":
        offload.append(("disk", 1.2))
    eight_bit = EIGHT_BIT["cpu" if target == "cpu" else "cuda"]
    optim: list[tuple[str, float]] = [(cfg.optimizer, 1.0)]
    # Not on a CPU: bitsandbytes' CPU update took 51 s against AdamW's 6.6 s for SmolLM2-135M
    # (bench/memory.py --optimizers), and a fitted run with it measured 26% over its prediction.
    if target != "cpu" and cfg.optimizer in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"):
        optim.append((eight_bit, 1.05))
    shard: list[tuple[bool, float]] = [(False, 1.0)]
    if world > 1 and cfg.distributed_strategy == "ddp":
        shard.append((True, 1.1))
    quantize: list[tuple[bool, float]] = [(False, 1.0)]
    if allow_quantized_base and cfg.adapter == "lora" and not cfg.load_in_4bit and not cfg.load_in_8bit:
        quantize.append((True, 1.1))

    out = []
    for mb, (ck, f_ck), (ch, f_ch), (tl, f_tl), (off, f_off), (opt, f_opt), (sh, f_sh), (
        q,
        f_q,
    ) in itertools.product(micro, checkpointing, loss, tiled, offload, optim, shard, quantize):
        if off == "disk" and ck is not True:
            continue  # offloading moves what full checkpointing keeps (rule HB108; selective: see estimate)
        changes: dict[str, Any] = {}
        factor = f_ck * f_ch * f_tl * f_off * f_opt * f_sh * f_q
        if mb != cfg.micro_batch_size:
            changes["micro_batch_size"] = mb
            changes["gradient_accumulation_steps"] = per_rank // mb
            halvings = 0
            while (cfg.micro_batch_size >> (halvings + 1)) >= mb:
                halvings += 1
            factor *= 1.05 ** max(1, halvings)
        if ck != cfg.gradient_checkpointing:
            changes["gradient_checkpointing"] = ck
        if ch:
            changes["chunked_cross_entropy"] = True
        if tl != cfg.tiled_mlp:
            changes["tiled_mlp"] = tl
        if off != cfg.activation_offloading:
            changes["activation_offloading"] = off
        if opt != cfg.optimizer:
            changes["optimizer"] = opt
        if sh:
            changes["fsdp_version"] = 2
            changes["fsdp_config"] = {"reshard_after_forward": True}
        if q:
            changes["adapter"] = "qlora"
            changes["load_in_4bit"] = True
        out.append((changes, factor, q))
    return out


def resolved_with(cfg: ResolvedConfig, changes: dict[str, Any]) -> ResolvedConfig:
    """``cfg`` with the changes applied to the keys the planner reads (a full re-validation of the
    winner happens in the command, through the ordinary config loader)."""
    update = {
        k: v for k, v in changes.items() if k in ResolvedConfig.model_fields and k not in ("fsdp_config",)
    }
    if changes.get("chunked_cross_entropy"):
        update["loss_method"] = "chunked"
    if changes.get("tiled_mlp"):
        update["loss_method"] = "chunked"  # TiledMLP switches the loss to the chunked one
    if "fsdp_version" in changes:
        update["distributed_strategy"] = "fsdp2"
    return cfg.model_copy(update=update)


def fit(
    shape: ModelShape,
    cfg: ResolvedConfig,
    budget_bytes: int,
    *,
    target: str = "cpu",
    allow_quantized_base: bool = False,
) -> Fit | None:
    """The cheapest change that brings the predicted peak under ``budget_bytes``, or None."""
    best: Fit | None = None
    for changes, factor, learning in _candidates(cfg, target, cfg.world_size, allow_quantized_base):
        plan = predict(shape, resolved_with(cfg, changes), target=target)
        if plan.peak_bytes > budget_bytes:
            continue
        key = (round(factor, 6), len(changes), plan.peak_bytes)
        if best is None or key < (round(best.factor, 6), len(best.changes), best.plan.peak_bytes):
            best = Fit(changes, factor, plan, learning)
    return best
