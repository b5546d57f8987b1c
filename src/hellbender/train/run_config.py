"""The resolved config a run trains with, and what a resume may change of it.

Every run writes its resolved config (every key, derived ones too) into ``output_dir`` and into each
checkpoint (``config.resolved.yaml``). A resume compares the config it is given with the one of the
run that wrote the checkpoint, key by key, and every difference gets one explicit policy from
:data:`RESUME_POLICY`:

* ``refuse`` — the change would alter what is learned or the order the data comes in, so the run
  would no longer be the one that was checkpointed; or it is an optimizer setting, which the
  checkpoint's optimizer and scheduler state would silently override (``load_state_dict`` restores
  the saved learning rate, betas, eps and weight decay; the schedule would mix old and new). The
  resume stops and names every such key with its old and new value.
* ``apply`` — takes effect from the resumed step on (a warning says so): the run continues, but no
  longer as an uninterrupted run would have.
* ``accept`` — does not change the numbers (kernels proven equivalent in ``tests/invariants``,
  evaluation, saving, logging, where files go); listed as information.
* ``ignore`` — says how this run finds its checkpoint; differs by design.

A key the table does not know (a newer or older schema) is refused: no silent default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from hellbender.config.schema import ResolvedConfig
from hellbender.train.checkpoint import CONFIG_FILE, CheckpointError

Policy = Literal["refuse", "apply", "accept", "ignore"]

RESOLVED_CONFIG = CONFIG_FILE


def resolved_config_text(cfg: ResolvedConfig) -> str:
    """``config.resolved.yaml``: every key with its value as the run uses it (derived ones too)."""
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _keys(policy: Policy, why: str, names: str) -> dict[str, tuple[Policy, str]]:
    return dict.fromkeys(names.split(), (policy, why))


RESUME_POLICY: dict[str, tuple[Policy, str]] = {
    **_keys("refuse", "changes the training data or its order", """
        datasets val_set_size shuffle_merged_datasets dataset_exact_deduplication sequence_len
        min_sample_len excess_length_strategy train_on_inputs sample_packing group_by_length
        chat_template default_system_message tokenizer_config tokenizer_use_fast special_tokens tokens
        special_tokens_fix seed eot_tokens"""),
    **_keys("refuse", "changes the steps of the run and so its schedule", """
        micro_batch_size batch_size num_epochs max_steps epochs_given context_parallel_size
        sequence_parallel_degree tensor_parallel_size dp_shard_size dp_replicate_size"""),
    **_keys("refuse", "DeepSpeed's checkpoints resume under the DeepSpeed config that wrote them", """
        deepspeed"""),
    # Checkpoints hold whole weights and optimizer states keyed by name, whatever the strategy
    # (hellbender.distributed.parallel), and a step's update depends only on its global batch
    # (N ranks ≡ 1 rank, tests/invariants/test_distributed.py); batch_size and the step plan are
    # compared on their own.
    **_keys("accept", "how each step is spread over ranks and micro-batches, with the same batch_size", """
        gradient_accumulation_steps world_size data_parallel_size distributed_strategy ddp fsdp
        fsdp_config fsdp_version fsdp_final_state_dict_type"""),
    **_keys("accept", "how the ranks communicate, not what they compute", """
        ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers ddp_timeout"""),
    **_keys("refuse", "changes the model or what is trained", """
        base_model base_model_config revision_of_model overrides_of_model_config
        resize_token_embeddings_to_32x load_in_8bit load_in_4bit bnb_4bit_quant_type
        bnb_4bit_use_double_quant gptq qat adapter lora_model_dir lora_r lora_alpha lora_dropout
        lora_target_modules lora_target_linear lora_modules_to_save lora_fan_in_fan_out peft_use_dora
        peft_use_rslora peft_layers_to_transform unfrozen_parameters"""),
    **_keys("refuse", "the checkpoint's optimizer and scheduler state would override the new value", """
        learning_rate optimizer lr_scheduler cosine_min_lr_ratio warmup_steps warmup_ratio weight_decay
        adam_beta1 adam_beta2 adam_epsilon"""),
    **_keys("apply", "the run no longer matches an uninterrupted one", """
        max_grad_norm compute_dtype tf32 fp8 fp8_enable_fsdp_float8_all_gather"""),
    **_keys("accept", "does not change the numbers", """
        attn_implementation flash_attention flex_attention sdp_attention xformers_attention
        context_parallel_strategy ring_attn_func heads_k_stride
        eager_attention gradient_checkpointing gradient_checkpointing_kwargs activation_offloading
        chunked_cross_entropy chunked_cross_entropy_num_chunks cut_cross_entropy liger_rms_norm
        liger_glu_activation liger_rope liger_layer_norm liger_cross_entropy
        liger_fused_linear_cross_entropy tiled_mlp tiled_mlp_num_shards torch_compile
        torch_compile_backend lora_mlp_kernel lora_qkv_kernel lora_o_kernel loss_method
        pad_to_sequence_len sample_packing_bin_size sample_packing_group_size
        dataloader_num_workers dataloader_pin_memory dataloader_prefetch_factor
        bf16 fp16"""),  # bf16/fp16 take effect through compute_dtype, compared on its own
    **_keys("accept", "only how the model and data are found", """
        model_type tokenizer_type trust_remote_code allow_pickle_weights model_cache_dir
        dataset_prepared_path dataset_num_proc dataset_processes on_bad_row skip_prepare_dataset"""),
    **_keys("accept", "evaluation, saving or logging only", """
        test_datasets eval_sample_packing eval_batch_size eval_steps evals_per_epoch eval_strategy
        save_steps saves_per_epoch save_strategy save_total_limit save_safetensors save_only_model
        output_dir logging_steps loss_watchdog_threshold loss_watchdog_patience early_stopping_patience
        load_best_model_at_end metric_for_best_model use_tensorboard
        wandb_project wandb_entity wandb_name wandb_run_id wandb_mode wandb_watch wandb_log_model
        mlflow_tracking_uri mlflow_experiment_name mlflow_run_name strict debug
        eval_table_size eval_max_new_tokens hub_model_id hub_strategy push_to_hub hub_private_repo
        push_dataset_to_hub"""),
    **_keys("ignore", "how this run finds its checkpoint", """
        resume_from_checkpoint auto_resume_from_checkpoints"""),
}  # fmt: skip
_UNKNOWN: tuple[Policy, str] = ("refuse", "a setting this version cannot judge")


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 120 else text[:119] + "…"


@dataclass(frozen=True)
class Change:
    """One key whose value differs between the checkpoint's run and this one."""

    key: str
    old: Any
    new: Any
    policy: Policy
    why: str

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} → {_show(self.new)}"


