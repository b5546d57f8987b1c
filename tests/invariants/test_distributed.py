"""N ranks ≡ 1 rank: DDP, FSDP2 and DeepSpeed ZeRO-2/3 (full fine-tune and LoRA) on 2 and 4 CPU
ranks (gloo).

Each distributed run is the real command, ``hellbender train CONFIG --nproc-per-node N`` (torchrun
underneath, one thread per rank); its reference is the same config in one process with the same
global batch (``gradient_accumulation_steps`` × N), computed in this test. Compared: the loss and
the gradient norm of every step, the eval loss (evaluation is split over the ranks too), and the
final weights as written to ``output_dir``.

The data is chosen so that the ranks do *not* divide every step: 12 rows, 3 of them held out for
evaluation, 9 trained with a global batch of 4 micro-batches — each epoch ends with a step of 1,
where every other rank trains a filler micro-batch (every label ignored); the 3 eval micro-batches
do not split evenly either. Two epochs, so the per-epoch reshuffle is covered as well.

Tolerances: the ranks sum the same terms in another order (gradient all-reduce, token counts in
float64), so results agree to float32 rounding, not bit for bit: losses to 1e-6 relative, gradient
norms to 1e-5, weights to 1e-6 absolute (measured: ≤ 1e-7 and ≤ 6e-8).

Resuming on another world size is covered here too: a 2-rank FSDP2 checkpoint continued on 4 ranks
and in one process reproduces the uninterrupted run. A DeepSpeed checkpoint continues exactly on
the world size that wrote it, and is refused in one process.

ZeRO-3 configs set ``stage3_param_persistence_threshold`` to 0 (through the JSON's ``"auto"``,
10 × hidden_size = 320 here, would keep the tiny model's small weights whole): every weight is
partitioned, so the test covers ZeRO-3's gathering, including the head weight the chunked loss
reads directly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from hellbender.testing.projects import write_tiny_project

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_multi_rank_test_at_a_time")]

ROWS = [
    {"instruction": f"Repeat {w} {n} times.", "input": "", "output": " ".join([w] * n)}
    for w, n in [("red", 2), ("blue", 3), ("green", 1), ("cat", 4), ("dog", 2), ("sun", 5), ("moon", 1),
                 ("tree", 3), ("rock", 2), ("fish", 6), ("bird", 2), ("star", 4)]
]  # fmt: skip
assert len(ROWS) == 12
GLOBAL_BATCH = 4  # micro-batches per optimizer step, over all ranks
SETTINGS: dict[str, Any] = {
    "learning_rate": 0.01,
    "num_epochs": 2,
    "logging_steps": 1,
    "save_strategy": "no",
    "val_set_size": 0.2,  # ceil(0.2 × 12) = 3 eval rows, 9 training rows
    "eval_steps": 2,
    "ddp_timeout": 120,  # a hang fails in two minutes, not half an hour
}
ADAPTERS: dict[str, dict[str, Any]] = {
    "full": {},
    "lora": {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True},
}
ADAPTERS["qlora"] = {**ADAPTERS["lora"], "adapter": "qlora", "load_in_4bit": True}
# Final-weight tolerance: float32 rounding. QLoRA's is wider: its trajectories already differ by
# 1e-7 relative in the loss after two steps (bitsandbytes' CPU 4-bit matmul, summed in another
# order), and AdamW divides each gradient by its own running RMS, so an element whose gradient is
# ~0 moves by rounding noise × lr: measured with per-document attention, one element of 128 in
# layer 0's k_proj lora_A ends 1.9e-5 apart (FSDP2), every other weight ≤ 5e-7.
WEIGHT_ATOL = {"qlora": 4e-5}
CPU = {"device": "cpu"}
# Axolotl's zero2.json / zero3.json shape: everything the loop owns left to "auto".
ZERO_AUTO: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
}
ZERO3_FILE = "zero3.json"  # written into the project; the config names it by path, as Axolotl's do
STRATEGIES: dict[str, dict[str, Any]] = {
    "ddp": {},
    "fsdp2": {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}},
    # as Axolotl's zero2.json: ZeRO-Offload of the optimizer state to CPU memory
    "zero2": {"deepspeed": {**ZERO_AUTO, "zero_optimization": {"stage": 2, "offload_optimizer": CPU}}},
    "zero3": {"deepspeed": ZERO3_FILE},
}
LOGGED = {"zero2": "deepspeed ZeRO-2", "zero3": "deepspeed ZeRO-3"}  # "distributed: <this> over N ranks"


def env() -> dict[str, str]:
    """One thread per rank (2 cores); no torchrun variables inherited; hub off."""
    drop = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONWARNINGS")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return {**base, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def hellbender(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "hellbender", *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ranks")
    write_tiny_project(root, ROWS, model_settings={"initializer_range": 0.1}, **SETTINGS)
    zero3 = {
        "stage": 3,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": 0,  # partition every weight of the tiny model
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    (root / ZERO3_FILE).write_text(json.dumps({**ZERO_AUTO, "zero_optimization": zero3}))
    return root


def strategy_settings(project: Path, strategy: str) -> dict[str, Any]:
    settings = dict(STRATEGIES[strategy])
    if settings.get("deepspeed") == ZERO3_FILE:
        settings["deepspeed"] = str(project / ZERO3_FILE)
    return settings


def config(project: Path, name: str, **settings: Any) -> Path:
    """A config in ``project`` beside the shared model and data (one prepared-data cache)."""
    return write_tiny_project(
        project, ROWS, config_name=f"{name}.yaml", output_dir=str(project / name), **{**SETTINGS, **settings}
    )


class Runs:
    """Runs computed once per module and shared by the tests that compare them."""

    def __init__(self, project: Path) -> None:
        self.project = project
        self.done: dict[str, Path] = {}

    def single(self, adapter: str) -> Path:
        name = f"single-{adapter}"
        if name not in self.done:
            cfg = config(self.project, name, gradient_accumulation_steps=GLOBAL_BATCH, **ADAPTERS[adapter])
            hellbender("train", str(cfg))
            self.done[name] = self.project / name
        return self.done[name]

    def ranks(self, strategy: str, adapter: str, nproc: int, **settings: Any) -> Path:
        # one folder per distinct run; the settings by digest (a DeepSpeed mapping is long)
        digest = hashlib.sha1(repr(sorted(settings.items())).encode()).hexdigest()[:10] if settings else ""
        name = "-".join(filter(None, [strategy, adapter, str(nproc), digest]))
        if name not in self.done:
            cfg = config(
                self.project, name, gradient_accumulation_steps=GLOBAL_BATCH // nproc,
                **{**ADAPTERS[adapter], **strategy_settings(self.project, strategy), **settings},
            )  # fmt: skip
            done = hellbender("train", str(cfg), "--nproc-per-node", str(nproc))
            logged = f"distributed: {LOGGED.get(strategy, strategy)} over {nproc} ranks (gloo)"
            assert logged in done.stderr, done.stderr[-3000:]
            self.done[name] = self.project / name
        return self.done[name]


@pytest.fixture(scope="module")
def runs(project: Path) -> Runs:
    return Runs(project)


def records(out: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl by step: the train and eval records of each step merged."""
    by_step: dict[int, dict[str, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step.setdefault(record["step"], {}).update(record)
    return by_step


def weights(out: Path) -> dict[str, torch.Tensor]:
    adapter = out / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.exists() else out / "model.safetensors"))


