"""Everything derived from other keys, computed in one function: :func:`normalize`.

Derived values are never stored by the user and never recomputed elsewhere: the batch-size
identity, the evaluation batch, padding for packed data, the resolved dtype, attention backend
and loss implementation, the data-parallel size, whether epochs bound the run. ``normalize``
returns a :class:`~hellbender.config.schema.ResolvedConfig`, whose derived fields are never
Optional. The hardware is passed in (``Hardware``) so every branch is testable on a CPU machine.
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from typing import Any

from hellbender.config.findings import Finding, quote
from hellbender.config.hardware import Hardware, detect_hardware
from hellbender.config.schema import (
    FSDP1_ONLY_OPTIONS,
    LOSS_REPLACEMENTS,
    OPTIMIZER_ALIASES,
    AttnImplementation,
    ComputeDtype,
    DatasetConfig,
    DistributedStrategy,
    FSDPConfig,
    HellbenderConfig,
    LossMethod,
    ResolvedConfig,
    legacy_fsdp_keys,
)

DEFAULT_ATTN: AttnImplementation = "sdpa"
LEGACY_ATTN_FLAGS: dict[str, AttnImplementation] = {
    "flash_attention": "flash_attention_2",
    "flex_attention": "flex_attention",
    "sdp_attention": "sdpa",
    "xformers_attention": "xformers",
    "eager_attention": "eager",
}


def resolve_dtype(bf16: bool | str, fp16: bool, hw: Hardware) -> ComputeDtype:
    """``bf16: auto`` → bf16 when the hardware has it (CUDA: else fp16; CPU: else fp32)."""
    if fp16:
        return "float16"
    if bf16 == "auto":
        if hw.cuda:
            return "bfloat16" if hw.cuda_bf16 else "float16"
        return "bfloat16" if hw.cpu_bf16 else "float32"
    return "bfloat16" if bf16 else "float32"


def allocator_setting(torch_version: str | None) -> tuple[str, str] | None:
    """The allocator environment variable and value for this torch, or None if too old.

    torch >= 2.9 reads PYTORCH_ALLOC_CONF (the CUDA name is deprecated); 2.2-2.8 read
    PYTORCH_CUDA_ALLOC_CONF. Expandable segments cut fragmentation when shapes vary.
    """
    if not torch_version:
        return None
    match = re.match(r"(\d+)\.(\d+)", torch_version)
    if not match:
        return None
    version = (int(match.group(1)), int(match.group(2)))
    value = "expandable_segments:True,roundup_power2_divisions:16"
    if version >= (2, 9):
        return "PYTORCH_ALLOC_CONF", value
    if version >= (2, 2):
        return "PYTORCH_CUDA_ALLOC_CONF", value
    return None


def configure_allocator_env(environ: dict[str, str] | None = None) -> str | None:
    """Set the allocator variable at process start, only if the user set neither. Returns its name."""
    env = os.environ if environ is None else environ
    if "PYTORCH_ALLOC_CONF" in env or "PYTORCH_CUDA_ALLOC_CONF" in env:
        return None
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None
    setting = allocator_setting(version)
    if setting is None:
        return None
    env[setting[0]] = setting[1]
    return setting[0]


def _resolve_attention(cfg: HellbenderConfig, findings: list[Finding]) -> AttnImplementation:
    chosen: dict[str, AttnImplementation] = {}
    if cfg.attn_implementation:
        chosen["attn_implementation"] = cfg.attn_implementation
    for flag, backend in LEGACY_ATTN_FLAGS.items():
        if getattr(cfg, flag):
            chosen[flag] = backend
            findings.append(
                Finding(
                    "HB102",
                    "warning",
                    f"`{flag}: true` is a legacy flag; it means `attn_implementation: {backend}`.",
                    fix=f"Replace it with `attn_implementation: {backend}` "
                    "(hellbender validate --fix does this).",
                    key=flag,
                )
            )
    backends = set(chosen.values())
    if len(backends) > 1:
        listed = ", ".join(f"{k} → {v}" for k, v in chosen.items())
        findings.append(
            Finding(
                "HB101",
                "error",
                f"more than one attention backend is selected ({listed}); only one can run.",
                fix="Keep exactly one: set `attn_implementation` and remove the legacy flags.",
                key="attn_implementation",
            )
        )
    return next(iter(backends)) if len(backends) == 1 else (cfg.attn_implementation or DEFAULT_ATTN)


def _batch_sizes(cfg: HellbenderConfig, dp_world: int, findings: list[Finding]) -> tuple[int, int]:
    """Return (gradient_accumulation_steps, batch_size) from the identity mbs × gas × dp = bs."""
    mbs = cfg.micro_batch_size
    gas = cfg.gradient_accumulation_steps
    if cfg.batch_size is None:
        gas = gas or 1
        return gas, mbs * gas * dp_world
    per_step = mbs * dp_world
    if gas is not None:
        if mbs * gas * dp_world != cfg.batch_size:
            findings.append(
                Finding(
                    "HB122",
                    "error",
                    f"batch_size {cfg.batch_size} ≠ micro_batch_size {mbs} × gradient_accumulation_steps "
                    f"{gas} × data-parallel ranks {dp_world} = {mbs * gas * dp_world}.",
                    fix="Remove `batch_size`; it is derived from the other two.",
                    key="batch_size",
                )
            )
        else:
            # consistent, but setting batch_size is still deprecated: say so, like the derived case
            findings.append(
                Finding(
                    "HB120",
                    "warning",
                    f"setting batch_size is deprecated; it already equals micro_batch_size {mbs} × "
                    f"gradient_accumulation_steps {gas} × data-parallel ranks {dp_world}.",
                    fix="Remove `batch_size` (hellbender validate --fix does this).",
                    key="batch_size",
                )
            )
        return gas, mbs * gas * dp_world
    if cfg.batch_size % per_step:
        findings.append(
            Finding(
                "HB121",
                "error",
                f"batch_size {cfg.batch_size} is not divisible by micro_batch_size {mbs} × "
                f"data-parallel ranks {dp_world} = {per_step}.",
                fix=f"Set gradient_accumulation_steps so that {mbs} × gas × {dp_world} "
                "is the batch you want.",
                key="batch_size",
            )
        )
        return 1, per_step
    gas = cfg.batch_size // per_step
    findings.append(
        Finding(
            "HB120",
            "warning",
            f"setting batch_size is deprecated; derived gradient_accumulation_steps = {cfg.batch_size} / "
            f"{mbs} / {dp_world} = {gas}.",
            fix=f"Replace `batch_size: {cfg.batch_size}` with `gradient_accumulation_steps: {gas}` "
            "(hellbender validate --fix does this).",
            key="batch_size",
        )
    )
    return gas, cfg.batch_size


def _legacy_message_fields(ds: DatasetConfig, path: str, findings: list[Finding]) -> DatasetConfig:
    """Axolotl's older message_field_role/content keys → message_property_mappings."""
    if not (ds.message_field_role or ds.message_field_content):
        return ds
    mapping = ds.message_property_mappings.model_copy(
        update={
            k: v
            for k, v in (("role", ds.message_field_role), ("content", ds.message_field_content))
            if v is not None
        }
    )
    findings.append(
        Finding(
            "HB141",
            "warning",
            f"`{path}.message_field_role/message_field_content` are deprecated.",
            fix=f"Use `message_property_mappings: {{role: {mapping.role}, content: {mapping.content}}}`.",
            key=f"{path}.message_field_role",
        )
    )
    return ds.model_copy(
        update={
            "message_property_mappings": mapping,
            "message_field_role": None,
            "message_field_content": None,
        }
    )


