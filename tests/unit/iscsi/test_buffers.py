"""Pooled buffers: reused once nothing refers to them, never while a view is alive."""

from __future__ import annotations

from lunastor.iscsi import pdu as p
from lunastor.iscsi.buffers import BufferPool, unexported
from lunastor.iscsi.connection import ExecuteCommand
from lunastor.iscsi.scsi.types import ScsiResult
from tests.unit.iscsi.test_connection import CMDSN, logged_in


def test_a_buffer_comes_back_only_once_its_views_are_gone() -> None:
    pool = BufferPool()
    first = pool.take(100_000)
    assert len(first) == 131072 and pool.allocated == 1
    view = memoryview(first)[:10]
    assert not unexported(first)
    second = pool.take(100_000)
    assert second is not first and pool.allocated == 2  # `first` is still referred to
    view.release()
    assert unexported(first)
    assert pool.take(70_000) in (first, second)
    assert pool.allocated == 2
    big = pool.take(2 << 20)  # beyond max_pooled: a buffer of its own
    assert len(big) == 2 << 20 and pool.allocated == 3


def test_writes_solicited_by_r2t_reuse_their_buffers() -> None:
    conn = logged_in(extra=[("MaxBurstLength", "65536"), ("MaxRecvDataSegmentLength", "65536")])
    conn.pdus_to_send()
    payload = bytes(range(256)) * 256  # 64 KiB
    for i in range(20):
        cdb = bytes([0x2A, 0, 0, 0, 0, i, 0, 0, 128, 0]).ljust(16, b"\0")
        conn.receive_pdu(
            p.ScsiCommand(
                write=True, itt=i, cmdsn=CMDSN + i, expected_data_transfer_length=65536, cdb=cdb
            )
        )
        (r2t,) = conn.pdus_to_send()
        assert isinstance(r2t, p.R2T)
        conn.receive_pdu(p.DataOut(final=True, itt=i, ttt=r2t.ttt, buffer_offset=0, data=payload))
        (ev,) = conn.events()
        assert isinstance(ev, ExecuteCommand)
        assert bytes(ev.command.data_out) == payload  # exactly EDTL bytes, as received
        del ev  # the SCSI layer lets go of the data
        conn.command_done(i, ScsiResult(transfer_length=65536))
        conn.pdus_to_send()
    assert conn.pool.allocated == 1
