"""How an ``unfrozen_parameters`` entry reads, shared by the config rule that checks it and the
trainer that applies it.

Axolotl's reading: a regex matched from the start of the parameter name (``re.match``), in which a
``.`` is a literal dot (parameter names are dotted paths) unless followed by ``+``. Axolotl's row
ranges (``name$[:32000]``: a gradient mask on part of a tensor) are refused rather than trained in
full.
"""

from __future__ import annotations

import re

_RANGE = re.compile(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$")


class UnfrozenPatternError(ValueError):
    """An ``unfrozen_parameters`` entry that is not a usable regex."""


def unfrozen_pattern(pattern: str) -> re.Pattern[str]:
    """The compiled regex of one ``unfrozen_parameters`` entry."""
    if _RANGE.match(pattern):
        raise UnfrozenPatternError(
            "row ranges (`[start:end]` at the end) are not supported; a whole tensor trains or not"
        )
    try:
        return re.compile(re.sub(r"\.(?!\+)", r"\\.", pattern))
    except re.error as exc:
        raise UnfrozenPatternError(f"not a regex ({exc})") from exc
