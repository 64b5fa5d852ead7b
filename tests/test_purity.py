"""The codec, the head parser and the plain-HTTP request rules are pure: no I/O, clocks,
processes or threads.

Checked on the source with ``ast`` (importing would prove nothing about what a module
*could* reach), following the package-local imports they make, so a helper module cannot
smuggle an impure dependency in.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "upstreamproxy"
PURE_MODULES = [
    "codec.py",
    "connect_head.py",
    "forward_request.py",
    "tunnel/core.py",
    "tunnel/actions.py",
    "tunnel/payload.py",
]
FORBIDDEN = frozenset(
    {"asyncio", "socket", "ssl", "time", "os", "selectors", "subprocess", "threading"}
)
# Ways around a static import check.
DYNAMIC_IMPORTERS = frozenset({"importlib", "builtins"})


def _imports(path: Path) -> tuple[set[str], set[Path]]:
    """(absolute top-level module names, package-local module files) imported by ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    absolute: set[str] = set()
    local: set[Path] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            absolute.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                top = node.module.split(".")[0]
                if top == PACKAGE.name:
                    local |= _local_files(node.module.split(".")[1:], [a.name for a in node.names])
                else:
                    absolute.add(top)
            else:
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                parts = node.module.split(".") if node.module else []
                local |= _local_files(parts, [a.name for a in node.names], base)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in {"__import__", "exec", "eval"}, (
                f"{path.name} calls {node.func.id}()"
            )
    return absolute, local


def _local_files(parts: list[str], names: list[str], base: Path = PACKAGE) -> set[Path]:
    target = base.joinpath(*parts)
    files: set[Path] = set()
    if target.with_suffix(".py").is_file():
        files.add(target.with_suffix(".py"))
    elif target.is_dir():
        files.add(target / "__init__.py")
        # `from . import x` names submodules
        files.update(target / f"{n}.py" for n in names if (target / f"{n}.py").is_file())
    return files


def _closure(start: Path) -> dict[Path, set[str]]:
    """Every package-local module reachable from ``start`` and its absolute imports."""
    seen: dict[Path, set[str]] = {}
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        absolute, local = _imports(path)
        seen[path] = absolute
        todo.extend(local)
    return seen


@pytest.mark.parametrize("module", PURE_MODULES)
def test_module_imports_no_io(module: str) -> None:
    closure = _closure(PACKAGE / module)
    for path, absolute in closure.items():
        bad = absolute & (FORBIDDEN | DYNAMIC_IMPORTERS)
        assert not bad, f"{path.name} (reached from {module}) imports {sorted(bad)}"


def test_the_checker_sees_local_imports() -> None:
    # Guard against a checker that passes by looking at nothing.
    closure = _closure(PACKAGE / "codec.py")
    assert PACKAGE / "errors.py" in closure
    assert "collections" in closure[PACKAGE / "codec.py"]


def test_the_checker_catches_a_forbidden_import(tmp_path: Path) -> None:
    for source in (
        "import os\n",
        "from asyncio import sleep\n",
        "import time as t\n",
        "import socket.x\n",
        "def f():\n    import ssl\n",
    ):
        module = tmp_path / "m.py"
        module.write_text(source)
        absolute, _ = _imports(module)
        assert absolute & FORBIDDEN, source
