"""``prepare_datasets`` end to end: bad rows, lengths, merging, splits, dedup, cache, report, CLI."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from data_fixtures import make_cfg, smollm2_folder, smollm2_tokenizer, trained_runs, words

import hellbender
from hellbender.config.schema import DatasetConfig
from hellbender.data.cache import TOKENIZATION_KEYS, is_complete
from hellbender.data.errors import DataError
from hellbender.data.formats import build_format
from hellbender.data.prepare import cache_key_for, prepare_datasets
from hellbender.data.report import format_example, histogram_figure
from hellbender.data.tokenize import IGNORE_INDEX, encode


@pytest.fixture(scope="module")
def tok() -> Any:
    return smollm2_tokenizer()


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def alpaca_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {
            "instruction": f"task {i}: " + words(rng, 4),
            "input": words(rng, 2) if i % 3 else "",
            "output": words(rng, rng.randint(1, 12)),
        }
        for i in range(n)
    ]


def chat_rows(n: int, seed: int = 0, max_turns: int = 3) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        msgs = []
        for _ in range(rng.randint(1, max_turns)):
            msgs.append({"role": "user", "content": f"q{i} " + words(rng, rng.randint(1, 6))})
            msgs.append({"role": "assistant", "content": words(rng, rng.randint(1, 12))})
        rows.append({"messages": msgs})
    return rows


def samples(ds: Any) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(tuple(r["input_ids"]), tuple(r["labels"])) for r in ds]


def direct(
    tok: Any, ds_cfg: DatasetConfig, rows: list[Any], **cfg_values: Any
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The samples a dataset should produce, row by row through the format and the tokenizer."""
    fmt = build_format(ds_cfg, make_cfg(**cfg_values), tok)
    out = []
    for row in rows:
        ids, labels = encode([fmt.render(fmt.normalize(row))], tok)[0]
        out.append((tuple(ids.tolist()), tuple(labels.tolist())))
    return out


# ------------------------------------------------------------------ a mixed run


def test_mixed_datasets_end_to_end(tmp_path: Path, tok: Any) -> None:
    a_rows, c_rows = alpaca_rows(40, 1), chat_rows(30, 2)
    a = write_jsonl(tmp_path / "a.jsonl", a_rows)
    c = write_jsonl(tmp_path / "c.jsonl", c_rows)
    (tmp_path / "t.txt").write_text("\n".join(words(random.Random(3), 8) for _ in range(10)) + "\n")
    datasets = [
        {"path": str(a), "type": "alpaca"},
        {"path": str(c), "type": "chat_template"},
        {"path": str(tmp_path / "t.txt"), "type": "completion"},
    ]
    cfg = make_cfg(datasets=datasets, dataset_prepared_path=str(tmp_path / "prep"), sequence_len=512)
    prepared = prepare_datasets(cfg, tok)
    assert prepared.train.column_names == ["input_ids", "labels", "length"] and prepared.eval is None
    got = samples(prepared.train)
    expected = (
        direct(tok, DatasetConfig(**datasets[0]), a_rows)
        + direct(tok, DatasetConfig(**datasets[1]), c_rows)
        + direct(
            tok,
            DatasetConfig(**datasets[2]),
            [{"text": t} for t in (tmp_path / "t.txt").read_text().split("\n") if t],
        )
    )
    assert Counter(got) == Counter(expected)
    assert got != expected  # shuffled with the seed
    assert all(
        len(i) == n for i, n in zip(prepared.train["input_ids"], prepared.train["length"], strict=True)
    )
    report = prepared.report
    assert [(d.rows_read, d.kept) for d in report.datasets] == [(40, 40), (30, 30), (10, 10)]
    assert report.train_samples == 80 and report.train_tokens == sum(len(i) for i, _ in expected)
    assert report.train_trained_tokens == sum(sum(t != IGNORE_INDEX for t in lab) for _, lab in expected)
    text = report.render()
    for needle in ("a.jsonl", "c.jsonl", "t.txt", "p50", "p99", str(prepared.cache_dir)):
        assert needle in text
    png = Path(report.histogram or "")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ bad rows

ALPACA_OK = {"instruction": "say hi", "output": "hi"}
CHAT_OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

