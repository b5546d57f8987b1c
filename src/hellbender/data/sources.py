"""Where rows come from: local files, ``save_to_disk`` folders, or the Hugging Face hub.

Every row carries its :class:`Location` — file and line for text formats (JSON Lines, JSON
arrays, CSV, txt), file and row number for tables (parquet, arrow, saved datasets, hub) — so a
bad row can be named exactly. That is why JSON Lines, JSON, CSV and text files are read here line
by line rather than through ``datasets.load_dataset``, which forgets line numbers and fails a
whole file on one bad line. A row whose JSON parses but cannot be used (a lone surrogate escape,
nesting too deep for Python's json, an integer too long for Python) is a bad row of its own too.
What cannot be read at all (a FIFO or device instead of a file, a damaged ``save_to_disk``
folder) is a :class:`DataError` naming it.

``split`` selects a split of a ``save_to_disk`` DatasetDict or of a hub dataset; a local data file
is one split by itself, so ``split`` does not apply to it. ``name`` and ``revision`` apply to hub
datasets only.

A :class:`Source` also knows its *fingerprint*: a hash of the bytes of every file it reads
(never just the paths or modification times), which is what the prepared-dataset cache is keyed
on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hellbender.config.schema import DatasetConfig
from hellbender.data.errors import BadRow, DataError
from hellbender.hub import hub_offline

FILE_TYPES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "txt",
    ".text": "txt",
    ".arrow": "arrow",
}
# Axolotl allows `path: json` (a loader name) with local `data_files`.
LOADER_NAMES = {"json": "json", "csv": "csv", "parquet": "parquet", "text": "txt", "arrow": "arrow"}
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Location:
    """Where a row is: a file and a 1-based line (text files) or row number (tables)."""

    file: str
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}, line {self.line}"
        if self.row is not None:
            return f"{self.file}, row {self.row}"
        return self.file

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "row": self.row}


@dataclass
class Record:
    """One raw row: its value, or why it could not even be parsed (then ``raw`` holds the text)."""

    where: Location
    value: Any = None
    error: BadRow | None = None
    raw: str | None = None


@dataclass
class Source:
    """A resolved ``datasets:`` entry: what to read and how."""

    config: DatasetConfig
    kind: str  # "files" | "saved" | "hub"
    files: list[tuple[Path, str]] = field(default_factory=list)  # (file, file type)
    folder: Path | None = None  # the save_to_disk folder
    _hub: Any = None  # the loaded hub dataset (loaded once, to fingerprint and to read)

    @property
    def label(self) -> str:
        return self.config.path

    def fingerprint(self) -> str:
        """Hash of the content of everything this source reads."""
        h = hashlib.sha256()
        if self.kind == "files":
            for path, ftype in self.files:
                h.update(f"{path.name}\0{ftype}\0".encode())
                _hash_file(h, path)
        elif self.kind == "saved":
            assert self.folder is not None
            for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
                h.update(f"{path.relative_to(self.folder)}\0".encode())
                _hash_file(h, path)
        else:
            ds = self.hub_dataset()
            cache_files = [c["filename"] for c in getattr(ds, "cache_files", [])]
            if cache_files:
                for name in cache_files:
                    _hash_file(h, Path(name))
            else:  # an in-memory hub dataset: hash what datasets itself fingerprints it by
                h.update(str(getattr(ds, "_fingerprint", "")).encode())
        return h.hexdigest()

    def records(self) -> Iterator[Record]:
        """Every row, in file order, with its location."""
        if self.kind == "files":
            for path, ftype in self.files:
                yield from _READERS[ftype](path, self.config)
        elif self.kind == "saved":
            yield from _saved_rows(self)
        else:
            yield from _table_rows(self.hub_dataset(), self.config.path)

    def hub_dataset(self) -> Any:
        if self._hub is None:
            self._hub = _load_hub(self.config)
        return self._hub


def _hash_file(h: Any, path: Path) -> None:
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(b"\0eof\0")


def _file_type(path: Path, ds: DatasetConfig) -> str:
    if ds.ds_type:
        return ds.ds_type
    ftype = FILE_TYPES.get(path.suffix.lower())
    if ftype is None:
        raise DataError(
            f"dataset {ds.path!r}: cannot tell the type of {path} from its extension; set `ds_type:` "
            f"({', '.join(sorted(set(FILE_TYPES.values())))})."
        )
    return ftype


def _looks_local(path: str) -> bool:
    """A path the user clearly meant as a local file (so "not found" is the right error)."""
    # Hub ids are "name" or "owner/name"; more slashes, a leading ./ or ~, or a data-file
    # extension mean a local path.
    return path.startswith((".", "/", "~")) or Path(path).suffix.lower() in FILE_TYPES or path.count("/") > 1


def resolve_source(ds: DatasetConfig) -> Source:
    """Decide what a ``datasets:`` entry reads. Raises :class:`DataError` with the dataset named."""
    path = Path(ds.path).expanduser()
    data_files = [ds.data_files] if isinstance(ds.data_files, str) else list(ds.data_files or [])
    if path.is_file():
        return Source(ds, "files", files=[(path, _file_type(path, ds))])
    if path.is_dir():
        if data_files:
            return Source(ds, "files", files=[(p, _file_type(p, ds)) for p in _expand(path, data_files, ds)])
        if any((path / marker).exists() for marker in _SAVED_MARKERS):
            return Source(ds, "saved", folder=path)
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in FILE_TYPES
            and not any(part.startswith(".") for part in p.parts)
        )
        if not found:
            raise DataError(
                f"dataset {ds.path!r}: the folder has no data files ({', '.join(sorted(FILE_TYPES))}) "
                "and is not a save_to_disk folder."
            )
        return Source(ds, "files", files=[(p, _file_type(p, ds)) for p in found])
    if path.exists():  # neither a file nor a folder; never opened (opening a FIFO waits for a writer)
        raise _not_regular(path, ds)
    if ds.path in LOADER_NAMES and data_files:
        ftype = ds.ds_type or LOADER_NAMES[ds.path]
        return Source(ds, "files", files=[(p, ftype) for p in _expand(Path("."), data_files, ds)])
    if _looks_local(ds.path):
        raise DataError(
            f"dataset {ds.path!r}: file or folder not found (relative paths are read from {Path.cwd()})."
        )
    if hub_offline():
        raise DataError(
            f"dataset {ds.path!r} is not a local file or folder, and the Hugging Face hub is offline "
            "(HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE or HF_DATASETS_OFFLINE): it must be local. "
            "Download it where the network is allowed (e.g. "
            "`datasets.load_dataset(...).save_to_disk(folder)`) and set `path:` to that folder."
        )
    return Source(ds, "hub")


def _expand(root: Path, patterns: list[str], ds: DatasetConfig) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        direct = root / pattern
        if direct.exists() and not direct.is_file() and not direct.is_dir():
            raise _not_regular(direct, ds)
        matches = [direct] if direct.is_file() else sorted(p for p in root.glob(pattern) if p.is_file())
        if not matches:
            raise DataError(
                f"dataset {ds.path!r}: data_files entry {pattern!r} matches no file under {root}."
            )
        files.extend(matches)
    return files


def _not_regular(path: Path, ds: DatasetConfig) -> DataError:
    """``path`` exists but is no file to read rows from: a FIFO, a device (``/dev/null``), a socket."""
    mode = path.stat().st_mode
    kinds = (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    kind = next((name for test, name in kinds if test(mode)), "neither a file nor a folder")
    return DataError(
        f"dataset {ds.path!r}: {path} is not a regular file ({kind}). A dataset is read twice (once to "
        "fingerprint it for the cache, once for its rows), so it must be a file or a folder of files."
    )


def _load_hub(ds: DatasetConfig) -> Any:
    import datasets

    try:
        return datasets.load_dataset(
            ds.path, name=ds.name, split=ds.split, data_files=ds.data_files, revision=ds.revision
        )
    except Exception as exc:
        raise DataError(
            f"dataset {ds.path!r}: loading it from the Hugging Face hub failed "
            f"({type(exc).__name__}: {exc}). "
            "If it is meant to be local, check the path; if it is on the hub, check the name, `name:`, "
            "`split:` and the network."
        ) from exc


# ------------------------------------------------------------------ readers, one per file type


# Text sources are decoded as "utf-8-sig": a UTF-8 byte order mark (which Windows tools write at
# the start of a file) is dropped instead of becoming part of the first JSON line or CSV column
# name. They are read with errors="surrogateescape": a byte that is not UTF-8 becomes one lone
# surrogate (U+DC80..U+DCFF) instead of a UnicodeDecodeError that would abort the whole file. The
# readers then find it and name its line: a bad row where rows are lines, else a DataError.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def _first_bad_byte(text: str) -> tuple[int, int] | None:
    """(the byte, its character index) of the first byte of ``text`` (decoded with
    surrogateescape) that was not UTF-8, or None."""
    found = _UNDECODABLE.search(text)
    return None if found is None else (ord(found.group()) - 0xDC00, found.start())


def _not_utf8(text: str) -> str | None:
    """What is wrong with ``text`` (decoded with surrogateescape), or None if it was valid UTF-8."""
    bad = _first_bad_byte(text)
    return None if bad is None else f"not UTF-8: byte 0x{bad[0]:02x} at character {bad[1] + 1}"


def _shown(text: str) -> str:
    """``text`` with undecodable bytes as ``\\xNN`` escapes: writable to the (UTF-8) rejects file."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# What Python's json accepts as text but cannot turn into a usable row is a bad row of its own:
