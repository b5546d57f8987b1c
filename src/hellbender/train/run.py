"""The commands behind ``hellbender train / evaluate / merge-lora / inference``, one function each.

Each function takes a normalized config and does the whole job, in pipeline order
(tokenizer → data → model → loop → outputs), so the CLI only parses arguments and prints.

Which weights the after-training commands use: the trained result in ``output_dir`` (an adapter
with ``adapter_config.json``, or a full model with ``config.json``); for an adapter run without
one there, ``lora_model_dir``. ``evaluate`` and ``inference`` fall back to the untrained base
model (and say so), which is how a "before" number is measured; ``merge-lora`` refuses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import yaml

from hellbender.config.schema import HellbenderConfig
from hellbender.files import write_atomically
from hellbender.train import checkpoint as ckpt
from hellbender.train.loop import TrainResult, World, evaluate, train
from hellbender.train.metrics import LOSS_PLOT, METRICS_FILE, plot_losses

logger = logging.getLogger(__name__)

RESOLVED_CONFIG = "config.resolved.yaml"
EVAL_RESULTS = "eval_results.json"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA): weight init, LoRA init and dropout."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(model: torch.nn.Module) -> torch.device:
    """The device to train on: where a quantized model was placed, else this rank's GPU, else CPU."""
    current = next(model.parameters()).device
    if current.type != "cpu" or not torch.cuda.is_available():
        return current
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def use_fp32_master_weights(model: torch.nn.Module, cfg: HellbenderConfig) -> int:
    """Keep every *trainable* weight in fp32 when training in bf16/fp16 (autocast does the rest).

    A bf16 weight cannot absorb an update smaller than ~1/256 of itself, so pure-bf16 training
    silently stops learning at fine-tuning learning rates; the measurements in
    :mod:`hellbender.train.loop` show autocast over fp32 weights costs little on CPU. Frozen
    weights (a LoRA base) stay in the low-precision dtype they were loaded in. Returns the
    number of tensors upcast.
    """
    if cfg.compute_dtype in (None, "float32"):
        return 0
    count = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
            count += 1
    return count


def write_resolved_config(cfg: HellbenderConfig, output_dir: Path) -> Path:
    path = output_dir / RESOLVED_CONFIG
    text = yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False)
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def resolve_resume(cfg: HellbenderConfig, output_dir: Path) -> Path | None:
    """The checkpoint to continue from: ``resume_from_checkpoint``, else (with
    ``auto_resume_from_checkpoints``) the newest complete one in ``output_dir``, else None."""
    if cfg.resume_from_checkpoint:
        path = Path(cfg.resume_from_checkpoint).expanduser()
        if not ckpt.is_complete(path):
            raise FileNotFoundError(
                f"resume_from_checkpoint: {path} is not a complete checkpoint (expected a folder "
                f"checkpoint-<step> holding {ckpt.STATE_FILE})"
            )
        return path
    if cfg.auto_resume_from_checkpoints:
        return ckpt.find_latest_checkpoint(output_dir)
    return None


# ---------------------------------------------------------------- train


