"""``hellbender validate --fix``: mechanical rewrites of a YAML file, keeping comments and order.

Only findings with one obviously right rewrite are fixed: a deprecated ``batch_size`` becomes the
``gradient_accumulation_steps`` it implies, and legacy boolean attention flags become
``attn_implementation``. ruamel.yaml's round-trip mode keeps the user's comments and key order.
"""

from __future__ import annotations

from pathlib import Path

from hellbender.config.normalize import LEGACY_ATTN_FLAGS
from hellbender.config.schema import HellbenderConfig


def fix_file(path: str | Path, cfg: HellbenderConfig) -> list[str]:
    """Rewrite ``path`` in place; ``cfg`` is the normalized config. Returns what was changed."""
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: comments and order survive
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)  # the layout Axolotl examples use
    path = Path(path)
    data = yaml.load(path.read_text(encoding="utf-8"))
    changes: list[str] = []

    if "batch_size" in data:
        keys = list(data.keys())
        position = keys.index("batch_size")
        del data["batch_size"]
        if "gradient_accumulation_steps" not in data:
            data.insert(position, "gradient_accumulation_steps", cfg.gradient_accumulation_steps)
            changes.append(f"batch_size → gradient_accumulation_steps: {cfg.gradient_accumulation_steps}")
        else:
            changes.append("removed batch_size (derived from micro_batch_size × gradient_accumulation_steps)")

    legacy = [flag for flag in LEGACY_ATTN_FLAGS if flag in data]
    enabled = {LEGACY_ATTN_FLAGS[f] for f in legacy if data[f]}
    if legacy and len(enabled | ({data["attn_implementation"]} if data.get("attn_implementation") else set())) <= 1:
        position = list(data.keys()).index(legacy[0])
        for flag in legacy:
            del data[flag]
        if enabled and "attn_implementation" not in data:
            backend = next(iter(enabled))
            data.insert(position, "attn_implementation", backend)
            changes.append(f"{', '.join(legacy)} → attn_implementation: {backend}")
        else:
            changes.append(f"removed legacy flags {', '.join(legacy)}")

    if changes:
        tmp = path.with_name(path.name + ".hbtmp")
        with tmp.open("w", encoding="utf-8") as fh:
            yaml.dump(data, fh)
        tmp.replace(path)  # atomic: a crash never leaves a half-written config
    return changes
