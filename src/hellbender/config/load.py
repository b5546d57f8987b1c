"""YAML → validated :class:`HellbenderConfig`, with errors a user can act on.

Three kinds of mistakes get three kinds of messages:

* YAML syntax errors name the line and column (PyYAML's marks, 1-based).
* Unknown keys name the key path, its line, and a "did you mean" from the known keys. Keys that
  Axolotl has but hellbender does not support yet are named as such, so an Axolotl user learns
  exactly which of their keys are the problem rather than being told they misspelled them.
* Type errors name the key path, the value given and the type expected (and a "did you mean"
  for a misspelled word among the allowed ones).

What an Axolotl config says that hellbender reads its own way (spellings, "off" values, plugins,
legacy keys, dataset types) is settled first, by :mod:`hellbender.config.carryover`. A config
that fails here is still judged by the rules, without the keys in error, so that every layer's
findings come in one round. ``strict: false`` (or ``allow_unknown``) makes unknown keys warnings.

Command-line overrides are ``key=value`` with dotted paths (``datasets.0.path=x.jsonl``); the value
is parsed as YAML, so ``lora_r=16`` is an int and ``bf16=auto`` a string.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from hellbender.config.axolotl_keys import (
    AXOLOTL_CLOUD_KEYS,
    AXOLOTL_DATASET_KEYS,
    AXOLOTL_DATASET_TYPE_KEYS,
    AXOLOTL_LR_SCHEDULERS,
    AXOLOTL_OPTIMIZERS,
    AXOLOTL_PLUGIN_KEYS,
    AXOLOTL_TOP_LEVEL_KEYS,
)
from hellbender.config.carryover import carry_over
from hellbender.config.findings import QUOTE_LIMIT, ConfigError, Finding, clip, has_errors, quote
from hellbender.config.hardware import Hardware, detect_hardware
from hellbender.config.normalize import normalize
from hellbender.config.rules import check
from hellbender.config.schema import (
    DatasetConfig,
    FSDPConfig,
    HellbenderConfig,
    Optimizer,
    ResolvedConfig,
    Scheduler,
)

# Keys Axolotl accepts that hellbender recognises but does not implement (yet). Loading one is an
# error that says so, instead of a misleading "did you mean".
AXOLOTL_KEYS_NOT_SUPPORTED: dict[str, str] = {
    "rl": "preference training (DPO/KTO/ORPO/GRPO) is not supported yet",
    "rl_beta": "preference training is not supported yet",
    "reward_model": "reward-model training is not supported yet",
    "process_reward_model": "reward-model training is not supported yet",
    "pretraining_dataset": "streaming pre-training datasets are not supported yet",
    "streaming": "streaming datasets are not supported yet",
    "relora_steps": "ReLoRA is not supported yet",
    "relora_warmup_steps": "ReLoRA is not supported yet",
    "relora_cpu_offload": "ReLoRA is not supported yet",
    "lisa_n_layers": "LISA is not supported yet",
    "lisa_step_interval": "LISA is not supported yet",
    "loraplus_lr_ratio": "LoRA+ is not supported yet",
    "loraplus_lr_embedding": "LoRA+ is not supported yet",
    "neftune_noise_alpha": "NEFTune is not supported yet",
    "noisy_embedding_alpha": "NEFTune is not supported yet",
    "s2_attention": "shifted-sparse attention is not supported",
    "plugins": "Axolotl plugins do not apply to hellbender; its kernels are config keys",
    "lr_quadratic_warmup": "quadratic warm-up is not supported yet",
    "auto_find_batch_size": "use `hellbender plan` to find a batch size that fits",
    "gpu_memory_limit": "use `hellbender plan` to check memory before launching",
    "lora_on_cpu": "not needed: the adapter lives where the model lives",
    "multipack_real_batches": "the packer always builds real batches",
    "chat_template_jinja": "put the jinja string in `chat_template`",
    "local_rank": "set by the launcher (torchrun), not in the config",
    "save_first_step": "saving a checkpoint after the first step is not supported yet",
}

# Keys that normalization derives; users must not set them.
DERIVED_KEYS = frozenset(ResolvedConfig.model_fields) - frozenset(HellbenderConfig.model_fields)

# Limits on the work a config may cause. Real configs are a few kB with a few hundred values; these
# are far above that and far below what takes a noticeable time or memory.
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB, checked before parsing
MAX_YAML_NODES = 100_000  # keys, values and collections, every alias counted as expanded
MAX_YAML_DEPTH = 100  # nesting levels
MAX_REPORTED = 50  # findings of one kind shown one by one; the rest are counted in one more finding
_LINE_DEPTH = 8  # key paths deeper than this get no line number (no schema key is that deep)
_LINE_KEY_CHARS = 200  # nor do keys below a longer key (no schema key is that long)


class _Refused(yaml.MarkedYAMLError):
    """The document is larger than a config may be once its aliases are expanded, or refers to
    itself through an alias (HB009)."""


class _EventSource(Protocol):
    def peek_event(self) -> yaml.Event | None: ...


class _BoundedComposer(yaml.composer.Composer):
    """PyYAML's composer, counting as it goes the size the document has with every alias
    expanded, and its depth.

    An alias node is the very node object of its anchor, so the expanded size of a node is
    ``1 + the expanded sizes of its children``, memoized by node id: counting is as cheap as
    composing, whatever the expansion. The running total (a fresh node adds 1, an alias the
    expanded size of its anchor) stops composition as soon as it passes :data:`MAX_YAML_NODES`,
    so a bomb is refused after a bounded amount of work. An alias to a collection still being
    composed is a cycle (``&a [*a]``), which nothing downstream could expand.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}
        self._total = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = cast(_EventSource, self).peek_event()
        sizes = self._sizes
        if isinstance(event, yaml.AliasEvent):
            node = _compose_node(self, parent, index)
            size = sizes.get(id(node))
            if size is None:
                raise _Refused(
                    None,
                    None,
                    f"the alias *{clip(str(event.anchor))} refers to a collection that contains it "
                    "(a cycle)",
                    _mark(event),
                )
            self._total += size
        else:
            if self._depth >= MAX_YAML_DEPTH:
                # a plain syntax finding (HB001), as when PyYAML's own recursion gave out
                raise yaml.MarkedYAMLError(
                    None,
                    None,
                    f"the document is nested too deeply to parse (more than {MAX_YAML_DEPTH} levels)",
                    _mark(event),
                )
            self._depth += 1
            node = _compose_node(self, parent, index)
            self._depth -= 1
            if isinstance(node, yaml.SequenceNode):
                sizes[id(node)] = 1 + sum([sizes[id(item)] for item in node.value])
            elif isinstance(node, yaml.MappingNode):
                sizes[id(node)] = 1 + sum([sizes[id(k)] + sizes[id(v)] for k, v in node.value])
            else:
                sizes[id(node)] = 1
            self._total += 1  # its children were counted as they were composed
        if self._total > MAX_YAML_NODES:
            raise _Refused(
                None,
                None,
                f"the document has more than {MAX_YAML_NODES:,} values (aliases counted as "
                "expanded), the limit for a config",
                _mark(event),
            )
        return node


