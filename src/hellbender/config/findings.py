"""Findings: what validation says about a config, each with a stable code.

A finding is data, not an exception, so ``hellbender validate`` can print all of them at once and
tests can assert on codes instead of on message wording.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hellbender.errors import HellbenderError

Severity = Literal["error", "warning", "info"]


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
        where = f" [{self.key}]" if self.key else ""
        fix = f"\n    fix: {self.fix}" if self.fix else ""
        return f"{self.severity.upper()} {self.code}{where}: {self.message}{fix}"


class ConfigError(HellbenderError):
    """The config cannot be used. Carries every finding so they can all be shown together."""

    def __init__(self, findings: list[Finding]):
        self.findings = findings
        super().__init__("\n".join(f.render() for f in findings))


def has_errors(findings: list[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)
