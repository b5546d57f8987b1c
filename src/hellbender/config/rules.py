"""Config rules: one small function per rule, each returning findings with a stable code.

Rules read the *normalized* config (derived values resolved) and, where it matters what the user
wrote rather than what was derived, the raw config. They never load model weights; a rule that
needs the model's config reads ``config.json`` (or GGUF metadata) and says it was skipped when it
cannot.

Codes: HB1xx are config rules. Every rule has a test that triggers it and one that does not.
"""

from __future__ import annotations

from collections.abc import Callable

from hellbender.config.deepspeed import (
    DeepSpeedConfigError,
    complete,
    loop_values,
    offloads,
    read_deepspeed_config,
    zero_stage,
)
from hellbender.config.findings import Finding, quote
from hellbender.config.hardware import Hardware
from hellbender.config.normalize import fsdp_requested
from hellbender.config.schema import (
    BNB_OPTIMIZERS,
    GPU_ONLY_BACKENDS,
    LOSS_REPLACEMENTS,
    TORCHAO_OPTIMIZERS,
    HellbenderConfig,
    ResolvedConfig,
)
from hellbender.config.unfrozen import UnfrozenPatternError, unfrozen_pattern
from hellbender.model_files import read_model_config

Rule = Callable[[ResolvedConfig, Hardware, HellbenderConfig], list[Finding]]
RULES: list[Rule] = []

# Options that exist in the schema (so Axolotl configs parse) but whose implementation has not
# landed yet. Setting one is an error naming it: a config never silently trains without a
# feature it asked for. Remove a key from here in the change that implements it.
NOT_YET_IMPLEMENTED: dict[str, str] = {
    "gptq": "GPTQ bases",
    "qat": "quantization-aware training",
    "fp8_enable_fsdp_float8_all_gather": "fp8 all-gather of FSDP2-sharded weights",
    "tensor_parallel_size": "tensor parallelism",
    "dp_shard_size": "N-D parallelism",
    "dp_replicate_size": "N-D parallelism",
    "skip_prepare_dataset": "lazy dataset preparation",
    "save_safetensors": "pickled (.bin) weight files; outputs are always safetensors",
    "wandb_watch": "W&B gradient watching",
    "wandb_log_model": "W&B model upload",
}


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def _err(code: str, message: str, fix: str, key: str | None = None) -> list[Finding]:
    return [Finding(code, "error", message, fix, key)]


def _warn(code: str, message: str, fix: str, key: str | None = None) -> list[Finding]:
    return [Finding(code, "warning", message, fix, key)]


