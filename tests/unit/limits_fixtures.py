"""Hostile configs (alias bombs, huge files, surrogates, extreme numbers) and a bounded runner.

Shared by ``test_config_limits.py``, ``test_cli_validate.py`` and ``test_config_fuzz.py``. The
runner starts ``hellbender validate`` in a child process with an address-space limit, a timeout and
stdout going to a file, so that a regression (a config that expands to gigabytes) fails the test
instead of taking the machine down, and reports what the child used: the wall and CPU seconds the
command took (interpreter start-up excluded) and its peak resident memory. Tests bound the CPU
time (the work done), with a looser bound on the wall time, so that a busy machine does not fail
them.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from config_fixtures import GOOD_CONFIG

# A config never needs more than this; the child is killed by its own MemoryError beyond it.
ADDRESS_SPACE_LIMIT = 3 << 30

_PROBE = """\
import json, resource, sys, time
from hellbender.cli import main
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
start, cpu_start = time.perf_counter(), cpu()
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start
sys.stdout.flush()
# VmHWM: the peak of this process's own memory (ru_maxrss would include the parent's, inherited
# through fork and kept across exec)
try:
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
except OSError:  # not Linux
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
report = {"code": code, "seconds": seconds, "cpu": cpu_seconds, "peak": peak}
sys.stderr.write("\\nPROBE " + json.dumps(report) + "\\n")
"""


@dataclass
class Run:
    """What a bounded ``hellbender`` run did."""

    code: int  # the exit code the command chose (from SystemExit)
    seconds: float  # wall time inside the command, interpreter start-up excluded
    cpu_seconds: float  # CPU time inside the command: the work done, however busy the machine is
    peak_bytes: int  # peak resident memory of the child process
    stdout_bytes: int
    head: str  # the first 20 kB of stdout + stderr (enough for every finding)
    stderr: str

    @property
    def text(self) -> str:
        return self.head + self.stderr


def _limit_memory() -> None:  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def run_bounded(
    args: list[str], workdir: Path, *, timeout: float = 60.0, stdin: bytes | None = None
) -> Run:
    """Run ``hellbender <args>`` in a memory-limited child; stdout goes to a file in ``workdir``."""
    out_path = workdir / "bounded.stdout"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    env["WORLD_SIZE"] = "1"
    with out_path.open("wb") as out:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, *args],
            stdout=out,
            stderr=subprocess.PIPE,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            timeout=timeout,
            preexec_fn=_limit_memory,
            env=env,
            cwd=workdir,
        )
    stderr = done.stderr.decode("utf-8", "replace")
    probe = [line for line in stderr.splitlines() if line.startswith("PROBE ")]
    assert probe, f"the child died without reporting (exit {done.returncode}):\n{stderr[-3000:]}"
    report = json.loads(probe[-1].removeprefix("PROBE "))
    with out_path.open("rb") as fh:
        head = fh.read(20_000).decode("utf-8", "replace")
    return Run(
        code=report["code"],
        seconds=report["seconds"],
        cpu_seconds=report["cpu"],
        peak_bytes=report["peak"],
        stdout_bytes=out_path.stat().st_size,
        head=head,
        stderr=stderr,
    )


def baseline_peak(workdir: Path) -> int:
    """Peak memory of validating the minimal good config: what every run needs anyway."""
    path = workdir / "baseline.yaml"
    path.write_text(GOOD_CONFIG)
    return run_bounded(["validate", str(path)], workdir).peak_bytes


# ------------------------------------------------------------------ hostile configs


def alias_bomb(levels: int = 9, width: int = 10, key: str = "lora_r") -> str:
    """"Billion laughs": ``a0: &a0 [lol]``, ``a1: &a1 [*a0 × width]``, … — width**levels leaves
    in a few hundred bytes, put under ``key``."""
    lines = [GOOD_CONFIG.rstrip("\n"), "anchors:", "  - &a0 [lol]"]
    for i in range(1, levels + 1):
        lines.append(f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    lines.append(f"{key}: *a{levels}")
    # `anchors` is itself an unknown key: the bomb must be refused before that is even looked at
    return "\n".join(lines) + "\n"


def map_bomb(levels: int = 6, width: int = 10) -> str:
    """Nested mappings of aliases under ``overrides_of_model_config`` (typed ``dict[str, Any]``,
    so without a size limit it validates and ends up in the resolved config)."""
    lines = [GOOD_CONFIG.rstrip("\n"), "overrides_of_model_config:", "  m0: &m0 {k: lol}"]
    for i in range(1, levels + 1):
        lines.append(f"  m{i}: &m{i} {{" + ", ".join(f"k{j}: *m{i - 1}" for j in range(width)) + "}")
    return "\n".join(lines) + "\n"


def huge_file(size: int) -> str:
    """A valid config padded with comment lines to ``size`` bytes."""
    comment = "# " + "x" * 97 + "\n"
    return GOOD_CONFIG + comment * (max(0, size - len(GOOD_CONFIG)) // len(comment) + 1)


def junk_keys(count: int) -> str:
    """A valid config plus ``count`` unknown keys."""
    return GOOD_CONFIG + "".join(f"k{i}: 1\n" for i in range(count))


SURROGATE_KEY = GOOD_CONFIG + '"\\ud800": 1\n'
SURROGATE_VALUE = GOOD_CONFIG + 'chat_template: "\\udfff"\n'

# Values that used to validate and then hang or crash a later stage.
# (YAML 1.1 reads `1e29` as a string: a float needs the dot and the sign, `1.0e+29`.)
EXTREME_NUMBERS = [".inf", "-.inf", ".nan", "1.0e+29", str(10**29), "-1", str(2**64), "1.0e+308", "0"]
