"""``hellbender validate --fix``: mechanical rewrites of a YAML file, keeping comments and order.

Only findings with one obviously right rewrite are fixed: a deprecated ``batch_size`` becomes the
``gradient_accumulation_steps`` it implies, legacy boolean attention flags become
``attn_implementation``, and Axolotl's FSDP1 spellings become their FSDP2 ones (``fsdp_version: 2``,
no ``fsdp_`` prefix, ``sharding_strategy`` → ``reshard_after_forward``, the ``fsdp:`` list and
FSDP1-only options gone). ruamel.yaml's round-trip mode keeps the user's comments and key order.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hellbender.config.carryover import from_sharegpt
from hellbender.config.findings import has_errors
from hellbender.config.normalize import (
    LEGACY_ATTN_FLAGS,
    RESHARD_OF_OPTION,
    RESHARD_OF_STRATEGY,
    fsdp_requested,
    resolve_fsdp,
)
from hellbender.config.schema import FSDP1_ONLY_OPTIONS, FSDPConfig, HellbenderConfig, legacy_fsdp_keys
from hellbender.files import write_atomically


def _replace_keys(data: Any, old_keys: list[str], new_key: str | None, value: Any) -> None:
    """Replace ``old_keys`` by ``new_key: value`` at the first old key's place, keeping comments.

    ruamel stores the comment at the end of a key's line, and the comment lines that follow it,
    with that key; deleting the key would silently drop them. They move to the new key's line, or,
    when nothing replaces the keys, become full-line comments before the next key (attaching them
    to the previous key would misplace them when its value is a block list or mapping).
    """
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    keys = list(data.keys())
    # in file order, so nothing before the first old key is deleted and its index stays valid
    old_keys = sorted(old_keys, key=keys.index)
    position = keys.index(old_keys[0])
    after = [k for k in keys[keys.index(old_keys[-1]) + 1 :] if k not in old_keys]
    texts = [
        data.ca.items.pop(k)[2].value
        for k in old_keys
        if k in data.ca.items and data.ca.items[k][2] is not None
    ]
    for key in old_keys:
        del data[key]
    if new_key is not None:
        data.insert(position, new_key, value)
    if not texts:
        return
    # One comment text. A text starting with a newline had no end-of-line comment (the newline
    # ends the key's own line); a later key's end-of-line comment becomes a full line of its own.
    text = texts[0] + "".join(t.lstrip(" ").removeprefix("\n") for t in texts[1:])
    if new_key is not None:
        data.ca.items.setdefault(new_key, [None, None, None, None])[2] = CommentToken(text, CommentMark(0))
    elif after:
        body = text.lstrip(" ").removeprefix("\n").rstrip("\n")
        lines = [CommentToken(line.lstrip(" ") + "\n", CommentMark(0)) for line in body.split("\n")]
        slot = data.ca.items.setdefault(after[0], [None, None, None, None])
        slot[1] = lines + (slot[1] or [])
    elif position > 0 and not isinstance(data[keys[position - 1]], dict | list):
        # the removed key was the last one: its comment can only follow the previous scalar line
        slot = data.ca.items.setdefault(keys[position - 1], [None, None, None, None])
        previous = slot[2].value if slot[2] is not None else ""
        slot[2] = CommentToken(
            previous.rstrip("\n") + ("\n" if previous else "") + text.lstrip(" "), CommentMark(0)
        )


def _fix_sharegpt(data: Any) -> list[str]:
    """Dataset entries of Axolotl's retired ``type: sharegpt`` written as the ``chat_template``
    entries they are read as (:func:`hellbender.config.carryover.from_sharegpt`)."""
    changes: list[str] = []
    for list_key in ("datasets", "test_datasets"):
        entries = data.get(list_key)
        if not isinstance(entries, list):
            continue
        for i, entry in enumerate(entries):
            kind = entry.get("type") if isinstance(entry, dict) else None
            if not isinstance(kind, str) or kind.split(":")[0] != "sharegpt":
                continue
            mapped = from_sharegpt(dict(entry))
            if mapped is None:
                continue  # not read as chat_template: the finding says what to do
            gone = [k for k in entry if k not in mapped]
            if gone:
                _replace_keys(entry, gone, None, None)
            for key, value in mapped.items():
                if key not in entry or entry[key] != value:
                    entry[key] = value
            changes.append(f"{list_key}.{i}: type {kind} → chat_template (fields of sharegpt turns mapped)")
    return changes


def _fsdp_block(data: Any, after: str | None) -> Any:
    """The file's ``fsdp_config`` mapping, made (after the top-level key ``after``) when missing."""
    from ruamel.yaml.comments import CommentedMap

    if isinstance(data.get("fsdp_config"), dict):
        return data["fsdp_config"]
    if "fsdp_config" in data:  # `fsdp_config:` with no value
        data["fsdp_config"] = CommentedMap()
    else:
        keys = list(data.keys())
        data.insert(keys.index(after) + 1 if after in keys else len(keys), "fsdp_config", CommentedMap())
    return data["fsdp_config"]


