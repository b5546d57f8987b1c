"""Names of the configuration keys and values that Axolotl accepts.

Hellbender reads Axolotl-style YAML. When a config contains a key hellbender does not know, the
loader can check these sets first: a key listed here is a real Axolotl option that hellbender does not
support yet (say so plainly), while a key found nowhere is probably a typo (suggest the closest
match). The sets hold names only; they say nothing about types, defaults or semantics.

Sets:

- ``AXOLOTL_TOP_LEVEL_KEYS``: every top-level key. It is the union of ``AXOLOTL_CORE_KEYS`` (fields of
  ``AxolotlInputConfig`` and its mixins, including the HF ``TrainingArguments`` names Axolotl passes
  through, the deprecated fields Axolotl still declares, and both spellings of the remapped fields,
  e.g. ``model_config`` / ``overrides_of_model_config``), ``AXOLOTL_PLUGIN_KEYS`` (fields added by the
  plugins bundled with Axolotl; they only validate when the plugin is listed under ``plugins:``) and
  ``AXOLOTL_LEGACY_KEYS`` (keys that older Axolotl releases or its old hand-written config reference
  accepted but that are gone from the current schema; kept so old configs are still recognised).
  Names of nested blocks (``trl``, ``vllm``, ``fsdp_config``, ``qat``, ``peft``, ...) are listed, the
  keys inside them are not.
- ``AXOLOTL_CLOUD_KEYS``: keys of Axolotl's cloud-launch config (``axolotl train --cloud FILE``).
- ``AXOLOTL_PLUGINS``: the plugins bundled with Axolotl, by class name, and the feature each adds.
- ``AXOLOTL_DATASET_TYPES``: the names of Axolotl's dataset ``type:`` strategies.
- ``AXOLOTL_ATTN_IMPLEMENTATIONS``: Axolotl's named ``attn_implementation`` values.
- ``AXOLOTL_DATASET_KEYS``: keys of one entry under ``datasets:`` / ``test_datasets:`` (SFT, DPO, KTO,
  stepwise-supervised and synthetic entries), plus the two keys only ``pretraining_dataset:`` entries
  use (``text_column``, ``skip``), ``train_on_eot`` (documented for ``type: chat_template`` entries but
  not declared in the current dataset schema) and ``train_on_split`` (an SFT entry field in older
  schemas).
- ``AXOLOTL_DATASET_TYPE_KEYS``: keys of the mapping form of an entry's ``type:`` (user-defined
  prompt formats for SFT, DPO and KTO).
- ``AXOLOTL_OPTIMIZERS``: accepted ``optimizer:`` values, i.e. the HF ``OptimizerNames`` values plus
  Axolotl's own ``CustomSupportedOptimizers`` (``AXOLOTL_CUSTOM_OPTIMIZERS``). The HF part depends on
  the installed transformers; ``adamw_hf`` and ``adamw_apex_fused`` only exist in transformers 4.x.
- ``AXOLOTL_LR_SCHEDULERS``: accepted ``lr_scheduler:`` values (HF ``SchedulerType`` plus ``one_cycle``
  and ``rex``); again the HF part follows the installed transformers.
- ``AXOLOTL_RL_TYPES``: accepted ``rl:`` values.

Where the names come from (collected 2026-11 from stored copies of github.com/axolotl-ai-cloud/axolotl,
newest versions available, cross-checked against older ones):

- ``src/axolotl/utils/schemas/config.py`` (``AxolotlInputConfig``), ``model.py``, ``training.py``,
  ``peft.py``, ``integrations.py``, ``multimodal.py``, ``deprecated.py``, ``datasets.py``, ``enums.py``;
- plugin argument models in ``src/axolotl/integrations/{cut_cross_entropy,liger,kd,spectrum,lm_eval,
  grokfast,llm_compressor,densemixer,diffusion,swanlab,kernels}/args.py``;
- ``docs/config.qmd`` (the older hand-written reference) and the generated config reference published
  at docs.axolotl.ai/docs/config-reference.html;
- ``transformers.training_args.OptimizerNames`` and ``transformers.SchedulerType`` as of transformers
  5.23, plus the 4.x-only optimizer names noted above.

Only the names are taken from those sources; nothing here is copied code. When Axolotl adds options,
extend the literals (keep each one sorted).
"""

from __future__ import annotations


def _names(text: str) -> frozenset[str]:
    """A set of names written as whitespace-separated words (long lists stay readable and diffable)."""
    return frozenset(text.split())


