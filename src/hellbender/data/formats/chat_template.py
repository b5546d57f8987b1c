"""``type: chat_template`` — conversations rendered by a jinja chat template, masked per message.

**Linear masking.** Axolotl finds each turn's tokens by re-rendering (and re-tokenizing) the
conversation prefix for every turn, which costs O(turns²) and makes long conversations slow.
Here a conversation is rendered twice, whatever its length:

1. a *skeleton*: the same messages with every content replaced by a unique sentinel
   (``\\ue000<i>\\ue001``, private-use characters). Splitting the skeleton at the sentinels gives
   the template's own text between contents — ``T0, T1, …, Tm`` — and which message each
   content slot belongs to;
2. the real conversation. It must read ``T0 c0 T1 c1 … Tm`` where each ``ci`` is the content as
   the template printed it (as is, or stripped: e.g. Llama 3's template trims). One left-to-right
   walk recovers every content's exact character span.

Both renders and the walk are O(length of the conversation). If a template rewrites contents in
some other way (or branches on them), the walk falls back to searching each content in order in
the real render, each after the template text that precedes it in the skeleton; if even that
fails the row is a bad row (``template_mismatch``) — never a silently wrong mask.

Which spans are trained: a message is trained when its per-message ``training`` flag says so, or
else when its role is in ``roles_to_train``. The end-of-turn token (``<|im_end|>``, ``<|eot_id|>``,
``</s>``…) is whatever special token the template writes right after a content; ``train_on_eos``
decides after which messages it is trained: ``turn`` (after trained messages), ``all``, ``last``
(after the last message only), ``none``.

``eot_tokens`` (Axolotl's key, for templates whose end-of-turn marker is not the EOS or not a special
token, e.g. Mistral's ``[/INST]``): the tokens that close a turn are then exactly those, plus the
EOS, each of which must be a single token of the tokenizer; other special tokens after a content
are no longer taken for one. They follow ``train_on_eos`` too (Axolotl's ``train_on_eot`` default).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from hellbender.config.schema import DatasetConfig
from hellbender.data.errors import BadRow, DataError
from hellbender.data.formats.base import PromptFormat, Rendered, get_object_list, type_name

if TYPE_CHECKING:
    from jinja2 import Template

# Templates shipped by name. Written for hellbender; each puts a special end-of-turn token right
# after every content, which is what exact end-of-turn masking relies on.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Mistral (v1 style): no system role of its own, so a system message is folded into the next
# user turn, as Mistral's own templates do.
MISTRAL = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('mistral template: unsupported role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
)
KNOWN_TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL}
# Tokens a named template needs as single special tokens (for exact end-of-turn masking).
_REQUIRED_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": (),
}

# Axolotl's default role names: ShareGPT data says human/gpt.
DEFAULT_ROLES: dict[str, list[str]] = {
    "system": ["system"],
    "user": ["user", "human"],
    "assistant": ["assistant", "gpt"],
    "tool": ["tool"],
}

_OPEN, _CLOSE = "\ue000", "\ue001"
_SENTINEL = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def resolve_chat_template(choice: str | None, tokenizer: Any) -> tuple[str, str]:
    """Return ``(jinja source, label)`` for a ``chat_template`` setting.

    ``None`` / ``tokenizer_default``: the tokenizer's template; ``tokenizer_default_fallback_<name>``:
    the tokenizer's, else the named one; a known name; otherwise a jinja string.
    """
    fallback = None
    if choice and choice.startswith("tokenizer_default_fallback_"):
        fallback = choice.removeprefix("tokenizer_default_fallback_")
        choice = "tokenizer_default"
    if choice is None or choice == "tokenizer_default":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, Mapping):  # several named templates: "default" is the chat one
            own = own.get("default")
        if own:
            return own, "tokenizer_default"
        if fallback is None:
            raise DataError(
                "the tokenizer has no chat template. Set `chat_template:` to one of "
                f"{', '.join(KNOWN_TEMPLATES)} or to a jinja string."
            )
        choice = fallback
    if choice in KNOWN_TEMPLATES:
        _check_template_tokens(choice, tokenizer)
        return KNOWN_TEMPLATES[choice], choice
    if "{{" in choice or "{%" in choice:
        return choice, "jinja"
    raise DataError(
        f"unknown chat_template {choice!r}: use tokenizer_default, one of {', '.join(KNOWN_TEMPLATES)}, "
        "or a jinja template string."
    )


def _check_template_tokens(name: str, tokenizer: Any) -> None:
    """A named template's control tokens must be single tokens, or turns cannot be closed exactly."""
    missing = []
    for tok in _REQUIRED_TOKENS[name]:
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            missing.append(tok)
    if name == "mistral" and not getattr(tokenizer, "eos_token", None):
        missing.append("an eos_token")
    if missing:
        raise DataError(
            f"chat_template {name!r} needs {', '.join(missing)} as single tokens, and this tokenizer does "
            "not have them. Use the tokenizer's own template (chat_template: tokenizer_default), or add "
            "the tokens (`tokens:` / `special_tokens:`)."
        )


