"""GGUF files → a cached, trainable Hugging Face folder (safetensors + tokenizer).

Why convert instead of training the GGUF-loaded model directly: ``transformers`` marks a model
loaded with ``gguf_file=`` as quantized with method "gguf", and such a model can neither be saved
(``save_pretrained`` refuses) nor be the base of a clean checkpoint. So the file is dequantized
once, written as an ordinary float32 safetensors folder, and every later run loads that folder.

The cache is keyed by the *content* of the GGUF (SHA-256), not its path: a re-downloaded or
replaced file with the same name gets a new folder, and a copy under another name reuses the old
one. Hashing speed was measured at ~830 MB/s here (0.12 s for the 98 MB SmolLM2 file), so a full
hash is cheap next to a conversion; to avoid even that on a 4+ GB file, the digest is memoized
per (absolute path, size, mtime_ns, inode) — an edit in place changes the mtime, so a stale memo
would need a deliberately forged timestamp.

Writes are atomic (temporary folder + ``os.rename``) so an interrupted conversion never leaves a
folder that looks complete, and a file lock makes concurrent processes (e.g. several ranks started
by torchrun) convert once and share the result.

Special tokens: the converted tokenizer and model config are checked against the GGUF metadata
(``tokenizer.ggml.{bos,eos,unknown,padding}_token_id`` and ``tokenizer.chat_template``) and
corrected where they disagree. Older ``transformers`` releases were seen setting eos and pad to
``<|im_start|>`` (id 1) for SmolLM2 although the file says eos is ``<|im_end|>`` (id 2); a model
trained with the wrong eos never learns to stop. The metadata is the authority.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hellbender.config.schema import HellbenderConfig
from hellbender.errors import MissingFileError, ModelLoadError, UnavailableError

logger = logging.getLogger(__name__)

# Bump when the conversion itself changes (a bug fix, a new fix-up), so stale caches are not reused.
CONVERSION_VERSION = 1
# The config's default (one place for defaults: the schema), for callers that pass no folder.
DEFAULT_CACHE_DIR = Path(HellbenderConfig.model_fields["model_cache_dir"].default)
PROVENANCE_FILE = "hellbender_gguf.json"
_HASH_CHUNK = 1 << 22

# GGUF metadata key suffix → tokenizer attribute / config attribute stem.
_SPECIAL_KEYS: dict[str, str] = {
    "bos_token_id": "bos",
    "eos_token_id": "eos",
    "unknown_token_id": "unk",
    "padding_token_id": "pad",
}


@dataclass(frozen=True)
class GGUFTokenMetadata:
    """What a GGUF file says about its special tokens: ids, their strings, and the chat template."""

    architecture: str
    token_ids: dict[str, int]  # keys: bos, eos, unk, pad (only those present in the file)
    token_strings: dict[str, str]  # same keys, the token text at that id
    chat_template: str | None
    vocab_size: int


def read_gguf_token_metadata(gguf_path: str | Path) -> GGUFTokenMetadata:
    """Read the special-token ids, their strings and the chat template from a GGUF file."""
    from gguf import GGUFReader  # optional dependency (extra "gguf")

    reader = GGUFReader(str(gguf_path))
    fields = reader.fields

    def scalar(key: str) -> Any:
        f = fields.get(key)
        return f.contents() if f is not None else None

    tokens_field = fields.get("tokenizer.ggml.tokens")
    if tokens_field is None:
        raise ModelLoadError(
            f"{gguf_path}: the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)"
        )
    vocab_size = len(tokens_field.data)
    ids: dict[str, int] = {}
    strings: dict[str, str] = {}
    for key, name in _SPECIAL_KEYS.items():
        value = scalar(f"tokenizer.ggml.{key}")
        if value is None:
            continue
        token_id = int(value)
        if not 0 <= token_id < vocab_size:
            raise ModelLoadError(f"{gguf_path}: tokenizer.ggml.{key} = {token_id} is outside the vocabulary")
        ids[name] = token_id
        strings[name] = tokens_field.contents(token_id)
    return GGUFTokenMetadata(
        architecture=str(scalar("general.architecture")),
        token_ids=ids,
        token_strings=strings,
        chat_template=scalar("tokenizer.chat_template"),
        vocab_size=vocab_size,
    )


@dataclass
class SpecialTokenReport:
    """What :func:`apply_gguf_special_tokens` changed (empty when the loader already agreed)."""

    changes: list[str] = field(default_factory=list)


def apply_gguf_special_tokens(tokenizer: Any, model: Any, meta: GGUFTokenMetadata) -> SpecialTokenReport:
    """Make tokenizer, ``model.config`` and ``model.generation_config`` agree with the GGUF metadata.

    Each special token the file names is set by its string on the tokenizer (which must map that
    string back to the same id, or the vocabularies disagree and we refuse) and by id on the
    config and generation config. The chat template is taken from the file when it has one.
    """
    report = SpecialTokenReport()
    for name, token_id in meta.token_ids.items():
        text = meta.token_strings[name]
        if tokenizer.convert_tokens_to_ids(text) != token_id:
            raise ModelLoadError(
                f"GGUF says {name}_token is {text!r} (id {token_id}) but the converted tokenizer maps "
                f"{text!r} to id {tokenizer.convert_tokens_to_ids(text)}; "
                "the vocabulary was not converted faithfully"
            )
        old = getattr(tokenizer, f"{name}_token")
        if old != text:
            setattr(tokenizer, f"{name}_token", text)
            report.changes.append(f"tokenizer.{name}_token: {old!r} -> {text!r} (id {token_id})")
        for target_name, target in (("config", model.config), ("generation_config", model.generation_config)):
            if target is None:
                continue
            attr = f"{name}_token_id"
            if name == "unk" and target_name == "generation_config":
                continue  # generation has no notion of an unknown token
            old_id = getattr(target, attr, None)
            if old_id != token_id:
                setattr(target, attr, token_id)
                report.changes.append(f"{target_name}.{attr}: {old_id} -> {token_id}")
    if meta.chat_template and tokenizer.chat_template != meta.chat_template:
        tokenizer.chat_template = meta.chat_template
        report.changes.append("tokenizer.chat_template: set from tokenizer.chat_template metadata")
    return report


# --------------------------------------------------------------------------------------- hashing


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_content_hash(gguf_path: str | Path, cache_dir: str | Path | None = None) -> str:
    """Full SHA-256 of the file, memoized in ``cache_dir`` by (path, size, mtime_ns, inode)."""
    path = Path(gguf_path).resolve()
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    memo: Path | None = None
    if cache_dir is not None:
        memo_dir = Path(cache_dir).expanduser() / "hash-memo"
        memo = memo_dir / (hashlib.sha1(str(path).encode()).hexdigest() + ".json")
        with contextlib.suppress(OSError, ValueError, KeyError):
            saved = json.loads(memo.read_text())
            if {k: saved[k] for k in stamp} == stamp:
                return str(saved["sha256"])
    sha = _sha256_file(path)
    if memo is not None:
        with contextlib.suppress(OSError):  # a memo is an optimisation; failing to write it is harmless
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps({**stamp, "sha256": sha}))
            os.replace(tmp, memo)
    return sha


# ------------------------------------------------------------------------------------ conversion


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX); without fcntl the atomic rename alone keeps us safe."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_folder_name(sha256: str, fix_special_tokens: bool = True) -> str:
    """``<first 24 hex of sha256>-v<conversion version>[-unfixed]``: keyed by content only.

    The file name is deliberately not part of the key (a renamed copy reuses the conversion);
    it is recorded in the folder's ``hellbender_gguf.json`` instead.
    """
    suffix = "" if fix_special_tokens else "-unfixed"
    return f"{sha256[:24]}-v{CONVERSION_VERSION}{suffix}"


def _convert(gguf_path: Path, out_dir: Path, fix_special_tokens: bool) -> dict[str, Any]:
    """Dequantize ``gguf_path`` into ``out_dir`` (which must not exist yet); returns provenance."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as exc:
        raise UnavailableError(
            f"{gguf_path}: reading a GGUF file needs the gguf package ({exc}): pip install 'hellbender[gguf]'"
        ) from exc
    except (OSError, ValueError) as exc:
        # A damaged file, or an architecture / quantization transformers cannot read from GGUF.
        raise ModelLoadError(f"{gguf_path}: transformers cannot load this GGUF file: {exc}") from exc
    report = SpecialTokenReport()
    meta = read_gguf_token_metadata(gguf_path)
    if fix_special_tokens:
        report = apply_gguf_special_tokens(tokenizer, gguf_model, meta)
        for change in report.changes:
            logger.warning("GGUF special-token fix (%s): %s", gguf_path.name, change)

    # A GGUF-loaded model carries a "gguf" quantizer and refuses save_pretrained. Rebuild a plain
    # model from a config without quantization_config, on the meta device (no second copy of the
    # weights in memory), and hand it the dequantized tensors themselves (assign=True).
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False, assign=True)
    if unexpected or [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    import transformers

    provenance = {
        "source": str(gguf_path),
        "size": gguf_path.stat().st_size,
        "conversion_version": CONVERSION_VERSION,
        "transformers_version": transformers.__version__,
        "special_tokens_fixed": fix_special_tokens,
        "special_token_changes": report.changes,
        "special_token_ids": meta.token_ids,
        "dtype": "float32",
        "seconds": round(time.perf_counter() - started, 2),
    }
    return provenance


def ensure_hf_folder(
    gguf_path: str | Path,
    cache_dir: str | Path | None = None,
    *,
    fix_special_tokens: bool = True,
) -> Path:
    """Return a Hugging Face folder (float32 safetensors + tokenizer) converted from ``gguf_path``.

    The conversion runs once per file content; later calls return the cached folder after hashing
    (memoized). ``cache_dir`` defaults to ``~/.cache/hellbender/models``; conversions live in its
    ``gguf/`` subfolder.
    """
    src = Path(gguf_path).expanduser().resolve()
    if not src.is_file():
        raise MissingFileError(f"GGUF file not found: {src}")
    root = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser().resolve()
    sha = gguf_content_hash(src, root)
    target = root / "gguf" / cached_folder_name(sha, fix_special_tokens)
    if target.is_dir():
        return target
    with _file_lock(root / "gguf" / f".{target.name}.lock"):
        if target.is_dir():  # another process finished it while we waited for the lock
            return target
        tmp = root / "gguf" / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            logger.info("Converting %s to a Hugging Face folder (once; cached in %s)", src, target)
            provenance = _convert(src, tmp, fix_special_tokens)
            provenance["sha256"] = sha
            (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target
