"""Every hellbender option: its name, type, default and meaning — in one place.

Names are Axolotl's wherever Axolotl has the same option, so an Axolotl user's YAML loads
unchanged. Defaults live here and nowhere else: other modules read the (normalized) config and
never invent a fallback of their own. Values that are *derived* from other keys (batch size, the
resolved dtype, the attention backend) are computed in :mod:`hellbender.config.normalize`, never
here, so this module stays a plain description of what a user may write.

Every number has a finite range: a value the later stages cannot use (``num_epochs: .inf`` plans
steps forever, ``lora_r: 1.0e+29`` fails inside peft, ``seed: -1`` inside numpy) is an error here,
naming the key and its range, not a hang or a traceback after the model has loaded. The ranges are
generous on purpose: they exclude nonsense, not unusual runs.

Keep this module import-light: ``hellbender validate`` and ``hellbender --help`` must answer in
well under a second, so nothing here may import torch or transformers.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

AttnImplementation = Literal[
    "eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "xformers"
]
DatasetType = Literal["alpaca", "completion", "input_output", "chat_template", "user_defined"]
# "adamw_bnb_8bit" is the Hugging Face / Axolotl spelling of adamw_8bit, and ao_adamw_{8bit,4bit,fp8}
# Axolotl's of adamw_torch_{8bit,4bit,fp8} (torchao); normalize maps them (OPTIMIZER_ALIASES).
Optimizer = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adamw_torch_8bit",
    "adamw_torch_4bit",
    "adamw_torch_fp8",
    "ao_adamw_8bit",
    "ao_adamw_4bit",
    "ao_adamw_fp8",
    "sgd",
]
OPTIMIZER_ALIASES: dict[str, str] = {
    "adamw_bnb_8bit": "adamw_8bit",
    "ao_adamw_8bit": "adamw_torch_8bit",
    "ao_adamw_4bit": "adamw_torch_4bit",
    "ao_adamw_fp8": "adamw_torch_fp8",
}
# The optimizers of each optional library (after OPTIMIZER_ALIASES).
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
TORCHAO_OPTIMIZERS = ("adamw_torch_8bit", "adamw_torch_4bit", "adamw_torch_fp8")
Scheduler = Literal[
    "cosine",
    "linear",
    "constant",
    "constant_with_warmup",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "rex",
    "one_cycle",
]
ComputeDtype = Literal["bfloat16", "float16", "float32"]
LossMethod = Literal["plain", "chunked", "cut", "liger", "liger_fused_linear"]
DistributedStrategy = Literal["single", "ddp", "fsdp2", "deepspeed"]
FSDPStateDictType = Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"]
FSDPWrapPolicy = Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"]
FSDPShardingStrategy = Literal[
    "FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"
]
# Items of Axolotl's (and the HF Trainer's) deprecated `fsdp:` list.
FSDPOption = Literal[
    "full_shard", "shard_grad_op", "no_shard", "hybrid_shard", "hybrid_shard_zero2", "offload", "auto_wrap"
]

# Facts about the choices above that several stages need; each is defined here and only here.
# Attention backends that need a CUDA GPU (and their own package).
GPU_ONLY_BACKENDS: frozenset[str] = frozenset({"flash_attention_2", "flash_attention_3", "xformers"})
# Backends for which hellbender.models.attention keeps packed documents apart (mask, BlockMask,
# varlen kwargs or bias): every backend a config may name, so sample packing never leaks.
DOCUMENT_ISOLATING_BACKENDS: frozenset[str] = frozenset(get_args(AttnImplementation))
# Model families whose attention is plain scaled dot-product attention, so that training may run
# it as one causal SDPA call per packed document (hellbender.models.attention.DOCUMENT_SDPA);
# others (soft-capping, attention sinks, ...) keep the dense document mask.
PLAIN_CAUSAL_ATTENTION_MODELS: frozenset[str] = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "phi3"}
)
# The keys that replace the plain logits + cross-entropy loss, and the method each one selects.
# At most one may be on (rule HB117); normalize derives ``loss_method`` from them.
LOSS_REPLACEMENTS: dict[str, LossMethod] = {
    "chunked_cross_entropy": "chunked",
    "cut_cross_entropy": "cut",
    "liger_cross_entropy": "liger",
    "liger_fused_linear_cross_entropy": "liger_fused_linear",
}


# Upper bounds shared by several keys.
MAX_COUNT = 1_000_000_000  # steps, rows, intervals: far beyond any run, far below a hang
MAX_WIDTH = 65_536  # ranks, batch rows, LoRA rank and alpha, chunks, shards
MAX_SEQUENCE_LEN = 1 << 20  # tokens per sample
MAX_EPOCHS = 1000
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
MAX_PER_EPOCH = 10_000  # evaluations or checkpoints per epoch
MAX_PARAMETERS = 10**13  # parameters in one module (FSDP size-based wrapping)
MAX_DDP_BUCKET_MB = 16_384  # a gradient bucket of 16 GB: beyond any GPU's use for one
MAX_DDP_TIMEOUT = 7 * 24 * 3600  # a week: a collective waiting longer is a hang, not a slow rank
# A learning rate only has to be a float32 number (what the optimizers compute in): a huge one
# diverges, which training detects and stops; the tests force a divergence with 1e30.
MAX_LEARNING_RATE = 3.4e38


class _Strict(BaseModel):
    """Unknown keys are errors (reported with a "did you mean" by :mod:`hellbender.config.load`);
    a float is never infinite or NaN."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=False, protected_namespaces=(), allow_inf_nan=False
    )


