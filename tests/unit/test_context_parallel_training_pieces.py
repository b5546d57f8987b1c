"""Context parallelism wired into training, the pieces that need no second process: the config keys
and rules (HB153–HB156), the dealing of micro-batches by data-parallel rank and the sharding
collator, the ranks' (dp, cp) coordinates, and the losses taking pre-shifted targets.

The whole thing — ``hellbender train --nproc-per-node N context_parallel_size=2`` ≡ one process —
is tests/invariants/test_context_parallel_training.py."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from hellbender.config.findings import Finding
from hellbender.config.hardware import Hardware
from hellbender.config.load import load_config
from hellbender.config.rules import context_parallel_multiple
from hellbender.config.schema import ResolvedConfig
from hellbender.data.tokenize import IGNORE_INDEX
from hellbender.distributed.context_parallel import (
    AXOLOTL_RING_ATTN_FUNCS,
    ShardingCollator,
    plan_from_config,
    shard_multiple,
    shift_labels,
    unshard_sequence,
)
from hellbender.distributed.world import World
from hellbender.kernels.loss import build_loss, causal_lm_loss_sum
from hellbender.testing.tiny import build_tiny_model
from hellbender.train.loop import Samples, batching, rank_batches

CPU = Hardware(description="CPU")
PAD = 0


def run(
    tmp_path: Path, extra: dict[str, Any], *, world: int = 2, heads: int = 8, kv_heads: int = 4
) -> tuple[ResolvedConfig, list[Finding]]:
    """Load a config for ``world`` ranks, its model a local config.json (model rules read it)."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_attention_heads": heads, "num_key_value_heads": kv_heads})
    )
    base = {"base_model": str(model), "datasets": [{"path": "data.jsonl", "type": "alpaca"}]}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**base, **extra}, sort_keys=False))
    return load_config(path, world_size=world, hardware=CPU, strict=False)


def found(tmp_path: Path, extra: dict[str, Any], code: str, **kwargs: Any) -> list[str]:
    """Severity and key of every ``code`` finding."""
    return [f"{f.severity}:{f.key}" for f in run(tmp_path, extra, **kwargs)[1] if f.code == code]


CP2 = {"context_parallel_size": 2}
PACKED = {"sample_packing": True, "sequence_len": 256}


# ---------------------------------------------------------------------------------------- config


def test_a_context_parallel_config_validates_without_errors(tmp_path: Path) -> None:
    cfg, findings = run(tmp_path, {**CP2, **PACKED, "heads_k_stride": 2}, world=4)
    assert [f for f in findings if f.severity == "error"] == []
    assert (cfg.context_parallel_size, cfg.data_parallel_size) == (2, 2)
    # the Axolotl alias (a deprecated spelling, HB141) asks for the same
    cfg, findings = run(tmp_path, {"sequence_parallel_degree": 2, **PACKED}, world=4)
    assert cfg.context_parallel_size == 2 and "HB199" not in {f.code for f in findings}


@pytest.mark.parametrize(
    ("extra", "bad"),
    [
        ({**PACKED, "sequence_len": 250}, True),  # zigzag (packing's default): a multiple of 2 × 2
        ({**PACKED, "sequence_len": 254}, True),
        ({**PACKED, "sequence_len": 254, "ring_attn_func": "batch_ring"}, False),  # contiguous: of 2
        ({**PACKED, "sequence_len": 254, "context_parallel_strategy": "ulysses"}, False),
        ({**PACKED, "sequence_len": 255, "context_parallel_strategy": "ulysses"}, True),
        ({"sequence_len": 255}, False),  # rows of varying width: padded by the loop
        ({**PACKED, "sequence_len": 255, "pad_to_sequence_len": False}, False),
    ],
)
def test_hb153_sequence_len_the_layout_cannot_cut(tmp_path: Path, extra: dict[str, Any], bad: bool) -> None:
    assert found(tmp_path, {**CP2, **extra}, "HB153") == (["error:sequence_len"] if bad else [])


def test_hb153_names_the_multiple_and_a_length_that_works(tmp_path: Path) -> None:
    (hit,) = [f for f in run(tmp_path, {**CP2, **PACKED, "sequence_len": 250})[1] if f.code == "HB153"]
    assert "multiple of 4" in hit.message and "252" in (hit.fix or "")


