"""A model's description read from its files without loading weights: config.json or a GGUF header.

Used by the config rules (sequence_len against the model's context length) and, later, by the
memory planner. It sits below every pipeline stage (standard library only, no torch) because the
config stage must read it without importing the model stage, and ``hellbender validate`` must
answer in well under a second. The GGUF *conversion* (dequantize into a trainable folder) is in
:mod:`hellbender.models.gguf`; this is only the header.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

# GGUF metadata value types (gguf spec) → struct format of the scalar ones; 8 = string, 9 = array.
_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """``general.architecture`` and the ``*.context_length`` keys from a GGUF header.

    Reads the key/value section sequentially and stops as soon as both are known, skipping
    vocabulary arrays by their lengths. The gguf library's reader parses every field (a 49k-token
    vocabulary becomes tens of thousands of numpy views), which costs seconds; validation needs
    two scalars from the start of the header. Tensor data is never touched. Raises ValueError on
    anything that is not a well-formed little-endian GGUF v2/v3 header.
    """
    found: dict[str, Any] = {}
    with path.open("rb") as fh:

        def read(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            buf = fh.read(size)
            if len(buf) != size:
                raise ValueError("truncated GGUF header")
            return struct.unpack(fmt, buf)[0]

        def read_string(keep: bool) -> str | None:
            length = read("<Q")
            if not keep:
                fh.seek(length, 1)
                return None
            buf = fh.read(min(length, 1 << 20))
            if len(buf) != length:
                raise ValueError("truncated or oversized GGUF string")
            return buf.decode("utf-8", "replace")

        def read_value(vtype: int, keep: bool) -> Any:
            if vtype in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[vtype])
            if vtype == 8:
                return read_string(keep)
            if vtype == 9:
                item_type, count = read("<I"), read("<Q")
                if item_type in _GGUF_SCALARS:
                    fh.seek(count * struct.calcsize(_GGUF_SCALARS[item_type]), 1)
                else:
                    for _ in range(count):
                        read_value(item_type, False)
                return None
            raise ValueError(f"unknown GGUF value type {vtype}")

        if fh.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        if read("<I") not in (2, 3):
            raise ValueError("unsupported GGUF version")
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key = read_string(True) or ""
            keep = key == "general.architecture" or key.endswith(".context_length")
            value = read_value(read("<I"), keep)
            if keep:
                found[key] = value
            arch = found.get("general.architecture")
            if arch is not None and f"{arch}.context_length" in found:
                break
    return found


def read_model_config(base_model: str) -> dict[str, Any] | None:
    """The model's config as a dict without loading weights, or None if it cannot be read here.

    Never raises: a path that cannot be resolved, a damaged config.json or a file that is not
    really GGUF all mean "cannot be read here", and the rules that need it report a skip.
    """
    try:
        path = Path(base_model).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            loaded = json.loads((path / "config.json").read_text(encoding="utf-8"))
            return loaded if isinstance(loaded, dict) else None
        if path.is_file() and path.suffix == ".gguf":
            meta = read_gguf_metadata(path)
            arch = meta.get("general.architecture")
            if not isinstance(arch, str):
                return None
            out: dict[str, Any] = {"model_type": arch}
            ctx = meta.get(f"{arch}.context_length")
            if isinstance(ctx, int):
                out["max_position_embeddings"] = ctx
            return out
    except (OSError, ValueError, RuntimeError, RecursionError, struct.error):
        # RuntimeError: "~user" with no such user; OSError: e.g. a name too long for the OS.
        return None
    return None


