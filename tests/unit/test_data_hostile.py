"""Hostile data: whatever a file holds, preparation names the file (and the line) instead of crashing.

Rows that Python's json accepts as text but cannot turn into a usable value — a lone UTF-16
surrogate escape (``"\\ud83d"``, which no UTF-8 encoder takes), nesting deeper than the
interpreter's recursion limit, an integer with more digits than ``sys.get_int_max_str_digits()`` —
are bad rows with their file and line: an error under ``on_bad_row: error``, skipped, counted and
written to the rejects file under ``skip``. A CSV field over the csv module's default 128 KB limit
is an ordinary value. Sources that cannot be read at all (a corrupt ``save_to_disk`` folder, an
empty ``test_datasets`` file, a FIFO or device) are a :class:`DataError` naming them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from data_fixtures import make_cfg, smollm2_folder, smollm2_tokenizer

from hellbender.cli import main
from hellbender.data.cache import is_complete
from hellbender.data.errors import DataError
from hellbender.data.prepare import prepare_datasets

OK = json.dumps({"instruction": "say hi", "output": "hi"})
LONE_SURROGATE = '{"instruction": "smile \\ud83d", "output": "hi"}'
SURROGATE_KEY = '{"instruction": "say hi", "output": "hi", "note\\udc00": 1}'
DEEP = '{"instruction": "say hi", "output": "hi", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"
HUGE_NUMBER = '{"instruction": "say hi", "output": "hi", "extra": ' + "9" * 5000 + "}"

# (name, bad row text, reason, text in the problem)
BAD_ROWS = [
    ("lone-surrogate", LONE_SURROGATE, "not_utf8", "lone surrogate \\ud83d"),
    ("surrogate-in-key", SURROGATE_KEY, "not_utf8", "lone surrogate \\udc00"),
    ("deep", DEEP, "too_deep", "nested too deep"),
    ("huge-number", HUGE_NUMBER, "number_too_large", "5000 digits"),
]


def jsonl(bad: str) -> tuple[str, str, int]:
    return "d.jsonl", f"{OK}\n{OK}\n{bad}\n{OK}\n", 3


def json_array(bad: str) -> tuple[str, str, int]:
    return "d.json", f"[\n  {OK},\n  {OK},\n  {bad},\n  {OK}\n]\n", 4


def jsonl_named_json(bad: str) -> tuple[str, str, int]:
    return "d.json", f"{OK}\n{OK}\n{bad}\n{OK}\n", 3


LAYOUTS = {"jsonl": jsonl, "json-array": json_array, "jsonl-in-.json": jsonl_named_json}
CASES = [(layout, *row) for layout in LAYOUTS for row in BAD_ROWS]
IDS = [f"{c[0]}-{c[1]}" for c in CASES]


@pytest.fixture(scope="module")
def tok() -> Any:
    return smollm2_tokenizer()


def cfg_for(tmp_path: Path, ds: dict[str, Any], **values: Any) -> Any:
    """A config preparing the one dataset ``ds`` into ``tmp_path / "p"``."""
    return make_cfg(datasets=[ds], dataset_prepared_path=str(tmp_path / "p"), **values)


def rejects_of(prepared: Any) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(prepared.report.rejects_file or "").read_text().splitlines()]


def write_layout(folder: Path, layout: str, bad: str) -> tuple[Path, int]:
    """The data file of ``layout`` holding ``bad``, written in ``folder``; its path and bad line."""
    file_name, text, line = LAYOUTS[layout](bad)
    path = folder / file_name
    path.write_text(text)
    return path, line


def no_complete_cache(folder: Path) -> bool:
    return not folder.exists() or not any(is_complete(p) for p in folder.iterdir())


@pytest.mark.parametrize(("layout", "name", "bad", "reason", "problem"), CASES, ids=IDS)
def test_unusable_json_value_stops_with_file_and_line(
    tmp_path: Path, tok: Any, layout: str, name: str, bad: str, reason: str, problem: str
) -> None:
    path, line = write_layout(tmp_path, layout, bad)
    cfg = make_cfg(datasets=[{"path": str(path)}], dataset_prepared_path=str(tmp_path / "p"))
    with pytest.raises(DataError) as err:
        prepare_datasets(cfg, tok)
    message = str(err.value)
    assert f"{path}, line {line}:" in message and f"[{reason}]" in message and problem in message, message
    assert "on_bad_row: skip" in message  # skippable: the message says how
    assert no_complete_cache(tmp_path / "p")


@pytest.mark.parametrize(("layout", "name", "bad", "reason", "problem"), CASES, ids=IDS)
def test_unusable_json_value_is_skipped_counted_and_rejected(
    tmp_path: Path, tok: Any, layout: str, name: str, bad: str, reason: str, problem: str
) -> None:
    path, line = write_layout(tmp_path, layout, bad)
    prepared = prepare_datasets(cfg_for(tmp_path, {"path": str(path)}, on_bad_row="skip"), tok)
    stats = prepared.report.datasets[0]
    assert (stats.rows_read, stats.bad, stats.kept, len(prepared.train)) == (4, {reason: 1}, 3, 3)
    [reject] = rejects_of(prepared)
    assert (reject["file"], reject["line"], reject["reason"]) == (str(path), line, reason)
    assert problem in reject["problem"]
    assert len(reject["raw"]) == len(bad)  # the row's text, whole (and writable: the file is UTF-8)


def test_lone_surrogate_under_field_is_a_bad_row_numbered(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "d.json"
    path.write_text('{"data": [' + ", ".join([OK, LONE_SURROGATE, OK]) + "]}")
    ds = {"path": str(path), "field": "data"}
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, row 2: .*\[not_utf8\]"):
        prepare_datasets(make_cfg(datasets=[ds], dataset_prepared_path=str(tmp_path / "p")), tok)
    cfg = make_cfg(datasets=[ds], dataset_prepared_path=str(tmp_path / "p"), on_bad_row="skip")
    prepared = prepare_datasets(cfg, tok)
    assert prepared.report.datasets[0].bad == {"not_utf8": 1} and len(prepared.train) == 2


def test_single_object_json_with_a_lone_surrogate_is_a_bad_row(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "one.json"
    path.write_text(LONE_SURROGATE + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, line 1: .*\[not_utf8\]"):
        prepare_datasets(cfg_for(tmp_path, {"path": str(path)}), tok)


def test_too_deep_under_field_is_an_error_naming_the_file(tmp_path: Path, tok: Any) -> None:
    path = tmp_path / "d.json"
    path.write_text('{"data": [' + ", ".join([OK, DEEP, OK]) + "]}")
    cfg = cfg_for(tmp_path, {"path": str(path), "field": "data"}, on_bad_row="skip")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: .*nested too deep"):
        prepare_datasets(cfg, tok)


def test_valid_surrogate_pairs_and_big_but_allowed_numbers_are_kept(tmp_path: Path, tok: Any) -> None:
    """No false alarm: an escaped astral character (a surrogate *pair*), an escaped backslash before
    "ud83d", a 4000-digit number and moderate nesting are ordinary rows."""
    rows = [
        '{"instruction": "smile \\ud83d\\ude00", "output": "hi"}',
        '{"instruction": "path C:\\\\ud83d", "output": "hi"}',
        '{"instruction": "say hi", "output": "hi", "extra": ' + "9" * 4000 + "}",
        '{"instruction": "say hi", "output": "hi", "extra": ' + "[" * 50 + "]" * 50 + "}",
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows) + "\n")
    prepared = prepare_datasets(cfg_for(tmp_path, {"path": str(path)}), tok)
    assert prepared.report.datasets[0].bad == {} and len(prepared.train) == 4


def test_json_array_stays_an_error_when_a_too_deep_element_is_also_broken(tmp_path: Path, tok: Any) -> None:
    """Skipping a too-deep array element needs to know where it ends; if it is also malformed, the
    rows after it cannot be found, so that is still an error (nothing after it is silently lost)."""
    broken = '{"instruction": ' + "[" * 100_000 + "]" * 99_999 + ', "output": "hi"}'
    path = tmp_path / "d.json"
    path.write_text(f"[\n  {OK},\n  {broken},\n  {OK}\n]\n")
    cfg = cfg_for(tmp_path, {"path": str(path)}, on_bad_row="skip")
    with pytest.raises(DataError, match=rf"(?s){re.escape(str(path))}, line 3: .*cannot be read"):
        prepare_datasets(cfg, tok)


# ------------------------------------------------------------------ CSV


def test_csv_field_over_128_kb_is_read(tmp_path: Path, tok: Any) -> None:
    long_text = "word " * 40_000  # 200 KB in one field
    path = tmp_path / "d.csv"
    path.write_text(f"instruction,output\nsay hi,hi\nsay a lot,{long_text}\nsay bye,bye\n")
    cfg = cfg_for(tmp_path, {"path": str(path)}, excess_length_strategy="truncate")
    prepared = prepare_datasets(cfg, tok)
    stats = prepared.report.datasets[0]
    assert (stats.rows_read, stats.bad, stats.kept, stats.truncated) == (3, {}, 3, 1)


def test_csv_field_over_128_kb_with_quotes_and_newlines_keeps_its_line(tmp_path: Path, tok: Any) -> None:
    long_text = '"' + "line\n" * 40_000 + '"'  # one quoted field spanning 40,000 lines
    path = tmp_path / "d.csv"
    path.write_text(f"instruction,output\nsay hi,hi\n{long_text},hi\nsay,hi,extra\n")
    cfg = make_cfg(datasets=[{"path": str(path)}], dataset_prepared_path=str(tmp_path / "p"))
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, line 40004: .*\[invalid_csv\]"):
        prepare_datasets(cfg, tok)


# ------------------------------------------------------------------ whole sources


def saved_dataset(folder: Path) -> Path:
    import datasets

    rows = [json.loads(OK)] * 3
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    return folder


def _garbage_info(folder: Path) -> None:
    (folder / "dataset_info.json").write_text("{not json")


def _garbage_state(folder: Path) -> None:
    (folder / "state.json").write_text("{")


def _no_arrow(folder: Path) -> None:
    for f in folder.glob("*.arrow"):
        f.unlink()


def _truncated_arrow(folder: Path) -> None:
    for f in folder.glob("*.arrow"):
        f.write_bytes(f.read_bytes()[:100])


def _arrow_is_text(folder: Path) -> None:
    for f in folder.glob("*.arrow"):
        f.write_text("not arrow at all")


@pytest.mark.parametrize(
    "corrupt", [_garbage_info, _garbage_state, _no_arrow, _truncated_arrow, _arrow_is_text]
)
def test_corrupt_save_to_disk_folder_is_an_error_naming_it(tmp_path: Path, tok: Any, corrupt: Any) -> None:
    folder = saved_dataset(tmp_path / "saved")
    corrupt(folder)
    cfg = cfg_for(tmp_path, {"path": str(folder)}, on_bad_row="skip")
    with pytest.raises(DataError) as err:
        prepare_datasets(cfg, tok)
    assert str(folder) in str(err.value) and "save_to_disk" in str(err.value), str(err.value)
    assert no_complete_cache(tmp_path / "p")


@pytest.mark.parametrize("content", ["", "\n\n", "[]"], ids=["empty", "blank-lines", "empty-array"])
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_empty_test_dataset_is_an_error_naming_it(tmp_path: Path, tok: Any, content: str, mode: str) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(f"{OK}\n{OK}\n")
    empty = tmp_path / ("empty.json" if content == "[]" else "empty.jsonl")
    empty.write_text(content)
    cfg = make_cfg(
        datasets=[{"path": str(train)}],
        test_datasets=[{"path": str(empty)}],
        dataset_prepared_path=str(tmp_path / "p"),
        on_bad_row=mode,
    )
    with pytest.raises(DataError, match=rf"test dataset {re.escape(repr(str(empty)))} has no rows"):
        prepare_datasets(cfg, tok)
    assert no_complete_cache(tmp_path / "p")


def test_test_datasets_without_a_usable_sample_is_an_error(tmp_path: Path, tok: Any) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(f"{OK}\n{OK}\n")
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"instruction": "x"}\n{broken\n')  # rows, but none usable
    cfg = make_cfg(
        datasets=[{"path": str(train)}],
        test_datasets=[{"path": str(bad)}],
        dataset_prepared_path=str(tmp_path / "p"),
        on_bad_row="skip",
    )
    with pytest.raises(DataError, match="no evaluation sample is left"):
        prepare_datasets(cfg, tok)
    assert no_complete_cache(tmp_path / "p")


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail instead of hanging if a test opens a FIFO (an open for reading blocks until a writer comes)."""

    def timeout(signum: int, frame: Any) -> None:
        raise TimeoutError("opened the FIFO and blocked")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(30)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and /dev/null are POSIX")