# Fields of AxolotlInputConfig and the mixins it inherits (model, output, LoRA/PEFT, ReLoRA, jagged LR,
# hyperparameters, wandb/mlflow/comet/trackio/OpenTelemetry, LISA, gradio, ray, multimodal, remapped and
# deprecated parameters).
AXOLOTL_CORE_KEYS: frozenset[str] = _names(
    """
    accelerator_config activation_offloading adam_beta1 adam_beta2 adam_beta3 adam_epsilon adam_epsilon2
    adapter added_tokens_overrides attn_implementation auto_find_batch_size auto_resume_from_checkpoints
    axolotl_config_path base_model base_model_config batch_flattening batch_size bench_dataset bench_split
    bf16 bfloat16 bnb_config_kwargs center_rewards_coefficient chat_template chat_template_jinja
    chat_template_kwargs chunked_cross_entropy chunked_cross_entropy_num_chunks cls_model_config
    comet_api_key comet_experiment_config comet_experiment_key comet_mode comet_online comet_project_name
    comet_workspace context_parallel_size cosine_constant_lr_ratio cosine_min_lr_ratio cpo_alpha
    curriculum_sampling dataloader_drop_last dataloader_num_workers dataloader_pin_memory
    dataloader_prefetch_factor dataset_exact_deduplication dataset_keep_in_memory dataset_num_proc
    dataset_prepared_path dataset_processes dataset_shard_idx dataset_shard_num datasets ddp
    ddp_broadcast_buffers ddp_bucket_cap_mb ddp_find_unused_parameters ddp_timeout deepcompile deepspeed
    default_system_message device device_map dion_lr dion_momentum dion_rank_fraction dion_rank_multiple_of
    do_bench_eval do_causal_lm_eval dp_replicate_size dp_shard_size dpo_beta dpo_label_smoothing
    dpo_loss_type dpo_loss_weights dpo_padding_free dpo_use_liger_kernel dpo_use_weighting
    dynamic_checkpoint eaft_alpha eaft_k eager_attention early_stopping_patience ebft embedding_lr
    embedding_lr_scale embeddings_skip_upcast eot_tokens eval_batch_size eval_causal_lm_metrics
    eval_sample_packing eval_sequence_len eval_steps eval_strategy evals_per_epoch evaluation_strategy
    excess_length_strategy experimental_skip_move_to_device experts_implementation fix_untrained_tokens
    flash_attention flash_attn_cross_entropy flash_attn_fuse_mlp flash_attn_rms_norm flash_optimum
    flex_attention flex_attn_compile_kwargs float16 float32 fp16 fp8 fp8_enable_fsdp_float8_all_gather
    freeze_mm_modules fsdp fsdp_config fsdp_final_state_dict_type fsdp_version gc_steps
    gemma4_hybrid_attn_impl generate_samples generation_do_sample generation_max_new_tokens
    generation_prompt_ratio generation_temperature generation_top_k generation_top_p gptq gpu_memory_limit
    gradient_accumulation_steps gradient_checkpointing gradient_checkpointing_kwargs gradio_max_new_tokens
    gradio_server_name gradio_server_port gradio_share gradio_temperature gradio_title greater_is_better
    group_by_length heads_k_stride hf_mlflow_log_artifacts hf_use_auth_token hub_model_id hub_revision
    hub_strategy image_resize_algorithm image_size include_tkps include_tokens_per_second
    is_falcon_derived_model is_llama_derived_model is_mistral_derived_model is_preprocess
    is_qwen_derived_model jagged_restart_anneal_steps jagged_restart_steps jagged_restart_warmup_steps
    kto_desirable_weight kto_undesirable_weight layer_offloading learning_rate lisa_layers_attribute
    lisa_n_layers lisa_step_interval llama4_linearized_experts load_best_model_at_end load_in_4bit
    load_in_8bit local_rank logging_steps lora_alpha lora_dropout lora_embedding_kernel lora_fan_in_fan_out
    lora_mlp_kernel lora_model_dir lora_modules_to_save lora_o_kernel lora_on_cpu lora_qkv_kernel lora_r
    lora_target_linear lora_target_modules lora_target_parameters loraplus_lr_embedding loraplus_lr_ratio
    loss_watchdog_patience loss_watchdog_threshold low_cpu_mem_usage lr_div_factor lr_groups
    lr_quadratic_warmup lr_scheduler lr_scheduler_kwargs max_grad_norm max_memory max_packed_sequence_len
    max_prompt_len max_steps mean_resizing_embeddings merge_lora merge_method metric_for_best_model
    micro_batch_size min_sample_len mlflow_experiment_name mlflow_run_name mlflow_tracking_uri model_config
    model_kwargs model_quantization_config model_quantization_config_kwargs model_revision model_type
    multipack_real_batches neftune_noise_alpha noisy_embedding_alpha num_dataset_shards_to_save num_epochs
    num_generation_samples num_labels optim_args optim_target_modules optimizer orpo_alpha otel_metrics_host
    otel_metrics_port output_dir overrides_of_model_config overrides_of_model_kwargs pad_to_multiple_of
    pad_to_sequence_len peft peft_autocast_adapter_dtype peft_ensure_weight_tying peft_init_lora_weights
    peft_layer_replication peft_layers_pattern peft_layers_to_transform peft_trainable_token_indices
    peft_use_dora peft_use_rslora plugins pose_max_context_len pose_num_chunks pose_split_on_token_ids
    precompute_ref_log_probs preprocess_iterable pretrain_multipack_attn pretrain_multipack_buffer_size
    pretraining_dataset pretraining_sample_concatenation process_reward_model processor_kwargs
    processor_type profiler_steps profiler_steps_start push_dataset_to_hub qat qgalore_cos_threshold
    qgalore_gamma_proj qgalore_proj_bits qgalore_proj_group_size qgalore_proj_quant qgalore_proj_type
    qgalore_queue_size qgalore_rank qgalore_scale qgalore_update_proj_gap qlora_sharded_model_loading
    quantization quantize_moe_experts ray_num_workers ray_run_name reinit_weights relora relora_cpu_offload
    relora_prune_method relora_prune_ratio remove_unused_columns resize_token_embeddings_to_32x
    resources_per_worker resume_from_checkpoint revision_of_model reward_model ring_attn_func rl rl_beta
    rope_scaling s2_attention sage_attention sample_packing sample_packing_bin_size sample_packing_eff_est
    sample_packing_group_size sample_packing_mp_start_method sample_packing_sequentially save_first_step
    save_only_model save_safetensors save_steps save_strategy save_total_limit saves_per_epoch
    scaling_softmax scaling_softmax_bias scaling_softmax_factor sdp_attention seed sequence_len
    sequence_parallel_degree shrink_embeddings shuffle_before_merging_datasets shuffle_merged_datasets
    simpo_gamma skip_prepare_dataset special_tokens streaming streaming_multipack_buffer_size strict
    tensor_parallel_size test_datasets tf32 tiled_mlp tiled_mlp_num_shards tiled_mlp_use_original_mlp
    tokenizer_config tokenizer_legacy tokenizer_save_jinja_files tokenizer_type tokenizer_use_fast
    tokenizer_use_mistral_common tokens torch_compile torch_compile_backend torch_compile_mode
    torchdistx_path total_num_tokens total_supervised_tokens trackio_project_name trackio_run_name
    trackio_space_id train_on_inputs trainer_cls trl trust_remote_code type_of_model unfrozen_parameters
    use_comet use_eaft use_kernels use_mlflow use_onebitllms use_otel_metrics use_pose use_ray
    use_tensorboard use_trackio use_wandb val_set_size vllm wandb_entity wandb_log_model wandb_mode
    wandb_name wandb_project wandb_run_id wandb_watch warmup_ratio warmup_steps weight_decay world_size
    xformers_attention
    """
)