# * a lone UTF-16 surrogate escape ("\ud83d" without its pair): a str no UTF-8 encoder takes, so
#   it would crash tokenizing or saving far from its line;
# * nesting deeper than json's recursion allows (RecursionError);
# * an integer with more digits than Python converts (sys.get_int_max_str_digits(), ValueError).
_SURROGATE = re.compile("[\ud800-\udfff]")
# A lone surrogate in a decoded value can only come from such an escape (raw surrogate bytes are
# not UTF-8 and are caught before parsing), so values are searched only when the text has one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _TooLong:
    """Stands in a decoded value for an integer with more digits than Python converts."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def _unusable(value: Any) -> BadRow | None:
    """Why a decoded JSON value cannot be a row (a lone surrogate, an integer too long), or None.
    Walked with a stack: a value json could decode may still be too deep for recursion here."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _TooLong):
            return BadRow(
                "number_too_large",
                f"an integer with {item.digits} digits, more than Python converts "
                "(sys.get_int_max_str_digits())",
            )
        strings: Any = ()
        if isinstance(item, str):
            strings = (item,)
        elif isinstance(item, dict):
            strings = item.keys()
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        for text in strings:
            found = _SURROGATE.search(text)
            if found is not None:
                return BadRow(
                    "not_utf8",
                    f"not UTF-8: a lone surrogate \\u{ord(found.group()):04x} (half of a UTF-16 pair, "
                    f"written as a JSON escape) in {'a key' if text is not item else 'a string'}",
                )
    return None


