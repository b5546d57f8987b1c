"""Every source type reads back exactly the rows written, each with the right line / row number."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest

from hellbender.config.schema import DatasetConfig
from hellbender.data.errors import DataError
from hellbender.data.sources import resolve_source

ROWS = [
    {"instruction": "add 1 and 2", "input": "", "output": "3"},
    {"instruction": "say hi", "input": "to Bob", "output": "hi Bob,\nhow are you?"},
    {"instruction": "quote", "input": 'a "b" c', "output": "{braces} [and] , commas"},
]


def read(path: Path | str, **kw: Any) -> list[tuple[str, Any]]:
    """(location, value) for every record; errors as ("!reason", location)."""
    out = []
    for rec in resolve_source(DatasetConfig(path=str(path), **kw)).records():
        if rec.error is not None:
            out.append((str(rec.where), "!" + rec.error.reason))
        else:
            out.append((str(rec.where), rec.value))
    return out


def test_jsonl_lines_and_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n{oops\n" + json.dumps(ROWS[2]) + "\n"
    )
    assert read(f) == [
        (f"{f}, line 1", ROWS[0]),
        (f"{f}, line 3", ROWS[1]),
        (f"{f}, line 4", "!invalid_json"),
        (f"{f}, line 5", ROWS[2]),
    ]


def test_json_array_rows_know_their_lines(tmp_path: Path) -> None:
    f = tmp_path / "d.json"
    f.write_text(json.dumps(ROWS, indent=2))
    text = f.read_text()
    # Reference: the line each row's opening brace is on, found independently.
    starts, depth, line = [], 0, 1
    for ch in text:
        if ch == "\n":
            line += 1
        elif ch == "{":
            if depth == 0:
                starts.append(line)
            depth += 1
        elif ch == "}":
            depth -= 1
    assert read(f) == [(f"{f}, line {n}", row) for n, row in zip(starts, ROWS, strict=True)]


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ('[\n  {"a": 1},\n  {"a": 2 "b": 3},\n  {"a": 4}\n]\n', 3, "Expecting ',' delimiter at column 11"),
        ('[\n  {"a": 1}\n  {"a": 4}\n]\n', 3, "expected ',' or ']' between rows"),
        ('[\n  {"a": 1}\n]\n{"a": 4}\n', 3, "more text after the closing ']'"),
        ('oops\n{"a": 1}\n', 1, "expected an array of rows"),
    ],
    ids=["broken-element", "missing-comma", "text-after-array", "not-an-array"],
)
def test_broken_json_document_stops_instead_of_losing_the_rest(
    tmp_path: Path, text: str, line: int, problem: str
) -> None:
    # Rows after a break in a JSON document cannot be found reliably; reading them as "one bad
    # row" would silently drop them all under on_bad_row: skip. So the reader raises, naming
    # the file and the line, before yielding anything past the break.
    f = tmp_path / "d.json"
    f.write_text(text)
    rows = []
    with pytest.raises(DataError) as err:
        for rec in resolve_source(DatasetConfig(path=str(f))).records():
            rows.append(rec.value)
    message = str(err.value)
    assert f"{f}, line {line}: invalid JSON: {problem}" in message
    assert f"rows after line {line} cannot be read" in message and "on_bad_row: skip" in message
    assert None not in rows  # no bad-row record was handed on as if the break were skippable


def test_json_object_with_field_and_json_lines_in_json(tmp_path: Path) -> None:
    f = tmp_path / "d.json"
    f.write_text(json.dumps({"meta": 1, "rows": ROWS}))
    assert read(f, field="rows") == [(f"{f}, row {i}", r) for i, r in enumerate(ROWS, 1)]
    with pytest.raises(DataError, match="no top-level key 'items'"):
        read(f, field="items")
    single = tmp_path / "single.json"
    single.write_text(json.dumps(ROWS[1], indent=2))
    assert read(single) == [(f"{single}, line 1", ROWS[1])]
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert read(lines) == [(f"{lines}, line {i}", r) for i, r in enumerate(ROWS, 1)]


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), f)
    assert read(f) == [(f"{f}, row {i}", r) for i, r in enumerate(ROWS, 1)]


def test_csv_lines_with_quoted_newlines(tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    with f.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(ROWS)
        out.write("only,two\n")
    # Row 2's output holds a newline, so row 3 starts on line 5 and the short row on line 6.
    assert read(f) == [
        (f"{f}, line 2", ROWS[0]),
        (f"{f}, line 3", ROWS[1]),
        (f"{f}, line 5", ROWS[2]),
        (f"{f}, line 6", "!invalid_csv"),
    ]


def test_txt_one_row_per_line(tmp_path: Path) -> None:
    f = tmp_path / "d.txt"
    f.write_text("first line\n\nsecond line\n")
    assert read(f) == [(f"{f}, line 1", {"text": "first line"}), (f"{f}, line 3", {"text": "second line"})]
    assert read(f, text_column="body")[0][1] == {"body": "first line"}


def test_arrow_stream_and_file_formats(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa

    table = pa.Table.from_pylist(ROWS)
    ipc_file = tmp_path / "file.arrow"
    with pa.OSFile(str(ipc_file), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert [v for _, v in read(ipc_file)] == ROWS
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    (stream_file,) = (tmp_path / "saved").glob("*.arrow")  # datasets writes the stream format
    assert read(stream_file) == [(f"{stream_file}, row {i}", r) for i, r in enumerate(ROWS, 1)]


def test_save_to_disk_folders(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert read(tmp_path / "one") == [(f"{tmp_path / 'one'}, row {i}", r) for i, r in enumerate(ROWS, 1)]
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:2]), "test": datasets.Dataset.from_list(ROWS[2:])}
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    assert [v for _, v in read(tmp_path / "dict")] == ROWS[:2]
    assert [v for _, v in read(tmp_path / "dict", split="test")] == ROWS[2:]
    with pytest.raises(DataError, match=r"no split 'validation'.*train, test"):
        read(tmp_path / "dict", split="validation")


def test_folders_and_data_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (folder / "sub" / "b.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    (folder / "notes.md").write_text("not data")
    assert [v for _, v in read(folder)] == ROWS[:2]
    assert [v for _, v in read(folder, data_files="sub/*.jsonl")] == [ROWS[1]]
    assert [v for _, v in read(folder, data_files=["a.jsonl"])] == [ROWS[0]]
    with pytest.raises(DataError, match="matches no file"):
        read(folder, data_files="missing.jsonl")
    monkeypatch.chdir(tmp_path)
    assert [v for _, v in read("json", data_files=["data/a.jsonl"])] == [ROWS[0]]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        read(tmp_path / "empty")


def test_file_type_from_ds_type(tmp_path: Path) -> None:
    f = tmp_path / "rows.data"
    f.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(DataError, match="ds_type"):
        read(f)
    assert [v for _, v in read(f, ds_type="jsonl")] == [ROWS[0]]


def test_hub_id_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        resolve_source(DatasetConfig(path="someorg/some-dataset"))
    message = str(err.value)
    assert "'someorg/some-dataset'" in message and "offline" in message and "must be local" in message


def test_missing_local_file_is_not_mistaken_for_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        resolve_source(DatasetConfig(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="not found"):
        resolve_source(DatasetConfig(path="./data/train.jsonl"))


def test_fingerprint_follows_content_not_metadata(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(ROWS[0]) + "\n")
    source = resolve_source(DatasetConfig(path=str(f)))
    first = source.fingerprint()
    os.utime(f, (1, 1))  # a new modification time alone changes nothing
    assert source.fingerprint() == first
    f.write_text(json.dumps(ROWS[0]).replace("3", "4") + "\n")  # one byte
    assert source.fingerprint() != first



# ------------------------------------------------------------------ bytes that are not UTF-8


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "d.jsonl",
            b'{"output": "1"}\n{"output": "caf\xe9"}\n{"output": "3"}\n',
            [(1, {"output": "1"}), (2, "!not_utf8"), (3, {"output": "3"})],
        ),
        ("d.txt", b"one\ncaf\xe9\nthree\n", [(1, {"text": "one"}), (2, "!not_utf8"), (3, {"text": "three"})]),
        ("d.csv", b"output\n1\ncaf\xe9\n3\n", [(2, {"output": "1"}), (3, "!not_utf8"), (4, {"output": "3"})]),
    ],
    ids=["jsonl", "txt", "csv"],
)
def test_byte_that_is_not_utf8_is_a_bad_row_on_its_line(
    tmp_path: Path, name: str, content: bytes, expected: list[tuple[int, Any]]
) -> None:
    f = tmp_path / name
    f.write_bytes(content)  # 0xe9 is "é" in Latin-1, never valid alone in UTF-8
    assert read(f) == [(f"{f}, line {n}", value) for n, value in expected]
    (bad,) = [rec for rec in resolve_source(DatasetConfig(path=str(f))).records() if rec.error is not None]
    assert "not UTF-8: byte 0xe9" in bad.error.problem
    assert bad.raw is not None and "caf\\xe9" in bad.raw  # shown escaped, so the rejects file can hold it


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        ("d.json", b'[\n {"output": "1"},\n {"output": "caf\xe9"}\n]\n', "line 3: byte 0xe9 is not UTF-8"),
        ("d.csv", b"outp\xe9t\n1\n", "line 1 (the header): not UTF-8: byte 0xe9"),
    ],
    ids=["json", "csv-header"],
)
def test_byte_that_is_not_utf8_in_a_whole_document_is_a_data_error(
    tmp_path: Path, name: str, content: bytes, where: str
) -> None:
    # A JSON array (or a CSV header) cannot lose one piece and still be read: no bad row to skip.
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(DataError) as err:
        read(f)
    assert f"dataset {str(f)!r}: {f}, {where}" in str(err.value)


@pytest.mark.parametrize(("name", "what"), [("d.parquet", "parquet"), ("d.arrow", "Arrow IPC")])
def test_corrupt_table_file_is_a_data_error_naming_dataset_and_file(
    tmp_path: Path, name: str, what: str
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    f = folder / name
    f.write_bytes(b"not a table at all\n")
    with pytest.raises(DataError) as err:
        read(folder)  # the dataset (a folder) and the file in it are named apart
    assert str(err.value).startswith(f"dataset {str(folder)!r}: cannot read {f} as {what}")


# ------------------------------------------------------------------ byte order marks, error columns

BOM = b"\xef\xbb\xbf"  # what Notepad and Excel's "CSV UTF-8" put at the start of a file


@pytest.mark.parametrize(
    ("name", "content", "first"),
    [
        (
            "d.jsonl",
            BOM + b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n',
            (1, {"instruction": "a", "output": "b"}),
        ),
        ("d.csv", BOM + b"instruction,output\na,b\nc,d\n", (2, {"instruction": "a", "output": "b"})),
        (
            "d.json",
            BOM + b'[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": "d"}]\n',
            (1, {"instruction": "a", "output": "b"}),
        ),
        ("d.txt", BOM + b"a b\nc d\n", (1, {"text": "a b"})),
    ],
    ids=["jsonl", "csv", "json", "txt"],
)
def test_utf8_byte_order_mark_is_not_part_of_the_first_row(
    tmp_path: Path, name: str, content: bytes, first: tuple[int, Any]
) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    got = read(f)
    assert len(got) == 2 and got[0] == (f"{f}, line {first[0]}", first[1])
    assert "\ufeff" not in repr(got)


def test_jsonl_error_column_is_on_the_bad_line(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"instruction": "a", "output": "b"\n{"instruction": "a"}\n{"a": [1, 2\r\n')
    problems = [
        rec.error.problem for rec in resolve_source(DatasetConfig(path=str(f))).records() if rec.error
    ]
    # Both lines end too early: the error is right after their last character, not at
    # "column 1" of a line 2 made of the line end.
    assert problems == [
        "invalid JSON: Expecting ',' delimiter at column 35",
        "invalid JSON: Expecting ',' delimiter at column 12",
    ]