def _set_options(block: Any, options: dict[str, Any]) -> None:
    """Give each option a value in an fsdp_config mapping, unless it has one. New keys go first, in
    order: the block's last key carries the comments that follow it (often commented-out options),
    which keys appended at the end would land after."""
    position = 0
    for option, value in options.items():
        if block.get(option) is not None:
            continue
        if option in block:  # written without a value
            block[option] = value
        else:
            block.insert(position, option, value)
            position += 1


def _fix_fsdp(data: Any, raw: HellbenderConfig) -> list[str]:
    """Axolotl's FSDP1 spellings → the FSDP2 ones, exactly as :func:`resolve_fsdp` reads them.

    Nothing is rewritten when two spellings disagree or a sharding FSDP2 cannot do is asked for
    (HB165, HB166): the user has to choose.
    """
    if not fsdp_requested(raw):
        return []
    _, findings = resolve_fsdp(raw)
    if has_errors(findings):
        return []
    changes: list[str] = []
    fsdp = raw.fsdp_config if raw.fsdp_config is not None else FSDPConfig()
    block = data["fsdp_config"] if isinstance(data.get("fsdp_config"), dict) else None

    if block is not None:
        legacy = legacy_fsdp_keys()
        renamed = [key for key in block if key in legacy]
        for key in renamed:
            option = legacy[key]
            if option in fsdp.model_fields_set:  # both spellings, one value: the old one goes
                _replace_keys(block, [key], None, None)
            else:
                _replace_keys(block, [key, *([option] if option in block else [])], option, block[key])
        if renamed:
            changes.append(f"fsdp_config: {', '.join(renamed)} → {', '.join(legacy[k] for k in renamed)}")
        strategy = fsdp.sharding_strategy or fsdp.fsdp_sharding_strategy
        if strategy in RESHARD_OF_STRATEGY and "sharding_strategy" in block:
            reshard = RESHARD_OF_STRATEGY[strategy]
            if "reshard_after_forward" in block and block["reshard_after_forward"] is not None:
                _replace_keys(block, ["sharding_strategy"], None, None)
            else:
                stale = ["reshard_after_forward"] if "reshard_after_forward" in block else []
                _replace_keys(block, ["sharding_strategy", *stale], "reshard_after_forward", reshard)
            changes.append(
                f"fsdp_config.sharding_strategy: {strategy} → reshard_after_forward: {str(reshard).lower()}"
            )
        dropped = [key for key in FSDP1_ONLY_OPTIONS if key in block]
        if dropped:
            _replace_keys(block, dropped, None, None)
            changes.append(f"removed FSDP1-only fsdp_config keys {', '.join(dropped)}")
        if fsdp.fsdp_version is not None and fsdp.fsdp_version != 2:
            block["fsdp_version"] = 2
            changes.append("fsdp_config.fsdp_version: 2 (FSDP2)")

    anchor: str | None = None  # the top-level key a new fsdp_config block follows
    if raw.fsdp_version is not None:
        anchor = "fsdp_version"
        if raw.fsdp_version != 2:
            data["fsdp_version"] = 2
            changes.append("fsdp_version: 2 (FSDP2)")
    need_version = raw.fsdp_version is None and fsdp.fsdp_version is None
    if raw.fsdp and "fsdp" in data:
        implied: dict[str, bool] = {}
        for item in raw.fsdp:
            if item in RESHARD_OF_OPTION:
                implied["reshard_after_forward"] = RESHARD_OF_OPTION[item]
            elif item == "offload":
                implied["offload_params"] = True
        if need_version:
            stale = ["fsdp_version"] if "fsdp_version" in data else []
            _replace_keys(data, ["fsdp", *stale], "fsdp_version", 2)
            anchor, need_version = "fsdp_version", False
        else:
            _replace_keys(data, ["fsdp"], None, None)
        if implied:
            _set_options(_fsdp_block(data, anchor), implied)
        moved = "".join(f", fsdp_config.{k}: {str(v).lower()}" for k, v in implied.items())
        changes.append(f"fsdp: [{', '.join(raw.fsdp)}] → fsdp_version: 2{moved}")
    if need_version:
        if "fsdp_version" in data:  # `fsdp_version:` with no value
            data["fsdp_version"] = 2
        else:
            data.insert(list(data.keys()).index("fsdp_config"), "fsdp_version", 2)
        changes.append("fsdp_version: 2 (FSDP2)")
    if raw.fsdp_final_state_dict_type is not None and "fsdp_final_state_dict_type" in data:
        final = {"final_state_dict_type": data["fsdp_final_state_dict_type"]}
        _set_options(_fsdp_block(data, "fsdp_final_state_dict_type"), final)
        _replace_keys(data, ["fsdp_final_state_dict_type"], None, None)
        changes.append("fsdp_final_state_dict_type → fsdp_config.final_state_dict_type")
    return changes