def _too_deep() -> BadRow:
    return BadRow("too_deep", "JSON nested too deep for Python's json parser")


class _JSONValues:
    """JSON decoding that reports what Python cannot make a usable row of (see above) as a
    :class:`BadRow` of that row alone. Malformed JSON still raises ``json.JSONDecodeError``."""

    def __init__(self) -> None:
        self._suspect = False  # an integer too long was met in the value being decoded
        self._decoder = json.JSONDecoder(parse_int=self._parse_int)

    def _parse_int(self, digits: str) -> int | _TooLong:
        try:
            return int(digits)
        except ValueError:  # more digits than sys.get_int_max_str_digits() allows
            self._suspect = True
            return _TooLong(len(digits.lstrip("-")))

    def whole(self, text: str) -> tuple[Any, BadRow | None]:
        """``text`` as one JSON value (a JSON Lines line, a whole document) and its problem."""
        self._suspect = False
        try:
            value = self._decoder.decode(text)
        except RecursionError:
            return None, _too_deep()
        return value, self.check(value, text, 0, len(text))

    def at(self, text: str, pos: int) -> tuple[Any, int | None, BadRow | None]:
        """The JSON value starting at ``pos``, where it ends, and its problem. The end of a value
        too deep to decode is found without decoding it; None if it is malformed as well."""
        self._suspect = False
        try:
            value, end = self._decoder.raw_decode(text, pos)
        except RecursionError:
            return None, _end_of_json_value(text, pos), _too_deep()
        return value, end, self.check(value, text, pos, end)

    def check(self, value: Any, text: str, pos: int, end: int) -> BadRow | None:
        """The problem of ``value``, decoded from ``text[pos:end]`` by the last call (walked only
        when that text can hold one)."""
        if self._suspect or (
            text.find("\\u", pos, end) != -1 and _SURROGATE_ESCAPE.search(text, pos, end) is not None
        ):
            return _unusable(value)
        return None