# (dataset entry extras, file name, file text with the bad row on the given line, line, reason, problem text)
BAD_CASES = [
    ({"type": "alpaca"}, "d.jsonl", [ALPACA_OK, "{broken", ALPACA_OK], 2, "invalid_json", "invalid JSON"),
    (
        {"type": "alpaca"},
        "d.jsonl",
        [ALPACA_OK, ALPACA_OK, {"instruction": "x"}],
        3,
        "missing_field",
        "'output' is missing",
    ),
    (
        {"type": "alpaca"},
        "d.jsonl",
        [{"instruction": "x", "output": 5}, ALPACA_OK],
        1,
        "wrong_type",
        "must be a string",
    ),
    ({"type": "chat_template"}, "d.jsonl", [CHAT_OK, {"messages": []}], 2, "empty_messages", "empty list"),
    (
        {"type": "chat_template"},
        "d.jsonl",
        [CHAT_OK, CHAT_OK, {"messages": [{"role": "wizard", "content": "x"}]}],
        3,
        "unknown_role",
        "unknown role 'wizard'",
    ),
    (
        {"type": "input_output"},
        "d.jsonl",
        [{"segments": []}, {"segments": [{"text": "a b c", "label": True}]}],
        1,
        "empty_segments",
        "empty list",
    ),
    (
        {
            "type": "chat_template",
            "chat_template": "{% if messages|length > 2 %}{{ raise_exception('too long') }}{% endif %}"
            "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
        },
        "d.jsonl",
        [CHAT_OK, {"messages": CHAT_OK["messages"] * 2}, CHAT_OK],
        2,
        "template_error",
        "too long",
    ),
    (
        {"type": "alpaca"},
        "d.csv",
        "instruction,output\nsay hi,hi\nsay,hi,extra\n",
        3,
        "invalid_csv",
        "3 values",
    ),
    # A byte that is not UTF-8 (0xe9: "é" in Latin-1) spoils its line only.
    (
        {"type": "alpaca"},
        "d.jsonl",
        b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n',
        2,
        "not_utf8",
        "byte 0xe9",
    ),
    (
        {"type": "alpaca"},
        "d.csv",
        b"instruction,output\nsay hi,hi\ncaf\xe9,hi\n",
        3,
        "not_utf8",
        "column 'instruction': not UTF-8",
    ),
    ({"type": "completion"}, "d.txt", b"some text\nhello caf\xe9\nmore text\n", 2, "not_utf8", "byte 0xe9"),
]


def _bad_dataset(tmp_path: Path, extras: dict, name: str, content: Any) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        write_jsonl(path, content)
    return path


@pytest.mark.parametrize(
    ("extras", "name", "content", "line", "reason", "problem"),
    BAD_CASES,
    ids=[c[4] + "-" + c[1] for c in BAD_CASES],
)
def test_bad_row_stops_with_file_line_and_problem(
    tmp_path: Path, tok: Any, extras: dict, name: str, content: Any, line: int, reason: str, problem: str
) -> None:
    path = _bad_dataset(tmp_path, extras, name, content)
    cfg = make_cfg(datasets=[{"path": str(path), **extras}], dataset_prepared_path=str(tmp_path / "prep"))
    with pytest.raises(DataError) as err:
        prepare_datasets(cfg, tok)
    message = str(err.value)
    assert f"{path}, line {line}:" in message and problem in message and f"[{reason}]" in message
    assert repr(str(path)) in message  # the dataset is named
    assert not list((tmp_path / "prep").glob("*")) or not any(
        is_complete(p) for p in (tmp_path / "prep").iterdir()
    )


