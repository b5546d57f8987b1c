"""Axolotl configs as they are: what an Axolotl YAML says that hellbender reads its own way.

:func:`carry_over` runs on the parsed mapping (empty values already dropped) before the schema sees
it, and returns the mapping hellbender validates plus what it did, as findings:

* Axolotl spellings hellbender honours are rewritten to hellbender's (HB014): ``model_config`` is
  ``overrides_of_model_config`` (and the other names in :data:`AXOLOTL_ALIASES`),
  ``gradient_checkpointing: offload`` is checkpointing plus activation offloading,
  ``activation_offloading: legacy`` is offloading, ``warmup_steps`` below 1 is a fraction of the
  steps (``warmup_ratio``, as in the HF Trainer), ``type: sharegpt`` is the ``chat_template`` entry
  that reads the same rows.
* A ``plugins:`` list that names only the Liger and cut-cross-entropy plugins asks for nothing more:
  their features are config keys here (HB011). Any other plugin is named as unsupported (HB005).
* Keys that older Axolotl releases needed and that change nothing here are accepted with a note
  of what hellbender does instead (HB012).
* An Axolotl-only key set to the value that asks for nothing (false, 0, an empty string, list or
  mapping, or Axolotl's own default) is accepted and ignored (HB010): a value that asks for nothing
  never blocks a config. Any other value stays an error naming the feature (HB005, in ``load``).
* Dataset ``type:`` values and attention backends that Axolotl has and hellbender lacks are named
  as unsupported (HB005); a value neither knows gets a "did you mean" (HB008).

The input mapping is never modified: containers on the way to a change are copied.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, get_args

from hellbender.config.axolotl_keys import (
    AXOLOTL_ATTN_IMPLEMENTATIONS,
    AXOLOTL_DATASET_KEYS,
    AXOLOTL_DATASET_TYPE_KEYS,
    AXOLOTL_DATASET_TYPES,
    AXOLOTL_PLUGINS,
    AXOLOTL_TOP_LEVEL_KEYS,
)
from hellbender.config.findings import Finding, clip, quote
from hellbender.config.schema import AttnImplementation, DatasetConfig, DatasetType, ResolvedConfig

# Axolotl keys that change nothing in hellbender, whatever their value, and what hellbender does
# instead (HB012).
AXOLOTL_NO_OP_KEYS: dict[str, str] = {
    "is_llama_derived_model": "the architecture is read from the model's config.json",
    "is_mistral_derived_model": "the architecture is read from the model's config.json",
    "is_falcon_derived_model": "the architecture is read from the model's config.json",
    "is_qwen_derived_model": "the architecture is read from the model's config.json",
    "flash_attn_cross_entropy": "the loss kernel is chosen by chunked_cross_entropy, cut_cross_entropy "
    "or liger_cross_entropy",
    "flash_attn_rms_norm": "a fused RMSNorm is liger_rms_norm",
    "flash_attn_fuse_qkv": "fused q/k/v projections for LoRA are lora_qkv_kernel",
    "flash_attn_fuse_mlp": "a fused MLP for LoRA is lora_mlp_kernel",
    "flash_optimum": "the attention backend is chosen by attn_implementation",
    "device_map": "hellbender places the model itself (one device per process)",
    "hf_use_auth_token": "hub authentication is taken from the environment (HF_TOKEN)",
    "gptq_groupsize": "a GPTQ base's settings are read from its quantization_config",
    "gptq_model_v1": "a GPTQ base's settings are read from its quantization_config",
    "gptq_disable_exllama": "a GPTQ base's settings are read from its quantization_config",
    "sample_packing_seq_len_multiplier": "packed rows are sequence_len tokens long",
    "max_packed_sequence_len": "packed rows are sequence_len tokens long",
    "torch_dtype": "the training dtype comes from bf16 / fp16",
    "low_cpu_mem_usage": "weights are loaded straight into the model, without a second copy",
    "remove_unused_columns": "the data pipeline keeps only the columns it uses",
}

# Axolotl's other names of hellbender's options (its remapped parameters, and the HF Trainer's
# older evaluation_strategy).
AXOLOTL_ALIASES: dict[str, str] = {
    "model_config": "overrides_of_model_config",
    "model_revision": "revision_of_model",
    "type_of_model": "model_type",
    "evaluation_strategy": "eval_strategy",
}

# The plugins whose features hellbender has as plain config keys: listing them asks for nothing.
ACCEPTED_PLUGINS: dict[str, str] = {
    "LigerPlugin": "the liger_* keys",
    "CutCrossEntropyPlugin": "cut_cross_entropy",
}

# Axolotl-only keys whose Axolotl default is not an "empty" value: set to that default, they ask
# for nothing either.
AXOLOTL_OFF_DEFAULTS: dict[str, Any] = {
    "pretrain_multipack_attn": True,
}

# Logging switches that exist in the schema as strings: `false` there means off.
_FALSE_MEANS_OFF = ("wandb_watch", "wandb_log_model")

_DATASET_LISTS = ("datasets", "test_datasets")
_OUR_TYPES: tuple[str, ...] = get_args(DatasetType)
_OUR_ATTN: tuple[str, ...] = get_args(AttnImplementation)
_TYPE_ADVICE: dict[str, str] = {
    "sharegpt": "Use `type: chat_template` with `field_messages: conversations` and "
    "`message_property_mappings: {role: from, content: value}` (roles human → user, gpt → assistant), "
    "and `chat_template:` for the prompt format (a `conversation:` other than chatml is not read).",
    "pretrain": "Use `type: completion` (a text field trained in full).",
    "alpaca": "Use `type: alpaca`, or a user-defined format (a mapping under `type:`) for another layout.",
    "alpaca_chat": "Use `type: alpaca`, or a user-defined format (a mapping under `type:`).",
    "alpaca_w_system": "Use `type: alpaca` (its `system` field is read), or a user-defined format.",
}
_PREFERENCE_TYPES = frozenset(
    {"bradley_terry", "chatml", "dpo", "ebft", "kto", "llama3", "orpo", "passthrough", "rwd", "zephyr"}
)
_ANY_TYPE = "Use one of: alpaca, completion, input_output, chat_template, or a user-defined format mapping."


def _line(lines: dict[str, int], path: str) -> str:
    return f" (line {lines[path]})" if path in lines else ""


def is_off(key: str, value: Any) -> bool:
    """``value`` asks for nothing: Axolotl's default where it is not an empty value (then only
    that), else false, 0, an empty string, list or mapping."""
    if value is None:
        return True
    default = AXOLOTL_OFF_DEFAULTS.get(key, _NOTHING)
    if default is not _NOTHING:  # `pretrain_multipack_attn: false` asks for something
        return type(default) is type(value) and default == value
    if value is False or value == "" or (isinstance(value, list | dict) and not value):
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


_NOTHING = object()


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        return "[]" if isinstance(value, list) else "{}"
    return clip(str(value))


def _plugins(value: Any, lines: dict[str, int]) -> list[Finding] | None:
    """Findings for a `plugins:` list of names (None when it is something else: load reports it)."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return None
    others = [name for name in value if name.rsplit(".", 1)[-1] not in ACCEPTED_PLUGINS]
    line = _line(lines, "plugins")
    if not others:
        if not value:
            return []
        covered = ", ".join(
            f"{name.rsplit('.', 1)[-1]} ({ACCEPTED_PLUGINS[name.rsplit('.', 1)[-1]]})" for name in value
        )
        return [
            Finding(
                "HB011",
                "info",
                f"`plugins`{line}: {covered}: hellbender has these features as config keys; the list "
                "is not needed.",
                fix="Remove `plugins:` (the keys the plugins read work without it).",
                key="plugins",
            )
        ]
    named = ", ".join(
        f"`{clip(name)}` ({AXOLOTL_PLUGINS.get(name.rsplit('.', 1)[-1], 'a plugin outside Axolotl')})"
        for name in others
    )
    return [
        Finding(
            "HB005",
            "error",
            f"`plugins`{line} names Axolotl plugins hellbender does not support yet: {named}.",
            fix="Remove those plugins (and their keys); the Liger and cut-cross-entropy plugins may stay.",
            key="plugins",
        )
    ]


