"""hellbender's LoRA training step with and without each speed lever, in one process.

The work is bench/peers.py's (SmolLM2-135M-Instruct, LoRA r=8 on every linear layer, its 2,000
synthetic alpaca rows, packed into rows of ``--seq`` tokens, micro-batch 2 × accumulation 2,
``train_on_inputs: false``, bf16 autocast when the CPU has bf16). The model is built once by
hellbender's own ``model_to_train``; each variant then runs full optimizer steps (forward,
backward, AdamW) on the *same* micro-batches, variants interleaved round by round (each round
starting at another variant) so that load from other jobs and the order hit them alike.
Printed: the median step time per variant, positions/s, model FLOPs utilization against the
GEMM peak measured in the same process, and each variant's speed relative to ``before``.

The levers (each switched on the same model between steps):

* ``doc_attention``: one causal SDPA call per packed document (``sdpa_documents``) instead of
  SDPA with a dense (B, 1, L, L) document mask;
* ``trained_head``: the head and the softmax only on positions with a trained target
  (``logits_to_keep``) instead of full logits;
* ``no_lora_casts``: peft's LoRA layers take their bf16 input as it is instead of casting it to
  fp32 for autocast to cast it back (a no-op in fp32 runs).

Variants: ``before`` (all three off: hellbender as it was), ``after`` (all on: the default now),
``after`` minus one lever each (``-doc_attention``, …), and candidates that are *not* defaults,
on top of ``after``: ``+lora_kernels`` (the fused LoRA autograd functions), ``+chunked_loss``,
``+checkpointing`` (their config keys, applied with ``kernels.optimized``).

    OMP_NUM_THREADS=2 .venv/bin/python bench/train_step.py [--rounds 4 --seq 512 --profile after]

``--profile VARIANT`` prints torch.profiler's per-op self time of one step of that variant
(grouped by op, then by op and input shape).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

LEVERS = ("doc_attention", "trained_head", "no_lora_casts")
# Options that are not defaults, measured on top of ``after``: config keys → values.
CANDIDATES: dict[str, dict[str, Any]] = {
    "lora_kernels": {"lora_mlp_kernel": True, "lora_qkv_kernel": True, "lora_o_kernel": True},
    "chunked_loss": {"chunked_cross_entropy": True},
    "checkpointing": {"gradient_checkpointing": True},
}


def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` n×n matrix products in ``dtype`` (threads as set)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def linear_params(model: torch.nn.Module) -> int:
    """Parameters of the frozen Linear layers (lm_head included, LoRA adapters not)."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            total += module.weight.numel()
    return total