@pytest.mark.parametrize(
    ("extras", "name", "content", "line", "reason", "problem"),
    BAD_CASES,
    ids=[c[4] + "-" + c[1] for c in BAD_CASES],
)
def test_bad_row_skipped_counted_and_rejected(
    tmp_path: Path, tok: Any, extras: dict, name: str, content: Any, line: int, reason: str, problem: str
) -> None:
    path = _bad_dataset(tmp_path, extras, name, content)
    cfg = make_cfg(
        datasets=[{"path": str(path), **extras}],
        dataset_prepared_path=str(tmp_path / "prep"),
        on_bad_row="skip",
    )
    prepared = prepare_datasets(cfg, tok)
    stats = prepared.report.datasets[0]
    assert stats.bad == {reason: 1}
    assert stats.kept == stats.rows_read - 1 == len(prepared.train)
    rejects = [json.loads(x) for x in Path(prepared.report.rejects_file or "").read_text().splitlines()]
    assert len(rejects) == 1
    assert (rejects[0]["file"], rejects[0]["line"], rejects[0]["reason"]) == (str(path), line, reason)
    assert problem in rejects[0]["problem"]
    assert Path(prepared.report.rejects_file or "").parent == prepared.cache_dir
    assert "skipped" in prepared.report.render()


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_broken_json_array_is_an_error_even_when_skipping(tmp_path: Path, tok: Any, mode: str) -> None:
    # One broken element makes the rest of the array unreadable: skipping it as one bad row
    # used to drop rows 3-10 uncounted.
    rows = [json.dumps(ALPACA_OK)] * 10
    rows[1] = '{"instruction": "a" "output": "b"}'
    path = tmp_path / "d.json"
    path.write_text("[\n" + ",\n".join(rows) + "\n]\n")
    cfg = make_cfg(datasets=[{"path": str(path)}], dataset_prepared_path=str(tmp_path / "p"), on_bad_row=mode)
    with pytest.raises(DataError) as err:
        prepare_datasets(cfg, tok)
    message = str(err.value)
    assert repr(str(path)) in message and f"{path}, line 3: invalid JSON" in message
    assert "rows after line 3 cannot be read" in message


def test_template_mismatch_names_file_and_line_and_is_rejected_with_its_row(tmp_path: Path, tok: Any) -> None:
    # The template rewrites one content ("shout" -> "SHOUT"), so that row's trained span cannot
    # be placed; the rows around it are fine. The row is found in a worker process, after
    # tokenization, and must still be reported with its file and line.
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] == 'shout' %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}"
    )
    shouting = {
        "messages": [{"role": "user", "content": "say it"}, {"role": "assistant", "content": "shout"}]
    }
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT_OK, CHAT_OK, shouting, CHAT_OK])
    ds = {"path": str(path), "type": "chat_template", "chat_template": template}

    with pytest.raises(DataError) as err:
        prepare_datasets(make_cfg(datasets=[ds], dataset_prepared_path=str(tmp_path / "p")), tok)
    assert f"{path}, line 3:" in str(err.value) and "[template_mismatch]" in str(err.value)

    cfg = make_cfg(datasets=[ds], dataset_prepared_path=str(tmp_path / "p"), on_bad_row="skip")
    prepared = prepare_datasets(cfg, tok)
    assert prepared.report.datasets[0].bad == {"template_mismatch": 1} and len(prepared.train) == 3
    (reject,) = [json.loads(x) for x in Path(prepared.report.rejects_file or "").read_text().splitlines()]
    assert (reject["file"], reject["line"], reject["reason"]) == (str(path), 3, "template_mismatch")
    assert [(m["role"], m["content"]) for m in reject["value"]["messages"]] == [
        ("user", "say it"),
        ("assistant", "shout"),
    ]


def test_skip_mode_counts_many_reasons_at_once(tmp_path: Path, tok: Any) -> None:
    rows = [
        CHAT_OK,
        "not json",
        {"messages": []},
        {"messages": "x"},
        {"msgs": []},
        {"messages": [{"role": "x", "content": "y"}]},
        CHAT_OK,
    ]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = make_cfg(
        datasets=[{"path": str(path), "type": "chat_template"}],
        dataset_prepared_path=str(tmp_path / "p"),
        on_bad_row="skip",
    )
    prepared = prepare_datasets(cfg, tok)
    assert prepared.report.datasets[0].bad == {
        "invalid_json": 1,
        "empty_messages": 1,
        "wrong_type": 1,
        "missing_field": 1,
        "unknown_role": 1,
    }
    lines = [json.loads(x)["line"] for x in Path(prepared.report.rejects_file or "").read_text().splitlines()]
    assert lines == [2, 3, 4, 5, 6]


# ------------------------------------------------------------------ end-of-turn tokens

# Llama-3-style markers written as text: SmolLM2's tokenizer has no <|eot_id|> special token.
TEXT_MARKER_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
)


