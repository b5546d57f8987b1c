"""``hellbender train``: fine-tune as configured and write the outputs into ``output_dir``."""

from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hellbender.commands.trained import pick_device
from hellbender.config.deepspeed import read_deepspeed_config, zero_stage
from hellbender.config.schema import ResolvedConfig
from hellbender.distributed.context_parallel import use_context_parallel_attention
from hellbender.distributed.parallel import loads_on_rank0_only
from hellbender.distributed.world import World, process_group, rank_device
from hellbender.errors import OptionError
from hellbender.files import write_atomically
from hellbender.train import checkpoint as ckpt
from hellbender.train import hub
from hellbender.train import output_dir as outdir
from hellbender.train.loop import TrainResult, train
from hellbender.train.metrics import LOSS_PLOT, METRICS_FILE, plot_losses
from hellbender.train.run_config import RESOLVED_CONFIG, check_resume_config, resolved_config_text

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA): weight init, LoRA init and dropout."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_fp32_master_weights(model: torch.nn.Module, cfg: ResolvedConfig) -> int:
    """Keep every *trainable* weight in fp32 when training in bf16/fp16 (autocast does the rest).

    A bf16 weight cannot absorb an update smaller than ~1/256 of itself, so pure-bf16 training
    silently stops learning at fine-tuning learning rates; the measurements in
    :mod:`hellbender.train.loop` show autocast over fp32 weights costs little on CPU. Frozen
    weights (a LoRA base) stay in the low-precision dtype they were loaded in. Returns the
    number of tensors upcast.
    """
    if cfg.compute_dtype == "float32":
        return 0
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
            count += 1
    return count


def write_resolved_config(cfg: ResolvedConfig, output_dir: Path) -> Path:
    """``config.resolved.yaml``: every key with its value as this run used it (derived ones too)."""
    path = output_dir / RESOLVED_CONFIG
    text = resolved_config_text(cfg)
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def report_resume_changes(cfg: ResolvedConfig, resume: Path) -> None:
    """Refuse the settings a resume cannot honour (listing each), and say which changed ones it
    applies or accepts. Before anything is loaded or written: a refusal costs nothing."""
    changes = check_resume_config(cfg, resume)
    if changes is None:
        logger.warning(
            "%s holds no %s (written by an earlier hellbender): changed settings cannot be listed",
            resume, RESOLVED_CONFIG,
        )  # fmt: skip
        return
    for change in changes:
        if change.policy == "apply":
            logger.warning("resume: %s — applied from step %d on (%s)", change,
                           ckpt.read_state(resume).global_step + 1, change.why)  # fmt: skip
        else:
            logger.info("resume: %s — accepted (%s)", change, change.why)


def run_train(cfg: ResolvedConfig, *, world: World | None = None) -> TrainResult:
    """Fine-tune as configured and write the outputs into ``output_dir``.

    Outputs: the adapter (peft format) or the full model (safetensors), the tokenizer,
    ``config.resolved.yaml``, ``metrics.jsonl`` and ``loss.png``; checkpoints in
    ``checkpoint-<step>`` folders. Raises :class:`hellbender.train.loop.TrainingStopped` on a
    NaN/inf loss or the loss watchdog (the last checkpoint is left intact).

    Refused with a :class:`~hellbender.train.checkpoint.CheckpointError`, before anything is
    written: an ``output_dir`` another run holds, one that is (or is inside) a folder the run reads
    from, one whose files the outputs would replace without hellbender having written them, and a
    resume with settings it cannot honour (see :mod:`hellbender.train.output_dir` and
    :mod:`hellbender.train.run_config`).
    """
    if world is None:
        # Under torchrun: join the other ranks for the whole run (gloo on CPU, NCCL on CUDA);
        # every collective times out after ddp_timeout seconds instead of hanging.
        with process_group(cfg.ddp_timeout, cfg.context_parallel_size) as joined:
            return run_train(cfg, world=joined)
    out = Path(cfg.output_dir).expanduser()
    outdir.check_not_a_source(cfg, out)  # before mkdir: not even an empty folder inside the model
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission, a read-only disk
        raise OptionError(f"output_dir: cannot create the folder {out} ({exc.strerror or exc})") from exc
    # One run per output_dir, from before anything is read or written there until the outputs are
    # published; the OS drops the lock when the process ends, however it ends.
    with outdir.locked(out) if world.is_main else contextlib.nullcontext(out):
        return _train_into(cfg, out, world)


