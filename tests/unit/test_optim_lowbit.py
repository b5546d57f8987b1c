"""Low-bit and paged optimizers (bitsandbytes, torchao) and fp8 training (torchao float8), each
compared with the plain path on a tiny random Llama through the real training loop.

The tolerances are on the per-step training loss, relative to the plain run's loss at the same
step, over 12 steps at learning rate 3e-3 (every step's loss, max over the steps). They were
measured on this test's model and data (``MEASURED``) and set at about twice the measurement;
the runs are deterministic on CPU, so the margin only covers another CPU's float rounding.
A tolerance far below the next optimizer's measurement is what makes the test discriminate: 8-bit
state would fail paged_adamw_32bit's bound, 4-bit state the 8-bit bound.

* ``paged_adamw_32bit``: the same fp32 AdamW update as torch's (bitsandbytes' kernel, whose order
  of operations differs): identical to float rounding.
* 8-bit (``adamw_8bit``, ``paged_adamw_8bit``, ``adamw_torch_8bit``) and fp8 (``adamw_torch_fp8``)
  state: each moment is stored with a 1-byte code per value and one scale per 256-value block,
  ~1 % relative error per stored moment, which perturbs each update by about that much; the
  losses drift apart by ~5e-4 over 12 steps.
* 4-bit (``adamw_torch_4bit``): 16 levels per 128-value block; torchao's second-moment levels
  are linear and exclude 0, so a small second moment in a block with a large one rounds *up* to
  1/16 of it and that weight takes a smaller step than fp32 AdamW's: the loss falls more slowly,
  4 % above AdamW's by step 12 here.
* A trained embedding is left out (``unfrozen_parameters``): under torchao's 8-bit and fp8 state
  the rows of tokens missing from a batch can have their second moment rounded to 0 while the
  first moment is not, and their next update is lr × m / eps (3.7 instead of 0.005 on one value
  here): the losses then differ by 4-6 % (bitsandbytes' adamw_8bit: 0.05 %). The config warns
  about it (HB194).
* ``fp8: true``: e4m3 keeps 3 mantissa bits (relative rounding ≤ 2⁻⁴ per element), and the errors
  of a dot product of length K partly cancel (~1/√K); the loss differs by 3.5e-3 at most.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tests.unit.test_train_loop import PAD, make_cfg, make_samples

from hellbender.config.findings import Finding
from hellbender.config.hardware import Hardware
from hellbender.config.load import load_config
from hellbender.config.schema import BNB_OPTIMIZERS, TORCHAO_OPTIMIZERS
from hellbender.kernels import apply_optimizations, undo_optimizations
from hellbender.testing.tiny import build_tiny_model
from hellbender.train.loop import train
from hellbender.train.optim import STATE_BYTES_PER_PARAM, build_optimizer, state_bytes

pytest.importorskip("torchao")
pytest.importorskip("bitsandbytes")

LOW_BIT = [*BNB_OPTIMIZERS, *TORCHAO_OPTIMIZERS]
STEPS = 12
# hidden 64: the attention/MLP matrices (64×64), the embedding and the head have >= 4096 values,
# so every low-bit optimizer quantizes their state (smaller tensors keep fp32 state).
MODEL: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 64}
RUN: dict[str, Any] = {
    "max_steps": STEPS,
    "learning_rate": 3e-3,
    "lr_scheduler": "constant",
    "warmup_steps": 0,
    "micro_batch_size": 4,
    "weight_decay": 0.0,
    # The embedding stays frozen: with torchao's low-bit state a trained embedding gets outsized
    # updates on rows that miss a batch (HB194, test_hb194_... and the module docstring).
    "unfrozen_parameters": ["model.layers", "model.norm", "lm_head"],
}
SAMPLES = make_samples(8, seed=1)  # 2 micro-batches, seen 6 times: the loss falls from 5.7 to 3.9

# max over the 12 steps of |loss - plain loss| / plain loss, measured here (torch 2.13 CPU,
# bitsandbytes 0.50.2, torchao 0.18.0); the tolerances are 2-4× that (see the module docstring).
MEASURED = {
    "paged_adamw_32bit": 8.3e-8,
    "adamw_8bit": 5.0e-4,
    "paged_adamw_8bit": 5.0e-4,
    "adamw_torch_8bit": 4.2e-4,
    "adamw_torch_fp8": 4.2e-4,
    "adamw_torch_4bit": 0.040,
    "fp8": 3.5e-3,
}
TOLERANCE = {
    "paged_adamw_32bit": 1e-5,
    "adamw_8bit": 1.5e-3,
    "paged_adamw_8bit": 1.5e-3,
    "adamw_torch_8bit": 1.5e-3,
    "adamw_torch_fp8": 1.5e-3,
    "adamw_torch_4bit": 0.08,
    "fp8": 1e-2,
}


def run_losses(tmp_path: Path, **values: Any) -> list[float]:
    """Per-step training losses of the tiny model under ``values``, through the real loop (with
    :func:`apply_optimizations`, as ``hellbender train`` does)."""
    model = build_tiny_model(seed=0, **MODEL)
    cfg = make_cfg(tmp_path, **{**RUN, **values})
    apply_optimizations(model, cfg)
    result = train(cfg, model, SAMPLES, None, pad_token_id=PAD)
    assert result.global_step == STEPS
    return [result.losses[step] for step in sorted(result.losses)]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    return run_losses(tmp_path_factory.mktemp("plain"), optimizer="adamw_torch")


def gap(losses: list[float], reference: list[float]) -> float:
    assert len(losses) == len(reference) == STEPS
    return max(abs(a - b) / b for a, b in zip(losses, reference, strict=True))


# ---------------------------------------------------------------- optimizers


@pytest.mark.parametrize("name", LOW_BIT)
def test_low_bit_optimizer_trains_and_tracks_adamw(tmp_path: Path, plain: list[float], name: str) -> None:
    losses = run_losses(tmp_path, optimizer=name)
    assert losses[-1] < 0.9 * losses[0], "it trains"
    assert gap(losses, plain) <= TOLERANCE[name], f"measured here: {MEASURED[name]}"


@pytest.mark.parametrize(
    ("alias", "name"), [("ao_adamw_8bit", "adamw_torch_8bit"), ("adamw_bnb_8bit", "adamw_8bit")]
)
def test_axolotl_aliases_build_the_same_optimizer(alias: str, name: str) -> None:
    cfg = make_cfg(Path("."), optimizer=alias)
    assert cfg.optimizer == name
    assert type(build_optimizer(cfg, build_tiny_model(seed=0))) is type(
        build_optimizer(make_cfg(Path("."), optimizer=name), build_tiny_model(seed=0))
    )


@pytest.mark.parametrize("name", ["adamw_torch", *LOW_BIT])
def test_state_bytes_per_parameter_match_theory(name: str) -> None:
    """Measured from the state tensors after one step on a 1024×1024 weight (big enough that every
    low-bit optimizer quantizes it, and the per-tensor code books are < 0.2 % of it)."""
    layer = torch.nn.Linear(1024, 1024, bias=False)
    optimizer = build_optimizer(make_cfg(Path("."), optimizer=name), layer)
    layer(torch.randn(2, 1024)).sum().backward()
    optimizer.step()
    measured = state_bytes(optimizer) / layer.weight.numel()
    assert measured == pytest.approx(STATE_BYTES_PER_PARAM[name], rel=3e-3)


def test_state_bytes_counts_quantized_state_as_stored() -> None:
    """A torchao state tensor reports fp32 size through ``nbytes``; state_bytes reads its codes."""
    layer = torch.nn.Linear(1024, 1024, bias=False)
    optimizer = build_optimizer(make_cfg(Path("."), optimizer="adamw_torch_4bit"), layer)
    layer(torch.randn(2, 1024)).sum().backward()
    optimizer.step()
    exp_avg = optimizer.state[layer.weight]["exp_avg"]
    assert type(exp_avg).__name__ == "OptimState4bit"
    assert state_bytes(optimizer) < 0.15 * 2 * 4 * layer.weight.numel()


@pytest.mark.parametrize("name", TORCHAO_OPTIMIZERS)
def test_torchao_state_resumes_exactly(name: str) -> None:
    """The quantized state survives the checkpoint format (``torch.load(weights_only=True)``):
    3 steps, save, 3 more ≡ 6 straight steps, bit for bit."""

    def steps(layer: torch.nn.Linear, optimizer: torch.optim.Optimizer, seeds: range) -> None:
        for seed in seeds:
            x = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed))
            layer(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()

    cfg = make_cfg(Path("."), optimizer=name, learning_rate=1e-2)
    torch.manual_seed(0)
    straight = torch.nn.Linear(64, 64)
    resumed = torch.nn.Linear(64, 64)
    resumed.load_state_dict(straight.state_dict())
    opt_straight = build_optimizer(cfg, straight)
    steps(straight, opt_straight, range(6))

    first = build_optimizer(cfg, resumed)
    steps(resumed, first, range(3))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = build_optimizer(cfg, resumed)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    steps(resumed, second, range(3, 6))
    torch.testing.assert_close(resumed.weight, straight.weight, rtol=0, atol=0)


# ---------------------------------------------------------------- fp8


def test_fp8_trains_and_tracks_fp32(tmp_path: Path, plain: list[float]) -> None:
    losses = run_losses(tmp_path, optimizer="adamw_torch", fp8=True)
    assert losses[-1] < 0.9 * losses[0], "it trains"
    assert gap(losses, plain) <= TOLERANCE["fp8"], f"measured here: {MEASURED['fp8']}"


def test_fp8_converts_the_decoder_linears_to_torchao_float8linear_and_undoes() -> None:
    from torchao.float8.float8_linear import Float8Linear

    model = build_tiny_model(seed=0)
    keys = list(model.state_dict())
    linears = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    apply_optimizations(model, make_cfg(Path("."), fp8=True))
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == {n for n in linears if ".layers." in n}  # every decoder-layer linear
    assert type(model.lm_head) is torch.nn.Linear  # the head stays in high precision
    assert list(model.state_dict()) == keys  # checkpoints are unchanged
    undo_optimizations(model)
    assert not any(isinstance(m, Float8Linear) for m in model.modules())
    assert {n for n, m in model.named_modules() if type(m) is torch.nn.Linear} == linears


def test_fp8_keeps_the_parameters_the_optimizer_holds() -> None:
    model = build_tiny_model(seed=0)
    before = {name: id(p) for name, p in model.named_parameters()}
    apply_optimizations(model, make_cfg(Path("."), fp8=True))
    assert {name: id(p) for name, p in model.named_parameters()} == before


# ---------------------------------------------------------------- rules, through the config path

CPU = Hardware(description="CPU")
A100 = Hardware(cuda=True, cuda_bf16=True, description="simulated A100")
H100 = Hardware(cuda=True, cuda_bf16=True, cuda_fp8=True, description="simulated H100")
BASE: dict[str, Any] = {
    "base_model": "org/some-model",
    "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
}


def findings(tmp_path: Path, extra: dict[str, Any], hw: Hardware = CPU, world: int = 1) -> list[Finding]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**BASE, **extra}, sort_keys=False))
    return load_config(path, world_size=world, hardware=hw, strict=False)[1]


def hits(tmp_path: Path, extra: dict[str, Any], code: str, **kw: Any) -> list[Finding]:
    return [f for f in findings(tmp_path, extra, **kw) if f.code == code]


@pytest.mark.parametrize(
    "name", [*LOW_BIT, "adamw_bnb_8bit", "ao_adamw_8bit", "ao_adamw_4bit", "ao_adamw_fp8"]
)
def test_every_optimizer_validates_on_cpu(tmp_path: Path, name: str) -> None:
    errors = [f for f in findings(tmp_path, {"optimizer": name}) if f.severity == "error"]
    assert errors == []


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_hb195_paged_optimizer_without_cuda_is_said_to_not_page(tmp_path: Path, name: str) -> None:
    (hit,) = hits(tmp_path, {"optimizer": name}, "HB195")
    assert hit.severity == "info" and "CUDA" in hit.message and hit.key == "optimizer"
    assert not hits(tmp_path, {"optimizer": name}, "HB195", hw=A100)
    assert not hits(tmp_path, {"optimizer": "adamw_8bit"}, "HB195")


@pytest.mark.parametrize("name", TORCHAO_OPTIMIZERS)
@pytest.mark.parametrize("extra", [{}, {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}}])
def test_hb196_torchao_optimizer_only_in_one_process(
    tmp_path: Path, name: str, extra: dict[str, Any]
) -> None:
    assert [f.severity for f in hits(tmp_path, {"optimizer": name, **extra}, "HB196", hw=A100, world=2)] == [
        "error"
    ]
    assert not hits(tmp_path, {"optimizer": name}, "HB196", hw=A100, world=1)


@pytest.mark.parametrize("name", BNB_OPTIMIZERS)
def test_hb168_every_bitsandbytes_optimizer_refused_under_fsdp2(tmp_path: Path, name: str) -> None:
    fsdp2 = {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}}
    assert [f.severity for f in hits(tmp_path, {"optimizer": name, **fsdp2}, "HB168", hw=A100, world=2)] == [
        "error"
    ]
    assert not hits(tmp_path, {"optimizer": name}, "HB168", hw=A100, world=2)  # DDP


@pytest.mark.parametrize("extra", [{"optimizer": "adamw_torch_4bit"}, {"fp8": True}])
def test_hb197_torchao_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any]
) -> None:
    assert not hits(tmp_path, extra, "HB197")
    # importlib treats a None entry in sys.modules as "not importable": hidden, not mocked
    monkeypatch.setitem(sys.modules, "torchao", None)
    assert [f.severity for f in hits(tmp_path, extra, "HB197")] == ["error"]
    target = Hardware(cuda=True, cuda_bf16=True, cuda_fp8=True, description="H100 (target)", local=False)
    assert [f.severity for f in hits(tmp_path, extra, "HB197", hw=target)] == ["warning"]


def test_fp8_validates_on_cpu_and_fp8_gpus_not_older_gpus(tmp_path: Path) -> None:
    fp8 = {"fp8": True, "torch_compile": True}
    assert [f for f in findings(tmp_path, fp8) if f.severity == "error"] == []
    assert [f for f in findings(tmp_path, fp8, hw=H100) if f.severity == "error"] == []
    assert [f.code for f in findings(tmp_path, fp8, hw=A100) if f.severity == "error"] == ["HB105"]
    assert hits(tmp_path, {"fp8": True}, "HB104")  # without torch_compile: slow, said so


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"load_in_4bit": True, "adapter": "qlora"}, "load_in_4bit"),
        ({"load_in_8bit": True, "adapter": "lora"}, "load_in_8bit"),
        ({"deepspeed": "ds.json"}, "deepspeed"),
        ({"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}}, "FSDP2"),
        ({"adapter": "lora", "lora_target_linear": True, "lora_mlp_kernel": True}, "lora_mlp_kernel"),
    ],
)
def test_hb198_fp8_refused_where_it_cannot_work(tmp_path: Path, extra: dict[str, Any], says: str) -> None:
    (hit,) = hits(tmp_path, {"fp8": True, **extra}, "HB198", hw=H100, world=2)
    assert hit.severity == "error" and says in hit.message and hit.key == "fp8"
    assert not hits(tmp_path, extra, "HB198", hw=H100, world=2)


def test_hb198_not_raised_for_fp8_alone_or_with_ddp_or_lora(tmp_path: Path) -> None:
    assert not hits(tmp_path, {"fp8": True}, "HB198", hw=H100, world=2)
    assert not hits(tmp_path, {"fp8": True, "adapter": "lora", "lora_target_linear": True}, "HB198")


@pytest.mark.parametrize(
    ("extra", "warned"),
    [
        ({}, True),
        ({"unfrozen_parameters": ["model.layers"]}, False),
        ({"unfrozen_parameters": ["model.embed_tokens", "model.layers"]}, True),
        ({"adapter": "lora", "lora_target_linear": True}, False),
        ({"adapter": "lora", "lora_target_linear": True, "lora_modules_to_save": ["embed_tokens"]}, True),
    ],
)
def test_hb194_torchao_optimizer_with_trained_embeddings(
    tmp_path: Path, extra: dict[str, Any], warned: bool
) -> None:
    hit = hits(tmp_path, {"optimizer": "adamw_torch_8bit", **extra}, "HB194")
    assert [f.severity for f in hit] == (["warning"] if warned else [])
    for other in ("adamw_8bit", "adamw_torch_4bit"):
        assert not hits(tmp_path, {"optimizer": other, **extra}, "HB194")


def test_fp8_fsdp_float8_all_gather_is_refused_until_it_works(tmp_path: Path) -> None:
    extra = {"fp8": True, "fp8_enable_fsdp_float8_all_gather": True}
    (hit,) = hits(tmp_path, extra, "HB199", hw=H100)
    assert hit.key == "fp8_enable_fsdp_float8_all_gather"
