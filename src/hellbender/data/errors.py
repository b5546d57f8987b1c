"""The two ways data preparation can fail: a bad row, or a dataset that cannot be used at all.

They are kept apart on purpose. A :class:`BadRow` is local — one line of one file — and the
``on_bad_row`` setting decides whether it stops the run or is skipped, counted and written to the
rejects file. A :class:`DataError` is not skippable (a missing file, an unknown chat template, an
offline hub id, or a bad row under ``on_bad_row: error``) and its message always names the dataset,
and where there is one, the file and the line or row.
"""

from __future__ import annotations

from hellbender.errors import HellbenderError

# Stable reason codes: the report, the rejects file and the tests all use these strings.
BAD_ROW_REASONS: dict[str, str] = {
    "invalid_json": "invalid JSON",
    "too_deep": "JSON nested too deep",
    "number_too_large": "integer too long",
    "not_utf8": "not UTF-8",
    "invalid_csv": "malformed CSV row",
    "missing_field": "missing field",
    "wrong_type": "wrong type",
    "empty_messages": "empty messages",
    "empty_segments": "empty segments",
    "unknown_role": "unknown role",
    "template_error": "chat template error",
    "template_mismatch": "template changes content",
}

# Reasons a *well-formed* row produces no sample (or fewer tokens than it had).
DROP_REASONS: dict[str, str] = {
    "too_long": "longer than sequence_len",
    "too_short": "shorter than min_sample_len",
    "no_trained_tokens": "no trained token",
    "duplicate": "exact duplicate",
}


class BadRow(Exception):
    """One row cannot be turned into a sample. ``reason`` is a key of :data:`BAD_ROW_REASONS`."""

    def __init__(self, reason: str, problem: str) -> None:
        if reason not in BAD_ROW_REASONS:  # a typo here would silently create a new report column
            raise ValueError(f"unknown bad-row reason {reason!r}")
        self.reason = reason
        self.problem = problem
        super().__init__(f"{problem} [{reason}]")


class DataError(HellbenderError):
    """Preparing the datasets cannot go on. The message says which dataset, where, and what to do."""


class EmptyTrainingSetError(DataError, ValueError):
    """The prepared training set yields no micro-batch to train on."""
