"""A full disk is one clear error naming the path and the space, never a traceback or a bricked folder.

Each write site (checkpoint, metrics append, final publish, dataset cache, ``write_atomically``)
is made to fail here the way a full disk makes it fail: an ``OSError`` with ``ENOSPC``, or a
library's own exception that hides the errno (torch's ``RuntimeError``, safetensors'
``SafetensorError``) while the filesystem has no space left. The real thing, on a small tmpfs, is
in ``tests/chaos/test_chaos_disk_full.py``.
"""

from __future__ import annotations

import errno
import logging
import shutil
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from peft import LoraConfig, get_peft_model

import hellbender.commands.train as train_command
from hellbender.cli import BUG_NOTICE, main
from hellbender.data import cache
from hellbender.errors import DiskFullError, HellbenderError
from hellbender.files import write_atomically
from hellbender.testing.tiny import build_tiny_model
from hellbender.train import checkpoint as ckpt
from hellbender.train.metrics import JsonlSink, MetricsFileError, read_metrics

ENOSPC = OSError(errno.ENOSPC, "No space left on device")
# What torch.save raises when its writer hits ENOSPC: no errno, nothing about space.
TORCH_ENOSPC = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
Usage = namedtuple("Usage", "total used free")
Scheduler = torch.optim.lr_scheduler.LRScheduler


def no_space_left(monkeypatch: pytest.MonkeyPatch, free: int = 4096) -> None:
    """Every filesystem reports ``free`` bytes left (as a full disk does right after a failed write)."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**20, 2**20 - free, free))


def assert_disk_full(exc: BaseException, path: Path) -> str:
    """One clear error: a DiskFullError (a HellbenderError and an OSError) naming path and sizes."""
    assert isinstance(exc, DiskFullError) and isinstance(exc, HellbenderError) and isinstance(exc, OSError)
    assert exc.errno == errno.ENOSPC
    message = str(exc)
    assert "disk full" in message and str(path) in message, message
    assert " free" in message and "needs" in message, message
    assert "\n" not in message
    return message


def lora_setup(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, Scheduler]:
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    model = get_peft_model(build_tiny_model(seed=seed), lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("failure", [ENOSPC, TORCH_ENOSPC], ids=["oserror", "torch-runtimeerror"])
def test_a_full_disk_during_a_checkpoint_is_one_error_and_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    model, opt, sched = lora_setup()
    first = ckpt.save_checkpoint(tmp_path, model, opt, sched, ckpt.TrainState(global_step=1))

    def full(*args: object, **kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(ckpt.torch, "save", full)
    no_space_left(monkeypatch)
    with pytest.raises(DiskFullError) as info:
        ckpt.save_checkpoint(tmp_path, model, opt, sched, ckpt.TrainState(global_step=2))
    message = assert_disk_full(info.value, tmp_path / "checkpoint-2")
    assert "checkpoint-1" in message  # says what is still intact
    assert info.value.__cause__ is failure  # the original stays attached (debug: true shows it)
    # The half-written folder is gone at once (it only holds space the user needs back).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    monkeypatch.undo()
    other, opt2, sched2 = lora_setup(seed=5)
    assert ckpt.load_checkpoint(first, other, opt2, sched2).global_step == 1


def test_an_unrelated_failure_is_not_called_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plenty of space left: torch's RuntimeError stays what it is (and the leftover stays for the
    next start's sweep, exactly as a kill would leave it)."""
    model, opt, sched = lora_setup()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("something else")

    monkeypatch.setattr(ckpt.torch, "save", broken)
    with pytest.raises(RuntimeError, match="something else") as info:
        ckpt.save_checkpoint(tmp_path, model, opt, sched, ckpt.TrainState(global_step=1))
    assert not isinstance(info.value, DiskFullError)
    assert (tmp_path / ".tmp-checkpoint-1").is_dir()


# ------------------------------------------------------------------ metrics.jsonl


def test_a_cut_last_line_in_metrics_jsonl_is_repaired_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The file a full disk leaves: its last record cut mid-string. Every later run in the folder
    used to die on it with "Unterminated string … (char 196)" without naming the file."""
    path = tmp_path / "metrics.jsonl"
    whole = '{"step": 1, "loss": 5.1}\n{"step": 2, "loss": 4.9}\n'
    path.write_text(whole + '{"step": 3, "loss": 4.7, "lr": 0.01, "grad_n')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    with caplog.at_level(logging.WARNING, logger="hellbender"):
        JsonlSink.restore(path, path, 10)  # what a resumed run does first
    assert path.read_text() == whole  # repaired on disk
    assert any(str(path) in r.getMessage() and "cut" in r.getMessage() for r in caplog.records)


def test_a_broken_line_inside_metrics_jsonl_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.1}\n{"step": 2, "lo\n{"step": 3, "loss": 4.7}\n')
    with pytest.raises(MetricsFileError, match=rf"{path}, line 2") as info:
        JsonlSink.restore(path, path, 10)
    assert isinstance(info.value, HellbenderError)


def test_a_full_disk_during_a_metrics_append_leaves_no_cut_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log(1, {"loss": 5.0})
    real_write = __import__("os").write

    def full_write(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data)[:7])  # part of the record reaches the disk ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr("hellbender.train.metrics.os.write", full_write)
    no_space_left(monkeypatch)
    with pytest.raises(DiskFullError) as info:
        sink.log(2, {"loss": 4.0})
    assert_disk_full(info.value, path)
    sink.close()  # closing a sink that failed must not raise again
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1, "loss": 5.0}\n'  # cut back to the last whole record


# ------------------------------------------------------------------ write_atomically, the cache


def test_write_atomically_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "config.resolved.yaml"
    target.write_text("old: 1\n")

    def half_then_full(tmp: Path) -> None:
        tmp.write_text("new: 1\nmore")
        raise ENOSPC

    no_space_left(monkeypatch)
    with pytest.raises(DiskFullError) as info:
        write_atomically(target, half_then_full)
    assert_disk_full(info.value, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.resolved.yaml"]  # no .tmp left
    assert target.read_text() == "old: 1\n"


def test_the_start_up_sweep_removes_leftover_tmp_files(tmp_path: Path) -> None:
    """write_atomically's temporaries of a killed run (``.metrics.jsonl.tmp``, ...) are swept like
    checkpoint leftovers; the user's own files are not."""
    (tmp_path / ".metrics.jsonl.tmp").write_text("{")
    (tmp_path / ".loss.png.tmp").write_bytes(b"\x89PNG")
    (tmp_path / "notes.tmp").write_text("mine")
    (tmp_path / ".tmp-checkpoint-3").mkdir()
    removed = ckpt.remove_incomplete(tmp_path)
    assert sorted(p.name for p in removed) == [".loss.png.tmp", ".metrics.jsonl.tmp", ".tmp-checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp"]


