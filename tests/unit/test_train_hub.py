"""hub_model_id / hub_strategy / push_to_hub / hub_private_repo / push_dataset_to_hub, against a local
HTTP server standing in for the Hub (HF_ENDPOINT): it implements repository creation and the
preupload + commit calls of huggingface_hub's uploads, and records what was uploaded."""

from __future__ import annotations

import base64
import gzip
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from test_train_loop import PAD, make_cfg, make_samples

from hellbender.testing.tiny import build_tiny_model
from hellbender.train import checkpoint as ckpt
from hellbender.train import hub
from hellbender.train.loop import train


@dataclass
class FakeHub:
    endpoint: str = ""
    created: list[dict[str, Any]] = field(default_factory=list)
    # (kind/repo, message, files) per commit
    commits: list[tuple[str, str, dict[str, bytes]]] = field(default_factory=list)

    def files(self, repo: str) -> dict[str, bytes]:
        """Every file committed to ``repo`` (``models/me/x``), the last version of each."""
        out: dict[str, bytes] = {}
        for where, _, files in self.commits:
            if where == repo:
                out.update(files)
        return out


def _handler(state: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _json(self, obj: Any) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path == "/api/repos/create":
                request = json.loads(body)
                state.created.append(request)
                name = f"{request['organization']}/{request['name']}"
                prefix = "datasets/" if request.get("type") == "dataset" else ""
                return self._json({"url": f"{state.endpoint}/{prefix}{name}"})
            kind, rest = self.path.removeprefix("/api/").split("/", 1)
            if "/preupload/" in rest:
                wanted = json.loads(body)["files"]
                return self._json(
                    {
                        "files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                            for f in wanted
                        ]
                    }
                )
            if "/commit/" in rest:
                repo = rest.split("/commit/")[0]
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                message = next(x["value"]["summary"] for x in lines if x["key"] == "header")
                files = {
                    x["value"]["path"]: base64.b64decode(x["value"]["content"])
                    for x in lines
                    if x["key"] == "file"
                }
                state.commits.append((f"{kind}/{repo}", message, files))
                prefix = "datasets/" if kind == "datasets" else ""
                return self._json(
                    {"commitUrl": f"{state.endpoint}/{prefix}{repo}/commit/{'a' * 40}", "commitOid": "a" * 40}
                )
            self.send_response(404)
            self.end_headers()

    return Handler


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub switched on for this test (the suite runs offline), with a token."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")