@pytest.mark.parametrize(
    ("template", "train_on_eos", "warned"),
    [(TEXT_MARKER_TEMPLATE, "turn", True), (TEXT_MARKER_TEMPLATE, "none", False), ("chatml", "turn", False)],
    ids=["text-markers", "text-markers-eos-none", "chatml"],
)
def test_missing_end_of_turn_token_is_warned_once_and_counted(
    tmp_path: Path, tok: Any, caplog: pytest.LogCaptureFixture, template: str, train_on_eos: str, warned: bool
) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(5, 1))
    ds = {"path": str(path), "type": "chat_template", "chat_template": template, "train_on_eos": train_on_eos}
    cfg = make_cfg(datasets=[ds], dataset_prepared_path=str(tmp_path / "p"))
    with caplog.at_level("WARNING", logger="hellbender"):
        prepared = prepare_datasets(cfg, tok)
    warnings = [r.getMessage() for r in caplog.records if "end-of-turn" in r.getMessage()]
    stats = prepared.report.datasets[0]
    if not warned:
        assert stats.no_eot == 0 and warnings == [] and "end-of-turn" not in prepared.report.render()
        return
    runs = [trained_runs(r["input_ids"], r["labels"], tok) for r in prepared.train]
    assert all(not run.endswith("<|eot_id|>") for sample in runs for run in sample)  # really none trained
    assert stats.no_eot == stats.kept == 5
    assert len(warnings) == 1  # once for the dataset, not once per sample
    assert (
        repr(str(path)) in warnings[0]
        and "train_on_eos: turn" in warnings[0]
        and "5 of 5 samples" in warnings[0]
    )
    line = "no end-of-turn token found to train in 5 of 5 samples"
    assert line in prepared.report.render()
    assert line in prepare_datasets(cfg, tok).report.render()  # a run that reuses the cache shows it too


# ------------------------------------------------------------------ lengths


@pytest.mark.parametrize("strategy", ["drop", "truncate"])
def test_length_strategies_counted(tmp_path: Path, tok: Any, strategy: str) -> None:
    rows = [
        {"instruction": "short", "output": "fine"},
        {"instruction": "long " + "word " * 80, "output": "the answer"},  # prompt alone exceeds 64 tokens
        {"instruction": "mid", "output": "many words " * 40},  # answer crosses the limit
    ]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    only_user = write_jsonl(
        tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, CHAT_OK]
    )
    cfg = make_cfg(
        datasets=[{"path": str(path), "type": "alpaca"}, {"path": str(only_user), "type": "chat_template"}],
        sequence_len=64,
        min_sample_len=2,
        excess_length_strategy=strategy,
        dataset_prepared_path=str(tmp_path / "p"),
    )
    prepared = prepare_datasets(cfg, tok)
    alpaca, chat = prepared.report.datasets
    assert chat.dropped == {"no_trained_tokens": 1} and chat.kept == 1
    if strategy == "drop":
        assert alpaca.dropped == {"too_long": 2} and alpaca.truncated == 0 and alpaca.kept == 1
    else:
        # Row 2 is cut inside its prompt, so nothing trained is left and it is dropped; row 3 keeps
        # part of its answer and is counted as truncated (counts are of kept samples).
        assert alpaca.dropped == {"no_trained_tokens": 1} and alpaca.truncated == 1 and alpaca.kept == 2
    assert max(prepared.train["length"]) <= 64


def test_min_sample_len(tmp_path: Path, tok: Any) -> None:
    rows = [{"text": "hi"}, {"text": words(random.Random(0), 30)}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = make_cfg(
        datasets=[{"path": str(path), "type": "completion"}],
        min_sample_len=5,
        dataset_prepared_path=str(tmp_path / "p"),
    )
    stats = prepare_datasets(cfg, tok).report.datasets[0]
    assert stats.dropped == {"too_short": 1} and stats.kept == 1


# ------------------------------------------------------------------ merging, splits, dedup


def test_shuffle_by_seed_and_unshuffled_order(tmp_path: Path, tok: Any) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(20, 1))
    b = write_jsonl(tmp_path / "b.jsonl", alpaca_rows(20, 2))
    base = {"datasets": [{"path": str(a)}, {"path": str(b)}], "dataset_prepared_path": str(tmp_path / "p")}
    plain = samples(prepare_datasets(make_cfg(**base, shuffle_merged_datasets=False), tok).train)
    assert plain == direct(tok, DatasetConfig(path=str(a)), alpaca_rows(20, 1)) + direct(
        tok, DatasetConfig(path=str(b)), alpaca_rows(20, 2)
    )
    s1 = samples(prepare_datasets(make_cfg(**base, seed=1), tok).train)
    s1_again = samples(prepare_datasets(make_cfg(**base, seed=1), tok, rebuild=True).train)
    s2 = samples(prepare_datasets(make_cfg(**base, seed=2), tok).train)
    assert s1 == s1_again and s1 != s2 and Counter(s1) == Counter(s2) == Counter(plain)


