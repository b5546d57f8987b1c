"""Prompt formats: one module per ``type:``; :func:`build_format` picks one for a dataset entry."""

from __future__ import annotations

from typing import Any

from hellbender.config.schema import DatasetConfig, ResolvedConfig, UserDefinedFormat
from hellbender.data.formats.base import PromptFormat, Rendered

__all__ = ["PromptFormat", "Rendered", "build_format"]


def build_format(ds: DatasetConfig, cfg: ResolvedConfig, tokenizer: Any) -> PromptFormat:
    """The prompt format of one ``datasets:`` entry, with the top-level settings it inherits."""
    train_on_inputs = cfg.train_on_inputs if ds.train_on_inputs is None else ds.train_on_inputs
    if isinstance(ds.type, UserDefinedFormat) or ds.type == "user_defined":
        from hellbender.data.formats.user_defined import UserDefinedPromptFormat

        # A bare `type: user_defined` means the default format strings.
        spec = ds.type if isinstance(ds.type, UserDefinedFormat) else UserDefinedFormat()
        return UserDefinedPromptFormat(spec, train_on_inputs=train_on_inputs)
    if ds.type == "alpaca":
        from hellbender.data.formats.alpaca import AlpacaFormat

        return AlpacaFormat(train_on_inputs=train_on_inputs)
    if ds.type == "completion":
        from hellbender.data.formats.completion import CompletionFormat

        return CompletionFormat(text_column=ds.text_column)
    if ds.type == "input_output":
        from hellbender.data.formats.input_output import InputOutputFormat

        return InputOutputFormat(field_segments=ds.field_segments, train_on_inputs=train_on_inputs)
    if ds.type == "chat_template":
        from hellbender.data.formats.chat_template import ChatTemplateFormat

        return ChatTemplateFormat(
            ds,
            tokenizer,
            chat_template=cfg.chat_template,
            default_system_message=cfg.default_system_message,
            train_on_inputs=train_on_inputs,
            eot_tokens=cfg.eot_tokens,
        )
    # The schema's Literal makes this unreachable for validated configs.
    raise ValueError(f"unknown dataset type {ds.type!r}")
