"""Context parallelism over N real ranks ≡ one process: attention, a whole Llama, document isolation.

Each world size (2 and 4) is one launch of N ranks, forked from the test process (gloo, one thread
per rank, a 60 s process-group timeout and a 90 s limit on the launch, after which the ranks are
killed: a hang fails in a minute or two, never blocks the suite). Every rank runs every scenario
and saves its share of the results; the test process puts the shares back together
(``unshard_sequence``) and compares them with one process computing the same thing densely
(``scaled_dot_product_attention`` with the document-causal mask; the same tiny Llama with
``attn_implementation="sdpa"``).

Scenarios, for cp ∈ {2, 4}:

* **attention**, ring (zigzag, contiguous, stripe) and Ulysses (contiguous, zigzag): the output
  and the gradients of q, k and v, on a packed batch whose documents straddle the chunk boundaries
  of every layout and on an unpacked one (a document per row, with padding); GQA (4 query heads
  over 2 K/V heads: at cp 4 Ulysses repeats the K/V heads); a ring that moves one K/V head at a
  time (``heads_k_stride`` 1);
* **model**, ring-zigzag and Ulysses-contiguous, packed and unpacked, against the dense model and
  against CP 1 (the same attention function in one process): a tiny Llama's logits, and
  its parameter gradients with the loss summed over each rank's tokens and divided by the *global*
  trained-token count, then all-reduced over the group; and the packed batch again with gradient
  checkpointing, where every layer's CP attention, exchanges included, re-runs inside the backward;
* **probe**: one document's tokens changed (a document on two ranks or more); every other token's
  logits, on every rank, must be bit-identical to the unchanged run of the same layout;
* **subgroups** (cp 4 world only): two rings of 2 ranks side by side ({0, 1} and {2, 3}), so the
  ring's translation of group positions into global ranks is exercised.

Tolerances: float32 throughout. The CP computation sums the same terms as the dense one in another
order (blockwise online softmax, gradient all-reduce), so it agrees to float32 rounding, not bit for
bit. Measured as max |CP − reference| / max |reference|: attention outputs and q/k/v gradients
≤ 5.5e-7 (allowed 2e-6), logits ≤ 5.4e-7 (Ulysses: 0, bit-identical) and parameter gradients
≤ 9.3e-7 (allowed 5e-6). That is the size of float32 rounding itself: against a float64 computation
of the same attention, the fp32 SDPA reference is off by up to 3.2e-7 and the ring by up to 3.0e-7
(Ulysses 4.7e-7), so the CP-vs-reference gap is the two roundings added, and the allowances are
~4× and ~5× what was measured (room for other BLAS builds, no room for a real bug: a wrong mask or
a lost block moves outputs by O(1)).

The probe compares two runs of the *same* layout and strategy, in which the other documents'
arithmetic is identical — a masked key adds an exact 0, and which rows and columns of a block are
computed depends only on document ids and positions, never on token values — so it demands exact
equality, and gets it for both strategies (the ring's merge order is the same in both runs; only a
comparison *across* layouts or against the dense reference is limited to rounding).
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from hellbender.data.packing import Collator
from hellbender.data.tokenize import IGNORE_INDEX
from hellbender.distributed.context_parallel import (
    ATTENTION_NAME,
    ContextParallelContext,
    ContextParallelPlan,
    Layout,
    Strategy,
    context_parallel_attention,
    model_inputs,
    register_context_parallel_attention,
    shard_batch,
    shard_sequence,
    unshard_sequence,
)
from hellbender.models import attention
from hellbender.testing.tiny import build_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_multi_rank_test_at_a_time")]

# (strategy, layout) pairs run at the attention level; the model runs the first of each strategy.
PLANS: list[tuple[Strategy, Layout]] = [
    ("ring", "zigzag"),
    ("ring", "contiguous"),
    ("ring", "stripe"),
    ("ulysses", "contiguous"),
    ("ulysses", "zigzag"),
]
MODEL_PLANS: list[tuple[Strategy, Layout]] = [("ring", "zigzag"), ("ulysses", "contiguous")]
DATA = ["packed", "unpacked"]
CHECKPOINTED = "packed-checkpointed"  # the packed batch, the model with gradient checkpointing
WIDTH = 32  # a multiple of 2 × 4: every layout of cp 2 and 4
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
VOCAB = 320
PROBED_DOC = 1  # row 0's second document: positions 7..19, across chunk boundaries at cp 2 and 4
LAUNCH_TIMEOUT = 90.0
ATTN_RTOL = 2e-6  # of the largest reference value (see the module docstring)
MODEL_RTOL = 5e-6


# ------------------------------------------------------------------------------- shared inputs


def samples(lengths: list[int], seed: int) -> list[dict[str, list[int]]]:
    """Random token documents; the first 3 labels of each are ignored (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(4, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 3 + ids[3:]})
    return out


