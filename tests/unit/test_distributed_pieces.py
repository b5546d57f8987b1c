"""The pieces of hellbender.distributed that need no second process: how a step's micro-batches are
dealt to the ranks, the torchrun command line, failure messages, optimizer states by name, and
which modules FSDP2 shards. (N ranks ≡ 1 rank is tests/invariants/test_distributed.py.)"""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from hellbender.commands.train import model_to_train
from hellbender.config.load import load_config
from hellbender.config.schema import ResolvedConfig
from hellbender.data.tokenize import IGNORE_INDEX
from hellbender.distributed import zero
from hellbender.distributed.launch import Launch, LaunchError, describe_failures
from hellbender.distributed.parallel import (
    DEEPSPEED_DIR,
    LossModule,
    Parallel,
    _blocks_to_shard,
    _by_name,
    _initialize_state,
)
from hellbender.distributed.world import World
from hellbender.errors import OptionError
from hellbender.models.load import load_tokenizer
from hellbender.testing.configs import resolved_config
from hellbender.testing.projects import write_tiny_project
from hellbender.testing.tiny import build_tiny_model
from hellbender.train.loop import Samples, batching, rank_batches

PAD = 0


def config(**values: object) -> ResolvedConfig:
    return resolved_config(base_model="m", datasets=[{"path": "d.jsonl", "type": "alpaca"}], **values)


