"""The package imports one way: each module of plugin_utils imports only modules of earlier stages, at the top
of the file (no import hidden inside a function to dodge a cycle), and the ranks never import the parent's
data preparation, validation or host modules. A stage may be a package (data/), whose own modules import one
way too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "plugin_utils"
# The stages, in order (README.md's layout).
ORDER = [
    "errors",
    "rowformats",
    "machine",
    "runfolder",
    "samples",
    "checkpoints",
    "chat",
    "templates",
    "sources",
    "layers",
    "params",
    "speed",
    "planning",
    "report",
    "downloads",
    "outputs",
    "strategies",
    "validation",
    "data",
    "host",
    "launch",
    "worker",
    "rank",
    "cli",
    "stages",
]
# The data package's modules, in order.
DATA_ORDER = ["loading", "formats", "encoding", "keys", "prepared_cache", "prepare", "__init__"]


def files_of(stage: str) -> list[Path]:
    folder = PACKAGE / stage
    return sorted(folder.glob("*.py")) if folder.is_dir() else [PACKAGE / f"{stage}.py"]


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(what is imported, at the top level?) for each import of plugin_utils in the file: a stage by name, or
    for a module inside a package, a sibling as `.name`."""
    inside = path.parent != PACKAGE
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        if node.level == 0 and not module.startswith("plugin_utils"):
            continue
        names = [module.removeprefix("plugin_utils").lstrip(".")] if module else [a.name for a in node.names]
        if node.level == 0 or node.level == 1 + inside:  # a stage of plugin_utils
            found += [(name.split(".")[0], id(node) in top) for name in names if name]
        else:  # a sibling inside the package
            found += [("." + name.split(".")[0], id(node) in top) for name in names]
    return found


# The imports made inside a function, on purpose: a rank sends its output to its own file before the worker
# loads the libraries that print; `--check` answers without the data code (its Jinja, Arrow and tokenizer
# imports), which only the prepare stage needs, and imports Jinja only where a template is given.
DEFERRED = {("rank", "worker"), ("stages", "data"), ("validation", "templates")}


def test_every_module_is_placed_in_a_stage():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    modules |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert modules == set(ORDER)
    assert {p.stem for p in (PACKAGE / "data").glob("*.py")} == set(DATA_ORDER)


def test_modules_import_only_earlier_stages_and_only_at_the_top():
    wrong = []
    for name in ORDER:
        for path in files_of(name):
            for imported, at_top in imports_of(path):
                if (name, imported) in DEFERRED:
                    continue
                if imported.startswith("."):
                    order = DATA_ORDER
                    earlier = order.index(imported[1:]) < order.index(path.stem)
                else:
                    earlier = ORDER.index(imported) < ORDER.index(name)
                if not earlier or not at_top:
                    wrong.append(
                        f"{path.relative_to(PACKAGE)} imports {imported}" + ("" if at_top else " in a function")
                    )
    assert not wrong, wrong


def test_the_ranks_import_nothing_of_the_parents_stages():
    parent_only = {"data", "validation", "host", "launch", "cli", "params", "planning", "outputs"}

    def reached(name: str, seen: set[str]) -> set[str]:
        for path in files_of(name):
            for imported, _ in imports_of(path):
                if not imported.startswith(".") and imported not in seen:
                    seen.add(imported)
                    reached(imported, seen)
        return seen

    assert not reached("worker", set()) & parent_only
