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


def read_gguf_metadata(path: Path, *, everything: bool = False) -> dict[str, Any]:
    """Scalars from a GGUF header: ``general.architecture`` and the ``*.context_length`` keys, or
    with ``everything`` every scalar and string of the architecture's own keys, the vocabulary
    size (``tokenizer.ggml.tokens``' length, under ``tokenizer.ggml.tokens.count``) and the tensor
    names (under ``tensors``; the planner reads shapes and whether the head is tied from them).

    Reads the key/value section sequentially, skipping vocabulary arrays by their lengths, and
    without ``everything`` stops as soon as the two keys are known. The gguf library's reader
    parses every field (a 49k-token vocabulary becomes tens of thousands of numpy views), which
    costs seconds; validation needs two scalars from the start of the header. Tensor data is never
    touched. Raises ValueError on anything that is not a well-formed little-endian GGUF v2/v3 header.
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
                return _ArrayLength(count)
            raise ValueError(f"unknown GGUF value type {vtype}")

        if fh.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        if read("<I") not in (2, 3):
            raise ValueError("unsupported GGUF version")
        tensor_count = read("<Q")
        for _ in range(read("<Q")):
            key = read_string(True) or ""
            arch = found.get("general.architecture")
            wanted = key == "general.architecture" or key.endswith(".context_length")
            if everything:
                own = arch is not None and key.startswith(f"{arch}.")
                wanted = wanted or own or key == "tokenizer.ggml.tokens"
            value = read_value(read("<I"), wanted)
            if isinstance(value, _ArrayLength):
                if wanted:
                    found[f"{key}.count"] = int(value)
            elif wanted:
                found[key] = value
            if not everything and arch is not None and f"{arch}.context_length" in found:
                break
        if everything:
            names = []
            for _ in range(min(tensor_count, 1 << 20)):
                names.append(read_string(True) or "")
                dims = read("<I")
                fh.seek(8 * dims + 4 + 8, 1)  # dimensions, type, offset
            found["tensors"] = names
    return found


class _ArrayLength(int):
    """The length of a GGUF array whose items were skipped."""


# GGUF architecture keys → the Hugging Face config keys the planner reads.
_GGUF_TO_HF = {
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "vocab_size": "vocab_size",
    "context_length": "max_position_embeddings",
    "attention.key_length": "head_dim",
}


def gguf_model_config(meta: dict[str, Any]) -> dict[str, Any] | None:
    """A Hugging Face-shaped config dict from :func:`read_gguf_metadata` (``everything=True``)."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return None
    out: dict[str, Any] = {"model_type": arch}
    for gguf_key, hf_key in _GGUF_TO_HF.items():
        value = meta.get(f"{arch}.{gguf_key}")
        if isinstance(value, int):
            out[hf_key] = value
    if "vocab_size" not in out and isinstance(meta.get("tokenizer.ggml.tokens.count"), int):
        out["vocab_size"] = meta["tokenizer.ggml.tokens.count"]
    tensors = meta.get("tensors")
    if isinstance(tensors, list):
        # llama.cpp writes no output.weight when the head shares the embedding matrix
        out["tie_word_embeddings"] = "output.weight" not in tensors
        out["attention_bias"] = "blk.0.attn_q.bias" in tensors
        if "blk.0.attn_q_norm.weight" in tensors:
            out["qk_norm"] = True
    return out


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
            return gguf_model_config(read_gguf_metadata(path, everything=True))
    except (OSError, ValueError, RuntimeError, RecursionError, struct.error):
        # RuntimeError: "~user" with no such user; OSError: e.g. a name too long for the OS.
        return None
    return None


