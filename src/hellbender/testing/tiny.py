"""Tiny random Llama models and a tiny tokenizer, built offline, for every test suite.

Why this exists: tests must never touch the Hugging Face hub and must run in seconds on a shared
2-core CPU. A 2-layer Llama with hidden size 32 exercises every code path a real Llama does
(rotary embeddings, grouped-query attention, SwiGLU, RMSNorm, an untied head) at a millionth of
the cost. The tokenizer mirrors SmolLM2-Instruct (the demo model): byte-level BPE,
``<|endoftext|>`` / ``<|im_start|>`` / ``<|im_end|>`` at ids 0 / 1 / 2, ChatML template, no BOS
added automatically — plus a dedicated ``<|pad|>`` token so padding never aliases a trained token.

Everything is deterministic: the BPE merges are learned from a fixed corpus embedded below and the
weights come from a seeded generator, so two calls with the same arguments give identical objects.

:func:`write_tiny_gguf` writes a real GGUF file (float32 tensors, llama.cpp layout) from such a
model, so the GGUF conversion path can be tested in under a second instead of on a 90 MB file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# ChatML, as SmolLM2 / Qwen write it, minus SmolLM2's injected default system prompt (tests want
# to see exactly the messages they passed in).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Ids 0..3 are fixed so tests can reason about them; the order of the first three matches SmolLM2.
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")

# A small fixed corpus: BPE merges learned from it make common words multi-byte tokens, so token
# boundaries differ from character boundaries as they do with real tokenizers (tests of label
# masking must not pass only because one character happens to be one token).
_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.",
    "### Instruction:\nSummarize the text.\n\n"
    "### Input:\nThe cat sat on the mat.\n\n### Response:\nA cat sat.",
    "user\nWhat is the capital of France?\nassistant\nThe capital of France is Paris.",
    "system\nYou are a helpful assistant.\nuser\nHello! How are you?\nassistant\nI am fine, thank you.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "Hello world. Hello there. The answer is yes. The answer is no. Is it true? It is true.",
    "One two three four five six seven eight nine ten.",
    "the of and to in is that for it as with was on be by this are or an at from",
)


def build_tiny_tokenizer(
    vocab_size: int = 320,
    *,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    pad_token: str | None = "<|pad|>",
    bos_token: str | None = "<|im_start|>",
    eos_token: str | None = "<|im_end|>",
    unk_token: str | None = "<|endoftext|>",
    chat_template: str | None = CHATML_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on a fixed corpus.

    ``vocab_size`` counts the 4 special tokens and the 256 byte symbols, so the default 320 leaves
    60 merges. Pass ``pad_token=None`` to get a tokenizer without a pad token (the ``<|pad|>``
    string still exists in the vocabulary, as it does in many real vocabularies), and
    ``special_tokens`` without ``"<|pad|>"`` to leave it out of the vocabulary as well.
    """
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size must be at least {256 + len(special_tokens)} (bytes + specials)")
    for role, token in (("pad", pad_token), ("bos", bos_token), ("eos", eos_token), ("unk", unk_token)):
        if token is not None and token not in special_tokens:
            raise ValueError(f"{role}_token {token!r} is not one of special_tokens {list(special_tokens)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos_token,
        eos_token=eos_token,
        unk_token=unk_token,
        pad_token=pad_token,
        model_max_length=4096,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """A 2-layer Llama config: hidden 32, 4 query heads over 2 key/value heads (GQA), untied head.

    The special-token ids match :func:`build_tiny_tokenizer`. Any field can be overridden, e.g.
    ``tiny_llama_config(vocab_size=500, tie_word_embeddings=True)``.
    """
    values: dict[str, Any] = {
        "vocab_size": 320,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }
    values.update(overrides)
    return LlamaConfig(**values)


def build_tiny_model(
    config: LlamaConfig | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama; the same ``seed`` gives the same weights.

    The global RNG state is saved and restored, so building a model does not perturb the random
    stream of the test that builds it. Weights are drawn in float32 and then cast, so every
    ``dtype`` holds the same values up to rounding; only *parameters* are cast, the rotary
    ``inv_freq`` buffer stays float32 exactly as ``from_pretrained(..., dtype=...)`` leaves it
    (``model.to(torch.float16)`` would round it and shift every rotation angle).
    """
    cfg = config if config is not None else tiny_llama_config(**config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    if dtype != torch.float32:
        for param in model.parameters():
            param.data = param.data.to(dtype)
        model.config.dtype = dtype
    return model


def save_tiny_model_folder(
    path: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    pickled: bool = False,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a Hugging Face folder (config, weights, generation config, tokenizer) and return it.

    ``pickled=True`` writes ``pytorch_model.bin`` (a torch pickle) instead of safetensors, to test
    the refusal of pickled weights. The vocabulary size follows the tokenizer.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    config_overrides.setdefault("vocab_size", len(tok))
    model = build_tiny_model(seed=seed, dtype=dtype, **config_overrides)
    if pickled:
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------- GGUF


def _llama_cpp_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Hugging Face's rotary layout to llama.cpp's.

    HF applies rotary embeddings to the two halves of each head (``rotate_half``); llama.cpp
    rotates adjacent pairs. Converters therefore interleave the halves of every head's rows, and
    GGUF readers undo it. Writing a GGUF by hand must do the same or the round trip scrambles
    attention (the round-trip test compares logits, so a wrong permutation fails loudly).
    """
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return (
        weight.reshape(n_heads, 2, head_dim // 2, in_features)
        .transpose(1, 2)
        .reshape(out_features, in_features)
    )


def _byte_level_vocab(tokenizer: PreTrainedTokenizerFast) -> tuple[list[str], list[str]]:
    """Tokens in id order and merges as ``"a b"`` strings, read from the tokenizer's JSON."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = dict(state["model"]["vocab"])
    for added in state.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    if "" in tokens:
        raise ValueError("tokenizer ids are not contiguous; cannot write a GGUF vocabulary")
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    return tokens, merges


def write_tiny_gguf(
    path: str | Path,
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    *,
    special_token_ids: dict[str, int] | None = None,
    name: str = "tiny-llama",
) -> Path:
    """Write ``model`` + ``tokenizer`` as a float32 GGUF file in llama.cpp's llama layout.

    ``special_token_ids`` (keys ``bos``, ``eos``, ``unknown``, ``padding``) overrides the ids
    written to the metadata; by default they are the tokenizer's. Only what a llama GGUF needs is
    written; the file is meant for tests of the conversion path, not for llama.cpp.
    """
    import gguf  # optional dependency (extra "gguf"); imported here so tiny.py works without it

    cfg = model.config
    if cfg.model_type != "llama":
        raise ValueError(f"write_tiny_gguf writes llama models only, got {cfg.model_type!r}")
    # Filled in by LlamaConfig (kv heads default to the attention heads, rope to its defaults).
    kv_heads, rope = cfg.num_key_value_heads, cfg.rope_parameters
    assert kv_heads is not None and rope is not None
    rope_theta = rope["rope_theta"]
    assert rope_theta is not None
    out = Path(path)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(kv_heads)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens, merges = _byte_level_vocab(tokenizer)
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unknown": tokenizer.unk_token_id,
        "padding": tokenizer.pad_token_id,
    }
    ids.update(special_token_ids or {})
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unknown": writer.add_unk_token_id,
        "padding": writer.add_pad_token_id,
    }
    for key, token_id in ids.items():
        if token_id is not None:
            adders[key](int(token_id))
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    state = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    hf_to_gguf = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for layer in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in hf_to_gguf.items():
            weight = state[f"model.layers.{layer}.{hf_name}"]
            if hf_name == "self_attn.q_proj.weight":
                weight = _llama_cpp_permute(weight, cfg.num_attention_heads)
            elif hf_name == "self_attn.k_proj.weight":
                weight = _llama_cpp_permute(weight, kv_heads)
            tensors[f"blk.{layer}.{gguf_name}"] = weight
    for tensor_name, weight in tensors.items():
        writer.add_tensor(tensor_name, weight.contiguous().numpy())

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