@pytest.mark.parametrize("kind", ["fifo", "dev-null", "fifo-in-data_files"])
def test_not_a_regular_file_is_an_error_saying_so(tmp_path: Path, tok: Any, alarm: None, kind: str) -> None:
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    if kind == "fifo":
        ds, named = {"path": str(fifo)}, str(fifo)
    elif kind == "dev-null":
        ds, named = {"path": "/dev/null", "ds_type": "jsonl"}, "/dev/null"
    else:
        ds, named = {"path": str(tmp_path), "data_files": ["pipe.jsonl"]}, str(fifo)
    cfg = make_cfg(datasets=[ds], dataset_prepared_path=str(tmp_path / "p"))
    with pytest.raises(DataError) as err:
        prepare_datasets(cfg, tok)
    message = str(err.value)
    assert named in message and "is not a regular file" in message and "not found" not in message, message


# ------------------------------------------------------------------ through the command line


def write_config(tmp_path: Path, data: Path, *extra: str) -> Path:
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "\n".join(
            [
                f"base_model: {smollm2_folder()}",
                f"datasets:\n  - path: {data}\n    type: alpaca",
                f"dataset_prepared_path: {tmp_path / 'prep'}",
                f"output_dir: {tmp_path / 'out'}",
                "dataset_num_proc: 1",
                "sequence_len: 256",
                *extra,
                "",
            ]
        )
    )
    return config


