"""What a user sees from ``hellbender train``: hellbender's lines, not third-party notices about
things hellbender has already dealt with.

Two notices are hidden while a model loads, and only those, and only outside ``debug: true``:

* bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community", logged while it is
  imported on a CPU with AVX512-BF16 (an optional kernel package is missing; hellbender keeps 4-bit
  weights out of the layout that kernel serves);
* transformers' FutureWarning "`is_gradient_checkpointing` is deprecated", raised when peft wraps
  the model (peft's call, not hellbender's).

The command runs in a subprocess: pytest records warnings itself, so in-process they would never
reach stderr. bitsandbytes says its notice only on AVX512-BF16 CPUs; the subprocess makes it say it
on any CPU, at the moment it would (when ``bitsandbytes.backends.cpu.ops`` is imported), from its
own logger.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hellbender.testing.projects import write_tiny_project

BNB_NOTICE = (
    "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
    "`pip install kernels` and the kernels >= 0.11.1"
)
NOISE = ["gemm_4bit_forward", "kernels-community", "is_gradient_checkpointing", "FutureWarning"]

RUN_CLI = f"""
import importlib.machinery, logging, sys

NOTICE = {BNB_NOTICE!r}
NAME = "bitsandbytes.backends.cpu.ops"


class SayNotice:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != NAME:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            logging.getLogger(NAME).warning(NOTICE, "No module named 'kernels'")

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, SayNotice)
from hellbender.cli import main

main()
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quiet")
    rows = [{"instruction": f"Say {w}.", "input": "", "output": f"{w}!"} for w in ("hi", "bye", "yes", "no")]
    lora = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}
    # Each run below names its own output_dir on the command line.
    write_tiny_project(root, rows, sequence_len=256, micro_batch_size=2, max_steps=1, **lora)
    return root


def train(project: Path, out: str, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PYTORCH_ALLOC_CONF")}
    env.update({"WORLD_SIZE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    args = ["train", str(project / "cfg.yaml"), f"output_dir={project / out}", *overrides]
    return subprocess.run(
        [sys.executable, "-c", RUN_CLI, *args], capture_output=True, text=True, env=env, timeout=900
    )


def test_train_shows_hellbender_lines_without_third_party_notices(project: Path) -> None:
    result = train(project, "out")
    assert result.returncode == 0, result.stderr
    for noise in NOISE:
        assert noise not in result.stderr, result.stderr
    assert "adapter lora:" in result.stderr and "trainable parameters" in result.stderr  # hellbender's log
    assert "step 1/1 loss" in result.stderr, result.stderr  # hellbender's progress


def test_debug_shows_the_third_party_notices(project: Path) -> None:
    """With ``debug: true`` nothing is hidden (this also proves the notices are really raised)."""
    result = train(project, "out-debug", "debug=true")
    assert result.returncode == 0, result.stderr
    assert "Failed to load CPU gemm_4bit_forward from kernels-community" in result.stderr
    assert "FutureWarning: `is_gradient_checkpointing` is deprecated" in result.stderr
    assert "adapter lora:" in result.stderr
