"""The commands end to end through click: train, evaluate, merge-lora, inference; a diverging run.

A tiny random Llama folder and a tiny jsonl dataset; every answer is checked against plain
transformers / peft computed in the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from hellbender.cli import main
from hellbender.train import checkpoint as ckpt

ENV: dict[str, str | None] = {"PYTORCH_ALLOC_CONF": None, "PYTORCH_CUDA_ALLOC_CONF": None, "WORLD_SIZE": "1"}


def invoke(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=ENV, input=stdin, catch_exceptions=False)


@pytest.fixture(scope="module")
def project(tiny_assets: Path, base_settings: dict[str, object]) -> Path:
    """The shared assets plus ``cfg.yaml`` (a short LoRA run), trained once through the CLI into ``out/``."""
    root = tiny_assets
    config = {
        **base_settings,
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_target_linear": True,
        "learning_rate": 0.05,
        "max_steps": 8,
        "save_steps": 4,
        "output_dir": str(root / "out"),
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(config))
    result = invoke("train", str(root / "cfg.yaml"))
    assert result.exit_code == 0, result.output
    assert "trained 8/8 steps" in result.stdout
    return root


def plain_adapter_model(project: Path) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(str(project / "model"), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(project / "out")).eval()


def greedy_answer(model: torch.nn.Module, tokenizer: object, prompt: str, n: int) -> str:
    enc = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # type: ignore[attr-defined]
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)  # type: ignore[attr-defined]


def test_train_wrote_the_outputs(project: Path) -> None:
    out = project / "out"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
                 "config.resolved.yaml", "metrics.jsonl", "loss.png"):  # fmt: skip
        assert (out / name).is_file(), name
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-8"]


def test_evaluate_prints_the_metrics(project: Path) -> None:
    result = invoke("evaluate", str(project / "cfg.yaml"))
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    final_eval = [json.loads(line) for line in (project / "out/metrics.jsonl").read_text().splitlines()]
    last = [r for r in final_eval if "eval_loss" in r][-1]
    assert metrics["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-5)
    assert metrics["eval_ppl"] == pytest.approx(torch.tensor(last["eval_loss"]).exp().item(), rel=1e-5)


def test_merge_lora_writes_a_plain_model(project: Path, tmp_path: Path) -> None:
    result = invoke("merge-lora", str(project / "cfg.yaml"), "--out", str(tmp_path / "merged"))
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    ids = torch.tensor([[5, 9, 40, 77, 12]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, plain_adapter_model(project)(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def test_inference_streams_the_greedy_answer(project: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(project / "out"))
    model = plain_adapter_model(project)
    expected = greedy_answer(model, tokenizer, "Say hello.", 6)
    result = invoke("inference", str(project / "cfg.yaml"), "--prompt", "Say hello.", "--max-new-tokens", "6")
    assert result.exit_code == 0, result.output
    assert expected.strip() and expected in result.stdout

    # Without --prompt: every line of stdin is a prompt.
    prompts = ["Count to three.", "Is it true?"]
    result = invoke("inference", str(project / "cfg.yaml"), "--max-new-tokens", "6", stdin="\n".join(prompts) + "\n")
    assert result.exit_code == 0, result.output
    position = 0
    for prompt in prompts:
        answer = greedy_answer(model, tokenizer, prompt, 6)
        position = result.stdout.index(answer, position) + len(answer)


def test_diverging_run_exits_1_and_keeps_the_last_checkpoint(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "nan"
    result = invoke(
        "train", str(project / "cfg.yaml"), f"output_dir={out}", "optimizer=sgd", "learning_rate=1e30",
        "max_grad_norm=null", "save_steps=1",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "ERROR: training stopped: the loss is" in result.stderr
    latest = ckpt.find_latest_checkpoint(out)
    assert latest is not None
    step = int(result.stderr.split(" at step ")[1].split(".")[0].split()[0])
    assert latest.name == f"checkpoint-{step - 1}"
    base = AutoModelForCausalLM.from_pretrained(str(project / "model"))
    PeftModel.from_pretrained(base, str(latest))  # the last good adapter loads


def test_a_second_run_into_the_same_output_dir_needs_auto_resume(project: Path) -> None:
    result = invoke("train", str(project / "cfg.yaml"))
    assert result.exit_code == 1
    assert "already holds checkpoints of an earlier run (checkpoint-4, checkpoint-8)" in result.stderr
    # Continuing the finished run resumes at its last checkpoint: nothing left to do.
    result = invoke("train", str(project / "cfg.yaml"), "auto_resume_from_checkpoints=true")
    assert result.exit_code == 0, result.output
    assert "trained 8/8 steps" in result.stdout and "resuming from" in result.stderr
