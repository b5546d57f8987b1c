"""Liger kernels ≡ the PyTorch reference, run on CPU through Triton's interpreter.

Liger's kernels are Triton GPU kernels. ``TRITON_INTERPRET=1`` makes Triton execute the *same*
kernel source with numpy on the CPU, so the real kernels — and hellbender's patching of them into
a model — can be checked here against the plain path. The variable must be set before Triton is
imported (``@triton.jit`` decides at import time), so the check runs in a fresh subprocess.

Two small test-side shims make Liger's kernels runnable in the interpreter of Triton 3.7+ (they
change nothing on a GPU and are not part of hellbender):

* Python ``float`` kernel arguments (``eps``, ``offset``) reach the kernel as Python floats, which
  have no ``.to()``; compiled Triton passes them as fp32 scalars, so the shim does the same.
* ``libdevice`` functions are declarations only (bodies are ``...``) in the interpreter and return
  None; Liger's norms import ``rsqrt`` from libdevice, so it is pointed at ``tl.rsqrt``.

Precision: fp32 only (bf16 results are wrong under the interpreter). Tolerances: loss rtol 1e-5,
gradients rtol 1e-4 / atol 1e-6, as for hellbender's own kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("liger_kernel")
pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    r"""
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    _cvt = interp._implicit_cvt
    def _float_as_fp32(arg):
        if isinstance(arg, float):
            return tl.tensor(interp.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return _cvt(arg)
    interp._implicit_cvt = _float_as_fp32

    import liger_kernel.ops.layer_norm as liger_ln
    import liger_kernel.ops.rms_norm as liger_rms
    def _rsqrt(x):
        return tl.rsqrt(x)  # looked up at call time: the interpreter patches tl while a kernel runs
    liger_rms.rsqrt = _rsqrt
    liger_ln.rsqrt = _rsqrt

    import torch
    torch.set_num_threads(1)
    from transformers import StableLmConfig, StableLmForCausalLM
    from hellbender.testing.configs import resolved_config
    from hellbender.kernels import optimized
    from hellbender.testing.configs import loss_sum
    from hellbender.testing.probes import graph_node_names
    from hellbender.testing.tiny import build_tiny_model

    def stablelm():
        torch.manual_seed(0)
        cfg = StableLmConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return StableLmForCausalLM(cfg)

    CASES = {
        "liger_rms_norm": (lambda: build_tiny_model(vocab_size=300, seed=0), "LigerRMSNormFunctionBackward"),
        "liger_glu_activation": (lambda: build_tiny_model(vocab_size=300, seed=0),
                                 "LigerSiLUMulFunctionBackward"),
        "liger_rope": (lambda: build_tiny_model(vocab_size=300, seed=0), "LigerRopeFunctionBackward"),
        "liger_cross_entropy": (lambda: build_tiny_model(vocab_size=300, seed=0),
                                "LigerCrossEntropyFunctionBackward"),
        "liger_fused_linear_cross_entropy": (
            lambda: build_tiny_model(vocab_size=300, seed=0, tie_word_embeddings=True),
            "LigerFusedLinearCrossEntropyFunctionBackward",
        ),
        "liger_layer_norm": (stablelm, "LigerLayerNormFunctionBackward"),
    }
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 300, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100

    def step(model, cfg):
        model.zero_grad(set_to_none=True)
        loss = loss_sum(model, {"input_ids": ids}, labels, cfg)
        nodes = graph_node_names(loss)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, nodes

    out = {}
    for key in sys.argv[1:]:
        build, node = CASES[key]
        model = build().train()
        plain = resolved_config(base_model="tiny")
        ref_loss, ref_grads, _ = step(model, plain)
        cfg = resolved_config(base_model="tiny", **{key: True})
        with optimized(model, cfg):
            loss, grads, nodes = step(model, cfg)
        assert grads.keys() == ref_grads.keys()
        out[key] = {
            "node_seen": node in nodes,
            "loss": [loss.item(), ref_loss.item()],
            "grad_ok": all(torch.allclose(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6) for n in ref_grads),
            "max_grad_diff": max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads),
        }
    print("RESULT" + json.dumps(out))
    """
)

KEYS = [
    "liger_rms_norm",
    "liger_glu_activation",
    "liger_rope",
    "liger_cross_entropy",
    "liger_fused_linear_cross_entropy",
    "liger_layer_norm",
]


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict[str, object]]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *KEYS], env=env, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT"):])


@pytest.mark.parametrize("key", KEYS)
def test_liger_kernel_matches_plain_path_under_the_interpreter(interpreted: dict, key: str) -> None:
    result = interpreted[key]
    assert result["node_seen"], f"{key}: the Liger kernel did not run"
    loss, ref = result["loss"]
    assert loss == pytest.approx(ref, rel=1e-5)
    assert result["grad_ok"], result["max_grad_diff"]


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("key", KEYS)
def test_liger_kernel_matches_plain_path_on_gpu(key: str) -> None:
    import torch

    from hellbender.kernels import optimized
    from hellbender.testing.configs import loss_sum, resolved_config
    from hellbender.testing.tiny import build_tiny_model

    if key == "liger_layer_norm":
        pytest.skip("the tiny Llama has no LayerNorm; covered under the interpreter with StableLM")
    model = build_tiny_model(vocab_size=300, seed=0).cuda().train()
    ids = torch.randint(4, 300, (2, 12), device="cuda")
    plain = resolved_config(base_model="tiny")
    ref = loss_sum(model, {"input_ids": ids}, ids, plain)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    cfg = resolved_config(base_model="tiny", **{key: True})
    with optimized(model, cfg):
        got = loss_sum(model, {"input_ids": ids}, ids, cfg)
        grads = torch.autograd.grad(got, list(model.parameters()))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
