"""The layering docs/architecture.md draws: no import cycle, and no import back up."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "alignkit"
# lower layers first: a module may import only from its own layer or a lower one.
# config.check reads the loss registry and the benchmark list, so it sits with train/eval.
LAYERS = [
    ("errors", "rundir", "config"),
    ("models", "chat_templates", "plots", "console", "data", "losses", "rewards.base"),
    (
        "config.check",
        "card",
        "merge",
        "export",
        "push",
        "generate",
        "eval",
        "train",
        "rewards",
        "chat",
        "serve",
    ),
    ("workflow",),
    ("cli", "__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every alignkit import of every module, lazy ones included."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alignkit"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("alignkit")}
        parents = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        graph[name] = {t for t in targets if t in modules and t != name and t not in parents}
    return graph


def layer(module: str) -> int:
    """The layer of the longest entry that names the module or a package holding it."""
    inner = module.removeprefix("alignkit.")
    found = [
        (len(entry), i)
        for i, entries in enumerate(LAYERS)
        for entry in entries
        if inner == entry or inner.startswith(entry + ".")
    ]
    return max(found)[1] if found else -1


def test_every_module_has_a_layer():
    assert [m for m in import_graph() if m != "alignkit" and layer(m) < 0] == []


def test_no_import_goes_up_the_layers():
    graph = import_graph()
    upward = [(m, t) for m, targets in graph.items() for t in targets if layer(t) > layer(m)]
    assert upward == []


def test_no_import_cycle():
    graph = import_graph()
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for target in graph[node]:
            if target in path:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in done:
                visit(target, [*path, target])
        done.add(node)

    done: set[str] = set()
    for start in graph:
        if start not in done:
            visit(start, [start])
    assert cycles == []
