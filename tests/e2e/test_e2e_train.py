"""End to end on a tiny random Llama folder: full fine-tune, LoRA and QLoRA through ``run_train``.

Each run overfits a handful of alpaca rows for 20 steps (CPU, fp32) and must lower the loss; the
outputs must load back with plain transformers / peft, give the same numbers as hellbender's own
loader, and a merged LoRA must compute the same logits as base + adapter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from hellbender.commands.evaluate import run_evaluate
from hellbender.commands.merge_lora import run_merge_lora
from hellbender.commands.train import run_train
from hellbender.commands.trained import load_for_use, trained_source
from hellbender.config.hardware import Hardware
from hellbender.config.normalize import normalize
from hellbender.config.schema import HellbenderConfig, ResolvedConfig
from hellbender.train.metrics import read_metrics

ADAPTERS: dict[str, dict[str, object]] = {
    "full": {"learning_rate": 1e-2},
    "lora": {"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True,
             "learning_rate": 5e-2},
    "qlora": {"adapter": "qlora", "load_in_4bit": True, "lora_r": 16, "lora_alpha": 32,
              "lora_target_linear": True, "learning_rate": 5e-2},
}  # fmt: skip


def make_cfg(base_settings: dict[str, object], out: Path, **values: object) -> ResolvedConfig:
    # micro_batch_size 2 (from base_settings) takes the whole packed training set every step, so
    # the losses of successive steps are comparable.
    raw = HellbenderConfig.model_validate(
        {
            **base_settings,
            "max_steps": 20,
            "warmup_steps": 2,
            "eval_steps": 10,
            "save_steps": 10,
            "output_dir": str(out),
            **values,
        }
    )
    return normalize(raw, world_size=1, hardware=Hardware())[0]


@pytest.fixture(scope="module")
def runs(
    base_settings: dict[str, object], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[ResolvedConfig, object]]:
    """Train each kind once; the tests below inspect the results."""
    done = {}
    for kind, values in ADAPTERS.items():
        cfg = make_cfg(base_settings, tmp_path_factory.mktemp(kind), **values)
        done[kind] = (cfg, run_train(cfg))
    return done


def sample_ids(tiny_assets: Path) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(str(tiny_assets / "model"))
    return tok("Name the color of the sky. The sky is blue.", return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_training_lowers_the_loss(runs: dict, kind: str) -> None:
    cfg, result = runs[kind]
    assert result.global_step == result.total_steps == 20
    first, last = result.losses[1], result.losses[20]
    assert last < first - 0.5, (first, last)
    out = Path(cfg.output_dir)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 21))
    assert all(r["trained_tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in records if "loss" in r)
    assert [r["step"] for r in records if "eval_loss" in r] == [10, 20]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert ResolvedConfig.model_validate(resolved).compute_dtype == "float32"  # the whole resolved config
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-10", "checkpoint-20"]


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_outputs_load_back(runs: dict, tiny_assets: Path, kind: str) -> None:
    cfg, result = runs[kind]
    out = Path(cfg.output_dir)
    AutoTokenizer.from_pretrained(str(out))
    ids = sample_ids(tiny_assets)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_assets / "model"), dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        if kind == "full":
            plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        else:
            assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
            plain = PeftModel.from_pretrained(base, str(out))
        plain_logits = plain(input_ids=ids).logits
        assert not torch.allclose(plain_logits, base_logits, atol=1e-3)  # training changed the model
        if kind != "qlora":  # hellbender's loader gives the same model (QLoRA's base is 4-bit there)
            ours, _ = load_for_use(trained_source(cfg))
            torch.testing.assert_close(ours(input_ids=ids).logits, plain_logits, rtol=1e-5, atol=1e-5)
    # `evaluate` on the saved result reproduces the last evaluation of the training run.
    assert run_evaluate(cfg)["eval_loss"] == pytest.approx(result.evals[20]["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_merge_equals_adapter(runs: dict, tiny_assets: Path, kind: str, tmp_path: Path) -> None:
    cfg, _ = runs[kind]
    merged_dir = run_merge_lora(cfg, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(str(tiny_assets / "model"), dtype=torch.float32)
    adapter = PeftModel.from_pretrained(base, cfg.output_dir)
    ids = sample_ids(tiny_assets)
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, adapter(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )


def test_merge_refuses_a_full_fine_tune(runs: dict) -> None:
    cfg, _ = runs["full"]
    with pytest.raises(ValueError, match="no adapter"):
        run_merge_lora(cfg)
