"""No import circles inside a package: a module that needs another's helper takes it from a lower module
(``launch/options.py``) or is handed it (``args.root_parser``), never imports back up."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def sibling_imports(package: str) -> dict:
    """module -> the modules of the same package it imports anywhere (module level or inside functions)."""
    graph = {}
    for path in sorted((REPO / package).glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
                elif node.level == 0 and node.module and node.module.startswith(package + "."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith(package + ".")}
        graph[path.stem] = deps - {path.stem}
    return {m: {d for d in deps if d in graph} for m, deps in graph.items()}


def a_cycle(graph: dict):
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        stack.pop()
        return None
    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_finds_one():
    assert a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert a_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", ["launch", "runtime", "kd", "scheduling", "models"])
def test_no_import_circles(package):
    assert a_cycle(sibling_imports(package)) is None


@pytest.mark.parametrize("module", sorted(p.stem for p in (REPO / "launch").glob("*.py") if p.stem != "__init__"))
def test_each_launch_module_imports_alone(module):
    """In a fresh interpreter, with nothing imported before it (an import order that only works one way fails)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", f"import launch.{module}"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-1500:]
