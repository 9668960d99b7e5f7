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


def _imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, anywhere in it (functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_the_iscsi_engine_is_sans_io() -> None:
    """lunastor/iscsi is bytes and events only: its hosts own sockets and the event loop
    (STYLE.md, "Sans-IO"); even a lazy import inside a function counts."""
    violations = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / "iscsi").rglob("*.py"))
        for name in sorted(_imported_modules(path) & {"asyncio", "socket", "selectors"})
    ]
    assert violations == []


def test_no_import_circle_in_the_scsi_layer() -> None:
    """No module of lunastor/iscsi/scsi imports target.py at run time: the handlers reach the
    command table through `commands`, and `target` imports them through `handlers`."""
    offenders = []
    for path in sorted((ROOT / "iscsi" / "scsi").glob("*.py")):
        if path.name == "target.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:  # module level, outside `if TYPE_CHECKING:`
            if isinstance(node, ast.ImportFrom) and node.module == "lunastor.iscsi.scsi.target":
                offenders.append(path.name)
            if (
                isinstance(node, ast.ImportFrom)
                and node.module == "lunastor.iscsi.scsi"
                and any(a.name == "target" for a in node.names)
            ):
                offenders.append(path.name)
    assert offenders == []
    source = (ROOT / "iscsi" / "scsi" / "target.py").read_text()
    tree = ast.parse(source)
    first_code = next(
        i
        for i, n in enumerate(tree.body)
        if not isinstance(n, ast.Import | ast.ImportFrom | ast.Expr)
    )
    late = [n.lineno for n in tree.body[first_code:] if isinstance(n, ast.Import | ast.ImportFrom)]
    assert late == [], f"target.py imports below its code (lines {late})"
