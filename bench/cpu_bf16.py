"""bf16 on CPU: autocast over fp32 weights vs weights stored in bf16 vs plain fp32.

Decides how :mod:`hellbender.train.loop` runs ``bf16`` on a CPU. Each variant times full
training steps (forward, backward, AdamW step) of a small random Llama, interleaved over several
rounds so background load on a shared machine hits all variants alike; the median is printed.

    OMP_NUM_THREADS=1 python bench/cpu_bf16.py [--hidden 256 --layers 4 --seq 256 --batch 4]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from hellbender.testing.tiny import build_tiny_model


def make(variant: str, args: argparse.Namespace, lora: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_tiny_model(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.seq,
    )
    if variant in ("bf16_weights", "bf16_base_autocast"):
        model = model.to(torch.bfloat16)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        if variant == "bf16_base_autocast":
            # Frozen base in bf16, trainable adapter in fp32 under autocast (the usual LoRA recipe).
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4, foreach=True)


def step_time(variant: str, model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    amp = variant in ("autocast", "bf16_base_autocast")
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx:
        logits = model(input_ids=ids, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--lora-only", action="store_true")
    args = ap.parse_args()
    args.modes = (True,) if args.lora_only else (False, True)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    print(f"threads {torch.get_num_threads()}, hidden {args.hidden}, layers {args.layers}, "
          f"seq {args.seq}, batch {args.batch}")
    for lora in args.modes:
        variants = ("fp32", "autocast", "bf16_weights") + (("bf16_base_autocast",) if lora else ())
        built = {v: make(v, args, lora) for v in variants}
        times: dict[str, list[float]] = {v: [] for v in variants}
        for v in variants:  # warm-up
            step_time(v, *built[v], ids)
        for _ in range(args.rounds):
            for v in variants:
                times[v].append(step_time(v, *built[v], ids))
        base = statistics.median(times["fp32"])
        for v in variants:
            med = statistics.median(times[v])
            tok = args.batch * args.seq / med
            print(
                f"{'lora' if lora else 'full'} {v:13s} {med * 1000:8.1f} ms/step {tok:8.0f} tok/s  "
                f"x{base / med:.2f} vs fp32"
            )


if __name__ == "__main__":
    main()
