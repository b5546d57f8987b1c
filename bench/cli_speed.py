"""How fast the command line answers: `hellbender --help` and `hellbender validate` on a config.

Targets (issue #2): `--help` under 0.5 s, `validate` on a typical config under 1 s. Each command
runs as a fresh subprocess, as a user would run it, several times; the median is compared with the
target. `python -c pass` is printed as the floor: the interpreter's own start-up, which no amount
of lazy importing can remove.

    python bench/cli_speed.py [--repeats 7] [--config examples/smollm2-chat-template-packing.yaml]

Not a unit test: timings on a shared 2-core machine are noisy, so this prints numbers instead of
failing. Exit status is 1 when a median misses its target, for use in scripts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "examples" / "smollm2-chat-template-packing.yaml"


def time_command(cmd: list[str], repeats: int, env: dict[str, str]) -> tuple[list[float], int]:
    """Wall-clock seconds of each run (after one untimed warm-up that fills the OS file cache)."""
    subprocess.run(cmd, capture_output=True, env=env, check=False)
    times: list[float] = []
    code = 0
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, env=env, check=False)
        times.append(time.perf_counter() - start)
        code = done.returncode
    return times, code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)

    exe = shutil.which("hellbender", path=str(Path(sys.executable).parent)) or shutil.which("hellbender")
    if exe is None:
        print("the `hellbender` command is not installed (pip install -e .)", file=sys.stderr)
        return 2
    # What a user's shell would have, minus thread oversubscription on this shared machine.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    cases: list[tuple[str, list[str], float | None]] = [
        ("python -c pass (interpreter floor)", [sys.executable, "-c", "pass"], None),
        ("hellbender --help", [exe, "--help"], 0.5),
        (f"hellbender validate {args.config.name}", [exe, "validate", str(args.config)], 1.0),
    ]
    print(f"{'command':<58} {'median':>8} {'min':>8} {'max':>8} {'target':>8}  verdict")
    missed = False
    for label, cmd, target in cases:
        times, code = time_command(cmd, args.repeats, env)
        median = statistics.median(times)
        verdict = "-" if target is None else ("ok" if median < target else "MISSED")
        missed |= verdict == "MISSED"
        target_text = "-" if target is None else f"{target:.2f}s"
        note = f" (exit {code})" if code not in (0,) else ""
        print(
            f"{label:<58} {median:>7.3f}s {min(times):>7.3f}s {max(times):>7.3f}s "
            f"{target_text:>8}  {verdict}{note}"
        )
    print(f"{args.repeats} runs each after one warm-up; cores: {os.cpu_count()}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
