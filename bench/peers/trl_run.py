"""The TRL peer of ``bench/peers.py``: SFTTrainer on the benchmark's prompt/completion rows.

Runs in the TRL venv: ``python trl_run.py SPEC.json``. The spec (written by ``bench/peers.py``)
holds the model folder, the data file (the alpaca rows already rendered with the alpaca prompt
into ``prompt`` / ``completion`` fields: the same template hellbender and Axolotl use) and the
run's settings. Loss on the completion only (TRL's default for prompt/completion rows: the
``train_on_inputs: false`` of the others); the EOS token is appended to every completion.
Result JSON: ``$PEER_RESULT`` (written by :mod:`counting` at the end of training).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

T_START = time.perf_counter()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from counting import attach
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    bf16 = spec["precision"] == "bf16"
    data = load_dataset("json", data_files=spec["trl_data"], split="train")
    args = SFTConfig(
        output_dir=spec["out"],
        max_length=spec["seq"],
        packing=True,  # TRL's default strategy for it: best-fit decreasing ("bfd"), padding-free batches
        completion_only_loss=True,
        per_device_train_batch_size=spec["mbs"],
        gradient_accumulation_steps=spec["gas"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        # TRL 1.x turns gradient checkpointing on by default; the other peers run without it.
        gradient_checkpointing=False,
        bf16=bf16,
        use_cpu=True,
        seed=spec["seed"],
        data_seed=spec["seed"],
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataset_num_proc=1,
        model_init_kwargs={
            "dtype": torch.bfloat16 if bf16 else torch.float32,
            "attn_implementation": spec["attn"],
            "use_cache": False,  # no KV cache in training, as hellbender and Axolotl set it
        },
    )
    lora = LoraConfig(
        r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
        target_modules="all-linear", task_type="CAUSAL_LM",
    )  # fmt: skip
    trainer = SFTTrainer(model=spec["model"], args=args, train_dataset=data, peft_config=lora)
    tally = attach(trainer)
    tally.info.update({
        "packing": args.packing,
        "packing_strategy": getattr(args, "packing_strategy", None),
        "padding_free": bool(getattr(trainer, "padding_free", getattr(args, "padding_free", False))),
        "completion_only_loss": args.completion_only_loss,
        "train_rows_after_packing": len(trainer.train_dataset),
        "setup_seconds": time.perf_counter() - T_START,
    })  # fmt: skip
    trainer.train()
    trainer.save_model()  # the adapter, as hellbender and Axolotl save theirs at the end
    result = Path(os.environ["PEER_RESULT"])
    record = json.loads(result.read_text())
    record["process_seconds_to_end"] = time.perf_counter() - T_START
    result.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
