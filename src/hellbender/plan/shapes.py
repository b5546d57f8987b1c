"""The model's shape from its config.json (or GGUF header), and its parameter counts.

The planner never loads weights: every count here comes from the architecture's hyper-parameters,
and tests/unit/test_plan.py checks each family against the exact count of the model instantiated
on the meta device. Dense decoder-only families with Llama's layer layout are covered — Llama,
Mistral, Qwen2/2.5 (q/k/v biases), Qwen3 (q/k norms), Gemma and Gemma 2/3 (four norms per layer
in Gemma 2/3) — and anything else is refused by name rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hellbender.errors import OptionError

# model_type → (norms per decoder layer, q/k norms, q/k/v bias by default)
FAMILIES: dict[str, tuple[int, bool, bool]] = {
    "llama": (2, False, False),
    "mistral": (2, False, False),
    "qwen2": (2, False, True),
    "qwen3": (2, True, False),
    "gemma": (2, False, False),
    "gemma2": (4, False, False),
    "gemma3_text": (4, True, False),
}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanModelError(OptionError):
    """The model's architecture is not one the planner models."""


@dataclass(frozen=True)
class ModelShape:
    """What decides a decoder's memory: widths, depth, vocabulary, heads."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    norms_per_layer: int = 2
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False  # Llama's attention_bias biases o_proj too; Qwen2's q/k/v biases do not
    mlp_bias: bool = False

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_width),
            "k_proj": (h, self.kv_width),
            "v_proj": (h, self.kv_width),
            "o_proj": (self.q_width, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_linear_params(self) -> int:
        """Weights (and biases) of one layer's linear layers."""
        weights = sum(a * b for a, b in self.linear_shapes().values())
        bias = self.q_width + 2 * self.kv_width if self.qkv_bias else 0
        bias += self.hidden if self.o_bias else 0
        bias += 2 * self.intermediate + self.hidden if self.mlp_bias else 0
        return weights + bias

    def layer_other_params(self) -> int:
        """Norm weights of one layer (RMSNorm: one vector each)."""
        return self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """The LM head's own weights: none when it shares the embedding matrix."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        per_layer = self.layer_linear_params() + self.layer_other_params()
        return self.embedding_params + self.layers * per_layer + self.hidden + self.head_params


def model_shape(config: dict[str, Any], overrides: dict[str, Any] | None = None) -> ModelShape:
    """The shape of a model from its config dict (``overrides_of_model_config`` applied on top)."""
    values = {**config, **(overrides or {})}
    if isinstance(values.get("text_config"), dict):  # multimodal wrappers: the language model
        values = {**values["text_config"], **(overrides or {})}
    model_type = str(values.get("model_type", "?"))
    if model_type not in FAMILIES:
        raise PlanModelError(
            f"hellbender plan models the dense decoder families {', '.join(sorted(FAMILIES))}; "
            f"this model is {model_type!r}"
        )
    norms, qk_norm, qkv_bias = FAMILIES[model_type]
    try:
        hidden = int(values["hidden_size"])
        heads = int(values["num_attention_heads"])
        shape = ModelShape(
            model_type=model_type,
            vocab=int(values["vocab_size"]),
            hidden=hidden,
            intermediate=int(values["intermediate_size"]),
            layers=int(values["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(values.get("num_key_value_heads") or heads),
            head_dim=int(values.get("head_dim") or hidden // heads),
            tied=bool(values.get("tie_word_embeddings", model_type.startswith("gemma"))),
            norms_per_layer=norms,
            qk_norm=bool(values.get("qk_norm", qk_norm)),
            qkv_bias=bool(values.get("attention_bias", qkv_bias)) or qkv_bias,
            o_bias=bool(values.get("attention_bias", False)) and not qkv_bias,
            mlp_bias=bool(values.get("mlp_bias", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanModelError(f"the model config lacks or garbles {exc}: cannot count its parameters") from exc
    return shape