class MessagePropertyMappings(_Strict):
    """Which field of a message dict holds the role and the content."""

    role: str = Field("role", description="Field of a message that holds its role.")
    content: str = Field("content", description="Field of a message that holds its text.")


FORMAT_FIELDS = ("instruction", "input", "system")


def fill_format(fmt: str, fields: Mapping[str, str]) -> str:
    """A user-defined prompt format filled with a row's fields: what the data pipeline renders
    (:mod:`hellbender.data.formats.user_defined`), and what validation tries once."""
    return fmt.format(**fields)


def format_string_problem(fmt: str) -> str | None:
    """What makes ``fmt`` unusable as a user-defined prompt format, or None.

    Every replacement field must be a bare ``{instruction}``, ``{input}`` or ``{system}``: the
    pipeline fills them with row text, so a conversion (``{input!r}``) or a format spec
    (``{instruction:>10}``, ``{instruction:{input}}``) would either fail on some rows, in a worker,
    or put something other than the text in the prompt; an index, an attribute or a positional
    field (``{instruction[0]}``, ``{}``) has nothing to fill it. The format is then filled once,
    as the pipeline fills it.
    """
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError as exc:  # a lone "{" or "}"
        return f"is not a valid format string ({exc}); write {{{{ or }}}} for a literal brace"
    known = ", ".join("{" + name + "}" for name in FORMAT_FIELDS)
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        shown = name if len(name) <= 40 else name[:39] + "…"
        if name not in FORMAT_FIELDS:
            return f"uses the placeholder {{{shown}}}; only {known} are known"
        if conversion is not None or spec:
            extra = (f"!{conversion}" if conversion is not None else "") + (f":{spec}" if spec else "")
            extra = extra if len(extra) <= 40 else extra[:39] + "…"
            return (
                f"adds {extra!r} to {{{name}}}: conversions and format specs are not supported; "
                f"write {{{name}}}"
            )
    try:
        fill_format(fmt, dict.fromkeys(FORMAT_FIELDS, "text"))
    except (ValueError, KeyError, IndexError, AttributeError) as exc:  # pragma: no cover - parse caught it
        return f"cannot be filled ({exc})"
    return None


class UserDefinedFormat(_Strict):
    """A prompt format given by format strings (Axolotl's ``type: {field_instruction: ...}``)."""

    system_prompt: str = Field("", description="System prompt inserted as `{system}`.")
    field_system: str = Field("system", description="Row field holding a per-row system prompt.")
    field_instruction: str = Field("instruction", description="Row field holding the instruction.")
    field_input: str = Field("input", description="Row field holding the optional input.")
    field_output: str = Field("output", description="Row field holding the trained answer.")
    format: str = Field(
        "{instruction}\n{input}\n",
        description="Prompt format when the row has an input; fields in braces.",
    )
    no_input_format: str = Field(
        "{instruction}\n", description="Prompt format when the row's input is empty."
    )

    @field_validator("format", "no_input_format")
    @classmethod
    def _fillable(cls, value: str) -> str:
        problem = format_string_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class DatasetConfig(_Strict):
    """One entry of ``datasets:`` / ``test_datasets:``."""

    path: str = Field(..., description="Local file, folder (save_to_disk or data files) or hub id.")
    type: DatasetType | UserDefinedFormat = Field(
        "alpaca",
        description="Prompt format: alpaca, completion, input_output, chat_template, or a "
        "user-defined format given as a mapping of format strings.",
    )
    ds_type: Literal["json", "jsonl", "parquet", "csv", "txt", "arrow"] | None = Field(
        None, description="File type when it cannot be told from the extension."
    )
    data_files: str | list[str] | None = Field(None, description="Files inside `path` to load.")
    split: str = Field("train", description="Split to load.")
    name: str | None = Field(None, description="Dataset configuration name (hub datasets).")
    revision: str | None = Field(None, description="Dataset revision (hub datasets).")
    field: str | None = Field(None, description="Top-level key of a JSON file holding the rows.")
    # completion
    text_column: str = Field("text", description="`completion`: the field holding the text.")
    # input_output
    field_segments: str = Field("segments", description="`input_output`: the list of segments.")
    # chat_template
    field_messages: str = Field("messages", description="`chat_template`: the list of messages.")
    message_property_mappings: MessagePropertyMappings = Field(
        default_factory=MessagePropertyMappings,
        description="`chat_template`: message fields holding role and content.",
    )
    message_field_role: str | None = Field(
        None, description="Deprecated (Axolotl): use message_property_mappings.role."
    )
    message_field_content: str | None = Field(
        None, description="Deprecated (Axolotl): use message_property_mappings.content."
    )
    message_field_training: str = Field(
        "training",
        description="`chat_template`: per-message boolean field that overrides the role rule.",
    )
    roles_to_train: list[str] = Field(
        default_factory=lambda: ["assistant"], description="`chat_template`: roles whose turns are trained."
    )
    train_on_eos: Literal["turn", "all", "last", "none"] = Field(
        "turn",
        description="`chat_template`: train the end-of-turn token after trained turns (turn), "
        "after every turn (all), only the last turn (last), or never (none).",
    )
    roles: dict[str, list[str]] | None = Field(
        None, description="`chat_template`: map of canonical role → names used in the data."
    )
    chat_template: str | None = Field(
        None,
        description="`chat_template`: 'tokenizer_default', a known template name, or a jinja "
        "string; defaults to the top-level `chat_template`.",
    )
    train_on_inputs: bool | None = Field(None, description="Override the top-level train_on_inputs.")
    shards: int | None = Field(
        None, ge=1, le=MAX_WIDTH, description="Use only 1/shards of the rows (quick experiments)."
    )


