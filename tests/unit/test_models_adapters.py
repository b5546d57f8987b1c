"""models.adapters: LoRA targets, rsLoRA/DoRA maths, continuing an adapter, QLoRA on CPU, merging,
gradient checkpointing. References are plain PyTorch computations on the same weights.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from hellbender.config.schema import ResolvedConfig
from hellbender.models.adapters import (
    apply_adapter,
    enable_gradient_checkpointing,
    linear_module_names,
    merge_adapter,
    trainable_parameter_names,
)
from hellbender.models.load import PickledWeightsError, load_model, load_tokenizer
from hellbender.testing.configs import resolved_config
from hellbender.testing.tiny import build_tiny_model, save_tiny_model_folder

SEED = 3


def make_cfg(**overrides: object) -> ResolvedConfig:
    values: dict[str, object] = {
        "base_model": "unused-for-apply-adapter",
        "compute_dtype": "float32",
        "attn_implementation": "sdpa",
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
    }
    values.update(overrides)
    return resolved_config(**values)


def randomize_lora_b(model: nn.Module, seed: int = 0) -> None:
    """peft initialises B = 0 (the adapter starts as a no-op); tests need a non-trivial update."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def lora_wrapped_modules(model: nn.Module) -> set[str]:
    """Names (relative to the original model) of modules carrying a LoRA adapter."""
    prefix = "base_model.model."
    return {
        name[len(prefix) :]
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and len(getattr(module, "lora_A", {})) > 0
    }


INPUT = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied", [False, True])
def test_target_linear_covers_every_linear_except_head(tied: bool) -> None:
    model = build_tiny_model(seed=SEED, tie_word_embeddings=tied)
    all_linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = all_linear - {"lm_head"}
    assert "lm_head" in all_linear and len(expected) == 7 * model.config.num_hidden_layers
    peft_model = apply_adapter(model, make_cfg(lora_target_linear=True))
    assert lora_wrapped_modules(peft_model) == expected
    # only adapter weights train; the base (including the head) is frozen
    assert all("lora_" in n for n in trainable_parameter_names(peft_model))


def test_linear_module_names_and_explicit_union() -> None:
    model = build_tiny_model(seed=SEED)
    assert linear_module_names(model) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    only_q = apply_adapter(build_tiny_model(seed=SEED), make_cfg(lora_target_modules=["q_proj"]))
    assert {n.rsplit(".", 1)[-1] for n in lora_wrapped_modules(only_q)} == {"q_proj"}
    with pytest.raises(ValueError, match="regex"):
        apply_adapter(
            build_tiny_model(seed=SEED), make_cfg(lora_target_linear=True, lora_target_modules=".*proj")
        )


def test_layers_to_transform_limits_the_layers() -> None:
    peft_model = apply_adapter(
        build_tiny_model(seed=SEED), make_cfg(lora_target_linear=True, peft_layers_to_transform=[1])
    )
    assert lora_wrapped_modules(peft_model)
    assert all(name.startswith("model.layers.1.") for name in lora_wrapped_modules(peft_model))


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_layer_output_matches_manual_formula(rslora: bool) -> None:
    base = build_tiny_model(seed=SEED)
    w = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    cfg = make_cfg(lora_target_modules=["q_proj"], lora_r=4, lora_alpha=8, peft_use_rslora=rslora)
    peft_model = apply_adapter(base, cfg)
    randomize_lora_b(peft_model)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    scale = 8 / math.sqrt(4) if rslora else 8 / 4
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(1))
    expected = x @ w.T + scale * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected)


