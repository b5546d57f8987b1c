"""Generate the configuration reference ``docs/config.md`` from the code itself.

Everything on the page is read from the modules it documents, so the page cannot drift from
them: options (name, type, default, description) come from the pydantic models in
:mod:`hellbender.config.schema`, grouped by the section comments of that file; finding codes come
from the ``Finding``/``_err``/``_warn`` calls in ``load.py``, ``carryover.py``, ``normalize.py`` and
``rules.py``
(read with :mod:`ast`, so every message template and fix is shown as written), and each rule's
purpose from its docstring. A unit test regenerates the page and fails when the committed copy
differs.

Regenerate with::

    python -m hellbender.config.docs            # writes docs/config.md (run from the repo root)
    python -m hellbender.config.docs --check    # exit 1 when docs/config.md is out of date
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from hellbender.config import carryover, load, normalize, rules
from hellbender.config.schema import (
    DatasetConfig,
    FSDPConfig,
    HellbenderConfig,
    MessagePropertyMappings,
    MixedPrecisionPolicy,
    ResolvedConfig,
    SpecialTokens,
    UserDefinedFormat,
)

REGENERATE = "python -m hellbender.config.docs"
DEFAULT_OUTPUT = Path("docs/config.md")

# Nested models get their own section; the anchor is what type names link to.
NESTED_MODELS: list[tuple[type[BaseModel], str, str]] = [
    (DatasetConfig, "Dataset entries", "Each entry of `datasets:` and `test_datasets:`."),
    (MessagePropertyMappings, "Message property mappings", "`datasets[].message_property_mappings`."),
    (UserDefinedFormat, "User-defined prompt format", "`datasets[].type` given as a mapping."),
    (SpecialTokens, "Special tokens", "`special_tokens:`."),
    (FSDPConfig, "FSDP config", "`fsdp_config:` (FSDP2; Axolotl's names)."),
    (MixedPrecisionPolicy, "FSDP mixed precision", "`fsdp_config.mixed_precision_policy`."),
]
_GROUP_COMMENT = re.compile(r"^\s*# -{8,}\s*(.+?)\s*$")


# ------------------------------------------------------------------------------------ options


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def _type_name(annotation: Any) -> str:
    """A short, readable rendering of a field's type (Literal values shown as quoted strings)."""
    if annotation is type(None) or annotation is None:
        return "null"
    if annotation is Any:
        return "any"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, dict, tuple, set):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for model, title, _ in NESTED_MODELS:
            if model is annotation:
                return f"[{annotation.__name__}](#{_anchor(title)})"
        return annotation.__name__
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


def _constraints(info: FieldInfo) -> str:
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    parts = []
    for meta in info.metadata:
        for attr, symbol in symbols.items():
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _cell(text: str) -> str:
    """Table cells cannot hold raw pipes or newlines."""
    return text.replace("|", "\\|").replace("\n", " ")


