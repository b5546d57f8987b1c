"""Design sketch (not wired into hellbender): the DeepSpeed branch of ``Parallel``.

Every call below was exercised by ``proto.py`` (see FINDINGS.md for the runs and numbers). The
shape follows /work/main/src/hellbender/distributed/parallel.py as of this session: the ranks run
``LossModule(model, loss_sum)``; the loop calls ``gradient_sync(last)``, backward, the norm /
clip / step, ``full_weights``; checkpoints gather whole state dicts keyed by name.

What the loop must change (strategy-neutral, so it still never branches on the name):

1. ``Parallel.prepare(optimizer, scheduler)`` after ``build_optimizer``/``build_scheduler``:
   identity for single/ddp/fsdp2; for DeepSpeed it calls ``deepspeed.initialize`` (DeepSpeed
   needs the optimizer at wrap time, the others before it).
2. ``Parallel.backward(loss)`` instead of ``loss.backward()`` (DeepSpeed: engine.backward with
   scale_wrt_gas=False; a direct backward is divided by the config's GAS in 0.19).
3. ``Parallel.optimizer_step(optimizer, params, max_grad_norm) -> float`` replaces the body of
   ``_optimizer_step`` (norm, stop-if-non-finite, clip, step, zero_grad). DeepSpeed clips and
   checks inside ``engine.step()`` and skips a non-finite step itself, so the returned norm is
   inf exactly when nothing was applied; the loop stops on a non-finite return as today.
4. No ``torch.amp.GradScaler`` with DeepSpeed (fp16 brings DeepSpeed's own loss scaler).
5. ``Forward``/``autocast_for`` decided after ``prepare`` (DeepSpeed bf16 mode casts the module).
"""

from __future__ import annotations

import contextlib
import math
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch


def init_deepspeed_comm() -> None:
    """Join DeepSpeed's comm layer to the process group hellbender already made (World /
    process_group did init_process_group("gloo"/"nccl")): init_distributed adopts it.

    The CPU accelerator JIT-builds an shm all-reduce op (~2 min, only used for inference) in
    init_distributed; skip it. Patch through sys.modules: deepspeed.comm re-exports ``torch``,
    so ``import deepspeed.comm.torch as m`` would be the real torch.
    """
    import deepspeed

    if not torch.cuda.is_available():
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def deepspeed_config(raw: dict[str, Any], cfg: Any, hidden_size: int | None) -> dict[str, Any]:
    """The user's JSON with every "auto" filled from hellbender's resolved keys (see
    ds_config.resolve and FINDINGS §9); contradicting explicit values are an error."""
    from ds_config import Keys, resolve  # prototype in /tmp/ds

    keys = Keys(
        micro_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        data_parallel_size=cfg.data_parallel_size,
        max_grad_norm=cfg.max_grad_norm,
        compute_dtype=cfg.compute_dtype,
        learning_rate=cfg.learning_rate,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        hidden_size=hidden_size,
        total_steps=0,
        warmup_steps=0,
    )
    config, notes = resolve(raw, keys)
    if notes:
        raise ValueError("; ".join(notes))
    return config


