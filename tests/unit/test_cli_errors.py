"""One error path for every command: user errors are one line (exit 1), bugs leave a crash file (exit 2).

A :class:`~hellbender.errors.HellbenderError` (the user's config, files, data, model or machine)
prints ``ERROR: <message>`` and exits 1, without a traceback. Anything else is a bug: its traceback
goes to a new crash file, one line names the exception and the file, and the exit code is 2.
Internal functions are replaced by ones that raise, so each test reaches the path it checks
without loading a model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import hellbender.commands.evaluate as evaluate_command
import hellbender.commands.train as train_command
import hellbender.config.load as config_load
import hellbender.data.prepare as prepare
import hellbender.models.load as model_load
from hellbender.cli import BUG_NOTICE, CRASH_FILE_PREFIX, main
from hellbender.config.findings import ConfigError
from hellbender.data.errors import DataError, EmptyTrainingSetError
from hellbender.errors import HellbenderError, MissingFileError, ModelLoadError, OptionError, UnavailableError
from hellbender.models.attention import AttentionBackendError
from hellbender.models.load import ModelNotLocalError, PickledWeightsError
from hellbender.train.checkpoint import CheckpointError
from hellbender.train.loop import TrainingStopped

ENV: dict[str, str | None] = {"PYTORCH_ALLOC_CONF": None, "PYTORCH_CUDA_ALLOC_CONF": None, "WORLD_SIZE": "1"}
COMMANDS = ["validate", "preprocess", "train", "evaluate", "merge-lora", "inference"]


def invoke(*args: str) -> Result:
    # catch_exceptions=False: an exception escaping the command (a traceback for the user) fails the test.
    return CliRunner().invoke(main, list(args), env=ENV, catch_exceptions=False)


@pytest.fixture(autouse=True)
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temporary folder, as the crash report sees it: a fresh folder per test (autouse,
    so a test that fails by crashing leaves its report in tmp_path, not in the real /tmp)."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def write_project(tmp_path: Path, **extra: str) -> Path:
    """A config that loads: one real alpaca file, output_dir inside tmp_path (not created)."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "Say hi.", "input": "", "output": "Hi."}\n')
    settings = {
        "base_model": str(tmp_path / "no-such-model"),
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        **extra,
    }
    lines = [f"{key}: {value}" for key, value in settings.items()]
    config = tmp_path / "cfg.yaml"
    config.write_text("\n".join([*lines, "datasets:", f"  - path: {data}", "    type: alpaca", ""]))
    return config


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("ERROR")]


def assert_user_error(result: Result, *expected: str) -> str:
    """Exit 1, exactly one ERROR: line holding ``expected``, no traceback; returns that line."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    [line] = error_lines(result)
    assert line.startswith("ERROR: "), line
    for text in expected:
        assert text in line, line
    assert BUG_NOTICE not in result.output
    return line


def crash_files(*folders: Path) -> list[Path]:
    return sorted(
        p for folder in folders if folder.is_dir() for p in folder.glob(f"{CRASH_FILE_PREFIX}*.log")
    )


def assert_bug_report(result: Result, kind: str, message: str, folder: Path) -> Path:
    """Exit 2; one line names the exception and a crash file in ``folder`` holding the traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output  # the traceback is in the file, not on the terminal
    [line] = error_lines(result)
    assert f"{kind}: {message}" in line and BUG_NOTICE in line, line
    [path] = crash_files(folder)
    assert line.endswith(f"the traceback is in {path.resolve()}"), line
    text = path.read_text(encoding="utf-8")
    assert "Traceback (most recent call last)" in text and message in text and kind in text
    return path


# ------------------------------------------------------------------ user errors: exit 1, one line


@pytest.mark.parametrize("command", ["preprocess", "train"])
def test_a_missing_base_model_path_is_one_error_line(tmp_path: Path, temp_dir: Path, command: str) -> None:
    result = invoke(command, str(write_project(tmp_path)))
    assert_user_error(result, "base_model", str(tmp_path / "no-such-model"), "does not exist")
    assert crash_files(temp_dir, tmp_path / "out") == []


