"""Data transfer of one target connection, sans-IO (RFC 7143 sections 11.7 and 11.8, ERL 0).

Write data comes in three ways: immediate (with the command), unsolicited Data-Out
(InitialR2T=No, up to FirstBurstLength) and Data-Out solicited by our R2Ts (MaxBurstLength
each, at most MaxOutstandingR2T at a time). All of it lands in one pooled buffer per task,
allocated within a write budget: a write whose buffer does not fit waits for its R2Ts until
an earlier one is freed. Read data goes out as Data-In PDUs of at most the initiator's
MaxRecvDataSegmentLength, the F bit at every MaxBurstLength boundary, the status in the last
one when there is no sense data to send (phase collapse).

`DataTransfer` is one part of `TargetConnection` (connection.py), which owns the tasks, the
session's sequence numbers and the output queue; docs/iscsi-session.md.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from lunastor.iscsi import pdu as p
from lunastor.iscsi.buffers import BufferPool
from lunastor.iscsi.scsi.types import ScsiResult, Status

if TYPE_CHECKING:
    from lunastor.iscsi.connection import TargetConnection

RESERVED = p.RESERVED_TAG
Buffer = bytes | bytearray | memoryview

# fixed-format sense (SPC-4 4.5.3): ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR / DATA PHASE
# ERROR; ILLEGAL REQUEST, INVALID FIELD IN CDB
CRC_ERROR = bytes([0x70, 0, 0x0B, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x47, 0x05, 0, 0, 0, 0])
DATA_PHASE_ERROR = bytes([0x70, 0, 0x0B, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x4B, 0, 0, 0, 0, 0])
INVALID_FIELD_IN_CDB = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0])


class TaskState(Enum):
    RECEIVING = "receiving"  # data-out outstanding
    READY = "ready"  # data complete, waiting for CmdSN delivery
    EXECUTING = "executing"  # handed to the host


@dataclass(slots=True, eq=False)
class R2TState:
    """One outstanding R2T: the burst it solicited and how much of it has arrived."""

    offset: int
    length: int
    received: int = 0
    next_data_sn: int = 0


@dataclass(slots=True, eq=False)
class Task:
    itt: int
    cmd_sn: int
    immediate: bool
    lun_field: int
    lun: int
    cdb: bytes
    attr: int
    edtl: int
    read: bool
    write: bool
    delivered: bool = False
    state: TaskState = TaskState.RECEIVING
    buffer: bytearray | None = None  # write data (a pooled buffer of at least EDTL bytes)
    data_view: Buffer = b""  # the data handed to SCSI (buffer, or the immediate data itself)
    received: int = 0  # bytes of write data in place
    unsolicited_end: int = 0  # end offset of the unsolicited burst still expected
    unsolicited_data_sn: int = 0
    next_r2t_offset: int = 0
    r2t_sn: int = 0
    r2ts: dict[int, R2TState] = field(default_factory=dict)  # by Target Transfer Tag
    canned: ScsiResult | None = None  # answered without the SCSI layer


class DataTransfer:
    """Where each task's data stands, the R2Ts that solicit it and the Data-In that return it."""

    def __init__(self, conn: TargetConnection, *, max_write_length: int, write_budget: int):
        self.conn = conn
        self.max_write_length = max_write_length  # longer writes: INVALID FIELD IN CDB
        self.write_budget = write_budget  # bytes of write buffers R2Ts may have outstanding
        self.pool = BufferPool()  # write buffers, reused once nothing refers to them
        self._buffered = 0
        self._waiting: deque[Task] = deque()  # writes whose buffer did not fit the budget
        self._owner: dict[int, Task] = {}  # Target Transfer Tag -> the task of that R2T

    def clear(self) -> None:
        """The connection is gone: nothing is solicited or waiting any more."""
        self._owner.clear()
        self._waiting.clear()

    # --- write data in --------------------------------------------------------------------

    def start(self, task: Task, pdu: p.ScsiCommand) -> None:
        """A new task: take its immediate data, expect the unsolicited burst, send R2Ts for
        the rest; READY once nothing more is to come."""
        edtl = task.edtl
        if not pdu.write or not edtl:
            task.state = TaskState.READY
            return
        if edtl > self.max_write_length:
            # refuse before buffering anything: ILLEGAL REQUEST, INVALID FIELD IN CDB
            task.state = TaskState.READY
            task.canned = ScsiResult(Status.CHECK_CONDITION, sense=INVALID_FIELD_IN_CDB)
            return
        imm = len(pdu.data)
        if imm == edtl:
            task.data_view = pdu.data  # everything came with the command: no copy
        elif imm or not pdu.final:
            self._allocate(task)
            if imm:
                task.buffer[:imm] = pdu.data  # type: ignore[index]
        task.received = imm
        if not pdu.final:
            task.unsolicited_end = min(edtl, self.conn.params.first_burst_length)
        task.next_r2t_offset = imm if pdu.final else task.unsolicited_end
        if imm == edtl:
            task.state = TaskState.READY
        elif pdu.final:
            self._start_r2ts(task)

    def on_data_out(self, pdu: p.DataOut) -> None:
        task = self.conn.tasks.get(pdu.itt)
        if task is None or task.state is not TaskState.RECEIVING:
            # an aborted task or a command dropped outside the window: discard silently
            return
        n = len(pdu.data)
        off = pdu.buffer_offset
        if pdu.ttt == RESERVED:
            # unsolicited burst (InitialR2T=No): DataSN from 0, offsets continuing
            if (
                task.unsolicited_end == 0
                or pdu.data_sn != task.unsolicited_data_sn
                or off != task.received
                or off + n > task.unsolicited_end
                or (pdu.final != (off + n == task.unsolicited_end))
            ):
                self.end_task(task, DATA_PHASE_ERROR)  # unsolicited Data-Out out of sequence
                return
            task.unsolicited_data_sn += 1
            self._place(task, off, pdu.data)
            if pdu.final:
                task.unsolicited_end = 0
                if task.received < task.edtl:
                    self._start_r2ts(task)
        else:
            r2t = task.r2ts.get(pdu.ttt)
            end = 0 if r2t is None else r2t.offset + r2t.length
            if (
                r2t is None  # a Target Transfer Tag we did not give out
                or pdu.data_sn != r2t.next_data_sn
                or off != r2t.offset + r2t.received
                or off + n > end
                or (pdu.final != (off + n == end))
            ):
                self.end_task(task, DATA_PHASE_ERROR)  # out of sequence for its R2T
                return
            r2t.next_data_sn += 1
            r2t.received += n
            self._place(task, off, pdu.data)
            if pdu.final:
                del task.r2ts[pdu.ttt]
                del self._owner[pdu.ttt]
                self._send_r2ts(task)
        if task.received >= task.edtl and not task.r2ts and task.unsolicited_end == 0:
            task.state = TaskState.READY
            self.conn.maybe_execute(task)

    def end_task(self, task: Task, sense: bytes) -> None:
        """Answer a task that is still receiving data with CHECK CONDITION and `sense`: ERL 0
        has no recovery R2T, so a Data-Out out of sequence or lost to a digest error ends its
        task, discards its further Data-Out and keeps the connection (RFC 7143 7.3, 7.8)."""
        self._drop_r2ts(task)
        task.unsolicited_end = 0
        task.canned = ScsiResult(Status.CHECK_CONDITION, sense=sense)
        task.state = TaskState.READY
        self.conn.maybe_execute(task)

    def forget(self, task: Task) -> None:
        """The task is gone (aborted, reset): free its buffer, void its R2Ts."""
        self._free(task)
        self._drop_r2ts(task)

    def _drop_r2ts(self, task: Task) -> None:
        for ttt in task.r2ts:
            self._owner.pop(ttt, None)
        task.r2ts.clear()

    def _place(self, task: Task, offset: int, data: Buffer) -> None:
        n = len(data)
        if n:
            assert task.buffer is not None
            task.buffer[offset : offset + n] = data
        task.received += n

    def _allocate(self, task: Task) -> None:
        task.buffer = self.pool.take(task.edtl)
        task.data_view = memoryview(task.buffer)[: task.edtl]
        self._buffered += task.edtl

    def _free(self, task: Task) -> None:
        if task.buffer is not None:
            self._buffered -= task.edtl
            task.buffer = None
            task.data_view = b""  # the pool takes the buffer back once this view is gone
            queue = self._waiting
            while queue and self._buffered + queue[0].edtl <= self.write_budget:
                waiting = queue.popleft()
                if waiting.itt in self.conn.tasks:
                    self._start_r2ts(waiting)

    def _start_r2ts(self, task: Task) -> None:
        """Solicit the rest of the data, once its buffer fits the write budget."""
        if task.buffer is None:
            if self._buffered and self._buffered + task.edtl > self.write_budget:
                self._waiting.append(task)
                return
            self._allocate(task)
        self._send_r2ts(task)

    def _send_r2ts(self, task: Task) -> None:
        conn = self.conn
        s = conn.session
        assert s is not None
        params = conn.params
        while task.next_r2t_offset < task.edtl and len(task.r2ts) < params.max_outstanding_r2t:
            offset = task.next_r2t_offset
            length = min(params.max_burst_length, task.edtl - offset)
            ttt = conn.new_ttt()
            task.r2ts[ttt] = R2TState(offset, length)
            self._owner[ttt] = task
            task.next_r2t_offset = offset + length
            conn.send(
                p.R2T(
                    lun=task.lun_field,
                    itt=task.itt,
                    ttt=ttt,
                    statsn=conn.stat_sn,
                    expcmdsn=s.exp_cmd_sn,
                    maxcmdsn=s.max_cmd_sn,
                    r2t_sn=task.r2t_sn,
                    buffer_offset=offset,
                    desired_data_transfer_length=length,
                )
            )
            task.r2t_sn += 1

    # --- read data and status out ---------------------------------------------------------

    def complete(self, task: Task, result: ScsiResult) -> None:
        """The SCSI layer finished `task`: queue its Data-In and/or SCSI Response, with the
        residuals of RFC 7143 11.4.5, then free its write buffer."""
        conn = self.conn
        s = conn.session
        assert s is not None
        edtl = task.edtl
        data = result.data_in
        tl = result.transfer_length
        if task.read:
            sent = min(len(data), edtl)
            wanted = sent if tl is None else tl
        else:
            sent = 0
            wanted = task.received if tl is None else tl
            if not task.write:
                wanted = 0 if tl is None else tl
        overflow = wanted > edtl
        residual = wanted - edtl if overflow else edtl - (sent if task.read else wanted)
        underflow = not overflow and residual > 0
        if not task.read and not task.write and tl is None:
            underflow, residual = (edtl > 0), edtl
        collapse = sent > 0 and not result.sense
        if sent:
            self._send_data_in(task, data, sent, result, collapse, overflow, underflow, residual)
        if not collapse:
            conn.send(
                p.ScsiResponse(
                    overflow=overflow,
                    underflow=underflow,
                    status=result.status,
                    itt=task.itt,
                    statsn=conn.status_sn(),
                    expcmdsn=s.exp_cmd_sn,
                    maxcmdsn=s.max_cmd_sn,
                    residual_count=residual if (overflow or underflow) else 0,
                    sense=result.sense,
                )
            )
        if task.buffer is not None:
            self._free(task)  # after the response: R2Ts of waiting writes follow it

    def _send_data_in(
        self,
        task: Task,
        data: Buffer,
        length: int,
        result: ScsiResult,
        collapse: bool,
        overflow: bool,
        underflow: bool,
        residual: int,
    ) -> None:
        conn = self.conn
        s = conn.session
        assert s is not None
        seg = conn.max_xmit
        burst = conn.params.max_burst_length
        flagged = overflow or underflow
        # the common small read goes out in one piece: the data object as it is
        one = length == len(data) and length <= seg and length <= burst
        view = data if one else memoryview(data)
        offset = 0
        data_sn = 0
        while offset < length:
            end = length if one else offset + min(seg, length - offset, burst - offset % burst)
            status = collapse and end == length  # the last one carries the status
            conn.send(
                p.DataIn(  # positional, in field order (messages.py): this runs for every read
                    end == length or end % burst == 0,  # final: the end of a sequence
                    False,  # ack
                    status and overflow,
                    status and underflow,
                    status,  # status_present
                    result.status if status else 0,
                    task.lun_field,
                    task.itt,
                    RESERVED,  # ttt
                    conn.status_sn() if status else 0,  # statsn
                    s.exp_cmd_sn,
                    s.max_cmd_sn,
                    data_sn,
                    offset,  # buffer_offset
                    residual if status and flagged else 0,  # residual_count
                    view if one else view[offset:end],
                )
            )
            offset = end
            data_sn += 1