def test_hb154_what_the_model_must_allow(tmp_path: Path) -> None:
    ulysses = {**CP2, **PACKED, "context_parallel_strategy": "ulysses"}
    assert found(tmp_path, ulysses, "HB154", heads=8, world=2) == []
    assert found(tmp_path, {**ulysses, "context_parallel_size": 4}, "HB154", heads=6, world=4) == [
        "error:context_parallel_strategy"
    ]
    # the ring takes any head count; heads_k_stride must divide the key/value heads
    assert found(tmp_path, {**CP2, **PACKED, "context_parallel_size": 4}, "HB154", heads=6, world=4) == []
    assert found(tmp_path, {**CP2, **PACKED, "heads_k_stride": 3}, "HB154", kv_heads=4) == [
        "error:heads_k_stride"
    ]
    dropout = {"overrides_of_model_config": {"attention_dropout": 0.1}}
    assert found(tmp_path, {**CP2, **PACKED, **dropout}, "HB154") == ["error:context_parallel_size"]


def test_hb155_ring_keys_with_ulysses_and_cp_keys_without_cp(tmp_path: Path) -> None:
    ulysses = {**CP2, **PACKED, "context_parallel_strategy": "ulysses"}
    assert found(tmp_path, {**ulysses, "ring_attn_func": "varlen_llama3"}, "HB155") == [
        "error:ring_attn_func"
    ]
    assert found(tmp_path, {**ulysses, "heads_k_stride": 1}, "HB155") == ["error:heads_k_stride"]
    assert found(tmp_path, {"context_parallel_strategy": "ring"}, "HB155", world=1) == [
        "warning:context_parallel_strategy"
    ]
    assert found(tmp_path, {"ring_attn_func": "batch_ring"}, "HB155", world=1) == ["warning:ring_attn_func"]
    assert found(tmp_path, {**CP2, **PACKED, "ring_attn_func": "batch_stripe"}, "HB155") == []


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"deepspeed": {"zero_optimization": {"stage": 2}}}, "deepspeed"),
        ({"torch_compile": True}, "torch_compile"),
        ({"cut_cross_entropy": True}, "loss_method"),
        ({"attn_implementation": "flex_attention"}, "attn_implementation"),
        ({"eval_table_size": 2, "val_set_size": 0.1}, "eval_table_size"),
    ],
)
def test_hb156_what_context_parallelism_does_not_run_with(
    tmp_path: Path, extra: dict[str, Any], key: str
) -> None:
    assert found(tmp_path, {**CP2, **PACKED, **extra}, "HB156") == [f"error:{key}"]
    assert found(tmp_path, {**PACKED, **extra}, "HB156") == []  # without CP: not this rule's business


def test_fsdp2_the_chunked_loss_and_eager_attention_run_with_context_parallelism(tmp_path: Path) -> None:
    extra = {**CP2, **PACKED, "chunked_cross_entropy": True, "attn_implementation": "eager"}
    assert found(tmp_path, extra, "HB156") == []
    fsdp2 = {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}}
    cfg, findings = run(tmp_path, {**extra, **fsdp2}, world=4)
    assert cfg.distributed_strategy == "fsdp2" and [f for f in findings if f.severity == "error"] == []


@pytest.mark.parametrize("func", [None, *AXOLOTL_RING_ATTN_FUNCS])
@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
@pytest.mark.parametrize("packing", [True, False])
def test_the_rule_and_the_loop_agree_on_the_layout(
    tmp_path: Path, func: str | None, strategy: str, packing: bool
) -> None:
    """config/ cannot import distributed/: the rule's multiple is checked against the plan here."""
    extra: dict[str, Any] = {"context_parallel_size": 4, "sample_packing": packing}
    if strategy == "ulysses":
        extra["context_parallel_strategy"] = "ulysses"
    elif func is not None:
        extra["ring_attn_func"] = func
    cfg, _ = run(tmp_path, extra, world=4)
    plan = plan_from_config(cfg)
    assert context_parallel_multiple(cfg) == shard_multiple(4, plan.layout)
    assert plan.strategy == strategy


# ---------------------------------------------------------------------------------------- ranks


def test_ranks_form_adjacent_context_parallel_groups() -> None:
    coords = [(w.dp_rank, w.cp_rank, w.dp_size) for w in (World(r, 8, r, cp_size=2) for r in range(8))]
    assert coords == [(0, 0, 4), (0, 1, 4), (1, 0, 4), (1, 1, 4), (2, 0, 4), (2, 1, 4), (3, 0, 4), (3, 1, 4)]
    assert (World().dp_rank, World().dp_size, World().cp_rank) == (0, 1, 0)


