"""Every event kind the code writes is one the event log knows (an unknown kind raised
KeyError in the background writer and the event was lost: `locality_handover`)."""

from __future__ import annotations

import ast
from pathlib import Path

import lunastor
from lunastor.common.events import KINDS


def written_kinds() -> dict[str, str]:
    """kind -> where, for every `EVENTS.emit("kind", ...)` / `EVENTS.write("kind", ...)`."""
    found: dict[str, str] = {}
    root = Path(lunastor.__file__).parent
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("emit", "write")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "EVENTS"
            ):
                where = f"{path.relative_to(root)}:{node.lineno}"
                for kind in literals(node.args[0] if node.args else None, where):
                    found[kind] = where
    return found


def literals(expr: ast.expr | None, where: str) -> list[str]:
    """The kinds an argument can be: a literal, or a conditional choosing between literals."""
    if isinstance(expr, ast.IfExp):
        return literals(expr.body, where) + literals(expr.orelse, where)
    assert isinstance(expr, ast.Constant) and isinstance(expr.value, str), (
        f"{where}: an event kind must be a literal (or a choice of literals) for this test"
    )
    return [expr.value]


def test_every_event_kind_written_is_known() -> None:
    kinds = written_kinds()
    assert {"chunk_server_down", "rebuild_started", "failover"} <= kinds.keys()  # it sees them
    unknown = {k: where for k, where in kinds.items() if k not in KINDS}
    assert unknown == {}, f"event kinds missing from common/events.KINDS: {unknown}"