ENV = {"PYTORCH_ALLOC_CONF": None, "PYTORCH_CUDA_ALLOC_CONF": None, "WORLD_SIZE": "1"}


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temporary folder as the CLI sees it (where a crash report would go): inside tmp_path."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.mark.parametrize("command", ["preprocess", "train"])
def test_cli_lone_surrogate_is_one_error_line_or_a_skipped_row(
    tmp_path: Path, temp_dir: Path, command: str
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(f"{OK}\n{LONE_SURROGATE}\n{OK}\n")
    config = write_config(tmp_path, data)
    failed = CliRunner().invoke(main, [command, str(config)], env=ENV, catch_exceptions=False)
    assert failed.exit_code == 1, failed.output
    assert "Traceback" not in failed.output and "UnicodeEncodeError" not in failed.output
    [line] = [x for x in failed.stderr.splitlines() if x.startswith("ERROR")]
    assert f"{data}, line 2:" in line and "[not_utf8]" in line, line
    if command == "train":
        return
    skipped = CliRunner().invoke(
        main, [command, str(config), "on_bad_row=skip"], env=ENV, catch_exceptions=False
    )
    assert skipped.exit_code == 0, skipped.output
    assert "not UTF-8: 1" in skipped.output and "rejected rows:" in skipped.output


@pytest.mark.parametrize("command", ["preprocess", "train"])
def test_cli_empty_test_dataset_is_one_error_line(tmp_path: Path, temp_dir: Path, command: str) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(f"{OK}\n{OK}\n")
    empty = tmp_path / "eval.jsonl"
    empty.write_text("")
    config = write_config(tmp_path, data, f"test_datasets:\n  - path: {empty}\n    type: alpaca")
    result = CliRunner().invoke(main, [command, str(config)], env=ENV, catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "IndexError" not in result.output
    [line] = [x for x in result.stderr.splitlines() if x.startswith("ERROR")]
    assert f"test dataset '{empty}' has no rows" in line, line
