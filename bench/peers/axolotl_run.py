"""The Axolotl peer of ``bench/peers.py``: ``python -m axolotl.cli.train CONFIG`` with a counter.

Runs in the Axolotl venv: ``python axolotl_run.py CONFIG.yaml``. Before Axolotl's CLI runs (in
this process, exactly as ``python -m axolotl.cli.train CONFIG.yaml`` would), every HF ``Trainer``
constructed gets :mod:`counting`'s ``compute_loss`` wrapper and callback, so the trainer Axolotl
builds counts the micro-batches it trains and times its loop. Result JSON: ``$PEER_RESULT``.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path

T_START = time.perf_counter()


def main() -> None:
    from counting import attach_to_every_trainer

    tally = attach_to_every_trainer()
    sys.argv = ["axolotl.cli.train", *sys.argv[1:]]
    code: object = 0
    try:
        runpy.run_module("axolotl.cli.train", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    result = Path(os.environ["PEER_RESULT"])
    if result.is_file():
        record = json.loads(result.read_text())
        record["process_seconds_to_end"] = time.perf_counter() - T_START
        record["setup_seconds"] = record.get("setup_seconds", tally.t_begin - T_START)
        result.write_text(json.dumps(record))
    sys.exit(code)


if __name__ == "__main__":
    main()