def test_dora_layer_output_matches_manual_formula() -> None:
    base = build_tiny_model(seed=SEED)
    w = base.model.layers[0].mlp.up_proj.weight.detach().clone()
    peft_model = apply_adapter(base, make_cfg(lora_target_linear=True, peft_use_dora=True))
    assert any("lora_magnitude_vector" in n for n in trainable_parameter_names(peft_model))
    layer = peft_model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(2))
    # at initialisation DoRA is the identity on the base layer (m = ||W||, B = 0)
    torch.testing.assert_close(layer(x), x @ w.T)
    randomize_lora_b(peft_model)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1.5)
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    scale = 8 / 4
    adapted = w + scale * (b @ a)
    direction = adapted / adapted.norm(dim=1, keepdim=True)  # per output feature
    expected = x @ (m.unsqueeze(1) * direction).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def _train(model: nn.Module, steps: int, lr: float = 1e-2) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=INPUT, labels=INPUT).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_model_dir_continues_the_adapter(tmp_path: Path) -> None:
    folder = save_tiny_model_folder(tmp_path / "base", seed=SEED)
    cfg = make_cfg(base_model=str(folder), lora_target_linear=True)
    tokenizer = load_tokenizer(cfg)
    first = load_model(cfg, tokenizer)
    _train(first, steps=3)
    first.save_pretrained(tmp_path / "adapter")
    first.eval()
    with torch.no_grad():
        expected = first(INPUT).logits

    # continue: the lora_* keys below differ on purpose, the saved adapter_config must win
    cont_cfg = make_cfg(base_model=str(folder), lora_model_dir=str(tmp_path / "adapter"), lora_r=16)
    second = load_model(cont_cfg, tokenizer)
    second.eval()
    with torch.no_grad():
        torch.testing.assert_close(second(INPUT).logits, expected)
    assert trainable_parameter_names(second) == trainable_parameter_names(first)
    assert second.peft_config["default"].r == 4
    losses = _train(second, steps=2)
    assert losses[1] < losses[0]


def test_lora_model_dir_without_adapter_is_an_error() -> None:
    with pytest.raises(ValueError, match="adapter"):
        apply_adapter(build_tiny_model(seed=SEED), make_cfg(adapter=None, lora_model_dir="/nowhere"))


def test_pickled_adapter_is_refused_unless_opted_in(tmp_path: Path) -> None:
    """allow_pickle_weights guards lora_model_dir as it guards base_model: an adapter folder with
    only adapter_model.bin (a torch pickle) is refused, in the same words, before anything loads."""
    folder = save_tiny_model_folder(tmp_path / "base", seed=SEED)
    cfg = make_cfg(base_model=str(folder), lora_target_linear=True)
    tokenizer = load_tokenizer(cfg)
    first = load_model(cfg, tokenizer)
    randomize_lora_b(first)
    first.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    assert not list((tmp_path / "adapter").glob("*.safetensors"))
    first.eval()
    with torch.no_grad():
        expected = first(INPUT).logits

    pickled = make_cfg(base_model=str(folder), lora_model_dir=str(tmp_path / "adapter"))
    with pytest.raises(PickledWeightsError) as refused:
        load_model(pickled, tokenizer)
    message = str(refused.value)
    assert message.startswith("lora_model_dir: ") and str(tmp_path / "adapter") in message
    assert "adapter_model.bin" in message and "allow_pickle_weights: true" in message

    base_folder = save_tiny_model_folder(tmp_path / "pickled-base", seed=SEED, pickled=True)
    with pytest.raises(PickledWeightsError) as base_refused:
        load_model(make_cfg(base_model=str(base_folder)), tokenizer)
    same_words = "holds only pickled weights"
    assert same_words in message and same_words in str(base_refused.value)
    assert message.split(")", 1)[1] == str(base_refused.value).split(")", 1)[1]

    allowed = load_model(pickled.model_copy(update={"allow_pickle_weights": True}), tokenizer)
    allowed.eval()
    with torch.no_grad():
        torch.testing.assert_close(allowed(INPUT).logits, expected)


def test_merge_adapter_matches_unmerged_logits() -> None:
    peft_model = apply_adapter(build_tiny_model(seed=SEED), make_cfg(lora_target_linear=True))
    randomize_lora_b(peft_model)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(INPUT).logits
        merged = merge_adapter(peft_model)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(INPUT).logits, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- QLoRA


@pytest.fixture(scope="module")
def qlora_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # bitsandbytes quantizes in blocks of 64 inputs: the hidden size must be a multiple of 64.
    return save_tiny_model_folder(
        tmp_path_factory.mktemp("qlora") / "base", seed=SEED, hidden_size=64, intermediate_size=128
    )