def config_changes(cfg: ResolvedConfig, checkpoint: Path) -> list[Change] | None:
    """Every key that differs from the config saved in ``checkpoint``, in schema order; None when the
    checkpoint holds no config (written by a hellbender before checkpoints carried one)."""
    path = checkpoint / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path} cannot be read ({' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(old, dict):
        raise CheckpointError(f"{path} does not hold a config (a mapping of keys to values)")
    new = yaml.safe_load(resolved_config_text(cfg))  # the same YAML round trip as the saved one
    changes = []
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key) != new.get(key):
            policy, why = RESUME_POLICY.get(key, _UNKNOWN)
            if policy != "ignore":
                changes.append(Change(key, old.get(key), new.get(key), policy, why))
    return changes


def check_resume_config(cfg: ResolvedConfig, checkpoint: Path) -> list[Change] | None:
    """:func:`config_changes`, raising :class:`CheckpointError` that lists every refused change."""
    changes = config_changes(cfg, checkpoint)
    refused = [c for c in changes or [] if c.policy == "refuse"]
    if refused:
        by_reason: dict[str, list[str]] = {}
        for change in refused:
            by_reason.setdefault(change.why, []).append(str(change))
        listed = "; ".join(f"{', '.join(items)} ({why})" for why, items in by_reason.items())
        raise CheckpointError(
            f"cannot resume from {checkpoint}: settings differ from the run that wrote it, and a resume "
            f"cannot honour them: {listed}. Set them back to continue that run, or start a new run in "
            "another output_dir (lora_model_dir or base_model can point at the checkpoint to start "
            "from its weights)."
        )
    return changes