# Fields added to AxolotlInputConfig and its mixins after the set above was collected (read from
# the 2026-07 schema: attention and kernel switches, selective checkpointing, per-module LoRA ranks).
AXOLOTL_NEWER_CORE_KEYS: frozenset[str] = _names(
    """
    flash_attn_d512 fp32_norm_classes fp32_norms fused_attn_kernel gc_collect_steps large_head_attention
    lora_alpha_pattern lora_rank_pattern role_boundaries sdpa_varlen selective_checkpointing
    torch_compile_options torch_empty_cache_steps
    """
)

# Keys contributed by the plugins that ship inside Axolotl (src/axolotl/integrations/*/args.py).
AXOLOTL_PLUGIN_KEYS: frozenset[str] = _names(
    """
    cut_cross_entropy cut_cross_entropy_accum_c_fp32 cut_cross_entropy_c_grad_chunk_size dense_mixer
    diffusion grokfast_alpha grokfast_lamb kd_alpha kd_beta kd_ce_alpha kd_compiled_kernel kd_normalize_topk
    kd_online_max_new_tokens kd_online_preflight kd_online_server kd_online_server_base_url
    kd_online_server_model kd_online_timeout kd_online_topk kd_prepared_targets_alignment kd_temperature
    kd_temperature_min kd_top_k_before_softmax kd_trainer kd_zscore_base_temp liger_cross_entropy
    liger_fused_linear_cross_entropy liger_glu_activation liger_layer_norm liger_rms_norm liger_rope
    liger_swiglu liger_use_token_scaling llmcompressor lm_eval_batch_size lm_eval_model lm_eval_post_train
    lm_eval_tasks spectrum_model_name spectrum_top_fraction swanlab_api_host swanlab_api_key
    swanlab_description swanlab_experiment_name swanlab_log_model swanlab_mode swanlab_project
    swanlab_web_host swanlab_workspace use_scattermoe use_sonicmoe use_swanlab
    dsv4_bf16_all dsv4_fp4_grouped_mode dsv4_fp8_lora_kernel dsv4_fp8_nonexpert_mode
    dsv4_shared_mlp_lora_kernel expert_backend expert_parallel_backend expert_parallel_fallback_on_unsupported
    expert_parallel_num_nvl_bytes expert_parallel_num_rdma_bytes expert_parallel_size
    expert_parallel_token_capacity gemma4_fp8_nonexpert gemma4_nf4_nonexpert hatchery liger_rms_norm_gated
    moe_bnb_fast moe_dequant_chunk_size moe_grouped_backend mora nemo_gym_auto_clone nemo_gym_auto_start
    nemo_gym_config_paths nemo_gym_datasets nemo_gym_dir nemo_gym_enabled nemo_gym_head_port
    nemo_gym_max_turns nemo_gym_model_name nemo_gym_multi_turn nemo_gym_run_timeout nemo_gym_server_timeout
    nemo_gym_verify_timeout nonexpert_quantization nvfp4_merge_aware nvfp4_merge_aware_start_step
    swanlab_completion_log_interval swanlab_completion_max_buffer swanlab_lark_secret
    swanlab_lark_webhook_url swanlab_log_completions use_dsv4_kernels use_glm_dsa_kernels
    """
)