_JSON_TOKEN = re.compile(
    r'[ \t\n\r]*(?:(?P<scalar>"(?:[^"\\\x00-\x1f]+|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"'
    r"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null|NaN|-?Infinity)"
    r"|(?P<open>[\[{])|(?P<close>[\]}])|(?P<sep>[:,]))"
)


def _end_of_json_value(text: str, pos: int) -> int | None:
    """Where the JSON value starting at ``pos`` ends if it is well-formed, else None.

    Iterative, so it checks values nested deeper than ``json`` (which recurses) can decode: a
    JSON array then skips such an element as one bad row, and knows exactly where the next starts.
    """
    closers: list[str] = []  # the closing bracket of each open container, innermost last
    # What comes next: "value", "key", "colon", "comma"; "first_value" / "first_key" just after
    # "[" / "{" (where the closing bracket may come instead).
    expect = "value"
    while True:
        m = _JSON_TOKEN.match(text, pos)
        if m is None:
            return None
        pos, kind = m.end(), m.lastgroup
        token = m.group(kind or 0)  # without the whitespace before it
        if kind == "close":
            if not closers or token != closers.pop() or expect not in ("comma", "first_value", "first_key"):
                return None
        elif expect in ("value", "first_value"):
            if kind == "open":
                closers.append("]" if token == "[" else "}")
                expect = "first_value" if token == "[" else "first_key"
                continue
            if kind != "scalar":
                return None
        elif expect in ("key", "first_key"):
            if kind != "scalar" or not token.startswith('"'):
                return None
            expect = "colon"
            continue
        elif token != (":" if expect == "colon" else ","):
            return None
        else:
            expect = "value" if expect == "colon" or closers[-1] == "]" else "key"
            continue
        if not closers:  # a whole value is complete
            return pos
        expect = "comma"


def _jsonl_rows(path: Path, ds: DatasetConfig) -> Iterator[Record]:
    values = _JSONValues()
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = Location(str(path), line=number)
            # Per line with -sig: also files concatenated with their BOMs. Without the line end,
            # so an error at the end of a line gets this line's column (json counts a trailing
            # newline as the start of line 2, column 1).
            line = raw.decode("utf-8-sig", "surrogateescape").rstrip("\r\n")
            problem = _not_utf8(line)
            if problem is not None:
                yield Record(where, error=BadRow("not_utf8", problem), raw=_shown(line))
                continue
            if not line.strip():
                continue  # blank lines separate nothing and hold no row
            try:
                value, unusable = values.whole(line)
            except json.JSONDecodeError as exc:
                yield Record(
                    where,
                    error=BadRow("invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}"),
                    raw=line,
                )
                continue
            if unusable is None:
                yield Record(where, value=value)
            else:
                yield Record(where, error=unusable, raw=line)


def _line_of(text: str, pos: int, start_pos: int, start_line: int) -> int:
    return start_line + text.count("\n", start_pos, pos)


