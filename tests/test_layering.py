"""The project's layers point one way (house style, rule 11): nothing under ``data/`` reaches up
into ``training/`` or the top-level files built on it, and no project module imports another that
imports it back, directly or round a longer circle. Every import counts, wherever it is written:
at the top, inside a function, or under ``TYPE_CHECKING`` (a type-only cycle is still a cycle for
a reader, and a Protocol breaks it).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Where the project's own modules live: the top-level files and these packages. Tests are left
#: out (they import the project; the project never imports them).
PACKAGES = ("data", "training", "hardware", "inference", "settings", "experiments", "benchmarks", "tools")


def project_modules() -> dict[str, Path]:
    """Every project module by its dotted name (a package by its own name, for its ``__init__``)."""
    modules = {path.stem: path for path in ROOT.glob("*.py")}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``name`` (at ``path``) imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from package import module`` imports the module; ``from module import name`` the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            # ``import data.core`` names data.core; a name inside a module counts as its module.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the modules along it (the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The parser finds imports at the top, in functions and under TYPE_CHECKING, in every form."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "import data.core\n"
        "from data import shards\n"
        "if TYPE_CHECKING:\n"
        "    from training.config import TrainConfig\n"
        "def f():\n"
        "    from .loaders import BatchLoader\n"
    )
    path = tmp_path / "images.py"
    path.write_text(source)
    modules = dict.fromkeys(["data", "data.core", "data.shards", "data.loaders", "training", "training.config"], path)
    assert imports_of("data.images", path, modules) == {"data.core", "data.shards", "data.loaders", "training.config"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_data_does_not_import_training() -> None:
    """``data/`` sits below ``training/``: it may use the settings and the helpers, nothing above."""
    graph = import_graph()
    above = ("training", "main", "trainer", "inference")
    upward = sorted(
        f"{name} imports {target}"
        for name, targets in graph.items()
        if name == "data" or name.startswith("data.")
        for target in targets
        if any(target == top or target.startswith(top + ".") for top in above)
    )
    assert not upward, "data/ imports upwards: " + "; ".join(upward)


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def defined_in(path: Path) -> set[str]:
    """The names a module defines at its top level (not the ones it imports)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_tests_import_each_name_from_its_own_module() -> None:
    """The facades (``datasets``, ``trainer``) serve the command line and the benchmarks; a test
    imports what it checks from the module that defines it."""
    facades = {name: defined_in(ROOT / f"{name}.py") for name in ("datasets", "trainer")}
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [f"{path.name}: import {a.name}" for a in node.names if a.name == "datasets"]
            elif isinstance(node, ast.ImportFrom) and node.module in facades:
                own = facades[node.module]
                found += [f"{path.name}: {a.name} from {node.module}" for a in node.names if a.name not in own]
    assert not found, "imported through a facade: " + "; ".join(found)


def imported_names(tree: ast.AST) -> list[str]:
    """Every module name a source imports: ``import x``, ``from x import y``, ``__import__("x")``
    and ``importlib.import_module("x")``."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.append(node.module or "")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if function in ("__import__", "import_module") and isinstance(node.args[0].value, str):
                names.append(node.args[0].value)
    return names


def test_no_test_module_imports_another() -> None:
    """What several test modules share (cases, file builders, checkpoints) lives in a helper module of
    tests/ (``main_cli``, ``fakedata``, ``bad_data`` ...): a test module that imported another would
    tie the two together, so that moving or renaming a test breaks another file's imports."""
    tests = {path.stem for path in (ROOT / "tests").glob("test_*.py")}
    assert {"test_layering", "test_faults"} <= tests
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for name in imported_names(ast.parse(path.read_text(encoding="utf-8"))):
            if name.split(".")[0] in tests:
                found.append(f"{path.name} imports {name}")
    assert not found, "test modules imported: " + "; ".join(found)


def test_the_import_finder_sees_every_form() -> None:
    source = (
        "import a\n"
        "from b import x\n"
        "def f():\n"
        "    from c.d import y\n"
        "    __import__('e')\n"
        "    importlib.import_module('f')\n"
        "from . import z\n"
    )
    assert imported_names(ast.parse(source)) == ["a", "b", "c.d", "e", "f"]
