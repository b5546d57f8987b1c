"""``hellbender inference``: chat-templated generation with the trained result, streamed."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import IO, Any

import torch

from hellbender.commands.trained import load_for_use, trained_source
from hellbender.config.schema import ResolvedConfig

logger = logging.getLogger(__name__)


def read_prompts(stream: IO[str]) -> Iterable[str]:
    """Prompts from a stream, one per non-empty line (interactive: shows a ``>`` prompt)."""
    interactive = stream.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = stream.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def build_prompt_ids(tokenizer: Any, prompt: str, system: str | None) -> dict[str, torch.Tensor]:
    """Token ids of ``prompt`` as a user turn in the chat template (plain text without one)."""
    if tokenizer.chat_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        enc = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def run_inference(
    cfg: ResolvedConfig,
    prompt: str | None = None,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    stream: bool = True,
    prompts_from: IO[str] | None = None,
) -> list[str]:
    """Generate an answer to ``prompt`` (or to every line of stdin), streaming tokens to stdout.

    Greedy by default (``temperature`` 0), so an answer is reproducible. Returns the answers.
    """
    from transformers import TextStreamer

    source = trained_source(cfg)
    logger.info("generating with %s", source.description)
    model, tokenizer = load_for_use(source)
    device = next(model.parameters()).device
    prompts: Iterable[str] = [prompt] if prompt is not None else read_prompts(prompts_from or sys.stdin)
    answers: list[str] = []
    for text in prompts:
        inputs = {
            k: v.to(device) for k, v in build_prompt_ids(tokenizer, text, cfg.default_system_message).items()
        }
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        )
        # generate(): transformers' GenerationMixin or peft's causal-LM wrapper, which nn.Module is not.
        lm: Any = model
        with torch.no_grad():
            output = lm.generate(
                **inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                pad_token_id=tokenizer.pad_token_id, **sampling,
            )  # fmt: skip
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        answer = tokenizer.decode(new_tokens, skip_special_tokens=True)
        assert isinstance(answer, str)  # one sequence of ids decodes to one string
        answers.append(answer)
    return answers