def config(work: Path, seq: int, rows: int, bf16: bool) -> Path:
    from hellbender.models.gguf import ensure_hf_folder
    from hellbender.models.load import find_smollm2_gguf
    from peers import common_yaml, write_data

    data, _ = write_data(work, rows)
    spec = {
        "model": str(ensure_hf_folder(find_smollm2_gguf())), "data": str(data), "seq": seq, "mbs": 2,
        "gas": 2, "steps": 1000, "lr": 2e-4, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "attn": "sdpa",
    }  # fmt: skip
    values = common_yaml(spec, "bf16" if bf16 else "fp32")
    values.update(output_dir=str(work / "out"), dataset_prepared_path=str(work / "prepared"))
    path = work / "config.yaml"
    path.write_text(json.dumps(values, indent=2) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4, help="steps per variant (after one warm-up)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument(
        "--variants",
        default=",".join(["before", "after", *(f"-{x}" for x in LEVERS), *(f"+{x}" for x in CANDIDATES)]),
    )
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--profile", default=None, help="print a per-op profile of one step of this variant")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()

    from peft.tuners.lora import LoraLayer

    from hellbender.commands.train import model_to_train
    from hellbender.config.hardware import detect_hardware
    from hellbender.config.load import load_config
    from hellbender.data.prepare import prepare_datasets
    from hellbender.kernels import describe, optimized, undo_optimizations
    from hellbender.kernels.loss import build_loss, causal_lm_loss_sum
    from hellbender.models.attention import DOCUMENT_SDPA, model_inputs, use_document_attention
    from hellbender.models.load import load_tokenizer
    from hellbender.train.loop import Forward, Samples, batching, rank_batches
    from hellbender.train.optim import build_optimizer

    bf16 = detect_hardware().cpu_bf16 if args.precision == "auto" else args.precision == "bf16"
    work = Path(args.work or tempfile.mkdtemp(prefix="hb-train-step-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg, _ = load_config(config(work, args.seq, args.rows, bf16))
    tokenizer = load_tokenizer(cfg)
    data = prepare_datasets(cfg, tokenizer)
    model = model_to_train(cfg, tokenizer)
    assert model.config._attn_implementation == DOCUMENT_SDPA, "per-document attention is not the default"
    # The config turns no option on (checked), so the model can be patched per variant instead.
    assert not describe(model), describe(model)
    undo_optimizations(model)
    optimizer = build_optimizer(cfg, model)
    forward = Forward.build(cfg, model)
    samples = Samples(data.train)
    sampler, collate = batching(samples, cfg, tokenizer.pad_token_id)
    micro_batches = list(sampler)
    group = cfg.gradient_accumulation_steps
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = gemm_peak(dtype)
    flops_per_position = 4 * linear_params(model)
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    plain_loss = build_loss("plain")

    def full_logits_loss(
        model: torch.nn.Module, inputs: Mapping[str, Any], labels: torch.Tensor
    ) -> torch.Tensor:
        logits = model(**inputs).logits
        return causal_lm_loss_sum(logits, labels.reshape(inputs["input_ids"].shape))

    def set_levers(on: set[str]) -> tuple[Callable[..., torch.Tensor], str]:
        if "doc_attention" not in on:
            model.set_attn_implementation("sdpa")
        elif model.config._attn_implementation == "sdpa":
            use_document_attention(model)
        for layer in lora_layers:
            layer.cast_input_dtype_enabled = "no_lora_casts" not in on
        loss_fn = plain_loss if "trained_head" in on else full_logits_loss
        return loss_fn, (DOCUMENT_SDPA if "doc_attention" in on else "sdpa")

    def levers_of(variant: str) -> set[str]:
        if variant == "before":
            return set()
        if variant == "after" or (variant.startswith("+") and variant[1:] in CANDIDATES):
            return set(LEVERS)
        if variant.startswith("-") and variant[1:] in LEVERS:
            return set(LEVERS) - {variant[1:]}
        raise SystemExit(
            f"unknown variant {variant!r}: before, after, -<lever> ({', '.join(LEVERS)}) "
            f"or +<candidate> ({', '.join(CANDIDATES)})"
        )

    def step(index: int, variant: str) -> tuple[float, int, int]:
        loss_fn, attn = set_levers(levers_of(variant))
        options = CANDIDATES.get(variant[1:], {}) if variant.startswith("+") else {}
        candidate = cfg
        if options:
            candidate = cfg.model_validate({**dict(cfg), **options})
            if candidate.chunked_cross_entropy:
                loss_fn = build_loss("chunked", num_chunks=candidate.chunked_cross_entropy_num_chunks)
        chosen = micro_batches[index * group : (index + 1) * group]
        batches = rank_batches(chosen, samples, collate, forward_world, torch.device("cpu"))
        positions = trained = 0
        with optimized(model, candidate) if options else contextlib.nullcontext():
            start = time.perf_counter()  # patching the model is not part of the step
            for batch in batches:
                with forward.autocast():
                    loss = loss_fn(model, model_inputs(batch, attn, dtype=dtype), batch["labels"])
                (loss / max(1, int(batch["num_trained_tokens"]))).backward()
                positions += batch["input_ids"].numel()
                trained += int(batch["num_trained_tokens"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start
        return seconds, positions, trained

    from hellbender.distributed.world import World

    forward_world = World()
    variants = args.variants.split(",")
    for v in variants:
        levers_of(v)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        step(0, args.profile)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step(1, args.profile)
        averages = prof.key_averages()
        print(averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=55))
        by_shape = prof.key_averages(group_by_input_shape=True)
        print(by_shape.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=40))
        return

    times: dict[str, list[float]] = {v: [] for v in variants}
    positions: dict[str, list[int]] = {v: [] for v in variants}
    for v in variants:  # warm-up: first-call allocations, oneDNN primitive caches
        step(0, v)
    for r in range(1, args.rounds + 1):
        # Each round starts at another variant: the allocator's and caches' state after the
        # previous step favours whichever runs later, and rotating spreads that over all.
        shift = (r - 1) % len(variants)
        for v in variants[shift:] + variants[:shift]:
            seconds, pos, _ = step(r, v)
            times[v].append(seconds)
            positions[v].append(pos)
    threads = torch.get_num_threads()
    print(
        f"{'bf16 autocast' if bf16 else 'fp32'}, {threads} threads, seq {args.seq}, micro-batch 2 × 2, "
        f"{args.rounds} steps per variant; GEMM peak {peak / 1e9:.0f} GFLOP/s; "
        f"{flops_per_position / 1e9:.3f} GFLOP per position (4 × {flops_per_position // 4:,} linear params)"
    )
    print(f"{'variant':18s} {'median s/step':>13s} {'positions/s':>12s} {'MFU':>6s} {'vs before':>10s}")
    base = statistics.median(times["before"]) if "before" in times else None
    for v in variants:
        median = statistics.median(times[v])
        rate = statistics.mean(positions[v]) / median
        mfu = rate * flops_per_position / peak
        ratio = f"×{base / median:.2f}" if base else ""
        print(f"{v:18s} {median:13.2f} {rate:12.1f} {mfu:6.1%} {ratio:>10s}")


if __name__ == "__main__":
    main()