class SpecialTokens(_Strict):
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None


# Short dtype names accepted wherever a dtype is written (Axolotl writes "bf16" for FSDP).
_DTYPE_NAMES: dict[str, ComputeDtype] = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}


def _dtype_name(value: Any) -> Any:
    return _DTYPE_NAMES.get(value, value) if isinstance(value, str) else value


class MixedPrecisionPolicy(_Strict):
    """FSDP2's mixed precision: the dtype the gathered parameters are computed in and the dtype
    gradients are reduced in (torch.distributed.fsdp.MixedPrecisionPolicy)."""

    param_dtype: ComputeDtype | None = Field(
        None, description="Dtype of the gathered parameters in forward and backward (null: no cast)."
    )
    reduce_dtype: ComputeDtype | None = Field(
        None, description="Dtype of the gradient reduce-scatter (null: param_dtype's)."
    )

    @field_validator("param_dtype", "reduce_dtype", mode="before")
    @classmethod
    def _short_names(cls, value: Any) -> Any:
        return _dtype_name(value)


# fsdp_config options of FSDP1 that FSDP2 has no equivalent of: accepted (Axolotl configs carry
# them), reported as having no effect (HB163), never used.
FSDP1_ONLY_OPTIONS: tuple[str, ...] = (
    "sync_module_states",
    "use_orig_params",
    "limit_all_gathers",
    "backward_prefetch",
    "backward_prefetch_policy",
    "forward_prefetch",
)
# Axolotl's older spelling of every fsdp_config option: the same name with an ``fsdp_`` prefix.
FSDP_LEGACY_PREFIX = "fsdp_"


def _legacy(name: str) -> str:
    return f"Axolotl's older spelling of `{name}` (validate --fix renames it)."


def _layer_classes(value: Any) -> Any:
    """``"LlamaDecoderLayer"`` or ``"A,B"`` (accelerate's comma-separated form) → a list of names."""
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, list):
        names = [v.strip() if isinstance(v, str) else v for v in value]
        if any(isinstance(n, str) and not n for n in names):
            raise ValueError("names an empty layer class")
        return names
    return value


class FSDPConfig(_Strict):
    """``fsdp_config:``: how FSDP2 (``torch.distributed.fsdp.fully_shard``) shards the model.

    Names are Axolotl's FSDP2 names. Axolotl's FSDP1 spellings (an ``fsdp_`` prefix, and
    ``sharding_strategy``) are accepted and resolved by normalize with a warning; FSDP1-only
    options are accepted and reported as having no effect.
    """

    fsdp_version: int | None = Field(
        None, ge=1, le=2, description="Axolotl's other place for the top-level `fsdp_version`."
    )
    offload_params: bool = Field(
        False, description="Keep parameters, gradients and optimizer state in CPU memory between uses."
    )
    cpu_offload_pin_memory: bool = Field(
        True,
        description="With offload_params: pin the CPU copies (faster copies; false allows swapping).",
    )
    cpu_ram_efficient_loading: bool = Field(
        False, description="Only rank 0 reads the weights; the others receive their shards."
    )
    auto_wrap_policy: FSDPWrapPolicy = Field(
        "TRANSFORMER_BASED_WRAP",
        description="Which modules are sharded as units: transformer blocks, modules over "
        "min_num_params, or only the whole model (NO_WRAP).",
    )
    transformer_layer_cls_to_wrap: list[str] | None = Field(
        None,
        description="Class names of the blocks sharded one by one (a string, comma-separated, is "
        "accepted); default: the model's `_no_split_modules`.",
    )
    min_num_params: int | None = Field(
        None, ge=1, le=MAX_PARAMETERS, description="SIZE_BASED_WRAP: parameters a module needs to be a unit."
    )
    reshard_after_forward: bool = Field(
        True,
        description="Free the gathered parameters after forward and gather them again for backward "
        "(FULL_SHARD; false keeps them: faster, more memory, like SHARD_GRAD_OP).",
    )
    state_dict_type: FSDPStateDictType = Field(
        "SHARDED_STATE_DICT",
        description="Checkpoints: one file per rank (SHARDED) or the whole model gathered on rank 0 (FULL).",
    )
    final_state_dict_type: FSDPStateDictType = Field(
        "FULL_STATE_DICT", description="The weights saved at the end of training."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute activations in the backward; turns on gradient_checkpointing."
    )
    mixed_precision_policy: MixedPrecisionPolicy | None = Field(
        None,
        description="FSDP2 mixed precision (a dtype name such as bf16 sets both dtypes); null: none, "
        "the training loop's autocast decides.",
    )
    # FSDP1 options
    sharding_strategy: FSDPShardingStrategy | None = Field(
        None, description="FSDP1: FULL_SHARD/SHARD_GRAD_OP are read as reshard_after_forward true/false."
    )
    sync_module_states: bool | None = Field(None, description="FSDP1 only: no effect under FSDP2.")
    use_orig_params: bool | None = Field(None, description="FSDP1 only: no effect under FSDP2.")
    limit_all_gathers: bool | None = Field(None, description="FSDP1 only: no effect under FSDP2.")
    backward_prefetch: str | None = Field(None, description="FSDP1 only: no effect under FSDP2.")
    backward_prefetch_policy: str | None = Field(None, description="FSDP1 only: no effect under FSDP2.")
    forward_prefetch: bool | None = Field(None, description="FSDP1 only: no effect under FSDP2.")
    # Axolotl's `fsdp_`-prefixed spellings
    fsdp_offload_params: bool | None = Field(None, description=_legacy("offload_params"))
    fsdp_cpu_offload_pin_memory: bool | None = Field(None, description=_legacy("cpu_offload_pin_memory"))
    fsdp_cpu_ram_efficient_loading: bool | None = Field(
        None, description=_legacy("cpu_ram_efficient_loading")
    )
    fsdp_auto_wrap_policy: FSDPWrapPolicy | None = Field(None, description=_legacy("auto_wrap_policy"))
    fsdp_transformer_layer_cls_to_wrap: list[str] | None = Field(
        None, description=_legacy("transformer_layer_cls_to_wrap")
    )
    fsdp_min_num_params: int | None = Field(
        None, ge=1, le=MAX_PARAMETERS, description=_legacy("min_num_params")
    )
    fsdp_reshard_after_forward: bool | None = Field(None, description=_legacy("reshard_after_forward"))
    fsdp_state_dict_type: FSDPStateDictType | None = Field(None, description=_legacy("state_dict_type"))
    fsdp_final_state_dict_type: FSDPStateDictType | None = Field(
        None, description=_legacy("final_state_dict_type")
    )
    fsdp_activation_checkpointing: bool | None = Field(None, description=_legacy("activation_checkpointing"))
    fsdp_sharding_strategy: FSDPShardingStrategy | None = Field(
        None, description=_legacy("sharding_strategy")
    )
    fsdp_sync_module_states: bool | None = Field(None, description=_legacy("sync_module_states"))
    fsdp_use_orig_params: bool | None = Field(None, description=_legacy("use_orig_params"))
    fsdp_limit_all_gathers: bool | None = Field(None, description=_legacy("limit_all_gathers"))
    fsdp_backward_prefetch: str | None = Field(None, description=_legacy("backward_prefetch"))
    fsdp_backward_prefetch_policy: str | None = Field(None, description=_legacy("backward_prefetch_policy"))
    fsdp_forward_prefetch: bool | None = Field(None, description=_legacy("forward_prefetch"))

    @field_validator("transformer_layer_cls_to_wrap", "fsdp_transformer_layer_cls_to_wrap", mode="before")
    @classmethod
    def _one_or_more_classes(cls, value: Any) -> Any:
        return _layer_classes(value)

    @field_validator("mixed_precision_policy", mode="before")
    @classmethod
    def _one_dtype_for_both(cls, value: Any) -> Any:
        """Axolotl's string form (``bf16``) sets both dtypes."""
        if isinstance(value, str):
            dtype = _dtype_name(value)
            return {"param_dtype": dtype, "reduce_dtype": dtype}
        return value


