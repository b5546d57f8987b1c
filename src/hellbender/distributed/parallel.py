"""How the model is spread over the ranks: DDP replicates it, FSDP2 shards it.

:func:`wrap_model` returns a :class:`Parallel`, the one object through which the training loop and
the checkpoint code reach the strategy; neither branches on the strategy's name.

* ``single``: one process; every method is the plain PyTorch one.
* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` (Axolotl's ``ddp_*`` keys). Gradients are
  averaged over the ranks in the backward of the last micro-batch of a step (``no_sync`` before).
* ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on every transformer block (the model's
  ``_no_split_modules``, or ``fsdp_config.transformer_layer_cls_to_wrap``) and on the root.
  Parameters, gradients and optimizer states are sharded over the ranks (1/N each); a block's
  full weights exist only while it runs. Gradients are reduce-scattered (averaged) like DDP's.
* ``deepspeed``: DeepSpeed ZeRO stage 0–3 (the ``deepspeed:`` JSON, its ``"auto"`` values filled by
  :mod:`hellbender.config.deepspeed`): the engine wraps the model with its loss and steps
  hellbender's optimizer (:mod:`hellbender.distributed.zero`). The engine needs the optimizer, so
  it starts in :meth:`Parallel.prepare`, once the optimizer is built.

Both engines *average* gradients over the ranks; the loop's token-exact loss scales each rank by
the world size (see :mod:`hellbender.train.loop`), so N ranks compute one rank's update.

Checkpoints. By default weights and optimizer state cross the strategy boundary as *full* state
dicts keyed by parameter name (``torch.distributed.checkpoint.state_dict``): gathered to rank 0's
CPU to save; to load, every rank reads the whole files (weights before the model is sharded,
optimizer state after). So a checkpoint is the same files whatever the strategy and world size
that wrote it. FSDP2 with ``fsdp_config.state_dict_type: SHARDED_STATE_DICT`` instead has every
rank write its own shards (``torch.distributed.checkpoint``, folder :data:`SHARDED_DIR`): nothing
is gathered, and loading reshards to the world size that resumes. Either way a run can resume on
another world size, and checkpoints sit on a filesystem every rank can read. DeepSpeed writes its
own checkpoint (every rank its partition, folder :data:`DEEPSPEED_DIR`), which resumes on the
same number of ranks only; a resume on another number is refused before anything is loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hellbender.config.deepspeed import DeepSpeedConfigError, complete, loop_values, read_deepspeed_config
from hellbender.config.schema import ResolvedConfig
from hellbender.distributed import zero
from hellbender.distributed.world import World
from hellbender.errors import OptionError

# Inside a checkpoint folder: the shards of the weights and optimizer state, one file per rank
# (torch.distributed.checkpoint's format), when the run checkpoints sharded.
SHARDED_DIR = "sharded"
# The optimizer state of a checkpoint with whole state dicts (hellbender.train.checkpoint writes it).
OPTIMIZER_FILE = "optimizer.pt"
# Inside a checkpoint folder: DeepSpeed's own checkpoint (weights and optimizer partitions, per rank).
DEEPSPEED_DIR = "deepspeed"


@dataclass
class Parallel:
    """The model as the ranks share it, and the operations that depend on how."""

    world: World
    strategy: str  # single | ddp | fsdp2 | deepspeed
    model: torch.nn.Module  # the model itself (peft / transformers API: save_pretrained, config)
    module: torch.nn.Module  # the loss of a batch (LossModule), as DDP, FSDP2 or DeepSpeed wrap it
    sharded_checkpoints: bool = False  # every rank writes its shards (FSDP2 SHARDED_STATE_DICT, DeepSpeed)
    trainable_only: bool = False  # checkpoints hold the trainable weights only (an adapter)
    deepspeed_config: dict[str, Any] | None = None  # the completed JSON the engine starts from
    engine: Any = None  # DeepSpeed's engine, once prepare() started it

    def prepare(self, optimizer: torch.optim.Optimizer) -> None:
        """Hand the built optimizer to the strategy. DeepSpeed starts its engine here (it needs
        the optimizer to partition its state); from then on the engine is the module the ranks
        run. The other strategies wrapped the model before the optimizer was built."""
        if self.strategy == "deepspeed" and self.engine is None:
            assert self.deepspeed_config is not None
            self.engine = zero.start_engine(self.module, optimizer, self.deepspeed_config)
            self.module = self.engine

    @property
    def steps_itself(self) -> bool:
        """The engine clips and applies the update (:meth:`optimizer_step`) instead of the loop."""
        return self.strategy == "deepspeed"

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a micro-batch's (already scaled) loss."""
        if self.engine is not None:
            self.engine.backward(loss, scale_wrt_gas=False)  # no second division by accumulation
        else:
            loss.backward()

    def optimizer_step(self) -> float:
        """For a strategy that :attr:`steps_itself`: clip, apply and zero the gradients; the norm
        before clipping, ``inf`` if they were not finite (then nothing was applied)."""
        return zero.optimizer_step(self.engine)

    def loss_sum(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The summed loss of ``batch``, computed through the strategy's wrapper (see
        :class:`LossModule`)."""
        loss: torch.Tensor = self.module(batch)
        return loss

    def gradient_sync(self, enabled: bool) -> AbstractContextManager[Any]:
        """Average gradients over the ranks in this backward (``enabled``) or keep them local
        (the earlier micro-batches of an accumulated step: one all-reduce per step, not per
        micro-batch; the sum is the same)."""
        if self.engine is not None:
            # ZeRO-2/3 reduce in every backward; the boundary tells DeepSpeed where the step ends.
            self.engine.set_gradient_accumulation_boundary(enabled)
            return contextlib.nullcontext()
        if enabled or self.strategy == "single":
            return contextlib.nullcontext()
        if self.strategy == "ddp":
            ddp: Any = self.module  # DistributedDataParallel: no_sync is its own API
            context: AbstractContextManager[Any] = ddp.no_sync()
            return context
        return _fsdp_no_sync(self.module)

    def grad_norm(self, params: list[torch.nn.Parameter]) -> tuple[torch.Tensor, float]:
        """The global gradient norm: as the tensor clipping takes (FSDP2: a DTensor over the
        shards) and as a number (the same on every rank)."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        full = getattr(norm, "full_tensor", None)
        return norm, float(full() if callable(full) else norm)

    def full_weights(self, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        """Every weight (or only the trainable ones) by name, whole, on rank 0's CPU; ``{}`` on
        the other ranks; None in one process (the model's own tensors are already whole). A
        collective: every rank calls it."""
        if self.strategy == "single":
            return None
        if self.engine is not None:
            gathered = zero.full_weights(self.engine, self.model, self.world, trainable_only)
            return _without_tied_copies(self.model, gathered)
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.model, options=self._options(trainable_only))
        tensors = {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}
        return _without_tied_copies(self.model, tensors)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state to save: in one process ``optimizer.state_dict()``; spread over
        ranks, whole and keyed by parameter name on rank 0 ({} elsewhere). A collective."""
        if self.strategy == "single":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return dict(get_optimizer_state_dict(self.model, optimizer, options=self._options(True)))

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a saved optimizer state, whichever world size wrote it: keyed by parameter name
        (a run spread over ranks) or by position (one process; mapped to names through this
        optimizer, built the same way). Every rank passes the whole state."""
        named = any(isinstance(k, str) for k in state.get("state", {})) or any(
            isinstance(p, str) for g in state.get("param_groups", []) for p in g.get("params", [])
        )
        if not named and self.strategy != "fsdp2":
            optimizer.load_state_dict(state)  # the same plain tensors in the same order
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if not named:
            state = _by_name(self.model, optimizer, state)
        set_optimizer_state_dict(self.model, optimizer, state, options=self._options(True, load=True))

    def shards_checkpoint(self, with_optimizer: bool) -> bool:
        """Whether a checkpoint (with or without the optimizer state) is written by every rank
        (:meth:`write_sharded`) rather than gathered whole. DeepSpeed's format always holds the
        optimizer state; a weights-only checkpoint is gathered instead."""
        return self.sharded_checkpoints and (with_optimizer or self.engine is None)

    def write_sharded(self, optimizer: torch.optim.Optimizer | None, checkpoint: Path) -> None:
        """Every rank writes its shards of the weights (and of the optimizer state) into the
        ``checkpoint`` folder being written. A collective: every rank calls it with the same folder."""
        if self.engine is not None:
            zero.save(self.engine, checkpoint / DEEPSPEED_DIR, self.trainable_only)
            return
        from torch.distributed.checkpoint.state_dict_saver import save

        save(self._sharded_state(optimizer), checkpoint_id=str(checkpoint / SHARDED_DIR))

    def restore(self, optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
        """Load the optimizer state of ``checkpoint`` (and, from a sharded checkpoint, the weights
        too; whole weights were loaded into the model before it was spread over the ranks)."""
        if (checkpoint / DEEPSPEED_DIR).is_dir() or self.engine is not None:
            self._restore_deepspeed(checkpoint)
            return
        sharded = checkpoint / SHARDED_DIR
        if not sharded.is_dir():
            state = torch.load(checkpoint / OPTIMIZER_FILE, weights_only=True)
            self.load_optimizer_state(optimizer, state)
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        from torch.distributed.checkpoint.state_dict_loader import load

        _initialize_state(optimizer)  # an empty optimizer state has no tensors to load into
        state = self._sharded_state(optimizer)
        load(state, checkpoint_id=str(sharded))  # reads the slices this rank holds, any world size
        options = self._sharded_options()
        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, optimizer, state["optim"], options=options)

    def _restore_deepspeed(self, checkpoint: Path) -> None:
        folder = checkpoint / DEEPSPEED_DIR
        if self.engine is None:
            raise OptionError(
                f"{checkpoint} was written by DeepSpeed, and resumes only under DeepSpeed (the same "
                f"deepspeed config and number of ranks); this run is {self.strategy}. Start a new run "
                "from its weights instead (hellbender writes them at the end of a run)."
            )
        if not folder.is_dir():
            raise OptionError(
                f"{checkpoint} was not written by DeepSpeed ({self._writer(checkpoint)}); a DeepSpeed run "
                "resumes from its own checkpoints only. Resume it with the strategy that wrote it."
            )
        zero.load(self.engine, folder, self.world, self.trainable_only)

    @staticmethod
    def _writer(checkpoint: Path) -> str:
        return "sharded by FSDP2" if (checkpoint / SHARDED_DIR).is_dir() else "whole state dicts"

    def _sharded_state(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        options = self._sharded_options()
        state: dict[str, Any] = {"model": get_model_state_dict(self.model, options=options)}
        if optimizer is not None:
            state["optim"] = get_optimizer_state_dict(self.model, optimizer, options=options)
        return state

    def _sharded_options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=self.trainable_only, strict=not self.trainable_only)

    def _options(self, trainable_only: bool, load: bool = False) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(
            full_state_dict=True,
            cpu_offload=not load,  # gather to rank 0's CPU, not to every rank's accelerator
            ignore_frozen_params=trainable_only,
            strict=not trainable_only,
        )


