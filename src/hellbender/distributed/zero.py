"""DeepSpeed ZeRO (stages 0–3): the engine calls behind :class:`~hellbender.distributed.parallel.Parallel`.

The loop stays hellbender's: it deals the micro-batches, scales each rank's summed loss by
``world_size / trained tokens of the step``, and decides where a step ends. DeepSpeed holds the
model (``LossModule``: the loss runs inside the engine's forward, so ZeRO-3 gathers the head's
weight even for the chunked and fused losses, which read it directly), reduces and partitions
gradients and optimizer state, clips, and steps hellbender's own optimizer. How each call was
chosen, with the runs that prove it exact, is in docs/design/deepspeed/README.md; in short:

* the loop marks the last micro-batch of a step with ``set_gradient_accumulation_boundary``
  (DeepSpeed's own counter mistakes a short last step for an unfinished one);
* ``engine.backward(loss, scale_wrt_gas=False)``: the loss is already scaled by the loop
  (by default DeepSpeed would divide it by the accumulation steps once more);
* ``engine.step()`` clips (``gradient_clipping`` = ``max_grad_norm``) and, when the gradients are
  not finite, applies nothing (``was_step_applied()`` is false): the loop then stops with the
  weights of the step before, as it does in one process;
* the scheduler is not given to DeepSpeed: the loop steps and saves it as for every strategy.

The optimizer is hellbender's (``torch.optim.AdamW``): DeepSpeed's CPU Adam is a C++ op compiled on
first use (minutes on a small machine), and torch's is exact and supported by ZeRO.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from hellbender.distributed.world import World
from hellbender.errors import OptionError, UnavailableError

# A DeepSpeed checkpoint folder holds one tag: the checkpoint folder around it is the step.
TAG = "state"
# The files each rank writes for its partition of the optimizer state (one per data-parallel rank).
_OPTIMIZER_SHARDS = "*optim_states.pt"


def _deepspeed() -> Any:
    try:
        return importlib.import_module("deepspeed")
    except ImportError as exc:
        raise UnavailableError(
            "deepspeed: DeepSpeed is not installed: pip install 'hellbender[deepspeed]'"
        ) from exc


def start_engine(module: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
    """``deepspeed.initialize`` over the process group hellbender already runs (DeepSpeed adopts
    it), with hellbender's optimizer. Returns the engine."""
    deepspeed = _deepspeed()
    for name in ("DeepSpeed", "deepspeed"):  # its INFO lines would bury the run's own log
        logging.getLogger(name).setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls all_gather_into_tensor, which torch 2.13 deprecates: once per step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    _init_distributed_without_shm_op(deepspeed, backend)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    return engine


def _init_distributed_without_shm_op(deepspeed: Any, backend: str) -> None:
    """``deepspeed.init_distributed``, without the shared-memory all-reduce op it compiles on a
    machine without CUDA (~2 minutes of C++ on 2 cores; DeepSpeed uses it for inference only).

    The op's builder is a module function; it is swapped for a no-op for this call and put back.
    The module is taken from ``sys.modules`` through importlib: ``deepspeed.comm`` re-exports
    ``torch`` under the name ``torch``, so ``import deepspeed.comm.torch`` would name the wrong one.
    """
    comm: Any = importlib.import_module("deepspeed.comm.torch")
    builder = getattr(comm, "build_shm_op", None)
    if builder is None or torch.cuda.is_available():
        deepspeed.init_distributed(dist_backend=backend)
        return
    comm.build_shm_op = lambda: None
    try:
        deepspeed.init_distributed(dist_backend=backend)
    finally:
        comm.build_shm_op = builder


def optimizer_step(engine: Any) -> float:
    """Clip, apply and zero the step's gradients; the global gradient norm before clipping, or
    ``inf`` when the gradients were not finite and DeepSpeed applied nothing."""
    engine.step()
    if not engine.was_step_applied():
        return float("inf")
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def full_weights(
    engine: Any, model: torch.nn.Module, world: World, trainable_only: bool
) -> dict[str, torch.Tensor]:
    """Every weight (or the trainable ones) of ``model``, whole and on CPU, on rank 0; ``{}`` on
    the others. A collective under ZeRO-3 (each module's partitions are gathered in turn)."""
    if engine.zero_optimization_stage() == 3:
        gathered = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only)
        if gathered is None:
            return {}
        # Keys are the LossModule's: "model." + the model's own.
        return {_strip(key): value.detach().cpu() for key, value in gathered.items()}
    if not world.is_main:
        return {}
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    return {
        name: value.detach().cpu().clone()
        for name, value in model.state_dict().items()
        if not trainable_only or name in trainable
    }


def _strip(key: str) -> str:
    return key[len("model.") :] if key.startswith("model.") else key


def save(engine: Any, folder: Path, trainable_only: bool) -> None:
    """Every rank writes its partition of the weights and optimizer state into ``folder``
    (DeepSpeed's own format; a collective)."""
    engine.save_checkpoint(str(folder), tag=TAG, client_state={}, exclude_frozen_parameters=trainable_only)


def load(engine: Any, folder: Path, world: World, trainable_only: bool) -> None:
    """Load a checkpoint written by :func:`save` on as many ranks as this run has."""
    saved_ranks = len(list((folder / TAG).glob(_OPTIMIZER_SHARDS)))
    if saved_ranks and saved_ranks != world.size:
        raise OptionError(
            f"{folder.parent} was written by DeepSpeed on {saved_ranks} rank(s); this run has "
            f"{world.size}. DeepSpeed's checkpoints resume on the world size that wrote them: launch "
            f"{saved_ranks} processes (--nproc-per-node {saved_ranks}), or start a new run from its weights."
        )
    try:
        path, _ = engine.load_checkpoint(
            str(folder),
            tag=TAG,
            load_module_strict=not trainable_only,  # an adapter's checkpoint holds no frozen base
            load_optimizer_states=True,
            load_lr_scheduler_states=False,  # the loop's scheduler is saved beside, as for every strategy
        )
    except Exception as exc:  # DeepSpeed raises assorted types for a checkpoint of another layout
        raise OptionError(
            f"{folder.parent}: DeepSpeed could not load this checkpoint with this run's deepspeed "
            f"config ({' '.join(str(exc).split())[:300]}); resume with the config that wrote it"
        ) from exc
    if path is None:
        raise OptionError(f"{folder} holds no DeepSpeed checkpoint tagged {TAG!r}")
