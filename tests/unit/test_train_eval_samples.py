"""eval_table_size / eval_max_new_tokens: greedy generations for eval prompts at each evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from test_train_loop import PAD, make_cfg, make_samples

from hellbender.config.hardware import Hardware
from hellbender.config.load import load_config
from hellbender.testing.tiny import build_tiny_model, build_tiny_tokenizer
from hellbender.train.loop import train


def greedy(model: torch.nn.Module, prompt: list[int], new: int) -> list[int]:
    """Reference: argmax of the last position, appended, ``new`` times (no cache, no generate())."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt) :]


def prompt_of(sample: dict[str, list[int]]) -> list[int]:
    first = next(i for i, label in enumerate(sample["labels"]) if label != -100)
    return sample["input_ids"][:first]


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_evaluation_writes_its_table_of_greedy_generations(tmp_path: Path) -> None:
    samples, evals = make_samples(8, seed=1), make_samples(5, seed=2)
    cfg = make_cfg(tmp_path, evals_per_epoch=2, eval_table_size=3, eval_max_new_tokens=4, learning_rate=1e-3)
    model = build_tiny_model(seed=3)
    result = train(cfg, model, samples, evals, pad_token_id=PAD)
    assert sorted(result.evals) == [4, 8]
    written = sorted(p.name for p in tmp_path.glob("eval_samples_step*.jsonl"))
    assert written == ["eval_samples_step4.jsonl", "eval_samples_step8.jsonl"]
    last = read(tmp_path / "eval_samples_step8.jsonl")
    assert [r["eval_row"] for r in last] == [0, 1, 2]
    assert [r["prompt_ids"] for r in last] == [prompt_of(s) for s in evals[:3]]
    assert [r["reference_ids"] for r in last] == [[t for t in s["labels"] if t != -100] for s in evals[:3]]
    model.eval()  # the model after the last step is what generated the last table
    assert [r["completion_ids"] for r in last] == [greedy(model, prompt_of(s), 4) for s in evals[:3]]
    first = read(tmp_path / "eval_samples_step4.jsonl")
    assert len(first) == 3 and all(len(r["completion_ids"]) == 4 for r in first)


def test_without_eval_table_size_nothing_is_generated(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, evals_per_epoch=1)
    train(cfg, build_tiny_model(seed=3), make_samples(4, seed=1), make_samples(3, seed=2), pad_token_id=PAD)
    assert not list(tmp_path.glob("eval_samples_step*.jsonl"))


def test_the_table_is_decoded_with_the_tokenizer_and_caps_at_the_eval_rows(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    evals = make_samples(2, seed=2)
    cfg = make_cfg(tmp_path, eval_table_size=10, eval_max_new_tokens=3, learning_rate=1e-3)
    train(
        cfg, build_tiny_model(seed=3), make_samples(3, seed=1), evals, pad_token_id=PAD, tokenizer=tokenizer
    )
    (table,) = tmp_path.glob("eval_samples_step*.jsonl")
    rows = read(table)
    assert len(rows) == 2  # every eval row there is, not 10
    for row, sample in zip(rows, evals, strict=True):
        assert row["prompt"] == tokenizer.decode(prompt_of(sample))
        assert row["completion"] == tokenizer.decode(row["completion_ids"], skip_special_tokens=True)
        # generation stops at the tokenizer's eos; otherwise it runs the full budget
        eos = tokenizer.eos_token_id
        ids = row["completion_ids"]
        assert len(ids) == 3 or ids[-1] == eos


def _findings(tmp_path: Path, extra: dict[str, Any], world: int = 1) -> set[str]:
    data = {"base_model": "org/m", "datasets": [{"path": "d.jsonl", "type": "alpaca"}], **extra}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    _, found = load_config(path, world_size=world, hardware=Hardware(), strict=False)
    return {f.code for f in found if f.key == "eval_table_size"}


def test_hb184_sample_generations_without_evaluation_data(tmp_path: Path) -> None:
    assert "HB184" in _findings(tmp_path, {"eval_table_size": 2})
    assert "HB184" not in _findings(tmp_path, {"eval_table_size": 2, "val_set_size": 0.1})
    assert "HB184" not in _findings(tmp_path, {"eval_table_size": 0})


def test_hb182_sample_generations_refused_for_a_sharded_model(tmp_path: Path) -> None:
    fsdp = {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}}
    assert "HB182" in _findings(tmp_path, {"eval_table_size": 2, **fsdp}, world=2)
    assert "HB182" not in _findings(tmp_path, {"eval_table_size": 2}, world=2)  # DDP: rank 0 has it all
    assert "HB182" not in _findings(tmp_path, {"eval_table_size": 0, **fsdp}, world=2)


def test_a_training_run_decodes_its_table_with_the_run_tokenizer(tmp_path: Path) -> None:
    """Through ``run_train``: the prompts are the alpaca prompts of the eval rows, as text."""
    from hellbender.commands.train import run_train
    from hellbender.testing.projects import REPEAT_ROWS, write_tiny_project

    path = write_tiny_project(
        tmp_path, REPEAT_ROWS * 2, val_set_size=0.25, max_steps=2, eval_table_size=2, eval_max_new_tokens=2
    )
    cfg, _ = load_config(path, world_size=1)
    run_train(cfg)
    rows = read(tmp_path / "out" / "eval_samples_step2.jsonl")
    assert len(rows) == 2
    for row in rows:
        assert row["prompt"].startswith("Below is an instruction") and "Repeat " in row["prompt"]
        assert row["reference"].rstrip(".").split()[0] in row["prompt"]  # "w w." answers "Repeat w."
        assert 1 <= len(row["completion_ids"]) <= 2