def model_to_train(cfg: ResolvedConfig, tokenizer: Any, world: World = World()) -> torch.nn.Module:
    """The model as the loop takes it: seeded, loaded (with its adapter), trainable weights in
    fp32, on its device, the memory/speed options applied. With
    ``fsdp_config.cpu_ram_efficient_loading`` only rank 0 reads the weights; the other ranks build
    the model on the meta device, and receive their shards from rank 0 once FSDP2 has sharded it
    (:func:`hellbender.distributed.parallel.wrap_model`)."""
    from hellbender.kernels import apply_optimizations
    from hellbender.models.adapters import skip_lora_input_casts
    from hellbender.models.attention import check_backend_trainable, use_document_attention
    from hellbender.models.load import load_model

    # Seed right before the model is built: LoRA initialisation does not depend on how much
    # randomness data preparation consumed (e.g. whether the dataset came from the cache).
    seed_everything(cfg.seed)
    empty = loads_on_rank0_only(cfg) and not world.is_main
    model = load_model(cfg, tokenizer, empty=empty)
    use_fp32_master_weights(model, cfg)
    if cfg.compute_dtype != "float32":
        # Trained under autocast (hellbender.train.loop.autocast_for): no input casts in LoRA layers.
        skip_lora_input_casts(model)
    device = pick_device(model) if not empty else rank_device(world)
    if next(model.parameters()).device != device and not empty:  # quantized: placed while loading
        model.to(device)
    check_backend_trainable(cfg.attn_implementation, device)
    if cfg.context_parallel_size > 1:  # every layer attends through the CP ring/Ulysses function
        use_context_parallel_attention(model)
    elif cfg.per_document_attention:
        # One causal SDPA call per document instead of a dense block-diagonal mask: the same
        # numbers for a fraction of the attention work (hellbender.models.attention).
        use_document_attention(model)
    # Memory/speed options (checkpointing, kernels, compile): after the adapter, before the
    # optimizer sees the parameters. None of them changes the numbers (tested in kernels/).
    apply_optimizations(model, cfg)
    return model


def _hide_progress_bars() -> None:
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def _train_into(cfg: ResolvedConfig, out: Path, world: World) -> TrainResult:
    """:func:`run_train` once ``out`` exists and this process holds it."""
    from hellbender.data.prepare import prepare_datasets
    from hellbender.kernels import describe
    from hellbender.models.load import load_tokenizer

    # Rank 0 checks and prepares the folder first; the others follow once it has (or stop at
    # once if it failed: its message is the one to read).
    if not world.is_main:
        _hide_progress_bars()  # rank 0 shows the progress; N copies of every bar would garble it
    with world.main_first("checking output_dir"):
        resume = ckpt.resolve_resume(cfg.resume_from_checkpoint, cfg.auto_resume_from_checkpoints, out)
        ckpt.check_output_dir(out, resume)
        if resume is not None and world.is_main:
            report_resume_changes(cfg, resume)  # before config.resolved.yaml is rewritten
        if world.is_main:
            outdir.check_before_training(cfg, out)
            for leftover in ckpt.remove_incomplete(out):
                logger.warning(
                    "removed %s, left by a run killed while writing a checkpoint or its outputs", leftover
                )
            write_resolved_config(cfg, out)

    tokenizer = load_tokenizer(cfg)
    # Data preparation runs once: rank 0 tokenizes and writes the cache, the others then read it.
    with world.main_first("preparing the data"):
        data = prepare_datasets(cfg, tokenizer)
        if world.is_main:
            hub.push_dataset(cfg, data.cache_dir)
    model = model_to_train(cfg, tokenizer, world)
    for line in describe(model):
        logger.info("optimization: %s", line)
    if world.distributed:
        strategy: str = cfg.distributed_strategy
        if cfg.deepspeed is not None and strategy == "deepspeed":
            strategy += f" ZeRO-{zero_stage(read_deepspeed_config(cfg.deepspeed))}"
        backend = torch.distributed.get_backend()
        logger.info("distributed: %s over %d ranks (%s)", strategy, world.size, backend)
        if world.cp_size > 1:
            logger.info(
                "context parallelism: %s over groups of %d ranks, %d data-parallel rank(s)",
                cfg.context_parallel_strategy, world.cp_size, world.dp_size,
            )  # fmt: skip
    if resume is not None:
        logger.info("resuming from %s", resume)

    try:
        result = train(
            cfg, model, data.train, data.eval, pad_token_id=tokenizer.pad_token_id,
            output_dir=out, resume_from=resume, world=world, tokenizer=tokenizer,
        )
    except BaseException:
        # A stopped run (NaN/inf loss, the loss watchdog, Ctrl-C, an error) gets its plot too: the
        # curve up to the stop is what explains it. Best effort, so it never hides why training stopped.
        if world.is_main:
            with contextlib.suppress(Exception):
                plot_losses(out / METRICS_FILE, out / LOSS_PLOT)
        raise
    if world.is_main:
        # Weights and tokenizer may replace those of an earlier run: staged, then moved into place,
        # so a crash while writing never leaves a half-written output (see publish_files).
        # Only files hellbender wrote are replaced: checked (and recorded) once the staged set is
        # known, before the first one moves into place.
        def write_outputs(folder: Path) -> None:
            ckpt.save_model_weights(model, folder, result.final_weights)
            tokenizer.save_pretrained(str(folder))
            outdir.claim(out, [p.name for p in folder.iterdir()], "the trained weights and tokenizer")

        try:
            ckpt.publish_files(out, write_outputs)
        except outdir.ForeignFileError as exc:  # a file appeared during the run: keep the outputs
            kept = outdir.keep_unpublished(out / ckpt.FINAL_STAGING)
            if kept is None:
                raise
            raise outdir.ForeignFileError(f"{exc} This run's outputs were kept in {kept}.") from exc
        plot_losses(out / METRICS_FILE, out / LOSS_PLOT)
        if hub.pushes_model(cfg):
            hub.ModelPusher(cfg).final(out)
    return result


