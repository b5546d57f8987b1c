"""Resume ≡ straight: a run continued from a checkpoint reproduces the uninterrupted run exactly.

CPU, fp32: the same micro-batches in the same order, the same optimizer/scheduler state and the
same random stream (LoRA dropout draws from it) give bit-identical losses and weights, so every
comparison here is ``==`` / ``torch.equal``, not a tolerance.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from hellbender.config.hardware import Hardware
from hellbender.config.normalize import normalize
from hellbender.config.schema import HellbenderConfig
from hellbender.models.adapters import apply_adapter
from hellbender.testing.tiny import build_tiny_model
from hellbender.train import checkpoint as ckpt
from hellbender.train.loop import train

PAD = 3


def make_samples(n: int, seed: int) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(4, 320) for _ in range(rng.randrange(6, 24))]
        cut = rng.randrange(1, len(ids) - 2)
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def make_cfg(out: Path, **values: object) -> HellbenderConfig:
    raw = HellbenderConfig.model_validate(
        {
            "base_model": "x",
            "datasets": [{"path": "x"}],
            "bf16": False,
            "sequence_len": 48,
            "learning_rate": 5e-3,
            "warmup_steps": 2,
            "weight_decay": 0.01,
            "output_dir": str(out),
            "use_tensorboard": False,
            "save_strategy": "steps",
            **values,
        }
    )
    return normalize(raw, world_size=1, hardware=Hardware())[0]


def build(cfg: HellbenderConfig) -> torch.nn.Module:
    model = build_tiny_model(seed=0)
    torch.manual_seed(cfg.seed)  # LoRA initialisation, as run_train seeds before loading
    return apply_adapter(model, cfg)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


CASES = {
    # LoRA with dropout (the RNG state matters), packed rows, accumulation 2; resume at step 5 of 10.
    "lora_dropout_packed": (
        {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "lora_target_linear": True,
         "sample_packing": True, "micro_batch_size": 1, "gradient_accumulation_steps": 2, "max_steps": 10,
         "save_steps": 5},
        8, [5],
    ),
    # Full fine-tune over 2 epochs of 6 steps, AdamW + cosine; checkpoints in the middle of each epoch.
    "full_two_epochs_mid_epoch": (
        {"num_epochs": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "save_steps": 4},
        24, [4, 8],
    ),
    # fp16 with loss scaling (the GPU path, run here on CPU): the scaler's state is resumed too.
    "fp16_loss_scaling": (
        {"fp16": True, "micro_batch_size": 2, "max_steps": 6, "save_steps": 3},
        10, [3],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_resume_equals_straight(tmp_path: Path, case: str) -> None:
    values, n_samples, resume_steps = CASES[case]
    samples = make_samples(n_samples, seed=1)
    straight_dir = tmp_path / "straight"
    cfg = make_cfg(straight_dir, **values)
    torch.manual_seed(123)
    straight_model = build(cfg)
    straight = train(cfg, straight_model, samples, None, pad_token_id=PAD)
    final = trainable(straight_model)
    assert straight.global_step == straight.total_steps >= max(resume_steps) + 2

    for step in resume_steps:
        # A fresh output_dir holding only the checkpoint: as if the run had died right after it.
        out = tmp_path / f"resumed_{step}"
        shutil.copytree(straight_dir / f"checkpoint-{step}", out / f"checkpoint-{step}")
        resumed_cfg = make_cfg(out, **values)
        torch.manual_seed(999)  # a different process state before resuming must not matter
        model = build(resumed_cfg)
        resumed = train(
            resumed_cfg, model, samples, None, pad_token_id=PAD, resume_from=out / f"checkpoint-{step}"
        )
        assert resumed.resumed_from == out / f"checkpoint-{step}"
        assert list(resumed.losses) == list(range(step + 1, straight.total_steps + 1))
        assert resumed.losses == {k: v for k, v in straight.losses.items() if k > step}
        if values.get("fp16"):
            assert (out / f"checkpoint-{step}" / ckpt.SCALER_FILE).is_file()
        got = trainable(model)
        assert got.keys() == final.keys()
        for name in final:
            assert torch.equal(got[name], final[name]), name


def test_resume_refuses_a_different_plan(tmp_path: Path) -> None:
    samples = make_samples(8, seed=2)
    cfg = make_cfg(tmp_path, max_steps=4, save_steps=2)
    train(cfg, build_tiny_model(seed=0), samples, None, pad_token_id=PAD)
    longer = make_cfg(tmp_path, max_steps=6, save_steps=2)
    with pytest.raises(ValueError, match="cannot continue exactly"):
        train(
            longer,
            build_tiny_model(seed=0),
            samples,
            None,
            pad_token_id=PAD,
            resume_from=tmp_path / "checkpoint-2",
        )
    assert ckpt.find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