def eot_token_ids(eot_tokens: Sequence[str], tokenizer: Any) -> frozenset[int]:
    """The ids of ``eot_tokens`` and of the EOS: each must be one token, or a turn's end cannot be
    found exactly (Axolotl requires the same)."""
    ids = set()
    for tok in eot_tokens:
        encoded = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise DataError(
                f"eot_tokens: {tok!r} is {len(encoded)} tokens for this tokenizer, not one. Add it as a "
                "token (`tokens:` or `special_tokens:`), or remove it from eot_tokens."
            )
        ids.add(int(encoded[0]))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def render_template(template: str, messages: Sequence[Mapping[str, Any]], kwargs: Mapping[str, Any]) -> str:
    """Render like ``tokenizer.apply_chat_template(..., tokenize=False)``, byte for byte.

    transformers' own jinja environment is used (same sandbox, same ``trim_blocks`` /
    ``lstrip_blocks``, same helper functions); ``kwargs`` are the tokenizer's special tokens, as
    apply_chat_template passes them. The compiled template is called directly when transformers
    exposes its (cached) compiler — 1.7x faster than going through ``render_jinja_template``,
    which also copies every message — else through the public function.
    """
    compiled = _compiled(template)
    if compiled is not None:
        # tools/documents=None exactly as apply_chat_template passes them (templates test them).
        return compiled.render(
            messages=list(messages), tools=None, documents=None, add_generation_prompt=False, **kwargs
        )
    from transformers.utils.chat_template_utils import render_jinja_template

    # transformers annotates the result as str; it is (the rendered conversations, generation indices).
    rendered, _ = cast(
        "tuple[list[str], Any]",
        render_jinja_template(
            conversations=[[dict(m) for m in messages]], chat_template=template, add_generation_prompt=False,
            **kwargs,
        ),
    )
    return rendered[0]


def _compiled(template: str) -> Template | None:
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without it: use the public renderer
        return None
    compiled: Template = _compile_jinja_template(template)  # unannotated in transformers
    return compiled


def _candidates(content: str) -> list[str]:
    """How a template may print a content: as is, or with surrounding whitespace removed."""
    out = [content]
    for variant in (content.strip(), content.rstrip(), content.lstrip()):
        if variant not in out:
            out.append(variant)
    return out