_compose_node = yaml.composer.Composer.compose_node
_MERGE = "tag:yaml.org,2002:merge"


def _mark(event: yaml.Event | None) -> Any:
    """The event's position (libyaml's or PyYAML's Mark: the same fields, two types)."""
    return event.start_mark if event is not None else None


class _StrictConstructor(yaml.constructor.SafeConstructor):
    """PyYAML's safe constructor, except that a key given twice in one mapping with different
    values is an error (with the same value, a warning: HB013), and a scalar Python cannot build
    (an int of more than 4,300 digits, the date 2001-13-45) is a YAML error at its position rather
    than a ValueError from deep inside PyYAML.

    Plain PyYAML keeps the last value of a repeated key silently; a config that says
    ``learning_rate`` twice, differently, is a mistake the user should see.
    """

    repeated: list[tuple[str, int, int]]  # (key, first line, repeated line): same value twice

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # merge keys (`<<: *anchor`) may legitimately be overridden; complex keys are rare enough
        # to leave to PyYAML
        own = [
            (key, value)
            for key, value in node.value
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE
        ]
        merges = len(own) < len(node.value)
        mapping = super().construct_mapping(node, deep=deep)
        if not merges and len(mapping) == len(own):
            return mapping  # as many keys as entries: none was given twice
        seen: dict[Any, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in own:
            key = self.construct_object(key_node, deep=True)
            first = seen.get(key)
            if first is not None:
                again = self.construct_object(value_node, deep=True)
                # the same value again is redundant, not contradictory: a warning (HB013)
                if self.construct_object(first[1], deep=True) == again:
                    if not hasattr(self, "repeated"):
                        self.repeated = []
                    line = first[0].start_mark.line + 1
                    self.repeated.append((_key_text(key), line, key_node.start_mark.line + 1))
                    continue
                raise yaml.constructor.ConstructorError(
                    f"while constructing a mapping "
                    f"(key {quote(key)} first given on line {first[0].start_mark.line + 1})",
                    node.start_mark,
                    f"found the key {quote(key)} a second time (first given on line "
                    f"{first[0].start_mark.line + 1}), with a different value",
                    key_node.start_mark,
                )
            seen[key] = (key_node, value_node)
        return mapping


def _built_or_refused(construct: Callable[[Any, Any], Any]) -> Callable[[Any, yaml.Node], Any]:
    """A scalar constructor whose ValueError (Python's int/date limits) is a YAML error at the
    scalar's position."""

    def guarded(self: Any, node: yaml.Node) -> Any:
        try:
            return construct(self, node)
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {clip(str(exc), 200)}", node.start_mark
            ) from None

    return guarded


