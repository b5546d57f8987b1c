"""The package's import graph follows the pipeline: no cycle, and no stage imports a later one.

Stages, earliest first: config → plan → data → models → quant → kernels → train → commands → cli.
The modules at the package root (files, hub, model_files) sit below every stage and import none of them;
``hellbender.testing`` (fixtures for tests and benchmarks) may import anything and is imported by
nothing in the package. Every import counts, including the ones inside functions (a lazy import
from a later stage is still a dependency on it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import hellbender

ROOT = Path(hellbender.__file__).parent
STAGES = ["config", "plan", "data", "models", "quant", "kernels", "distributed", "train", "commands", "cli"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every hellbender module ``path`` imports (``from a import b`` counts as a.b when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hellbender")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hellbender"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def stage(module: str) -> int:
    """-1 for the root modules below every stage; above every stage for the testing package and
    ``__main__``."""
    part = module.split(".")[1] if "." in module else ""
    if part in STAGES:
        return STAGES.index(part)
    if part in ("testing", "__main__"):  # above the CLI: `python -m hellbender` runs it
        return len(STAGES)
    return -1


def test_no_stage_imports_a_later_stage() -> None:
    upward = []
    for module, path in MODULES.items():
        for target in imports(path):
            if target in MODULES and stage(target) > stage(module):
                upward.append(f"{module} → {target}")
    assert upward == []


def test_the_package_never_imports_its_test_fixtures() -> None:
    users = [m for m, p in MODULES.items() if not m.startswith("hellbender.testing") and
             any(t.startswith("hellbender.testing") for t in imports(p))]
    assert users == []


def test_the_import_graph_has_no_cycle() -> None:
    graph = {m: {t for t in imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    # A package's __init__ re-exporting its own modules is not a cycle of dependencies.
    for m in graph:
        graph[m] = {t for t in graph[m] if not (m == t.rsplit(".", 1)[0])}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*trail[trail.index(nxt):], nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checker_sees_a_planted_upward_import(tmp_path: Path) -> None:
    """The walk above finds imports inside functions too (so the tests above can fail)."""
    planted = tmp_path / "m.py"
    planted.write_text("def f():\n    from hellbender.train.loop import train\n    return train\n")
    assert "hellbender.train.loop" in imports(planted)
    assert stage("hellbender.train.loop") > stage("hellbender.kernels.loss")