def _json_rows(path: Path, ds: DatasetConfig) -> Iterator[Record]:
    """A JSON array (rows get their line), an object with ``field``, or JSON Lines in a .json file."""
    text = path.read_bytes().decode("utf-8-sig", "surrogateescape")
    stripped = text.lstrip()
    values = _JSONValues()
    if stripped.startswith("{") and ds.field is None:
        # One object is one row; objects one after another are JSON Lines under a .json name
        # (datasets reads both so). A first object that does not parse is read as JSON Lines
        # too, so the bad line gets reported.
        start = len(text) - len(stripped)
        try:
            value, end, unusable = values.at(text, start)
        except json.JSONDecodeError:
            end = None
        if end is not None and not text[end:].strip():
            _require_utf8(text, path, ds)
            where = Location(str(path), line=text.count("\n", 0, start) + 1)
            if unusable is None:
                yield Record(where, value=value)
            else:
                yield Record(where, error=unusable, raw=text[start:end])
            return
        yield from _jsonl_rows(path, ds)
        return
    _require_utf8(text, path, ds)
    if ds.field is not None:
        try:
            whole, unusable = values.whole(text)
        except json.JSONDecodeError as exc:
            raise _unreadable_json(
                path, ds, exc.lineno, f"invalid JSON: {exc.msg} at column {exc.colno}"
            ) from exc
        if unusable is not None and unusable.reason == "too_deep":
            raise DataError(
                f"dataset {ds.path!r}: {path}: {unusable.problem}, somewhere in the document; with "
                "`field:` the whole file is one JSON document, so none of its rows can be read.\n"
                "    fix: correct the file, or convert it to JSON Lines (one row per line), where a bad line "
                "is skipped alone."
            )
        if not isinstance(whole, dict) or ds.field not in whole:
            raise DataError(f"dataset {ds.path!r}: {path} has no top-level key {ds.field!r} (`field:`).")
        rows = whole[ds.field]
        if not isinstance(rows, list):
            raise DataError(f"dataset {ds.path!r}: {path}: key {ds.field!r} does not hold a list of rows.")
        suspect = unusable is not None  # some row has a problem: find which
        for i, value in enumerate(rows, start=1):
            where = Location(str(path), row=i)
            problem = _unusable(value) if suspect else None
            if problem is None:
                yield Record(where, value=value)
            else:  # the row's text is not at hand: its JSON, escaped (so it fits the rejects file)
                yield Record(where, error=problem, raw=json.dumps(value, default=repr))
        return
    if not stripped.startswith("["):
        line = text.count("\n", 0, len(text) - len(stripped)) + 1
        raise _unreadable_json(
            path, ds, line, "invalid JSON: expected an array of rows, an object or JSON Lines"
        )
    # Walk the array element by element so every row knows the line it starts on. Once one
    # element does not parse, where the next one starts is a guess: the reader stops with a
    # DataError rather than drop the rest of the file as if it were one bad row.
    pos = len(text) - len(stripped) + 1
    line, line_pos = 1, 0
    expect_value = True
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos < len(text) and text[pos] == "]":
            if text[pos + 1 :].strip():
                line = _line_of(text, pos, line_pos, line)
                raise _unreadable_json(path, ds, line, "invalid JSON: more text after the closing ']'")
            return
        if not expect_value:
            if pos < len(text) and text[pos] == ",":
                pos += 1
                expect_value = True
                continue
            line = _line_of(text, pos, line_pos, line)
            raise _unreadable_json(path, ds, line, "invalid JSON: expected ',' or ']' between rows")
        line = _line_of(text, pos, line_pos, line)
        line_pos = pos
        try:
            value, end, unusable = values.at(text, pos)
        except json.JSONDecodeError as exc:
            raise _unreadable_json(
                path, ds, exc.lineno, f"invalid JSON: {exc.msg} at column {exc.colno}"
            ) from exc
        if end is None:  # too deep to decode, and malformed too: where it ends is a guess
            raise _unreadable_json(path, ds, line, "invalid JSON: a row nested too deep, and malformed")
        where = Location(str(path), line=line)
        if unusable is None:
            yield Record(where, value=value)
        else:  # skipped alone: the next row starts right after it
            yield Record(where, error=unusable, raw=text[pos:end])
        pos = end
        expect_value = False


def _unreadable_json(path: Path, ds: DatasetConfig, line: int, problem: str) -> DataError:
    """A JSON document broken at ``line``: nothing after it can be read, so it cannot be one
    skipped bad row (``on_bad_row: skip`` would silently lose every row after it)."""
    return DataError(
        f"dataset {ds.path!r}: {path}, line {line}: {problem} [invalid_json]. The rows after line {line} "
        "cannot be read, so this is an error even with `on_bad_row: skip`.\n"
        "    fix: correct the file, or convert it to JSON Lines (one row per line), where a bad line is "
        "skipped alone."
    )


def _require_utf8(text: str, path: Path, ds: DatasetConfig) -> None:
    """A JSON document is one piece: a byte that is not UTF-8 in it cannot be skipped as one row."""
    bad = _first_bad_byte(text)
    if bad is not None:
        byte, at = bad
        line = text.count("\n", 0, at) + 1
        raise DataError(
            f"dataset {ds.path!r}: {path}, line {line}: byte 0x{byte:02x} is not UTF-8. "
            "A JSON file must be UTF-8 text: save it as UTF-8."
        )