@dataclass
class DeepSpeedParallel:
    """What ``Parallel`` does for strategy "deepspeed" (ZeRO 1/2/3)."""

    world: Any
    model: torch.nn.Module  # the model itself (peft / transformers API)
    loss_module: torch.nn.Module  # LossModule(model, loss_sum): the engine wraps THIS
    config: dict[str, Any]
    engine: Any = None
    trainable_only: bool = False
    _prefix: str = field(default="model.", init=False)  # LossModule's attribute name
    _group_names: list[list[str]] = field(default_factory=list, init=False)

    # -- setup ---------------------------------------------------------------------------
    def prepare(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> torch.optim.Optimizer:
        """deepspeed.initialize with hellbender's own optimizer; the scheduler stays the loop's
        (it steps and saves it itself, exactly as for the other strategies)."""
        import deepspeed

        names = {id(p): n for n, p in self.model.named_parameters()}
        # ZeRO replaces each group's params by flat partitions: remember the names first
        self._group_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.loss_module, optimizer=optimizer, config=self.config
        )
        return optimizer  # the LambdaLR built on it keeps driving the lr (same group dicts)

    @property
    def stage(self) -> int:
        return int(self.engine.zero_optimization_stage())

    # -- one step --------------------------------------------------------------------------
    def loss_sum(self, batch: Any) -> torch.Tensor:
        """Inside engine.forward: ZeRO-3 gathers lm_head.weight for chunked/fused losses."""
        loss: torch.Tensor = self.engine(batch)
        return loss

    def gradient_sync(self, enabled: bool) -> AbstractContextManager[Any]:
        """DeepSpeed has no no_sync under ZeRO-2/3; instead the boundary flag says whether this
        backward ends the step (ZeRO-1 reduces then; 2/3 reduce-scatter every backward)."""
        self.engine.set_gradient_accumulation_boundary(enabled)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already scaled W / n_step

    def optimizer_step(self, optimizer: Any, params: Any, max_grad_norm: float | None) -> float:
        """Clip (config gradient_clipping), step, zero grads; pre-clip global norm, inf when
        the gradients were not finite — then DeepSpeed applied nothing (weights, Adam state and
        the scheduler untouched), so the loop can stop 'before the update'."""
        self.engine.step()
        if not self.engine.was_step_applied():
            return math.inf
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    # -- whole state, for checkpoints and the final save ------------------------------------
    def full_weights(self, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        """Rank 0: every (trainable) weight, whole, on CPU, fp32 master values; {} elsewhere."""
        if self.stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only)
            if sd is None:
                return {}
            n = len(self._prefix)
            return {k[n:] if k.startswith(self._prefix) else k: v for k, v in sd.items()}
        if not self.world.is_main:
            return {}
        return {
            name: p.detach().cpu().clone()
            for name, p in self.model.named_parameters()
            if p.requires_grad or not trainable_only
        }

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The FULL_STATE_DICT optimizer format keyed by parameter name (a collective)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        self._relink_optimizer_views()
        steps = {float(s["step"]) for s in self.engine.basic_optimizer.state.values() if "step" in s}
        step = steps.pop() if steps else 0.0
        state: dict[str, Any] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                entry = {k: safe_get_full_optimizer_state(p, k).cpu() for k in ("exp_avg", "exp_avg_sq")}
                state[name] = {"step": torch.tensor(step), **entry}
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": names}
            for g, names in zip(optimizer.param_groups, self._group_names, strict=True)
        ]
        return {"state": state, "param_groups": groups} if self.world.is_main else {}

    def load_optimizer_state(
        self, optimizer: torch.optim.Optimizer, state: dict[str, Any], batch: Any
    ) -> None:
        """Any stage / world size. Weights were loaded into the model before prepare()."""
        from deepspeed.utils import safe_set_full_optimizer_state

        rates = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:  # one step at lr 0 on a zero loss creates Adam's state
            g["lr"] = 0.0
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.backward(self.engine(batch) * 0.0, scale_wrt_gas=False)
        self.engine.step()
        for g, rate in zip(optimizer.param_groups, rates, strict=True):
            g["lr"] = rate
        self._relink_optimizer_views()
        step = None
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                saved = state["state"][name]
                step = float(saved["step"])
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(p, saved[key], key)
        for s in self.engine.basic_optimizer.state.values():
            s["step"].fill_(step)
        # then the loop restores the scheduler AND writes get_last_lr() back into the groups

    def _relink_optimizer_views(self) -> None:
        """DeepSpeed 0.19.8 ZeRO-1/2 bug with >1 param group: views of the second group's Adam
        state stay empty (linked after the first group's step). Relink (private API)."""
        opt = self.engine.optimizer
        if self.stage < 3 and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()
