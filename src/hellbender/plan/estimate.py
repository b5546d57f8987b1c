"""Peak memory of one training rank, predicted from the config and the model's shape alone.

The prediction is a sum of named components, each a formula in the config's numbers, grouped
into the three moments where training memory peaks:

``forward``   the runtime, the weights and the optimizer state (alive from the first step on),
              every activation autograd keeps for the backward, the attention mask, and the
              logits and loss workspace (the loss's own peak sits at the end of the forward);
``backward``  the same with the loss's gradients instead, the first gradients of the backward,
              and with gradient checkpointing one layer's activations recomputed;
``optimizer`` the runtime, the weights, every gradient, the optimizer state and the update's
              own temporaries (torch's foreach AdamW makes one full-size temporary).

The peak is the largest of the three. Activations per layer are exact counts of what autograd
saves in a transformers Llama layer (checked against :func:`hellbender.testing.probes.saved_storage_bytes`
in tests/unit/test_plan.py): ``4·(8h + 4i + 2kv + n + 2)`` bytes per token in fp32 for full
fine-tuning with SDPA (h hidden, i intermediate, kv the key/value width, n heads), fewer with
LoRA (the frozen linears keep nothing of their own), ``4h`` with gradient checkpointing.

Runtime (CPU target): the resident set of the Python process before the model loads — the
interpreter, torch, transformers, datasets, the tokenizer and the prepared data — and the glibc
heap's slack. Measured, not derived: :data:`CPU_RUNTIME_BYTES` and :data:`CPU_SLACK` come from
bench/plan_accuracy.py (the measured table is in docs/memory.md). On a GPU target the device
holds no Python runtime: the CUDA context (:data:`CUDA_CONTEXT_BYTES`) takes its place, and the
caching allocator's rounding is the slack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from hellbender.config.deepspeed import offloads, read_deepspeed_config, zero_stage
from hellbender.config.schema import PLAIN_CAUSAL_ATTENTION_MODELS, ResolvedConfig
from hellbender.plan.shapes import LINEAR_NAMES, ModelShape, PlanModelError, model_shape

Phase = Literal["load", "forward", "backward", "optimizer"]
ALL_BUT_LOAD: tuple[Phase, ...] = ("forward", "backward", "optimizer")
MiB = 2**20
GiB = 2**30

# The process before the model: interpreter + torch + transformers + datasets + tokenizer + data
# (measured with /proc/self/status after data preparation; bench/plan_accuracy.py).
CPU_RUNTIME_BYTES = 520 * MiB
# A tokenizer's vocabulary costs resident memory in the fast tokenizer and its Python views.
CPU_RUNTIME_PER_VOCAB_ENTRY = 0
# What the first training step adds for good, whatever the model's size (the same ~220 MiB for a
# 23M and a 135M model, measured): oneDNN/MKL kernels and their caches, autograd's threads,
# per-thread scratch buffers.
CPU_FIRST_STEP_BYTES = 220 * MiB
# glibc keeps the temporaries a LoRA forward frees (see predict): × the adapted outputs' bytes.
LORA_HEAP_RETENTION = 1.5
# glibc keeps freed small blocks in its heap; what training frees is not all returned at once.
CPU_SLACK = 1.0
# torch.distributed + gloo per rank, DeepSpeed's import on top of it.
DISTRIBUTED_RUNTIME_BYTES = 60 * MiB
DEEPSPEED_RUNTIME_BYTES = 150 * MiB
CUDA_CONTEXT_BYTES = 600 * MiB  # CUDA context + kernels, outside torch's allocator
CUDA_ALLOCATOR_SLACK = 1.05  # caching allocator: block rounding and fragmentation (expandable segments)

# Optimizer state per trainable parameter, bytes; and the update's temporaries (same unit).
OPTIMIZER_STATE_BYTES: dict[str, float] = {
    "adamw_torch": 8.0,
    "adamw_torch_fused": 8.0,
    "adamw_8bit": 2.03,  # measured: block-wise absmax besides the two 8-bit moments
    "paged_adamw_8bit": 2.03,
    "paged_adamw_32bit": 8.0,
    "adamw_torch_8bit": 2.03,
    "adamw_torch_4bit": 1.06,
    "adamw_torch_fp8": 2.03,
    "sgd": 0.0,
}
OPTIMIZER_STEP_BYTES: dict[str, float] = {"adamw_torch": 4.0}  # foreach: one fp32 temporary


@dataclass(frozen=True)
class Component:
    """One named part of a rank's memory, in bytes, and the phases it is alive in."""

    name: str
    bytes: int
    phases: tuple[Phase, ...]
    detail: str = ""


