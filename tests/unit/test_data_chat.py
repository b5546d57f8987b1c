"""Chat-template masking: exact trained text for three template families, every masking rule,
agreement with a slow per-turn reference, and a linear number of renders.

"Exact" is checked by decoding every maximal run of trained tokens and comparing the list of runs
with the runs expected from the messages alone (contents of trained messages, end-of-turn tokens
per ``train_on_eos``) — computed here, not by the code under test.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from data_fixtures import (
    LLAMA3_STYLE_TEMPLATE,
    MISTRAL_STYLE_TEMPLATE,
    llama3_style_tokenizer,
    mistral_style_tokenizer,
    smollm2_tokenizer,
    trained_runs,
    words,
)

from hellbender.config.schema import DatasetConfig
from hellbender.data.errors import BadRow, DataError
from hellbender.data.formats import chat_template as ct
from hellbender.data.formats.chat_template import ChatTemplateFormat, render_template
from hellbender.data.tokenize import IGNORE_INDEX, encode


@dataclass(frozen=True)
class Family:
    """How a template family closes turns, as the test knows it from the template text."""

    name: str
    make_tokenizer: Callable[[], Any]
    eot: Callable[[str], str]  # role -> the end-of-turn token text written after its content
    strips: bool  # the template trims contents
    alternating: bool  # user/assistant only, strictly alternating (Mistral)
    # Pieces that touch with no untrained token between: (previous role, next role) -> separator
    # that decoding puts between them (SentencePiece turns the next content's "▁" into a space).
    adjacent: dict[tuple[str, str], str]


FAMILIES = [
    Family("chatml-smollm2", smollm2_tokenizer, lambda role: "<|im_end|>", False, False, {}),
    Family("llama3-style", llama3_style_tokenizer, lambda role: "<|eot_id|>", True, False, {}),
    Family(
        "mistral-style",
        mistral_style_tokenizer,
        lambda role: "[/INST]" if role == "user" else "</s>",
        False,
        True,
        {("user", "assistant"): " "},
    ),
]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def family(request: pytest.FixtureRequest) -> tuple[Family, Any]:
    fam: Family = request.param
    return fam, fam.make_tokenizer()


def conversation(
    rng: random.Random, turns: int, *, system: bool, padded: bool = False
) -> list[dict[str, Any]]:
    """``turns`` user/assistant pairs; ``padded`` adds surrounding whitespace to some contents."""
    msgs: list[dict[str, Any]] = []
    if system:
        msgs.append({"role": "system", "content": "be brief " + words(rng, 3)})
    for _ in range(turns):
        for role in ("user", "assistant"):
            text = words(rng, rng.randint(1, 9))
            if padded and rng.random() < 0.5:
                text = rng.choice([" ", "\n", "  "]) + text + rng.choice([" ", "\n\n", ""])
            msgs.append({"role": role, "content": text})
    return msgs


def expected_runs(
    fam: Family, messages: list[dict[str, Any]], trained: list[bool], eot: list[bool]
) -> list[str]:
    """Trained runs from the messages alone: contents of trained messages, then their EOT."""
    runs: list[str] = []
    prev_role, prev_open = None, False  # prev_open: the last piece ended a run that may continue
    for msg, t, e in zip(messages, trained, eot, strict=True):
        content = msg["content"].strip() if fam.strips else msg["content"]
        piece = (content if t else "") + (fam.eot(msg["role"]) if e else "")
        if t and piece:
            sep = fam.adjacent.get((prev_role, msg["role"])) if prev_open else None
            if sep is not None:
                runs[-1] += sep + piece
            else:
                runs.append(piece)
        elif e:
            runs.append(fam.eot(msg["role"]))
        prev_open = e  # a run reaching the end-of-turn token can touch the next content
        prev_role = msg["role"]
    return runs


def make_format(tokenizer: Any, **ds: Any) -> ChatTemplateFormat:
    cfg = DatasetConfig(path="unused", type="chat_template", **ds)
    return ChatTemplateFormat(
        cfg, tokenizer, chat_template=None, default_system_message=None, train_on_inputs=False
    )


def tokenize_row(fmt: ChatTemplateFormat, tokenizer: Any, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    ids, labels = encode([fmt.render(fmt.normalize(row))], tokenizer)[0]
    return ids.tolist(), labels.tolist()


# ------------------------------------------------------------------ rendering = apply_chat_template


def test_ids_equal_apply_chat_template(family: tuple[Family, Any]) -> None:
    fam, tok = family
    rng = random.Random(1)
    for turns in (1, 3):
        msgs = conversation(rng, turns, system=not fam.alternating, padded=True)
        ids, _ = tokenize_row(make_format(tok), tok, {"messages": msgs})
        reference = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        assert ids == list(reference)


# ------------------------------------------------------------------ masking rules, exact text

CASES = [
    # (roles_to_train, train_on_eos, per-message training flags by position or None)
    (["assistant"], "turn", None),
    (["assistant"], "all", None),
    (["assistant"], "last", None),
    (["assistant"], "none", None),
    (["user", "assistant"], "turn", None),
    (["user"], "turn", None),
    (["assistant"], "turn", {1: True, 2: False}),  # train a user turn, skip an assistant turn
    (["assistant"], "all", {3: False}),
]


@pytest.mark.parametrize(("roles", "eos", "flags"), CASES)
def test_trained_text_is_exact(
    family: tuple[Family, Any], roles: list[str], eos: str, flags: dict | None
) -> None:
    fam, tok = family
    fmt = make_format(tok, roles_to_train=roles, train_on_eos=eos)
    rng = random.Random(zlib.crc32(repr((roles, eos, flags)).encode()))
    for turns in (1, 2, 4):
        msgs = conversation(rng, turns, system=not fam.alternating, padded=fam.strips)
        for pos, flag in (flags or {}).items():
            if pos < len(msgs):
                msgs[pos]["training"] = flag
        trained = [m["training"] if "training" in m else m["role"] in roles for m in msgs]
        last = len(msgs) - 1
        eot = [
            {"turn": t, "all": True, "last": i == last, "none": False}[eos] for i, t in enumerate(trained)
        ]
        ids, labels = tokenize_row(fmt, tok, {"messages": msgs})
        assert trained_runs(ids, labels, tok) == expected_runs(fam, msgs, trained, eot)


def test_train_on_inputs_trains_every_token(family: tuple[Family, Any]) -> None:
    _, tok = family
    cfg = DatasetConfig(path="unused", type="chat_template")
    fmt = ChatTemplateFormat(cfg, tok, chat_template=None, default_system_message=None, train_on_inputs=True)
    msgs = conversation(random.Random(3), 2, system=False)
    ids, labels = tokenize_row(fmt, tok, {"messages": msgs})
    assert labels == ids


def test_no_trained_message_gives_no_label(family: tuple[Family, Any]) -> None:
    _, tok = family
    fmt = make_format(tok, roles_to_train=["tool"], train_on_eos="turn")
    ids, labels = tokenize_row(fmt, tok, {"messages": conversation(random.Random(4), 2, system=False)})
    assert ids and all(label == IGNORE_INDEX for label in labels)


# ------------------------------------------------------------------ linear vs per-turn reference


def per_turn_spans(
    template: str, messages: list[dict[str, Any]], kwargs: dict[str, str], *, strips: bool
) -> list[tuple[int, int, int]]:
    """The slow way (what Axolotl does): render the prefix before and after each message, and
    find the message's content (as the template prints it) in the part that message added.
    O(turns²) renders."""
    spans = []
    for i, msg in enumerate(messages):
        before = render_template(template, messages[:i], kwargs)
        after = render_template(template, messages[: i + 1], kwargs)
        assert after.startswith(before), "template is not prefix-stable; the reference needs that"
        printed = msg["content"].strip() if strips else msg["content"]
        at = after.find(printed, len(before))
        assert at >= 0, f"content of message {i} not found"
        spans.append((i, at, at + len(printed)))
    return spans


def test_spans_and_labels_match_per_turn_reference(
    family: tuple[Family, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fam, tok = family
    fmt = make_format(tok, train_on_eos="all")
    rng = random.Random(5)
    for _ in range(12):
        msgs = conversation(
            rng, rng.randint(1, 6), system=not fam.alternating and rng.random() < 0.5, padded=fam.strips
        )
        plain = [{"role": m["role"], "content": m["content"]} for m in msgs]
        text, spans = ct.locate_contents(fmt.template, plain, fmt.template_kwargs)
        assert text == tok.apply_chat_template(plain, tokenize=False)
        reference = per_turn_spans(fmt.template, plain, fmt.template_kwargs, strips=fam.strips)
        assert spans == reference
        # And the same labels when the format is given the reference's spans instead of its own.
        ids, labels = tokenize_row(fmt, tok, {"messages": msgs})
        with monkeypatch.context() as patch:
            fixed = (text, reference)
            patch.setattr(ct, "locate_contents", lambda template, messages, kwargs, fixed=fixed: fixed)
            assert tokenize_row(fmt, tok, {"messages": msgs}) == (ids, labels)


@pytest.mark.parametrize("turns", [2, 20, 200])
def test_renders_per_conversation_do_not_grow_with_turns(monkeypatch: pytest.MonkeyPatch, turns: int) -> None:
    tok = smollm2_tokenizer()
    fmt = make_format(tok)
    calls: list[int] = []
    real = ct.render_template

    def counting(template: str, messages: Any, kwargs: Any) -> str:
        calls.append(len(messages))
        return real(template, messages, kwargs)

    monkeypatch.setattr(ct, "render_template", counting)
    msgs = conversation(random.Random(turns), turns // 2, system=False)
    rendered = fmt.render(fmt.normalize({"messages": msgs}))
    assert calls == [len(msgs), len(msgs)]  # one skeleton, one real render, whatever the length
    assert len(rendered.trained) == turns // 2


# ------------------------------------------------------------------ templates by name / string


def test_named_templates_mask_exactly() -> None:
    cases = [
        ("chatml", smollm2_tokenizer(), "<|im_end|>"),
        ("llama3", llama3_style_tokenizer(), "<|eot_id|>"),
        ("mistral", mistral_style_tokenizer(), "</s>"),
    ]
    msgs = [
        {"role": "user", "content": "tell me about cats"},
        {"role": "assistant", "content": "cats are small"},
        {"role": "user", "content": "and dogs"},
        {"role": "assistant", "content": "dogs are large"},
    ]
    for name, tok, eot in cases:
        fmt = make_format(tok, chat_template=name)
        assert fmt.template == ct.KNOWN_TEMPLATES[name]
        ids, labels = tokenize_row(fmt, tok, {"messages": msgs})
        assert trained_runs(ids, labels, tok) == ["cats are small" + eot, "dogs are large" + eot], name
        assert ids == list(
            tok.apply_chat_template(msgs, tokenize=True, return_dict=False, chat_template=fmt.template)
        )


def test_named_template_needs_its_tokens() -> None:
    with pytest.raises(DataError, match=r"<\|im_start\|>"):
        make_format(mistral_style_tokenizer(), chat_template="chatml")


def test_template_choice_resolution() -> None:
    tok = smollm2_tokenizer()
    assert ct.resolve_chat_template(None, tok) == (tok.chat_template, "tokenizer_default")
    assert ct.resolve_chat_template("tokenizer_default", tok)[0] == tok.chat_template
    jinja = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    assert ct.resolve_chat_template(jinja, tok) == (jinja, "jinja")
    with pytest.raises(DataError, match="unknown chat_template 'chatmlx'"):
        ct.resolve_chat_template("chatmlx", tok)
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        ct.resolve_chat_template(None, tok)
    assert ct.resolve_chat_template("tokenizer_default_fallback_chatml", tok) == (ct.CHATML, "chatml")


def test_top_level_chat_template_and_default_system_message() -> None:
    tok = smollm2_tokenizer()
    cfg = DatasetConfig(path="unused", type="chat_template")
    fmt = ChatTemplateFormat(
        cfg, tok, chat_template="chatml", default_system_message="you are terse", train_on_inputs=False
    )
    row = fmt.normalize(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    assert row["messages"][0] == {"role": "system", "content": "you are terse", "training": None}
    rendered = fmt.render(row)
    assert rendered.text.startswith("<|im_start|>system\nyou are terse<|im_end|>\n")
    # An explicit system message is kept as it is.
    row = fmt.normalize(
        {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "hi"}]}
    )
    assert [m["content"] for m in row["messages"]] == ["own", "hi"]


def test_sharegpt_fields_and_role_names() -> None:
    tok = smollm2_tokenizer()
    fmt = make_format(
        tok, field_messages="conversations", message_property_mappings={"role": "from", "content": "value"}
    )
    row = {"conversations": [{"from": "human", "value": "tell me"}, {"from": "gpt", "value": "about cats"}]}
    ids, labels = tokenize_row(fmt, tok, row)
    assert trained_runs(ids, labels, tok) == ["about cats<|im_end|>"]
    custom = make_format(tok, roles={"user": ["asker"], "assistant": ["bot"]})
    ids, labels = tokenize_row(
        custom, tok, {"messages": [{"role": "asker", "content": "q"}, {"role": "bot", "content": "a b"}]}
    )
    assert trained_runs(ids, labels, tok) == ["a b<|im_end|>"]
    with pytest.raises(BadRow) as err:
        custom.normalize({"messages": [{"role": "human", "content": "q"}]})
    assert err.value.reason == "unknown_role"


def test_content_equal_to_header_text_is_located_in_the_content() -> None:
    tok = smollm2_tokenizer()
    fmt = make_format(tok)
    msgs = [{"role": "user", "content": "assistant"}, {"role": "assistant", "content": "user"}]
    ids, labels = tokenize_row(fmt, tok, {"messages": msgs})
    assert trained_runs(ids, labels, tok) == ["user<|im_end|>"]


def test_template_branching_on_content_falls_back_to_search() -> None:
    tok = smollm2_tokenizer()
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] == '' %}(nothing){% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    )
    fmt = make_format(tok, chat_template=template)
    msgs = [{"role": "user", "content": ""}, {"role": "assistant", "content": "fine then"}]
    ids, labels = tokenize_row(fmt, tok, {"messages": msgs})
    assert trained_runs(ids, labels, tok) == ["fine then<|im_end|>"]


def test_fallback_search_does_not_take_header_words_for_contents() -> None:
    # The empty first content makes the walk fail (the template prints "(nothing)"), so the
    # fallback search places the contents. Contents equal to role names must be found where
    # they are printed, not inside the role headers that precede them.
    tok = smollm2_tokenizer()
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] == '' %}(nothing){% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    )
    fmt = make_format(tok, chat_template=template, train_on_eos="turn")
    msgs = [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "assistant"},
        {"role": "user", "content": "user"},
        {"role": "assistant", "content": "user"},
    ]
    # Where each content is, from the template's shape alone.
    expected, pos = [], 0
    for i, m in enumerate(msgs):
        pos += len(f"<|im_start|>{m['role']}\n")
        expected.append((i, pos, pos + len(m["content"])))
        pos += len(m["content"] or "(nothing)") + len("<|im_end|>\n")
    plain = [{"role": m["role"], "content": m["content"]} for m in msgs]
    text, spans = ct.locate_contents(fmt.template, plain, fmt.template_kwargs)
    assert len(text) == pos and spans == expected
    ids, labels = tokenize_row(fmt, tok, {"messages": msgs})
    assert trained_runs(ids, labels, tok) == ["assistant<|im_end|>", "user<|im_end|>"]
    # The last trained run ends the text: the final "user" is the assistant's content.
    assert tok.decode(ids[-2:]) == "<|im_end|>\n" and labels[-2] == ids[-2] and labels[-3] == ids[-3]


def test_template_that_rewrites_content_is_a_bad_row() -> None:
    tok = smollm2_tokenizer()
    fmt = make_format(
        tok, chat_template="{% for m in messages %}{{ m['content'] | upper }}<|im_end|>{% endfor %}"
    )
    with pytest.raises(BadRow) as err:
        fmt.render(fmt.normalize({"messages": [{"role": "user", "content": "abc"}]}))
    assert err.value.reason == "template_mismatch"


def test_template_exception_is_a_bad_row() -> None:
    tok = mistral_style_tokenizer()
    fmt = make_format(tok, chat_template=MISTRAL_STYLE_TEMPLATE)
    with pytest.raises(BadRow) as err:
        fmt.render(fmt.normalize({"messages": [{"role": "assistant", "content": "first"}]}))
    assert err.value.reason == "template_error" and "alternate" in err.value.problem


def test_llama3_style_template_is_the_tokenizers_own() -> None:
    assert llama3_style_tokenizer().chat_template == LLAMA3_STYLE_TEMPLATE
