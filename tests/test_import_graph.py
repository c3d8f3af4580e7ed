"""The package's imports flow one way (docs/architecture.md, "Package layout and import order").

Read from the source, not by importing: every ``import magnet_asr...`` counts, at module level or inside a
function (a lazy import still ties the two modules together), except those under ``if TYPE_CHECKING:``.
Two checks: no module imports one that imports it back, however long the loop; and no subpackage imports one
later in the layer order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import magnet_asr

PACKAGE = Path(magnet_asr.__file__).parent

# top-level module or subpackage -> layer; each may import only from layers at or below its own
LAYERS = {
    "paths": 0,
    "audio": 0,
    "text": 1,
    "weights": 2,
    "compression": 3,
    "data": 4,
    "models": 5,
    "evaluation": 6,
    "schema": 7,  # the Hydra schemas take their defaults from the modules they configure
    "training": 7,
    "remote": 7,
    "demo": 8,
    "cli": 9,
    "__main__": 10,
}


def _module_name(path: Path) -> str:
    parts = ("magnet_asr", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """``module -> the magnet_asr modules it imports`` (a ``from X import name`` of a submodule counts as
    that submodule)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_checking_nodes(tree)
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if not state.get(nxt) and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if not state.get(node) and (found := visit(node)):
            return found
    return None


def _unit(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def test_the_graph_is_read():
    graph = import_graph()
    assert "magnet_asr.models.whisper_generation" in graph["magnet_asr.evaluation.decode"]
    assert "magnet_asr.training.recipe" in graph["magnet_asr.cli"]  # a lazy import counts


def test_no_import_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_cycle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_follow_the_layer_order():
    graph = import_graph()
    units = {_unit(m) for m in graph} - {"__init__"}
    assert units <= set(LAYERS), f"give these a layer: {sorted(units - set(LAYERS))}"
    against = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if "__init__" not in (_unit(module), _unit(target)) and LAYERS[_unit(target)] > LAYERS[_unit(module)]
    )
    assert not against, "imports against the layer order:\n" + "\n".join(against)
