"""The package imports one way: each module of plugin_utils imports only modules of earlier stages, at the top
of the file (no import hidden inside a function to dodge a cycle), and the ranks never import the parent's
data preparation, validation or host modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The stages, in order (README.md's layout).
ORDER = [
    "errors",
    "machine",
    "runfolder",
    "checkpoints",
    "chat",
    "templates",
    "sources",
    "layers",
    "params",
    "speed",
    "planning",
    "outputs",
    "strategies",
    "validation",
    "data",
    "host",
    "launch",
    "worker",
    "rank",
    "cli",
]


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(plugin_utils module, imported at the top level?) for each import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("plugin_utils")):
            module = (node.module or "").removeprefix("plugin_utils").lstrip(".")
            names = [module] if module else [alias.name for alias in node.names]
            found += [(name.split(".")[0], id(node) in top) for name in names]
    return found


# The one import made inside a function, on purpose: a rank sends its output to its own file before the worker
# loads the libraries that print.
DEFERRED = {("rank", "worker")}


def test_every_module_is_placed_in_a_stage():
    modules = {p.stem for p in (ROOT / "plugin_utils").glob("*.py")} - {"__init__"}
    assert modules == set(ORDER)


def test_modules_import_only_earlier_stages_and_only_at_the_top():
    wrong = []
    for name in ORDER:
        for imported, at_top in imports_of(ROOT / "plugin_utils" / f"{name}.py"):
            if (name, imported) in DEFERRED:
                continue
            if ORDER.index(imported) >= ORDER.index(name) or not at_top:
                wrong.append(f"{name} imports {imported}" + ("" if at_top else " inside a function"))
    assert not wrong, wrong


def test_the_ranks_import_nothing_of_the_parents_stages():
    parent_only = {"data", "validation", "host", "launch", "cli", "params", "planning", "outputs"}

    def reached(name: str, seen: set[str]) -> set[str]:
        for imported, _ in imports_of(ROOT / "plugin_utils" / f"{name}.py"):
            if imported not in seen:
                seen.add(imported)
                reached(imported, seen)
        return seen

    assert not reached("worker", set()) & parent_only
