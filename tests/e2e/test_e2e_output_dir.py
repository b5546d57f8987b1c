"""What ``run_train`` may do to folders: never train into the model it reads, never replace a file
it did not write, and resume only with settings it can honour — saying which it applies.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

import hellbender.commands.train as train_command
from hellbender.commands.train import run_train
from hellbender.config.schema import ResolvedConfig
from hellbender.testing.configs import resolved_config
from hellbender.train import checkpoint as ckpt
from hellbender.train.checkpoint import CheckpointError
from hellbender.train.loop import TrainResult

LORA: dict[str, object] = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}


def make_cfg(base_settings: dict[str, object], out: Path, **values: object) -> ResolvedConfig:
    return resolved_config(**{
        **base_settings, "learning_rate": 0.01, "max_steps": 2, "save_steps": 2, "logging_steps": 1,
        "output_dir": str(out), **values,
    })  # fmt: skip


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def model_copy(tiny_assets: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_assets / "model", tmp_path / "model"))


# ---------------------------------------------------------------- not into the model's own folder


@pytest.mark.parametrize("where", ["same", "inside", "symlink", "relative"])
def test_a_full_fine_tune_into_the_base_model_folder_is_refused(
    base_settings: dict[str, object], model_copy: Path, tmp_path: Path, where: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    before = files_of(model_copy)
    (tmp_path / "link").symlink_to(model_copy)
    monkeypatch.chdir(tmp_path)
    out = {"same": str(model_copy), "inside": str(model_copy / "run"), "symlink": str(tmp_path / "link"),
           "relative": "./link/run"}[where]  # fmt: skip
    cfg = make_cfg(base_settings, Path(), base_model=str(model_copy), output_dir=out)
    with pytest.raises(CheckpointError, match=r"output_dir.*base_model"):
        run_train(cfg)
    assert files_of(model_copy) == before
    assert not (model_copy / "run").exists()


@pytest.mark.parametrize("key", ["tokenizer_config", "base_model_config", "lora_model_dir"])
def test_output_dir_in_any_folder_the_run_reads_from_is_refused(
    base_settings: dict[str, object], model_copy: Path, tmp_path: Path, key: str
) -> None:
    if key == "lora_model_dir":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        source = tmp_path / "adapter"
        base = AutoModelForCausalLM.from_pretrained(str(model_copy))
        adapter = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        adapter.save_pretrained(str(source))
        values = {**LORA, "lora_model_dir": str(source)}
    else:
        source = Path(shutil.copytree(model_copy, tmp_path / "source"))
        values = {key: str(source)}
    before = files_of(source)
    cfg = make_cfg(base_settings, source, base_model=str(model_copy), **values)
    with pytest.raises(CheckpointError, match=f"output_dir.*{key}"):
        run_train(cfg)
    assert files_of(source) == before


# ---------------------------------------------------------------- never replace someone else's file


@pytest.mark.parametrize("name", ["README.md", "tokenizer_config.json", "metrics.jsonl"])
def test_a_file_hellbender_did_not_write_is_never_replaced(
    base_settings: dict[str, object], tmp_path: Path, name: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("my own file\n")
    with pytest.raises(CheckpointError, match=name):
        run_train(make_cfg(base_settings, out, **LORA))
    assert (out / name).read_text() == "my own file\n"
    assert ckpt.list_checkpoints(out) == []  # refused before training, not after


def test_a_file_that_appears_during_the_run_is_not_replaced_either(
    base_settings: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    real_train = train_command.train

    def train_then_user_writes(*args: Any, **kwargs: Any) -> TrainResult:
        result = real_train(*args, **kwargs)
        (out / "README.md").write_text("written by hand while training ran\n")
        return result

    monkeypatch.setattr(train_command, "train", train_then_user_writes)
    with pytest.raises(CheckpointError, match=r"README\.md") as refused:
        run_train(make_cfg(base_settings, out, **LORA))
    assert (out / "README.md").read_text() == "written by hand while training ran\n"
    assert not (out / "adapter_model.safetensors").exists()  # all or nothing: none was published
    # The finished run is not lost: its outputs wait in a new folder the message names.
    (kept,) = out.glob("unpublished-outputs-*")
    assert f"outputs were kept in {kept}" in str(refused.value)
    assert (kept / "adapter_model.safetensors").is_file() and (kept / "README.md").is_file()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]  # the training is kept


def test_a_run_replaces_its_own_earlier_outputs(base_settings: dict[str, object], tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_train(make_cfg(base_settings, out, **LORA))
    first = (out / "adapter_model.safetensors").read_bytes()
    # Continued (nothing left to train: the outputs are written again) ...
    assert run_train(make_cfg(base_settings, out, auto_resume_from_checkpoints=True, **LORA)).resumed_from
    # ... and a new run into the same folder once its checkpoints are gone (another seed: new weights).
    shutil.rmtree(out / "checkpoint-2")
    run_train(make_cfg(base_settings, out, seed=7, **LORA))
    assert (out / "adapter_model.safetensors").read_bytes() != first


# ---------------------------------------------------------------- resume with changed settings


@pytest.fixture(scope="module")
def finished(base_settings: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step LoRA run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "out"
    run_train(make_cfg(base_settings, out, max_steps=4, **LORA))
    return out


def test_every_checkpoint_carries_the_resolved_config(finished: Path) -> None:
    run_config = yaml.safe_load((finished / "config.resolved.yaml").read_text())
    for checkpoint in ckpt.list_checkpoints(finished):
        assert yaml.safe_load((checkpoint / "config.resolved.yaml").read_text()) == run_config


def test_resuming_with_changed_training_settings_is_refused_listing_each(
    base_settings: dict[str, object], finished: Path
) -> None:
    before = files_of(finished)
    cfg = make_cfg(base_settings, finished, max_steps=4, auto_resume_from_checkpoints=True,
                   **{**LORA, "lora_r": 8}, learning_rate=0.02, weight_decay=0.1)  # fmt: skip
    with pytest.raises(CheckpointError) as caught:
        run_train(cfg)
    message = str(caught.value)
    assert "checkpoint-4" in message
    for change in ("learning_rate: 0.01 → 0.02", "weight_decay: 0.0 → 0.1", "lora_r: 4 → 8"):
        assert change in message, message
    assert "\n" not in message  # the CLI prints it as one ERROR line
    assert files_of(finished) == before  # not even config.resolved.yaml was rewritten


def test_resuming_with_harmless_changes_goes_ahead_and_says_so(
    base_settings: dict[str, object], finished: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hellbender")
    cfg = make_cfg(base_settings, finished, max_steps=4, auto_resume_from_checkpoints=True, **LORA,
                   logging_steps=3, max_grad_norm=0.5)  # fmt: skip
    result = run_train(cfg)
    assert result.resumed_from == finished / "checkpoint-4"
    lines = {(r.levelname, r.getMessage()) for r in caplog.records}
    assert any(level == "INFO" and "logging_steps: 1 → 3" in text for level, text in lines), lines
    assert any(level == "WARNING" and "max_grad_norm: 1.0 → 0.5" in text for level, text in lines), lines
    # The two switches that say how to resume are not "changes" to report.
    assert not any("auto_resume_from_checkpoints" in text for _, text in lines), lines
