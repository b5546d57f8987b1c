"""Findings: what validation says about a config, each with a stable code.

A finding is data, not an exception, so ``hellbender validate`` can print all of them at once and
tests can assert on codes instead of on message wording.

Messages quote what the user wrote, and what a user wrote can be huge (a value of a million list
items, an alias bomb, a key of a hundred kilobytes) or not printable (a lone surrogate from an
escape such as ``"\\ud800"`` or from command-line bytes that are not UTF-8). :func:`quote` and
:func:`clip` bound every quoted value, and :meth:`Finding.render` escapes what a terminal cannot
encode, so printing a finding never costs more than a line and never raises.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any, Literal

from hellbender.errors import HellbenderError

Severity = Literal["error", "warning", "info"]

QUOTE_LIMIT = 80  # characters of a user's value or key shown in a message
MESSAGE_LIMIT = 1000  # characters of a whole rendered message or fix (a safety net)


class _BoundedRepr(reprlib.Repr):
    """``repr`` that looks at a bounded part of a value: a few items per level, a few levels."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdeque = 4
        self.maxdict = 4
        self.maxstring = QUOTE_LIMIT
        self.maxother = QUOTE_LIMIT
        self.maxlong = QUOTE_LIMIT

    def repr_int(self, x: int, level: int) -> str:
        # repr() of an int past 4,300 digits raises (CVE-2020-10735); the size is what matters
        if x.bit_length() > 256:
            return f"<{'-' if x < 0 else ''}int of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_REPR = _BoundedRepr()


def clip(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """A ``repr`` of a user's value for a message: bounded in length and in the work it takes,
    whatever the value's size (aliases may share one list a million times)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a value whose repr fails: say what it is instead
        text = f"<{type(value).__name__}>"
    return clip(text, limit)


def printable(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udXXX`` escapes, so any UTF-8 stream takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


@dataclass(frozen=True)
class Finding:
    """One thing validation noticed.

    ``code`` is stable across releases (HB1xx: config, HB2xx: data, HB3xx: model), ``key`` is the
    dotted path of the option concerned, ``fix`` says what to change.
    """

    code: str
    severity: Severity
    message: str
    fix: str = ""
    key: str | None = None

    def render(self) -> str:
        where = f" [{clip(self.key, 2 * QUOTE_LIMIT)}]" if self.key else ""
        fix = f"\n    fix: {clip(self.fix, MESSAGE_LIMIT)}" if self.fix else ""
        message = clip(self.message, MESSAGE_LIMIT)
        return printable(f"{self.severity.upper()} {self.code}{where}: {message}{fix}")


class ConfigError(HellbenderError):
    """The config cannot be used. Carries every finding so they can all be shown together."""

    def __init__(self, findings: list[Finding]):
        self.findings = findings
        super().__init__("\n".join(f.render() for f in findings))


def has_errors(findings: list[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)
