"""What the end-to-end tests share: a tiny model folder, a tiny alpaca dataset and the run settings.

Both live in one place so the CLI tests and the ``run_train`` tests train the same kind of run;
each test module still gets its own folder (module scope), so no module reads another's prepared
dataset cache or checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hellbender.testing.tiny import save_tiny_model_folder

ROWS: list[dict[str, str]] = [
    {"instruction": "Name the color of the sky.", "input": "", "output": "The sky is blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The answer is 5."},
    {"instruction": "Say hello.", "input": "", "output": "Hello there!"},
    {"instruction": "Is it true?", "input": "", "output": "It is true."},
    {"instruction": "Count to three.", "input": "", "output": "One two three."},
    {"instruction": "Name an animal.", "input": "", "output": "The quick brown fox."},
    {"instruction": "Summarize the text.", "input": "The cat sat on the mat.", "output": "A cat sat."},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
]


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``model/`` (a tiny random Llama with its tokenizer) and ``data.jsonl``."""
    root = tmp_path_factory.mktemp("assets")
    # initializer_range 0.1 (not 0.02): with hidden size 32 and the default init, logits are so
    # flat that a frozen head leaves LoRA almost nothing to learn in a few steps.
    save_tiny_model_folder(root / "model", initializer_range=0.1)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


@pytest.fixture(scope="module")
def base_settings(tiny_assets: Path) -> dict[str, object]:
    """The settings every e2e run shares (fp32 on CPU, packed, 2 rows held out for evaluation).

    Callers build their config as ``{**base_settings, "output_dir": ..., ...}``: a copy, because
    the dict is shared by the whole module.
    """
    return {
        "base_model": str(tiny_assets / "model"),
        "datasets": [{"path": str(tiny_assets / "data.jsonl"), "type": "alpaca"}],
        "val_set_size": 2,
        "dataset_prepared_path": str(tiny_assets / "prepared"),
        "dataset_num_proc": 1,
        "bf16": False,
        "sequence_len": 128,
        "sample_packing": True,
        "micro_batch_size": 2,
        "use_tensorboard": False,
    }
