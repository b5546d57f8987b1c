"""Sample generations at evaluation (``eval_table_size`` / ``eval_max_new_tokens``).

At each evaluation the first ``eval_table_size`` evaluation rows are split into their prompt (the
tokens before the first trained label) and their reference (the trained tokens after it); the
model continues each prompt greedily for up to ``eval_max_new_tokens`` tokens, and the table goes
to ``output_dir/eval_samples_step<N>.jsonl``, one JSON object per prompt. Greedy decoding makes
the table reproducible; one prompt at a time avoids padding (and left-padding conventions) entirely.
Only the main rank generates (the model must be whole there: see rule HB182).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hellbender.data.tokenize import IGNORE_INDEX

SAMPLES_FILE = "eval_samples_step{step}.jsonl"


@dataclass(frozen=True)
class EvalPrompt:
    index: int  # row of the evaluation set
    prompt: list[int]
    reference: list[int]


def eval_prompts(rows: Iterable[Mapping[str, Any]], count: int) -> list[EvalPrompt]:
    """The first ``count`` rows that have a prompt and a trained part, split at the first trained label."""
    out: list[EvalPrompt] = []
    for index, row in enumerate(rows):
        if len(out) >= count:
            break
        ids, labels = [int(t) for t in row["input_ids"]], [int(t) for t in row["labels"]]
        first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if first is None or first == 0:
            continue  # nothing to continue from (or nothing the model was meant to say)
        out.append(EvalPrompt(index, ids[:first], [t for t in labels[first:] if t != IGNORE_INDEX]))
    return out


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[EvalPrompt],
    *,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | None = None,
    autocast: AbstractContextManager[Any] | None = None,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (new tokens only), the model left in its training mode."""
    lm: Any = model  # generate(): transformers' GenerationMixin or peft's wrapper, which nn.Module is not
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for item in prompts:
            ids = torch.tensor([item.prompt], dtype=torch.long, device=device)
            with autocast if autocast is not None else nullcontext():
                generated = lm.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_token_id,
                    eos_token_id=eos_token_id,
                )
            out.append([int(t) for t in generated[0, ids.shape[1] :]])
    finally:
        model.train(was_training)
    return out


def write_samples(
    output_dir: Path,
    step: int,
    prompts: Sequence[EvalPrompt],
    completions: Sequence[Sequence[int]],
    tokenizer: Any | None = None,
) -> Path:
    """Write the table: per prompt its row, token ids and (with a tokenizer) texts."""
    path = output_dir / SAMPLES_FILE.format(step=step)
    output_dir.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item, completion in zip(prompts, completions, strict=True):
            record: dict[str, Any] = {
                "step": step,
                "eval_row": item.index,
                "prompt_ids": item.prompt,
                "completion_ids": list(completion),
                "reference_ids": item.reference,
            }
            if tokenizer is not None:
                record["prompt"] = tokenizer.decode(item.prompt)
                record["completion"] = tokenizer.decode(list(completion), skip_special_tokens=True)
                record["reference"] = tokenizer.decode(item.reference, skip_special_tokens=True)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
