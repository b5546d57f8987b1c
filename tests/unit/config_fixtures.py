"""The minimal valid config and the file helper shared by the config-loading and CLI tests."""

from __future__ import annotations

from pathlib import Path

# The smallest config that validates: a model, one alpaca dataset and a batch size. Tests append
# keys to it (or ``str.replace`` a line) to provoke exactly one finding.
GOOD_CONFIG = """\
base_model: org/some-model
datasets:
  - path: data.jsonl
    type: alpaca
micro_batch_size: 2
"""


def write_config(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    """Write ``text`` to ``tmp_path / name`` and return the path (the loaders take files only)."""
    path = tmp_path / name
    path.write_text(text)
    return path
