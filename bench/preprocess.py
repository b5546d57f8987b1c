"""Preprocessing throughput: rows/s for a generated 20k-row mixed dataset.

The mix (generated here, deterministic): 8,000 alpaca rows (JSON Lines), 8,000 chat
conversations of 1-6 exchanges (JSON Lines, the tokenizer's chat template), 2,000 input_output
rows (parquet) and 2,000 completion texts (txt), with 1% malformed rows skipped under
``on_bad_row: skip``. Each setting builds a fresh cache (``dataset_num_proc`` 1 and 2 by default),
then the last build is loaded again from the cache.

    OMP_NUM_THREADS=1 python bench/preprocess.py [--rows 20000] [--procs 1 2] [--tokenizer HF_FOLDER]

Not a test: timings on a shared machine are noisy; this prints numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_masking import load_tokenizer  # the same tokenizer loading as the other bench

WORDS = (
    "the quick brown fox jumps over lazy dog hello world answer question river mountain city small "
    "large blue green red why how many seven eleven please tell us about cats and dogs"
).split()


def text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def generate(folder: Path, rows: int, seed: int = 0) -> list[dict[str, Any]]:
    """Write the mixed dataset; return the ``datasets:`` entries."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    n_alpaca, n_chat = rows * 2 // 5, rows * 2 // 5
    n_io = rows // 10
    n_text = rows - n_alpaca - n_chat - n_io

    def maybe_bad(line: str) -> str:
        return "{broken json" if rng.random() < 0.01 else line

    with (folder / "alpaca.jsonl").open("w") as f:
        for _ in range(n_alpaca):
            row = {"instruction": text(rng, 4, 20), "input": text(rng, 0, 15), "output": text(rng, 5, 80)}
            f.write(maybe_bad(json.dumps(row)) + "\n")
    with (folder / "chat.jsonl").open("w") as f:
        for _ in range(n_chat):
            msgs = []
            if rng.random() < 0.3:
                msgs.append({"role": "system", "content": text(rng, 3, 12)})
            for _ in range(rng.randint(1, 6)):
                msgs.append({"role": "user", "content": text(rng, 3, 30)})
                msgs.append({"role": "assistant", "content": text(rng, 5, 60)})
            f.write(maybe_bad(json.dumps({"messages": msgs})) + "\n")
    segments = [
        [{"text": text(rng, 3, 20) + "\n", "label": False}, {"text": text(rng, 5, 40), "label": True}]
        for _ in range(n_io)
    ]
    pq.write_table(pa.Table.from_pylist([{"segments": s} for s in segments]), folder / "io.parquet")
    with (folder / "text.txt").open("w") as f:
        for _ in range(n_text):
            f.write(text(rng, 20, 400) + "\n")
    return [
        {"path": str(folder / "alpaca.jsonl"), "type": "alpaca"},
        {"path": str(folder / "chat.jsonl"), "type": "chat_template"},
        {"path": str(folder / "io.parquet"), "type": "input_output"},
        {"path": str(folder / "text.txt"), "type": "completion"},
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizer", help="a Hugging Face tokenizer folder (default: SmolLM2's)")
    args = parser.parse_args()

    import datasets

    from hellbender.config.hardware import Hardware
    from hellbender.config.normalize import normalize
    from hellbender.config.schema import HellbenderConfig
    from hellbender.data.prepare import prepare_datasets

    datasets.disable_progress_bars()
    tok = load_tokenizer(args.tokenizer)
    work = Path(tempfile.mkdtemp(prefix="hellbender-bench-preprocess-"))
    try:
        entries = generate(work, args.rows)
        print(
            f"{args.rows:,} rows in {work} (alpaca jsonl, chat jsonl, input_output parquet, completion txt)"
        )
        print(f"{'processes':>9} {'seconds':>9} {'rows/s':>9} {'samples':>9} {'tokens/s':>10}")
        prepared = None
        for procs in args.procs:
            raw = HellbenderConfig.model_validate(
                {
                    "base_model": "bench",
                    "datasets": entries,
                    "sequence_len": 2048,
                    "on_bad_row": "skip",
                    "dataset_num_proc": procs,
                    "dataset_prepared_path": str(work / f"prepared-{procs}"),
                }
            )
            cfg, _ = normalize(raw, world_size=1, hardware=Hardware())
            start = time.perf_counter()
            prepared = prepare_datasets(cfg, tok)
            seconds = time.perf_counter() - start
            rep = prepared.report
            print(
                f"{procs:>9} {seconds:>9.2f} {args.rows / seconds:>9,.0f} {rep.train_samples:>9,} "
                f"{rep.train_tokens / seconds:>10,.0f}"
            )
        assert prepared is not None
        start = time.perf_counter()
        again = prepare_datasets(cfg, tok)
        print(f"reuse from cache: {time.perf_counter() - start:.2f} s (from_cache={again.from_cache})")
        print()
        print(prepared.report.render(width=110))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
