"""docs/config.md is generated from the code and must match it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hellbender.config import docs, rules
from hellbender.config.load import AXOLOTL_KEYS_NOT_SUPPORTED
from hellbender.config.schema import DatasetConfig, HellbenderConfig

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "config.md"


def test_committed_reference_is_up_to_date() -> None:
    assert COMMITTED.is_file(), (
        f"docs/config.md is missing; generate it with `{docs.REGENERATE}` from the repo root"
    )
    assert COMMITTED.read_text(encoding="utf-8") == docs.render(), (
        f"docs/config.md is out of date with the config code; regenerate it with `{docs.REGENERATE}` "
        "from the repository root and commit the result"
    )


def _table_rows(text: str) -> list[str]:
    return re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE)


def test_every_option_is_listed_once_with_type_default_and_description() -> None:
    page = docs.render()
    options = page.split("## Options", 1)[1].split("## Derived values", 1)[0]
    top = options.split("### Dataset entries", 1)[0]
    assert sorted(_table_rows(top)) == sorted(HellbenderConfig.model_fields)
    dataset = options.split("### Dataset entries", 1)[1].split("### ", 1)[0]
    assert _table_rows(dataset) == list(DatasetConfig.model_fields)
    for name, info in HellbenderConfig.model_fields.items():
        row = next(line for line in top.splitlines() if line.startswith(f"| `{name}` |"))
        assert info.description and info.description.replace("|", "\\|") in row
    assert "| `base_model` | str | **required** |" in top
    assert "| `lora_r` | int (≥ 1, ≤ 65536) | `8` |" in top


def test_every_rule_has_a_docstring_and_appears() -> None:
    page = docs.render()
    for fn in rules.RULES:
        assert fn.__doc__, f"rule {fn.__name__} needs a docstring: it is its description in docs/config.md"
        assert f"`rules.{fn.__name__}`" in page


def test_every_finding_code_is_documented_with_severity() -> None:
    page = docs.render()
    codes = docs.finding_codes()
    assert {"HB001", "HB004", "HB101", "HB120", "HB145", "HB150", "HB199"} <= set(codes)
    for code, doc in codes.items():
        severities = " / ".join(sorted({s.severity for s in doc.sites}))
        assert f"### {code} ({severities})" in page
        assert all(s.severity in {"error", "warning", "info"} for s in doc.sites)


def test_unsupported_axolotl_keys_are_listed() -> None:
    page = docs.render()
    section = page.split("## Axolotl options not supported", 1)[1].split("## ", 1)[0]
    assert sorted(_table_rows(section)) == sorted(AXOLOTL_KEYS_NOT_SUPPORTED)


def test_every_code_is_exercised_by_a_test() -> None:
    """A code added to the config modules without a test that mentions it fails here."""
    here = Path(__file__).resolve()
    tests = "".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py") if p.resolve() != here)
    untested = [code for code in docs.finding_codes() if code not in tests]
    assert not untested, f"finding codes without a test: {untested}"


def test_check_mode_reports_staleness(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "config.md"
    assert docs.main(["--check", "--output", str(target)]) == 1
    assert docs.REGENERATE in capsys.readouterr().err
    assert docs.main(["--output", str(target)]) == 0
    assert docs.main(["--check", "--output", str(target)]) == 0
    target.write_text(target.read_text() + "stale\n")
    assert docs.main(["--check", "--output", str(target)]) == 1