def _csv_rows(path: Path, ds: DatasetConfig) -> Iterator[Record]:
    # The csv module refuses a field over 128 KB by default; a long document in one cell is
    # ordinary data. No field is longer than its file (a character takes at least one byte), so
    # the limit is raised to the file's size: process-wide, so only ever raised, never lowered.
    size = min(path.stat().st_size, 2**31 - 1)  # a C long on every platform
    if csv.field_size_limit() < size:
        csv.field_size_limit(size)
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        problem = _not_utf8(",".join(header))
        if problem is not None:  # without column names no row of the file can be read
            raise DataError(
                f"dataset {ds.path!r}: {path}, line 1 (the header): {problem}. Save the file as UTF-8."
            )
        start = reader.line_num + 1
        for values in reader:
            where = Location(str(path), line=start)
            start = reader.line_num + 1
            if not values:
                continue
            bad = next(((i, p) for i, v in enumerate(values) if (p := _not_utf8(v)) is not None), None)
            if bad is not None:
                i, problem = bad
                column = f"column {header[i]!r}" if i < len(header) else f"value {i + 1}"
                yield Record(
                    where, error=BadRow("not_utf8", f"{column}: {problem}"), raw=_shown(",".join(values))
                )
                continue
            if len(values) != len(header):
                yield Record(
                    where,
                    error=BadRow(
                        "invalid_csv",
                        f"row has {len(values)} values but the header has {len(header)} columns",
                    ),
                    raw=",".join(values),
                )
                continue
            yield Record(where, value=dict(zip(header, values, strict=True)))


def _txt_rows(path: Path, ds: DatasetConfig) -> Iterator[Record]:
    """One row per non-blank line, in the ``text_column`` field (as datasets' text loader does)."""
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            problem = _not_utf8(line)
            if problem is not None:
                yield Record(
                    Location(str(path), line=number), error=BadRow("not_utf8", problem), raw=_shown(line)
                )
                continue
            yield Record(Location(str(path), line=number), value={ds.text_column: line})


def _table_rows(table_source: Any, label: str) -> Iterator[Record]:
    """Rows of a ``datasets.Dataset`` or a pyarrow table, numbered from 1."""
    import pyarrow as pa

    table = table_source if isinstance(table_source, pa.Table) else table_source.data.table
    if not isinstance(table_source, pa.Table) and getattr(table_source, "_indices", None) is not None:
        table = table_source.flatten_indices().data.table
    number = 0
    for batch in table.to_batches(max_chunksize=1000):
        for value in batch.to_pylist():
            number += 1
            yield Record(Location(label, row=number), value=value)


def _unreadable(path: Path, ds: DatasetConfig, what: str, exc: Exception) -> DataError:
    """A table file pyarrow cannot read (corrupt, truncated, not that format): no row is usable."""
    return DataError(f"dataset {ds.path!r}: cannot read {path} as {what}: {exc}")


def _parquet_rows(path: Path, ds: DatasetConfig) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, ds, "parquet", exc) from exc
    yield from _table_rows(table, str(path))


def _arrow_rows(path: Path, ds: DatasetConfig) -> Iterator[Record]:
    """Arrow IPC, stream format (what ``datasets`` writes) or file format."""
    import pyarrow as pa

    try:
        try:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(path, ds, "Arrow IPC (stream or file format)", exc) from exc
    yield from _table_rows(table, str(path))


def _saved_rows(source: Source) -> Iterator[Record]:
    import datasets
    import pyarrow as pa

    assert source.folder is not None
    try:
        loaded = datasets.load_from_disk(str(source.folder))
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        # A damaged folder: metadata that is not JSON or misses keys, a missing, truncated or
        # foreign .arrow file (FileNotFoundError, JSONDecodeError, ArrowInvalid, ...).
        raise DataError(
            f"dataset {source.config.path!r}: {source.folder} looks like a save_to_disk folder "
            f"({', '.join(m for m in _SAVED_MARKERS if (source.folder / m).exists())}) but cannot be "
            f"loaded: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}. Save the dataset again "
            "with `save_to_disk`, or point `path:` at its data files."
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        split = source.config.split
        if split not in loaded:
            raise DataError(
                f"dataset {source.config.path!r}: the saved dataset has no split {split!r} "
                f"(it has {', '.join(loaded)}); set `split:`."
            )
        loaded = loaded[split]
    yield from _table_rows(loaded, str(source.folder))


_READERS = {
    "jsonl": _jsonl_rows,
    "json": _json_rows,
    "csv": _csv_rows,
    "txt": _txt_rows,
    "parquet": _parquet_rows,
    "arrow": _arrow_rows,
}
