"""The package layout ARCHITECTURE.md describes, and its import rules."""

from __future__ import annotations

import ast
from pathlib import Path

import lunastor

ROOT = Path(lunastor.__file__).parent
# package -> lunastor packages it may import (ARCHITECTURE.md, "Which package may import which")
ALLOWED = {
    "common": set(),
    "iscsi": set(),
    "chunk": {"iscsi", "common"},
    "redirector": {"iscsi", "common"},
    "meta": {"common"},
    "cli": {"common"},
    "csi": {"common"},
}


def _lunastor_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lunastor" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_package_exists() -> None:
    for pkg in ALLOWED:
        assert (ROOT / pkg / "__init__.py").is_file(), pkg


def test_packages_import_only_what_the_architecture_allows() -> None:
    violations = []
    for pkg, allowed in ALLOWED.items():
        for path in (ROOT / pkg).rglob("*.py"):
            for imported in _lunastor_imports(path) - allowed - {pkg}:
                violations.append(f"{path.relative_to(ROOT)} imports lunastor.{imported}")
    assert violations == []
