"""`hellbender preprocess` then `hellbender train` on one config: train uses the cache preprocess built.

That is the point of a separate preprocess step, and it silently breaks if anything train adds to
the cache key (a tokenizer change made while loading the model, a setting normalized differently)
differs from what preprocess used: train would then tokenize everything again into a second folder.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner, Result

from hellbender.cli import main
from hellbender.data.cache import is_complete

ENV: dict[str, str | None] = {"PYTORCH_ALLOC_CONF": None, "PYTORCH_CUDA_ALLOC_CONF": None, "WORLD_SIZE": "1"}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=ENV, catch_exceptions=False)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of the folder and of every file in it: a rebuild replaces them all."""
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in [folder, *folder.rglob("*")]
    }


def test_train_reuses_the_cache_folder_preprocess_built(
    base_settings: dict[str, object], tmp_path: Path
) -> None:
    prepared = tmp_path / "prepared"
    config = tmp_path / "cfg.yaml"
    settings = {
        **base_settings,
        "dataset_prepared_path": str(prepared),
        "max_steps": 2,
        "output_dir": str(tmp_path / "out"),
    }
    config.write_text(yaml.safe_dump(settings))

    result = invoke("preprocess", str(config))
    assert result.exit_code == 0, result.output
    (folder,) = prepared.iterdir()  # one complete cache folder, nothing left half-written
    assert is_complete(folder) and f"cache: {folder}" in result.output
    before = snapshot(folder)

    result = invoke("train", str(config))
    assert result.exit_code == 0, result.output
    assert "trained 2/2 steps" in result.stdout
    assert list(prepared.iterdir()) == [folder]  # no second folder for a different key
    assert snapshot(folder) == before  # and this one was not rebuilt in place