def _world_size_from_env() -> tuple[int, list[Finding]]:
    """``WORLD_SIZE`` as set by torchrun; 1 when unset. A value that is not a positive integer is
    an error (and 1 is used so the other rules can still run)."""
    raw = os.environ.get("WORLD_SIZE", "").strip()
    if not raw:
        return 1, []
    if raw.isdecimal() and int(raw) >= 1:
        return int(raw), []
    return 1, [
        Finding(
            "HB152",
            "error",
            f"the environment variable WORLD_SIZE={raw!r} is not a positive integer.",
            fix="Unset WORLD_SIZE or let torchrun set it.",
        )
    ]


def _loss_method(cfg: HellbenderConfig) -> LossMethod:
    """The loss implementation: the replacement key that is on (rule HB117 refuses two), else the
    chunked loss when ``tiled_mlp`` is on (the "tiled loss" of the ALST recipe: at the sequence
    lengths where tiling the MLP matters, the logits are the biggest activation left), else plain."""
    on = [method for key, method in LOSS_REPLACEMENTS.items() if getattr(cfg, key)]
    if on:
        return on[0]
    return "chunked" if cfg.tiled_mlp else "plain"


# FSDP1's ways of saying how much to shard that FSDP2 expresses with reshard_after_forward.
RESHARD_OF_STRATEGY: dict[str, bool] = {"FULL_SHARD": True, "SHARD_GRAD_OP": False}
RESHARD_OF_OPTION: dict[str, bool] = {"full_shard": True, "shard_grad_op": False}


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def fsdp_requested(cfg: HellbenderConfig) -> bool:
    """FSDP is asked for: an ``fsdp_config``, an ``fsdp_version`` or a non-empty ``fsdp:`` list."""
    return cfg.fsdp_config is not None or cfg.fsdp_version is not None or bool(cfg.fsdp)