@dataclass
class Plan:
    """The prediction: components, the peak, and the phase where it happens."""

    target: str
    components: list[Component] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    slack: float = 1.0

    def phase_bytes(self, phase: Phase) -> int:
        return int(self.slack * sum(c.bytes for c in self.components if phase in c.phases))

    @property
    def peak_phase(self) -> Phase:
        phases: tuple[Phase, ...] = ("load", "forward", "backward", "optimizer")
        return max(phases, key=self.phase_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.phase_bytes(self.peak_phase)

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "peak_bytes": self.peak_bytes,
            "peak_phase": self.peak_phase,
            "phases": {p: self.phase_bytes(p) for p in ("load", "forward", "backward", "optimizer")},
            "components": {c.name: c.bytes for c in self.components},
            "component_phases": {c.name: list(c.phases) for c in self.components},
            "slack": self.slack,
            "notes": self.notes,
        }


@dataclass(frozen=True)
class Sharding:
    """How many ways each kind of model state is split over the ranks."""

    weights: int = 1
    gradients: int = 1
    optimizer: int = 1
    activations: int = 1  # context/tensor parallel split the sequence or the layer
    description: str = "one process"
    grad_buckets: bool = False  # DDP keeps its gradients in flat buckets besides .grad


def sharding(cfg: ResolvedConfig) -> Sharding:
    """The split of weights, gradients and optimizer state for the config's strategy."""
    dp = max(1, cfg.data_parallel_size)
    model_parallel = max(1, cfg.context_parallel_size) * max(1, cfg.tensor_parallel_size)
    tp = max(1, cfg.tensor_parallel_size)
    if cfg.world_size <= 1:
        return Sharding(activations=model_parallel)
    if cfg.distributed_strategy == "fsdp2":
        return Sharding(dp * tp, dp * tp, dp * tp, model_parallel, f"FSDP2 over {dp} ranks")
    if cfg.distributed_strategy == "deepspeed" and cfg.deepspeed is not None:
        stage = zero_stage(read_deepspeed_config(cfg.deepspeed))
        return Sharding(
            weights=dp if stage >= 3 else 1,
            gradients=dp if stage >= 2 else 1,
            optimizer=dp if stage >= 1 else 1,
            activations=model_parallel,
            description=f"DeepSpeed ZeRO-{stage} over {dp} ranks",
        )
    return Sharding(tp, tp, tp, model_parallel, f"DDP over {dp} ranks", grad_buckets=True)


def lora_targets(cfg: ResolvedConfig) -> list[str]:
    """The decoder linears that get a LoRA adapter."""
    if cfg.lora_target_linear:
        return list(LINEAR_NAMES)
    modules = cfg.lora_target_modules
    names = [modules] if isinstance(modules, str) else list(modules or [])
    return [n for n in LINEAR_NAMES if n in names] or (["q_proj", "v_proj"] if not names else [])


def lora_params(shape: ModelShape, cfg: ResolvedConfig) -> int:
    """Trainable LoRA (and DoRA magnitude) parameters over all layers."""
    shapes = shape.linear_shapes()
    per_layer = 0
    for name in lora_targets(cfg):
        fan_in, fan_out = shapes[name]
        per_layer += cfg.lora_r * (fan_in + fan_out) + (fan_out if cfg.peft_use_dora else 0)
    return per_layer * shape.layers


def _weight_bytes(shape: ModelShape, cfg: ResolvedConfig, frozen_bytes: int) -> tuple[int, str]:
    """Bytes of the base weights (frozen or trained), and how they are stored."""
    linear = shape.layers * shape.layer_linear_params()
    rest = shape.total_params - linear
    if cfg.load_in_4bit:
        # NF4: half a byte per weight, plus one fp32 absmax per 64-weight block (0.0625 B/weight;
        # double quantization shrinks that to ~0.127/4), stored as compute-dtype bytes.
        return int(linear * (0.5 + 0.0625) + rest * frozen_bytes), "4-bit linears"
    if cfg.load_in_8bit:
        return int(linear * (1 + 4 / 4096) + rest * frozen_bytes), "8-bit linears"
    return shape.total_params * frozen_bytes, f"{frozen_bytes} B/weight"