def legacy_fsdp_keys() -> dict[str, str]:
    """Every ``fsdp_``-prefixed spelling of an fsdp_config option → the option's name."""
    return {
        name: name.removeprefix(FSDP_LEGACY_PREFIX)
        for name in FSDPConfig.model_fields
        if name.startswith(FSDP_LEGACY_PREFIX) and name != "fsdp_version"
    }


class HellbenderConfig(_Strict):
    """The whole configuration of a run. See docs/config.md for the generated reference."""

    # ---------------------------------------------------------------- model
    base_model: str = Field(..., description="Hub id, local Hugging Face folder, or a local .gguf file.")
    base_model_config: str | None = Field(None, description="Where to read the model config from.")
    model_type: str | None = Field(None, description="Model class name (informational; Auto* is used).")
    tokenizer_type: str | None = Field(None, description="Tokenizer class name (informational).")
    tokenizer_config: str | None = Field(None, description="Where to load the tokenizer from.")
    tokenizer_use_fast: bool = Field(True, description="Use the fast (Rust) tokenizer.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the weights.")
    revision_of_model: str | None = Field(None, description="Model revision (hub models).")
    allow_pickle_weights: bool = Field(
        False,
        description="Allow loading pickled (.bin/.pt) weights. Off: safetensors only, because "
        "unpickling can run arbitrary code.",
    )
    model_cache_dir: str = Field(
        "~/.cache/hellbender/models", description="Where GGUF conversions are cached."
    )
    overrides_of_model_config: dict[str, Any] | None = Field(
        None, description="Values set on the model config before loading (e.g. rope_scaling)."
    )
    special_tokens: SpecialTokens | None = Field(None, description="bos/eos/pad/unk tokens to set.")
    tokens: list[str] | None = Field(None, description="New tokens to add to the tokenizer.")
    chat_template: str | None = Field(
        None,
        description="Chat template: 'tokenizer_default', a known name (chatml, llama3, mistral) "
        "or a jinja string.",
    )
    default_system_message: str | None = Field(None, description="System message for chat templates.")
    eot_tokens: list[str] | None = Field(
        None,
        description="`chat_template`: the tokens that end a turn (each a single token), trained per "
        "train_on_eos; default: any special token right after a content.",
    )
    resize_token_embeddings_to_32x: bool = Field(False, description="Pad the vocabulary to a multiple of 32.")

    # ---------------------------------------------------------------- quantized bases
    load_in_8bit: bool = Field(False, description="Load the base weights in 8 bit (bitsandbytes).")
    load_in_4bit: bool = Field(False, description="Load the base weights in 4 bit (bitsandbytes, QLoRA).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantize the 4-bit scales too.")
    gptq: bool = Field(False, description="The base model is GPTQ-quantized.")

    # ---------------------------------------------------------------- adapters
    adapter: Literal["lora", "qlora"] | None = Field(None, description="Adapter; none = full fine-tune.")
    lora_model_dir: str | None = Field(None, description="Existing adapter to continue training.")
    lora_r: int = Field(8, ge=1, le=MAX_WIDTH, description="LoRA rank.")
    lora_alpha: int = Field(
        16, ge=1, le=MAX_WIDTH, description="LoRA scaling numerator (scale = alpha / r)."
    )
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] | str | None = Field(
        None, description="Module names (or a regex) to adapt."
    )
    lora_target_linear: bool = Field(False, description="Adapt every linear layer except the head.")
    lora_modules_to_save: list[str] | None = Field(None, description="Modules trained in full and saved.")
    lora_fan_in_fan_out: bool = Field(False, description="Weights stored as (fan_in, fan_out).")
    peft_use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    peft_use_rslora: bool = Field(False, description="Rank-stabilized LoRA scaling (alpha / sqrt(r)).")
    peft_layers_to_transform: list[int] | None = Field(
        None, description=f"Only adapt these layers (indices 0 … {MAX_WIDTH})."
    )
    lora_mlp_kernel: bool = Field(False, description="Fused LoRA MLP forward/backward.")
    lora_qkv_kernel: bool = Field(False, description="Fused LoRA q/k/v forward/backward.")
    lora_o_kernel: bool = Field(False, description="Fused LoRA output-projection forward/backward.")
    unfrozen_parameters: list[str] | None = Field(
        None,
        description="Full fine-tuning of only the parameters whose name matches one of these regexes "
        "(Axolotl's reading: matched from the start, `.` literal); the rest stay frozen.",
    )

    # ---------------------------------------------------------------- data
    datasets: list[DatasetConfig] | None = Field(None, description="Training datasets.")
    test_datasets: list[DatasetConfig] | None = Field(None, description="Evaluation datasets.")
    val_set_size: float = Field(
        0.0, ge=0.0, le=MAX_COUNT, description="Evaluation split: a fraction (< 1) or a row count (>= 1)."
    )
    dataset_prepared_path: str = Field(
        "./last_run_prepared", description="Cache folder for prepared datasets."
    )
    shuffle_merged_datasets: bool = Field(True, description="Shuffle the merged datasets with `seed`.")
    dataset_exact_deduplication: bool = Field(False, description="Drop exact duplicate rows.")
    dataset_num_proc: int | None = Field(
        None, ge=1, le=4096, description="Processes for tokenization (default: the CPU count)."
    )
    dataset_processes: int | None = Field(
        None, ge=1, le=4096, description="Deprecated alias of dataset_num_proc."
    )
    sequence_len: int = Field(
        2048, ge=8, le=MAX_SEQUENCE_LEN, description="Maximum tokens per sample (and per packed row)."
    )
    min_sample_len: int = Field(
        2, ge=1, le=MAX_SEQUENCE_LEN, description="Samples shorter than this are dropped."
    )
    excess_length_strategy: Literal["drop", "truncate"] = Field(
        "drop", description="What to do with samples longer than sequence_len."
    )
    train_on_inputs: bool = Field(False, description="Also train on prompt tokens.")
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="Malformed rows stop with an error (default) or are skipped and written to a "
        "rejects file.",
    )
    skip_prepare_dataset: bool = Field(
        False, description="Prepare the dataset lazily (not supported: always prepared)."
    )
    sample_packing: bool = Field(False, description="Pack several samples per row, isolated by attention.")
    eval_sample_packing: bool | None = Field(
        None, description="Pack evaluation data (default: sample_packing)."
    )
    pad_to_sequence_len: bool | None = Field(
        None, description="Pad every batch to sequence_len (constant shapes; default: sample_packing)."
    )
    sample_packing_bin_size: int = Field(
        200, ge=1, le=MAX_COUNT, description="Accepted for compatibility; the packer is exact."
    )
    sample_packing_group_size: int = Field(
        100000, ge=1, le=MAX_COUNT, description="Accepted for compatibility; the packer is exact."
    )
    group_by_length: bool = Field(
        False,
        description="Batch samples of similar length together (HF's grouping; without sample_packing).",
    )

    # ---------------------------------------------------------------- batch and schedule
    micro_batch_size: int = Field(1, ge=1, le=MAX_WIDTH, description="Rows per forward pass on one device.")
    gradient_accumulation_steps: int | None = Field(
        None, ge=1, le=MAX_WIDTH, description="Micro-batches per optimizer step (default 1)."
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=1 << 24,
        description="Derived: micro_batch_size × gradient_accumulation_steps × data-parallel ranks. "
        "Setting it is deprecated.",
    )
    eval_batch_size: int | None = Field(
        None, ge=1, le=MAX_WIDTH, description="Rows per eval forward (default micro_batch_size)."
    )
    num_epochs: float = Field(1.0, gt=0, le=MAX_EPOCHS, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Stop after this many optimizer steps."
    )
    learning_rate: float = Field(2e-5, gt=0, le=MAX_LEARNING_RATE, description="Peak learning rate.")
    optimizer: Optimizer = Field(
        "adamw_torch",
        description="Optimizer: adamw_torch(_fused); adamw_8bit, paged_adamw_8bit/32bit (bitsandbytes, "
        "paged: CUDA); adamw_torch_8bit/4bit/fp8 (torchao low-bit state); sgd.",
    )
    lr_scheduler: Scheduler = Field(
        "cosine", description="Learning-rate schedule (HF/Axolotl names; see docs/axolotl.md)."
    )
    cosine_min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Floor of cosine, cosine_with_min_lr and rex as a fraction of the peak."
    )
    warmup_steps: int | None = Field(None, ge=0, le=MAX_COUNT, description="Linear warm-up steps.")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warm-up as a fraction of all steps.")
    weight_decay: float = Field(0.0, ge=0, le=10, description="Decoupled weight decay.")
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="Adam beta1.")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="Adam beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, le=1, description="Adam epsilon.")
    max_grad_norm: float | None = Field(
        1.0, ge=0, le=1e6, description="Clip gradients to this norm (0 or null: off)."
    )
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed for data order, initialisation and dropout.")

    # ---------------------------------------------------------------- precision
    bf16: bool | Literal["auto"] = Field(
        "auto", description="bfloat16: true, false or auto (from the hardware)."
    )
    fp16: bool = Field(False, description="float16 mixed precision (GPU).")
    tf32: bool = Field(False, description="Allow TF32 matmuls (Ampere+ GPUs).")
    fp8: bool = Field(
        False,
        description="FP8 training: linear layers become torchao Float8Linear (CUDA ≥ 8.9 or CPU; "
        "wants torch_compile).",
    )
    fp8_enable_fsdp_float8_all_gather: bool = Field(
        False, description="Under FSDP2, all-gather fp8 weights (torchao); needs fp8."
    )
    torch_compile: bool = Field(False, description="Compile the model with torch.compile.")
    torch_compile_backend: str | None = Field(None, description="torch.compile backend (default inductor).")
    qat: dict[str, Any] | None = Field(None, description="Quantization-aware training settings (torchao).")

    # ---------------------------------------------------------------- attention
    attn_implementation: AttnImplementation | None = Field(
        None, description="Attention backend (default sdpa). One at a time."
    )
    flash_attention: bool | None = Field(None, description="Legacy: attn_implementation: flash_attention_2.")
    flex_attention: bool | None = Field(None, description="Legacy: attn_implementation: flex_attention.")
    sdp_attention: bool | None = Field(None, description="Legacy: attn_implementation: sdpa.")
    xformers_attention: bool | None = Field(None, description="Legacy: attn_implementation: xformers.")
    eager_attention: bool | None = Field(None, description="Legacy: attn_implementation: eager.")

    # ---------------------------------------------------------------- memory and kernels
    gradient_checkpointing: bool | Literal["selective"] = Field(
        False, description="Recompute activations in the backward (true, or selective: keep matmul outputs)."
    )
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(
        None, description="Passed to checkpointing (default use_reentrant: false)."
    )
    activation_offloading: bool | Literal["disk"] = Field(
        False, description="Move saved activations to CPU memory (true) or to disk (disk)."
    )
    chunked_cross_entropy: bool = Field(
        False, description="Loss computed chunk by chunk without full logits."
    )
    chunked_cross_entropy_num_chunks: int = Field(
        8, ge=1, le=MAX_WIDTH, description="Chunks for chunked_cross_entropy."
    )
    cut_cross_entropy: bool = Field(False, description="Apple's cut-cross-entropy loss.")
    liger_rms_norm: bool = Field(False, description="Liger RMSNorm kernel (GPU).")
    liger_glu_activation: bool = Field(False, description="Liger SwiGLU kernel (GPU).")
    liger_rope: bool = Field(False, description="Liger RoPE kernel (GPU).")
    liger_layer_norm: bool = Field(False, description="Liger LayerNorm kernel (GPU).")
    liger_cross_entropy: bool = Field(False, description="Liger cross-entropy kernel (GPU).")
    liger_fused_linear_cross_entropy: bool = Field(False, description="Liger fused head + loss (GPU).")
    tiled_mlp: bool = Field(False, description="Compute the MLP in sequence shards (long sequences).")
    tiled_mlp_num_shards: int | None = Field(
        None, ge=1, le=MAX_WIDTH, description="Shards for tiled_mlp (default: auto)."
    )

    # ---------------------------------------------------------------- distributed
    deepspeed: str | dict[str, Any] | None = Field(None, description="DeepSpeed config (path or mapping).")
    fsdp: list[FSDPOption] | None = Field(
        None,
        description="Deprecated (Axolotl's FSDP1 switch): full_shard/shard_grad_op/offload/auto_wrap are "
        "read into fsdp_config. Use fsdp_version: 2 and fsdp_config.",
    )
    fsdp_config: FSDPConfig | None = Field(
        None, description="Shard the model over the ranks with FSDP2 (see FSDP config)."
    )
    fsdp_version: int | None = Field(
        None, ge=1, le=2, description="FSDP version: hellbender runs FSDP2 (1 is read as 2, with a warning)."
    )
    fsdp_final_state_dict_type: FSDPStateDictType | None = Field(
        None, description="Deprecated (Axolotl): use fsdp_config.final_state_dict_type."
    )
    ddp: bool | None = Field(
        None,
        description="DistributedDataParallel: what several processes use without FSDP (false cannot be "
        "honoured with several processes).",
    )
    ddp_find_unused_parameters: bool | None = Field(
        None,
        description="DDP: find the parameters that got no gradient at every step (needed when some "
        "get none; slower). Default: torch's (false).",
    )
    ddp_bucket_cap_mb: int | None = Field(
        None, ge=1, le=MAX_DDP_BUCKET_MB, description="DDP: gradient bucket in MB (default: torch's, 25)."
    )
    ddp_broadcast_buffers: bool | None = Field(
        None, description="DDP: broadcast buffers from rank 0 at every forward (default: torch's, true)."
    )
    ddp_timeout: int = Field(
        1800,
        ge=1,
        le=MAX_DDP_TIMEOUT,
        description="Seconds a collective waits for the other ranks before the run fails (the process "
        "group's timeout).",
    )
    context_parallel_size: int = Field(
        1,
        ge=1,
        le=MAX_WIDTH,
        description="Ranks that split one sequence (context parallelism; docs/distributed.md): each "
        "holds 1/N of every row's tokens and activations; must divide the world size.",
    )
    sequence_parallel_degree: int | None = Field(
        None, ge=1, le=MAX_WIDTH, description="Legacy alias of context_parallel_size."
    )
    context_parallel_strategy: Literal["ring", "ulysses"] = Field(
        "ring",
        description="How context-parallel ranks exchange attention: ring (K/V blocks passed rank to "
        "rank; any head count) or ulysses (all-to-all over heads; num_attention_heads divisible by "
        "context_parallel_size). hellbender's own key.",
    )
    ring_attn_func: Literal["varlen_llama3", "batch_ring", "batch_zigzag", "batch_stripe"] | None = Field(
        None,
        description="Axolotl's ring-attention variant, read as how rows are cut: varlen_llama3 and "
        "batch_zigzag zigzag (2N chunks, rank r keeps r and 2N-1-r), batch_ring contiguous, "
        "batch_stripe token t on rank t mod N. Unset: varlen_llama3 with sample_packing, else batch_ring.",
    )
    heads_k_stride: int | None = Field(
        None,
        ge=1,
        le=MAX_WIDTH,
        description="Ring: key/value heads sent per exchange (Axolotl's; unset: all at once); must "
        "divide the model's num_key_value_heads. Changes memory in flight, not the result.",
    )
    tensor_parallel_size: int = Field(1, ge=1, le=MAX_WIDTH, description="Ranks that split each layer.")
    dp_shard_size: int | None = Field(
        None, ge=1, le=MAX_WIDTH, description="Data-parallel ranks that shard weights (FSDP)."
    )
    dp_replicate_size: int | None = Field(
        None, ge=1, le=MAX_WIDTH, description="Data-parallel replica groups."
    )

    # ---------------------------------------------------------------- evaluation, saving, logging
    eval_steps: int | float | None = Field(
        None, gt=0, le=MAX_COUNT, description="Evaluate every N steps (or fraction)."
    )
    evals_per_epoch: int | None = Field(None, ge=1, le=MAX_PER_EPOCH, description="Evaluations per epoch.")
    eval_strategy: Literal["no", "steps", "epoch"] | None = Field(None, description="When to evaluate.")
    save_steps: int | float | None = Field(
        None, gt=0, le=MAX_COUNT, description="Checkpoint every N steps (or fraction)."
    )
    saves_per_epoch: int | None = Field(None, ge=1, le=MAX_PER_EPOCH, description="Checkpoints per epoch.")
    save_strategy: Literal["no", "steps", "epoch", "best"] | None = Field(
        None, description="When to checkpoint."
    )
    save_total_limit: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Keep at most this many checkpoints."
    )
    eval_table_size: int | None = Field(
        None,
        ge=0,
        le=MAX_COUNT,
        description="At each evaluation, generate for this many eval prompts and write them to "
        "output_dir/eval_samples_step<N>.jsonl (0 or none: off).",
    )
    eval_max_new_tokens: int = Field(
        128, ge=1, le=MAX_COUNT, description="New tokens generated per eval_table_size prompt (greedy)."
    )
    dataloader_num_workers: int = Field(
        0, ge=0, le=64, description="Worker processes that collate the training batches (0: in-process)."
    )
    dataloader_pin_memory: bool = Field(
        True, description="Collated batches in page-locked memory (CUDA only; no effect on CPU)."
    )
    dataloader_prefetch_factor: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Steps each worker collates ahead (dataloader_num_workers > 0)."
    )

    @field_validator("peft_layers_to_transform")
    @classmethod
    def _layer_indices(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(not 0 <= layer <= MAX_WIDTH for layer in value):
            raise ValueError(f"layer indices must be from 0 to {MAX_WIDTH}")
        return value

    @field_validator("eval_strategy", "save_strategy", mode="before")
    @classmethod
    def _unquoted_no(cls, value: Any) -> Any:
        """YAML 1.1 reads an unquoted ``no`` as false; ``save_strategy: no`` means "no"."""
        return "no" if value is False else value

    save_safetensors: bool = Field(True, description="Write weights as safetensors.")
    save_only_model: bool = Field(
        False, description="Checkpoints without optimizer state (cannot resume exactly)."
    )
    output_dir: str = Field("./outputs", description="Where checkpoints, weights, metrics and plots go.")
    resume_from_checkpoint: str | None = Field(None, description="Checkpoint folder to resume from.")
    auto_resume_from_checkpoints: bool = Field(
        False, description="Resume from the newest checkpoint in output_dir."
    )
    logging_steps: int | float = Field(
        1, gt=0, le=MAX_COUNT, description="Log every N optimizer steps (below 1: a fraction of the steps)."
    )
    loss_watchdog_threshold: float | None = Field(
        None, gt=0, le=1e6, description="Stop when the loss exceeds this."
    )
    loss_watchdog_patience: int | None = Field(
        None,
        ge=1,
        le=MAX_COUNT,
        description="Steps in a row above loss_watchdog_threshold before the run stops (default 1: the "
        "first; Axolotl's default is 3).",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        le=MAX_COUNT,
        description="Stop after N evaluations in a row without a lower eval_loss (final outputs are "
        "still written).",
    )
    load_best_model_at_end: bool = Field(
        False, description="The final outputs are the weights of the evaluation with the best metric."
    )
    metric_for_best_model: Literal["eval_loss", "loss"] = Field(
        "eval_loss",
        description="What load_best_model_at_end compares, lower is better (`loss`: HF's other name "
        "for eval_loss).",
    )
    use_tensorboard: bool | None = Field(None, description="Log to TensorBoard (default: when installed).")
    wandb_project: str | None = Field(None, description="Weights & Biases project (enables W&B).")
    wandb_entity: str | None = Field(None, description="W&B entity.")
    wandb_name: str | None = Field(None, description="W&B run name.")
    wandb_run_id: str | None = Field(None, description="W&B run id.")
    wandb_mode: str | None = Field(None, description="W&B mode (online, offline, disabled).")
    wandb_watch: str | None = Field(None, description="W&B gradient watching.")
    wandb_log_model: str | None = Field(None, description="W&B model logging.")
    hub_model_id: str | None = Field(
        None, description="Push the run to this Hugging Face Hub model repository (HF_ENDPOINT)."
    )
    hub_strategy: Literal["end", "every_save", "checkpoint", "all_checkpoints"] = Field(
        "every_save",
        description="What goes up: end (final outputs), every_save (+ weights at each save), checkpoint "
        "(+ latest checkpoint in last-checkpoint/), all_checkpoints (+ every checkpoint).",
    )
    push_to_hub: bool | None = Field(None, description="false: do not push even with hub_model_id.")
    hub_private_repo: bool = Field(True, description="Create the hub repositories private.")
    push_dataset_to_hub: str | None = Field(
        None, description="Upload the prepared dataset to this Hub dataset repository."
    )
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking URI (enables MLflow).")
    mlflow_experiment_name: str | None = Field(None, description="MLflow experiment.")
    mlflow_run_name: str | None = Field(None, description="MLflow run name.")

    # ---------------------------------------------------------------- misc
    strict: bool = Field(
        True,
        description="false: unknown keys are warnings, not errors (a migration aid, as "
        "`--allow-unknown`). Keys of Axolotl features hellbender lacks stay errors.",
    )
    debug: bool = Field(False, description="Verbose logging.")
    special_tokens_fix: bool = Field(True, description="Correct GGUF-converted special tokens from metadata.")


class ResolvedConfig(HellbenderConfig):
    """A config after :func:`hellbender.config.normalize.normalize`: every derived value filled in.

    Everything past the config stage takes this type, never :class:`HellbenderConfig`: the keys a
    user may leave open (``gradient_accumulation_steps``, ``eval_batch_size``, ...) are no longer
    Optional here, and the values derived from several keys (the training dtype, the data-parallel
    size, the loss implementation) exist only here. So no later stage needs an ``or default``
    fallback, and the type checker proves it. None of these fields has a default: a
    ``ResolvedConfig`` can only come out of ``normalize``.
    """

    @property
    def per_document_attention(self) -> bool:
        """Whether training attends with one causal SDPA call per packed document instead of the
        dense document mask (for models of :data:`PLAIN_CAUSAL_ATTENTION_MODELS`): with ``sdpa``,
        whole sequences on each rank (no context parallelism) and eager layers (compiled ones
        would recompile for every batch's document lengths)."""
        return (
            self.attn_implementation == "sdpa" and self.context_parallel_size == 1 and not self.torch_compile
        )

    gradient_accumulation_steps: int = Field(..., ge=1, description="Micro-batches per optimizer step.")
    batch_size: int = Field(
        ..., ge=1, description="micro_batch_size × gradient_accumulation_steps × data_parallel_size."
    )
    eval_batch_size: int = Field(..., ge=1, description="Rows per eval forward.")
    pad_to_sequence_len: bool = Field(..., description="Pad every batch to sequence_len.")
    eval_sample_packing: bool = Field(..., description="Pack evaluation data.")
    dataset_num_proc: int = Field(..., ge=1, description="Processes for tokenization.")
    attn_implementation: AttnImplementation = Field(..., description="The one attention backend.")
    context_parallel_size: int = Field(..., ge=1, description="Ranks that split one sequence.")
    compute_dtype: ComputeDtype = Field(..., description="The training dtype (bf16: auto resolved).")
    world_size: int = Field(..., ge=1, description="Ranks taking part (WORLD_SIZE).")
    data_parallel_size: int = Field(
        ..., ge=1, description="Ranks that see different data: world_size / (context × tensor parallel)."
    )
    epochs_given: bool = Field(
        ...,
        description="num_epochs bounds the run (it was set, or max_steps was not); false: max_steps "
        "alone, epochs repeat until it is reached.",
    )
    loss_method: LossMethod = Field(
        ..., description="How the loss is computed (the loss key that is on; tiled_mlp implies chunked)."
    )
    distributed_strategy: DistributedStrategy = Field(
        ...,
        description="How the ranks share the work: single (one process), ddp (several, nothing "
        "sharded), fsdp2 (FSDP asked for, several processes) or deepspeed.",
    )
