"""Dependencies point one way: entry points, wiring, adapters, effects, the pure core, data.

Every import of every module of ``supervisor/`` is read with ``ast`` (top
level, inside functions, under ``if TYPE_CHECKING:``); an edge to a higher
layer, a cycle, or a module placed in no layer fails the test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "supervisor"

LAYERS: list[tuple[str, set[str]]] = [
    ("data", {"errors", "model", "values", "addresses", "yamlload", "config", "schema", "reader", "status",
              "activation", "_spawn", "envfile"}),
    ("pure", {"lifecycle", "rolling", "policy", "logsummary"}),
    ("effects", {"fsnodes", "sockopts", "sockets", "matching", "spawn", "reaper", "notifyd", "log", "relay",
                 "specials", "handover", "recovery", "cgroups"}),
    ("adapters", {"units", "service", "pool", "accept", "control", "metrics", "proxy", "builtins"}),
    ("wiring", {"registry", "reload", "daemon"}),
    ("entry", {"cli", "activate", "fdsinfo", "__main__", "__init__"}),
]
RANK = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}


def imports(source: str) -> list[tuple[int, str]]:
    """(line, supervisor module) for every import in ``source``, wherever it is."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1]) for a in node.names if a.name.startswith("supervisor.")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                base = "supervisor" + ("." + base if base else "")
            if base == "supervisor":
                found += [(node.lineno, a.name) for a in node.names]
            elif base.startswith("supervisor."):
                found.append((node.lineno, base.split(".")[1]))
    return found


def problems(graph: dict[str, list[tuple[int, str]]]) -> list[str]:
    """Unplaced modules, upward edges and cycles of ``graph`` (module -> [(line, imported module)])."""
    out = [f"supervisor/{m}.py is in no layer of tests/unit/test_layers.py" for m in graph if m not in RANK]
    for module, edges in graph.items():
        for line, target in edges:
            if module in RANK and target in RANK and RANK[target] > RANK[module]:
                out.append(f"supervisor/{module}.py:{line}: imports {target} "
                           f"({LAYERS[RANK[module]][0]} -> {LAYERS[RANK[target]][0]}: points up)")
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for _, target in graph.get(module, []):
            if state.get(target) == 1:
                out.append("cycle: " + " -> ".join([*path[path.index(target):], target]))
            elif target in graph and target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    return out


def test_supervisor_imports_point_down_and_close_no_cycle() -> None:
    graph = {p.stem: [(line, t) for line, t in imports(p.read_text()) if t != p.stem]
             for p in sorted(PACKAGE.glob("*.py"))}
    assert problems(graph) == []


@pytest.mark.parametrize(("graph", "expected"), [
    ({"units": [(3, "daemon")], "daemon": []}, "supervisor/units.py:3: imports daemon"),
    ({"service": [(1, "pool")], "pool": [(2, "service")]}, "cycle: service -> pool -> service"),
    ({"newthing": []}, "supervisor/newthing.py is in no layer"),
])
def test_the_checker_sees_an_upward_edge_a_cycle_and_an_unplaced_module(
        graph: dict[str, list[tuple[int, str]]], expected: str) -> None:
    assert any(p.startswith(expected) for p in problems(graph)), problems(graph)


def test_imports_are_found_under_type_checking_and_inside_functions() -> None:
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from supervisor.daemon import Daemon\n"
              "def f():\n    from supervisor import reload\n    import supervisor.control\n")
    assert imports(source) == [(3, "daemon"), (5, "reload"), (6, "control")]
