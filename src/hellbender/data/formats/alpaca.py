"""``type: alpaca`` — instruction / input / output rows with the Stanford Alpaca prompt.

The answer (``output``) and the EOS token after it are trained; the prompt is not, unless
``train_on_inputs``. EOS is trained so the model learns to stop after an answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hellbender.data.formats.base import PromptFormat, Rendered, as_object, get_str

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def prompt_answer(prompt: str, answer: str, *, train_on_inputs: bool) -> Rendered:
    """A prompt followed by a trained answer and a trained EOS (shared with user-defined formats)."""
    text = prompt + answer
    start = 0 if train_on_inputs else len(prompt)
    return Rendered(text=text, trained=[(start, len(text))], append_eos=True)


class AlpacaFormat(PromptFormat):
    name = "alpaca"

    def __init__(self, *, train_on_inputs: bool) -> None:
        self.train_on_inputs = train_on_inputs

    def features(self) -> Any:
        from datasets import Features, Value

        return Features({k: Value("string") for k in ("instruction", "input", "output")})

    def normalize(self, row: Any) -> dict[str, Any]:
        row = as_object(row)
        return {
            "instruction": get_str(row, "instruction", required=True),
            "input": get_str(row, "input", required=False),
            "output": get_str(row, "output", required=True),
        }

    def render(self, row: Mapping[str, Any]) -> Rendered:
        # str.format only parses the template, so braces inside the data are safe.
        if row["input"]:
            prompt = PROMPT_WITH_INPUT.format(instruction=row["instruction"], input=row["input"])
        else:
            prompt = PROMPT_NO_INPUT.format(instruction=row["instruction"])
        return prompt_answer(prompt, row["output"], train_on_inputs=self.train_on_inputs)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "train_on_inputs": self.train_on_inputs}