def _mapping_indent(text: str) -> int:
    """Indentation of nested mappings in ``text`` (ruamel's guess covers only block lists)."""
    parent_indent, parent_opens = 0, False
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(stripped)
        if parent_opens and indent > parent_indent and not stripped.startswith("-"):
            return indent - parent_indent
        parent_indent = indent
        parent_opens = stripped.rstrip().endswith(":") and not stripped.startswith("-")
    return 2


def _round_trip(path: Path) -> tuple[Any, Any]:
    """The YAML document of ``path`` loaded for a rewrite that keeps its comments, key order and
    layout, and the ruamel instance that writes it back the same way."""
    from ruamel.yaml import YAML
    from ruamel.yaml.util import load_yaml_guess_indent

    text = path.read_text(encoding="utf-8")
    yaml = YAML()  # round-trip: comments and order survive
    yaml.preserve_quotes = True
    yaml.allow_duplicate_keys = True  # a key repeated with the same value is a warning (HB013), read once
    # Write back in the file's own layout, so the only lines that change are the fixed ones:
    # its indentation, `[{path: a}]` kept with braces, and long lines (jinja templates) not folded.
    guess = YAML()
    guess.allow_duplicate_keys = True
    _, seq_indent, dash_offset = load_yaml_guess_indent(text, yaml=guess)
    if dash_offset is None:  # no block list to learn from: Axolotl's layout
        seq_indent, dash_offset = 4, 2
    yaml.indent(mapping=_mapping_indent(text), sequence=seq_indent, offset=dash_offset)
    yaml.brace_single_entry_mapping_in_flow_sequence = True
    yaml.width = 1 << 16
    return yaml.load(text), yaml


def _write_back(path: Path, yaml: Any, data: Any) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as fh:
            yaml.dump(data, fh)
        shutil.copymode(path, tmp)  # keep the file's permissions (a 600 config stays 600)

    write_atomically(path, write)  # a crash never leaves a half-written config


def set_keys(path: str | Path, values: dict[str, Any]) -> None:
    """Set top-level keys of the YAML file ``path`` in place (``hellbender plan --fit --write``):
    existing keys keep their place and comments, new ones are appended."""
    resolved = Path(path).resolve()
    data, yaml = _round_trip(resolved)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    for key, value in values.items():
        data[key] = value
    _write_back(resolved, yaml, data)


def fix_file(path: str | Path, cfg: HellbenderConfig, raw: HellbenderConfig) -> list[str]:
    """Rewrite ``path`` in place. Returns what was changed.

    ``cfg`` is the normalized config and ``raw`` the validated one before normalization, both of
    the file alone (no command-line overrides: a fix computed from overridden values would write
    values the file never asked for). Truth values come from ``raw``, never from ruamel: ruamel reads
    YAML 1.2, where ``off`` and ``no`` are strings (truthy), while the config is read as YAML 1.1,
    where they are false.
    """
    path = Path(path).resolve()  # a symlinked config: rewrite its target, keep the link
    data, yaml = _round_trip(path)
    changes: list[str] = []
    if not isinstance(data, dict):
        return changes  # nothing mechanical to do (the findings already say what is wrong)

    # Only a batch_size that normalization accepted has one right rewrite: when it did not divide
    # evenly or contradicted the other two (HB121/HB122), the user has to choose.
    if "batch_size" in data and data["batch_size"] is not None and data["batch_size"] == cfg.batch_size:
        if "gradient_accumulation_steps" not in data or data["gradient_accumulation_steps"] is None:
            gas_key = ["gradient_accumulation_steps"] if "gradient_accumulation_steps" in data else []
            _replace_keys(
                data, ["batch_size", *gas_key], "gradient_accumulation_steps", cfg.gradient_accumulation_steps
            )
            changes.append(f"batch_size → gradient_accumulation_steps: {cfg.gradient_accumulation_steps}")
        else:
            _replace_keys(data, ["batch_size"], None, None)
            changes.append("removed batch_size (derived from micro_batch_size × gradient_accumulation_steps)")

    legacy = [flag for flag in LEGACY_ATTN_FLAGS if flag in data]
    enabled = {LEGACY_ATTN_FLAGS[f] for f in legacy if getattr(raw, f)}
    if (
        legacy
        and len(enabled | ({data["attn_implementation"]} if data.get("attn_implementation") else set())) <= 1
    ):
        if enabled and not data.get("attn_implementation"):
            backend = next(iter(enabled))
            stale = ["attn_implementation"] if "attn_implementation" in data else []
            _replace_keys(data, [*legacy, *stale], "attn_implementation", backend)
            changes.append(f"{', '.join(legacy)} → attn_implementation: {backend}")
        else:
            _replace_keys(data, legacy, None, None)
            changes.append(f"removed legacy flags {', '.join(legacy)}")

    changes += _fix_fsdp(data, raw)
    changes += _fix_sharegpt(data)

    if changes:
        _write_back(path, yaml, data)
    return changes