# The plugins bundled with Axolotl (the class name after ``axolotl.integrations.<module>.``) and the
# feature each one adds.
AXOLOTL_PLUGINS: dict[str, str] = {
    "CutCrossEntropyPlugin": "cut-cross-entropy loss",
    "DenseMixerPlugin": "DenseMixer MoE routing",
    "DiffusionPlugin": "diffusion language-model training",
    "ExpertParallelPlugin": "expert parallelism",
    "GrokfastPlugin": "Grokfast gradient filtering",
    "HatcheryPlugin": "Hatchery",
    "KDPlugin": "knowledge distillation",
    "KernelsPlugin": "MoE kernels from the hub",
    "LLMCompressorPlugin": "LLM Compressor sparsity",
    "LMEvalPlugin": "lm-eval-harness evaluation",
    "LigerPlugin": "Liger kernels",
    "MoraPlugin": "MoRA adapters",
    "NemoGymPlugin": "NeMo Gym environments",
    "SpectrumPlugin": "Spectrum layer selection",
    "SwanLabPlugin": "SwanLab logging",
}

# Keys from earlier Axolotl schemas or documentation that the current schema no longer declares.
AXOLOTL_LEGACY_KEYS: frozenset[str] = _names(
    """
    base_model_ignore_patterns debug dpo_generate_during_eval dpo_norm_loss dpo_use_logits_to_keep
    eval_max_new_tokens eval_table_size flash_attn_fuse_qkv random_init_weights relora_anneal_steps
    relora_steps relora_warmup_steps rpo_alpha unsloth_cross_entropy_loss unsloth_lora_mlp unsloth_lora_o
    unsloth_lora_qkv unsloth_rms_norm unsloth_rope
    gptq_disable_exllama gptq_groupsize gptq_model_v1 landmark_attention load_4bit
    sample_packing_seq_len_multiplier torch_dtype xpos_rope
    """
)

AXOLOTL_TOP_LEVEL_KEYS: frozenset[str] = (
    AXOLOTL_CORE_KEYS | AXOLOTL_NEWER_CORE_KEYS | AXOLOTL_PLUGIN_KEYS | AXOLOTL_LEGACY_KEYS
)

# Keys of Axolotl's cloud-launch config (the file given to `axolotl train --cloud`, read by
# src/axolotl/cli/cloud/): not training options, but found in its examples/cloud folder.
AXOLOTL_CLOUD_KEYS: frozenset[str] = _names(
    """
    branch docker_tag dockerfile_commands env gpu gpu_count launcher launcher_args memory memory_preprocess
    node_count project_name provider secrets spawn timeout timeout_preprocess volumes
    """
)