for _tag, _construct in (
    ("tag:yaml.org,2002:int", yaml.constructor.SafeConstructor.construct_yaml_int),
    ("tag:yaml.org,2002:float", yaml.constructor.SafeConstructor.construct_yaml_float),
    ("tag:yaml.org,2002:timestamp", yaml.constructor.SafeConstructor.construct_yaml_timestamp),
):
    _StrictConstructor.add_constructor(_tag, _built_or_refused(_construct))


class _Loader(Protocol):
    def get_single_node(self) -> yaml.Node | None: ...
    def construct_document(self, node: yaml.Node) -> Any: ...
    def dispose(self) -> None: ...


class _PythonLoader(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    _BoundedComposer,
    _StrictConstructor,
    yaml.resolver.Resolver,
):
    """The loader, on PyYAML's pure-Python parser."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        _BoundedComposer.__init__(self)
        _StrictConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)


_FAST_LOADER: Callable[[str], _Loader] | None = None
try:
    from yaml._yaml import CParser
except ImportError:  # pragma: no cover - a PyYAML built without libyaml: the Python parser alone
    pass
else:

    class _LibyamlLoader(_BoundedComposer, CParser, _StrictConstructor, yaml.resolver.Resolver):
        """The loader, on libyaml's parser (several times faster than PyYAML's own).

        Only libyaml's events are used: composing stays in Python (:class:`_BoundedComposer`),
        where the size and depth are counted and stop the document early. libyaml's own composer
        recurses in C without a limit, so a deep enough document would crash the interpreter.
        """

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _BoundedComposer.__init__(self)
            _StrictConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    _FAST_LOADER = _LibyamlLoader


def _loader(text: str) -> _Loader:
    if _FAST_LOADER is not None:
        try:
            return _FAST_LOADER(text)
        except UnicodeEncodeError:
            pass  # lone surrogates (from command-line bytes): PyYAML's reader names the position
    return _PythonLoader(text)


def _yaml_error(exc: yaml.YAMLError | RecursionError, source: str) -> ConfigError:
    if isinstance(exc, RecursionError):
        # Recursion in a third-party walk of the document: say so instead of dying with a
        # traceback. (The composer refuses documents deeper than MAX_YAML_DEPTH before that.)
        exc = yaml.YAMLError("the document is nested too deeply to parse")
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = clip(str(getattr(exc, "problem", None) or exc), 300)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
    if isinstance(exc, _Refused):
        return ConfigError(
            [
                Finding(
                    "HB009",
                    "error",
                    f"{source}: {problem} (at {where}).",
                    fix="A config needs a few hundred values: remove what does not belong in it, "
                    "and do not repeat anchors (&name) through aliases (*name) to build big values.",
                )
            ]
        )
    return ConfigError(
        [
            Finding(
                "HB001",
                "error",
                f"{source}: YAML syntax error at {where}: {problem}",
                fix="Fix the YAML at that position (indentation, a missing ':' or quote).",
            )
        ]
    )


def _compose(text: str, source: str) -> tuple[Any, yaml.Node | None, list[Finding]]:
    """Parse YAML text into Python data, its node graph and the warnings of reading it (a key
    given twice with the same value, HB013), within the limits above."""
    try:
        loader = _loader(text)  # PyYAML's reader checks every character here
    except yaml.reader.ReaderError as exc:
        raise _yaml_error(_reader_error(exc, text), source) from None
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
        repeated = [
            Finding(
                "HB013",
                "warning",
                f"{source}: `{clip(key)}` is given twice (lines {first} and {again}) with the same value.",
                fix=f"Remove the second `{clip(key)}` (line {again}).",
                key=key,
            )
            for key, first, again in getattr(loader, "repeated", [])
        ]
    except yaml.reader.ReaderError as exc:
        raise _yaml_error(_reader_error(exc, text), source) from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise _yaml_error(exc, source) from None
    finally:
        loader.dispose()
    return data, root, repeated


def _reader_error(exc: yaml.reader.ReaderError, text: str) -> yaml.MarkedYAMLError:
    """A character YAML does not allow (a control character; a lone surrogate, which is how
    command-line bytes that are not UTF-8 reach Python), with its line and column."""
    position = min(max(exc.position, 0), len(text))
    line = text.count("\n", 0, position)
    column = position - (text.rfind("\n", 0, position) + 1)
    character = chr(exc.character) if isinstance(exc.character, int) else str(exc.character)
    mark = yaml.Mark(exc.name, position, line, column, None, 0)
    return yaml.MarkedYAMLError(None, None, f"the character {character!r} is not allowed in YAML", mark)


def _key_lines(root: yaml.Node | None) -> dict[str, int]:
    """Map dotted key paths to their 1-based line in the YAML text (for error messages)."""
    lines: dict[str, int] = {}
    walked: set[int] = set()

    def walk(node: yaml.Node, prefix: str, depth: int) -> None:
        # An alias is the same node object as its anchor: walking it again would only repeat
        # paths, and nested aliases ("billion laughs") would make that exponential.
        if id(node) in walked or depth >= _LINE_DEPTH:
            return
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = str(key_node.value)
                path = f"{prefix}.{key}" if prefix else key
                lines[path] = key_node.start_mark.line + 1
                if len(key) <= _LINE_KEY_CHARS:  # else no schema key: paths below it are not needed
                    walk(value_node, path, depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                path = f"{prefix}.{i}"
                lines[path] = item.start_mark.line + 1
                walk(item, path, depth + 1)

    if root is not None:
        walk(root, "", 0)
    return lines


def _parse_config(text: str, source: str) -> tuple[dict[str, Any], yaml.Node | None, list[Finding]]:
    data, root, repeated = _compose(text, source)
    if data is None:
        return {}, root, repeated
    if not isinstance(data, dict):
        raise ConfigError(
            [
                Finding(
                    "HB002",
                    "error",
                    f"{source}: the top level must be a mapping of keys, got {type(data).__name__}",
                )
            ]
        )
    return data, root, repeated


def parse_yaml(text: str, source: str = "<config>") -> dict[str, Any]:
    """Parse YAML text into a mapping, with line/column on syntax errors and repeated keys, and
    within the size limits (HB009)."""
    return _parse_config(text, source)[0]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted paths, numeric parts index lists; values are YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                [
                    Finding(
                        "HB003",
                        "error",
                        f"override {quote(item)} is not key=value",
                        fix="Write e.g. lora_r=16",
                    )
                ]
            )
        path, _, raw_value = item.partition("=")
        value = _compose(raw_value, f"override {clip(path)}")[0] if raw_value != "" else None
        parts = path.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdecimal() or int(part) >= len(node):
                    raise ConfigError(
                        [
                            Finding(
                                "HB003",
                                "error",
                                f"override {clip(path)}: {quote(part)} is not an index of a list of "
                                f"{len(node)}",
                            )
                        ]
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(
                    [
                        Finding(
                            "HB003",
                            "error",
                            f"override {clip(path)}: {clip('.'.join(parts[:i]))} is not a mapping or list",
                        )
                    ]
                )
    return data


@functools.cache
def _known_keys(model: type[BaseModel]) -> tuple[list[str], frozenset[str]]:
    """A model's keys: as a list (for suggestions, in declaration order) and as a set."""
    return list(model.model_fields), frozenset(model.model_fields)