def _dequantized_reference(qlora_model: nn.Module, folder: Path) -> nn.Module:
    """An fp32 LoRA model whose base linears hold exactly the dequantized 4-bit weights and whose
    adapter weights are copied from ``qlora_model``: it must compute the same loss and gradients."""
    import bitsandbytes as bnb

    cfg = make_cfg(base_model=str(folder), lora_target_linear=True)
    ref = load_model(cfg, load_tokenizer(cfg))
    with torch.no_grad():
        for name, module in qlora_model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                ref.get_submodule(name).weight.copy_(
                    bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                )
        q_params = dict(qlora_model.named_parameters())
        for name, p in ref.named_parameters():
            if p.requires_grad:
                p.copy_(q_params[name])
    return ref


def _loss_and_grads(model: nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    loss = model(input_ids=INPUT, labels=INPUT).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_qlora_on_cpu_matches_dequantized_reference_and_trains(qlora_folder: Path) -> None:
    import bitsandbytes as bnb

    cfg = make_cfg(base_model=str(qlora_folder), adapter="qlora", load_in_4bit=True, lora_target_linear=True)
    tokenizer = load_tokenizer(cfg)
    qlora = load_model(cfg, tokenizer)
    q_proj = qlora.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"

    # same trainable parameters as LoRA on the fp32 model
    fp32_cfg = make_cfg(base_model=str(qlora_folder), lora_target_linear=True)
    fp32_lora = load_model(fp32_cfg, tokenizer)
    assert trainable_parameter_names(qlora) == trainable_parameter_names(fp32_lora)

    randomize_lora_b(qlora)  # non-zero B, so every LoRA A gets a gradient
    ref = _dequantized_reference(qlora, qlora_folder)
    q_loss, q_grads = _loss_and_grads(qlora)
    r_loss, r_grads = _loss_and_grads(ref)
    assert q_loss == pytest.approx(r_loss, rel=1e-5)
    assert q_grads.keys() == r_grads.keys()
    for name in q_grads:
        torch.testing.assert_close(q_grads[name], r_grads[name], rtol=1e-4, atol=1e-6, msg=name)

    # an evaluation pass (eval mode, no grad) must not change later gradients (bitsandbytes 0.50
    # repacks weights for a CPU inference kernel without autograd; apply_adapter prevents it)
    qlora.eval()
    with torch.no_grad():
        qlora(INPUT)
    _, q_grads_after_eval = _loss_and_grads(qlora)
    for name in q_grads:
        torch.testing.assert_close(q_grads_after_eval[name], q_grads[name], msg=name)

    losses = _train(qlora, steps=6)
    assert losses[-1] < losses[0] - 0.05, losses


def test_merge_into_quantized_base_is_refused(qlora_folder: Path) -> None:
    cfg = make_cfg(base_model=str(qlora_folder), adapter="qlora", load_in_4bit=True, lora_target_linear=True)
    model = load_model(cfg, load_tokenizer(cfg))
    with pytest.raises(ValueError, match="quantized"):
        merge_adapter(model)


def test_qlora_without_4bit_is_refused() -> None:
    with pytest.raises(ValueError, match="load_in_4bit"):
        apply_adapter(build_tiny_model(seed=SEED), make_cfg(adapter="qlora", lora_target_linear=True))


# ------------------------------------------------------------------------------ checkpointing


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_on_peft_model_recomputes_and_keeps_gradients(reentrant: bool) -> None:
    plain = apply_adapter(build_tiny_model(seed=SEED), make_cfg(lora_target_linear=True))
    randomize_lora_b(plain)
    checkpointed = copy.deepcopy(plain)  # identical weights, LoRA A included
    kwargs = {"use_reentrant": True} if reentrant else None
    enable_gradient_checkpointing(checkpointed, kwargs)
    assert checkpointed.config.use_cache is False

    calls = {"n": 0}

    def count(*_: object) -> None:
        calls["n"] += 1

    # a pre-hook on a module early in layer 0 fires once in the forward and once more when the
    # backward recomputes the layer (a late module may be skipped by torch's early-stopping recompute)
    checkpointed.base_model.model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(count)
    _, grads_ckpt = _loss_and_grads(checkpointed)
    assert calls["n"] == 2, "checkpointing is not active: layer 0 was not recomputed"
    _, grads_plain = _loss_and_grads(plain)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], msg=name)


def test_checkpointing_default_is_non_reentrant() -> None:
    model = apply_adapter(build_tiny_model(seed=SEED), make_cfg(lora_target_linear=True))
    enable_gradient_checkpointing(model)
    layer = model.base_model.model.model.layers[0]
    assert layer.gradient_checkpointing
    assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}

