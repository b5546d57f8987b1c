"""Everything derived from other keys, computed in one function: :func:`normalize`.

Derived values are never stored by the user and never recomputed elsewhere: the batch-size
identity, the evaluation batch, padding for packed data, the resolved dtype and attention backend.
The hardware is passed in (``Hardware``) so every branch is testable on a CPU machine.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from hellbender.config.findings import ConfigError, Finding, has_errors
from hellbender.config.schema import DatasetConfig, HellbenderConfig

DEFAULT_ATTN = "sdpa"
LEGACY_ATTN_FLAGS = {
    "flash_attention": "flash_attention_2",
    "flex_attention": "flex_attention",
    "sdp_attention": "sdpa",
    "xformers_attention": "xformers",
    "eager_attention": "eager",
}


@dataclass(frozen=True)
class Hardware:
    """What the machine can do, as far as the config cares."""

    cuda: bool = False
    cuda_bf16: bool = False
    cuda_fp8: bool = False
    cpu_bf16: bool = False
    description: str = "CPU"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


# Device nodes whose presence means a GPU driver is loaded (only then is torch imported to ask):
# NVIDIA on Linux, WSL2's GPU paravirtualization (NVIDIA under Windows), AMD ROCm (torch.cuda too).
GPU_DRIVER_NODES = ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/dxg", "/dev/kfd")


def detect_hardware() -> Hardware:
    """Probe the machine without importing torch unless an NVIDIA driver is present.

    Importing torch costs about a second; ``validate`` must answer faster than that on the common
    CPU-only development machine, so the CUDA query happens only when a driver node exists.
    """
    flags = _cpu_flags()
    cpu_bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    if any(os.path.exists(node) for node in GPU_DRIVER_NODES):
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return Hardware(
                cuda=True,
                cuda_bf16=torch.cuda.is_bf16_supported(),
                cuda_fp8=(major, minor) >= (8, 9),
                cpu_bf16=cpu_bf16,
                description=torch.cuda.get_device_name(),
            )
    return Hardware(cpu_bf16=cpu_bf16, description="CPU with bf16" if cpu_bf16 else "CPU")


def resolve_dtype(bf16: bool | str, fp16: bool, hw: Hardware) -> str:
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


def _resolve_attention(cfg: HellbenderConfig, findings: list[Finding]) -> str:
    chosen: dict[str, str] = {}
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
                    fix=f"Replace it with `attn_implementation: {backend}` (hellbender validate --fix does this).",
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
                fix=f"Set gradient_accumulation_steps so that {mbs} × gas × {dp_world} is the batch you want.",
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
        update={"message_property_mappings": mapping, "message_field_role": None, "message_field_content": None}
    )


def data_parallel_size(world_size: int, cfg: HellbenderConfig) -> int:
    """Ranks that see different data: the world divided by the model-parallel dimensions."""
    model_parallel = cfg.context_parallel_size * cfg.tensor_parallel_size
    return max(1, world_size // model_parallel)


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


def normalize(
    cfg: HellbenderConfig, *, world_size: int | None = None, hardware: Hardware | None = None
) -> tuple[HellbenderConfig, list[Finding]]:
    """Derive every computed key. Returns the new config and the findings made on the way."""
    findings: list[Finding] = []
    hw = hardware if hardware is not None else detect_hardware()
    if world_size is not None:
        world = world_size
    else:
        world, env_finding = _world_size_from_env()
        findings += env_finding
    update: dict[str, object] = {"world_size": world}

    if cfg.sequence_parallel_degree and "context_parallel_size" not in cfg.model_fields_set:
        update["context_parallel_size"] = cfg.sequence_parallel_degree
    cp = int(update.get("context_parallel_size", cfg.context_parallel_size))  # type: ignore[arg-type]
    if world % (cp * cfg.tensor_parallel_size):
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
    dp = max(1, world // (cp * cfg.tensor_parallel_size))

    gas, batch = _batch_sizes(cfg, dp, findings)
    update["gradient_accumulation_steps"] = gas
    update["batch_size"] = batch

    if cfg.eval_batch_size is None:
        update["eval_batch_size"] = cfg.micro_batch_size
    elif cfg.eval_batch_size != cfg.micro_batch_size:
        findings.append(
            Finding(
                "HB123",
                "warning",
                f"eval_batch_size {cfg.eval_batch_size} ≠ micro_batch_size {cfg.micro_batch_size}: the memory "
                "profile changes between training and evaluation (a run that fits can run out at eval).",
                fix="Remove eval_batch_size (it defaults to micro_batch_size) unless you planned for both.",
                key="eval_batch_size",
            )
        )

    if cfg.pad_to_sequence_len is None:
        update["pad_to_sequence_len"] = cfg.sample_packing
    if cfg.eval_sample_packing is None:
        update["eval_sample_packing"] = cfg.sample_packing
    if cfg.dataset_num_proc is None:
        update["dataset_num_proc"] = cfg.dataset_processes or max(1, os.cpu_count() or 1)

    if cfg.optimizer == "adamw_bnb_8bit":
        update["optimizer"] = "adamw_8bit"
    for list_key in ("datasets", "test_datasets"):
        entries = getattr(cfg, list_key)
        if entries and any(d.message_field_role or d.message_field_content for d in entries):
            update[list_key] = [_legacy_message_fields(d, f"{list_key}.{i}", findings) for i, d in enumerate(entries)]

    update["attn_implementation"] = _resolve_attention(cfg, findings)
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
    return cfg.model_copy(update=update), findings


def load_config(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    world_size: int | None = None,
    hardware: Hardware | None = None,
    strict: bool = True,
) -> tuple[HellbenderConfig, list[Finding]]:
    """Read, normalize and check a config: the one entry point every command uses.

    With ``strict`` a config that has error findings raises :class:`ConfigError`.
    """
    from hellbender.config.load import read_config
    from hellbender.config.rules import check

    raw, _ = read_config(path, overrides)
    hw = hardware if hardware is not None else detect_hardware()
    cfg, findings = normalize(raw, world_size=world_size, hardware=hw)
    findings += check(cfg, hw, raw)
    if strict and has_errors(findings):
        raise ConfigError([f for f in findings if f.severity == "error"])
    return cfg, findings
