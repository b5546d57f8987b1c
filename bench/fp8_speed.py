"""Step time of ``fp8: true`` (torchao Float8Linear) against fp32, eager and with torch_compile.

A tiny random Llama widened to hidden 512 / intermediate 1024 (so the matmuls dominate), forward +
backward on 2 rows of 256 tokens, 4 steps per configuration (the first pays torch.compile's
compile; the time is the median of the other three), one thread. It prints each configuration's
median step time, first step time and first loss (fp8 moves it in the third decimal).

    python bench/fp8_speed.py
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any

import torch

from hellbender.kernels import apply_optimizations
from hellbender.testing.configs import loss_sum, resolved_config
from hellbender.testing.tiny import build_tiny_model

CONFIGS: list[dict[str, Any]] = [
    {},
    {"fp8": True},
    {"torch_compile": True},
    {"fp8": True, "torch_compile": True},
]


def run(options: dict[str, Any], steps: int = 4) -> tuple[float, float, float]:
    model = build_tiny_model(
        hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4, seed=0
    )
    cfg = resolved_config(base_model="x", datasets=[{"path": "x"}], **options)
    apply_optimizations(model, cfg)
    ids = torch.randint(4, 320, (2, 256), generator=torch.Generator().manual_seed(0))
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = loss_sum(model, {"input_ids": ids}, ids, cfg) / ids.numel()
        loss.backward()
        model.zero_grad()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return statistics.median(times[1:]), times[0], losses[0]


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print("| config | s/step | first step s | loss |\n|---|---|---|---|")
    for options in CONFIGS:
        median, first, loss = run(options)
        name = ", ".join(f"{k}: {str(v).lower()}" for k, v in options.items()) or "fp32"
        print(f"| {name} | {median:.2f} | {first:.1f} | {loss:.5f} |", flush=True)


if __name__ == "__main__":
    main()
