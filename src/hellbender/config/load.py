"""YAML → validated :class:`HellbenderConfig`, with errors a user can act on.

Three kinds of mistakes get three kinds of messages:

* YAML syntax errors name the line and column (PyYAML's marks, 1-based).
* Unknown keys name the key path, its line, and a "did you mean" from the known keys. Keys that
  Axolotl has but hellbender does not support yet are named as such, so an Axolotl user learns
  exactly which of their keys are the problem rather than being told they misspelled them.
* Type errors name the key path, the value given and the type expected.

Command-line overrides are ``key=value`` with dotted paths (``datasets.0.path=x.jsonl``); the value
is parsed as YAML, so ``lora_r=16`` is an int and ``bf16=auto`` a string.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from hellbender.config.axolotl_keys import (
    AXOLOTL_DATASET_KEYS,
    AXOLOTL_LR_SCHEDULERS,
    AXOLOTL_OPTIMIZERS,
    AXOLOTL_PLUGIN_KEYS,
    AXOLOTL_TOP_LEVEL_KEYS,
)
from hellbender.config.findings import ConfigError, Finding, has_errors
from hellbender.config.hardware import Hardware, detect_hardware
from hellbender.config.normalize import normalize
from hellbender.config.rules import check
from hellbender.config.schema import DatasetConfig, HellbenderConfig, Optimizer, ResolvedConfig, Scheduler

# Keys Axolotl accepts that hellbender recognises but does not implement (yet). Loading one is an
# error that says so, instead of a misleading "did you mean".
AXOLOTL_KEYS_NOT_SUPPORTED: dict[str, str] = {
    "rl": "preference training (DPO/KTO/ORPO/GRPO) is not supported yet",
    "rl_beta": "preference training is not supported yet",
    "reward_model": "reward-model training is not supported yet",
    "process_reward_model": "reward-model training is not supported yet",
    "pretraining_dataset": "streaming pre-training datasets are not supported yet",
    "streaming": "streaming datasets are not supported yet",
    "hub_model_id": "pushing to the hub is not supported (hellbender works offline-first)",
    "hub_strategy": "pushing to the hub is not supported",
    "push_dataset_to_hub": "pushing to the hub is not supported",
    "hf_use_auth_token": "hub authentication is taken from the environment (HF_TOKEN)",
    "unfrozen_parameters": "partial freezing by parameter pattern is not supported yet",
    "relora_steps": "ReLoRA is not supported yet",
    "relora_warmup_steps": "ReLoRA is not supported yet",
    "relora_cpu_offload": "ReLoRA is not supported yet",
    "lisa_n_layers": "LISA is not supported yet",
    "lisa_step_interval": "LISA is not supported yet",
    "loraplus_lr_ratio": "LoRA+ is not supported yet",
    "loraplus_lr_embedding": "LoRA+ is not supported yet",
    "neftune_noise_alpha": "NEFTune is not supported yet",
    "noisy_embedding_alpha": "NEFTune is not supported yet",
    "s2_attention": "shifted-sparse attention is not supported",
    "flash_attn_cross_entropy": "use chunked_cross_entropy or cut_cross_entropy",
    "flash_attn_rms_norm": "use liger_rms_norm",
    "flash_attn_fuse_qkv": "use lora_qkv_kernel",
    "flash_attn_fuse_mlp": "use lora_mlp_kernel",
    "plugins": "Axolotl plugins do not apply to hellbender; its kernels are config keys",
    "lr_quadratic_warmup": "quadratic warm-up is not supported yet",
    "auto_find_batch_size": "use `hellbender plan` to find a batch size that fits",
    "gpu_memory_limit": "use `hellbender plan` to check memory before launching",
    "lora_on_cpu": "not needed: the adapter lives where the model lives",
    "multipack_real_batches": "the packer always builds real batches",
    "chat_template_jinja": "put the jinja string in `chat_template`",
    "evaluation_strategy": "use eval_strategy",
    "local_rank": "set by the launcher (torchrun), not in the config",
    "loss_watchdog_patience": "the loss watchdog's patience is not supported yet",
    "eval_table_size": "prediction tables in W&B are not supported yet",
    "eval_max_new_tokens": "generation during evaluation is not supported yet",
    "save_first_step": "saving a checkpoint after the first step is not supported yet",
}

# Keys that normalization derives; users must not set them.
DERIVED_KEYS = frozenset(ResolvedConfig.model_fields) - frozenset(HellbenderConfig.model_fields)


def _yaml_error(exc: yaml.YAMLError | RecursionError, source: str) -> ConfigError:
    if isinstance(exc, RecursionError):
        # PyYAML's parser is recursive: a few hundred nested brackets exhaust the stack
        # before it can report anything, so say so instead of dying with a traceback.
        exc = yaml.YAMLError("the document is nested too deeply to parse")
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
    return ConfigError(
        [
            Finding(
                "HB001",
                "error",
                f"{source}: YAML syntax error at {where}: {problem}",
                fix="Fix the YAML at that position (indentation, a missing ':' or quote).",
            )
        ]
    )


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted key paths to their 1-based line in the YAML text (for error messages)."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except (yaml.YAMLError, RecursionError):
        return lines
    walked: set[int] = set()

    def walk(node: yaml.Node, prefix: str) -> None:
        # An alias is the same node object as its anchor: walking it again would only repeat
        # paths, and nested aliases ("billion laughs") would make that exponential.
        if id(node) in walked:
            return
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                path = f"{prefix}.{i}"
                lines[path] = item.start_mark.line + 1
                walk(item, path)

    if root is not None:
        walk(root, "")
    return lines


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    Plain PyYAML keeps the last value silently; a config that says ``learning_rate`` twice is a
    mistake the user should see (and ruamel, used by ``--fix``, refuses such files anyway).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            # merge keys (`<<: *anchor`) may legitimately be overridden; complex keys are rare
            # enough to leave to PyYAML
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            first = seen.get(key)
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    f"while constructing a mapping "
                    f"(key {key!r} first given on line {first.start_mark.line + 1})",
                    node.start_mark,
                    f"found the key {key!r} a second time",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str = "<config>") -> dict[str, Any]:
    """Parse YAML text into a mapping, with line/column on syntax errors and repeated keys."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except (yaml.YAMLError, RecursionError) as exc:
        raise _yaml_error(exc, source) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [
                Finding(
                    "HB002",
                    "error",
                    f"{source}: the top level must be a mapping of keys, got {type(data).__name__}",
                )
            ]
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted paths, numeric parts index lists; values are YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                [Finding("HB003", "error", f"override {item!r} is not key=value", fix="Write e.g. lora_r=16")]
            )
        path, _, raw_value = item.partition("=")
        try:
            value = yaml.safe_load(raw_value) if raw_value != "" else None
        except (yaml.YAMLError, RecursionError) as exc:
            raise _yaml_error(exc, f"override {path}") from None
        parts = path.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdecimal() or int(part) >= len(node):
                    raise ConfigError(
                        [
                            Finding(
                                "HB003",
                                "error",
                                f"override {path}: {part!r} is not an index of a list of {len(node)}",
                            )
                        ]
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(
                    [
                        Finding(
                            "HB003",
                            "error",
                            f"override {path}: {'.'.join(parts[:i])} is not a mapping or list",
                        )
                    ]
                )
    return data


def _known_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _nested_model(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The pydantic model a key's value should be (for walking unknown keys), if any."""
    if model is HellbenderConfig and key in ("datasets", "test_datasets"):
        return DatasetConfig
    field = model.model_fields.get(key)
    if field is None:
        return None
    annotation = field.annotation
    for candidate in getattr(annotation, "__args__", (annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def unknown_key_findings(data: dict[str, Any], lines: dict[str, int] | None = None) -> list[Finding]:
    """Every unknown key in the config, with a suggestion, checked before pydantic sees it."""
    lines = lines or {}
    findings: list[Finding] = []

    def check(mapping: dict[str, Any], model: type[BaseModel], prefix: str) -> None:
        known = _known_keys(model)
        for key, value in mapping.items():
            key_str = str(key)
            path = f"{prefix}.{key_str}" if prefix else key_str
            line = f" (line {lines[path]})" if path in lines else ""
            if model is HellbenderConfig and key_str in DERIVED_KEYS:
                findings.append(
                    Finding(
                        "HB006",
                        "error",
                        f"`{path}`{line} is derived by hellbender and cannot be set.",
                        fix=f"Remove `{key_str}`.",
                        key=path,
                    )
                )
                continue
            if key_str not in known:
                reason = _axolotl_reason(key_str, model)
                if reason is not None:
                    findings.append(
                        Finding(
                            "HB005",
                            "error",
                            f"`{path}`{line} is an Axolotl option hellbender does not support yet{reason}.",
                            fix=f"Remove `{key_str}` from the config.",
                            key=path,
                        )
                    )
                    continue
                close = difflib.get_close_matches(key_str, known, n=3, cutoff=0.6)
                hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
                findings.append(
                    Finding(
                        "HB004",
                        "error",
                        f"unknown key `{path}`{line}.{hint}",
                        fix=f"Rename it to `{close[0]}`." if close else "Remove it; see docs/config.md.",
                        key=path,
                    )
                )
                continue
            sub = _nested_model(model, key_str)
            if sub is None:
                continue
            if isinstance(value, dict):
                check(value, sub, path)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, dict):
                        check(item, sub, f"{path}.{i}")

    # A dataset `type:` given as a mapping is checked as a UserDefinedFormat by the walk itself
    # (_nested_model finds it in the union).
    check(data, HellbenderConfig, "")
    for key, supported, axolotl in (
        ("optimizer", get_args(Optimizer), AXOLOTL_OPTIMIZERS),
        ("lr_scheduler", get_args(Scheduler), AXOLOTL_LR_SCHEDULERS),
    ):
        value = data.get(key)
        if isinstance(value, str) and value not in supported and value in axolotl:
            line = f" (line {lines[key]})" if key in lines else ""
            findings.append(
                Finding(
                    "HB005",
                    "error",
                    f"`{key}: {value}`{line} is an Axolotl {key.replace('_', ' ')} "
                    "hellbender does not support yet.",
                    fix=f"Use one of: {', '.join(supported)}.",
                    key=key,
                )
            )
    return findings


def _axolotl_reason(key: str, model: type[BaseModel]) -> str | None:
    """For a key hellbender does not know: ``": why"`` (or ``""``) if Axolotl has it, else None."""
    if model is HellbenderConfig:
        if key in AXOLOTL_KEYS_NOT_SUPPORTED:
            return f": {AXOLOTL_KEYS_NOT_SUPPORTED[key]}"
        if key in AXOLOTL_PLUGIN_KEYS:
            return " (it belongs to an Axolotl plugin)"
        if key in AXOLOTL_TOP_LEVEL_KEYS:
            return ""
    elif model is DatasetConfig and key in AXOLOTL_DATASET_KEYS:
        return " in a dataset entry"
    return None


def _data_path(loc: tuple[Any, ...], data: Any, missing: bool) -> list[str]:
    """The part of a pydantic error location that names places in the user's data.

    For a field typed as a union, pydantic adds one tag per member to the location
    (``bf16.bool``, ``eval_steps.int``, ``datasets.0.type.UserDefinedFormat``); those are not keys
    the user wrote. Walking the location against the data keeps exactly the keys and indices that
    exist (plus, for a missing key, the key itself).
    """
    path: list[str] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif missing and i == len(loc) - 1:
            pass
        else:
            continue  # a union member's tag
        path.append(str(part))
    return path


def _expected(messages: list[str]) -> str:
    """Merge the per-union-member messages of one key into one sentence."""
    unique = list(dict.fromkeys(messages))
    if len(unique) > 1:  # "a valid boolean, unable to interpret input" → "a valid boolean"
        unique = list(dict.fromkeys(m.split(", unable to")[0] for m in unique))
    prefix = "Input should be "
    if all(m.startswith(prefix) for m in unique):
        return "should be " + " or ".join(m.removeprefix(prefix) for m in unique)
    return "; ".join(unique)


def _type_findings(exc: ValidationError, data: dict[str, Any], lines: dict[str, int]) -> list[Finding]:
    """One finding per key path, however many union members pydantic tried for it."""
    missing: dict[str, str] = {}
    wrong: dict[str, tuple[Any, list[str]]] = {}
    for err in exc.errors():
        is_missing = err["type"] == "missing"
        parts = _data_path(err["loc"], data, is_missing)
        path = ".".join(parts) or "<root>"
        if is_missing:
            missing.setdefault(path, parts[-1] if parts else path)
        else:
            wrong.setdefault(path, (err.get("input"), []))[1].append(err["msg"])
    findings: list[Finding] = []
    for path, key in missing.items():
        line = f" (line {lines[path]})" if path in lines else ""
        findings.append(
            Finding("HB007", "error", f"`{path}`{line} is required.", fix=f"Add `{key}:`.", key=path)
        )
    for path, (given, messages) in wrong.items():
        line = f" (line {lines[path]})" if path in lines else ""
        findings.append(
            Finding(
                "HB008",
                "error",
                f"`{path}`{line} = {given!r} ({type(given).__name__}): {_expected(messages)}.",
                fix=f"Give `{path}` a value of the expected type.",
                key=path,
            )
        )
    return sorted(findings, key=lambda f: lines.get(f.key or "", 0))


def _drop_unset_nulls(mapping: dict[Any, Any], model: type[BaseModel]) -> dict[Any, Any]:
    """Remove keys whose empty value means "not set", so they take their default.

    Axolotl's own example configs list options with an empty value (``fp16:``, ``local_rank:``,
    ``deepspeed:``) to mean "unset"; rejecting those nulls would break "an Axolotl YAML loads
    unchanged". A null is kept only where it is itself a meaningful value different from the
    default (``max_grad_norm: null`` turns clipping off), and for unknown keys, which stay errors
    because an empty typo is still a typo. A null Axolotl-only key asks for nothing, so it goes too.
    """
    out: dict[Any, Any] = {}
    for key, value in mapping.items():
        if value is None:
            field = model.model_fields.get(key) if isinstance(key, str) else None
            if field is not None:
                accepts_none = field.annotation is Any or type(None) in get_args(field.annotation)
                if field.default is None or not accepts_none:
                    continue
            elif _axolotl_reason(str(key), model) is not None:
                continue
        out[key] = value
    return out


def _without_paths(data: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """A deep copy of ``data`` without the keys at the dotted ``paths`` (list parts are indices)."""
    out = copy.deepcopy(data)
    for path in paths:
        *parents, last = path.split(".")
        node: Any = out
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.get(part)
            if node is None:
                break
        if isinstance(node, dict):
            # keys are matched as strings: YAML may have given an int or bool key
            for key in [k for k in node if str(k) == last]:
                del node[key]
    return out


def validate_mapping(
    data: dict[str, Any], source: str = "<config>", text: str | None = None
) -> HellbenderConfig:
    """Turn a parsed mapping into a config object (not yet normalized); raises ConfigError."""
    lines = _key_lines(text) if text else {}
    data = _drop_unset_nulls(data, HellbenderConfig)
    for list_key in ("datasets", "test_datasets"):
        if isinstance(data.get(list_key), list):
            data[list_key] = [
                _drop_unset_nulls(ds, DatasetConfig) if isinstance(ds, dict) else ds for ds in data[list_key]
            ]
    findings = unknown_key_findings(data, lines)
    if findings:
        # Report the known keys' type errors too, so a config gets fixed in one round, not two.
        # (Only type errors: "required" findings would repeat a misspelled key's suggestion.)
        rest = _without_paths(data, [f.key for f in findings if f.key])
        try:
            HellbenderConfig.model_validate(rest)
        except ValidationError as exc:
            findings += [f for f in _type_findings(exc, rest, lines) if f.code == "HB008"]
        raise ConfigError(findings)
    try:
        return HellbenderConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_type_findings(exc, data, lines)) from None


def read_config(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[HellbenderConfig, dict[str, Any]]:
    """Read a YAML file and overrides into an un-normalized config and the raw mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Finding("HB000", "error", f"cannot read config {path}: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [
                Finding(
                    "HB000",
                    "error",
                    f"cannot read config {path}: not UTF-8 text (byte {exc.start}: {exc.reason}).",
                    fix="Save the file as UTF-8.",
                )
            ]
        ) from None
    data = parse_yaml(text, str(path))
    data = apply_overrides(data, list(overrides or []))
    return validate_mapping(data, str(path), text), data


def load_config(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    world_size: int | None = None,
    hardware: Hardware | None = None,
    strict: bool = True,
) -> tuple[ResolvedConfig, list[Finding]]:
    """Read, normalize and check a config: the one entry point every command uses.

    With ``strict`` a config that has error findings raises :class:`ConfigError`.
    """
    raw, _ = read_config(path, overrides)
    hw = hardware if hardware is not None else detect_hardware()
    cfg, findings = normalize(raw, world_size=world_size, hardware=hw)
    findings += check(cfg, hw, raw)
    if strict and has_errors(findings):
        raise ConfigError([f for f in findings if f.severity == "error"])
    return cfg, findings