def _nested_model(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The pydantic model a key's value should be (for walking unknown keys), if any."""
    if model is HellbenderConfig and key in ("datasets", "test_datasets"):
        return DatasetConfig
    field = model.model_fields.get(key)
    if field is None:
        return None
    annotation = field.annotation
    for candidate in getattr(annotation, "__args__", (annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _key_text(key: Any) -> str:
    """A mapping key as text (``str`` of an int past 4,300 digits raises; its size is enough)."""
    return quote(key) if isinstance(key, int) and key.bit_length() > 256 else str(key)


def _line(lines: dict[str, int], path: str) -> str:
    return f" (line {lines[path]})" if path in lines else ""


def _key_finding(key: str, path: str, model: type[BaseModel], lines: dict[str, int]) -> Finding:
    """The finding for one key ``model`` does not accept: derived, Axolotl-only, or unknown."""
    line = _line(lines, path)
    shown, name = clip(path, 2 * QUOTE_LIMIT), clip(key)
    if model is HellbenderConfig and key in DERIVED_KEYS:
        return Finding(
            "HB006",
            "error",
            f"`{shown}`{line} is derived by hellbender and cannot be set.",
            fix=f"Remove `{name}`.",
            key=path,
        )
    reason = _axolotl_reason(key, model)
    if reason is not None:
        return Finding(
            "HB005",
            "error",
            f"`{shown}`{line} is an Axolotl option hellbender does not support yet{reason}.",
            fix=f"Remove `{name}` from the config.",
            key=path,
        )
    close = difflib.get_close_matches(key, _known_keys(model)[0], n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
    return Finding(
        "HB004",
        "error",
        f"unknown key `{shown}`{line}.{hint}",
        fix=f"Rename it to `{close[0]}`." if close else "Remove it; see docs/config.md.",
        key=path,
    )


def _unknown_keys(
    data: dict[str, Any], lines: dict[str, int]
) -> tuple[list[Finding], list[tuple[Any, ...]]]:
    """Findings for the keys the schema does not accept, and where each of those keys is.

    The first :data:`MAX_REPORTED` keys get a finding each, with a suggestion; the rest are
    counted in one more finding, so that the work stays linear in the number of keys (a
    suggestion compares a key with every known key). The locations are tuples of the data's own
    keys and indices, so that a key holding a dot is still found.
    """
    findings: list[Finding] = []
    located: list[tuple[Any, ...]] = []
    unreported: list[str] = []

    def check(mapping: dict[Any, Any], model: type[BaseModel], prefix: str, where: tuple[Any, ...]) -> None:
        known = _known_keys(model)[1]
        for key, value in mapping.items():
            key_str = key if isinstance(key, str) else _key_text(key)
            path = f"{prefix}.{key_str}" if prefix else key_str
            if key_str not in known:  # (derived keys are not HellbenderConfig's either)
                located.append((*where, key))
                if len(findings) < MAX_REPORTED:
                    findings.append(_key_finding(key_str, path, model, lines))
                else:
                    unreported.append(path)
                continue
            sub = _nested_model(model, key_str)
            if sub is None:
                continue
            if isinstance(value, dict):
                check(value, sub, path, (*where, key))
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, dict):
                        check(item, sub, f"{path}.{i}", (*where, key, i))

    # A dataset `type:` given as a mapping is checked as a UserDefinedFormat by the walk itself
    # (_nested_model finds it in the union).
    check(data, HellbenderConfig, "", ())
    if unreported:
        examples = ", ".join(f"`{clip(p)}`{_line(lines, p)}" for p in unreported[:3])
        findings.append(
            Finding(
                "HB004",
                "error",
                f"… and {len(unreported):,} more unknown keys ({len(located):,} in all), "
                f"starting with {examples}.",
                fix="Remove them; see docs/config.md for the keys hellbender knows.",
            )
        )
    for key, supported, axolotl in (
        ("optimizer", get_args(Optimizer), AXOLOTL_OPTIMIZERS),
        ("lr_scheduler", get_args(Scheduler), AXOLOTL_LR_SCHEDULERS),
    ):
        value = data.get(key)
        if isinstance(value, str) and value not in supported and value in axolotl:
            located.append((key,))
            findings.append(
                Finding(
                    "HB005",
                    "error",
                    f"`{key}: {value}`{_line(lines, key)} is an Axolotl {key.replace('_', ' ')} "
                    "hellbender does not support yet.",
                    fix=f"Use one of: {', '.join(supported)}.",
                    key=key,
                )
            )
    return findings, located


def unknown_key_findings(data: dict[str, Any], lines: dict[str, int] | None = None) -> list[Finding]:
    """Every unknown key in the config, with a suggestion, checked before pydantic sees it (the
    first :data:`MAX_REPORTED` one by one, the rest counted)."""
    return _unknown_keys(data, lines or {})[0]


def _axolotl_reason(key: str, model: type[BaseModel]) -> str | None:
    """For a key hellbender does not know: ``": why"`` (or ``""``) if Axolotl has it, else None."""
    if model is HellbenderConfig:
        if key in AXOLOTL_KEYS_NOT_SUPPORTED:
            return f": {AXOLOTL_KEYS_NOT_SUPPORTED[key]}"
        if key in AXOLOTL_PLUGIN_KEYS:
            return " (it belongs to an Axolotl plugin)"
        if key in AXOLOTL_TOP_LEVEL_KEYS:
            return ""
        if key in AXOLOTL_CLOUD_KEYS:
            return (
                ": it belongs to Axolotl's cloud-launch config (`axolotl train --cloud`), not to a "
                "training config"
            )
    elif model is DatasetConfig and (key in AXOLOTL_DATASET_KEYS or key in AXOLOTL_DATASET_TYPE_KEYS):
        return " in a dataset entry"
    return None


def _data_path(loc: tuple[Any, ...], data: Any, missing: bool) -> list[str]:
    """The part of a pydantic error location that names places in the user's data.

    For a field typed as a union, pydantic adds one tag per member to the location
    (``bf16.bool``, ``eval_steps.int``, ``datasets.0.type.UserDefinedFormat``); those are not keys
    the user wrote. Walking the location against the data keeps exactly the keys and indices that
    exist (plus, for a missing key, the key itself).
    """
    path: list[str] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif missing and i == len(loc) - 1:
            pass
        else:
            continue  # a union member's tag
        path.append(_key_text(part))
    return path


def _expected(messages: list[str]) -> str:
    """Merge the per-union-member messages of one key into one sentence."""
    unique = list(dict.fromkeys(messages))
    if len(unique) > 1:  # "a valid boolean, unable to interpret input" → "a valid boolean"
        unique = list(dict.fromkeys(m.split(", unable to")[0] for m in unique))
    prefix = "Input should be "
    if all(m.startswith(prefix) for m in unique):
        return "should be " + " or ".join(m.removeprefix(prefix) for m in unique)
    return "; ".join(unique)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _allowed_range(parts: list[str]) -> str | None:
    """``"1 ≤ lora_r ≤ 65536"`` for a numeric key that has a range (None for any other key)."""
    model: type[BaseModel] | None = HellbenderConfig
    field: FieldInfo | None = None
    for part in parts:
        if part.isdecimal() and field is not None:
            field = None  # an item of a list (a dataset entry's keys may follow)
            continue
        if model is None:
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _nested_model(model, part)
    if field is None:
        return None
    low = high = ""
    for meta in field.metadata:
        if getattr(meta, "ge", None) is not None:
            low = f"{_number(meta.ge)} ≤ "
        if getattr(meta, "gt", None) is not None:
            low = f"{_number(meta.gt)} < "
        if getattr(meta, "le", None) is not None:
            high = f" ≤ {_number(meta.le)}"
        if getattr(meta, "lt", None) is not None:
            high = f" < {_number(meta.lt)}"
    return f"{low}{parts[-1]}{high}" if low or high else None


def _capped(findings: list[Finding], what: str) -> list[Finding]:
    """The first :data:`MAX_REPORTED` findings and one that counts the rest."""
    if len(findings) <= MAX_REPORTED:
        return findings
    rest = findings[MAX_REPORTED:]
    return [
        *findings[:MAX_REPORTED],
        Finding(
            rest[0].code,
            "error",
            f"… and {len(rest):,} more {what} ({len(findings):,} in all).",
            fix="Fix the ones above and validate again.",
        ),
    ]


def _type_findings(exc: ValidationError, data: dict[str, Any], lines: dict[str, int]) -> list[Finding]:
    """One finding per key path, however many union members pydantic tried for it."""
    missing: dict[str, str] = {}
    wrong: dict[str, tuple[Any, list[str], list[str]]] = {}
    for err in exc.errors():
        is_missing = err["type"] == "missing"
        parts = _data_path(err["loc"], data, is_missing)
        path = ".".join(parts) or "<root>"
        if is_missing:
            missing.setdefault(path, parts[-1] if parts else path)
        else:
            wrong.setdefault(path, (err.get("input"), [], parts))[1].append(err["msg"])
    # A mapping given where a union allows a model or a word (a dataset's `type:`): the errors
    # inside the mapping say what is wrong; "should be 'alpaca', … or a UserDefinedFormat" for
    # the mapping itself would only repeat that the mapping was meant.
    inside = {".".join(parts[:n]) for _, _, parts in wrong.values() for n in range(1, len(parts))}
    findings: list[Finding] = []
    for path, key in missing.items():
        findings.append(
            Finding(
                "HB007",
                "error",
                f"`{clip(path, 2 * QUOTE_LIMIT)}`{_line(lines, path)} is required.",
                fix=f"Add `{clip(key)}:`.",
                key=path,
            )
        )
    for path, (given, messages, parts) in wrong.items():
        if path in inside and isinstance(given, dict):
            continue
        shown = clip(path, 2 * QUOTE_LIMIT)
        allowed = _allowed_range(parts)
        # a misspelled word among the allowed ones gets a suggestion, as a misspelled key does
        words = re.findall(r"'([^']*)'", " ".join(messages)) if isinstance(given, str) else []
        close = difflib.get_close_matches(given, list(dict.fromkeys(words)), n=1, cutoff=0.6) if words else []
        findings.append(
            Finding(
                "HB008",
                "error",
                f"`{shown}`{_line(lines, path)} = {quote(given)} ({type(given).__name__}): "
                f"{_expected(messages)}."
                + (f" Allowed: {allowed}." if allowed else "")
                + (f" Did you mean '{close[0]}'?" if close else ""),
                fix=f"Give `{shown}` a value with {allowed}."
                if allowed
                else f"Write `{shown.rsplit('.', 1)[-1]}: {close[0]}`."
                if close
                else f"Give `{shown}` a value of the expected type.",
                key=path,
            )
        )
    findings.sort(key=lambda f: lines.get(f.key or "", 0))
    return _capped([f for f in findings if f.code == "HB007"], "missing keys") + _capped(
        [f for f in findings if f.code == "HB008"], "type errors"
    )


def _drop_unset_nulls(mapping: dict[Any, Any], model: type[BaseModel]) -> dict[Any, Any]:
    """Remove keys whose empty value means "not set", so they take their default.

    Axolotl's own example configs list options with an empty value (``fp16:``, ``local_rank:``,
    ``deepspeed:``) to mean "unset"; rejecting those nulls would break "an Axolotl YAML loads
    unchanged". A null is kept only where it is itself a meaningful value different from the
    default (``max_grad_norm: null`` turns clipping off), and for unknown keys, which stay errors
    because an empty typo is still a typo. A null Axolotl-only key asks for nothing, so it goes too.
    """
    out: dict[Any, Any] = {}
    for key, value in mapping.items():
        if value is None:
            field = model.model_fields.get(key) if isinstance(key, str) else None
            if field is not None:
                accepts_none = field.annotation is Any or type(None) in get_args(field.annotation)
                if field.default is None or not accepts_none:
                    continue
            elif _axolotl_reason(_key_text(key), model) is not None:
                continue
        out[key] = value
    return out


def _without_paths(data: dict[str, Any], paths: list[tuple[Any, ...]]) -> dict[str, Any]:
    """``data`` without the keys at ``paths`` (tuples of keys and list indices), ``data`` unchanged.

    Only the mappings and lists on the way to a removed key are copied (shallowly), so the cost is
    linear in the number of paths and in the size of those containers, never in the size of the
    values they hold (which aliases may make enormous).
    """
    copies: dict[tuple[Any, ...], Any] = {(): dict(data)}

    def copied(location: tuple[Any, ...]) -> Any:
        if location not in copies:
            parent = copied(location[:-1])
            child = parent[location[-1]]
            parent[location[-1]] = copies[location] = dict(child) if isinstance(child, dict) else list(child)
        return copies[location]

    for path in paths:
        copied(path[:-1]).pop(path[-1], None)
    return cast(dict[str, Any], copies[()])


def _error_paths(exc: ValidationError, data: dict[str, Any]) -> list[tuple[Any, ...]] | None:
    """Where in ``data`` each type error is (the data's own keys and indices), or None when a
    required key is missing (then no config can be built without it)."""
    paths: list[tuple[Any, ...]] = []
    for err in exc.errors():
        if err["type"] == "missing":
            return None
        node: Any = data
        path: list[Any] = []
        in_list: list[bool] = []
        for part in err["loc"]:
            if isinstance(node, dict) and part in node:
                in_list.append(False)
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                in_list.append(True)
            else:
                continue  # a union member's tag
            node = node[part]
            path.append(part)
        while path and in_list[-1]:  # an item of a list: the whole list goes (indices must not shift)
            path.pop()
            in_list.pop()
        if not path:
            return None
        paths.append(tuple(path))
    # the outermost of nested paths: removing it removes the rest
    kept: list[tuple[Any, ...]] = []
    for where in sorted(set(paths), key=len):
        if not any(where[: len(k)] == k for k in kept):
            kept.append(where)
    return kept


def _validated(
    data: dict[str, Any], lines: dict[str, int], *, allow_unknown: bool = False
) -> tuple[HellbenderConfig | None, HellbenderConfig | None, list[Finding]]:
    """``(config, readable, findings)``: the config (None when there is an error), the config
    without the keys in error when the rest is readable (so the rules can judge it in the same
    round), and every finding of loading.

    Unknown keys are warnings with ``allow_unknown`` or ``strict: false`` in the config.
    """
    allow_unknown = allow_unknown or data.get("strict") is False
    data = _drop_unset_nulls(data, HellbenderConfig)
    for list_key in ("datasets", "test_datasets"):
        if isinstance(data.get(list_key), list):
            data[list_key] = [
                _drop_unset_nulls(ds, DatasetConfig) if isinstance(ds, dict) else ds for ds in data[list_key]
            ]
    if isinstance(data.get("fsdp_config"), dict):  # Axolotl's FSDP options take null as "unset" too
        data["fsdp_config"] = _drop_unset_nulls(data["fsdp_config"], FSDPConfig)
    data, findings = carry_over(data, lines, frozenset(AXOLOTL_KEYS_NOT_SUPPORTED))
    key_findings, located = _unknown_keys(data, lines)
    if allow_unknown:
        key_findings = [
            dataclasses.replace(f, severity="warning", fix=f"{f.fix} (strict: false makes this a warning.)")
            if f.code == "HB004"
            else f
            for f in key_findings
        ]
    findings += key_findings
    rest = _without_paths(data, located) if located else data
    try:
        cfg = HellbenderConfig.model_validate(rest)
    except ValidationError as exc:
        typed = _type_findings(exc, rest, lines)
        if has_errors(key_findings):
            # only type errors: "required" findings would repeat a misspelled key's suggestion
            typed = [f for f in typed if f.code == "HB008"]
        findings += typed
        paths = _error_paths(exc, rest)
        readable = None
        if paths:
            try:
                readable = HellbenderConfig.model_validate(_without_paths(rest, paths))
            except ValidationError:
                readable = None
        return None, readable, findings
    return (None if has_errors(findings) else cfg), cfg, findings


def validate_mapping(
    data: dict[str, Any],
    source: str = "<config>",
    text: str | None = None,
    *,
    root: yaml.Node | None = None,
    allow_unknown: bool = False,
) -> HellbenderConfig:
    """Turn a parsed mapping into a config object (not yet normalized); raises ConfigError with
    the error findings.

    ``root`` (or ``text``, parsed again) gives the line of each key for the messages."""
    if root is None and text:
        try:
            root = _compose(text, source)[1]
        except ConfigError:
            root = None
    cfg, _, findings = _validated(data, _key_lines(root), allow_unknown=allow_unknown)
    if cfg is None:
        raise ConfigError([f for f in findings if f.severity == "error"])
    return cfg


def _read_text(path: Path) -> str:
    """The config file's text: at most :data:`MAX_CONFIG_BYTES` are read, whatever the file is
    (``/dev/zero`` included), and a directory or unreadable file is a finding."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            [Finding("HB000", "error", f"cannot read config {path}: {exc.strerror or exc}")]
        ) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [
                Finding(
                    "HB000",
                    "error",
                    f"cannot read config {path}: it is larger than {MAX_CONFIG_BYTES >> 20} MiB, "
                    "the limit for a config file.",
                    fix="Point to the YAML config itself (a config is a few kB; data goes in "
                    "`datasets:` files).",
                )
            ]
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [
                Finding(
                    "HB000",
                    "error",
                    f"cannot read config {path}: not UTF-8 text (byte {exc.start}: {exc.reason}).",
                    fix="Save the file as UTF-8.",
                )
            ]
        ) from None


def check_rewritable(path: str | Path) -> None:
    """``validate --fix`` reads the file again and replaces it: it must be a regular file (not a
    pipe, ``/dev/stdin`` or a directory). Raises :class:`ConfigError` (HB000) otherwise."""
    try:
        regular = Path(path).is_file()
    except OSError:
        regular = False
    if not regular:
        raise ConfigError(
            [
                Finding(
                    "HB000",
                    "error",
                    f"--fix rewrites the config file in place, and {path} is not a regular file.",
                    fix="Save the config to a file and run `hellbender validate FILE --fix`.",
                )
            ]
        )


def _read(
    path: str | Path, overrides: list[str] | None, allow_unknown: bool
) -> tuple[HellbenderConfig | None, HellbenderConfig | None, dict[str, Any], list[Finding]]:
    """Read a YAML file and overrides: ``(config or None, readable part or None, raw mapping,
    findings)`` (see :func:`_validated`)."""
    path = Path(path)
    text = _read_text(path)
    data, root, repeated = _parse_config(text, str(path))
    data = apply_overrides(data, list(overrides or []))
    cfg, readable, findings = _validated(data, _key_lines(root), allow_unknown=allow_unknown)
    return cfg, readable, data, repeated + findings


def read_config(
    path: str | Path, overrides: list[str] | None = None, *, allow_unknown: bool = False
) -> tuple[HellbenderConfig, dict[str, Any]]:
    """Read a YAML file and overrides into an un-normalized config and the raw mapping."""
    cfg, _, data, findings = _read(path, overrides, allow_unknown)
    if cfg is None:
        raise ConfigError([f for f in findings if f.severity == "error"])
    return cfg, data


def load_config(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    world_size: int | None = None,
    hardware: Hardware | None = None,
    strict: bool = True,
    allow_unknown: bool = False,
) -> tuple[ResolvedConfig, list[Finding]]:
    """Read, normalize and check a config: the one entry point every command uses.

    With ``strict`` a config that has error findings raises :class:`ConfigError`. A config that
    cannot be loaded raises it either way, with the findings of every layer that could judge it:
    an unknown key does not hide what the rules say about the rest (errors and warnings; only
    errors with ``strict``). ``allow_unknown`` (or ``strict: false`` in the config) makes unknown
    keys warnings.
    """
    raw, readable, _, findings = _read(path, overrides, allow_unknown)
    hw = hardware if hardware is not None else detect_hardware()
    shown = ("error",) if strict else ("error", "warning")
    judged = raw if raw is not None else readable
    if judged is None:
        raise ConfigError([f for f in findings if f.severity in shown])
    cfg, more = normalize(judged, world_size=world_size, hardware=hw)
    more += check(cfg, hw, judged)
    # What follows only from a refused feature is not news: a pretraining_dataset refused leaves
    # `datasets:` empty.
    refused = {f.key for f in findings if f.code == "HB005"}
    more = [f for f in more if not (f.code == "HB137" and "pretraining_dataset" in refused)]
    findings += more
    if raw is None:
        raise ConfigError([f for f in findings if f.severity in shown])
    if strict and has_errors(findings):
        raise ConfigError([f for f in findings if f.severity == "error"])
    return cfg, findings
