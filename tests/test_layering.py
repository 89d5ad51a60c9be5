"""The house's structure, from r1v's own imports: no import cycle, each layer imports only downward, and loading a
workflow stays light (no torch). docs/architecture.md draws the layers this test enforces.

Layers, bottom up: 0 core (imports nothing else of r1v); 1 configs (each feature's `config.py`, which imports only
core, so validating a workflow imports no feature code); 2 shared services (workflow engine,
generation, grading, judges, data, model); 3 features (their stage kinds and libraries); 4 the command line.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "r1v"
CONFIGS = {"r1v.model.config", "r1v.plan.arch"}  # config-only modules besides the `config.py` files
SERVICES = ("r1v.workflow", "r1v.generation", "r1v.grading", "r1v.judges", "r1v.data", "r1v.model")
FEATURE_MODULES = {"r1v.data.stage", "r1v.model.stage"}  # a service package's own stage kinds


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(mod: str) -> int:
    if mod == "r1v" or mod.startswith("r1v.core"):
        return 0
    if mod.endswith(".config") or mod in CONFIGS:
        return 1
    if mod.startswith("r1v.cli"):
        return 4
    if mod in FEATURE_MODULES:
        return 3
    if mod.startswith(SERVICES):
        return 2
    return 3


def imports() -> dict[str, list[tuple[str, bool]]]:
    """module -> [(imported r1v module, whether the import is inside a function)]."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    out: dict[str, list[tuple[str, bool]]] = {}
    for mod, path in modules.items():
        found = []
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import sub` imports the submodule when `pkg.sub` is one
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names]
            else:
                continue
            for n in names:
                if n.startswith("r1v") and n != mod:
                    found.append((n, node.col_offset > 0))
        out[mod] = found
    return out


def test_no_import_cycle():
    graph = {m: {t for t, _ in deps} for m, deps in imports().items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t in graph and t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_layers_import_only_downward():
    wrong = []
    for mod, deps in imports().items():
        for t, _ in deps:
            if t.startswith("r1v.") and t.split(".")[1] in ("__init__",):
                continue
            if layer(t) > layer(mod):
                wrong.append(f"{mod} (layer {layer(mod)}) imports {t} (layer {layer(t)})")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_core_imports_nothing_else_and_configs_import_only_core():
    for mod, deps in imports().items():
        if layer(mod) == 0:
            assert all(layer(t) == 0 for t, _ in deps), (mod, deps)
        if layer(mod) == 1:
            assert all(layer(t) == 0 for t, _ in deps), (mod, deps)


def test_function_local_imports_are_a_minority():
    """Imports inside functions are kept for heavy libraries' sake only (torch, transformers, Ray, vLLM)."""
    pairs = [local for deps in imports().values() for _, local in deps]
    assert sum(pairs) / len(pairs) < 0.5, f"{sum(pairs)} of {len(pairs)} imports of r1v modules are function-local"


def test_function_local_imports_say_why():
    """Each function-local import of an r1v module (outside `if TYPE_CHECKING`) has a comment above it, on it or on
    its block, naming the heavy libraries it keeps out of light paths."""
    silent = []
    for path in PKG.rglob("*.py"):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or node.col_offset == 0:
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            parent = parents[node]
            if not any(n.startswith("r1v") for n in names) or (
                    isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test)):
                continue
            k, said = node.lineno - 2, "#" in lines[node.lineno - 1]
            while k >= 0 and not said:  # up through the import block to its comment
                text = lines[k].strip()
                said = text.startswith("#")
                if said or not (text.startswith(("from ", "import ")) or text in ("", ")") or text.endswith(",")):
                    break
                k -= 1
            if not said:
                silent.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not silent, "\n".join(silent)


def test_validating_a_workflow_imports_no_torch():
    code = ("import sys; from r1v.workflow.schema import load_workflow; "
            "[load_workflow(f'workflows/{n}') for n in ('r1v-38b.yaml', 'tiny.yaml')]; "
            "heavy = [m for m in ('torch', 'transformers', 'ray', 'vllm', 'deepspeed') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