def _without_tied_copies(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` without the second name of a tied parameter (``lm_head.weight`` when the head
    shares the embedding): gathered, the two names hold two equal tensors, which
    ``save_pretrained`` would write twice; a one-process run writes the first name only."""
    first: dict[int, str] = {}
    copies = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            copies.add(name)
        else:
            first[id(param)] = name
    return {name: value for name, value in weights.items() if name not in copies}


def _initialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Give an optimizer that never stepped its state tensors (Adam's moments, its step count), so
    a sharded load has tensors to read into: one step on zero gradients at learning rate 0, which
    changes no weight. The loaded state then replaces every value."""
    if optimizer.state:
        return
    rates = [group["lr"] for group in optimizer.param_groups]
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    for param in params:
        param.grad = torch.zeros_like(param)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    optimizer.zero_grad(set_to_none=True)


def _by_name(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> dict[str, Any]:
    """A position-keyed optimizer state (``optimizer.state_dict()``) keyed by parameter name.

    Positions count the parameters of ``optimizer``'s groups in order; an optimizer built by the
    same code over the same model has them in the same order, sharded or not.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {ordered[int(i)]: v for i, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [ordered[int(i)] for i in g["params"]]} for g in state["param_groups"]
        ],
    }


def _fsdp_no_sync(module: torch.nn.Module) -> AbstractContextManager[Any]:
    @contextlib.contextmanager
    def no_sync() -> Iterator[None]:
        fsdp: Any = module  # FSDPModule: set_requires_gradient_sync is its own API
        fsdp.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            fsdp.set_requires_gradient_sync(True)

    return no_sync()


class LossModule(torch.nn.Module):
    """The model and its loss as one module: ``forward(batch)`` is the summed loss of ``batch``.

    This is what DDP wraps and what FSDP2 shards as its root. The chunked and fused losses do not
    call the model's forward: they run its decoder and then its head in pieces. A forward that
    bypasses the wrapper would skip DDP's gradient-sync bookkeeping (gradients silently not
    averaged) and FSDP2's gathering of the root's parameters (embeddings, final norm, head).
    Inside this module's forward, every such call is covered.
    """

    def __init__(self, model: torch.nn.Module, loss_sum: Callable[[torch.nn.Module, Mapping[str, Any]], Any]):
        super().__init__()
        self.model = model
        self._loss_sum = loss_sum

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        loss: torch.Tensor = self._loss_sum(self.model, batch)
        return loss


def wrap_model(
    model: torch.nn.Module,
    cfg: ResolvedConfig,
    world: World,
    device: torch.device,
    loss_sum: Callable[[torch.nn.Module, Mapping[str, Any]], Any],
) -> Parallel:
    """Spread ``model`` (on ``device``, adapters and kernels applied) over the ranks as
    ``cfg.distributed_strategy`` says, with ``loss_sum(model, batch)`` as the computation the
    ranks run (see :class:`LossModule`). Before the optimizer is built: FSDP2 replaces the
    parameters by sharded ones."""
    strategy = cfg.distributed_strategy if world.distributed else "single"
    trainable_only = hasattr(model, "peft_config")  # an adapter: its frozen base is not saved
    loss_module = LossModule(model, loss_sum)
    if strategy == "single":
        return Parallel(world, "single", model, loss_module, trainable_only=trainable_only)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp_options: dict[str, Any] = {}
        if cfg.ddp_find_unused_parameters is not None:
            ddp_options["find_unused_parameters"] = cfg.ddp_find_unused_parameters
        if cfg.ddp_bucket_cap_mb is not None:
            ddp_options["bucket_cap_mb"] = cfg.ddp_bucket_cap_mb
        if cfg.ddp_broadcast_buffers is not None:
            ddp_options["broadcast_buffers"] = cfg.ddp_broadcast_buffers
        ids = [device.index] if device.type == "cuda" else None
        wrapped = DistributedDataParallel(loss_module, device_ids=ids, **ddp_options)
        return Parallel(world, "ddp", model, wrapped, trainable_only=trainable_only)
    if strategy == "fsdp2":
        whole = _rank0_weights(model, world) if loads_on_rank0_only(cfg) else None
        _fully_shard(model, loss_module, cfg)  # shards stay on the device the parameters are on
        if whole is not None:
            _shards_from_rank0(model, whole, device)
        sharded = cfg.fsdp_config is not None and cfg.fsdp_config.state_dict_type == "SHARDED_STATE_DICT"
        return Parallel(world, "fsdp2", model, loss_module, sharded, trainable_only)
    if strategy == "deepspeed":
        config = deepspeed_config(cfg, model)
        return Parallel(world, "deepspeed", model, loss_module, True, trainable_only, deepspeed_config=config)
    raise OptionError(f"distributed strategy {strategy!r} is not available in this release")


def loads_on_rank0_only(cfg: ResolvedConfig) -> bool:
    """``fsdp_config.cpu_ram_efficient_loading``: rank 0 alone reads the weights; the other ranks
    build the model on the meta device and receive their shards once it is sharded, so a machine
    holds one whole copy of the model at start, not one per rank. A 4/8-bit base is quantized
    while it loads, which needs real weights: every rank loads its own then (rule HB170 says so)."""
    fsdp = cfg.fsdp_config
    quantized = cfg.load_in_4bit or cfg.load_in_8bit
    efficient = fsdp is not None and fsdp.cpu_ram_efficient_loading
    return cfg.distributed_strategy == "fsdp2" and efficient and not quantized


def _rank0_weights(model: torch.nn.Module, world: World) -> dict[str, Any]:
    """Rank 0's whole weights, taken before sharding replaces its parameters; ``{}`` elsewhere."""
    return dict(model.state_dict()) if world.is_main else {}


def _shards_from_rank0(model: torch.nn.Module, whole: dict[str, Any], device: torch.device) -> None:
    """Give every rank its shards of rank 0's weights (a collective). The other ranks' model was
    built on the meta device: its storage is allocated here, then filled by broadcast from rank 0
    (each rank keeps its slices); buffers, which FSDP2 does not shard, come whole from rank 0 too
    (rotary frequencies and other buffers outside the state dict included)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, whole, options=options)
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=0)


def deepspeed_config(cfg: ResolvedConfig, model: torch.nn.Module) -> dict[str, Any]:
    """The ``deepspeed:`` JSON with its ``"auto"`` values filled from ``cfg`` and the model."""
    assert cfg.deepspeed is not None
    values = loop_values(cfg, getattr(getattr(model, "config", None), "hidden_size", None))
    try:
        return complete(read_deepspeed_config(cfg.deepspeed), values).config
    except DeepSpeedConfigError as exc:  # the config rules report it before a run; kept for API users
        raise OptionError(str(exc)) from exc


def block_classes(model: torch.nn.Module, cfg: ResolvedConfig) -> set[str]:
    """Class names of the modules FSDP2 shards one by one: the transformer blocks."""
    fsdp = cfg.fsdp_config
    if fsdp is not None and fsdp.transformer_layer_cls_to_wrap:
        return set(fsdp.transformer_layer_cls_to_wrap)
    for module in model.modules():  # the transformers model inside any peft wrapper
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def _fully_shard(model: torch.nn.Module, root: torch.nn.Module, cfg: ResolvedConfig) -> None:
    """Shard ``model``'s blocks one by one, and what is left (embeddings, norm, head) as part of
    ``root``, the module whose forward runs them all."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    fsdp = cfg.fsdp_config
    reshard = fsdp.reshard_after_forward if fsdp is not None else True
    offload: OffloadPolicy = OffloadPolicy()
    if fsdp is not None and fsdp.offload_params:
        # Pinned host memory needs an accelerator; on a CPU-only machine it fails.
        offload = CPUOffloadPolicy(pin_memory=fsdp.cpu_offload_pin_memory and torch.cuda.is_available())
    mixed = _mixed_precision(cfg)
    blocks = _blocks_to_shard(model, cfg)
    options: dict[str, Any] = {"offload_policy": offload}
    quantized = _quantized_parameters(model)
    if quantized:
        # A 4/8-bit bitsandbytes weight carries its quantization state beside its packed bytes;
        # FSDP2 would shard the bytes and gather them back as a plain tensor without that state.
        # Such weights are frozen (no gradient, no optimizer state): every rank keeps them whole,
        # as DDP would, and FSDP2 shards the rest (the adapters, norms, embeddings).
        options["ignored_params"] = quantized
    if mixed is not None:
        options["mp_policy"] = mixed
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard, **options)
    fully_shard(root, reshard_after_forward=reshard, **options)


def _quantized_parameters(model: torch.nn.Module) -> set[torch.nn.Parameter]:
    """The bitsandbytes-quantized weights of ``model`` (QLoRA's 4-bit base, an 8-bit base)."""
    return {p for p in model.parameters() if type(p).__name__ in ("Params4bit", "Int8Params")}


def _blocks_to_shard(model: torch.nn.Module, cfg: ResolvedConfig) -> list[torch.nn.Module]:
    """The modules FSDP2 shards on their own (each is gathered whole only while it runs), as
    ``fsdp_config.auto_wrap_policy`` says: the transformer blocks (default), every module holding
    at least ``min_num_params`` parameters not already in a smaller one (size based), or none
    (the root alone: the whole model is gathered at once)."""
    policy = cfg.fsdp_config.auto_wrap_policy if cfg.fsdp_config is not None else "TRANSFORMER_BASED_WRAP"
    if policy == "NO_WRAP":
        return []
    if policy == "SIZE_BASED_WRAP":
        assert cfg.fsdp_config is not None and cfg.fsdp_config.min_num_params  # rule HB169
        return _size_based_blocks(model, cfg.fsdp_config.min_num_params)
    classes = block_classes(model, cfg)
    if not classes:
        raise OptionError(
            "fsdp: the model names no transformer block class to shard; set "
            "fsdp_config.transformer_layer_cls_to_wrap (e.g. LlamaDecoderLayer)"
        )
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    if not blocks:
        raise OptionError(
            f"fsdp_config.transformer_layer_cls_to_wrap {sorted(classes)}: no module of the model has "
            f"that class; its blocks are {sorted(_candidate_blocks(model))}"
        )
    return blocks


def _size_based_blocks(model: torch.nn.Module, min_num_params: int) -> list[torch.nn.Module]:
    """Bottom up: a module whose parameters not yet in a chosen module number at least
    ``min_num_params`` is chosen (the root is sharded on its own anyway)."""
    chosen: list[torch.nn.Module] = []

    def unclaimed(module: torch.nn.Module) -> int:
        count = sum(p.numel() for p in module.parameters(recurse=False))
        count += sum(unclaimed(child) for child in module.children())
        if count >= min_num_params and module is not model:
            chosen.append(module)
            return 0
        return count

    unclaimed(model)
    return chosen


def _candidate_blocks(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__name__.endswith(("Layer", "Block"))}


def _mixed_precision(cfg: ResolvedConfig) -> Any:
    """FSDP2's MixedPrecisionPolicy: the configured one; else none, so the loop's autocast over
    fp32 master weights decides precision exactly as in one process."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = cfg.fsdp_config.mixed_precision_policy if cfg.fsdp_config is not None else None
    if policy is None:
        return None
    return MixedPrecisionPolicy(
        param_dtype=getattr(torch, policy.param_dtype) if policy.param_dtype else None,
        reduce_dtype=getattr(torch, policy.reduce_dtype) if policy.reduce_dtype else None,
    )
