"""Checkpoints: exact round trip of weights/optimizer/scheduler/RNG, atomic publication, rotation."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from hellbender.testing.tiny import build_tiny_model
from hellbender.train import checkpoint as ckpt


def trained_setup(seed: int, *, lora: bool = False, tied: bool = False, steps: int = 2):
    model = build_tiny_model(seed=seed, tie_word_embeddings=tied)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 320, (2, 12), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def assert_state_equal(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_state_equal(x, y)
    else:
        assert a == b


@pytest.mark.parametrize(("lora", "tied"), [(False, False), (False, True), (True, False)])
def test_round_trip_is_exact(tmp_path: Path, lora: bool, tied: bool) -> None:
    model, opt, sched = trained_setup(0, lora=lora, tied=tied)
    state = ckpt.TrainState(global_step=2, epoch=0, micro_batches_done=4, total_steps=10)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    path = ckpt.save_checkpoint(tmp_path, model, opt, sched, state)
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))

    # Different trainable weights and optimizer state (and, for LoRA, the same base: a resumed
    # run loads the base from base_model, the checkpoint holds only the adapter).
    other, opt2, sched2 = trained_setup(0 if lora else 1, lora=lora, tied=tied, steps=1)
    loaded = ckpt.load_checkpoint(path, other, opt2, sched2)
    assert (loaded.global_step, loaded.micro_batches_done, loaded.total_steps) == (2, 4, 10)
    for (n, a), (_, b) in zip(model.named_parameters(), other.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    assert_state_equal(opt.state_dict(), opt2.state_dict())
    assert sched.state_dict()["last_epoch"] == sched2.state_dict()["last_epoch"]
    assert sched.get_last_lr() == sched2.get_last_lr()
    draws = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[0] == expected_draws[0] and draws[1] == expected_draws[1]
    assert torch.equal(draws[2], expected_draws[2])
    if tied:
        assert other.lm_head.weight is other.model.embed_tokens.weight


def test_checkpoint_files_load_without_pickle(tmp_path: Path) -> None:
    model, opt, sched = trained_setup(0, lora=True)
    path = ckpt.save_checkpoint(tmp_path, model, opt, sched, ckpt.TrainState(global_step=1))
    for name in (ckpt.OPTIMIZER_FILE, ckpt.SCHEDULER_FILE, ckpt.RNG_FILE):
        torch.load(path / name, weights_only=True)  # raises if anything needs unpickling
    assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()


def test_failed_write_leaves_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt, sched = trained_setup(0)
    first = ckpt.save_checkpoint(tmp_path, model, opt, sched, ckpt.TrainState(global_step=1))

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "_write_training_state", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, model, opt, sched, ckpt.TrainState(global_step=2))
    assert not (tmp_path / "checkpoint-2").exists()
    assert (tmp_path / ".tmp-checkpoint-2").is_dir()  # the half-written folder is not a checkpoint
    assert ckpt.find_latest_checkpoint(tmp_path) == first
    assert ckpt.remove_incomplete(tmp_path) == [tmp_path / ".tmp-checkpoint-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_rotation_keeps_the_newest_by_step(tmp_path: Path) -> None:
    model, opt, sched = trained_setup(0, lora=True, steps=1)
    for step in (2, 9, 10, 11):
        ckpt.save_checkpoint(
            tmp_path, model, opt, sched, ckpt.TrainState(global_step=step), save_total_limit=2
        )
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-11"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-11"]


def test_folder_without_state_file_is_not_complete(tmp_path: Path) -> None:
    model, opt, sched = trained_setup(0, lora=True, steps=1)
    good = ckpt.save_checkpoint(tmp_path, model, opt, sched, ckpt.TrainState(global_step=3))
    (tmp_path / "checkpoint-7").mkdir()  # e.g. a copy interrupted half-way
    assert ckpt.find_latest_checkpoint(tmp_path) == good
    with pytest.raises(FileNotFoundError, match="not a complete"):
        ckpt.read_state(tmp_path / "checkpoint-7")


def test_save_only_model_cannot_resume(tmp_path: Path) -> None:
    model, opt, sched = trained_setup(0, lora=True, steps=1)
    path = ckpt.save_checkpoint(
        tmp_path, model, opt, sched, ckpt.TrainState(global_step=1), save_only_model=True
    )
    assert not (path / ckpt.OPTIMIZER_FILE).exists()
    with pytest.raises(ValueError, match="save_only_model"):
        ckpt.load_checkpoint(path, model, opt, sched)


def test_weights_that_do_not_match_are_refused(tmp_path: Path) -> None:
    model, opt, sched = trained_setup(0, steps=1)
    path = ckpt.save_checkpoint(tmp_path, model, opt, sched, ckpt.TrainState(global_step=1))
    bigger = build_tiny_model(seed=0, num_hidden_layers=3)
    with pytest.raises(ValueError, match="do not match"):
        ckpt.load_model_weights(bigger, path)


# ---------------------------------------------------------------- crashes during the final write
# and during rotation. Exceptions stand in for a kill: nothing on these paths cleans up on an
# exception, so the files left on disk are the ones a SIGKILL at the same moment leaves.


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def write_adapter(model: torch.nn.Module) -> object:
    return lambda folder: ckpt.save_model_weights(model, folder)


def test_a_crash_while_writing_final_outputs_keeps_the_old_ones(tmp_path: Path) -> None:
    from peft import PeftModel

    old_model, _, _ = trained_setup(0, lora=True, steps=1)
    new_model, _, _ = trained_setup(0, lora=True, steps=3)
    ckpt.publish_files(tmp_path, write_adapter(old_model))
    before = snapshot(tmp_path)
    assert "adapter_model.safetensors" in before

    def torn_write(folder: Path) -> None:  # the weights file is half on disk when the process dies
        ckpt.save_model_weights(new_model, folder)
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        raise OSError("killed while writing (simulated)")

    with pytest.raises(OSError, match="simulated"):
        ckpt.publish_files(tmp_path, torn_write)
    assert snapshot(tmp_path) == before
    loaded = PeftModel.from_pretrained(build_tiny_model(seed=0), str(tmp_path))  # still loadable
    for (name, a), (_, b) in zip(loaded.named_parameters(), old_model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert ckpt.remove_incomplete(tmp_path) == [tmp_path / ckpt.FINAL_STAGING]

    ckpt.publish_files(tmp_path, write_adapter(new_model))  # and the next write goes through
    after = snapshot(tmp_path)
    assert after.keys() == before.keys() and after != before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_a_crash_between_the_renames_leaves_only_complete_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_a, _, _ = trained_setup(0, lora=True, steps=1)
    model_b, _, _ = trained_setup(0, lora=True, steps=3)
    ckpt.publish_files(tmp_path / "a", write_adapter(model_a))
    ckpt.publish_files(tmp_path / "b", write_adapter(model_b))
    old, new = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert len(old) >= 2 and old.keys() == new.keys()

    renames = []

    def replace_once(src: object, dst: object) -> None:
        if renames:
            raise OSError("killed between two renames (simulated)")
        renames.append(dst)
        real_replace(src, dst)

    real_replace = ckpt.os.replace
    monkeypatch.setattr(ckpt.os, "replace", replace_once)
    with pytest.raises(OSError, match="simulated"):
        ckpt.publish_files(tmp_path / "a", write_adapter(model_b))
    mixed = snapshot(tmp_path / "a")
    assert mixed.keys() == old.keys()
    # Each file whole: the one renamed before the crash is new, every other one still old.
    [renamed] = [Path(p).name for p in renames]
    assert all(mixed[name] == (new if name == renamed else old)[name] for name in mixed)


@pytest.mark.parametrize("moment", ["before deleting", "half-way through deleting"])
def test_a_crash_during_rotation_keeps_the_newest_checkpoints_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    models = {}
    for step in (1, 2):
        models[step], opt, sched = trained_setup(step, steps=1)
        ckpt.save_checkpoint(
            tmp_path, models[step], opt, sched, ckpt.TrainState(global_step=step), save_total_limit=2
        )
    models[3], opt, sched = trained_setup(3, steps=1)

    real_rename, real_rmtree = ckpt.os.rename, ckpt.shutil.rmtree

    def crash_on_trash_rename(src: Path, dst: Path) -> None:
        if Path(dst).name.startswith(ckpt.TRASH_PREFIX):
            raise OSError("killed before deleting (simulated)")
        real_rename(src, dst)

    def crash_mid_delete(path: Path, *args: object, **kwargs: object) -> None:
        victim = next(p for p in sorted(Path(path).iterdir()) if p.is_file())
        victim.unlink()  # part of the old checkpoint is gone ...
        raise OSError("killed while deleting (simulated)")  # ... when the process dies

    if moment == "before deleting":
        monkeypatch.setattr(ckpt.os, "rename", crash_on_trash_rename)
    else:
        monkeypatch.setattr(ckpt.shutil, "rmtree", crash_mid_delete)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(
            tmp_path, models[3], opt, sched, ckpt.TrainState(global_step=3), save_total_limit=2
        )
    monkeypatch.setattr(ckpt.os, "rename", real_rename)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)

    kept = [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(tmp_path)]
    assert kept == ([1, 2, 3] if moment == "before deleting" else [2, 3])
    for step in kept:  # every checkpoint that is listed loads and holds what was saved
        other, opt2, sched2 = trained_setup(9, steps=1)
        assert ckpt.load_checkpoint(tmp_path / f"checkpoint-{step}", other, opt2, sched2).global_step == step
        for (name, a), (_, b) in zip(other.named_parameters(), models[step].named_parameters(), strict=True):
            assert torch.equal(a, b), name
    ckpt.remove_incomplete(tmp_path)  # the next start clears the half-deleted trash
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
