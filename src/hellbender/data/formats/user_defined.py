"""A prompt format given by format strings in the config (Axolotl's ``type: {field_instruction: ...}``).

``format`` / ``no_input_format`` are Python format strings over ``{instruction}``, ``{input}`` and
``{system}``; the answer follows the prompt and is trained together with EOS. Placeholders are
checked once, when the format is built, so a typo fails before any row is read.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from hellbender.config.schema import UserDefinedFormat
from hellbender.data.errors import DataError
from hellbender.data.formats.alpaca import prompt_answer
from hellbender.data.formats.base import PromptFormat, Rendered, as_object, get_str

PLACEHOLDERS = ("instruction", "input", "system")


def check_format_string(fmt: str, key: str) -> None:
    """Raise :class:`DataError` for unknown or positional placeholders in ``fmt``."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None]
    except ValueError as exc:  # e.g. a lone "{"
        raise DataError(
            f"user-defined format: `{key}` is not a valid format string ({exc}); "
            "write {{ for a literal brace."
        ) from exc
    for name in fields:
        if name not in PLACEHOLDERS:
            raise DataError(
                f"user-defined format: `{key}` uses the placeholder {{{name}}}; only "
                + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                + " are known."
            )


class UserDefinedPromptFormat(PromptFormat):
    name = "user_defined"

    def __init__(self, spec: UserDefinedFormat, *, train_on_inputs: bool) -> None:
        check_format_string(spec.format, "format")
        check_format_string(spec.no_input_format, "no_input_format")
        self.spec = spec
        self.train_on_inputs = train_on_inputs

    def features(self) -> Any:
        from datasets import Features, Value

        return Features({k: Value("string") for k in ("instruction", "input", "output", "system")})

    def normalize(self, row: Any) -> dict[str, Any]:
        row = as_object(row)
        spec = self.spec
        system = get_str(row, spec.field_system, required=False) or spec.system_prompt
        return {
            "instruction": get_str(row, spec.field_instruction, required=True),
            "input": get_str(row, spec.field_input, required=False),
            "output": get_str(row, spec.field_output, required=True),
            "system": system,
        }

    def render(self, row: Mapping[str, Any]) -> Rendered:
        fmt = self.spec.format if row["input"] else self.spec.no_input_format
        prompt = fmt.format(instruction=row["instruction"], input=row["input"], system=row["system"])
        return prompt_answer(prompt, row["output"], train_on_inputs=self.train_on_inputs)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec.model_dump(), "train_on_inputs": self.train_on_inputs}