@rule
def fp16_full_finetune_packing(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """Full fine-tune in fp16 with sample packing and no flash attention: fp16 weights overflow,
    and the padded-mask path is slow."""
    if (
        cfg.fp16
        and cfg.adapter is None
        and cfg.sample_packing
        and not str(cfg.attn_implementation).startswith("flash")
    ):
        return _warn(
            "HB103",
            "full fine-tuning in fp16 with sample packing but without flash attention: fp16 master "
            "weights overflow easily and the padded mask path is slow.",
            "Use a LoRA adapter (adapter: lora) or attn_implementation: flash_attention_2, or bf16.",
            "fp16",
        )
    return []


@rule
def fp8_without_compile(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """fp8 without torch_compile: unfused casts make fp8 slower than bf16."""
    if cfg.fp8 and not cfg.torch_compile:
        return _warn(
            "HB104",
            "fp8 without torch_compile: the casts are not fused and fp8 is usually slower than bf16.",
            "Set torch_compile: true.",
            "fp8",
        )
    return []


@rule
def fp8_hardware(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """fp8 on a CUDA GPU without fp8 tensor cores (compute capability below 8.9) cannot run: torch's
    fp8 matmul (``torch._scaled_mm``) needs them. A CPU runs it (torch's CPU ``_scaled_mm``)."""
    if cfg.fp8 and hw.cuda and not hw.cuda_fp8:
        return _err(
            "HB105",
            f"fp8 needs a GPU with fp8 tensor cores (compute capability ≥ 8.9); "
            f"this machine is {hw.description}.",
            "Remove fp8 (use bf16) or run on an Ada/Hopper/Blackwell GPU.",
            "fp8",
        )
    return []


@rule
def fp8_unsupported_with(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """fp8 swaps the model's linear layers for torchao's Float8Linear; refused where that cannot
    work: a quantized base (its linear layers are bitsandbytes/GPTQ layers, not float weights),
    DeepSpeed (its engine wraps the modules its own way), FSDP2 (torchao's float8 with FSDP2 sharding
    is not wired in hellbender yet), and the fused LoRA kernels (they bypass the layers' forward, so
    fp8 would silently not apply)."""
    if not cfg.fp8:
        return []
    reasons = []
    for key in ("load_in_4bit", "load_in_8bit", "gptq"):
        if getattr(cfg, key):
            reasons.append(f"{key} (a quantized base has no float linear weights to cast)")
    if cfg.distributed_strategy == "deepspeed":
        reasons.append("deepspeed (not supported together)")
    if cfg.distributed_strategy == "fsdp2":
        reasons.append("FSDP2 (torchao float8 with FSDP2 sharding is not supported by hellbender yet)")
    for key in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel"):
        if getattr(cfg, key):
            reasons.append(f"{key} (the fused kernel bypasses the Float8Linear layers)")
    if not reasons:
        return []
    return _err(
        "HB198",
        f"fp8 cannot be combined with {'; '.join(reasons)}.",
        "Remove fp8 (train in bf16), or remove what it is combined with (single process or DDP, a "
        "16-bit base, no fused LoRA kernels).",
        "fp8",
    )


@rule
def quantized_base_needs_adapter(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """A 4/8-bit base cannot be trained in full: its quantized weights are frozen, so an adapter is needed."""
    if (cfg.load_in_4bit or cfg.load_in_8bit) and cfg.adapter is None:
        return _err(
            "HB106",
            "a quantized base (load_in_4bit/load_in_8bit) cannot be fine-tuned in full: "
            "its weights are frozen.",
            "Set adapter: qlora (4 bit) or adapter: lora (8 bit).",
            "adapter",
        )
    return []


@rule
def qlora_needs_4bit(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """adapter: qlora means a 4-bit base; without load_in_4bit it would silently be plain LoRA."""
    if cfg.adapter == "qlora" and not cfg.load_in_4bit:
        return _err(
            "HB107", "adapter: qlora needs load_in_4bit: true.", "Set load_in_4bit: true.", "load_in_4bit"
        )
    return []


@rule
def both_quantizations(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """load_in_4bit and load_in_8bit are mutually exclusive."""
    if cfg.load_in_4bit and cfg.load_in_8bit:
        return _err("HB112", "load_in_4bit and load_in_8bit are both set.", "Keep one.", "load_in_4bit")
    return []


@rule
def offload_needs_checkpointing(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """activation_offloading offloads what gradient checkpointing keeps, so it needs checkpointing on."""
    if cfg.activation_offloading and not cfg.gradient_checkpointing:
        return _err(
            "HB108",
            "activation_offloading moves the activations that gradient checkpointing keeps; without "
            "checkpointing there is nothing to offload.",
            "Set gradient_checkpointing: true.",
            "activation_offloading",
        )
    return []


@rule
def eval_without_data(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """Evaluation settings (eval_steps, evals_per_epoch, eval_strategy, eval_batch_size) without
    evaluation data would silently never evaluate."""
    has_eval_data = cfg.val_set_size > 0 or bool(cfg.test_datasets)
    asked = [k for k in ("eval_steps", "evals_per_epoch") if getattr(cfg, k) is not None]
    if cfg.eval_strategy in ("steps", "epoch"):
        asked.append("eval_strategy")
    if raw.eval_batch_size is not None:
        asked.append("eval_batch_size")
    if asked == ["evals_per_epoch"] and not has_eval_data:
        # as in Axolotl: a schedule of evaluations with nothing to evaluate is a no-op, not a mistake
        return _warn(
            "HB109",
            "evals_per_epoch set but there is no evaluation data: no evaluation will run.",
            "Set val_set_size (a fraction or a row count) or test_datasets, or remove evals_per_epoch.",
            "evals_per_epoch",
        )
    if asked and not has_eval_data:
        return _err(
            "HB109",
            f"{', '.join(asked)} set but there is no evaluation data.",
            "Set val_set_size (a fraction or a row count) or test_datasets, or remove the eval settings.",
            asked[0],
        )
    return []


@rule
def warmup_both(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """warmup_steps and warmup_ratio say the same thing twice; which one wins would be a guess."""
    if cfg.warmup_steps is not None and cfg.warmup_ratio is not None:
        return _err(
            "HB110", "warmup_steps and warmup_ratio are both set.", "Keep one of them.", "warmup_steps"
        )
    return []


@rule
def deepspeed_and_fsdp(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """DeepSpeed and FSDP both shard the model and cannot be combined."""
    if raw.deepspeed is not None and fsdp_requested(raw):
        return _err(
            "HB111",
            "deepspeed and FSDP (fsdp_config, fsdp_version or fsdp) are both set; they shard the model "
            "differently.",
            "Keep one.",
            "deepspeed",
        )
    return []


@rule
def zero3_quantized_base(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """DeepSpeed ZeRO-3 with a 4-bit/8-bit bitsandbytes base: ZeRO-3 partitions every weight, frozen
    ones too, and bitsandbytes' packed weights lose their quantization state when split. (FSDP2 and
    ZeRO-1/2 keep the frozen quantized weights whole on every rank and shard the rest.)"""
    quantized = cfg.load_in_4bit or cfg.load_in_8bit
    if cfg.distributed_strategy != "deepspeed" or not quantized or raw.deepspeed is None:
        return []
    try:
        stage = zero_stage(read_deepspeed_config(raw.deepspeed))
    except DeepSpeedConfigError:
        return []  # HB174 says what is wrong with the JSON
    if stage < 3:
        return []
    key = "load_in_4bit" if cfg.load_in_4bit else "load_in_8bit"
    return _err(
        "HB167",
        f"{key}: a quantized base cannot be partitioned by DeepSpeed ZeRO-3 (bitsandbytes' packed "
        "weights lose their quantization state when split).",
        "Use ZeRO-2 (zero_optimization.stage: 2) or FSDP2: both keep the frozen 4/8-bit base whole on "
        f"every rank and shard the adapters; or remove {key} and partition the 16-bit base with ZeRO-3.",
        key,
    )


@rule
def fsdp2_bnb_optimizer(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """FSDP2 or DeepSpeed with a bitsandbytes optimizer (adamw_8bit, paged_adamw_8bit/32bit): its
    kernels do not take FSDP2's sharded (DTensor) parameters (Axolotl refuses the pair for the same
    reason)."""
    if cfg.distributed_strategy in ("fsdp2", "deepspeed") and cfg.optimizer in BNB_OPTIMIZERS:
        name = "FSDP2" if cfg.distributed_strategy == "fsdp2" else "DeepSpeed ZeRO"
        return _err(
            "HB168",
            f"optimizer {cfg.optimizer} (bitsandbytes) does not work on {name}'s sharded parameters.",
            f"Use optimizer: adamw_torch_fused or adamw_torch ({name} already shards the optimizer "
            "state over the ranks).",
            "optimizer",
        )
    return []


@rule
def paged_optimizer_without_cuda(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """A paged optimizer keeps its state in CUDA unified memory, which the driver pages out to CPU
    RAM when the GPU is full. Without CUDA there is nothing to page: bitsandbytes runs the same
    update on ordinary CPU tensors (adamw_8bit / 32-bit AdamW), so the run trains as asked."""
    if cfg.optimizer.startswith("paged_") and not hw.cuda:
        plain = "adamw_8bit" if cfg.optimizer == "paged_adamw_8bit" else "adamw_torch"
        return [
            Finding(
                "HB195",
                "info",
                f"optimizer {cfg.optimizer}: paging needs CUDA unified memory, which {hw.description} "
                "does not have; bitsandbytes runs the same update without paging (the state is in CPU "
                "memory already).",
                f"Nothing to do (or write optimizer: {plain}); paging applies on a CUDA GPU.",
                "optimizer",
            )
        ]
    return []


@rule
def torchao_optimizer_across_ranks(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """torchao's low-bit optimizers keep their state as tensor subclasses (codes + scales). Over
    several ranks that state would go through DDP/FSDP2's distributed state dicts and DeepSpeed's
    engine, which hellbender has not tested with them: refused rather than trusted."""
    if cfg.optimizer in TORCHAO_OPTIMIZERS and cfg.distributed_strategy != "single":
        return _err(
            "HB196",
            f"optimizer {cfg.optimizer} (torchao low-bit state) is supported in a single process only, "
            f"not with {cfg.distributed_strategy}.",
            "Train in one process, or use optimizer: adamw_torch_fused (FSDP2 and DeepSpeed shard its "
            "state over the ranks) or adamw_8bit (DDP).",
            "optimizer",
        )
    return []


@rule
def torchao_optimizer_trains_embeddings(
    cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig
) -> list[Finding]:
    """torchao's low-bit state on a trained embedding: rows of tokens absent from a batch get no
    gradient, their second moment (tiny next to the largest one of its block) is stored as 0 while
    the first moment is not, and the next update of those rows is lr × m / eps — orders of
    magnitude too large (the "zero-point" problem of low-bit second moments; measured in
    tests/unit/test_optim_lowbit.py). bitsandbytes' adamw_8bit did not show it there, nor torchao's
    4-bit state, whose second-moment code book has no 0."""
    if cfg.optimizer not in ("adamw_torch_8bit", "adamw_torch_fp8"):
        return []
    saved = [m for m in cfg.lora_modules_to_save or [] if "embed" in m]
    full = cfg.adapter is None and (
        not cfg.unfrozen_parameters or any("embed" in p for p in cfg.unfrozen_parameters)
    )
    if not (full or saved):
        return []
    what = f"lora_modules_to_save {saved}" if saved else "the full fine-tune"
    return _warn(
        "HB194",
        f"optimizer {cfg.optimizer} with trained embeddings ({what}): torchao's 8-bit/fp8 state can "
        "round the second moment of rarely seen tokens' rows to 0 and blow their update up to lr × m / eps.",
        "Keep the embeddings frozen (an adapter, or unfrozen_parameters without them), or use "
        "optimizer: adamw_8bit (bitsandbytes), adamw_torch_4bit or adamw_torch.",
        "optimizer",
    )


@rule
def torchao_installed(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """fp8 and the torchao optimizers need torchao installed (checked without importing it)."""
    if not (cfg.fp8 or cfg.optimizer in TORCHAO_OPTIMIZERS):
        return []
    from importlib.util import find_spec

    if find_spec("torchao") is not None:
        return []
    key = "fp8" if cfg.fp8 else "optimizer"
    what = "fp8" if cfg.fp8 else f"optimizer {cfg.optimizer}"
    if not hw.local:  # checked for another machine: what is installed here says nothing
        return _warn(
            "HB197",
            f"{what} needs torchao, not installed on this machine; the target, {hw.description}, needs it.",
            "pip install 'hellbender[torchao]' on the machine that trains.",
            key,
        )
    return _err(
        "HB197", f"{what} needs torchao, which is not installed.", "pip install 'hellbender[torchao]'", key
    )


@rule
def fsdp_size_wrap_needs_size(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """auto_wrap_policy: SIZE_BASED_WRAP without min_num_params: there is no size to wrap by."""
    fsdp = cfg.fsdp_config
    if fsdp is not None and fsdp.auto_wrap_policy == "SIZE_BASED_WRAP" and fsdp.min_num_params is None:
        return _err(
            "HB169",
            "fsdp_config.auto_wrap_policy: SIZE_BASED_WRAP needs fsdp_config.min_num_params, the "
            "parameters a module must have to be sharded as a unit.",
            "Set min_num_params (e.g. 100000000), or use TRANSFORMER_BASED_WRAP.",
            "fsdp_config.min_num_params",
        )
    return []


@rule
def deepspeed_json(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """The `deepspeed:` JSON must be readable, name a ZeRO stage 0–3, and agree with the config on
    what the loop owns (micro-batch, accumulation, global batch, clipping, precision); its
    "auto" values are filled from the config. Its optimizer and scheduler blocks are not used, and
    offloading does nothing on a machine without a GPU."""
    if raw.deepspeed is None:
        return []
    model_cfg = read_model_config(cfg.base_model_config or cfg.base_model) or {}
    values = loop_values(cfg, model_cfg.get("hidden_size"))
    try:
        completed = complete(read_deepspeed_config(raw.deepspeed), values)
    except DeepSpeedConfigError as exc:
        return _err(
            "HB174",
            str(exc)[:400],
            "Fix the DeepSpeed JSON: leave batch, clipping and precision values at \"auto\" (hellbender "
            "fills them from its keys), or make them agree.",
            "deepspeed",
        )
    out: list[Finding] = []
    if completed.ignored:
        blocks = " and ".join(completed.ignored)
        out += _warn(
            "HB175",
            f"deepspeed: the JSON's {blocks} block is not used: hellbender builds the optimizer and the "
            "learning-rate schedule from its own keys and hands them to DeepSpeed.",
            "Set optimizer, learning_rate, lr_scheduler, warmup_steps… in the hellbender config, and "
            f"remove the {blocks} block from the JSON.",
            "deepspeed",
        )
    moved = offloads(completed.config)
    if moved and not hw.cuda and cfg.distributed_strategy == "deepspeed":
        out += _warn(
            "HB176",
            f"deepspeed: {', '.join(moved)} moves state to CPU memory; on {hw.description} it is there "
            "already (the run is the same, only slower).",
            "Remove the offload blocks on a machine without a GPU.",
            "deepspeed",
        )
    return out


DDP_OPTIONS = ("ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers")


@rule
def distributed_options_without_effect(
    cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig
) -> list[Finding]:
    """Distributed options that the chosen strategy or the other options make meaningless: DDP
    options under FSDP2, `ddp: true` with FSDP, layer classes without transformer wrapping,
    min_num_params without size wrapping, unpinned or any offloading without a GPU, and
    fsdp_final_state_dict_type without FSDP. Each would be silently ignored."""
    out: list[Finding] = []
    strategy = cfg.distributed_strategy
    ddp_set = [k for k in DDP_OPTIONS if getattr(raw, k) is not None]
    if strategy in ("fsdp2", "deepspeed") and ddp_set:
        out += _warn(
            "HB170",
            f"{', '.join(ddp_set)}: DDP options have no effect under {strategy}.",
            "Remove them.",
            ddp_set[0],
        )
    if strategy == "fsdp2" and raw.ddp:
        out += _warn(
            "HB170",
            "`ddp: true` with FSDP: FSDP2 shards the model and runs data parallel itself; no DDP wrapper "
            "is used.",
            "Remove `ddp`.",
            "ddp",
        )
    if raw.fsdp_final_state_dict_type is not None and not fsdp_requested(raw):
        out += _warn(
            "HB170",
            "fsdp_final_state_dict_type without FSDP has no effect.",
            "Remove it.",
            "fsdp_final_state_dict_type",
        )
    fsdp = cfg.fsdp_config
    if fsdp is None:
        return out
    if fsdp.transformer_layer_cls_to_wrap and fsdp.auto_wrap_policy != "TRANSFORMER_BASED_WRAP":
        out += _warn(
            "HB170",
            f"fsdp_config.transformer_layer_cls_to_wrap has no effect with auto_wrap_policy "
            f"{fsdp.auto_wrap_policy}.",
            "Remove it, or set auto_wrap_policy: TRANSFORMER_BASED_WRAP.",
            "fsdp_config.transformer_layer_cls_to_wrap",
        )
    if fsdp.min_num_params is not None and fsdp.auto_wrap_policy != "SIZE_BASED_WRAP":
        out += _warn(
            "HB170",
            f"fsdp_config.min_num_params has no effect with auto_wrap_policy {fsdp.auto_wrap_policy}.",
            "Remove it, or set auto_wrap_policy: SIZE_BASED_WRAP.",
            "fsdp_config.min_num_params",
        )
    if not fsdp.cpu_offload_pin_memory and not fsdp.offload_params:
        out += _warn(
            "HB170",
            "fsdp_config.cpu_offload_pin_memory: false has no effect without offload_params: true.",
            "Remove it, or set offload_params: true.",
            "fsdp_config.cpu_offload_pin_memory",
        )
    if fsdp.cpu_ram_efficient_loading and strategy == "fsdp2" and (cfg.load_in_4bit or cfg.load_in_8bit):
        out += _warn(
            "HB170",
            "fsdp_config.cpu_ram_efficient_loading has no effect with a 4/8-bit base: bitsandbytes "
            "quantizes the weights while they load, so every rank loads its own copy.",
            "Remove it, or make sure the machine's RAM holds one quantized model per rank.",
            "fsdp_config.cpu_ram_efficient_loading",
        )
    if fsdp.final_state_dict_type == "SHARDED_STATE_DICT":
        out += _warn(
            "HB170",
            "fsdp_config.final_state_dict_type: SHARDED_STATE_DICT: hellbender always gathers the final "
            "weights into one model (or adapter) that loads in one process, as a run without FSDP "
            "writes them; checkpoints follow state_dict_type.",
            "Remove final_state_dict_type (or set FULL_STATE_DICT).",
            "fsdp_config.final_state_dict_type",
        )
    if strategy == "fsdp2" and fsdp.offload_params and not hw.cuda:
        out += _warn(
            "HB170",
            f"fsdp_config.offload_params moves parameters to CPU memory; on {hw.description} they are "
            "there already.",
            "Remove offload_params on a machine without a GPU.",
            "fsdp_config.offload_params",
        )
    return out


@rule
def distributed_options_on_one_process(
    cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig
) -> list[Finding]:
    """FSDP or DDP options in a run of one process: there is nothing to shard or synchronise, the
    run trains alone. Said, so a run meant for several GPUs that was launched on one is noticed."""
    if cfg.distributed_strategy != "single":
        return []
    asked = [
        k
        for k in ("fsdp", "fsdp_config", "fsdp_version", "deepspeed", *DDP_OPTIONS, "ddp_timeout")
        if k in raw.model_fields_set and getattr(raw, k) not in (None, [])
    ]
    if raw.ddp:
        asked.insert(0, "ddp")
    if not asked:
        return []
    return [
        Finding(
            "HB171",
            "info",
            f"{', '.join(asked)} set, but this is one process: nothing to shard or synchronise, the "
            "run trains alone.",
            "Launch several: `hellbender train CONFIG --nproc-per-node N` (or torchrun); check the "
            "config for N processes with `hellbender validate CONFIG --world-size N`.",
            asked[0],
        )
    ]


@rule
def ddp_off_with_several_processes(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """`ddp: false` with several processes and no FSDP: without DDP each rank would train its own
    copy of the model on its share of the data, which is never what is wanted."""
    if raw.ddp is False and cfg.distributed_strategy == "ddp":
        return _err(
            "HB172",
            f"`ddp: false` with {cfg.world_size} processes and no FSDP: each rank would train its own "
            "copy of the model.",
            "Remove `ddp: false` (several processes without FSDP run DDP), or launch one process.",
            "ddp",
        )
    return []


@rule
def dtype_conflict(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """bf16: true and fp16: true together: only one training dtype can be used."""
    if raw.bf16 is True and raw.fp16:
        return _err("HB113", "bf16 and fp16 are both true.", "Keep one (bf16: auto picks for you).", "bf16")
    return []


@rule
def bf16_hardware(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """bf16: true on hardware without bf16: an error on a CUDA GPU without it, a warning on a CPU
    (emulated, slow)."""
    if raw.bf16 is not True:
        return []
    if hw.cuda and not hw.cuda_bf16:
        return _err(
            "HB114",
            f"bf16: true but {hw.description} has no bf16.",
            "Use bf16: auto (falls back to fp16).",
            "bf16",
        )
    if not hw.cuda and not hw.cpu_bf16:
        return _warn(
            "HB114",
            "bf16: true on a CPU without AVX-512-BF16/AMX: bf16 is emulated and slower than fp32.",
            "Use bf16: auto.",
            "bf16",
        )
    return []


@rule
def fp16_on_cpu(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """fp16 training needs a GPU: there is no fp16 matmul path or loss scaling on CPU."""
    if cfg.fp16 and not hw.cuda:
        return _err(
            "HB115",
            "fp16 training needs a GPU (no fp16 matmul path or loss scaling on CPU).",
            "Use bf16: auto.",
            "fp16",
        )
    return []


@rule
def tf32_on_cpu(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """tf32 only affects NVIDIA GPUs; on other hardware it does nothing."""
    if cfg.tf32 and not hw.cuda:
        return _warn("HB116", "tf32 has no effect without an NVIDIA GPU.", "Remove tf32.", "tf32")
    return []


@rule
def one_loss_replacement(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """At most one loss replacement (chunked, cut, Liger, fused Liger) can compute the loss."""
    on = [k for k in LOSS_REPLACEMENTS if getattr(cfg, k)]
    if len(on) > 1:
        return _err("HB117", f"more than one loss replacement is on: {', '.join(on)}.", "Keep one.", on[0])
    return []


@rule
def two_mlp_replacements(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """liger_glu_activation and lora_mlp_kernel both replace the MLP forward; only one can."""
    if cfg.liger_glu_activation and cfg.lora_mlp_kernel:
        return _err(
            "HB118",
            "liger_glu_activation and lora_mlp_kernel both replace the MLP forward; only one can run.",
            "Keep one (lora_mlp_kernel for a LoRA run, liger_glu_activation otherwise).",
            "lora_mlp_kernel",
        )
    return []


@rule
def cut_cross_entropy_installed(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """cut_cross_entropy needs the cut-cross-entropy package (checked without importing it)."""
    if cfg.cut_cross_entropy:
        from importlib.util import find_spec

        if find_spec("cut_cross_entropy") is None:
            if not hw.local:  # checked for another machine: what is installed here says nothing
                return _warn(
                    "HB119",
                    "cut_cross_entropy: true needs the cut-cross-entropy package (not installed on this "
                    f"machine; the target, {hw.description}, needs it).",
                    "pip install 'hellbender[gpu]' on the machine that trains.",
                    "cut_cross_entropy",
                )
            return _err(
                "HB119",
                "cut_cross_entropy: true needs the cut-cross-entropy package, which is not installed.",
                "pip install 'hellbender[gpu]' (or use chunked_cross_entropy, which needs nothing).",
                "cut_cross_entropy",
            )
    return []


@rule
def attention_on_cpu(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """GPU-only attention backends (flash attention, xformers) on a machine without CUDA, and
    flex_attention, which has no backward on CPU."""
    if hw.cuda:
        return []
    if cfg.attn_implementation in GPU_ONLY_BACKENDS:
        return _err(
            "HB130",
            f"attn_implementation {cfg.attn_implementation} needs a CUDA GPU; "
            f"this machine is {hw.description}.",
            "Use attn_implementation: sdpa on CPU.",
            "attn_implementation",
        )
    if cfg.attn_implementation == "flex_attention":
        return _err(
            "HB131",
            "flex_attention has no backward pass on CPU (torch 2.13): it cannot train here.",
            "Use attn_implementation: sdpa on CPU (it isolates packed documents exactly too).",
            "attn_implementation",
        )
    return []


@rule
def packing_without_padding(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """sample_packing with pad_to_sequence_len: false gives batches of varying shape
    (fragmentation, recompiles)."""
    if cfg.sample_packing and raw.pad_to_sequence_len is False:
        return _warn(
            "HB133",
            "sample_packing with pad_to_sequence_len: false gives batches of varying shape "
            "(allocator fragmentation, recompilation with torch_compile).",
            "Remove pad_to_sequence_len (it defaults to true with packing).",
            "pad_to_sequence_len",
        )
    return []


@rule
def liger_on_cpu(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """Liger kernels are Triton GPU kernels and cannot run without CUDA."""
    on = [k for k in HellbenderConfig.model_fields if k.startswith("liger_") and getattr(cfg, k)]
    if on and not hw.cuda:
        return _err(
            "HB134",
            f"{', '.join(on)}: Liger kernels are Triton GPU kernels; this machine is {hw.description}.",
            "Remove the liger_* keys on CPU (chunked_cross_entropy saves the same loss memory).",
            on[0],
        )
    return []


@rule
def lora_keys_without_adapter(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """LoRA/PEFT keys set without an adapter are ignored by a full fine-tune, which is usually not
    what was meant."""
    lora_keys = [
        k
        for k in raw.model_fields_set
        if (k.startswith("lora_") or k.startswith("peft_")) and k != "lora_model_dir"
    ]
    if lora_keys and cfg.adapter is None:
        return _warn(
            "HB135",
            f"{', '.join(sorted(lora_keys))} set but adapter is not: "
            "this is a full fine-tune and they are ignored.",
            "Set adapter: lora, or remove the LoRA keys.",
            sorted(lora_keys)[0],
        )
    return []


@rule
def adapter_without_targets(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """An adapter without lora_target_modules/lora_target_linear falls back to peft's
    per-architecture defaults (often only q_proj and v_proj)."""
    if cfg.adapter and not cfg.lora_target_modules and not cfg.lora_target_linear and not cfg.lora_model_dir:
        return _warn(
            "HB136",
            "adapter set without lora_target_modules or lora_target_linear: peft's per-architecture "
            "default targets are used (often only q_proj and v_proj).",
            "Set lora_target_linear: true to adapt every linear layer.",
            "lora_target_modules",
        )
    return []


@rule
def no_datasets(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """A training run needs at least one training dataset."""
    if not cfg.datasets:
        return _err(
            "HB137",
            "no training datasets (`datasets:` is empty).",
            "Add at least one entry under datasets:.",
            "datasets",
        )
    return []


@rule
def two_eval_sources(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """val_set_size and test_datasets both define the evaluation set; which one is used would be ambiguous."""
    if cfg.val_set_size > 0 and cfg.test_datasets:
        return _err(
            "HB138",
            "val_set_size and test_datasets are both set: which one is the evaluation set is ambiguous.",
            "Keep one of them.",
            "val_set_size",
        )
    return []


@rule
def steps_and_per_epoch(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """save_steps with saves_per_epoch, or eval_steps with evals_per_epoch: two schedules for one thing."""
    out: list[Finding] = []
    if cfg.save_steps is not None and cfg.saves_per_epoch is not None:
        out += _err("HB139", "save_steps and saves_per_epoch are both set.", "Keep one.", "save_steps")
    if cfg.eval_steps is not None and cfg.evals_per_epoch is not None:
        out += _err("HB139", "eval_steps and evals_per_epoch are both set.", "Keep one.", "eval_steps")
    return out


@rule
def max_steps_and_epochs(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """max_steps with an explicit num_epochs: the run stops at whichever comes first."""
    if cfg.max_steps is not None and "num_epochs" in raw.model_fields_set:
        return _warn(
            "HB140",
            "max_steps and num_epochs are both set: training stops at whichever comes first.",
            "Keep one to make the run length obvious.",
            "max_steps",
        )
    return []


@rule
def deprecated_aliases(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """Deprecated aliases (dataset_processes, sequence_parallel_degree) still work but should be renamed."""
    out: list[Finding] = []
    if raw.dataset_processes is not None:
        out += _warn(
            "HB141", "dataset_processes is deprecated.", "Rename it to dataset_num_proc.", "dataset_processes"
        )
    if raw.sequence_parallel_degree is not None:
        out += _warn(
            "HB141",
            "sequence_parallel_degree is deprecated.",
            "Rename it to context_parallel_size.",
            "sequence_parallel_degree",
        )
    return out


@rule
def save_limit_without_saving(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """save_total_limit with save_strategy: no has nothing to limit."""
    if cfg.save_total_limit is not None and cfg.save_strategy == "no":
        return _warn(
            "HB142",
            "save_total_limit with save_strategy: no has no effect.",
            "Remove one.",
            "save_total_limit",
        )
    return []


@rule
def resume_both(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """resume_from_checkpoint with auto_resume_from_checkpoints: the explicit path wins, the other
    is ignored."""
    if cfg.resume_from_checkpoint and cfg.auto_resume_from_checkpoints:
        return _warn(
            "HB143",
            "resume_from_checkpoint and auto_resume_from_checkpoints are both set; the explicit path wins.",
            "Keep one.",
            "resume_from_checkpoint",
        )
    return []


@rule
def adamw_8bit_needs_bnb(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """adamw_8bit, the paged optimizers and 4/8-bit bases need bitsandbytes installed (checked
    without importing it)."""
    if cfg.optimizer in BNB_OPTIMIZERS or cfg.load_in_4bit or cfg.load_in_8bit:
        from importlib.util import find_spec

        if find_spec("bitsandbytes") is None:
            if not hw.local:  # checked for another machine: what is installed here says nothing
                return _warn(
                    "HB144",
                    "this config needs bitsandbytes (adamw_8bit or a 4/8-bit base), not installed on this "
                    f"machine; the target, {hw.description}, needs it.",
                    "pip install 'hellbender[quant]' on the machine that trains.",
                    "optimizer" if cfg.optimizer in BNB_OPTIMIZERS else "load_in_4bit",
                )
            return _err(
                "HB144",
                "this config needs bitsandbytes (adamw_8bit or a 4/8-bit base), which is not installed.",
                "pip install 'hellbender[quant]'",
                "optimizer" if cfg.optimizer in BNB_OPTIMIZERS else "load_in_4bit",
            )
    return []


@rule
def prefetch_without_workers(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """dataloader_prefetch_factor is how far each worker collates ahead: without workers, nothing."""
    if cfg.dataloader_prefetch_factor is not None and cfg.dataloader_num_workers == 0:
        return _warn(
            "HB180",
            "dataloader_prefetch_factor has no effect without dataloader_num_workers (batches are "
            "collated in the training process).",
            "Set dataloader_num_workers, or remove dataloader_prefetch_factor.",
            "dataloader_prefetch_factor",
        )
    return []


@rule
def pin_memory_without_cuda(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """Page-locked batches only speed up copies to a CUDA device; on CPU the key does nothing."""
    if "dataloader_pin_memory" in raw.model_fields_set and cfg.dataloader_pin_memory and not hw.cuda:
        return [
            Finding(
                "HB181",
                "info",
                f"dataloader_pin_memory has no effect on {hw.description}: batches stay where they are "
                "collated (pinning only speeds up copies to a CUDA GPU).",
                "Nothing to do; it applies when the run has a CUDA GPU.",
                "dataloader_pin_memory",
            )
        ]
    return []


@rule
def eval_samples_sharded(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """eval_table_size generates on rank 0 alone: a model sharded over the ranks (FSDP2, DeepSpeed)
    cannot run a forward on one rank."""
    if cfg.eval_table_size and cfg.distributed_strategy in ("fsdp2", "deepspeed"):
        return _err(
            "HB182",
            f"eval_table_size (sample generations at evaluation) is not supported with "
            f"{cfg.distributed_strategy}: rank 0 generates alone, and its model is sharded over the ranks.",
            "Remove eval_table_size, or train with DDP or one process.",
            "eval_table_size",
        )
    return []


@rule
def unfrozen_parameters_full_finetune(
    cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig
) -> list[Finding]:
    """unfrozen_parameters picks what a full fine-tune trains; an adapter already trains only its own
    weights, so the two together would freeze the adapter or train base weights by surprise."""
    if cfg.unfrozen_parameters and cfg.adapter is not None:
        return _err(
            "HB124",
            f"unfrozen_parameters selects what a full fine-tune trains; with adapter: {cfg.adapter} the "
            "adapter's weights are what trains.",
            "Remove unfrozen_parameters, or remove adapter for a partial full fine-tune "
            "(lora_modules_to_save trains whole modules next to an adapter).",
            "unfrozen_parameters",
        )
    return []


@rule
def unfrozen_parameters_patterns(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """Each unfrozen_parameters entry must be a regex; Axolotl's row ranges (`name$[:32000]`, a
    gradient mask on part of a tensor) are not supported."""
    out: list[Finding] = []
    for index, pattern in enumerate(cfg.unfrozen_parameters or []):
        try:
            unfrozen_pattern(pattern)
        except UnfrozenPatternError as exc:
            out += _err(
                "HB125",
                f"unfrozen_parameters[{index}] {quote(pattern)}: {exc}.",
                "Write a regex over parameter names, e.g. `^model.layers.1[0-9]+.mlp.` or `lm_head`.",
                "unfrozen_parameters",
            )
    return out


@rule
def group_by_length_with_packing(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """With sample_packing the packer fills rows by length already; group_by_length only orders
    unpacked samples (as in Axolotl, whose multipack sampler ignores it)."""
    if cfg.group_by_length and cfg.sample_packing:
        return _warn(
            "HB127",
            "group_by_length has no effect with sample_packing: packed rows are already filled by length.",
            "Remove group_by_length, or set sample_packing: false to batch samples of similar length.",
            "group_by_length",
        )
    return []


@rule
def best_model_needs_evaluation(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """early_stopping_patience and load_best_model_at_end decide on evaluation losses: without
    evaluations they would silently do nothing."""
    has_evaluations = (cfg.val_set_size > 0 or bool(cfg.test_datasets)) and cfg.eval_strategy != "no"
    asked = [k for k in ("early_stopping_patience", "load_best_model_at_end") if getattr(cfg, k)]
    if asked and not has_evaluations:
        return _err(
            "HB126",
            f"{' and '.join(asked)} compare evaluation losses, but this config never evaluates.",
            "Set val_set_size or test_datasets (and eval_steps / evals_per_epoch), or remove "
            f"{', '.join(asked)}.",
            asked[0],
        )
    return []


@rule
def eval_samples_without_data(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """eval_table_size generates for evaluation prompts: without evaluation data, never."""
    if cfg.eval_table_size and not (cfg.val_set_size > 0 or cfg.test_datasets):
        return _warn(
            "HB184",
            "eval_table_size set but there is no evaluation data: no sample generations will be written.",
            "Set val_set_size or test_datasets, or remove eval_table_size.",
            "eval_table_size",
        )
    return []


@rule
def hub_options_without_repo(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """hub_strategy, push_to_hub and hub_private_repo say how to push to hub_model_id: without it,
    nothing is pushed."""
    given = [k for k in ("hub_strategy", "push_to_hub", "hub_private_repo") if k in raw.model_fields_set]
    if given and cfg.hub_model_id is None and not (given == ["hub_private_repo"] and cfg.push_dataset_to_hub):
        return _warn(
            "HB183",
            f"{', '.join(given)} without hub_model_id: no model is pushed to the Hub.",
            "Set hub_model_id to the repository to push to, or remove them.",
            given[0],
        )
    return []


# ------------------------------------------------------------------ context parallelism

# How Axolotl's ring_attn_func cuts a row: zigzag (2N chunks) or another layout (N shares). The same
# mapping as hellbender.distributed.context_parallel.AXOLOTL_RING_ATTN_FUNCS (a later stage than
# config; tests/unit/test_context_parallel_training_pieces.py checks the two agree).
_ZIGZAG_RING_ATTN_FUNCS = ("varlen_llama3", "batch_zigzag")


def context_parallel_multiple(cfg: ResolvedConfig) -> int:
    """What a row's length must be a multiple of for ``cfg``'s context-parallel layout: 2·cp for
    zigzag (the ring's default with sample_packing), cp for contiguous, stripe and Ulysses."""
    cp = cfg.context_parallel_size
    if cfg.context_parallel_strategy == "ulysses":
        return cp
    func = cfg.ring_attn_func or ("varlen_llama3" if cfg.sample_packing else "batch_ring")
    return 2 * cp if func in _ZIGZAG_RING_ATTN_FUNCS else cp


@rule
def context_parallel_keys(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """ring_attn_func and heads_k_stride configure the ring: an error with Ulysses, and like
    context_parallel_strategy, no effect (a warning) without context parallelism."""
    given = [
        k
        for k in ("context_parallel_strategy", "ring_attn_func", "heads_k_stride")
        if k in raw.model_fields_set
    ]
    if cfg.context_parallel_size == 1:
        if given:
            return _warn(
                "HB155",
                f"{', '.join(given)} {'configures' if len(given) == 1 else 'configure'} context "
                "parallelism, which is off (context_parallel_size 1).",
                "Remove them, or set context_parallel_size to the ranks that split each sequence.",
                given[0],
            )
        return []
    ring_only = [k for k in ("ring_attn_func", "heads_k_stride") if getattr(cfg, k) is not None]
    if cfg.context_parallel_strategy == "ulysses" and ring_only:
        return _err(
            "HB155",
            f"{', '.join(ring_only)} {'configures' if len(ring_only) == 1 else 'configure'} the ring "
            "strategy; context_parallel_strategy is ulysses.",
            f"Remove {', '.join(ring_only)}, or set context_parallel_strategy: ring.",
            ring_only[0],
        )
    return []


@rule
def context_parallel_sequence_len(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """Context parallelism cuts every row into equal shares. Rows padded to sequence_len
    (pad_to_sequence_len, the default with packing) need a sequence_len the layout can cut; rows of
    varying width are padded to a multiple by the loop instead (never-trained padding)."""
    if cfg.context_parallel_size == 1 or not cfg.pad_to_sequence_len:
        return []
    multiple = context_parallel_multiple(cfg)
    if cfg.sequence_len % multiple == 0:
        return []
    layout = (
        "zigzag: 2 chunks per rank" if multiple == 2 * cfg.context_parallel_size else "one share per rank"
    )
    above = cfg.sequence_len + (-cfg.sequence_len % multiple)
    return _err(
        "HB153",
        f"sequence_len {cfg.sequence_len} cannot be cut into equal shares for context_parallel_size "
        f"{cfg.context_parallel_size} ({layout}): it must be a multiple of {multiple}.",
        f"Set sequence_len to a multiple of {multiple}, e.g. {above}.",
        "sequence_len",
    )


@rule
def context_parallel_unsupported(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """What context parallelism does not run with yet: DeepSpeed (its engine has sequence-parallel
    groups of its own; DDP and FSDP2 over the dp × cp ranks are implemented and tested),
    torch_compile, the losses that shift labels inside their kernels (cut, liger), an attention
    backend other than sdpa/eager (CP replaces it with its own ring/Ulysses attention), and
    eval_table_size (rank 0 would generate alone with an attention that needs its group)."""
    if cfg.context_parallel_size == 1:
        return []
    reasons: list[tuple[str, str]] = []
    if cfg.distributed_strategy == "deepspeed":
        reasons.append(("deepspeed", "DeepSpeed (its engine has its own sequence-parallel groups)"))
    if cfg.torch_compile:
        reasons.append(("torch_compile", "torch_compile"))
    if cfg.loss_method not in ("plain", "chunked"):
        reasons.append(("loss_method", f"the {cfg.loss_method} loss (it shifts labels inside its kernel)"))
    if cfg.attn_implementation not in ("sdpa", "eager"):
        reasons.append(("attn_implementation", f"attn_implementation {cfg.attn_implementation}"))
    if cfg.eval_table_size:
        reasons.append(("eval_table_size", "eval_table_size (sample generations)"))
    if not reasons:
        return []
    return _err(
        "HB156",
        f"context parallelism (context_parallel_size {cfg.context_parallel_size}) is not supported with "
        f"{'; '.join(r for _, r in reasons)}.",
        "Remove it, or train without context parallelism. Context parallelism runs with DDP or "
        "FSDP2, the plain or chunked loss, and attn_implementation sdpa or eager, whose attention "
        "it replaces with its own.",
        reasons[0][0],
    )


@rule
def not_yet_implemented(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """Options that parse (so Axolotl configs load) but whose feature has not landed: setting one is
    an error, never a silent no-op."""
    defaults = HellbenderConfig.model_fields
    # N-D sizes that describe what the run does anyway ask for nothing more: no replica groups, and
    # FSDP2 sharding over every data-parallel rank (or DDP and a single process sharding nothing)
    plain = {
        "dp_replicate_size": 1,
        "dp_shard_size": cfg.data_parallel_size if cfg.distributed_strategy == "fsdp2" else 1,
    }
    out: list[Finding] = []
    for key, feature in NOT_YET_IMPLEMENTED.items():
        value = getattr(raw, key)
        # every key asks for its feature by differing from its default
        if key in raw.model_fields_set and value != defaults[key].default and value != plain.get(key):
            out += _err(
                "HB199",
                f"`{key}` ({feature}) is recognised but not supported by this hellbender release yet.",
                f"Remove `{key}`.",
                key,
            )
    return out


# ------------------------------------------------------------------ rules that read the model config


@rule
def sequence_len_vs_model(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """sequence_len beyond the model's max_position_embeddings without rope_scaling. Reads
    config.json or GGUF metadata only, never weights; reports that it was skipped when the model
    config cannot be read (hub id offline, private)."""
    model_cfg = read_model_config(cfg.base_model_config or cfg.base_model)
    if model_cfg is None:
        return [
            Finding(
                "HB150",
                "info",
                f"model config of {quote(cfg.base_model)} not readable here (hub id offline, or private): "
                "model-dependent checks skipped.",
                key="base_model",
            )
        ]
    overrides = cfg.overrides_of_model_config or {}
    limit = overrides.get("max_position_embeddings", model_cfg.get("max_position_embeddings"))
    scaled = overrides.get("rope_scaling") or model_cfg.get("rope_scaling")
    try:
        limit = int(limit) if limit is not None else None
    except (TypeError, ValueError, OverflowError):  # a malformed value (or inf) is not ours to judge here
        limit = None
    if limit and cfg.sequence_len > limit and not scaled:
        return _warn(
            "HB145",
            f"sequence_len {cfg.sequence_len} exceeds the model's max_position_embeddings {limit} "
            "and no rope_scaling is set: quality degrades past the trained length.",
            "Lower sequence_len, or set overrides_of_model_config.rope_scaling.",
            "sequence_len",
        )
    return []


@rule
def context_parallel_vs_model(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig) -> list[Finding]:
    """What context parallelism needs of the model (config.json; skipped when unreadable, HB150
    says so): Ulysses splits the attention heads over the ranks, heads_k_stride must divide the
    key/value heads, and the ring/Ulysses attention has no attention dropout."""
    if cfg.context_parallel_size == 1:
        return []
    model_cfg = read_model_config(cfg.base_model_config or cfg.base_model)
    if model_cfg is None:
        return []
    model_cfg = {**model_cfg, **(cfg.overrides_of_model_config or {})}
    cp = cfg.context_parallel_size
    heads, kv_heads = model_cfg.get("num_attention_heads"), model_cfg.get("num_key_value_heads")
    kv_heads = kv_heads if kv_heads is not None else heads
    out: list[Finding] = []
    if cfg.context_parallel_strategy == "ulysses" and isinstance(heads, int) and heads % cp:
        out += _err(
            "HB154",
            f"context_parallel_strategy ulysses splits the model's {heads} attention heads over "
            f"context_parallel_size {cp} ranks, which does not divide them.",
            f"Use context_parallel_strategy: ring, or a context_parallel_size dividing {heads}.",
            "context_parallel_strategy",
        )
    stride = cfg.heads_k_stride
    if stride is not None and isinstance(kv_heads, int) and kv_heads % stride:
        out += _err(
            "HB154",
            f"heads_k_stride {stride} does not divide the model's {kv_heads} key/value heads.",
            f"Use a divisor of {kv_heads} (1 exchanges one head at a time), or remove heads_k_stride.",
            "heads_k_stride",
        )
    dropout = model_cfg.get("attention_dropout")
    if isinstance(dropout, int | float) and dropout > 0:
        out += _err(
            "HB154",
            f"the model's attention_dropout is {dropout}; context parallelism's attention has no dropout.",
            "Set overrides_of_model_config: {attention_dropout: 0.0}, or train without context parallelism.",
            "context_parallel_size",
        )
    return out


def check(cfg: ResolvedConfig, hw: Hardware, raw: HellbenderConfig | None = None) -> list[Finding]:
    """Run every rule. ``raw`` is the config as the user wrote it (defaults to ``cfg``)."""
    raw = raw if raw is not None else cfg
    findings: list[Finding] = []
    for fn in RULES:
        findings += fn(cfg, hw, raw)
    return findings