def layer_activation_bytes(
    shape: ModelShape,
    cfg: ResolvedConfig,
    bf16: bool,
    tokens: int,
    lora: bool,
    *,
    dense_mask: bool | None = None,
) -> int:
    """What autograd keeps for one decoder layer's backward over ``tokens`` tokens, no checkpointing.

    ``dense_mask``: whether attention gets a dense (B, 1, L, L) mask (default: with SDPA, as
    hellbender's document-isolating inputs always give it)."""
    h, i, kv, n = shape.hidden, shape.intermediate, shape.kv_width, shape.heads
    if bf16:  # autocast: matmul outputs in bf16, norms and softmax statistics in fp32
        per_token = 30 * h + 8 * i + 4 * kv + 4 * n + 8
    else:
        per_token = 32 * h + 16 * i + 8 * kv + 4 * n + 8
    if lora:
        # Frozen norm weights save no normalized input (2h); each adapter keeps its r-wide middle.
        per_token -= 8 * h if not bf16 else 6 * h
        targets = set(lora_targets(cfg))
        per_token += len(targets) * cfg.lora_r * (2 if bf16 else 4)
        # A frozen linear saves no input of its own: the inputs of the groups without an adapter
        # go (measured: exact for all linears, within ~3% for subsets such as q/v, where autograd
        # keeps one more hidden-sized tensor on the path to the adapters).
        unsaved = 0
        unsaved += h if not targets & {"q_proj", "k_proj", "v_proj"} else 0
        unsaved += shape.q_width if "o_proj" not in targets else 0
        unsaved += h if not targets & {"gate_proj", "up_proj"} else 0
        unsaved += i if "down_proj" not in targets else 0
        if unsaved:
            per_token -= (unsaved - h) * (2 if bf16 else 4)
    if cfg.tiled_mlp:
        per_token -= (8 if bf16 else 16) * i  # the MLP is recomputed shard by shard in the backward
    if cfg.attn_implementation == "eager":
        # repeated k/v heads and the (heads × keys) probabilities per query
        extra = 2 * (shape.q_width - kv) + n * cfg.sequence_len
        per_token += extra * (2 if bf16 else 4)
    elif dense_mask if dense_mask is not None else _dense_sdpa_mask(cfg, shape):
        # SDPA given hellbender's (B, 1, L, L) document mask: transformers repeats the k/v heads
        # (no enable_gqa with a mask) and the kernel keeps a float copy of the mask per layer
        per_token += 2 * (shape.q_width - kv) * (2 if bf16 else 4) + cfg.sequence_len * (2 if bf16 else 4)
    return tokens * per_token


def _dense_sdpa_mask(cfg: ResolvedConfig, shape: ModelShape) -> bool:
    """SDPA gets hellbender's dense (B, 1, L, L) document mask, rather than one causal call per
    document (``cfg.per_document_attention``, for the plain-attention families)."""
    if cfg.attn_implementation != "sdpa":
        return False
    return not (cfg.per_document_attention and shape.model_type in PLAIN_CAUSAL_ATTENTION_MODELS)