def test_a_full_disk_while_writing_the_dataset_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "prepared" / "abc123"
    no_space_left(monkeypatch)
    with pytest.raises(DiskFullError) as info, cache.atomic_folder(final) as tmp:
        (tmp / "data-00000-of-00001.arrow").write_bytes(b"\0" * 5000)
        raise RuntimeError("Error while writing: I/O error: No space left on device (os error 28)")
    message = assert_disk_full(info.value, final)
    assert "dataset_prepared_path" in message
    assert list((tmp_path / "prepared").iterdir()) == []


def test_the_cache_sweeps_leftovers_of_dead_builds_only(tmp_path: Path) -> None:
    root = tmp_path / "prepared"
    with cache.atomic_folder(root / "k1") as tmp:  # a build of this process: its tmp name format
        live_name = tmp.name
        (tmp / "meta.json").write_text("{}")
    dead = root / live_name.replace("k1", "k0").replace(f"-{__import__('os').getpid()}-", "-999999999-")
    dead.mkdir()
    (root / ".old-k1-0123abcd").mkdir()  # left by a kill between the two renames
    with cache.atomic_folder(root / "k2") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert sorted(p.name for p in root.iterdir()) == ["k1", "k2"]


# ------------------------------------------------------------------ the final publish


def test_a_full_disk_during_the_publish_without_any_checkpoint_keeps_the_weights_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_strategy: no — the weights exist only in memory; they must end up somewhere."""
    model, _, _ = lora_setup()
    out = tmp_path / "out"
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))

    def write(folder: Path) -> None:
        ckpt.save_model_weights(model, folder)
        if folder.parent == out:  # output_dir's disk is full; the fallback's is not
            raise ENOSPC

    with pytest.raises(DiskFullError) as info:
        ckpt.publish_files(out, write)
    message = assert_disk_full(info.value, out)
    [kept] = list(system_tmp.iterdir())
    assert str(kept) in message
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the partial staging is gone
    other, _, _ = lora_setup(seed=9)
    ckpt.load_model_weights(other, kept)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(torch.equal(p, trained[n]) for n, p in other.named_parameters() if n in trained)


def test_a_full_disk_during_the_publish_names_the_newest_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt, sched = lora_setup()
    for step in (2, 4):
        state = ckpt.TrainState(global_step=step)
        ckpt.save_checkpoint(tmp_path, model, opt, sched, state, save_total_limit=1)

    def write(folder: Path) -> None:
        raise TORCH_ENOSPC

    no_space_left(monkeypatch)
    with pytest.raises(DiskFullError) as info:
        ckpt.publish_files(tmp_path, write)
    message = assert_disk_full(info.value, tmp_path)
    assert "checkpoint-4" in message and "auto_resume_from_checkpoints" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


# ------------------------------------------------------------------ the command line


def invoke_train(tmp_path: Path) -> Result:
    config = tmp_path / "cfg.yaml"
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "Say hi.", "input": "", "output": "Hi."}\n')
    config.write_text(
        f"base_model: {tmp_path}/model\noutput_dir: {tmp_path}/out\n"
        f"datasets:\n  - path: {data}\n    type: alpaca\n"
    )
    env = {"PYTORCH_ALLOC_CONF": None, "PYTORCH_CUDA_ALLOC_CONF": None, "WORLD_SIZE": "1"}
    return CliRunner().invoke(main, ["train", str(config)], env=env, catch_exceptions=False)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/data/out/x.bin"), "disk full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded", "/data/out/x.bin"), "disk quota"),
        (PermissionError(errno.EACCES, "Permission denied", "/data/out/x.bin"), "permission denied"),
        (OSError(errno.EROFS, "Read-only file system", "/data/out/x.bin"), "read-only"),
    ],
    ids=["enospc", "edquot", "eacces", "erofs"],
)
def test_the_cli_reports_a_plain_disk_or_permission_oserror_as_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError, expected: str
) -> None:
    """An OSError from a library hellbender does not wrap is still the machine's problem: one
    ERROR line naming the file, exit 1 — not a crash report."""

    def run_train(cfg: object) -> None:
        raise error

    monkeypatch.setattr(train_command, "run_train", run_train)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = invoke_train(tmp_path)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and BUG_NOTICE not in result.output
    [line] = [x for x in result.stderr.splitlines() if x.startswith("ERROR")]
    assert expected in line.lower() and "/data/out/x.bin" in line, line
    assert not list(tmp_path.rglob("hellbender-crash-*"))
