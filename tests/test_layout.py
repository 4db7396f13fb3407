"""The package's layout: who may import whom, read from the source with ``ast`` (nothing is imported).

Floors, bottom to top: the core op (``_shapes``, ``reference``, ``functional``,
``kernels``), the layers (``nn``), deployment (``deploy``), the lab (``lab``) and the command line
(``cli``, with ``__main__`` for ``python -m batchnorm``). Imports go down
only, there are no import cycles (imports inside functions included), only
``cli`` knows ``argparse``, and no module is named like a standard-library
module.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import batchnorm

PACKAGE = Path(batchnorm.__file__).parent
CORE = ("batchnorm._shapes", "batchnorm.reference", "batchnorm.functional", "batchnorm.kernels")
LAYERS = ("batchnorm.nn",)
DEPLOY = ("batchnorm.deploy",)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES: dict[str, Path] = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return SOURCES[module].name == "__init__.py"


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def _imported_names(module: str) -> set[str]:
    """Every module name ``module`` imports anywhere in its source (functions and ``TYPE_CHECKING`` included).

    ``from X import y`` counts as ``X.y`` when that is a module of the package, else as ``X``.
    """
    tree = ast.parse(SOURCES[module].read_text(encoding="utf-8"), filename=str(SOURCES[module]))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module if _is_package(module) else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                names.add(candidate if candidate in SOURCES else base)
    return names


def _package_module(name: str) -> str | None:
    """The package module an imported name loads: itself, or its longest prefix that is one (None if outside)."""
    while name:
        if name in SOURCES:
            return name
        name = name.rpartition(".")[0]
    return None


IMPORTS: dict[str, set[str]] = {module: _imported_names(module) for module in SOURCES}
GRAPH: dict[str, set[str]] = {
    module: {target for name in names if (target := _package_module(name)) is not None and target != module}
    for module, names in IMPORTS.items()
}


def _reachable(module: str) -> set[str]:
    seen: set[str] = set()
    stack = [module]
    while stack:
        for target in GRAPH[stack.pop()]:
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def test_the_walk_sees_every_floor() -> None:
    for module in ("batchnorm.functional", "batchnorm.nn.batchnorm", "batchnorm.lab.training", "batchnorm.cli"):
        assert module in SOURCES
    assert "batchnorm.lab.training" in GRAPH["batchnorm.cli.train"]
    assert "batchnorm.lab.data" in GRAPH["batchnorm.lab.explain"]  # an import inside a function


def test_the_import_graph_has_no_cycle() -> None:
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(SOURCES):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_cli_imports_the_cli_or_argparse() -> None:
    offenders = sorted(
        f"{module} imports {name}"
        for module, names in IMPORTS.items()
        if not _within(module, ("batchnorm.cli", "batchnorm.__main__"))  # ``python -m batchnorm`` is the CLI
        for name in names
        if _within(name, ("batchnorm.cli", "argparse"))
    )
    assert not offenders


def test_the_core_and_the_layers_never_reach_the_lab_or_the_cli() -> None:
    offenders = sorted(
        f"{module} reaches {target}"
        for module in SOURCES
        if _within(module, CORE + LAYERS)
        for target in _reachable(module)
        if _within(target, ("batchnorm.lab", "batchnorm.cli")) or target == "batchnorm"
    )
    assert not offenders


def test_deploy_sits_between_the_layers_and_the_lab() -> None:
    assert {"batchnorm.nn.batchnorm", "batchnorm.kernels"} <= GRAPH["batchnorm.deploy"]
    offenders = sorted(
        f"{module} reaches {target}"
        for module in SOURCES
        if _within(module, DEPLOY)
        for target in _reachable(module)
        if _within(target, ("batchnorm.lab", "batchnorm.cli")) or target == "batchnorm"
    )
    assert not offenders
    below = sorted(
        f"{module} reaches {target}"
        for module in SOURCES
        if _within(module, CORE + LAYERS)
        for target in _reachable(module)
        if _within(target, DEPLOY)
    )
    assert not below


def test_the_core_never_reaches_the_layers() -> None:
    offenders = sorted(
        f"{module} reaches {target}"
        for module in SOURCES
        if _within(module, CORE)
        for target in _reachable(module)
        if _within(target, LAYERS)
    )
    assert not offenders


def test_no_module_is_named_like_a_standard_library_module() -> None:
    clashes = sorted(
        module
        for module in SOURCES
        if any(part in sys.stdlib_module_names for part in module.split(".")[1:] if part != "__main__")
    )
    assert not clashes


def test_every_verb_lives_in_the_cli_package() -> None:
    from batchnorm.cli import VERBS

    for verb, (module, _) in VERBS.items():
        assert module in SOURCES, verb
        assert module.startswith("batchnorm.cli."), verb
