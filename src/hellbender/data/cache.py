"""The prepared-dataset cache: content-keyed, written atomically.

**Key.** A SHA-256 over everything that can change the prepared data (:func:`cache_ingredients`):
the *bytes* of every source file, the tokenizer's identity (its full serialized vocabulary,
merges, normalizer and added tokens, its special tokens and its chat template — not its name,
since two tokenizers named alike can differ), each dataset entry's settings and resolved prompt
format, every top-level key that changes tokenization, and the hellbender version. Anything not
in the key must not change the result (e.g. ``dataset_num_proc``: tokenization is deterministic
whatever the number of processes).

**Atomicity.** A cache folder is built under a temporary name in the same parent and renamed
into place when complete (``rename`` is atomic on one filesystem), so an interrupted preprocess
leaves only a ``.tmp-*`` folder that no later run trusts. ``meta.json`` is written last inside
the temporary folder; a folder without it is never used. The next build in the same root removes
such leftovers of builds that are no longer running (the temporary name holds the host and the
process id), and a full disk is one :class:`~hellbender.errors.DiskFullError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import hellbender
from hellbender.config.schema import ResolvedConfig
from hellbender.files import disk_full_error, is_disk_full, tree_bytes

META_FILE = "meta.json"
# Bump when the preparation logic changes in a way that changes its output within one release.
# 2: a broken JSON array is an error, not one skipped row (caches that lost its remaining rows go).
# 3: chat masking's fallback search anchors each content on the template text before it.
# 4: the report counts samples with no end-of-turn token found (no_eot); older caches lack it.
PIPELINE_VERSION = 4

# Top-level keys that change what preparation produces.
TOKENIZATION_KEYS = (
    "sequence_len",
    "min_sample_len",
    "excess_length_strategy",
    "train_on_inputs",
    "on_bad_row",  # a cache built while skipping bad rows must not satisfy a run that forbids them
    "chat_template",
    "default_system_message",
    "seed",
    "val_set_size",
    "shuffle_merged_datasets",
    "dataset_exact_deduplication",
)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what makes a tokenizer produce the ids it does (and the template it renders)."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The full tokenizer.json: vocabulary, merges, normalizer, pre-tokenizer, post-processor
        # (BOS/EOS insertion) and added tokens. Its serialization is ordered, hence stable.
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    added = {
        int(i): [t.content, bool(getattr(t, "special", False))]
        for i, t in tokenizer.added_tokens_decoder.items()
    }
    extra = {
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "added": sorted(added.items()),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos_token_id": tokenizer.eos_token_id,
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_ingredients(
    cfg: ResolvedConfig,
    tokenizer_id: str,
    train: list[Mapping[str, Any]],
    evaluation: list[Mapping[str, Any]],
) -> dict[str, Any]:
    """Everything the key is made of, as plain JSON (also written to meta.json, for diagnosis).

    ``train`` / ``evaluation`` hold per dataset ``{"config": ..., "source": content hash,
    "format": format identity}``.
    """
    return {
        "hellbender": hellbender.__version__,
        "pipeline": PIPELINE_VERSION,
        "tokenizer": tokenizer_id,
        "datasets": list(train),
        "test_datasets": list(evaluation),
        "settings": {key: getattr(cfg, key) for key in TOKENIZATION_KEYS},
    }


def cache_key(ingredients: Mapping[str, Any]) -> str:
    blob = json.dumps(ingredients, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def prepared_root(cfg: ResolvedConfig) -> Path:
    return Path(cfg.dataset_prepared_path).expanduser()


def is_complete(folder: Path) -> bool:
    """A cache folder is trusted only if it was renamed into place complete (meta.json inside)."""
    return (folder / META_FILE).is_file()


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; on success it becomes ``final``.

    On an exception the temporary folder is removed and ``final`` is left as it was. If ``final``
    already exists (a rebuild, or another process finished first), the old folder is moved aside
    and deleted after the new one is in place, so ``final`` is never a half-written folder.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final.parent)
    tmp = final.parent / f".tmp-{final.name}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        try:
            yield tmp
        except Exception as exc:
            if not is_disk_full(exc, tmp):
                raise
            written = tree_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back before measuring what is free
            estimate = "The estimate is what fit before the disk filled up: more is needed. "
            estimate = estimate if written else ""
            raise disk_full_error(
                final,
                "writing the prepared dataset cache",
                written,
                f"{estimate}Free some space, or point dataset_prepared_path at a disk with room.",
            ) from exc
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# The host in a temporary folder's name: a process id means nothing to another machine sharing the root.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _remove_leftovers(root: Path) -> None:
    """Remove what killed builds left in ``root``: ``.tmp-*`` folders of this host whose process is
    gone, and ``.old-*`` folders (a replaced cache that a kill kept from being deleted)."""
    for path in root.iterdir():
        parts = path.name.rsplit("-", 3)
        if path.name.startswith(".old-"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(".tmp-") and len(parts) == 4 and parts[1] == _HOST and parts[2].isdigit():
            if not _running(int(parts[2])):
                shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a number no process has): leave it alone
    return True


def write_meta(folder: Path, ingredients: Mapping[str, Any]) -> None:
    (folder / META_FILE).write_text(
        json.dumps({"key": cache_key(ingredients), "ingredients": ingredients}, indent=2, default=str)
    )