def samples() -> Samples:
    rows = []
    for n, length in enumerate([37, 50, 23, 61, 44, 30, 19]):
        ids = [(n * 7 + i) % 50 + 1 for i in range(length)]
        rows.append({"input_ids": ids, "labels": [-100] * 5 + ids[5:]})
    return Samples(rows)


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_a_cp_group_shares_each_micro_batch_and_its_shares_make_the_whole(
    tmp_path: Path, strategy: str
) -> None:
    extra = {
        "context_parallel_size": 2, "context_parallel_strategy": strategy, "sample_packing": True,
        "sequence_len": 128, "micro_batch_size": 1,
    }  # fmt: skip
    cfg, _ = run(tmp_path, extra, world=4)
    data = samples()
    sampler, whole_collate = batching(data, cfg, PAD)
    group = list(sampler)[:3]  # 3 micro-batches over 2 data-parallel ranks: rank 1 gets a filler
    layout = plan_from_config(cfg).layout
    for dp_rank in range(2):
        shares = []
        for cp_rank in range(2):
            world = World(dp_rank * 2 + cp_rank, 4, cp_size=2)
            _, collate = batching(data, cfg, PAD, world=world)
            assert isinstance(collate, ShardingCollator)
            shares.append(rank_batches(group, data, collate, world, torch.device("cpu")))
        mine = group[dp_rank::2]
        assert len(shares[0]) == len(shares[1]) == 2
        for index, (a, b) in enumerate(zip(*shares, strict=True)):
            filler = index >= len(mine)
            whole = whole_collate(data.rows(mine[index] if not filler else group[0]))
            assert torch.equal(a["cp_document_ids"], whole["document_ids"])
            ids = unshard_sequence([a["input_ids"], b["input_ids"]], layout)
            assert torch.equal(ids, whole["input_ids"])
            targets = unshard_sequence([a["shift_labels"], b["shift_labels"]], layout)
            expected = torch.full_like(targets, IGNORE_INDEX) if filler else shift_labels(whole["labels"])
            assert torch.equal(targets, expected)
            trained = int(a["num_trained_tokens"]) + int(b["num_trained_tokens"])
            assert trained == (0 if filler else int(whole["num_trained_tokens"]))
            assert (
                int(a["num_tokens"]) == (0 if filler else int(whole["num_tokens"]))
                and int(b["num_tokens"]) == 0
            )


def test_rows_of_varying_width_are_padded_to_a_length_the_layout_cuts(tmp_path: Path) -> None:
    cfg, _ = run(
        tmp_path, {"context_parallel_size": 2, "sequence_len": 128}, world=2
    )  # no packing: batch_ring
    data = samples()
    sampler, _ = batching(data, cfg, PAD)
    _, collate = batching(data, cfg, PAD, world=World(1, 2, cp_size=2))
    for micro_batch in list(sampler):
        local = collate(data.rows(micro_batch))
        assert local["cp_document_ids"].shape[1] % 2 == 0
        assert local["input_ids"].shape[1] * 2 == local["cp_document_ids"].shape[1]
    # DataLoader workers (dataloader_num_workers) receive the collator pickled
    again = pickle.loads(pickle.dumps(collate))
    first = data.rows(next(iter(sampler)))
    assert all(torch.equal(v, again(first)[k]) for k, v in collate(first).items())


# ---------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("method", ["plain", "chunked"])
def test_the_losses_take_pre_shifted_targets(method: str) -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 11, (2, 9))
    labels[:, :3] = IGNORE_INDEX
    logits = torch.randn(2, 9, 11)
    assert torch.equal(
        causal_lm_loss_sum(logits, shift_labels(labels), shifted=True), causal_lm_loss_sum(logits, labels)
    )

    model = build_tiny_model()
    ids = torch.randint(0, 100, (2, 9))
    inputs = {"input_ids": ids}
    want = build_loss(method)(model, inputs, labels)
    got = build_loss(method, shifted=True)(model, inputs, shift_labels(labels))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_the_fused_losses_refuse_pre_shifted_targets() -> None:
    with pytest.raises(ValueError, match="unshifted labels only"):
        build_loss("cut", shifted=True)
