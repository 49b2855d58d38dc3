"""The architecture, checked: dependencies point one way, no cycles, small modules (issue 13)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("defenses", "search_spaces", "study")
MAX_LINES = 600
# The only product modules that may import Ray or Optuna: the orchestration of a study.
ORCHESTRATION = {"study.orchestration", "study.tracking"}
THIRD_PARTY_RUNTIME = ("ray", "optuna")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every module a file imports (module level and inside functions), TYPE_CHECKING blocks aside."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


MODULES = _modules()
IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def test_dependencies_point_one_way() -> None:
    bad = []
    for name, imported in IMPORTS.items():
        tops = {_top(i) for i in imported}
        if _top(name) == "defenses" and tops & {"study", "search_spaces", "ray", "optuna", "mlflow"}:
            bad.append(f"{name} -> {sorted(tops & {'study', 'search_spaces', 'ray', 'optuna', 'mlflow'})}")
        if _top(name) == "search_spaces":
            outside = {t for t in tops if t not in sys.stdlib_module_names and t != "search_spaces"}
            if outside:
                bad.append(f"{name} -> {sorted(outside)} (search_spaces is standard library only)")
    assert not bad, bad


def test_only_the_orchestration_imports_ray_and_optuna() -> None:
    bad = sorted(name for name, imported in IMPORTS.items()
                 if {_top(i) for i in imported} & set(THIRD_PARTY_RUNTIME)
                 and not any(name == o or name.startswith(o + ".") for o in ORCHESTRATION)
                 and not name.startswith("study.bench"))
    assert not bad, f"modules outside the orchestration importing ray/optuna: {bad}"


def test_the_product_never_imports_the_benchmarks() -> None:
    bad = sorted(name for name, imported in IMPORTS.items()
                 if not name.startswith("study.bench") and name != "study.cli"
                 and any(i == "study.bench" or i.startswith("study.bench.") for i in imported))
    assert not bad, f"product modules importing study.bench: {bad}"


def test_no_import_cycles() -> None:
    graph = {name: {i for i in imported if i in MODULES and i != name} for name, imported in IMPORTS.items()}
    # A package importing its own submodules (re-exports) is not a cycle between responsibilities.
    for name in graph:
        graph[name] = {i for i in graph[name] if not (i.startswith(name + ".") and MODULES[name].name == "__init__.py")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_fit_in_a_readers_head(name: str) -> None:
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines (limit {MAX_LINES}): split it"


def test_starting_the_command_line_imports_no_heavy_library() -> None:
    code = ("import sys, study, study.cli; "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True).stdout.strip()
    assert out == "[]", out
