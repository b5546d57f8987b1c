"""``type: completion`` — raw text, every token trained (continued pre-training style).

A text longer than ``sequence_len`` is not dropped or truncated but split into consecutive chunks
of ``sequence_len`` tokens, each a sample of its own: for raw text every chunk is useful data,
and cutting at a token boundary after tokenizing the whole text keeps the ids identical to the
unsplit text's. EOS closes the text (in its last chunk) so documents stay delimited.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hellbender.data.formats.base import PromptFormat, Rendered, as_object, get_str


class CompletionFormat(PromptFormat):
    name = "completion"

    def __init__(self, *, text_column: str) -> None:
        self.text_column = text_column

    def features(self) -> Any:
        from datasets import Features, Value

        return Features({"text": Value("string")})

    def normalize(self, row: Any) -> dict[str, Any]:
        return {"text": get_str(as_object(row), self.text_column, required=True)}

    def render(self, row: Mapping[str, Any]) -> Rendered:
        text = row["text"]
        return Rendered(text=text, trained=[(0, len(text))], append_eos=True, chunk=True)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "text_column": self.text_column}