def assert_same_run(got: Path, want: Path, first_step: int = 1, weight_atol: float = 1e-6) -> None:
    a, b = records(got), records(want)
    steps = sorted(s for s in b if s >= first_step and "loss" in b[s])
    assert steps and [s for s in sorted(a) if s >= first_step and "loss" in a[s]] == steps
    for step in steps:
        got_step, want_step = a[step], b[step]
        assert math.isclose(got_step["loss"], want_step["loss"], rel_tol=1e-6), (step, got_step, want_step)
        assert math.isclose(got_step["grad_norm"], want_step["grad_norm"], rel_tol=1e-5), (step, got_step)
        if "eval_loss" in b[step]:
            assert math.isclose(a[step]["eval_loss"], b[step]["eval_loss"], rel_tol=1e-6), step
    wa, wb = weights(got), weights(want)
    assert wa.keys() == wb.keys()
    for name in wb:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=weight_atol, msg=name)


@pytest.mark.parametrize(
    ("strategy", "adapter", "nproc"),
    [("ddp", "lora", 2), ("ddp", "full", 2), ("fsdp2", "full", 2), ("fsdp2", "lora", 2),
     ("ddp", "lora", 4), ("fsdp2", "full", 4),
     ("zero2", "full", 2), ("zero3", "lora", 2), ("zero2", "lora", 4), ("zero3", "full", 4),
     ("fsdp2", "qlora", 2), ("zero2", "qlora", 2)],
)  # fmt: skip
def test_n_ranks_equal_one_rank(runs: Runs, strategy: str, adapter: str, nproc: int) -> None:
    reference = runs.single(adapter)
    got = runs.ranks(strategy, adapter, nproc)
    assert_same_run(got, reference, weight_atol=WEIGHT_ATOL.get(adapter, 1e-6))
    # The plan: 9 training rows → steps of 4, 4 and 1 micro-batches per epoch, 2 epochs.
    plan = records(got)[0]
    assert plan["rows_per_epoch"] == 9 and plan["total_steps"] == 6 == records(reference)[0]["total_steps"]
    # Logs come from rank 0 alone: one record per step.
    lines = [json.loads(x) for x in (got / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in lines if "loss" in r]
    assert train_steps == sorted(set(train_steps))


@pytest.mark.parametrize("state_dict_type", ["SHARDED_STATE_DICT", "FULL_STATE_DICT"])
def test_an_fsdp2_checkpoint_resumes_on_another_world_size(
    runs: Runs, project: Path, state_dict_type: str
) -> None:
    """FSDP2 on 2 ranks writes checkpoint-2 — its shards (one file per rank), or whole weights
    gathered on rank 0; 4 ranks and 1 process each continue it exactly."""
    fsdp = {"fsdp_version": 2, "fsdp_config": {"state_dict_type": state_dict_type}}
    straight = runs.ranks("fsdp2", "full", 2, save_strategy="steps", save_steps=2, **fsdp)
    checkpoint = straight / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file()
    sharded = state_dict_type == "SHARDED_STATE_DICT"
    assert (checkpoint / "sharded").is_dir() == sharded
    assert (checkpoint / "model.safetensors").is_file() != sharded
    for nproc in (4, 1):
        name = f"resumed-{nproc}-{state_dict_type}"
        cfg = config(
            project, name, gradient_accumulation_steps=GLOBAL_BATCH // nproc,
            resume_from_checkpoint=str(checkpoint), **fsdp,
        )  # fmt: skip
        args = ["train", str(cfg)] + (["--nproc-per-node", str(nproc)] if nproc > 1 else [])
        done = hellbender(*args)
        assert f"resuming from {checkpoint}" in done.stderr, done.stderr[-3000:]
        assert_same_run(project / name, straight, first_step=3)


def test_cpu_ram_efficient_loading_trains_the_same_steps(runs: Runs) -> None:
    """fsdp_config.cpu_ram_efficient_loading: rank 1 builds the model on the meta device and
    receives its shards (and the buffers) from rank 0 once FSDP2 has sharded it; the run equals one
    process. (That rank 1 reads no weight is tests/unit/test_distributed_pieces.py.)"""
    fsdp = {"reshard_after_forward": True, "cpu_ram_efficient_loading": True}
    assert_same_run(runs.ranks("fsdp2", "lora", 2, fsdp_config=fsdp), runs.single("lora"))


KERNELS: dict[str, Any] = {
    "gradient_checkpointing": True,
    "chunked_cross_entropy": True,
    "sample_packing": True,
    "lora_mlp_kernel": True,
    "lora_qkv_kernel": True,
    "lora_o_kernel": True,
}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero3"])
def test_the_memory_kernels_run_under_each_strategy(runs: Runs, project: Path, strategy: str) -> None:
    """Checkpointing, the chunked loss, packing and the fused LoRA kernels together: 2 ranks equal
    one process with the same kernels (each kernel is proven equal to plain PyTorch elsewhere)."""
    name = "single-lora-kernels"
    if name not in runs.done:
        cfg = config(project, name, gradient_accumulation_steps=GLOBAL_BATCH, **ADAPTERS["lora"], **KERNELS)
        hellbender("train", str(cfg))
        runs.done[name] = project / name
    got = runs.ranks(strategy, "lora", 2, **KERNELS)
    assert_same_run(got, runs.done[name])


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_regional_torch_compile_runs_under_sharding(runs: Runs, strategy: str) -> None:
    """torch_compile (each decoder layer compiled, then sharded by FSDP2 or partitioned by ZeRO-3)
    trains the eager run's steps: the same comparison as above, against the eager one-process run."""
    assert_same_run(runs.ranks(strategy, "lora", 2, torch_compile=True), runs.single("lora"))


def test_a_deepspeed_checkpoint_resumes_on_its_world_size(runs: Runs, project: Path) -> None:
    """ZeRO-3 with its parameters and optimizer state offloaded to CPU memory (ZeRO-Infinity's
    CPU variant) on 2 ranks writes checkpoint-2 through its engine (every rank its partitions, no
    gathered weights); 2 ranks continue it exactly; one process refuses it with the reason."""
    offload = {"device": "cpu", "pin_memory": True}
    zero3 = {"stage": 3, "stage3_param_persistence_threshold": 0, "offload_param": offload}
    zero3 = {"deepspeed": {**ZERO_AUTO, "zero_optimization": {**zero3, "offload_optimizer": offload}}}
    straight = runs.ranks("zero3", "full", 2, save_strategy="steps", save_steps=2, **zero3)
    assert_same_run(straight, runs.single("full"))  # ZeRO-3, full fine-tune, offloaded: 2 ranks ≡ 1
    checkpoint = straight / "checkpoint-2"
    shards = sorted(p.name for p in (checkpoint / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(shards) == 2 and not (checkpoint / "model.safetensors").exists(), shards
    name = "zero3-resumed"
    resume = {"resume_from_checkpoint": str(checkpoint)}
    cfg = config(project, name, gradient_accumulation_steps=2, **resume, **zero3)
    done = hellbender("train", str(cfg), "--nproc-per-node", "2")
    assert f"resuming from {checkpoint}" in done.stderr, done.stderr[-3000:]
    assert_same_run(project / name, straight, first_step=3)

    alone = config(project, "zero3-alone", gradient_accumulation_steps=4, **resume, **zero3)
    command = [sys.executable, "-m", "hellbender", "train", str(alone)]
    refused = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=600)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "was written by DeepSpeed, and resumes only under DeepSpeed" in refused.stderr