@pytest.mark.parametrize(("val", "n_eval"), [(0.25, 10), (7, 7)])
def test_val_set_size(tmp_path: Path, tok: Any, val: float, n_eval: int) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(40, 1))
    cfg = make_cfg(datasets=[{"path": str(a)}], val_set_size=val, dataset_prepared_path=str(tmp_path / "p"))
    prepared = prepare_datasets(cfg, tok)
    train, ev = samples(prepared.train), samples(prepared.eval)
    assert len(ev) == n_eval and len(train) == 40 - n_eval
    assert Counter(train + ev) == Counter(direct(tok, DatasetConfig(path=str(a)), alpaca_rows(40, 1)))
    assert prepared.report.eval_samples == n_eval
    with pytest.raises(DataError, match="leaves no training sample"):
        prepare_datasets(
            make_cfg(datasets=[{"path": str(a)}], val_set_size=40, dataset_prepared_path=str(tmp_path / "p")),
            tok,
        )


def test_test_datasets_make_the_eval_set(tmp_path: Path, tok: Any) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10, 1))
    e = write_jsonl(tmp_path / "e.jsonl", chat_rows(6, 5))
    cfg = make_cfg(
        datasets=[{"path": str(a)}],
        test_datasets=[{"path": str(e), "type": "chat_template"}],
        dataset_prepared_path=str(tmp_path / "p"),
    )
    prepared = prepare_datasets(cfg, tok)
    assert len(prepared.train) == 10
    assert samples(prepared.eval) == direct(
        tok, DatasetConfig(path=str(e), type="chat_template"), chat_rows(6, 5)
    )
    assert [d.split for d in prepared.report.datasets] == ["train", "eval"]


def test_exact_deduplication(tmp_path: Path, tok: Any) -> None:
    rows = alpaca_rows(10, 1)
    a = write_jsonl(tmp_path / "a.jsonl", [*rows, rows[0], rows[3]])  # two repeats inside
    b = write_jsonl(tmp_path / "b.jsonl", [rows[5], *alpaca_rows(3, 9)])  # one repeat across
    e = write_jsonl(tmp_path / "e.jsonl", [rows[2], *alpaca_rows(2, 11)])  # one eval row seen in training
    datasets = [{"path": str(a)}, {"path": str(b)}]
    cfg = make_cfg(
        datasets=datasets,
        test_datasets=[{"path": str(e)}],
        dataset_exact_deduplication=True,
        dataset_prepared_path=str(tmp_path / "p"),
    )
    prepared = prepare_datasets(cfg, tok)
    assert [d.dropped.get("duplicate", 0) for d in prepared.report.datasets] == [2, 1, 1]
    assert len(prepared.train) == 13 and len(prepared.eval) == 2
    train = samples(prepared.train)
    assert len(set(train)) == len(train) and not set(samples(prepared.eval)) & set(train)
    off = prepare_datasets(make_cfg(datasets=datasets, dataset_prepared_path=str(tmp_path / "p")), tok)
    assert len(off.train) == 16


def test_shards_use_a_fraction(tmp_path: Path, tok: Any) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10, 1))
    cfg = make_cfg(
        datasets=[{"path": str(a), "shards": 3}],
        dataset_prepared_path=str(tmp_path / "p"),
        shuffle_merged_datasets=False,
    )
    prepared = prepare_datasets(cfg, tok)
    assert samples(prepared.train) == direct(tok, DatasetConfig(path=str(a)), alpaca_rows(10, 1)[:4])


def test_two_processes_give_the_same_result(tmp_path: Path, tok: Any) -> None:
    c = write_jsonl(tmp_path / "c.jsonl", chat_rows(200, 4))
    one = prepare_datasets(
        make_cfg(
            datasets=[{"path": str(c), "type": "chat_template"}], dataset_prepared_path=str(tmp_path / "p1")
        ),
        tok,
    )
    two = prepare_datasets(
        make_cfg(
            datasets=[{"path": str(c), "type": "chat_template"}],
            dataset_prepared_path=str(tmp_path / "p2"),
            dataset_num_proc=2,
        ),
        tok,
    )
    assert samples(one.train) == samples(two.train)
    assert one.report.train_tokens == two.report.train_tokens


