"""The dependency rules of docs/ARCHITECTURE: tui -> core <- plugins, vm -> core + plugins."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# folder -> top-level modules it must never import
FORBIDDEN = {
    "core": {"textual", "pytun", "pyroute2"},
    "plugins/transport_udp": {"textual", "pytun", "pyroute2"},
    "plugins/transport_tcp": {"textual", "pytun", "pyroute2"},
    "plugins/platform_linux": {"textual"},
    "vm": {"textual"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_imports_only_what_it_may(folder: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_modules(path) & FORBIDDEN[folder])
        for path in (ROOT / folder).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_package_code_never_imports_itself_as_bare_core_or_plugins() -> None:
    """`import core` would work from a checkout but not once installed as `ctun`."""
    bad = {}
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts or "tests" in path.parts:
            continue
        hits = imported_modules(path) & {"core", "plugins", "vm", "tui", "lab"}
        if hits:
            bad[str(path.relative_to(ROOT))] = sorted(hits)
    assert bad == {}