def batch(kind: str) -> dict[str, torch.Tensor]:
    """A collated micro-batch of 2 rows × WIDTH: packed rows straddle every chunk boundary."""
    collate = Collator(3, sequence_len=WIDTH, pad_to_sequence_len=True, attn_implementation="sdpa")
    if kind == "packed":
        row0, row1 = samples([7, 13, 12], seed=1), samples([9, 15], seed=2)  # row 1 ends in padding
        return collate([row0, row1])
    return collate([samples([23], seed=3), samples([32], seed=4)])


def probed(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``data`` with every token of document PROBED_DOC changed (same length and positions)."""
    out = dict(data)
    inside = data["document_ids"] == PROBED_DOC
    out["input_ids"] = torch.where(inside, (data["input_ids"] - 4 + 101) % (VOCAB - 4) + 4, data["input_ids"])
    return out


def qkv(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (2, H, W, D), k and v (2, H_kv, W, D), and an output gradient (2, H, W, D)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, HEADS, WIDTH, HEAD_DIM, generator=g)
    k = torch.randn(2, KV_HEADS, WIDTH, HEAD_DIM, generator=g)
    v = torch.randn(2, KV_HEADS, WIDTH, HEAD_DIM, generator=g)
    return q, k, v, torch.randn(2, HEADS, WIDTH, HEAD_DIM, generator=g)


def tiny_llama() -> Any:
    return build_tiny_model(seed=0, initializer_range=0.1)


def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


# ------------------------------------------------------------------------------------ the ranks


def attention_case(
    strategy: Strategy, layout: Layout, kind: str, group: Any, stride: int | None = None
) -> dict[str, torch.Tensor]:
    """This rank's attention output and q/k/v gradients on its share of the data."""
    data = batch(kind)
    plan = ContextParallelPlan(strategy, layout, stride)
    cp = ContextParallelContext(data["document_ids"], plan, group=group)
    q, k, v, grad = qkv(seed=5)
    local = [shard_sequence(t, cp.size, cp.rank, layout, dim=2).requires_grad_() for t in (q, k, v)]
    out = context_parallel_attention(local[0], local[1], local[2], cp, scale=HEAD_DIM**-0.5)
    out.backward(shard_sequence(grad, cp.size, cp.rank, layout, dim=2))
    return {
        "out": out.detach(),
        **{f"d{n}": t.grad for n, t in zip("qkv", local, strict=True) if t.grad is not None},
    }


def model_case(
    strategy: Strategy, layout: Layout, kind: str, probe: bool = False, checkpointing: bool = False
) -> dict[str, torch.Tensor]:
    """This rank's logits and (rank 0's copy of) the all-reduced parameter gradients.

    ``checkpointing``: HF gradient checkpointing, so every layer's CP attention (its exchanges
    included) runs again inside the backward, in the same order on every rank.
    """
    import torch.distributed as dist

    data = probed(batch(kind)) if probe else batch(kind)
    cp = ContextParallelContext(data["document_ids"], ContextParallelPlan(strategy, layout))
    local = shard_batch(data, cp.size, cp.rank, layout)
    model = tiny_llama()
    model.set_attn_implementation(ATTENTION_NAME)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.train()
    logits = model(**model_inputs(local, cp)).logits
    result = {"logits": logits.detach()}
    if not probe:
        trained = local["num_trained_tokens"].clone()  # this share's; summed: the batch's, as the loop does
        dist.all_reduce(trained)
        assert int(trained) == int(data["num_trained_tokens"])
        (loss_sum(logits, local["shift_labels"]) / trained).backward()
        for name, param in model.named_parameters():
            assert param.grad is not None, name
            dist.all_reduce(param.grad)  # gradients summed over the CP group
            result[f"grad.{name}"] = param.grad
    return result


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    register_context_parallel_attention()
    results: dict[str, torch.Tensor] = {}

    def record(prefix: str, values: dict[str, torch.Tensor]) -> None:
        results.update({f"{prefix}/{key}": value for key, value in values.items()})

    for strategy, layout in PLANS:
        for kind in DATA:
            record(f"attn/{strategy}/{layout}/{kind}", attention_case(strategy, layout, kind, None))
    record("attn/ring/zigzag/packed/stride1", attention_case("ring", "zigzag", "packed", None, stride=1))
    for strategy, layout in MODEL_PLANS:
        for kind in DATA:
            record(f"model/{strategy}/{layout}/{kind}", model_case(strategy, layout, kind))
        checkpointed = model_case(strategy, layout, "packed", checkpointing=True)
        record(f"model/{strategy}/{layout}/{CHECKPOINTED}", checkpointed)
        record(f"probe/{strategy}/{layout}", model_case(strategy, layout, "packed", probe=True))
    if world == 4:  # two rings of two ranks side by side: every rank must create every group
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        record("subgroup/ring/zigzag/packed", attention_case("ring", "zigzag", "packed", pairs[rank // 2]))
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """A forked rank: any failure is written where :func:`launch` reads it, then the exit code is 1."""
    try:
        worker(rank, world, init_file, out_dir)
    except BaseException:
        (Path(out_dir) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def launch(world: int, folder: Path) -> None:
    """Run ``world`` ranks of :func:`worker`, which save their results in ``folder``.

    The ranks are *forked* from this process, which has imported torch and transformers already:
    starting fresh interpreters instead costs ~10 s of imports per rank on a loaded 2-core machine
    (measured: 33 s for 2 ranks, 62 s for 4, against ~1 s of actual work). Nothing here has started
    threads that a fork could break: no process group exists in this process, and torch runs one
    intra-op thread (tests/conftest.py).
    """
    import torch.distributed as dist

    assert not dist.is_initialized(), "a forked rank would inherit this process's process group"
    folder.mkdir(parents=True, exist_ok=True)
    init = folder / "rendezvous"
    context = multiprocessing.get_context("fork")
    procs = [
        context.Process(target=run_rank, args=(rank, world, str(init), str(folder)), daemon=True)
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    errors = {
        rank: (folder / f"rank{rank}.error").read_text()[-3000:]
        for rank in range(world)
        if (folder / f"rank{rank}.error").exists()
    }
    codes = [proc.exitcode for proc in procs]
    assert codes == [0] * world and not errors, (codes, errors)


class Runs:
    """Each world size launched once per test session, when a test first needs it.

    Under pytest-xdist every worker has its own module fixtures, so the results live in the
    session's shared temporary folder: the first worker to need a world size launches it (holding
    the multi-rank lock, as every test here does) and the others load what it saved.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[int, list[dict[str, torch.Tensor]]] = {}

    def __call__(self, world: int) -> list[dict[str, torch.Tensor]]:
        if world not in self.done:
            folder = self.root / f"cp{world}"
            if not (folder / "complete").exists():
                launch(world, folder)
                (folder / "complete").touch()
            self.done[world] = [torch.load(folder / f"rank{rank}.pt") for rank in range(world)]
        return self.done[world]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    base = tmp_path_factory.getbasetemp()
    # xdist workers' base folders (…/pytest-N/popen-gwK) share their parent, which is this session's
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return Runs(shared / "context-parallel-runs")


# ------------------------------------------------------------------------------------- the tests


def reference_attention(kind: str) -> dict[str, torch.Tensor]:
    q, k, v, grad = (t.clone() for t in qkv(seed=5))
    for t in (q, k, v):
        t.requires_grad_()
    mask = attention.document_causal_mask(batch(kind)["document_ids"])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=HEAD_DIM**-0.5, enable_gqa=True)
    out.backward(grad)
    assert q.grad is not None and k.grad is not None and v.grad is not None
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def gathered(shares: list[torch.Tensor], layout: Layout, dim: int) -> torch.Tensor:
    return unshard_sequence(shares, layout, dim=dim)


def assert_close_relative(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> float:
    """max |got − want| ≤ rtol · max |want|; returns the measured ratio."""
    ratio = float((got - want).abs().max() / want.abs().max())
    assert ratio <= rtol, f"{what}: max error {ratio:.2e} of the largest value, allowed {rtol:.0e}"
    return ratio


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", DATA)
@pytest.mark.parametrize(("strategy", "layout"), PLANS)
def test_attention_and_its_gradients_equal_one_process(
    runs: Runs, world: int, kind: str, strategy: Strategy, layout: Layout
) -> None:
    results = runs(world)
    want = reference_attention(kind)
    for name, reference in want.items():
        shares = [r[f"attn/{strategy}/{layout}/{kind}/{name}"] for r in results]
        assert_close_relative(gathered(shares, layout, dim=2), reference, ATTN_RTOL, f"{name}, cp {world}")


@pytest.mark.parametrize("world", [2, 4])
def test_a_ring_moving_one_kv_head_at_a_time_and_rings_on_subgroups_are_exact(runs: Runs, world: int) -> None:
    results = runs(world)
    want = reference_attention("packed")
    cases: list[tuple[str, list[dict[str, torch.Tensor]]]] = [("attn/ring/zigzag/packed/stride1", results)]
    if world == 4:
        cases += [("subgroup/ring/zigzag/packed", results[:2]), ("subgroup/ring/zigzag/packed", results[2:])]
    for prefix, group in cases:
        for name, reference in want.items():
            shares = [r[f"{prefix}/{name}"] for r in group]
            assert_close_relative(gathered(shares, "zigzag", dim=2), reference, ATTN_RTOL, f"{prefix} {name}")


def reference_model(
    kind: str, plan: ContextParallelPlan | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One process: the dense sdpa model, or with ``plan`` the CP attention on a group of one (CP 1)."""
    data = batch(kind)
    model = tiny_llama()
    if plan is None:
        model.set_attn_implementation("sdpa")
        inputs = attention.model_inputs(data, "sdpa")
    else:
        register_context_parallel_attention()
        model.set_attn_implementation(ATTENTION_NAME)
        inputs = model_inputs(
            shard_batch(data, 1, 0, plan.layout), ContextParallelContext(data["document_ids"], plan)
        )
    logits = model(**inputs).logits
    (loss_sum(logits[:, :-1], data["labels"][:, 1:]) / data["num_trained_tokens"]).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", [*DATA, CHECKPOINTED])
@pytest.mark.parametrize(("strategy", "layout"), MODEL_PLANS)
@pytest.mark.parametrize("one_process", ["sdpa", "cp1"])
def test_a_llama_gives_the_logits_and_gradients_of_one_process(
    runs: Runs, world: int, kind: str, strategy: Strategy, layout: Layout, one_process: str
) -> None:
    """CP N ≡ the dense model, and CP N ≡ CP 1 (the same attention function on a group of one)."""
    results = runs(world)
    prefix = f"model/{strategy}/{layout}/{kind}"
    plan = ContextParallelPlan(strategy, layout) if one_process == "cp1" else None
    logits, grads = reference_model(kind.removesuffix("-checkpointed"), plan)
    shares = [r[f"{prefix}/logits"] for r in results]
    assert_close_relative(gathered(shares, layout, dim=1), logits, MODEL_RTOL, "logits")
    assert len(grads) == sum(key.startswith(f"{prefix}/grad.") for key in results[0])
    for name, want in grads.items():
        for rank, r in enumerate(results):  # the all-reduce left every rank the same gradient
            assert_close_relative(r[f"{prefix}/grad.{name}"], want, MODEL_RTOL, f"{name} on rank {rank}")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(("strategy", "layout"), MODEL_PLANS)
def test_changing_one_document_leaves_every_other_documents_logits_bit_identical(
    runs: Runs, world: int, strategy: Strategy, layout: Layout
) -> None:
    results = runs(world)
    docs = batch("packed")["document_ids"]
    holders = [
        rank for rank in range(world) if (shard_sequence(docs, world, rank, layout) == PROBED_DOC).any()
    ]
    assert len(holders) >= 2  # the probed document straddles a chunk boundary
    changed_any = False
    for rank, r in enumerate(results):
        before, after = r[f"model/{strategy}/{layout}/packed/logits"], r[f"probe/{strategy}/{layout}/logits"]
        other = shard_sequence(docs, world, rank, layout) != PROBED_DOC  # (rows, local tokens)
        assert torch.equal(before[other], after[other]), f"rank {rank}: another document's logits moved"
        changed_any |= not torch.equal(before[~other], after[~other])
    assert changed_any  # the probe did change the probed document itself