def locate_contents(
    template: str, messages: Sequence[Mapping[str, Any]], kwargs: Mapping[str, Any]
) -> tuple[str, list[tuple[int, int, int]]]:
    """Render ``messages`` and find where each content is printed, in O(length).

    Returns the rendered text and ``(message index, start, end)`` for every printed content, in
    text order. Raises :class:`BadRow` if the contents cannot be located.
    """
    skeleton_msgs = [{"role": m["role"], "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(messages)]
    skeleton = render_template(template, skeleton_msgs, kwargs)
    text = render_template(template, messages, kwargs)
    parts = _SENTINEL.split(skeleton)
    fragments, order = parts[0::2], [int(i) for i in parts[1::2]]
    spans = _walk(text, fragments, order, messages)
    if spans is None:
        spans = _search_in_order(text, fragments, order, messages)
    if spans is None:
        raise BadRow(
            "template_mismatch",
            "the chat template changes message contents in a way their positions cannot be found "
            "(contents must appear verbatim or stripped)",
        )
    return text, spans


def _walk(
    text: str, fragments: list[str], order: list[int], messages: Sequence[Mapping[str, Any]]
) -> list[tuple[int, int, int]] | None:
    """Match ``text`` against ``T0 c0 T1 c1 … Tm``; None if it does not have that shape."""
    if not text.startswith(fragments[0]):
        return None
    pos = len(fragments[0])
    spans = []
    for j, idx in enumerate(order):
        after = fragments[j + 1]
        for cand in _candidates(messages[idx]["content"]):
            end = pos + len(cand)
            if text.startswith(cand, pos) and text.startswith(after, end):
                break
        else:
            return None
        spans.append((idx, pos, end))
        pos = end + len(after)
    return spans if pos == len(text) else None


def _search_in_order(
    text: str, fragments: list[str], order: list[int], messages: Sequence[Mapping[str, Any]]
) -> list[tuple[int, int, int]] | None:
    """Fallback for templates that branch on content: find each content after the previous one.

    Each content is searched only after the template text that precedes it in the skeleton
    (``fragments[j]``, itself searched after the previous content). Searching from the previous
    content alone found a content equal to a word of the template — "assistant" — inside the
    next role header, training the header and no end-of-turn token.
    """
    if not order:
        return None  # the skeleton shows no content as is: there is no template text to anchor on
    pos, spans = 0, []
    for j, idx in enumerate(order):
        anchor = text.find(fragments[j], pos)
        if anchor < 0:
            return None  # the template text around this content changed too: cannot place it
        pos = anchor + len(fragments[j])
        best = None
        for cand in _candidates(messages[idx]["content"]):
            at = text.find(cand, pos)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, at + len(cand))
        if best is None:
            return None
        spans.append((idx, *best))
        pos = best[1]
    return spans


class ChatTemplateFormat(PromptFormat):
    name = "chat_template"

    def __init__(
        self,
        ds: DatasetConfig,
        tokenizer: Any,
        *,
        chat_template: str | None,
        default_system_message: str | None,
        train_on_inputs: bool,
        eot_tokens: Sequence[str] | None = None,
    ) -> None:
        self.template, self.template_label = resolve_chat_template(
            ds.chat_template or chat_template, tokenizer
        )
        self.eot_ids = eot_token_ids(eot_tokens, tokenizer) if eot_tokens else None
        # What apply_chat_template passes to the template besides the messages.
        self.template_kwargs = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if v is not None}
        self.field_messages = ds.field_messages
        self.role_key = ds.message_property_mappings.role
        self.content_key = ds.message_property_mappings.content
        self.training_key = ds.message_field_training
        roles = ds.roles if ds.roles is not None else DEFAULT_ROLES
        self.role_map = {alias: canonical for canonical, aliases in roles.items() for alias in aliases}
        self.roles_to_train = list(ds.roles_to_train)
        self.train_on_eos = ds.train_on_eos
        self.default_system_message = default_system_message
        self.train_on_inputs = train_on_inputs

    def features(self) -> Any:
        from datasets import Features, List, Value

        message = {"role": Value("string"), "content": Value("string"), "training": Value("bool")}
        return Features({"messages": List(message)})

    def normalize(self, row: Any) -> dict[str, Any]:
        raw = get_object_list(row, self.field_messages, items="messages", item="message")
        messages = []
        for i, msg in enumerate(raw):
            for field in (self.role_key, self.content_key):
                if field not in msg or msg[field] is None:
                    raise BadRow("missing_field", f"message {i}: field {field!r} is missing")
                if not isinstance(msg[field], str):
                    raise BadRow(
                        "wrong_type",
                        f"message {i}: field {field!r} must be a string, got {type_name(msg[field])}",
                    )
            role = self.role_map.get(msg[self.role_key])
            if role is None:
                raise BadRow(
                    "unknown_role",
                    f"message {i}: unknown role {msg[self.role_key]!r} "
                    f"(known: {', '.join(sorted(self.role_map))}; map more names with `roles:`)",
                )
            training = msg.get(self.training_key)
            if training is not None and not isinstance(training, bool):
                raise BadRow(
                    "wrong_type",
                    f"message {i}: field {self.training_key!r} must be true or false, "
                    f"got {type_name(training)}",
                )
            messages.append({"role": role, "content": msg[self.content_key], "training": training})
        if self.default_system_message is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.default_system_message, "training": None})
        return {"messages": messages}

    def is_trained(self, message: Mapping[str, Any]) -> bool:
        """The per-message flag wins; otherwise the role decides."""
        if message.get("training") is not None:
            return bool(message["training"])
        return message["role"] in self.roles_to_train

    def render(self, row: Mapping[str, Any]) -> Rendered:
        messages = row["messages"]
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            text, spans = locate_contents(self.template, plain, self.template_kwargs)
        except BadRow:
            raise
        except Exception as exc:  # jinja errors (raise_exception, undefined names) are per-row
            raise BadRow("template_error", f"chat template failed: {exc}") from exc
        if self.train_on_inputs:
            return Rendered(text=text, trained=[(0, len(text))], add_special_tokens=False)
        trained_msg = [self.is_trained(m) for m in messages]
        last = len(messages) - 1
        trained, eot = [], []
        for j, (idx, start, end) in enumerate(spans):
            if trained_msg[idx]:
                trained.append((start, end))
            rule = self.train_on_eos
            if (
                (rule == "turn" and trained_msg[idx])
                or rule == "all"
                or (rule == "last" and idx == last)
            ):
                limit = spans[j + 1][1] if j + 1 < len(spans) else len(text)
                eot.append((end, limit))
        return Rendered(text=text, trained=trained, eot=eot, add_special_tokens=False)

    def identity(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "template": self.template,
            "template_kwargs": self.template_kwargs,
            "field_messages": self.field_messages,
            "keys": [self.role_key, self.content_key, self.training_key],
            "roles": self.role_map,
            "roles_to_train": self.roles_to_train,
            "train_on_eos": self.train_on_eos,
            "default_system_message": self.default_system_message,
            "train_on_inputs": self.train_on_inputs,
            "eot_ids": None if self.eot_ids is None else sorted(self.eot_ids),
        }