# Keys of one entry under `datasets:` / `test_datasets:` (and `pretraining_dataset:`).
AXOLOTL_DATASET_KEYS: frozenset[str] = _names(
    """
    chat_template chat_template_jinja conversation data_files drop_system_message ds_type field field_human
    field_messages field_model field_thinking field_tools input_format input_transform length logprobs_field
    max_completion_length max_input_id message_field_content message_field_role message_field_training
    message_field_training_detail message_property_mappings min_input_id name path preprocess_shards
    revision roles roles_to_train seed sequence_length shards shards_idx skip split split_thinking
    step_separator temperature template_thinking_key text_column train_on_eos train_on_eot
    train_on_last_step_only train_on_split trust_remote_code type
    """
)

# Keys of the mapping form of a dataset entry's `type:` (custom SFT / DPO / KTO prompt formats).
AXOLOTL_DATASET_TYPE_KEYS: frozenset[str] = _names(
    """
    chosen_format completion_format field field_chosen field_completion field_input field_instruction
    field_label field_output field_prompt field_rejected field_system format no_input_format prompt_format
    rejected_format system_format system_prompt
    """
)

# Names of Axolotl's dataset `type:` strategies (its prompt-strategy modules and the older built-in
# formats). A `type:` is one of these, optionally followed by `.function` or `:style`
# (`chat_template.default`, `alpaca:chat`); a dotted path may also name the user's own module.
AXOLOTL_DATASET_TYPES: frozenset[str] = _names(
    """
    alpaca alpaca_chat alpaca_instruct alpaca_w_system bradley_terry chat_template chatml completion
    concisechoice context_qa creative_acr dpo ebft explainchoice gpteacher input_output jeopardy kto
    llama2_chat llama3 messages metharme oasst orcamini orpo passthrough pretrain pygmalion reflection
    rwd sharegpt sharegpt_jokes stepwise_supervised summarizetldr user_defined zephyr
    """
)

# Values of `attn_implementation` Axolotl accepts besides the ones hellbender has (a value with a
# `/` names a kernel on the Hugging Face hub).
AXOLOTL_ATTN_IMPLEMENTATIONS: frozenset[str] = _names(
    """
    eager flash_attention_2 flash_attention_3 flex_attention fp8 sage sdpa xformers
    """
)

# transformers.training_args.OptimizerNames values (transformers 5.x).
_HF_OPTIMIZERS: frozenset[str] = _names(
    """
    adafactor adagrad adalomo adamw_8bit adamw_anyprecision adamw_bnb_8bit adamw_torch adamw_torch_4bit
    adamw_torch_8bit adamw_torch_fused adamw_torch_npu_fused adamw_torch_xla ademamix ademamix_8bit
    apollo_adamw apollo_adamw_layerwise galore_adafactor galore_adafactor_layerwise galore_adamw
    galore_adamw_8bit galore_adamw_8bit_layerwise galore_adamw_layerwise grokadamw lion_32bit lion_8bit lomo
    paged_adamw_32bit paged_adamw_8bit paged_ademamix_32bit paged_ademamix_8bit paged_lion_32bit
    paged_lion_8bit rmsprop rmsprop_bnb rmsprop_bnb_32bit rmsprop_bnb_8bit schedule_free_adamw
    schedule_free_radam schedule_free_sgd sgd stable_adamw
    """
)

# OptimizerNames values that exist only in transformers 4.x.
_HF4_ONLY_OPTIMIZERS: frozenset[str] = _names(
    """
    adamw_apex_fused adamw_hf
    """
)

# Axolotl's CustomSupportedOptimizers, plus q_galore_adamw8bit (Q-GaLore, configured through the
# qgalore_* keys) and lion_pytorch (accepted by older schemas).
AXOLOTL_CUSTOM_OPTIMIZERS: frozenset[str] = _names(
    """
    adopt_adamw ao_adamw_4bit ao_adamw_8bit ao_adamw_fp8 came_pytorch dion flash_adam flash_adamw flash_lion
    flash_sgd flash_sgdw lion_pytorch muon optimi_adamw q_galore_adamw8bit sinkgd
    """
)

AXOLOTL_OPTIMIZERS: frozenset[str] = _HF_OPTIMIZERS | _HF4_ONLY_OPTIMIZERS | AXOLOTL_CUSTOM_OPTIMIZERS

# transformers.SchedulerType values plus Axolotl's own `one_cycle` and `rex`.
AXOLOTL_LR_SCHEDULERS: frozenset[str] = _names(
    """
    constant constant_with_warmup cosine cosine_warmup_with_min_lr cosine_with_min_lr cosine_with_restarts
    greedy inverse_sqrt linear one_cycle polynomial reduce_lr_on_plateau rex warmup_stable_decay
    """
)

# Values of Axolotl's RLType enum.
AXOLOTL_RL_TYPES: frozenset[str] = _names(
    """
    dpo ebft gdpo grpo ipo kto orpo simpo
    """
)