# ------------------------------------------------------------------ cache


def test_cache_reused_identical_and_fast_then_rebuilt_on_one_byte(tmp_path: Path, tok: Any) -> None:
    c = write_jsonl(tmp_path / "c.jsonl", chat_rows(2000, 6, max_turns=4))
    cfg = make_cfg(
        datasets=[{"path": str(c), "type": "chat_template"}],
        dataset_prepared_path=str(tmp_path / "p"),
        val_set_size=0.05,
    )
    started = time.perf_counter()
    first = prepare_datasets(cfg, tok)
    build = time.perf_counter() - started
    reuse = float("inf")
    for _ in range(3):  # best of three: one short call is easily stretched by a busy machine
        started = time.perf_counter()
        second = prepare_datasets(cfg, tok)
        reuse = min(reuse, time.perf_counter() - started)
    assert not first.from_cache and second.from_cache and second.cache_dir == first.cache_dir
    assert samples(second.train) == samples(first.train) and samples(second.eval) == samples(first.eval)
    assert second.report.datasets == first.report.datasets
    assert build >= 10 * reuse, f"build {build:.2f}s vs reuse {reuse:.2f}s"
    text = c.read_text()
    c.write_text(text.replace("q0 ", "q9 ", 1))  # one byte
    third = prepare_datasets(cfg, tok)
    assert not third.from_cache and third.cache_dir != first.cache_dir
    assert samples(third.train) + samples(third.eval) != samples(first.train) + samples(first.eval)


@pytest.fixture
def key_setup(tmp_path: Path) -> dict[str, Any]:
    c = write_jsonl(tmp_path / "c.jsonl", chat_rows(5, 1))
    return {
        "datasets": [{"path": str(c), "type": "chat_template"}],
        "dataset_prepared_path": str(tmp_path / "p"),
    }


# A different value for every key that changes tokenization (each must change the key).
OTHER_VALUES: dict[str, Any] = {
    "sequence_len": 1024,
    "min_sample_len": 3,
    "excess_length_strategy": "truncate",
    "train_on_inputs": True,
    "on_bad_row": "skip",
    "chat_template": "chatml",
    "default_system_message": "be kind",
    "seed": 7,
    "val_set_size": 0.1,
    "shuffle_merged_datasets": False,
    "dataset_exact_deduplication": True,
}


def test_every_tokenization_key_has_a_test_value() -> None:
    assert set(OTHER_VALUES) == set(TOKENIZATION_KEYS)


@pytest.mark.parametrize("key", sorted(OTHER_VALUES))
def test_each_config_key_changes_the_cache_key(key_setup: dict[str, Any], tok: Any, key: str) -> None:
    base, _ = cache_key_for(make_cfg(**key_setup), tok)
    changed, _ = cache_key_for(make_cfg(**key_setup, **{key: OTHER_VALUES[key]}), tok)
    assert base != changed


@pytest.mark.parametrize(
    "change",
    [
        {"type": "alpaca"},
        {"roles_to_train": ["user"]},
        {"train_on_eos": "all"},
        {"field_messages": "conversation"},
        {"chat_template": "chatml"},
    ],
)
def test_each_dataset_setting_changes_the_cache_key(
    key_setup: dict[str, Any], tok: Any, change: dict[str, Any]
) -> None:
    base, _ = cache_key_for(make_cfg(**key_setup), tok)
    setup = {**key_setup, "datasets": [{**key_setup["datasets"][0], **change}]}
    assert cache_key_for(make_cfg(**setup), tok)[0] != base


