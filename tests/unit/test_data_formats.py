"""alpaca, completion, input_output and user-defined formats; span→token mapping; length rules.

References are the tokenizer itself: ids must equal tokenizing the full text in one call (as
inference does), and the decoded trained runs must equal the trained parts of the row.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from data_fixtures import mistral_style_tokenizer, smollm2_tokenizer, trained_runs

from hellbender.config.schema import DatasetConfig, UserDefinedFormat
from hellbender.data.errors import BadRow, DataError
from hellbender.data.formats import build_format
from hellbender.data.formats.alpaca import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, AlpacaFormat
from hellbender.data.formats.completion import CompletionFormat
from hellbender.data.formats.input_output import InputOutputFormat
from hellbender.data.formats.user_defined import UserDefinedPromptFormat
from hellbender.data.tokenize import IGNORE_INDEX, Limits, apply_limits, encode, tokenize_batch


@pytest.fixture(scope="module")
def smol() -> Any:
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def bos_tok() -> Any:
    """A tokenizer whose post-processor adds a BOS (``<s>``), like Llama 2 / Mistral."""
    return mistral_style_tokenizer()


def run(fmt: Any, tok: Any, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    ids, labels = encode([fmt.render(fmt.normalize(row))], tok)[0]
    return ids.tolist(), labels.tolist()


# ------------------------------------------------------------------ alpaca


@pytest.mark.parametrize("with_input", [True, False])
def test_alpaca_trains_answer_and_eos(smol: Any, with_input: bool) -> None:
    row = {"instruction": "Add {x} and 3", "input": "x = 4" if with_input else "", "output": "The sum is 7."}
    ids, labels = run(AlpacaFormat(train_on_inputs=False), smol, row)
    template = PROMPT_WITH_INPUT if with_input else PROMPT_NO_INPUT
    prompt = template.replace("{instruction}", row["instruction"]).replace("{input}", row["input"])
    assert ids == smol(prompt + row["output"], add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    assert trained_runs(ids, labels, smol) == [row["output"] + smol.eos_token]
    untrained = [t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX]
    assert smol.decode(untrained) == prompt


def test_alpaca_with_bos_tokenizer_and_train_on_inputs(bos_tok: Any) -> None:
    row = {"instruction": "tell us about cats", "output": "cats are small"}
    ids, labels = run(AlpacaFormat(train_on_inputs=False), bos_tok, row)
    assert ids[0] == bos_tok.bos_token_id and labels[0] == IGNORE_INDEX
    assert ids[-1] == bos_tok.eos_token_id and labels[-1] == bos_tok.eos_token_id
    assert trained_runs(ids, labels, bos_tok) == ["cats are small</s>"]
    ids, labels = run(AlpacaFormat(train_on_inputs=True), bos_tok, row)
    # Everything the text holds is trained; only the BOS the tokenizer adds carries no text.
    assert labels[1:] == ids[1:] and labels[0] == IGNORE_INDEX


def test_alpaca_eos_not_doubled_when_tokenizer_appends_it(smol: Any) -> None:
    from tokenizers import processors

    tok = copy.deepcopy(smol)
    eos = tok.eos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, tok.eos_token_id)]
    )
    ids, labels = run(AlpacaFormat(train_on_inputs=False), tok, {"instruction": "hi", "output": "yo"})
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id
    assert trained_runs(ids, labels, tok) == ["yo" + eos]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"instruction": "x"}, "missing_field"),
        ({"instruction": "x", "output": None}, "missing_field"),
        ({"instruction": 3, "output": "y"}, "wrong_type"),
        ({"instruction": "x", "input": ["a"], "output": "y"}, "wrong_type"),
        (["instruction", "output"], "wrong_type"),
    ],
)
def test_alpaca_bad_rows(row: Any, reason: str) -> None:
    with pytest.raises(BadRow) as err:
        AlpacaFormat(train_on_inputs=False).normalize(row)
    assert err.value.reason == reason


# ------------------------------------------------------------------ completion


def test_completion_short_text_fully_trained(smol: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    ids, labels = run(CompletionFormat(text_column="text"), smol, {"text": text})
    assert ids == smol(text, add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    assert labels == ids


def test_completion_custom_column_and_missing(smol: Any) -> None:
    fmt = CompletionFormat(text_column="body")
    assert fmt.normalize({"body": "abc"}) == {"text": "abc"}
    with pytest.raises(BadRow) as err:
        fmt.normalize({"text": "abc"})
    assert err.value.reason == "missing_field" and "'body'" in err.value.problem


@pytest.mark.parametrize(("tokenizer_name", "adds_bos"), [("smol", False), ("bos_tok", True)])
def test_completion_long_text_split_into_chunks(
    tokenizer_name: str, adds_bos: bool, request: pytest.FixtureRequest
) -> None:
    tok = request.getfixturevalue(tokenizer_name)
    text = " ".join(f"the quick brown fox {i} jumps" for i in range(60))
    fmt = CompletionFormat(text_column="text")
    full = tok(text)["input_ids"] + [tok.eos_token_id]
    assert len(full) % 64 >= 2, "the test wants a last chunk long enough to keep"
    limits = Limits(sequence_len=64, min_sample_len=2, excess_length_strategy="drop")
    out = tokenize_batch({"text": [text]}, [0], fmt=fmt, tokenizer=tok, limits=limits)
    pieces = [np.asarray(x).tolist() for x in out["input_ids"]]
    assert len(pieces) == -(-len(full) // 64) and out["_status"] == [""] * len(pieces)
    assert all(len(p) == 64 for p in pieces[:-1]) and out["_chunk"] == list(range(len(pieces)))
    assert [t for p in pieces for t in p] == full
    labels = [t for lab in out["labels"] for t in np.asarray(lab).tolist()]
    # Everything is trained except a BOS, which only opens the first chunk.
    assert labels == ([IGNORE_INDEX, *full[1:]] if adds_bos else full)
    assert (full[0] == tok.bos_token_id) == adds_bos and full.count(tok.bos_token_id) == int(adds_bos)


def test_completion_short_last_chunk_dropped(smol: Any) -> None:
    fmt = CompletionFormat(text_column="text")
    text = "hello world " * 40
    n = len(smol(text, add_special_tokens=False)["input_ids"]) + 1
    size = n - 1  # the last chunk holds a single token (the EOS)
    limits = Limits(sequence_len=size, min_sample_len=2, excess_length_strategy="drop")
    out = tokenize_batch({"text": [text]}, [0], fmt=fmt, tokenizer=smol, limits=limits)
    assert out["_status"] == ["", "too_short"]


# ------------------------------------------------------------------ input_output


def test_input_output_segments(smol: Any) -> None:
    segments = [
        {"text": "Q: why is the sky blue?\n", "label": False},
        {"text": "A: scattering.", "label": True},
        {"text": " More detail:", "label": True},
        {"text": "\nQ: and red?\n", "label": False},
        {"text": "A: sunsets.", "label": True},
    ]
    fmt = InputOutputFormat(field_segments="segments", train_on_inputs=False)
    ids, labels = run(fmt, smol, {"segments": segments})
    assert ids == smol("".join(s["text"] for s in segments), add_special_tokens=False)["input_ids"]
    assert trained_runs(ids, labels, smol) == ["A: scattering. More detail:", "A: sunsets."]
    everything = InputOutputFormat(field_segments="segments", train_on_inputs=True)
    ids, labels = run(everything, smol, {"segments": segments})
    assert labels == ids


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({}, "missing_field"),
        ({"segments": "text"}, "wrong_type"),
        ({"segments": []}, "empty_segments"),
        ({"segments": ["text"]}, "wrong_type"),
        ({"segments": [{"text": "a"}]}, "missing_field"),
        ({"segments": [{"text": "a", "label": "yes"}]}, "wrong_type"),
        ({"segments": [{"text": 5, "label": True}]}, "wrong_type"),
        ({"segments": [{"label": True}]}, "missing_field"),
    ],
)
def test_input_output_bad_rows(row: Any, reason: str) -> None:
    with pytest.raises(BadRow) as err:
        InputOutputFormat(field_segments="segments", train_on_inputs=False).normalize(row)
    assert err.value.reason == reason


# ------------------------------------------------------------------ user-defined


def test_user_defined_format(smol: Any) -> None:
    spec = UserDefinedFormat(
        system_prompt="Be brief.",
        field_instruction="q",
        field_input="ctx",
        field_output="a",
        format="<<{system}>> [INST] {instruction}\n{input} [/INST]",
        no_input_format="<<{system}>> [INST] {instruction} [/INST]",
    )
    fmt = UserDefinedPromptFormat(spec, train_on_inputs=False)
    for row, prompt in [
        ({"q": "add", "ctx": "1 2", "a": " 3"}, "<<Be brief.>> [INST] add\n1 2 [/INST]"),
        ({"q": "add", "a": " 3", "system": "Be exact."}, "<<Be exact.>> [INST] add [/INST]"),
    ]:
        ids, labels = run(fmt, smol, row)
        assert ids == smol(prompt + " 3", add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
        assert trained_runs(ids, labels, smol) == [" 3" + smol.eos_token]
    with pytest.raises(BadRow) as err:
        fmt.normalize({"q": "add"})
    assert err.value.reason == "missing_field"


def test_user_defined_format_strings_checked_up_front() -> None:
    # The config schema refuses these already (tests/unit/test_config_limits.py); the prompt
    # format checks again for a spec built without validation.
    with pytest.raises(DataError, match=r"\{question\}"):
        spec = UserDefinedFormat.model_construct(
            **{**UserDefinedFormat().model_dump(), "format": "{question}"}
        )
        UserDefinedPromptFormat(spec, train_on_inputs=False)
    with pytest.raises(DataError, match="not a valid format string"):
        spec = UserDefinedFormat.model_construct(
            **{**UserDefinedFormat().model_dump(), "no_input_format": "{instruction"}
        )
        UserDefinedPromptFormat(spec, train_on_inputs=False)


def test_build_format_picks_each_type(smol: Any) -> None:
    from data_fixtures import make_cfg

    cfg = make_cfg(train_on_inputs=True)
    expected = {
        "alpaca": AlpacaFormat,
        "completion": CompletionFormat,
        "input_output": InputOutputFormat,
        "user_defined": UserDefinedPromptFormat,
    }
    for name, cls in expected.items():
        fmt = build_format(DatasetConfig(path="x", type=name), cfg, smol)
        assert isinstance(fmt, cls)
    # Per-dataset train_on_inputs overrides the top-level one.
    fmt = build_format(DatasetConfig(path="x", type="alpaca", train_on_inputs=False), cfg, smol)
    assert fmt.identity()["train_on_inputs"] is False
    custom = build_format(DatasetConfig(path="x", type={"format": "{instruction}!"}), cfg, smol)
    assert isinstance(custom, UserDefinedPromptFormat) and custom.spec.format == "{instruction}!"


# ------------------------------------------------------------------ span → token mapping


def test_trimmed_offsets_do_not_lose_whitespace_tokens(smol: Any) -> None:
    """With ``trim_offsets`` a whitespace-only token gets empty offsets; it must still be trained."""
    from tokenizers import processors

    trimmed = copy.deepcopy(smol)
    trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    segments = [
        {"text": "Q: x\n", "label": False},
        {"text": "a  b \n  c", "label": True},
        {"text": "\nQ", "label": False},
    ]
    fmt = InputOutputFormat(field_segments="segments", train_on_inputs=False)
    enc = trimmed.backend_tokenizer.encode("a  b \n  c")
    assert any(s == e for s, e in enc.offsets), "the test needs a token with trimmed (empty) offsets"
    plain = run(fmt, smol, {"segments": segments})
    assert run(fmt, trimmed, {"segments": segments}) == plain
    assert trained_runs(*plain, smol) == ["a  b \n  c"]


# ------------------------------------------------------------------ length rules


def _sample(n: int, trained_from: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(100, 100 + n, dtype=np.int64)
    labels = np.where(np.arange(n) >= trained_from, ids, IGNORE_INDEX)
    return ids, labels


def test_length_rules() -> None:
    drop = Limits(sequence_len=10, min_sample_len=3, excess_length_strategy="drop")
    trunc = Limits(sequence_len=10, min_sample_len=3, excess_length_strategy="truncate")
    ids, labels = _sample(12, 4)
    assert apply_limits(ids, labels, drop, chunk=False)[0].status == "too_long"
    (kept,) = apply_limits(ids, labels, trunc, chunk=False)
    assert kept.status == "" and kept.truncated
    assert kept.input_ids.tolist() == ids[:10].tolist() and kept.labels.tolist() == labels[:10].tolist()
    # Truncation that cuts off every trained token leaves nothing to learn from.
    ids, labels = _sample(12, 10)
    (gone,) = apply_limits(ids, labels, trunc, chunk=False)
    assert gone.status == "no_trained_tokens" and gone.truncated
    ids, labels = _sample(2, 0)
    assert apply_limits(ids, labels, drop, chunk=False)[0].status == "too_short"
    ids, labels = _sample(5, 5)
    assert apply_limits(ids, labels, drop, chunk=False)[0].status == "no_trained_tokens"
    ids, labels = _sample(10, 0)  # exactly sequence_len is kept
    assert apply_limits(ids, labels, drop, chunk=False)[0].status == ""