def resolve_fsdp(cfg: HellbenderConfig) -> tuple[FSDPConfig | None, list[Finding]]:
    """The fsdp_config FSDP2 runs with (None when FSDP is not asked for), and the findings made on
    the way.

    Axolotl's FSDP1 spellings are folded into the FSDP2 options: the ``fsdp_`` prefix (HB161),
    the top-level ``fsdp_final_state_dict_type`` (HB161), the ``fsdp:`` list (HB162) and
    ``sharding_strategy`` (HB164). Two spellings of one option with different values are an error
    (HB165); FSDP1-only options are dropped with a warning (HB163). The result holds each option
    once, under its FSDP2 name, and nothing else; ``validate --fix`` writes the same into the file.
    """
    if not fsdp_requested(cfg):
        return None, []
    findings: list[Finding] = []
    fsdp = cfg.fsdp_config if cfg.fsdp_config is not None else FSDPConfig()
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}  # option → where its value was written

    def put(option: str, value: Any, source: str) -> None:
        if option in values or option in fsdp.model_fields_set:
            current = values.get(option, getattr(fsdp, option))
            where = origin.get(option, f"fsdp_config.{option}")
            if current != value:
                findings.append(
                    Finding(
                        "HB165",
                        "error",
                        f"`{source}` and `{where}` both set FSDP's {option}, to different values "
                        f"({quote(value)} and {quote(current)}).",
                        fix=f"Keep one of them, as `fsdp_config.{option}`.",
                        key=source,
                    )
                )
            return
        values[option] = value
        origin[option] = source

    top, nested = cfg.fsdp_version, fsdp.fsdp_version
    if top is not None and nested is not None and top != nested:
        findings.append(
            Finding(
                "HB165",
                "error",
                f"`fsdp_version: {top}` and `fsdp_config.fsdp_version: {nested}` disagree.",
                fix="Keep one: `fsdp_version: 2`.",
                key="fsdp_version",
            )
        )
    elif (top if top is not None else nested) != 2:
        version = top if top is not None else nested
        said = (
            f"`fsdp_version: {version}` asks for FSDP1"
            if version is not None
            else "FSDP is asked for without `fsdp_version`, which Axolotl runs as FSDP1"
        )
        findings.append(
            Finding(
                "HB160",
                "warning",
                f"{said}; hellbender runs FSDP2 (torch's fully_shard), reading each FSDP1 option as "
                "its FSDP2 equivalent.",
                fix="Set `fsdp_version: 2` (hellbender validate --fix does this).",
                key="fsdp_version",
            )
        )

    legacy = legacy_fsdp_keys()
    renamed = [name for name in legacy if getattr(fsdp, name) is not None]
    for name in renamed:
        put(legacy[name], getattr(fsdp, name), f"fsdp_config.{name}")
    if renamed:
        shown = ", ".join(f"`{name}`" for name in renamed)
        meant = ", ".join(f"`{legacy[name]}`" for name in renamed)
        findings.append(
            Finding(
                "HB161",
                "warning",
                f"fsdp_config keys {shown} use Axolotl's old `fsdp_` prefix; they are read as {meant}.",
                fix="Drop the `fsdp_` prefix (hellbender validate --fix does this).",
                key=f"fsdp_config.{renamed[0]}",
            )
        )
    if cfg.fsdp_final_state_dict_type is not None:
        put("final_state_dict_type", cfg.fsdp_final_state_dict_type, "fsdp_final_state_dict_type")
        findings.append(
            Finding(
                "HB161",
                "warning",
                "`fsdp_final_state_dict_type` is deprecated (Axolotl); it is read as "
                "`fsdp_config.final_state_dict_type`.",
                fix="Move it into fsdp_config as `final_state_dict_type` (hellbender validate --fix "
                "does this).",
                key="fsdp_final_state_dict_type",
            )
        )

    unsupported: list[tuple[str, str]] = []  # (where, what): sharding FSDP2 here cannot do
    if cfg.fsdp:
        meaning = []
        for item in dict.fromkeys(cfg.fsdp):
            if item in RESHARD_OF_OPTION:
                put("reshard_after_forward", RESHARD_OF_OPTION[item], f"fsdp: {item}")
                meaning.append(f"{item} as reshard_after_forward: {_yaml(RESHARD_OF_OPTION[item])}")
            elif item == "offload":
                put("offload_params", True, "fsdp: offload")
                meaning.append("offload as offload_params: true")
            elif item == "auto_wrap":
                meaning.append("auto_wrap as the default auto_wrap_policy")
            else:
                unsupported.append(("fsdp", item))
        items = ", ".join(cfg.fsdp)
        read = f"; read {', '.join(meaning)}" if meaning else ""
        findings.append(
            Finding(
                "HB162",
                "warning",
                f"`fsdp: [{items}]` is Axolotl's deprecated FSDP1 switch{read}.",
                fix="Remove `fsdp:` and set the options in fsdp_config (hellbender validate --fix "
                "does this).",
                key="fsdp",
            )
        )

    strategy = values.get("sharding_strategy", fsdp.sharding_strategy)
    if strategy is not None:
        where = origin.get("sharding_strategy", "fsdp_config.sharding_strategy")
        if strategy in RESHARD_OF_STRATEGY:
            reshard = RESHARD_OF_STRATEGY[strategy]
            findings.append(
                Finding(
                    "HB164",
                    "warning",
                    f"`{where}: {strategy}` is FSDP1's; under FSDP2 it is "
                    f"`reshard_after_forward: {_yaml(reshard)}`.",
                    fix=f"Replace it with `reshard_after_forward: {_yaml(reshard)}` (hellbender validate "
                    "--fix does this).",
                    key=where,
                )
            )
            put("reshard_after_forward", reshard, where)
        else:
            unsupported.append((where, strategy))
    for where, what in unsupported:
        if what.lower() == "no_shard":
            findings.append(
                Finding(
                    "HB166",
                    "error",
                    f"`{where}: {what}` shards nothing: that is DDP, not FSDP.",
                    fix="Remove the FSDP keys (fsdp, fsdp_config, fsdp_version): several processes "
                    "without FSDP run DDP.",
                    key=where,
                )
            )
        else:
            findings.append(
                Finding(
                    "HB166",
                    "error",
                    f"`{where}: {what}` shards within groups of ranks and replicates across them, "
                    "which needs dp_replicate_size (N-D parallelism): not supported by this release yet.",
                    fix="Shard across all ranks: `reshard_after_forward: true` (FULL_SHARD).",
                    key=where,
                )
            )

    dropped = [
        origin.get(name, f"fsdp_config.{name}")
        for name in FSDP1_ONLY_OPTIONS
        if values.get(name, getattr(fsdp, name)) is not None
    ]
    if dropped:
        listed = ", ".join(f"`{where}`" for where in dropped)
        findings.append(
            Finding(
                "HB163",
                "warning",
                f"{listed}: FSDP1 options with no FSDP2 equivalent; they have no effect.",
                fix="Remove them (hellbender validate --fix does this).",
                key=dropped[0],
            )
        )
    # One spelling of each option: the FSDP2 one. The FSDP1 forms were read above.
    cleared = [*legacy, "fsdp_version", "sharding_strategy", *FSDP1_ONLY_OPTIONS]
    return fsdp.model_copy(update={**values, **dict.fromkeys(cleared, None)}), findings


