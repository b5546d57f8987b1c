"""dataloader_num_workers / _prefetch_factor / _pin_memory: worker processes collate the training
steps; the batches, hence the losses and the weights, are those of in-process collation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
import yaml
from test_train_loop import PAD, make_cfg, make_samples

from hellbender.config.hardware import Hardware
from hellbender.config.load import load_config
from hellbender.testing.tiny import build_tiny_model
from hellbender.train import loop
from hellbender.train.loop import train


@pytest.mark.parametrize(("packing", "columnar"), [(False, False), (True, False), (False, True)])
def test_workers_train_exactly_what_in_process_collation_trains(
    tmp_path: Path, packing: bool, columnar: bool
) -> None:
    """columnar: a datasets.Dataset (what preparation gives), read by the workers."""
    rows = make_samples(14, seed=11)
    samples: Any = datasets.Dataset.from_list(rows) if columnar else rows
    common: dict[str, Any] = {
        "sample_packing": packing, "micro_batch_size": 1 if packing else 2, "gradient_accumulation_steps": 2,
        "num_epochs": 2, "learning_rate": 1e-2,
    }  # fmt: skip
    here = build_tiny_model(seed=5)
    plain = train(make_cfg(tmp_path / "a", **common), here, samples, None, pad_token_id=PAD)
    workers = build_tiny_model(seed=5)
    cfg = make_cfg(tmp_path / "b", dataloader_num_workers=2, dataloader_prefetch_factor=3, **common)
    spread = train(cfg, workers, samples, None, pad_token_id=PAD)
    assert len(plain.losses) >= 4
    assert spread.losses == plain.losses  # the very same floats: same batches, same order
    for (name, a), (_, b) in zip(here.state_dict().items(), workers.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_the_loader_gets_the_configured_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    real = torch.utils.data.DataLoader

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop.torch.utils.data, "DataLoader", spy)
    samples = make_samples(4, seed=1)
    train(make_cfg(tmp_path / "0"), build_tiny_model(seed=5), samples, None, pad_token_id=PAD)
    assert seen == []  # no workers: no loader, collated in-process
    cfg = make_cfg(tmp_path / "1", dataloader_num_workers=1, dataloader_prefetch_factor=2)
    train(cfg, build_tiny_model(seed=5), samples, None, pad_token_id=PAD)
    (kwargs,) = seen
    assert kwargs["num_workers"] == 1 and kwargs["prefetch_factor"] == 2
    assert kwargs["pin_memory"] is False  # CPU run: pinning would do nothing


def _codes(tmp_path: Path, extra: dict[str, Any], hw: Hardware) -> set[str]:
    data = {"base_model": "org/m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}], **extra}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    _, found = load_config(path, world_size=1, hardware=hw, strict=False)
    return {f.code for f in found if f.key is not None and f.key.startswith("dataloader_")}


def test_hb180_prefetch_without_workers(tmp_path: Path) -> None:
    assert "HB180" in _codes(tmp_path, {"dataloader_prefetch_factor": 2}, Hardware())
    quiet = {"dataloader_prefetch_factor": 2, "dataloader_num_workers": 2}
    assert "HB180" not in _codes(tmp_path, quiet, Hardware())


def test_hb181_pin_memory_on_cpu_is_noted(tmp_path: Path) -> None:
    cuda = Hardware(cuda=True, cuda_bf16=True, description="simulated A100")
    assert "HB181" in _codes(tmp_path, {"dataloader_pin_memory": True}, Hardware())
    assert "HB181" not in _codes(tmp_path, {"dataloader_pin_memory": True}, cuda)
    assert "HB181" not in _codes(tmp_path, {}, Hardware())  # the default is not the user's choice
