"""Host side of the power-loss scenario: tests/tools/verified_writer.c, built once, and what
its journal says was acknowledged.

The writer (libiscsi) writes versioned, self-checking 4 KiB blocks with FUA, one command in
flight, and prints `I block version t` before each write and `A ...` (acknowledged) or
`F ...` (failed) after it. An acknowledged FUA write is durable: after a power loss the block
must hold that version, or a later one that was issued (its acknowledgement may have been
lost with the power).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.kernel.target import REPO

SOURCE = REPO / "tests" / "tools" / "verified_writer.c"


def build(build_dir: Path) -> Path:
    """The writer binary, compiled when missing or older than its source."""
    out = build_dir / "verified-writer"
    if out.exists() and out.stat().st_mtime >= SOURCE.stat().st_mtime:
        return out
    build_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(out), str(SOURCE), "-liscsi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cannot build {SOURCE.name}: {proc.stderr.strip()}")
    return out


@dataclass
class Journal:
    acked: dict[int, int] = field(default_factory=dict)  # block -> latest acknowledged version
    issued: dict[int, set[int]] = field(default_factory=dict)
    acks: int = 0
    failed: int = 0

    @classmethod
    def parse(cls, text: str) -> Journal:
        journal = cls()
        for line in text.splitlines():
            words = line.split()
            if len(words) != 4:  # the last line, cut short by a kill
                continue
            kind, b, v = words[0], int(words[1]), int(words[2])
            if kind == "I":
                journal.issued.setdefault(b, set()).add(v)
            elif kind == "A":
                journal.acks += 1
                journal.acked[b] = max(v, journal.acked.get(b, 0))
            else:
                journal.failed += 1
        return journal

    def lost(self, reads: dict[int, str]) -> list[str]:
        """Blocks whose latest acknowledged version is not on the volume (nor a later one that
        was issued). `reads`: `parse_reads` of a `verified-writer --read` of the volume."""
        lost = []
        for b, v in sorted(self.acked.items()):
            got = reads.get(b, "unread")
            allowed = {str(w) for w in self.issued.get(b, set()) if w >= v}
            if got not in allowed:
                lost.append(f"block {b} v{v}: read {got[:40]}")
        return lost


def parse_reads(text: str) -> dict[int, str]:
    """`R block version` lines of `verified-writer --read`: block -> its version as read, "0"
    (zeros) or "bad <hex>" (not a version of that block)."""
    reads = {}
    for line in text.splitlines():
        words = line.split(maxsplit=2)
        if len(words) == 3 and words[0] == "R":
            reads[int(words[1])] = words[2]
    return reads
