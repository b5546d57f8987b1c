"""What every prompt format hands to the tokenizer: a text and the character spans to train.

A format never produces token ids itself. It renders a row to one string and says which
*characters* are trained; :mod:`hellbender.data.tokenize` tokenizes that string once and maps the
character spans to tokens. Tokenizing the whole string at once is what inference does too
(``apply_chat_template`` tokenizes the rendered conversation in one call), so the ids trained on
are exactly the ids the model will see, with no seams where separately tokenized pieces meet.

Work is split in two so that the expensive half runs in worker processes:

* :meth:`PromptFormat.normalize` — cheap checks of one raw row in the main process, which knows
  the file and line, so a bad row is reported (or skipped) with its exact location. It returns a
  row of fixed schema (:meth:`PromptFormat.features`) that Arrow can store.
* :meth:`PromptFormat.render` — templates the normalized row, in ``datasets.map`` workers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hellbender.data.errors import BadRow


@dataclass
class Rendered:
    """One formatted row, before tokenization.

    ``trained`` are half-open character spans of ``text`` whose tokens get labels; a token is
    trained when its characters overlap a trained span. ``eot`` lists ``(after, limit)`` pairs: the
    first special token that starts at or after ``after`` and before ``limit`` (only whitespace in
    between) is an end-of-turn token to train — chat templates close turns with such a token, and
    where exactly it sits depends on the template, so it is found on the tokens, not guessed here.
    """

    text: str
    trained: list[tuple[int, int]]
    eot: list[tuple[int, int]] = field(default_factory=list)
    add_special_tokens: bool = True  # let the tokenizer add its BOS (chat templates write their own)
    append_eos: bool = False  # append the EOS token, trained, unless the tokenizer already did
    chunk: bool = False  # split into sequence_len pieces instead of dropping/truncating


class PromptFormat(ABC):
    """Base class: turn raw rows into :class:`Rendered` texts. Subclasses must stay picklable."""

    name: ClassVar[str]
    # The token ids that may close a turn (``Rendered.eot``); None: any special token.
    eot_ids: frozenset[int] | None = None

    @abstractmethod
    def features(self) -> Any:
        """The ``datasets.Features`` of a normalized row (fixed, so Arrow never guesses types)."""

    @abstractmethod
    def normalize(self, row: Any) -> dict[str, Any]:
        """Check one raw row; return it in the fixed schema or raise :class:`BadRow`."""

    @abstractmethod
    def render(self, row: Mapping[str, Any]) -> Rendered:
        """Format one normalized row."""

    def identity(self) -> dict[str, Any]:
        """Everything about this format that changes its output (part of the cache key)."""
        return {"name": self.name}


# ------------------------------------------------------------------ field checks shared by formats


def as_object(row: Any) -> Mapping[str, Any]:
    """A row must be a JSON object (a mapping); anything else is a wrong type."""
    if not isinstance(row, Mapping):
        raise BadRow("wrong_type", f"row is {type_name(row)}, expected an object with fields")
    return row


def type_name(value: Any) -> str:
    """JSON-flavoured type names, because users read these about their JSON files."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def get_str(row: Mapping[str, Any], key: str, *, required: bool, what: str = "field") -> str:
    """``row[key]`` as a string. Missing or null: :class:`BadRow` if required, else ``""``."""
    if key not in row or row[key] is None:
        if required:
            raise BadRow("missing_field", f"{what} {key!r} is missing")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{what} {key!r} must be a string, got {type_name(value)}")
    return value


def get_object_list(row: Any, key: str, *, items: str, item: str) -> list[Mapping[str, Any]]:
    """``row[key]`` as a non-empty list of objects, the ``items`` (e.g. "messages"), each an
    ``item`` ("message"). Missing, not a list, empty, or an entry that is not an object:
    :class:`BadRow` with the reason ``missing_field``, ``wrong_type`` or ``empty_<items>``."""
    row = as_object(row)
    if key not in row or row[key] is None:
        raise BadRow("missing_field", f"field {key!r} is missing")
    value = row[key]
    if not isinstance(value, list):
        raise BadRow("wrong_type", f"field {key!r} must be a list of {items}, got {type_name(value)}")
    if not value:
        raise BadRow(f"empty_{items}", f"field {key!r} is an empty list")
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping):
            raise BadRow("wrong_type", f"{item} {i} is {type_name(entry)}, expected an object")
    return value
