"""A prompt format given by format strings in the config (Axolotl's ``type: {field_instruction: ...}``).

``format`` / ``no_input_format`` are Python format strings over ``{instruction}``, ``{input}`` and
``{system}``; the answer follows the prompt and is trained together with EOS. The format strings
are checked by the config schema (:func:`~hellbender.config.schema.format_string_problem`: bare
known placeholders only, then filled once with :func:`~hellbender.config.schema.fill_format`, the
function :meth:`UserDefinedPromptFormat.render` fills every row with), and again when the format
is built, so a bad one fails before any row is read, never in a tokenization worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hellbender.config.schema import FORMAT_FIELDS, UserDefinedFormat, fill_format, format_string_problem
from hellbender.data.errors import DataError
from hellbender.data.formats.alpaca import prompt_answer
from hellbender.data.formats.base import PromptFormat, Rendered, as_object, get_str

PLACEHOLDERS = FORMAT_FIELDS


def check_format_string(fmt: str, key: str) -> None:
    """Raise :class:`DataError` when ``fmt`` cannot be filled as :meth:`render` fills it: a bad
    brace, an unknown or positional placeholder, a conversion (``!r``) or a format spec (``:>10``)."""
    problem = format_string_problem(fmt)
    if problem is not None:
        raise DataError(f"user-defined format: `{key}` {problem}.")


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
        prompt = fill_format(fmt, {name: row[name] for name in FORMAT_FIELDS})
        return prompt_answer(prompt, row["output"], train_on_inputs=self.train_on_inputs)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec.model_dump(), "train_on_inputs": self.train_on_inputs}