def predict(shape: ModelShape, cfg: ResolvedConfig, *, target: str = "cpu", bf16: bool | None = None) -> Plan:
    """Predict the peak memory of one rank training ``cfg`` on ``shape`` (see the module doc)."""
    gpu = target != "cpu"
    bf16 = cfg.compute_dtype in ("bfloat16", "float16") if bf16 is None else bf16
    plan = Plan(target=target, slack=CUDA_ALLOCATOR_SLACK if gpu else CPU_SLACK)
    split = sharding(cfg)
    lora = cfg.adapter in ("lora", "qlora")
    frozen_bytes = 2 if bf16 else 4

    # Runtime
    if gpu:
        plan.components.append(
            Component("cuda context", CUDA_CONTEXT_BYTES, ("load", "forward", "backward", "optimizer"))
        )
    else:
        runtime = CPU_RUNTIME_BYTES + CPU_RUNTIME_PER_VOCAB_ENTRY * shape.vocab
        if cfg.world_size > 1:
            runtime += DISTRIBUTED_RUNTIME_BYTES
        if cfg.distributed_strategy == "deepspeed":
            runtime += DEEPSPEED_RUNTIME_BYTES
        plan.components.append(
            Component(
                "runtime",
                runtime,
                ("load", "forward", "backward", "optimizer"),
                "python, torch, tokenizer, data",
            )
        )
        plan.components.append(
            Component("torch kernels and workspaces", CPU_FIRST_STEP_BYTES, ALL_BUT_LOAD)
        )

    # Weights, trainable parameters, gradients, optimizer state
    everything: tuple[Phase, ...] = ("load", "forward", "backward", "optimizer")
    if lora:
        base, how = _weight_bytes(shape, cfg, frozen_bytes)
        trainable = lora_params(shape, cfg)
        plan.components.append(Component("base weights (frozen)", base // split.weights, everything, how))
        plan.components.append(
            Component(
                "adapter weights (fp32)",
                4 * trainable // split.weights,
                everything,
                f"{trainable:,} parameters",
            )
        )
    else:
        trainable = shape.total_params
        plan.components.append(
            Component(
                "weights (fp32, trained)",
                4 * trainable // split.weights,
                everything,
                f"{trainable:,} parameters",
            )
        )
    grads = 4 * trainable // split.gradients
    # With checkpointing the backward ends holding every gradient besides the last recompute;
    # without, the activations it frees make room for them.
    grad_phases: tuple[Phase, ...] = ("optimizer",)
    if cfg.gradient_checkpointing:
        grad_phases = ("backward", "optimizer")
    plan.components.append(Component("gradients", grads, grad_phases, "fp32"))
    if split.grad_buckets:
        plan.components.append(Component("DDP gradient buckets", 4 * trainable, ("backward", "optimizer")))
    state_per_param = OPTIMIZER_STATE_BYTES.get(cfg.optimizer, 8.0)
    plan.components.append(
        Component(
            f"optimizer state ({cfg.optimizer})",
            int(state_per_param * trainable) // split.optimizer,
            ("forward", "backward", "optimizer"),
            f"{state_per_param:g} B/parameter",
        )
    )
    step_bytes = OPTIMIZER_STEP_BYTES.get(cfg.optimizer, 0.0)
    if step_bytes:
        plan.components.append(
            Component(
                "optimizer step temporaries", int(step_bytes * trainable) // split.optimizer, ("optimizer",)
            )
        )

    # Activations
    tokens = cfg.micro_batch_size * cfg.sequence_len // split.activations
    per_layer = layer_activation_bytes(shape, cfg, bf16, tokens, lora)
    act_bytes = 2 if bf16 else 4
    if cfg.gradient_checkpointing:
        kept = shape.layers * tokens * shape.hidden * act_bytes
        how = "checkpointing: one hidden state per layer"
        if cfg.gradient_checkpointing == "selective":
            # matmul and attention outputs stay: q, k, v, attention out (+ its log-sum-exp),
            # o_proj, gate, up and down outputs, besides the layer's input
            h, i, kv, n = shape.hidden, shape.intermediate, shape.kv_width, shape.heads
            kept = shape.layers * tokens * ((2 * shape.q_width + 2 * kv + 3 * h + 2 * i) * act_bytes + 4 * n)
            how = "selective checkpointing: matmul and attention outputs kept"
        if cfg.activation_offloading == "disk" and cfg.gradient_checkpointing is True:
            # what selective checkpointing caches is the checkpoint's own, not offloaded (measured:
            # a selective + disk LoRA run kept it all)
            kept, how = 0, "checkpointing + offloaded to disk"
        plan.components.append(Component("activations", kept, ("forward", "backward"), how))
        plan.components.append(
            Component("recomputed layer", per_layer, ("backward",), "one layer in the backward")
        )
    else:
        plan.components.append(
            Component(
                "activations", shape.layers * per_layer, ("forward", "backward"), f"{shape.layers} layers"
            )
        )
    # The backward of a layer holds the gradients of its intermediates (the same sizes as what it
    # saved) before it frees them.
    plan.components.append(Component("backward workspace (one layer)", per_layer, ("backward",)))
    if lora and not gpu:
        # glibc keeps in its heap what each adapted linear frees in the forward (the frozen
        # layer's output, the adapter's output and its scaled copy): fitted on the LoRA rows of
        # bench/plan_accuracy.py, ×LORA_HEAP_RETENTION of the adapted outputs, for every layer —
        # with checkpointing too: the forward makes the same temporaries whether or not autograd
        # keeps anything (measured: 1,024 × 4 tokens, checkpointed, +3.2 GiB)
        shapes = shape.linear_shapes()
        outs = sum(shapes[name][1] for name in lora_targets(cfg))
        retained = int(LORA_HEAP_RETENTION * 4 * tokens * outs * shape.layers)
        plan.components.append(
            Component("heap retention (LoRA temporaries)", retained, ("forward", "backward"), "glibc, fitted")
        )
        if cfg.load_in_4bit or cfg.load_in_8bit:
            # bitsandbytes' CPU path dequantizes each weight to the compute dtype for every matmul;
            # glibc keeps those blocks too (measured: QLoRA 512 × 2 tokens, +0.5 GiB)
            dequantized = shape.layers * shape.layer_linear_params() * (2 if bf16 else 4)
            name = "heap retention (dequantized weights)"
            plan.components.append(Component(name, dequantized, ("forward", "backward"), "glibc"))
    if bf16 and not lora:
        # autocast casts each fp32 weight to bf16 once per forward and keeps the copy for the backward
        copies = (
            2 * (shape.layers * shape.layer_linear_params() + shape.vocab * shape.hidden) // split.weights
        )
        plan.components.append(Component("autocast bf16 weight copies", copies, ("forward", "backward")))
    # embedding output, final norm, rotary tables: a few hidden-sized tensors outside the layers
    plan.components.append(
        Component("embeddings and final norm", 4 * tokens * shape.hidden * 4, ("forward", "backward"))
    )

    # Attention mask: the dense document-causal (B, 1, L, L) mask of SDPA/eager with packing
    if cfg.attn_implementation == "eager" or _dense_sdpa_mask(cfg, shape):
        mask = cfg.micro_batch_size * cfg.sequence_len**2 * (1 if cfg.attn_implementation == "sdpa" else 4)
        plan.components.append(
            Component("attention mask", mask, ("forward", "backward"), cfg.attn_implementation)
        )

    # Logits and loss
    vocab_tokens = tokens * shape.vocab
    if cfg.loss_method in ("chunked", "cut", "liger_fused_linear"):
        chunks = max(1, cfg.chunked_cross_entropy_num_chunks) if cfg.loss_method == "chunked" else 8
        loss = 3 * 4 * vocab_tokens // chunks
        how = f"{cfg.loss_method}: one chunk of logits at a time"
        if not lora:  # each chunk's head-weight gradient, before it is added to the running sum
            loss += shape.vocab * shape.hidden * 4 // split.gradients
    else:
        # fp32 logits, their shifted copy and the saved log-softmax (bf16 logits add a bf16 copy).
        # The head runs on trained positions only (kernels/loss.py): counted as if every position
        # were trained, an upper bound (prompts masked by train_on_inputs: false cost less).
        loss = (3 * 4 + (2 if bf16 else 0)) * vocab_tokens
        how = "logits of the trained positions (at most all), log-softmax"
    # The loss peaks at the end of the forward and the start of the backward, before the layers'
    # gradients exist; with checkpointing the backward's own peak comes later, with every gradient.
    loss_phases: tuple[Phase, ...] = ("forward",) if cfg.gradient_checkpointing else ("forward", "backward")
    plan.components.append(Component("logits and loss", loss, loss_phases, how))
    if not lora:
        head = shape.vocab * shape.hidden * 4 // split.gradients
        plan.components.append(Component("first gradients (head)", head, ("backward",)))

    if gpu:
        plan.notes.append(
            f"GPU target: torch's peak allocated × {CUDA_ALLOCATOR_SLACK} (caching allocator) "
            "+ the CUDA context"
        )
    else:
        plan.notes.append("CPU target: peak resident set size of the training process")
    if split.description != "one process":
        plan.notes.append(f"per rank: {split.description}")
    if cfg.unfrozen_parameters:
        plan.notes.append("unfrozen_parameters: counted as a full fine-tune (an upper bound)")
    if cfg.deepspeed is not None and any(offloads(read_deepspeed_config(cfg.deepspeed))) and not gpu:
        plan.notes.append("DeepSpeed offload moves state to CPU RAM: on a CPU it stays in the same memory")
    return plan


def predicted_peak_bytes(cfg: ResolvedConfig, model_config: dict[str, Any], *, on_gpu: bool) -> int | None:
    """The peak this run should reach as its own measurement sees it (CPU: resident set; GPU:
    torch's peak allocated, so without the CUDA context), or None for a model the planner does not
    model."""
    try:
        shape = model_shape(model_config)
    except PlanModelError:
        return None
    plan = predict(shape, cfg, target="cuda" if on_gpu else "cpu")
    if on_gpu:
        plan.components = [c for c in plan.components if c.name != "cuda context"]
    return plan.peak_bytes