def _field_groups(model: type[BaseModel]) -> list[tuple[str, list[str]]]:
    """Fields of ``model`` in source order, grouped by the ``# ---- name`` comments above them."""
    source_lines, _ = inspect.getsourcelines(model)
    groups: list[tuple[str, list[str]]] = [("", [])]
    class_node = ast.parse("".join(source_lines))  # line numbers relative to the class statement
    assigns = {
        node.lineno: node.target.id
        for node in ast.walk(class_node)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    for lineno, line in enumerate(source_lines, start=1):
        match = _GROUP_COMMENT.match(line)
        if match:
            groups.append((match.group(1), []))
        elif lineno in assigns and assigns[lineno] in model.model_fields:
            groups[-1][1].append(assigns[lineno])
    return [(title, names) for title, names in groups if names]


def _options_table(model: type[BaseModel], names: Iterable[str]) -> list[str]:
    out = ["| Option | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for name in names:
        info = model.model_fields[name]
        type_text = _type_name(info.annotation)
        limits = _constraints(info)
        if limits:
            type_text += f" ({limits})"
        out.append(
            f"| `{name}` | {_cell(type_text)} | {_cell(_default(info))} | {_cell(info.description or '')} |"
        )
    return out


# ------------------------------------------------------------------------------------ findings


@dataclass
class CodeSite:
    """One place in the code that emits a finding code."""

    severity: str
    message: str
    fix: str
    where: str  # module.function


@dataclass
class CodeDoc:
    code: str
    sites: list[CodeSite] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # docstrings of the rules emitting it


def _template(node: ast.expr | None) -> str:
    """A string literal or f-string as written, with each ``{expr}`` shown as ``‹expr›``."""
    if node is None:
        return ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif isinstance(value, ast.FormattedValue):
                parts.append(f"‹{ast.unparse(value.value)}›")
        return "".join(parts)
    return f"‹{ast.unparse(node)}›"


def _call_name(node: ast.Call) -> str:
    return node.func.id if isinstance(node.func, ast.Name) else ""


def _finding_sites(module: types.ModuleType) -> list[tuple[str, CodeSite, str]]:
    """(code, site, enclosing function name) for every finding a module can emit."""
    tree = ast.parse(inspect.getsource(module))
    found: list[tuple[str, CodeSite, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not function:
            function = node.name  # the top-level function: helpers nested inside it are details
        if isinstance(node, ast.Call) and _call_name(node) in ("Finding", "_err", "_warn"):
            args = list(node.args)
            kwargs = {k.arg: k.value for k in node.keywords if k.arg}
            code_node = args[0] if args else kwargs.get("code")
            if isinstance(code_node, ast.Constant) and isinstance(code_node.value, str):
                if _call_name(node) == "Finding":
                    sev_node = args[1] if len(args) > 1 else kwargs.get("severity")
                    severity = sev_node.value if isinstance(sev_node, ast.Constant) else "?"
                    msg = args[2] if len(args) > 2 else kwargs.get("message")
                    fix = args[3] if len(args) > 3 else kwargs.get("fix")
                else:
                    severity = "error" if _call_name(node) == "_err" else "warning"
                    msg = args[1] if len(args) > 1 else kwargs.get("message")
                    fix = args[2] if len(args) > 2 else kwargs.get("fix")
                where = f"{module.__name__.rsplit('.', 1)[-1]}.{function}"
                found.append(
                    (
                        code_node.value,
                        CodeSite(str(severity), _template(msg), _template(fix), where),
                        function,
                    )
                )
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "")
    return found


def finding_codes() -> dict[str, CodeDoc]:
    """Every finding code in the config modules, with its severities, messages, fixes and purpose."""
    rule_docs = {fn.__name__: inspect.getdoc(fn) or "" for fn in rules.RULES}
    codes: dict[str, CodeDoc] = {}
    for module in (load, carryover, normalize, rules):
        for code, site, function in _finding_sites(module):
            doc = codes.setdefault(code, CodeDoc(code))
            doc.sites.append(site)
            purpose = rule_docs.get(function) if module is rules else None
            if purpose and purpose not in doc.checks:
                doc.checks.append(purpose)
    return dict(sorted(codes.items()))


# ------------------------------------------------------------------------------------ page


def render() -> str:
    """The whole reference page as Markdown."""
    out: list[str] = [
        "<!-- Generated from the code by `" + REGENERATE + "`. Do not edit by hand: a test fails "
        "when this file is out of date. -->",
        "",
        "# Configuration reference",
        "",
        "One YAML file configures a run. Key names are Axolotl's wherever Axolotl has the same option, "
        "so an Axolotl config loads unchanged or fails naming exactly the keys hellbender does not "
        "support yet. Unknown keys are errors (with a \"did you mean\"). An empty value (`fp16:`) means "
        "\"not set\" and takes the default, as in Axolotl's examples.",
        "",
        "Check a config with `hellbender validate CONFIG [key=value ...]` (`--resolved` prints every "
        "derived value, `--fix` rewrites mechanical fixes in place, keeping comments). "
        "`hellbender config-schema` prints the JSON schema.",
        "",
        "## Options",
        "",
    ]
    for title, names in _field_groups(HellbenderConfig):
        out += [
            f"### {title.capitalize() if title else 'General'}",
            "",
            *_options_table(HellbenderConfig, names),
            "",
        ]
    for model, title, intro in NESTED_MODELS:
        out += [f"### {title}", "", intro, "", *_options_table(model, model.model_fields), ""]

    out += [
        "## Derived values",
        "",
        "Computed by `hellbender.config.normalize.normalize`, never set by hand "
        f"(setting {', '.join(f'`{k}`' for k in sorted(load.DERIVED_KEYS))} is an error):",
        "",
        "- `batch_size` = `micro_batch_size` × `gradient_accumulation_steps` × data-parallel ranks, where "
        "data-parallel ranks = world size ÷ (`context_parallel_size` × `tensor_parallel_size`). Setting "
        "`batch_size` is deprecated: `gradient_accumulation_steps` is derived from it.",
        "- `eval_batch_size` defaults to `micro_batch_size`; `pad_to_sequence_len` and "
        "`eval_sample_packing` default to `sample_packing`.",
        "- `bf16: auto` → `compute_dtype`: on CUDA bf16 if supported else fp16; on CPU bf16 with "
        "AVX-512-BF16/AMX, else fp32.",
        "- Legacy attention flags map to `attn_implementation` (default `sdpa`).",
        "- `loss_method`: the loss replacement that is on (`chunked_cross_entropy`, `cut_cross_entropy`, "
        "`liger_cross_entropy`, `liger_fused_linear_cross_entropy`), else `chunked` with `tiled_mlp`, else "
        "`plain`. `epochs_given`: whether `num_epochs` bounds the run (false when only `max_steps` is set).",
        "- `distributed_strategy`: `single` for one process; with several, `deepspeed` when "
        "`deepspeed` is set, `fsdp2` when FSDP is asked for (`fsdp_config`, `fsdp_version` or `fsdp`), "
        "else `ddp`. Axolotl's FSDP1 spellings are read into `fsdp_config` under their FSDP2 names "
        "(and `fsdp_version` becomes 2); `fsdp_config.activation_checkpointing` turns on "
        "`gradient_checkpointing`.",
        "- The allocator setting goes into `PYTORCH_ALLOC_CONF` (torch ≥ 2.9) or "
        "`PYTORCH_CUDA_ALLOC_CONF` (torch 2.2–2.8) at process start, unless either is already set.",
        "",
        "Values that exist only in the resolved config (`hellbender validate --resolved` prints them):",
        "",
        *_options_table(ResolvedConfig, sorted(load.DERIVED_KEYS)),
        "",
        "## Findings",
        "",
        "Every finding has a stable code (HB0xx: loading, HB1xx: config rules), a severity and a fix. "
        "Errors make `hellbender validate` exit 1. In messages, `‹...›` stands for a value filled in "
        "from the config.",
        "",
    ]
    for code, doc in finding_codes().items():
        severities = sorted({s.severity for s in doc.sites})
        out.append(f"### {code} ({' / '.join(severities)})")
        out.append("")
        for purpose in doc.checks:
            out.append(" ".join(purpose.split()))
            out.append("")
        for site in doc.sites:
            line = f"- {site.severity} in `{site.where}`: {site.message.strip()}"
            if site.fix:
                line += f" *Fix:* {site.fix.strip()}"
            out.append(line)
        out.append("")

    out += [
        "## Axolotl options not supported",
        "",
        "These Axolotl keys are recognised and rejected with this reason (a value that asks for nothing "
        "— empty, false, 0, an empty list — is accepted and ignored, HB010):",
        "",
        "| Key | Reason |",
        "| --- | --- |",
        *(f"| `{k}` | {_cell(v)} |" for k, v in sorted(load.AXOLOTL_KEYS_NOT_SUPPORTED.items())),
        "",
        "## Axolotl options that change nothing here",
        "",
        "Accepted whatever their value, with an info finding (HB012) saying what hellbender does instead:",
        "",
        "| Key | What hellbender does instead |",
        "| --- | --- |",
        *(f"| `{k}` | {_cell(v)} |" for k, v in sorted(carryover.AXOLOTL_NO_OP_KEYS.items())),
        "",
        "## Options not implemented yet",
        "",
        "These options parse, so configs using them load, but setting one to a non-default value is "
        "error HB199 until the feature lands:",
        "",
        "| Key | Feature |",
        "| --- | --- |",
        *(f"| `{k}` | {_cell(v)} |" for k, v in rules.NOT_YET_IMPLEMENTED.items()),
        "",
    ]
    text = "\n".join(out)
    return text.rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate docs/config.md from the config code.")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--check", action="store_true", help="Exit 1 if the file is out of date.")
    args = parser.parse_args(argv)
    text = render()
    current = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
    if args.check:
        if current != text:
            print(f"{args.output} is out of date; regenerate with: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