def _distributed_strategy(cfg: HellbenderConfig, world: int) -> DistributedStrategy:
    """One process runs alone; several run DeepSpeed, FSDP2 when FSDP is asked for, else DDP."""
    if world == 1:
        return "single"
    if cfg.deepspeed is not None:
        return "deepspeed"
    return "fsdp2" if fsdp_requested(cfg) else "ddp"


def normalize(
    cfg: HellbenderConfig, *, world_size: int | None = None, hardware: Hardware | None = None
) -> tuple[ResolvedConfig, list[Finding]]:
    """Derive every computed key. Returns the resolved config and the findings made on the way."""
    findings: list[Finding] = []
    hw = hardware if hardware is not None else detect_hardware()
    if world_size is not None:
        world = world_size
    else:
        world, env_finding = _world_size_from_env()
        findings += env_finding

    cp = cfg.context_parallel_size
    if cfg.sequence_parallel_degree and "context_parallel_size" not in cfg.model_fields_set:
        cp = cfg.sequence_parallel_degree
    model_parallel = cp * cfg.tensor_parallel_size
    if world % model_parallel:
        findings.append(
            Finding(
                "HB151",
                "error",
                f"world size {world} is not divisible by context_parallel_size {cp} × "
                f"tensor_parallel_size {cfg.tensor_parallel_size}.",
                fix="Launch a multiple of the model-parallel ranks.",
                key="context_parallel_size",
            )
        )
    dp = max(1, world // model_parallel)
    gas, batch = _batch_sizes(cfg, dp, findings)

    if cfg.eval_batch_size is not None and cfg.eval_batch_size != cfg.micro_batch_size:
        findings.append(
            Finding(
                "HB123",
                "warning",
                f"eval_batch_size {cfg.eval_batch_size} ≠ micro_batch_size {cfg.micro_batch_size}: "
                "the memory profile changes between training and evaluation "
                "(a run that fits can run out at eval).",
                fix="Remove eval_batch_size (it defaults to micro_batch_size) unless you planned for both.",
                key="eval_batch_size",
            )
        )

    update: dict[str, object] = {
        "world_size": world,
        "context_parallel_size": cp,
        "data_parallel_size": dp,
        "gradient_accumulation_steps": gas,
        "batch_size": batch,
        "eval_batch_size": cfg.eval_batch_size if cfg.eval_batch_size is not None else cfg.micro_batch_size,
        "pad_to_sequence_len": cfg.sample_packing
        if cfg.pad_to_sequence_len is None
        else cfg.pad_to_sequence_len,
        "eval_sample_packing": cfg.sample_packing
        if cfg.eval_sample_packing is None
        else cfg.eval_sample_packing,
        "dataset_num_proc": cfg.dataset_num_proc or cfg.dataset_processes or max(1, os.cpu_count() or 1),
        # Set alone, max_steps repeats epochs until reached (as in the HF Trainer).
        "epochs_given": "num_epochs" in cfg.model_fields_set or cfg.max_steps is None,
        "loss_method": _loss_method(cfg),
        "attn_implementation": _resolve_attention(cfg, findings),
    }
    if cfg.optimizer in OPTIMIZER_ALIASES:  # Axolotl's other names of the same optimizers
        update["optimizer"] = OPTIMIZER_ALIASES[cfg.optimizer]

    fsdp, fsdp_findings = resolve_fsdp(cfg)
    findings += fsdp_findings
    update["distributed_strategy"] = _distributed_strategy(cfg, world)
    if fsdp is not None:
        update.update(fsdp_config=fsdp, fsdp_version=2, fsdp=None, fsdp_final_state_dict_type=None)
        if fsdp.activation_checkpointing and not cfg.gradient_checkpointing:
            # as in Axolotl: FSDP's activation checkpointing is gradient checkpointing, applied
            # per block; hellbender has the one mechanism
            update["gradient_checkpointing"] = True
            if "gradient_checkpointing" in cfg.model_fields_set:
                findings.append(
                    Finding(
                        "HB173",
                        "info",
                        "fsdp_config.activation_checkpointing: true turns gradient checkpointing on "
                        "(one mechanism in hellbender), over `gradient_checkpointing: false`.",
                        key="gradient_checkpointing",
                    )
                )
    for list_key in ("datasets", "test_datasets"):
        entries = getattr(cfg, list_key)
        if entries and any(d.message_field_role or d.message_field_content for d in entries):
            update[list_key] = [
                _legacy_message_fields(d, f"{list_key}.{i}", findings) for i, d in enumerate(entries)
            ]

    dtype = resolve_dtype(cfg.bf16, cfg.fp16, hw)
    update["compute_dtype"] = dtype
    update["bf16"] = dtype == "bfloat16"
    findings.append(
        Finding(
            "HB190",
            "info",
            f"training dtype: {dtype} (bf16: {cfg.bf16!r}, fp16: {cfg.fp16}) on {hw.description}.",
            key="bf16",
        )
    )
    # Validated, so a derived value of the wrong type is a bug caught here, not in the loop.
    return ResolvedConfig.model_validate({**dict(cfg), **update}), findings
