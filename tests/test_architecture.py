"""The import rules of docs/architecture.md, checked on the source: each fails when an import breaks it.

Covered: every module of edge/ and server/, read with ast (module-level imports and imports inside
functions alike, relative ones resolved), against the five rules; and each rule fails on a module
written to break it, so none passes for want of a match.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DEVICE_ONLY = (
    "edge.cli", "edge.transport", "edge.profiler", "edge.planner", "edge.autosplit", "edge.cooperative",
    "edge.pipeline", "edge.cascade", "edge.link", "edge.daemon", "edge.emulation",
)  # fmt: skip
CORE = ("edge.graph", "edge.partition", "edge.backends", "edge.runner", "edge.errors")
WIRE = ("edge.wire", "edge.protocol")
ABOVE_WIRE = (*DEVICE_ONLY, "server")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(name: str, source: str, *, is_package: bool = False) -> Iterator[tuple[str, bool]]:
    """Every module the module ``name`` (of ``source``) imports, and whether the import is at module level."""
    tree = ast.parse(source, name)
    package = name if is_package else name.rpartition(".")[0]
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            yield module, id(node) in top
            for alias in node.names:  # `from . import models` imports edge.models
                yield f"{module}.{alias.name}", id(node) in top


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(name: str, source: str, *, is_package: bool = False) -> list[str]:
    """What the module ``name`` imports against the rules, one line each."""
    found: list[str] = []
    for module, top_level in imports(name, source, is_package=is_package):
        if name.startswith("server") and _under(module, DEVICE_ONLY):
            found.append(f"1: {name} imports {module}")
        if name.startswith("edge") and _under(module, ("server",)):
            if not name.startswith("edge.cli.") or top_level:
                found.append(f"2: {name} imports {module} (only edge.cli, inside a function)")
        if _under(module, ("edge.cli",)) and not _under(name, ("edge.cli", "edge.__main__")):
            found.append(f"3: {name} imports {module}")
        if _under(module, ("edge.daemon",)) and not _under(name, ("edge.daemon", "edge.cli")):
            found.append(f"3: {name} imports {module}")
        if _under(name, CORE + WIRE):
            if _under(module, ABOVE_WIRE):
                found.append(f"4: {name} imports {module}")
            if _under(module, ("grpc",)) and not _under(name, ("edge.protocol",)):
                found.append(f"4: {name} imports grpc")
        if _under(module, ("tensorflow", "tf_keras", "keras")):
            found.append(f"5: {name} imports {module}")
    return found


SOURCES = sorted([*(ROOT / "edge").rglob("*.py"), *(ROOT / "server").rglob("*.py")])


def test_the_sources_are_found() -> None:
    names = {_module_name(p) for p in SOURCES}
    assert {"edge.graph", "edge.transport.session", "server.scheduler", "server.grpc_service"} <= names
    assert len(SOURCES) > 80


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_keeps_the_import_rules(path: Path) -> None:
    assert violations(_module_name(path), path.read_text(), is_package=path.name == "__init__.py") == []


@pytest.mark.parametrize(
    ("name", "source", "rule"),
    [
        ("server.bad", "from edge.transport import TailClient\n", "1"),
        ("server.bad", "from edge.cli.common import load_graph\n", "1"),
        ("server.bad", "def f():\n    from edge.profiler import cache_dir\n", "1"),
        ("edge.bad", "def f():\n    from server.embedded import BackgroundServer\n", "2"),
        ("edge.cli.bad", "from server.embedded import BackgroundServer\n", "2"),
        ("edge.transport.bad", "from ..cli import common\n", "3"),
        ("edge.bad", "from .daemon import Daemon\n", "3"),
        ("edge.wire.tensors", "from ..transport import session\n", "4"),
        ("edge.graph", "import grpc\n", "4"),
        ("edge.runner", "import tensorflow as tf\n", "5"),
    ],
)
def test_each_rule_catches_a_module_that_breaks_it(name: str, source: str, rule: str) -> None:
    assert [v for v in violations(name, source) if v.startswith(f"{rule}:")], (
        f"rule {rule} missed {source!r} in {name}"
    )


def test_a_function_level_server_import_in_a_command_is_allowed() -> None:
    assert (
        violations("edge.cli.demo_cmd", "def f():\n    from server.embedded import BackgroundServer\n") == []
    )