def _dataset_type(value: str, path: str, lines: dict[str, int]) -> Finding:
    """The finding for a dataset `type:` string hellbender does not have."""
    line = _line(lines, path)
    root = re.split(r"[.:]", value, maxsplit=1)[0]
    if root in AXOLOTL_DATASET_TYPES or "." in value or ":" in value:
        if root in _TYPE_ADVICE:
            fix = _TYPE_ADVICE[root]
        elif root in _PREFERENCE_TYPES or root == "chat_template" or root == "stepwise_supervised":
            fix = (
                "This format is for preference, reward or process-supervision training (`rl:`, "
                f"`reward_model:`), which hellbender does not support yet. {_ANY_TYPE}"
            )
        else:
            fix = _ANY_TYPE
        return Finding(
            "HB005",
            "error",
            f"`{path}`{line}: Axolotl dataset type `{clip(value)}` is not supported yet.",
            fix=fix,
            key=path,
        )
    names = list(dict.fromkeys([*_OUR_TYPES, *sorted(AXOLOTL_DATASET_TYPES)]))
    close = difflib.get_close_matches(value, names, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
    ours = ", ".join(f"'{t}'" for t in _OUR_TYPES if t != "user_defined")
    return Finding(
        "HB008",
        "error",
        f"`{path}`{line} = {quote(value)}: not a dataset type hellbender or Axolotl knows (hellbender's: "
        f"{ours}, or a user-defined format mapping).{hint}",
        fix=f"Write `type: {close[0]}`." if close else _ANY_TYPE,
        key=path,
    )


# Keys of a sharegpt entry that the chat_template reading below takes over.
_SHAREGPT_KEYS = ("conversation", "field_human", "field_model")


def from_sharegpt(entry: dict[str, Any]) -> dict[str, Any] | None:
    """A ``type: sharegpt`` entry as the ``chat_template`` entry that reads the same rows (turns
    ``{from, value}`` under ``conversations``; human → user, gpt → assistant), or None when it asks
    for a conversation format other than chatml (the prompt would differ)."""
    conversation = entry.get("conversation")
    if conversation is not None and conversation != "chatml":
        return None
    if "message_property_mappings" in entry or "message_field_role" in entry:
        return None  # the user mapped fields already: nothing certain to add
    out = {k: v for k, v in entry.items() if k not in _SHAREGPT_KEYS}
    out["type"] = "chat_template"
    out.setdefault("field_messages", "conversations")
    out["message_property_mappings"] = {"role": "from", "content": "value"}
    if conversation == "chatml" and "chat_template" not in out:
        out["chat_template"] = "chatml"
    human = [name for name in (entry.get("field_human"),) if isinstance(name, str)]
    model = [name for name in (entry.get("field_model"),) if isinstance(name, str)]
    if (human or model) and "roles" not in out:  # else the default roles read human and gpt
        out["roles"] = {
            "system": ["system"],
            "user": list(dict.fromkeys(["human", "user", *human])),
            "assistant": list(dict.fromkeys(["gpt", "assistant", *model])),
            "tool": ["tool"],
        }
    return out


def _axolotl_only(key: Any, fields: dict[str, Any], axolotl: frozenset[str]) -> bool:
    return isinstance(key, str) and key not in fields and key in axolotl


def carry_over(
    data: dict[str, Any], lines: dict[str, int], not_supported: frozenset[str] = frozenset()
) -> tuple[dict[str, Any], list[Finding]]:
    """The mapping hellbender validates, and the findings of reading Axolotl's ways (see the module
    docstring). ``not_supported`` adds Axolotl keys known to load (with a reason) to the sets here."""
    out = dict(data)
    findings: list[Finding] = []
    fields = ResolvedConfig.model_fields  # derived keys are not Axolotl-only: load refuses them
    top_axolotl = AXOLOTL_TOP_LEVEL_KEYS | not_supported

    # ------------------------------------------------------------ spellings hellbender honours
    for axolotl_name, name in AXOLOTL_ALIASES.items():
        if axolotl_name not in out:
            continue
        value = out.pop(axolotl_name)
        both = f"`{axolotl_name}`{_line(lines, axolotl_name)} and `{name}`{_line(lines, name)}"
        if name in out and out[name] != value:
            findings.append(
                Finding(
                    "HB014",
                    "error",
                    f"{both} are two names of one option, with different values.",
                    fix=f"Keep one of them ({name}).",
                    key=axolotl_name,
                )
            )
            continue
        out[name] = value
        findings.append(
            Finding(
                "HB014",
                "info",
                f"`{axolotl_name}`{_line(lines, axolotl_name)} is Axolotl's other name of `{name}`; "
                "read as that.",
                fix=f"Rename it to {name}.",
                key=axolotl_name,
            )
        )
    checkpointing = out.get("gradient_checkpointing")
    if checkpointing in ("offload", "offload_disk"):
        offload: bool | str = True if checkpointing == "offload" else "disk"
        out["gradient_checkpointing"] = True
        if not out.get("activation_offloading"):
            out["activation_offloading"] = offload
        findings.append(
            Finding(
                "HB014",
                "info",
                f"`gradient_checkpointing: {checkpointing}`{_line(lines, 'gradient_checkpointing')} is "
                f"read as `gradient_checkpointing: true` with `activation_offloading: {_shown(offload)}`.",
                fix=f"Write those two keys (Axolotl deprecates `{checkpointing}` too).",
                key="gradient_checkpointing",
            )
        )
    if out.get("activation_offloading") == "legacy":
        out["activation_offloading"] = True
        findings.append(
            Finding(
                "HB014",
                "info",
                f"`activation_offloading: legacy`{_line(lines, 'activation_offloading')} (Axolotl's "
                "older offloading code) is read as `activation_offloading: true`.",
                fix="Write `activation_offloading: true`.",
                key="activation_offloading",
            )
        )
    warmup = out.get("warmup_steps")
    if isinstance(warmup, float) and 0 < warmup < 1 and out.get("warmup_ratio") is None:
        out["warmup_ratio"] = out.pop("warmup_steps")
        findings.append(
            Finding(
                "HB014",
                "info",
                f"`warmup_steps: {warmup:g}`{_line(lines, 'warmup_steps')} is below 1: a fraction of the "
                f"training steps (as in the HF Trainer), read as `warmup_ratio: {warmup:g}`.",
                fix=f"Write `warmup_ratio: {warmup:g}`.",
                key="warmup_steps",
            )
        )

    # ------------------------------------------------------------ values that ask for nothing
    off: list[str] = []
    if out.get("evals_per_epoch") == 0 and not isinstance(out.get("evals_per_epoch"), bool):
        off.append(f"`evals_per_epoch: {out.pop('evals_per_epoch')}`")
    for key in _FALSE_MEANS_OFF:
        if out.get(key) is False:
            del out[key]
            off.append(f"`{key}: false`")
    for key, value in list(out.items()):
        if key == "plugins" or not _axolotl_only(key, fields, top_axolotl):
            continue
        if key in AXOLOTL_NO_OP_KEYS:
            del out[key]
            findings.append(
                Finding(
                    "HB012",
                    "info",
                    f"`{key}`{_line(lines, key)} changes nothing in hellbender: "
                    f"{AXOLOTL_NO_OP_KEYS[key]}.",
                    fix=f"Remove `{key}`.",
                    key=key,
                )
            )
        elif is_off(key, value):
            del out[key]
            off.append(f"`{key}: {_shown(value)}`")
    if "plugins" in out:
        plugin_findings = _plugins(out["plugins"], lines)
        if plugin_findings is not None:
            del out["plugins"]
            if not plugin_findings:
                off.append("`plugins: []`")
            findings += plugin_findings

    dataset_fields = DatasetConfig.model_fields
    dataset_axolotl = AXOLOTL_DATASET_KEYS | AXOLOTL_DATASET_TYPE_KEYS
    for list_key in _DATASET_LISTS:
        entries = out.get(list_key)
        if not isinstance(entries, list):
            continue
        copied: list[Any] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                copied.append(entry)
                continue
            entry = dict(entry)
            path = f"{list_key}.{i}"
            for key, value in list(entry.items()):
                if _axolotl_only(key, dataset_fields, dataset_axolotl) and is_off(key, value):
                    del entry[key]
                    off.append(f"`{path}.{key}: {_shown(value)}`")
            kind = entry.get("type")
            if isinstance(kind, str) and kind.split(":")[0] == "sharegpt":
                mapped = from_sharegpt(entry)
                if mapped is not None:
                    entry = mapped
                    findings.append(
                        Finding(
                            "HB014",
                            "info",
                            f"`{path}.type: {clip(kind)}`{_line(lines, f'{path}.type')} (Axolotl's retired "
                            "format) is read as `type: chat_template` with field_messages "
                            f"{entry['field_messages']}, message_property_mappings "
                            "{role: from, content: value} and its role names.",
                            fix="Write the entry as chat_template (hellbender validate --fix does this).",
                            key=f"{path}.type",
                        )
                    )
                    kind = "chat_template"
            if isinstance(kind, str) and kind not in _OUR_TYPES:
                findings.append(_dataset_type(kind, f"{path}.type", lines))
                del entry["type"]
            copied.append(entry)
        out[list_key] = copied

    attn = out.get("attn_implementation")
    hub = isinstance(attn, str) and "/" in attn
    if isinstance(attn, str) and attn not in _OUR_ATTN and (hub or attn in AXOLOTL_ATTN_IMPLEMENTATIONS):
        del out["attn_implementation"]
        what = "an attention kernel from the Hugging Face hub" if hub else "an Axolotl attention backend"
        findings.append(
            Finding(
                "HB005",
                "error",
                f"`attn_implementation: {clip(attn)}`{_line(lines, 'attn_implementation')} is {what} "
                "that hellbender does not support yet.",
                fix=f"Use one of: {', '.join(_OUR_ATTN)}.",
                key="attn_implementation",
            )
        )
    tokens = out.get("tokens")
    if isinstance(tokens, dict) and tokens and all(str(k).endswith("_token") for k in tokens):
        del out["tokens"]
        findings.append(
            Finding(
                "HB008",
                "error",
                f"`tokens`{_line(lines, 'tokens')} lists new tokens to add to the vocabulary; "
                f"{', '.join(f'`{clip(str(k))}`' for k in tokens)} are special tokens.",
                fix="Move them under `special_tokens:`.",
                key="tokens",
            )
        )

    if off:
        findings.append(
            Finding(
                "HB010",
                "info",
                f"{', '.join(off[:8])}{' …' if len(off) > 8 else ''}: Axolotl options set to the value "
                "that asks for nothing; accepted and ignored.",
                key=off[0].strip("`").split(":")[0],
            )
        )
    return out, findings
