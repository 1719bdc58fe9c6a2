"""The import graph runs one way, cli -> query -> adapted -> train -> kernels, cache, with no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"cli": 6, "toy": 5, "query": 4, "adapted": 3, "train": 2, "kernels": 1, "cache": 1}
"""Each unit may import units of a lower rank only (toy builds the demo and may use every stage).
kernels and cache share the lowest rank but import neither each other nor anything above."""
FOUNDATION = {"__init__", "outputs", "options", "ranges"}
"""Root modules every unit may import: the version, TcaError, Device and ModelDtype; the output rule; the
ranges of settings; options
(which imports no stage, only the config classes cli names by string)."""


def _unit(module: str) -> str:
    """``tca.train.trainer`` -> ``train``; ``tca.cli`` -> ``cli``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {"tests", "bench", "docs", ".venv", "examples", "build"} or rel.parts[0].startswith("."):
            continue
        name = ".".join(("tca", *rel.with_suffix("").parts)).removesuffix(".__init__")
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the tca modules it imports (at any depth of the file, lazy imports included)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tca"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("tca")}
        graph[name] = {t for t in targets if t != name}
    return graph


def test_imports_run_one_way():
    wrong = []
    for module, targets in import_graph().items():
        source = _unit(module)
        for target in targets:
            dest = _unit(target)
            if dest in FOUNDATION or dest == source or target == "tca":
                continue
            if source in FOUNDATION or LAYERS[dest] >= LAYERS[source]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "reverse or sideways imports:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt in graph and nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_a_reverse_import_and_a_cycle():
    """The rules above can fail: a planted reverse import and a planted cycle are found."""
    graph = {"tca.cache.store": {"tca.train.trainer"}, "tca.train.trainer": {"tca.cache.store"}}
    assert LAYERS[_unit("tca.train.trainer")] > LAYERS[_unit("tca.cache.store")]
    state: dict[str, int] = {}
    found = []

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                found.append(nxt)
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    visit("tca.cache.store", ["tca.cache.store"])
    assert found == ["tca.cache.store"]
