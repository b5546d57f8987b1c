"""``type: input_output`` — a row is a list of text segments, each saying whether it is trained.

``{"segments": [{"text": "...", "label": false}, {"text": "...", "label": true}]}``. The segments
are concatenated verbatim (no separators, no EOS added: the data says exactly what the model
sees) and tokenized as one text. The tokenizer's own BOS, if it adds one, is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hellbender.data.errors import BadRow
from hellbender.data.formats.base import (
    PromptFormat,
    Rendered,
    get_object_list,
    get_str,
    type_name,
)


class InputOutputFormat(PromptFormat):
    name = "input_output"

    def __init__(self, *, field_segments: str, train_on_inputs: bool) -> None:
        self.field_segments = field_segments
        self.train_on_inputs = train_on_inputs

    def features(self) -> Any:
        from datasets import Features, List, Value

        return Features({"segments": List({"text": Value("string"), "label": Value("bool")})})

    def normalize(self, row: Any) -> dict[str, Any]:
        segments = get_object_list(row, self.field_segments, items="segments", item="segment")
        out = []
        for i, seg in enumerate(segments):
            text = get_str(seg, "text", required=True, what=f"segment {i}: field")
            if "label" not in seg or seg["label"] is None:
                raise BadRow("missing_field", f"segment {i}: field 'label' is missing")
            if not isinstance(seg["label"], bool):
                raise BadRow(
                    "wrong_type",
                    f"segment {i}: field 'label' must be true or false, got {type_name(seg['label'])}",
                )
            out.append({"text": text, "label": seg["label"]})
        return {"segments": out}

    def render(self, row: Mapping[str, Any]) -> Rendered:
        parts: list[str] = []
        trained: list[tuple[int, int]] = []
        pos = 0
        for seg in row["segments"]:
            text = seg["text"]
            if seg["label"] and text:
                trained.append((pos, pos + len(text)))
            parts.append(text)
            pos += len(text)
        if self.train_on_inputs:
            trained = [(0, pos)]
        return Rendered(text="".join(parts), trained=trained)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "field": self.field_segments, "train_on_inputs": self.train_on_inputs}