def samples(n: int) -> Samples:
    return Samples([{"input_ids": [5 + i, 6, 7], "labels": [IGNORE_INDEX, 6, 7]} for i in range(n)])


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("group_length", [1, 2, 3, 4, 5, 8])
def test_the_ranks_take_every_micro_batch_of_a_step_once(size: int, group_length: int) -> None:
    data = samples(group_length)
    group = [[[i]] for i in range(group_length)]  # micro-batch i = one row holding sample i
    cfg = config(sequence_len=16)
    _, collate = batching(data, cfg, PAD)
    taken: list[int] = []
    counts = set()
    trained = 0
    for rank in range(size):
        batches = rank_batches(group, data, collate, World(rank, size), torch.device("cpu"))
        counts.add(len(batches))
        for batch in batches:
            trained += int(batch["num_trained_tokens"])
            if int(batch["num_tokens"]):
                taken.append(int(batch["input_ids"][0, 0]) - 5)
            else:  # a filler: a real micro-batch, trained on nothing
                assert (batch["labels"] == IGNORE_INDEX).all()
    assert sorted(taken) == list(range(group_length))  # each exactly once
    assert counts == {-(-group_length // size)}  # every rank runs as many passes
    assert trained == 2 * group_length  # fillers add no trained token


def test_torchrun_command_lines() -> None:
    one = Launch(4).torchrun_args(["train", "c.yaml", "lr=1"])
    assert one == ["--nproc-per-node", "4", "--nnodes", "1", "--max-restarts", "0", "--standalone",
                   "-m", "hellbender", "train", "c.yaml", "lr=1"]  # fmt: skip
    two = Launch(8, "2", 1, "10.0.0.1:29400").torchrun_args(["train", "c.yaml"])
    assert two[two.index("--rdzv-endpoint") + 1] == "10.0.0.1:29400" and "--standalone" not in two
    assert two[two.index("--node-rank") + 1] == "1" and two[two.index("--rdzv-backend") + 1] == "c10d"
    with pytest.raises(LaunchError, match="--rdzv-endpoint"):
        Launch(1, "2").torchrun_args(["train", "c.yaml"])


def test_a_failure_names_the_rank_and_how_it_ended() -> None:
    failures = {  # rank 1 was killed; torchrun then stopped ranks 0 and 2
        0: SimpleNamespace(exitcode=-signal.SIGTERM, pid=122, timestamp=1001),
        1: SimpleNamespace(exitcode=-signal.SIGKILL, pid=123, timestamp=1000),
        2: SimpleNamespace(exitcode=1, pid=124, timestamp=1002),
    }
    assert describe_failures(failures).startswith(
        "rank 1 (pid 123) was killed by SIGKILL; then rank 0 was killed by SIGTERM, rank 2 exited with code 1"
    )
    alone = describe_failures({3: SimpleNamespace(exitcode=2, pid=9)})
    assert alone.startswith("rank 3 (pid 9) exited with code 2 —")


def adam_after_one_step(model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay, rest = params[::2], params[1::2]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    ids = torch.tensor([[3, 4, 5, 6]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def test_a_one_process_optimizer_state_loads_by_name_into_a_fresh_optimizer() -> None:
    """A checkpoint of one process (positions) resumed on ranks (names): the same state."""
    model = build_tiny_model(seed=0)
    optimizer = adam_after_one_step(model)
    saved = optimizer.state_dict()
    named = _by_name(model, optimizer, saved)
    names = [n for n, _ in model.named_parameters()]
    assert named["param_groups"][0]["params"] == names[::2]
    assert named["param_groups"][1]["params"] == names[1::2]
    fresh_model = build_tiny_model(seed=1)
    params = list(fresh_model.parameters())
    groups = [{"params": params[::2]}, {"params": params[1::2], "weight_decay": 0.0}]
    fresh = torch.optim.AdamW(groups, lr=1e-3)
    Parallel(World(), "single", fresh_model, fresh_model).load_optimizer_state(fresh, named)
    for i, state in saved["state"].items():
        assert torch.equal(fresh.state_dict()["state"][i]["exp_avg"], state["exp_avg"]), i


def test_initializing_an_optimizer_state_changes_no_weight() -> None:
    model = build_tiny_model(seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    _initialize_state(optimizer)
    assert optimizer.state and all(p.grad is None for p in model.parameters())
    assert optimizer.param_groups[0]["lr"] == 0.1
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_fsdp2_shards_the_blocks_the_policy_names() -> None:
    model = build_tiny_model(seed=0)
    blocks = _blocks_to_shard(model, config(fsdp_version=2, fsdp_config={}))
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * len(model.model.layers)
    by_size = {"auto_wrap_policy": "SIZE_BASED_WRAP", "min_num_params": 4000}
    sized = _blocks_to_shard(model, config(fsdp_version=2, fsdp_config=by_size))
    assert sized and all(sum(p.numel() for p in b.parameters()) >= 4000 for b in sized)
    no_wrap = config(fsdp_version=2, fsdp_config={"auto_wrap_policy": "NO_WRAP"})
    assert _blocks_to_shard(model, no_wrap) == []


# ------------------------------------------------------------------ DeepSpeed checkpoints


def _deepspeed_checkpoint(root: Path, ranks: int) -> Path:
    """The layout DeepSpeed's save_checkpoint writes into a checkpoint's deepspeed/ folder: one
    optimizer partition per data-parallel rank (contents do not matter for these checks)."""
    checkpoint = root / "checkpoint-2"
    tag = checkpoint / DEEPSPEED_DIR / zero.TAG
    tag.mkdir(parents=True)
    for rank in range(ranks):
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    return checkpoint


def test_a_deepspeed_checkpoint_is_refused_on_another_world_size(tmp_path: Path) -> None:
    checkpoint = _deepspeed_checkpoint(tmp_path, ranks=2)
    refused = r"written by DeepSpeed on 2 rank\(s\); this run has 4\. .*--nproc-per-node 2"
    with pytest.raises(OptionError, match=refused):  # before the engine is touched
        zero.load(None, checkpoint / DEEPSPEED_DIR, World(rank=0, size=4), trainable_only=False)


def test_a_deepspeed_checkpoint_is_refused_by_another_strategy(tmp_path: Path) -> None:
    checkpoint = _deepspeed_checkpoint(tmp_path, ranks=2)
    model = build_tiny_model()
    parallel = Parallel(World(), "single", model, LossModule(model, lambda m, b: torch.zeros(())))
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(OptionError, match="written by DeepSpeed, and resumes only under DeepSpeed"):
        parallel.restore(optimizer, checkpoint)
    assert not optimizer.state  # nothing was loaded


# ------------------------------------------------------------------ fsdp_config.cpu_ram_efficient_loading


@pytest.mark.parametrize("adapter", [{}, {"adapter": "lora", "lora_r": 4, "lora_target_linear": True}])
def test_with_cpu_ram_efficient_loading_only_rank_0_reads_the_weights(
    tmp_path: Path, adapter: dict[str, object]
) -> None:
    """Rank 1 builds the same model (names, shapes, dtypes, tied head, adapter) on the meta
    device: no weight read, no memory for one; rank 0 loads it for real. Without the option every
    rank loads. (The shards rank 1 then receives: tests/invariants/test_distributed.py.)"""
    fsdp = {"fsdp_version": 2, "fsdp_config": {"cpu_ram_efficient_loading": True}}
    path = write_tiny_project(tmp_path, model_settings={"tie_word_embeddings": True}, **fsdp, **adapter)
    cfg, _ = load_config(path, world_size=2)
    tokenizer = load_tokenizer(cfg)
    loaded = model_to_train(cfg, tokenizer, World(rank=0, size=2))
    empty = model_to_train(cfg, tokenizer, World(rank=1, size=2))
    assert not any(p.is_meta for p in loaded.parameters())
    assert all(t.is_meta for t in [*empty.parameters(), *empty.buffers()])
    assert _layout(empty) == _layout(loaded)
    base: Any = empty.get_base_model() if adapter else empty
    assert base.lm_head.weight is base.model.embed_tokens.weight  # still tied
    plain = write_tiny_project(tmp_path, config_name="plain.yaml", fsdp_version=2)
    every_rank, _ = load_config(plain, world_size=2)
    loaded_too = model_to_train(every_rank, tokenizer, World(rank=1, size=2))
    assert not any(p.is_meta for p in loaded_too.parameters())


def _layout(model: torch.nn.Module) -> dict[str, tuple[Any, ...]]:
    named = model.named_parameters(remove_duplicate=False)
    return {name: (p.shape, p.dtype, p.requires_grad) for name, p in named}
