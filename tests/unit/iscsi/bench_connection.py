"""CPU per 4 KiB READ(16) through the session layer and the SCSI layer, without sockets.

    PYTHONPATH=. python tests/unit/iscsi/bench_connection.py

Decodes pre-encoded commands with `PduReader`, feeds `TargetConnection`, runs each command's
coroutine inline on a memory LUN, encodes the answers. Process time, so that other load on
the machine inflates it less than wall time.
"""

from __future__ import annotations

import time

from lunastor.iscsi import pdu as p
from lunastor.iscsi.connection import ExecuteCommand
from lunastor.iscsi.memdev import MemoryBlockDevice
from lunastor.iscsi.scsi.target import LogicalUnit, ScsiTarget
from tests.unit.iscsi.test_connection import CMDSN, TARGET, logged_in


def read16(lba: int) -> bytes:
    return bytes([0x88, 0]) + lba.to_bytes(8, "big") + (8).to_bytes(4, "big") + b"\0\0"


def main(n: int = 20000) -> None:
    conn = logged_in()
    conn.pdus_to_send()
    lu = LogicalUnit(MemoryBlockDevice(1 << 20), naa_id=0x6 << 124 | 1, serial="bench")
    target = ScsiTarget(TARGET, {0: lu})
    reader = p.PduReader(max_recv_data_segment_length=1 << 20)
    wire = b"".join(
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
        for i in range(n)
    )
    start = time.process_time()
    reader.feed(wire)
    for pdu in reader:
        conn.receive_pdu(pdu)
        for ev in conn.events():
            if isinstance(ev, ExecuteCommand):
                coro = target.execute(ev.command)
                try:
                    coro.send(None)
                except StopIteration as done:
                    conn.command_done(ev.itt, done.value)
        conn.data_to_send()
    elapsed = time.process_time() - start
    print(f"{elapsed / n * 1e6:.1f} us CPU per 4 KiB read (decode, session, SCSI, encode)")


if __name__ == "__main__":
    main()
