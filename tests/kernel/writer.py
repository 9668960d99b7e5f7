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
BLOCK = 4096


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


def pattern(block: int, version: int) -> bytes:
    """The bytes verified_writer.c writes as `version` of `block`."""
    data = bytearray((i * 131 + block * 7 + version * 13) & 0xFF for i in range(BLOCK))
    head = f"lunastor block {block} version {version}\n".encode()
    data[: len(head)] = head
    return bytes(data)


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

    def lost(self, image: bytes, stride: int) -> list[str]:
        """Blocks whose latest acknowledged version is not on the volume (nor a later one)."""
        lost = []
        for b, v in sorted(self.acked.items()):
            got = image[b * stride : b * stride + BLOCK]
            allowed = {pattern(b, w) for w in self.issued.get(b, set()) if w >= v}
            if got not in allowed:
                lost.append(f"block {b} v{v}: read {got[:32]!r}")
        return lost
