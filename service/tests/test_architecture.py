"""The package's layers point one way (issue 16's architecture): the HTTP routes import the domain, never the
reverse, and no module imports itself back through another."""

from __future__ import annotations

import ast
from pathlib import Path

import pilotys_whisper

PACKAGE = Path(pilotys_whisper.__file__).parent
HTTP = ("flask", "werkzeug", "waitress")
ABOVE_THE_DOMAIN = ("pilotys_whisper.app", "pilotys_whisper.routes", "pilotys_whisper.state",
                    "pilotys_whisper.server", "pilotys_whisper.cli")


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The modules path imports (a `from X import y` counts X and X.y), at the top or anywhere."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _modules() -> dict[str, Path]:
    return {_module(path): path for path in PACKAGE.rglob("*.py")}


def test_the_jobs_package_imports_neither_http_nor_the_routes():
    offending = {}
    for name, path in _modules().items():
        if name == "pilotys_whisper.jobs" or name.startswith("pilotys_whisper.jobs."):
            bad = sorted(i for i in _imports(path, top_level_only=False)
                         if i.split(".")[0] in HTTP or i.startswith(ABOVE_THE_DOMAIN))
            if bad:
                offending[name] = bad
    assert offending == {}


def test_only_the_app_registers_the_routes():
    importers = sorted(name for name, path in _modules().items()
                       if not name.startswith("pilotys_whisper.routes") and name != "pilotys_whisper.app"
                       and any(i.startswith("pilotys_whisper.routes") for i in _imports(path, top_level_only=False)))
    assert importers == []


def test_no_module_imports_itself_back_at_import_time():
    modules = _modules()
    # A package and its own modules are not a circle: Python runs the package first, and a package that
    # re-exports its modules imports them by design.
    def related(a: str, b: str) -> bool:
        return a.startswith(b + ".") or b.startswith(a + ".")

    graph = {name: {i for i in _imports(path, top_level_only=True)
                    if i in modules and i != name and not related(i, name)}
             for name, path in modules.items()}
    cycles = []

    def visit(name: str, trail: list[str]) -> None:
        for nxt in graph[name]:
            if nxt == trail[0]:
                cycles.append(" -> ".join([*trail, nxt]))
            elif nxt not in trail:
                visit(nxt, [*trail, nxt])

    for name in graph:
        visit(name, [name])
    assert cycles == []