def test_tokenizer_content_file_content_and_version_change_the_cache_key(
    key_setup: dict[str, Any], tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(**key_setup)
    base, _ = cache_key_for(cfg, tok)
    assert cache_key_for(cfg, smollm2_tokenizer())[0] == base  # a fresh copy of the same tokenizer
    assert cache_key_for(make_cfg(**key_setup, dataset_num_proc=2), tok)[0] == base  # not an ingredient
    added = smollm2_tokenizer()
    added.add_tokens(["<new_token>"])
    assert cache_key_for(cfg, added)[0] != base
    templated = smollm2_tokenizer()
    templated.chat_template = templated.chat_template.replace("helpful", "useful")
    assert cache_key_for(cfg, templated)[0] != base
    eos = smollm2_tokenizer()
    eos.eos_token = "<|endoftext|>"
    assert cache_key_for(cfg, eos)[0] != base
    path = Path(key_setup["datasets"][0]["path"])
    path.write_bytes(path.read_bytes().replace(b"q0", b"q1", 1))
    assert cache_key_for(cfg, tok)[0] != base
    path.write_bytes(path.read_bytes().replace(b"q1", b"q0", 1))
    assert cache_key_for(cfg, tok)[0] == base
    monkeypatch.setattr(hellbender, "__version__", "99.0.0")
    assert cache_key_for(cfg, tok)[0] != base


def test_interrupted_build_leaves_no_trusted_cache(
    tmp_path: Path, tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hellbender.data.prepare as prep

    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10, 1))
    cfg = make_cfg(datasets=[{"path": str(a)}], dataset_prepared_path=str(tmp_path / "p"))
    key, _ = cache_key_for(cfg, tok)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(prep, "save_histogram", crash)  # dies after the datasets were written
        with pytest.raises(KeyboardInterrupt):
            prepare_datasets(cfg, tok)
    assert list((tmp_path / "p").iterdir()) == []  # the temporary folder is gone, nothing renamed
    # A folder at the final place without meta.json (e.g. copied by hand) is not trusted.
    (tmp_path / "p" / key / "train").mkdir(parents=True)
    (tmp_path / "p" / ".tmp-leftover").mkdir()
    prepared = prepare_datasets(cfg, tok)
    assert not prepared.from_cache and is_complete(prepared.cache_dir) and len(prepared.train) == 10
    assert prepare_datasets(cfg, tok).from_cache
    assert not prepare_datasets(cfg, tok, rebuild=True).from_cache


# ------------------------------------------------------------------ what a user sees


def test_debug_example_marks_trained_tokens(tok: Any) -> None:
    fmt = build_format(DatasetConfig(path="x", type="chat_template"), make_cfg(), tok)
    ids, labels = encode([fmt.render(fmt.normalize(CHAT_OK))], tok)[0]
    plain = format_example(ids.tolist(), labels.tolist(), tok, color=False)
    assert plain.endswith("<|im_start|>assistant\n[hello<|im_end|>]\n")
    assert plain.count("[") == 1 and trained_runs(ids.tolist(), labels.tolist(), tok) == ["hello<|im_end|>"]
    styled = format_example(ids.tolist(), labels.tolist(), tok, color=True)
    trained = [styled.plain[s.start : s.end] for s in styled.spans if "green" in str(s.style)]
    assert trained == ["hello<|im_end|>"]


@pytest.mark.parametrize(("low", "high", "sequence_len"), [(30, 40, 2048), (37, 37, 512), (100, 900, 512)])
def test_length_histogram_bars_are_visible(low: int, high: int, sequence_len: int) -> None:
    # Samples far shorter than sequence_len: bins over the data's own range (30-40) were drawn
    # as slivers under one pixel wide on an axis that reaches 2048.
    lengths = np.random.default_rng(0).integers(low, high, size=200, endpoint=True)
    fig = histogram_figure(lengths, sequence_len)
    fig.canvas.draw()
    ax = fig.axes[0]
    bars = [patch for patch in ax.patches if patch.get_height() > 0]
    assert sum(patch.get_height() for patch in bars) == len(lengths)
    assert sum(patch.get_window_extent().width for patch in bars) >= 5  # pixels
    assert ax.get_xlim()[0] <= 0 and ax.get_xlim()[1] >= max(sequence_len, high)


def test_preprocess_command(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from hellbender.cli import main

    a = write_jsonl(tmp_path / "a.jsonl", [*alpaca_rows(12, 1), {"instruction": "x"}])
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"base_model: {smollm2_folder()}\n"
        f"datasets:\n  - path: {a}\n    type: alpaca\n"
        f"dataset_prepared_path: {tmp_path / 'prep'}\n"
        "dataset_num_proc: 1\n"
        "on_bad_row: skip\n"
        "sequence_len: 256\n"
    )
    result = CliRunner().invoke(main, ["preprocess", str(config), "--debug", "2"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "a.jsonl" in out and "missing field: 1" in out and "rejected rows:" in out and "p50" in out
    assert out.count("[") >= 2 and "### Response:" in out
    again = CliRunner().invoke(main, ["preprocess", str(config), "on_bad_row=error"])
    assert again.exit_code == 1 and f"{a}, line 13" in again.output