@pytest.fixture
def fake_hub(online: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    state = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("HF_ENDPOINT", state.endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def _run(tmp_path: Path, **values: Any) -> Any:
    cfg = make_cfg(tmp_path, max_steps=4, **values)
    return cfg, train(cfg, build_tiny_model(seed=0), make_samples(6, seed=1), None, pad_token_id=PAD)


def test_all_checkpoints_pushes_each_checkpoint_and_its_weights(tmp_path: Path, fake_hub: FakeHub) -> None:
    _, result = _run(
        tmp_path, hub_model_id="me/tiny", hub_strategy="all_checkpoints", save_strategy="steps", save_steps=2
    )
    assert fake_hub.created == [
        {"name": "tiny", "organization": "me", "visibility": "private", "type": "model"}
    ]
    assert [p.name for p in result.checkpoints] == ["checkpoint-2", "checkpoint-4"]
    assert [m for _, m, _ in fake_hub.commits] == [
        "step 2: model",
        "step 2: checkpoint",
        "step 4: model",
        "step 4: checkpoint",
    ]
    pushed = fake_hub.files("models/me/tiny")
    for checkpoint in result.checkpoints:
        local = {
            p.relative_to(checkpoint).as_posix(): p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()
        }
        assert {
            k.removeprefix(f"{checkpoint.name}/"): v
            for k, v in pushed.items()
            if k.startswith(f"{checkpoint.name}/")
        } == local
    weights = [name for name in pushed if "/" not in name and name.endswith(".safetensors")]
    assert weights and all(pushed[n] == (result.checkpoints[-1] / n).read_bytes() for n in weights)


def test_checkpoint_pushes_the_latest_checkpoint_as_last_checkpoint(
    tmp_path: Path, fake_hub: FakeHub
) -> None:
    _, result = _run(
        tmp_path, hub_model_id="me/tiny", hub_strategy="checkpoint", save_strategy="steps", save_steps=2
    )
    last = result.checkpoints[-1]
    pushed = fake_hub.files("models/me/tiny")
    assert not any(name.startswith("checkpoint-") for name in pushed)
    local = {p.relative_to(last).as_posix(): p.read_bytes() for p in last.rglob("*") if p.is_file()}
    folder = {
        k.removeprefix("last-checkpoint/"): v for k, v in pushed.items() if k.startswith("last-checkpoint/")
    }
    assert folder == local  # the files of step 2 overwritten by those of step 4


def test_end_pushes_only_the_final_outputs(tmp_path: Path, fake_hub: FakeHub) -> None:
    cfg, _ = _run(
        tmp_path,
        hub_model_id="me/tiny",
        hub_strategy="end",
        save_strategy="steps",
        save_steps=2,
        hub_private_repo=False,
    )
    assert fake_hub.created == [
        {"name": "tiny", "organization": "me", "visibility": "public", "type": "model"}
    ]
    assert fake_hub.commits == []  # nothing at save time
    ckpt.save_model_weights(build_tiny_model(seed=0), tmp_path)  # stand-ins for the final outputs
    hub.ModelPusher(cfg).final(tmp_path)
    (where, _, files) = fake_hub.commits[-1]
    assert where == "models/me/tiny"
    local = {p.name for p in tmp_path.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert set(files) == local and not any(name.startswith("checkpoint-") for name in files)


def test_push_to_hub_false_pushes_nothing(tmp_path: Path, fake_hub: FakeHub) -> None:
    _run(tmp_path, hub_model_id="me/tiny", push_to_hub=False, save_strategy="steps", save_steps=2)
    assert fake_hub.created == [] and fake_hub.commits == []


def test_push_dataset_to_hub_uploads_the_prepared_folder(tmp_path: Path, fake_hub: FakeHub) -> None:
    folder = tmp_path / "prepared"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "data.arrow").write_bytes(b"\x01\x02rows")
    (folder / "report.json").write_text("{}")
    hub.push_dataset(make_cfg(tmp_path, push_dataset_to_hub="me/tiny-data"), folder)
    assert fake_hub.created[0]["type"] == "dataset" and fake_hub.created[0]["name"] == "tiny-data"
    assert fake_hub.files("datasets/me/tiny-data") == {
        "train/data.arrow": b"\x01\x02rows",
        "report.json": b"{}",
    }


def test_an_unreachable_hub_fails_before_training_naming_the_key(
    tmp_path: Path, online: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(hub.HubError, match=r"`hub_model_id: me/tiny`: could not create the repository"):
        _run(tmp_path, hub_model_id="me/tiny")
    assert not list(tmp_path.glob("checkpoint-*"))


def test_offline_mode_fails_naming_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubError, match=r"`push_dataset_to_hub: me/d`.*switched off"):
        hub.push_dataset(make_cfg(tmp_path, push_dataset_to_hub="me/d"), tmp_path)


def _codes(tmp_path: Path, extra: dict[str, Any]) -> set[str]:
    import yaml

    from hellbender.config.hardware import Hardware
    from hellbender.config.load import load_config

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"base_model": "org/m", "datasets": [{"path": "d.jsonl"}], **extra}))
    _, found = load_config(path, world_size=1, hardware=Hardware(), strict=False)
    return {f.code for f in found}


def test_hb183_hub_options_without_a_repository(tmp_path: Path) -> None:
    assert "HB183" in _codes(tmp_path, {"hub_strategy": "end"})
    assert "HB183" not in _codes(tmp_path, {"hub_strategy": "end", "hub_model_id": "me/m"})
    assert "HB183" not in _codes(tmp_path, {"hub_private_repo": False, "push_dataset_to_hub": "me/d"})
