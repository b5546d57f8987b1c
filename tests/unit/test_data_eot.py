"""eot_tokens: the tokens that close a chat turn, trained per train_on_eos, even when not special."""

from __future__ import annotations

from typing import Any

import pytest
from data_fixtures import make_cfg, trained_runs

from hellbender.config.schema import DatasetConfig
from hellbender.data.errors import DataError
from hellbender.data.formats import build_format
from hellbender.data.tokenize import IGNORE_INDEX, Limits, tokenize_batch
from hellbender.testing.tiny import build_tiny_tokenizer

END = "<|end|>"
# Every turn closes with END, a plain (not special) token of the tokenizer, as Mistral's [/INST] is.
TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '" + END + "\\n' }}{% endfor %}"
ROW = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"}]}
LIMITS = Limits(sequence_len=256, min_sample_len=1, excess_length_strategy="drop")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    tok = build_tiny_tokenizer(chat_template=TEMPLATE)
    tok.add_tokens([END])  # a normal token: one id, not special
    return tok


def prepared(tokenizer: Any, train_on_eos: str = "turn", **top: Any) -> tuple[list[int], list[int], bool]:
    ds = DatasetConfig(path="x.jsonl", type="chat_template", train_on_eos=train_on_eos)
    fmt = build_format(ds, make_cfg(datasets=[{"path": "x.jsonl"}], **top), tokenizer)
    out = tokenize_batch({"messages": [fmt.normalize(ROW)["messages"]]}, [0], fmt=fmt, tokenizer=tokenizer,
                         limits=LIMITS)  # fmt: skip
    assert out["_status"] == [""]
    return list(out["input_ids"][0]), list(out["labels"][0]), bool(out["_no_eot"][0])


def test_without_eot_tokens_a_plain_marker_is_not_an_end_of_turn(tokenizer: Any) -> None:
    ids, labels, no_eot = prepared(tokenizer)
    assert [r.strip() for r in trained_runs(ids, labels, tokenizer)] == ["hello you"]
    assert no_eot  # reported by preparation: the turn end was asked for and not found


def test_eot_tokens_train_the_marker_after_trained_turns(tokenizer: Any) -> None:
    end = tokenizer.convert_tokens_to_ids(END)
    ids, labels, no_eot = prepared(tokenizer, eot_tokens=[END])
    assert not no_eot
    assert [r.strip() for r in trained_runs(ids, labels, tokenizer)] == ["hello you" + END]
    # reference: the marker occurs twice (after the user turn and after the assistant turn); only the
    # second is trained with train_on_eos: turn
    where = [i for i, t in enumerate(ids) if t == end]
    assert len(where) == 2
    assert labels[where[0]] == IGNORE_INDEX and labels[where[1]] == end


def test_eot_tokens_follow_train_on_eos(tokenizer: Any) -> None:
    end = tokenizer.convert_tokens_to_ids(END)
    ids, labels, _ = prepared(tokenizer, train_on_eos="all", eot_tokens=[END])
    assert [labels[i] for i, t in enumerate(ids) if t == end] == [end, end]
    ids, labels, _ = prepared(tokenizer, train_on_eos="none", eot_tokens=[END])
    assert all(labels[i] == IGNORE_INDEX for i, t in enumerate(ids) if t == end)


def test_an_eot_token_that_is_several_tokens_is_refused_naming_the_key(tokenizer: Any) -> None:
    with pytest.raises(DataError, match=r"eot_tokens: '\[/INST\]' is \d+ tokens"):
        prepared(tokenizer, eot_tokens=["[/INST]"])


def test_eot_tokens_are_part_of_the_format_identity(tokenizer: Any) -> None:
    """The prepared-data cache must not serve rows masked without them."""
    ds = DatasetConfig(path="x.jsonl", type="chat_template")
    plain = build_format(ds, make_cfg(datasets=[{"path": "x.jsonl"}]), tokenizer).identity()
    with_eot = build_format(ds, make_cfg(datasets=[{"path": "x.jsonl"}], eot_tokens=[END]), tokenizer)
    assert with_eot.identity() != plain