def run_train(cfg: HellbenderConfig, *, world: World | None = None) -> TrainResult:
    """Fine-tune as configured and write the outputs into ``output_dir``.

    Outputs: the adapter (peft format) or the full model (safetensors), the tokenizer,
    ``config.resolved.yaml``, ``metrics.jsonl`` and ``loss.png``; checkpoints in
    ``checkpoint-<step>`` folders. Raises :class:`hellbender.train.loop.TrainingStopped` on a
    NaN/inf loss or the loss watchdog (the last checkpoint is left intact).
    """
    from hellbender.data.prepare import prepare_datasets
    from hellbender.kernels import apply_optimizations, describe
    from hellbender.models.attention import check_backend_trainable
    from hellbender.models.load import load_model, load_tokenizer

    world = world or World()
    out = Path(cfg.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    resume = resolve_resume(cfg, out)
    earlier = ckpt.list_checkpoints(out)
    if resume is None and earlier:
        # Mixing two runs' checkpoints in one folder would make rotation and auto-resume pick the
        # other run's (higher-numbered) checkpoints; refuse rather than delete anyone's results.
        raise ValueError(
            f"output_dir {out} already holds checkpoints of an earlier run ({', '.join(p.name for p in earlier)}). "
            "Set auto_resume_from_checkpoints: true to continue that run, or use another output_dir "
            "(or delete the checkpoint folders) to start a new one."
        )
    later = [p for p in earlier if resume is not None and ckpt.step_of(p) > ckpt.step_of(resume)]
    if later:
        # Resuming from an earlier checkpoint in the same folder: the abandoned run's later
        # checkpoints would be re-saved over (same step numbers) and, being the highest steps,
        # kept by save_total_limit while the new ones are deleted. Refuse; never delete them.
        raise ValueError(
            f"output_dir {out} holds checkpoints after {resume.name}, the one to resume from "
            f"({', '.join(p.name for p in later)}). Move them out of output_dir (or delete them) to "
            "continue from the earlier one, or resume from the latest."
        )
    if world.is_main:
        for leftover in ckpt.remove_incomplete(out):
            logger.warning("removed %s, left by a run killed while writing a checkpoint or its outputs", leftover)
        write_resolved_config(cfg, out)

    tokenizer = load_tokenizer(cfg)
    data = prepare_datasets(cfg, tokenizer)
    # Seed right before the model is built: LoRA initialisation does not depend on how much
    # randomness data preparation consumed (e.g. whether the dataset came from the cache).
    seed_everything(cfg.seed)
    model = load_model(cfg, tokenizer)
    use_fp32_master_weights(model, cfg)
    device = pick_device(model)
    if next(model.parameters()).device != device:  # a quantized model is placed while loading
        model.to(device)
    check_backend_trainable(cfg.attn_implementation, device)
    # Memory/speed options (checkpointing, kernels, compile): after the adapter, before the
    # optimizer sees the parameters. None of them changes the numbers (tested in kernels/).
    apply_optimizations(model, cfg)
    for line in describe(model):
        logger.info("optimization: %s", line)
    if resume is not None:
        logger.info("resuming from %s", resume)

    try:
        result = train(
            cfg, model, data.train, data.eval, pad_token_id=tokenizer.pad_token_id,
            output_dir=out, resume_from=resume, world=world,
        )  # fmt: skip
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
        def write_outputs(folder: Path) -> None:
            ckpt.save_model_weights(model, folder)
            tokenizer.save_pretrained(str(folder))

        ckpt.publish_files(out, write_outputs)
        plot_losses(out / METRICS_FILE, out / LOSS_PLOT)
    return result


# ---------------------------------------------------------------- loading the trained result


@dataclass
class TrainedSource:
    """Where the trained weights are, and the config that loads them."""

    cfg: HellbenderConfig
    description: str
    trained: bool
    tokenizer_dir: Path | None


def trained_source(cfg: HellbenderConfig) -> TrainedSource:
    """Find the trained result of ``cfg`` (see the module docstring for the order)."""
    out = Path(cfg.output_dir).expanduser()
    tok_dir = out if (out / "tokenizer_config.json").is_file() else None
    if cfg.adapter is not None:
        if (out / "adapter_config.json").is_file():
            return TrainedSource(cfg.model_copy(update={"lora_model_dir": str(out)}), f"adapter in {out}", True, tok_dir)
        if cfg.lora_model_dir:
            return TrainedSource(cfg, f"adapter in {cfg.lora_model_dir}", True, None)
    elif (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return TrainedSource(cfg.model_copy(update={"base_model": str(out)}), f"fine-tuned model in {out}", True, tok_dir)
    base = cfg.model_copy(update={"adapter": None, "lora_model_dir": None})
    return TrainedSource(base, f"the base model {cfg.base_model} (no trained weights in {out})", False, None)


def _load_for_use(source: TrainedSource) -> tuple[torch.nn.Module, Any]:
    from hellbender.models.load import load_model, load_tokenizer

    cfg = source.cfg
    if source.tokenizer_dir is not None:
        # The saved tokenizer is the one training used (it may have added tokens / a pad token).
        cfg = cfg.model_copy(update={"tokenizer_config": str(source.tokenizer_dir)})
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    device = pick_device(model)
    if next(model.parameters()).device != device:
        model.to(device)
    model.eval()
    return model, tokenizer


def run_evaluate(cfg: HellbenderConfig) -> dict[str, float]:
    """Evaluate the trained result (or the base model) on the evaluation split; writes
    ``output_dir/eval_results.json`` and returns ``eval_loss``, ``eval_ppl`` and ``eval_tokens``."""
    import json

    from hellbender.data.prepare import prepare_datasets

    source = trained_source(cfg)
    logger.info("evaluating %s", source.description)
    model, tokenizer = _load_for_use(source)
    data = prepare_datasets(source.cfg, tokenizer)
    if data.eval is None or len(data.eval) == 0:
        raise ValueError("no evaluation set: set val_set_size or test_datasets in the config")
    metrics = evaluate(model, data.eval, source.cfg, tokenizer.pad_token_id)
    metrics = {**metrics, "trained": float(source.trained)}
    out = Path(cfg.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / EVAL_RESULTS).write_text(json.dumps({"model": source.description, **metrics}, indent=2), encoding="utf-8")
    return metrics


def run_merge_lora(cfg: HellbenderConfig, out_dir: str | Path | None = None) -> Path:
    """Fold the trained adapter into an unquantized base; write a plain HF folder (safetensors).

    The base is loaded unquantized even for QLoRA (merging into 4-bit weights would round the
    update away) and the merge is computed in fp32, then stored in the base checkpoint's dtype.
    Default destination: ``output_dir/merged``.
    """
    from transformers import AutoConfig

    from hellbender.models.adapters import merge_adapter

    if cfg.adapter is None:
        raise ValueError("merge-lora: the config trains no adapter (adapter is not set); nothing to merge")
    source = trained_source(cfg)
    if not source.trained:
        raise FileNotFoundError(
            f"merge-lora: no trained adapter in {cfg.output_dir} (adapter_config.json) and no lora_model_dir; "
            "train first"
        )
    merge_cfg = source.cfg.model_copy(
        update={"adapter": "lora", "load_in_4bit": False, "load_in_8bit": False, "compute_dtype": "float32"}
    )
    model, tokenizer = _load_for_use(
        TrainedSource(merge_cfg, source.description, True, source.tokenizer_dir)
    )
    merged = merge_adapter(model)
    from hellbender.models.load import resolve_model_path

    stored = getattr(AutoConfig.from_pretrained(resolve_model_path(merge_cfg)), "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if isinstance(stored, torch.dtype) and stored != torch.float32:
        merged.to(stored)
    target = Path(out_dir) if out_dir is not None else Path(cfg.output_dir).expanduser() / "merged"
    target.mkdir(parents=True, exist_ok=True)
    ckpt.save_model_weights(merged, target)
    tokenizer.save_pretrained(str(target))
    return target


# ---------------------------------------------------------------- inference


def read_prompts(stream: IO[str]) -> Iterable[str]:
    """Prompts from a stream, one per non-empty line (interactive: shows a ``>`` prompt)."""
    interactive = stream.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = stream.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def build_prompt_ids(tokenizer: Any, prompt: str, system: str | None) -> dict[str, torch.Tensor]:
    """Token ids of ``prompt`` as a user turn in the chat template (plain text without one)."""
    if tokenizer.chat_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def run_inference(
    cfg: HellbenderConfig,
    prompt: str | None = None,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    stream: bool = True,
    prompts_from: IO[str] | None = None,
) -> list[str]:
    """Generate an answer to ``prompt`` (or to every line of stdin), streaming tokens to stdout.

    Greedy by default (``temperature`` 0), so an answer is reproducible. Returns the answers.
    """
    from transformers import TextStreamer

    source = trained_source(cfg)
    logger.info("generating with %s", source.description)
    model, tokenizer = _load_for_use(source)
    device = next(model.parameters()).device
    prompts: Iterable[str] = [prompt] if prompt is not None else read_prompts(prompts_from or sys.stdin)
    answers: list[str] = []
    for text in prompts:
        inputs = {k: v.to(device) for k, v in build_prompt_ids(tokenizer, text, cfg.default_system_message).items()}
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        )
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                pad_token_id=tokenizer.pad_token_id, **sampling,
            )  # fmt: skip
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        answers.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
    return answers
