"""``hellbender train``'s own path with fp8 and a torchao low-bit optimizer: the run trains, its
checkpoint (quantized optimizer state included) resumes exactly, the saved adapter loads back with
peft; and fp8 over two DDP ranks tracks one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hellbender.commands.train import run_train
from hellbender.config.hardware import Hardware
from hellbender.config.normalize import normalize
from hellbender.config.schema import HellbenderConfig, ResolvedConfig
from hellbender.testing.projects import write_tiny_project

pytest.importorskip("torchao")


def make_cfg(base_settings: dict[str, object], out: Path, **values: object) -> ResolvedConfig:
    raw = HellbenderConfig.model_validate(
        {
            **base_settings,
            "adapter": "lora",
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_target_linear": True,
            "learning_rate": 5e-2,
            "fp8": True,
            "optimizer": "adamw_torch_8bit",
            "max_steps": 6,
            "save_steps": 3,
            "val_set_size": 0,
            "output_dir": str(out),
            **values,
        }
    )
    return normalize(raw, world_size=1, hardware=Hardware())[0]


@pytest.mark.slow  # ~40 s idle (torchao compiles its update per parameter shape on the first step)
def test_fp8_with_a_torchao_optimizer_trains_and_resumes_exactly(
    base_settings: dict[str, object], tiny_assets: Path, tmp_path: Path
) -> None:
    straight = run_train(make_cfg(base_settings, tmp_path / "straight"))
    losses = [straight.losses[s] for s in sorted(straight.losses)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert checkpoint.is_dir()

    resumed = run_train(make_cfg(base_settings, tmp_path / "resumed", resume_from_checkpoint=str(checkpoint)))
    assert resumed.resumed_from is not None
    assert {s: resumed.losses[s] for s in (4, 5, 6)} == {s: straight.losses[s] for s in (4, 5, 6)}

    base = AutoModelForCausalLM.from_pretrained(tiny_assets / "model")
    PeftModel.from_pretrained(base, tmp_path / "straight")  # a plain peft adapter, no torchao types


def _losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.mark.slow
@pytest.mark.usefixtures("one_multi_rank_test_at_a_time")
def test_fp8_under_ddp_matches_one_process(tmp_path: Path) -> None:
    """``hellbender train --nproc-per-node 2`` (DDP, gloo) with fp8 against one process with 2
    accumulated micro-batches of 1 row: the same global batch, and the same fp8 casts (each
    micro-batch of one row is scaled on its own in both runs), so only the order of the gradient
    sum can differ. Measured here: identical losses; bound 1e-6 relative."""
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    settings = {"fp8": True, "max_steps": 4, "learning_rate": 0.01, "logging_steps": 1, "save_strategy": "no"}
    one = write_tiny_project(tmp_path / "one", gradient_accumulation_steps=2, **settings)
    two = write_tiny_project(tmp_path / "two", ddp_timeout=120, **settings)
    hb = [sys.executable, "-m", "hellbender", "train"]
    subprocess.run([*hb, str(one)], env=env, check=True, capture_output=True, timeout=600)
    subprocess.run(
        [*hb, str(two), "--nproc-per-node", "2"], env=env, check=True, capture_output=True, timeout=600
    )
    single, ddp = _losses(tmp_path / "one" / "out"), _losses(tmp_path / "two" / "out")
    assert sorted(single) == sorted(ddp) == [1, 2, 3, 4]
    assert max(abs(ddp[s] - single[s]) / single[s] for s in single) <= 1e-6
