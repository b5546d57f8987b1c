"""When training attends per document, and the plan agrees with the run about it."""

from __future__ import annotations

import pytest

from hellbender.plan.estimate import layer_activation_bytes
from hellbender.plan.shapes import ModelShape
from hellbender.testing.configs import resolved_config


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, True),  # sdpa is the default backend
        ({"attn_implementation": "sdpa"}, True),
        ({"attn_implementation": "sdpa", "torch_compile": True}, False),
        ({"attn_implementation": "eager"}, False),
    ],
)
def test_per_document_attention_is_sdpa_uncompiled(options: dict, expected: bool) -> None:
    assert resolved_config(base_model="tiny", **options).per_document_attention is expected


def test_plan_counts_the_dense_mask_only_where_training_builds_it() -> None:
    """Per-document SDPA keeps no mask and no repeated k/v heads; a compiled run keeps both."""
    cfg = resolved_config(base_model="tiny", sequence_len=256)
    compiled = resolved_config(base_model="tiny", sequence_len=256, torch_compile=True)
    shape = ModelShape(
        model_type="llama", vocab=100, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
        head_dim=16, tied=True,
    )  # fmt: skip
    per_doc = layer_activation_bytes(shape, cfg, False, 256, False)
    dense = layer_activation_bytes(shape, compiled, False, 256, False)
    assert per_doc == layer_activation_bytes(shape, cfg, False, 256, False, dense_mask=False)
    assert dense == layer_activation_bytes(shape, cfg, False, 256, False, dense_mask=True)
    assert dense > per_doc