@pytest.mark.parametrize("command", ["preprocess", "train"])
def test_a_tokenizer_config_without_a_tokenizer_is_one_error_line(
    tmp_path: Path, temp_dir: Path, command: str
) -> None:
    """transformers raises its own ValueError for a folder without tokenizer files; the user sees
    which key points at the wrong folder."""
    empty = tmp_path / "not-a-tokenizer"
    empty.mkdir()
    result = invoke(command, str(write_project(tmp_path, tokenizer_config=str(empty))))
    assert_user_error(result, "tokenizer_config", "cannot load a tokenizer", str(empty))
    assert crash_files(temp_dir, tmp_path / "out") == []


@pytest.mark.parametrize("command", ["preprocess", "train"])
def test_a_missing_tokenizer_config_is_one_error_line(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "no-such-tokenizer"
    result = invoke(command, str(write_project(tmp_path, tokenizer_config=str(missing))))
    assert_user_error(result, "tokenizer_config", str(missing), "does not exist")


def test_a_hub_id_while_offline_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("preprocess", str(write_project(tmp_path, base_model="hellbender-tests/no-such-model")))
    assert_user_error(
        result, "base_model", "'hellbender-tests/no-such-model' is a Hugging Face hub id", "local"
    )


def test_an_output_dir_that_is_a_file_is_one_error_line(tmp_path: Path, temp_dir: Path) -> None:
    in_the_way = tmp_path / "out"
    in_the_way.write_text("not a folder")
    result = invoke("train", str(write_project(tmp_path)))
    assert_user_error(result, "output_dir", str(in_the_way))
    assert crash_files(temp_dir) == []


@pytest.mark.parametrize(
    ("command", "target", "error"),
    [
        (
            "preprocess",
            (prepare, "prepare_datasets"),
            DataError("data.jsonl, line 3: missing field 'output'"),
        ),
        ("train", (train_command, "run_train"), EmptyTrainingSetError("the training set is empty")),
        ("evaluate", (evaluate_command, "run_evaluate"), OptionError("no evaluation set: set val_set_size")),
    ],
)
def test_every_hellbender_error_is_one_error_line(
    tmp_path: Path, temp_dir: Path, monkeypatch: pytest.MonkeyPatch, command: str,
    target: tuple[object, str], error: HellbenderError,
) -> None:  # fmt: skip
    monkeypatch.setattr(model_load, "load_tokenizer", lambda cfg: object())

    def raising(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(*target, raising)
    result = invoke(command, str(write_project(tmp_path)))
    assert_user_error(result, str(error))
    assert crash_files(temp_dir, tmp_path / "out") == []


def test_with_debug_a_user_error_shows_its_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["preprocess", str(write_project(tmp_path)), "debug=true"], env=ENV)
    assert isinstance(result.exception, MissingFileError), result.output
    assert "does not exist" in str(result.exception)


def test_config_errors_keep_their_findings(tmp_path: Path) -> None:
    for command in COMMANDS[1:]:
        result = invoke(command, str(write_project(tmp_path, lora_r="big")))
        assert result.exit_code == 1, (command, result.output)
        assert "ERROR HB008" in result.stderr and "Traceback" not in result.output


# ------------------------------------------------------------------ bugs: exit 2, a crash file


def test_a_bug_in_train_leaves_a_crash_file_in_output_dir(
    tmp_path: Path, temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ValueError used to be printed as if it were the user's mistake; it is a bug here."""

    def run_train(cfg: object) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(train_command, "run_train", run_train)
    (tmp_path / "out").mkdir()
    result = invoke("train", str(write_project(tmp_path)))
    path = assert_bug_report(result, "ValueError", "boom", tmp_path / "out")
    assert "in run_train" in path.read_text(encoding="utf-8")  # the frame that raised
    assert crash_files(temp_dir) == []


def test_a_bug_in_preprocess_leaves_a_crash_file_in_the_temporary_folder(
    tmp_path: Path, temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an output_dir on disk the report goes to the system's temporary folder."""

    def prepare_datasets(*args: object, **kwargs: object) -> None:
        raise KeyError("boom")

    monkeypatch.setattr(model_load, "load_tokenizer", lambda cfg: object())
    monkeypatch.setattr(prepare, "prepare_datasets", prepare_datasets)
    result = invoke("preprocess", str(write_project(tmp_path)))
    assert not (tmp_path / "out").exists()
    assert_bug_report(result, "KeyError", "'boom'", temp_dir)


def test_a_bug_in_validate_leaves_a_crash_file(
    tmp_path: Path, temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def load_config(*args: object, **kwargs: object) -> None:
        raise TypeError("boom in the loader")

    monkeypatch.setattr(config_load, "load_config", load_config)
    result = invoke("validate", str(write_project(tmp_path)))
    assert_bug_report(result, "TypeError", "boom in the loader", temp_dir)


def test_two_crashes_never_share_a_file(
    tmp_path: Path, temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = iter(["first boom", "second boom"])

    def run_train(cfg: object) -> None:
        raise RuntimeError(next(messages))

    monkeypatch.setattr(train_command, "run_train", run_train)
    config = str(write_project(tmp_path))
    assert invoke("train", config).exit_code == 2
    assert invoke("train", config).exit_code == 2
    texts = [p.read_text(encoding="utf-8") for p in crash_files(temp_dir)]
    assert len(texts) == 2
    assert (
        sorted("first boom" in t for t in texts) == sorted("second boom" in t for t in texts) == [False, True]
    )


def test_with_debug_a_bug_also_prints_its_traceback(
    tmp_path: Path, temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run_train(cfg: object) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(train_command, "run_train", run_train)
    result = invoke("train", str(write_project(tmp_path)), "debug=true")
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr and "ValueError: boom" in result.stderr
    assert len(crash_files(temp_dir)) == 1


def test_ctrl_c_exits_130_without_a_crash_file(
    tmp_path: Path, temp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run_train(cfg: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_command, "run_train", run_train)
    (tmp_path / "out").mkdir()
    result = invoke("train", str(write_project(tmp_path)))
    assert result.exit_code == 130, result.output
    assert crash_files(temp_dir, tmp_path / "out") == []
    assert "Traceback" not in result.output


# ------------------------------------------------------------------ the error classes


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (ConfigError, Exception),
        (DataError, Exception),
        (EmptyTrainingSetError, ValueError),
        (TrainingStopped, RuntimeError),
        (CheckpointError, ValueError),
        (ModelNotLocalError, FileNotFoundError),
        (PickledWeightsError, ValueError),
        (AttentionBackendError, ValueError),
        (ModelLoadError, ValueError),
        (OptionError, ValueError),
        (MissingFileError, FileNotFoundError),
        (UnavailableError, RuntimeError),
    ],
)
def test_user_facing_errors_are_hellbender_errors_with_their_builtin_base(
    error: type[Exception], builtin: type[Exception]
) -> None:
    """The CLI reports them as user errors; ``except ValueError`` etc. in callers keeps working."""
    assert issubclass(error, HellbenderError)
    assert issubclass(error, builtin)


def test_a_crash_file_keeps_a_message_with_lone_surrogates(tmp_path: Path) -> None:
    # A crash whose message holds a lone surrogate (from a file name or a config key) must still
    # leave its traceback on disk; a strict UTF-8 write would lose the report itself.
    from hellbender.cli import _write_crash_file

    try:
        raise RuntimeError("bad key \udcff")
    except RuntimeError as exc:
        path = _write_crash_file(exc, str(tmp_path))
    assert path is not None and path.parent == tmp_path.resolve()
    assert "bad key \\udcff" in path.read_text(encoding="utf-8")
