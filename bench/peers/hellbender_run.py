"""The hellbender peer of ``bench/peers.py``: ``hellbender train CONFIG`` with a counter attached.

Runs in the project venv: ``python hellbender_run.py CONFIG.yaml``. It is the ``hellbender``
command itself (``hellbender.cli.main`` in this process), with two read-only wrappers put around
module functions first — nothing under ``src/`` is changed:

* ``hellbender.commands.train.train`` (the training loop, called after the tokenizer, data and
  model are ready): its start and end time are the loop time, like ``on_train_begin`` →
  ``on_train_end`` of the HF-Trainer peers;
* ``hellbender.train.loop._accumulate_gradients`` (forward + backward of one optimizer step's
  micro-batches): the micro-batches trained, their positions (``input_ids.numel()``, padding
  included), and the trained tokens the loop itself returns (labels != -100 after the shift).

``metrics.jsonl`` (in ``output_dir``) only holds rates per logging window, not counts or seconds
(see ``bench/peers.py``), hence the counter. If the wrapped functions are renamed, the run still
goes through and the counts fall back to what ``metrics.jsonl`` gives (marked as such).
Result JSON: ``$PEER_RESULT``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

T_START = time.perf_counter()


def main() -> None:
    from hellbender.config.normalize import configure_allocator_env

    configure_allocator_env()  # what `hellbender` does before torch is imported
    import torch

    import hellbender.commands.train as command
    import hellbender.train.loop as loop
    from hellbender.cli import main as cli_main

    tally: dict[str, Any] = {"trained_tokens": 0, "positions": 0, "real_tokens": 0, "micro_batches": 0,
                             "step_seconds": [], "step_trained": [], "counted": False}  # fmt: skip
    shapes: Counter[str] = Counter()
    docs: list[int] = []
    keys: set[str] = set()

    accumulate = getattr(loop, "_accumulate_gradients", None)
    if accumulate is not None:

        def counted_accumulate(parallel: Any, batches: list[dict[str, Any]], *args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = accumulate(parallel, batches, *args, **kw)
            tally["step_seconds"].append(time.perf_counter() - t0)
            tally["trained_tokens"] += int(out[1])
            tally["step_trained"].append(int(out[1]))
            tally["counted"] = True
            for batch in batches:
                ids = batch["input_ids"]
                tally["micro_batches"] += 1
                tally["positions"] += int(ids.numel())
                tally["real_tokens"] += int(batch.get("num_tokens", ids.numel()))
                shapes["x".join(str(d) for d in ids.shape)] += 1
                keys.update(batch.keys())
                pos = batch.get("position_ids")
                if isinstance(pos, torch.Tensor) and pos.dim() == 2:
                    starts = torch.ones_like(pos, dtype=torch.bool)
                    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
                    real = batch.get("attention_mask")
                    if isinstance(real, torch.Tensor) and real.dim() == 2:
                        starts &= real.bool()
                    docs.extend(int(n) for n in starts.sum(dim=1))
            return out

        loop._accumulate_gradients = counted_accumulate  # type: ignore[attr-defined]

    run_loop = command.train

    def timed_train(cfg: Any, model: Any, *args: Any, **kw: Any) -> Any:
        trainable = [p for p in model.parameters() if p.requires_grad]
        frozen = [p for p in model.parameters() if not p.requires_grad]
        tally.update({
            "trainable_dtype": str(trainable[0].dtype) if trainable else None,
            "frozen_dtype": str(frozen[0].dtype) if frozen else None,
            "trainable_params": sum(p.numel() for p in trainable),
            "compute_dtype": str(getattr(cfg, "compute_dtype", "?")),
            "attn_implementation": str(getattr(cfg, "attn_implementation", "?")),
            "sample_packing": bool(getattr(cfg, "sample_packing", False)),
            "pad_to_sequence_len": getattr(cfg, "pad_to_sequence_len", None),
            "torch_threads": torch.get_num_threads(),
            "setup_seconds": time.perf_counter() - T_START,
        })  # fmt: skip
        t0 = time.perf_counter()
        try:
            return run_loop(cfg, model, *args, **kw)
        finally:
            tally["loop_seconds"] = time.perf_counter() - t0

    command.train = timed_train  # type: ignore[assignment]
    sys.argv = ["hellbender", "train", *sys.argv[1:]]
    code: Any = 0
    try:
        cli_main()
    except SystemExit as exc:  # click ends with sys.exit
        code = exc.code
    tally.update({
        "batch_shapes": dict(shapes), "batch_keys": sorted(keys),
        "docs_per_row_mean": sum(docs) / len(docs) if docs else None,
        "docs_per_row_max": max(docs) if docs else None,
        "process_seconds_to_end": time.perf_counter() - T_START,
    })  # fmt: skip
    Path(os.environ["PEER_RESULT"]).write_text(json.dumps(tally))
    sys.exit(code)


if __name__ == "__main__":
    main()
