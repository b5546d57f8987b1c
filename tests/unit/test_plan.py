"""The memory planner's parts, each against the thing it predicts, computed in the same test.

* parameter counts: the model of each family instantiated on the meta device;
* the GGUF header: the shape read from the HF folder the GGUF was written from;
* activations: every byte autograd saves in a real forward (``saved_storage_bytes``), for full
  fine-tuning, LoRA, gradient checkpointing and TiledMLP, fp32 and bf16 autocast;
* sharding: the per-rank split for DDP, FSDP2 and ZeRO 1/2/3;
* ``--fit``: the proposed change, re-predicted, is under the budget, keeps the global batch, and
  never turns LoRA into QLoRA unless allowed.

How close the whole prediction comes to a real run's peak resident set is measured by
bench/plan_accuracy.py (docs/memory.md), not here: a unit test cannot own a process's RSS.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM

from hellbender.cli import main
from hellbender.kernels import apply_optimizations
from hellbender.model_files import read_model_config
from hellbender.models.adapters import apply_adapter
from hellbender.plan.estimate import layer_activation_bytes, predict, sharding
from hellbender.plan.fit import _candidates, fit, resolved_with
from hellbender.plan.shapes import PlanModelError, model_shape
from hellbender.testing.configs import resolved_config
from hellbender.testing.probes import saved_storage_bytes
from hellbender.testing.tiny import build_tiny_model, build_tiny_tokenizer, tiny_llama_config, write_tiny_gguf

DATA = [{"path": "x.jsonl", "type": "alpaca"}]
WIDTHS = dict(
    vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4
)


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("llama", {"num_key_value_heads": 2, "tie_word_embeddings": False}),
        ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True, "attention_bias": True}),
        ("mistral", {"num_key_value_heads": 2}),
        ("qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
        ("qwen3", {"num_key_value_heads": 2, "head_dim": 32}),
        ("gemma", {"num_key_value_heads": 1, "head_dim": 16}),
        ("gemma2", {"num_key_value_heads": 2, "head_dim": 16}),
        ("gemma3_text", {"num_key_value_heads": 2, "head_dim": 16}),
    ],
)
def test_parameter_count_equals_the_model_on_the_meta_device(model_type: str, extra: dict[str, Any]) -> None:
    config = AutoConfig.for_model(model_type, **WIDTHS, **extra)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    exact = sum(p.numel() for p in model.parameters())
    assert model_shape(config.to_dict()).total_params == exact


def test_an_unmodelled_family_is_refused_by_name() -> None:
    with pytest.raises(PlanModelError, match="'mixtral'"):
        model_shape({"model_type": "mixtral", "hidden_size": 8})


def test_the_gguf_header_gives_the_shape_of_the_folder(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    for tied in (False, True):
        model = build_tiny_model(tie_word_embeddings=tied)
        gguf = write_tiny_gguf(tmp_path / f"tiny-{tied}.gguf", model, tokenizer)
        from_header = read_model_config(str(gguf))
        assert from_header is not None
        assert model_shape(from_header) == model_shape(model.config.to_dict())
        assert model_shape(from_header).total_params == sum(p.numel() for p in model.parameters())


def _saved_bytes_per_layer(
    tokens: int, *, autocast: bool = False, mask: bool = False, **options: Any
) -> float:
    """What autograd saves for one decoder layer: a 2-layer minus a 1-layer model (the embedding,
    the final norm and the rotary tables cancel)."""
    cfg = resolved_config(base_model="x", datasets=DATA, **options)
    saved = []
    for layers in (1, 2):
        model = build_tiny_model(num_hidden_layers=layers, hidden_size=64, intermediate_size=160,
                                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        model.config._attn_implementation = "sdpa"
        model = apply_adapter(model, cfg)
        apply_optimizations(model, cfg)
        model.train()
        ids = torch.randint(0, 320, (1, tokens), generator=torch.Generator().manual_seed(0))
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        # hellbender's document-causal mask, as models.attention.model_inputs gives SDPA
        dense = torch.ones(tokens, tokens, dtype=torch.bool).tril()[None, None] if mask else None
        with saved_storage_bytes(model) as seen, amp:
            model(input_ids=ids, attention_mask=dense, use_cache=False)
        saved.append(sum(seen.values()))
    return float(saved[1] - saved[0])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"adapter": "lora", "lora_r": 8, "lora_target_linear": True},
        {"adapter": "lora", "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"]},
        {"tiled_mlp": True},
    ],
    ids=["full", "lora-all-linear", "lora-qv", "tiled-mlp"],
)
def test_activation_bytes_per_layer_equal_what_autograd_saves(options: dict[str, Any]) -> None:
    tokens = 48
    cfg = resolved_config(base_model="x", datasets=DATA, **options)
    shape = model_shape(tiny_llama_config(hidden_size=64, intermediate_size=160).to_dict())
    lora = cfg.adapter is not None
    for mask in (False, True):
        cfg = resolved_config(base_model="x", datasets=DATA, sequence_len=tokens, **options)
        predicted = layer_activation_bytes(shape, cfg, False, tokens, lora, dense_mask=mask)
        saved = _saved_bytes_per_layer(tokens, mask=mask, **options)
        if cfg.lora_target_linear or not lora:
            assert predicted == saved, mask
        else:  # a subset of the linears: within 3% (see layer_activation_bytes)
            assert predicted == pytest.approx(saved, rel=0.03), mask


def test_bf16_autocast_activations_and_weight_copies_equal_what_autograd_saves() -> None:
    """Under autocast, matmul outputs are bf16 and every fp32 weight gets a bf16 copy, cached by
    autocast for the forward and saved for the backward: both are in the prediction."""
    tokens = 40
    cfg = resolved_config(base_model="x", datasets=DATA)
    shape = model_shape(tiny_llama_config(hidden_size=64, intermediate_size=160).to_dict())
    predicted = layer_activation_bytes(shape, cfg, True, tokens, False, dense_mask=False)
    predicted += 2 * shape.layer_linear_params()
    assert predicted == _saved_bytes_per_layer(tokens, autocast=True)


def test_checkpointing_keeps_one_hidden_state_per_layer() -> None:
    tokens = 32
    saved = _saved_bytes_per_layer(tokens, gradient_checkpointing=True)
    assert saved == tokens * 64 * 4
    cfg = resolved_config(base_model="x", datasets=DATA, gradient_checkpointing=True, sequence_len=tokens)
    shape = model_shape(
        tiny_llama_config(hidden_size=64, intermediate_size=160, num_hidden_layers=2).to_dict()
    )
    plan = predict(shape, cfg)
    assert {c.name: c.bytes for c in plan.components}["activations"] == 2 * saved


def test_sharding_per_strategy(tmp_path: Path) -> None:
    common: dict[str, Any] = {"base_model": "x", "datasets": DATA}
    assert sharding(resolved_config(**common)).weights == 1
    zero = tmp_path / "z.json"
    for stage, expected in [(1, (1, 1, 4)), (2, (1, 4, 4)), (3, (4, 4, 4))]:
        zero.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
        cfg = resolved_config(**common, deepspeed=str(zero), world_size=4, distributed_strategy="deepspeed",
                              data_parallel_size=4)  # fmt: skip
        split = sharding(cfg)
        assert (split.weights, split.gradients, split.optimizer) == expected
    fsdp = resolved_config(**common, world_size=2, distributed_strategy="fsdp2", data_parallel_size=2)
    assert (sharding(fsdp).weights, sharding(fsdp).optimizer) == (2, 2)
    ddp = resolved_config(**common, world_size=2, distributed_strategy="ddp", data_parallel_size=2)
    assert sharding(ddp).weights == 1 and sharding(ddp).grad_buckets


def test_the_peak_is_the_largest_phase_and_each_option_lowers_it() -> None:
    shape = model_shape(AutoConfig.for_model("llama", **WIDTHS).to_dict())
    base: dict[str, Any] = {"base_model": "x", "datasets": DATA, "sequence_len": 2048}
    plain = predict(shape, resolved_config(**base))
    assert plain.peak_bytes == max(plain.phase_bytes(p) for p in ("load", "forward", "backward", "optimizer"))
    options: list[dict[str, Any]] = [
        {"gradient_checkpointing": True},
        {"chunked_cross_entropy": True},
        {"optimizer": "adamw_8bit"},
    ]
    for option in options:
        assert predict(shape, resolved_config(**base, **option)).peak_bytes < plain.peak_bytes, option


def test_fit_keeps_the_global_batch_and_fits_the_budget() -> None:
    shape = model_shape(AutoConfig.for_model("llama", **{**WIDTHS, "num_hidden_layers": 8}).to_dict())
    cfg = resolved_config(base_model="x", datasets=DATA, sequence_len=2048, micro_batch_size=4,
                          gradient_accumulation_steps=2)  # fmt: skip
    before = predict(shape, cfg).peak_bytes
    budget = int(before * 0.7)  # the floor of the candidates is ~0.63 × before
    found = fit(shape, cfg, budget)
    assert found is not None and found.changes
    after = resolved_with(cfg, found.changes)
    assert predict(shape, after).peak_bytes <= budget
    assert after.micro_batch_size * after.gradient_accumulation_steps == 8
    assert not found.changes_learning and "adapter" not in found.changes
    # Nothing fits an impossible budget (the runtime alone is larger).
    assert fit(shape, cfg, 1) is None


def test_fit_proposes_qlora_only_when_allowed() -> None:
    """On a GPU a 4-bit base saves its weights' memory; it is proposed only when allowed. (On a
    CPU bitsandbytes dequantizes every weight for each matmul and glibc keeps those blocks: QLoRA
    was measured to save nothing there, and the plan says so.)"""
    shape = model_shape(
        AutoConfig.for_model("llama", **{**WIDTHS, "hidden_size": 256, "vocab_size": 320}).to_dict()
    )
    cfg = resolved_config(
        base_model="x", datasets=DATA, adapter="lora", lora_target_linear=True, sequence_len=64
    )
    floor = min(
        predict(shape, resolved_with(cfg, c), target="cuda").peak_bytes
        for c, _, _ in _candidates(cfg, "cuda", 1, False)
    )
    assert fit(shape, cfg, floor - 1, target="cuda") is None
    allowed = fit(shape, cfg, floor - 1, target="cuda", allow_quantized_base=True)
    assert allowed is not None and allowed.changes_learning and allowed.changes["adapter"] == "qlora"


def _project(tmp_path: Path, **settings: Any) -> Path:
    from hellbender.testing.projects import write_tiny_project

    return write_tiny_project(tmp_path, **settings)


def test_cli_json_and_the_gpu_target(tmp_path: Path) -> None:
    config = _project(tmp_path, sequence_len=256)
    runner = CliRunner()
    cpu = runner.invoke(main, ["plan", str(config), "--json"])
    assert cpu.exit_code == 0, cpu.output
    report = json.loads(cpu.output)
    assert report["peak_bytes"] == max(report["phases"].values())
    assert report["components"]["runtime"] > 0 and "cuda context" not in report["components"]
    gpu = runner.invoke(main, ["plan", str(config), "--json", "--device", "h100-80gb"])
    assert gpu.exit_code == 0, gpu.output
    assert "cuda context" in json.loads(gpu.output)["components"]
    assert json.loads(gpu.output)["device_memory_bytes"] == 80 * 2**30
    text = runner.invoke(main, ["plan", str(config)])
    assert text.exit_code == 0 and "peak:" in text.output and "activations" in text.output
    bad = runner.invoke(main, ["plan", str(config), "--device", "tpu"])
    assert bad.exit_code != 0


def test_cli_fit_write_changes_the_file_and_keeps_comments(tmp_path: Path) -> None:
    config = _project(tmp_path, sequence_len=512, micro_batch_size=4, gradient_accumulation_steps=1)
    config.write_text("# my run\n" + config.read_text())
    runner = CliRunner()
    before = json.loads(runner.invoke(main, ["plan", str(config), "--json"]).output)["peak_bytes"]
    components = json.loads(runner.invoke(main, ["plan", str(config), "--json"]).output)["components"]
    fixed = components["runtime"] + components["torch kernels and workspaces"]
    budget = fixed + (before - fixed) // 2  # half of what training adds to the runtime
    # The default margin keeps 10% of the budget free (the plan's measured error, docs/memory.md):
    # a budget the config meets exactly needs no change with --margin 0, and a change without.
    exact = ["plan", str(config), "--fit", f"{before / 2**20 + 1:.0f}MiB", "--json"]
    assert json.loads(runner.invoke(main, [*exact, "--margin", "0"]).output)["changes"] == {}
    kept_free = json.loads(runner.invoke(main, exact).output)
    assert not kept_free["fits"] or kept_free["changes"]
    fit_args = ["plan", str(config), "--fit", f"{budget / 2**20:.0f}MiB", "--margin", "0", "--write"]
    result = runner.invoke(main, fit_args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    text = config.read_text()
    assert text.startswith("# my run\n")
    changed = yaml.safe_load(text)
    assert changed["micro_batch_size"] * changed.get("gradient_accumulation_steps", 1) == 4
    after = json.loads(runner.invoke(main, ["plan", str(config), "--json"]).output)["peak_bytes"]
    assert after <= budget + 2**20  # the budget was rounded to MiB on the command line


def test_a_run_logs_the_same_prediction_as_the_command_and_its_measured_peak(tmp_path: Path) -> None:
    """The last metrics.jsonl record of every run holds ``predicted_peak_bytes`` (the very number
    `hellbender plan` prints for the config) and ``measured_peak_bytes`` (the process's peak)."""
    from hellbender.train.metrics import read_metrics

    config = _project(tmp_path, max_steps=2, save_strategy="no")
    runner = CliRunner()
    planned = json.loads(runner.invoke(main, ["plan", str(config), "--json"]).output)
    trained = runner.invoke(main, ["train", str(config)])
    assert trained.exit_code == 0, trained.output
    last = read_metrics(tmp_path / "out" / "metrics.jsonl")[-1]
    assert last["step"] == 2
    assert last["predicted_peak_bytes"] == planned["peak_bytes"]
    assert last["measured_peak_bytes"] > 0
