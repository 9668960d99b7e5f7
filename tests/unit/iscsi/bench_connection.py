"""CPU per 4 KiB READ(16) through the session layer and the SCSI layer, without sockets.

    PYTHONPATH=. python tests/unit/iscsi/bench_connection.py

Feeds pre-encoded commands to `TargetConnection.receive_data` and encodes the answers, on a
memory LUN: once through the full path (each command's coroutine run inline, as the asyncio
adapter does) and once with the fast path on (`fast_lanes` set, as the adapter sets it).
Process time, so that other load on the machine inflates it less than wall time.
"""

from __future__ import annotations

import time

from lunastor.iscsi import pdu as p
from lunastor.iscsi.connection import ExecuteCommand, TargetConnection
from lunastor.iscsi.memdev import MemoryBlockDevice
from lunastor.iscsi.scsi.target import LogicalUnit, ScsiTarget
from tests.unit.iscsi.test_connection import CMDSN, TARGET, logged_in


def read16(lba: int) -> bytes:
    return bytes([0x88, 0]) + lba.to_bytes(8, "big") + (8).to_bytes(4, "big") + b"\0\0"


def run(conn: TargetConnection, target: ScsiTarget) -> int:
    for ev in conn.events():
        if isinstance(ev, ExecuteCommand):
            coro = target.execute(ev.command)
            try:
                coro.send(None)
            except StopIteration as done:
                conn.command_done(ev.itt, done.value)
    return sum(len(b) for b in conn.data_to_send())


def measure(fast: bool, n: int = 20000) -> float:
    conn = logged_in()
    conn.pdus_to_send()
    lu = LogicalUnit(MemoryBlockDevice(1 << 20), naa_id=0x6 << 124 | 1, serial="bench")
    target = ScsiTarget(TARGET, {0: lu})
    if fast:
        conn.fast_lanes = target.fast_lane
    wire = [
        b"".join(
            bytes(b)
            for b in p.encode_pdu(
                p.ScsiCommand(
                    itt=i,
                    cmdsn=CMDSN + i,
                    read=True,
                    expected_data_transfer_length=4096,
                    cdb=read16(i * 8 % 100000),
                )
            )
        )
        for i in range(n + 1)
    ]
    conn.receive_data(wire[0])  # the nexus's first command: its POWER ON unit attention
    run(conn, target)
    batch = b"".join(wire[1:])
    burst = 8 * 48  # as many commands as the window (queue depth 8) lets the initiator send
    sent = 0
    start = time.process_time()
    for i in range(0, len(batch), burst):
        conn.receive_data(batch[i : i + burst])
        sent += run(conn, target)
    elapsed = time.process_time() - start
    assert sent == n * (48 + 4096), "every command answered"
    assert conn.fast_commands == (n if fast else 0)
    return elapsed / n * 1e6


def main() -> None:
    full = measure(False)
    fast = measure(True)
    print(f"{full:.1f} us CPU per 4 KiB read, full path (decode, session, SCSI, encode)")
    print(f"{fast:.1f} us CPU per 4 KiB read, fast path")


if __name__ == "__main__":
    main()
