"""Task management of one target connection, sans-IO (RFC 7143 11.5 and 11.6, SAM-5 7).

A Task Management Function Request is ordered by CmdSN like any non-immediate PDU. ABORT
TASK of a task we hold is decided here; of a command that has not arrived yet, its CmdSN is
"considered received" so that it never runs (11.5.1 b). The set-wide functions (ABORT / CLEAR
TASK SET, LOGICAL UNIT RESET, CLEAR ACA, target resets) drop the connection's matching tasks
at once (no response will be sent for them) and hand the host a `TaskManagement` event: it
cancels what is running, applies the function to the other sessions and to the SCSI layer,
then calls `tmf_done`.

`TaskManagementFunctions` is one part of `TargetConnection` (connection.py), which owns the
tasks and the session's sequence numbers; docs/iscsi-session.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lunastor.iscsi import pdu as p
from lunastor.iscsi.scsi.types import Nexus, TmfFunction, TmfResponse
from lunastor.iscsi.session import SessionType, sn_add, sn_le, sn_lt
from lunastor.iscsi.transfer import Task, TaskState

if TYPE_CHECKING:
    from lunastor.iscsi.connection import TargetConnection


@dataclass(slots=True)
class TaskManagement:
    """Cancel the executions of `abort` (ITTs of this connection) and wait for them; for
    `others` (LU/target resets, CLEAR TASK SET), abort the matching tasks of the other sessions
    of the target (`TargetConnection.abort_tasks`); then, unless `response` is already set,
    call the SCSI layer's `task_management(nexus, function, lun)`; finally `tmf_done(itt, r)`.
    """

    itt: int
    nexus: Nexus
    function: TmfFunction
    lun: int
    abort: list[int]
    others: bool
    response: TmfResponse | None = None  # decided here (e.g. ABORT TASK): skip the SCSI layer


_TMF_NAMES = {f.value for f in TmfFunction}
_TASK_SET = (
    TmfFunction.ABORT_TASK_SET,
    TmfFunction.CLEAR_TASK_SET,
    TmfFunction.LOGICAL_UNIT_RESET,
    TmfFunction.CLEAR_ACA,
)


class TaskManagementFunctions:
    """The requests of one connection, from arrival to their response."""

    def __init__(self, conn: TargetConnection) -> None:
        self.conn = conn
        self._pending: dict[int, tuple[TaskManagement, bool]] = {}  # ITT -> (request, immediate)

    def on_request(self, pdu: p.TaskManagementRequest) -> None:
        conn = self.conn
        s = conn.session
        assert s is not None
        if s.session_type is SessionType.DISCOVERY:
            conn.protocol_error(pdu, "task management in a discovery session")
            return
        if conn.ordered(pdu):
            self.answer(pdu)
            conn.drain()

    def answer(self, pdu: p.TaskManagementRequest) -> None:
        """The request's CmdSN turn has come (or it is immediate)."""
        conn = self.conn
        s = conn.session
        assert s is not None
        fn = pdu.function
        lun = p.lun_number(pdu.lun)
        lun_n = 0xFFFF if lun is None else lun
        if fn not in _TMF_NAMES:
            self._answer_now(pdu, TmfResponse.REJECTED)
            return
        function = TmfFunction(fn)
        if function is TmfFunction.TASK_REASSIGN:
            self._answer_now(pdu, TmfResponse.REASSIGNMENT_NOT_SUPPORTED)
            return
        if function is TmfFunction.ABORT_TASK:
            task = conn.tasks.get(pdu.referenced_task_tag)
            if task is None or task.lun_field != pdu.lun:
                self._abort_absent(pdu)
                return
            req = TaskManagement(
                pdu.itt, s.nexus, function, lun_n, self.drop([task]), False, TmfResponse.COMPLETE
            )
        elif function in _TASK_SET:
            doomed = [] if function is TmfFunction.CLEAR_ACA else self._tasks_on(lun_n)
            req = TaskManagement(
                pdu.itt,
                s.nexus,
                function,
                lun_n,
                self.drop(doomed),
                # TST=001b: each nexus has its own task set, so only an LU reset reaches
                # the other sessions' tasks
                function is TmfFunction.LOGICAL_UNIT_RESET,
            )
        else:  # target warm / cold reset
            all_tasks = list(conn.tasks.values())
            req = TaskManagement(pdu.itt, s.nexus, function, lun_n, self.drop(all_tasks), True)
        self._pending[pdu.itt] = (req, pdu.immediate)
        conn.add_event(req)

    def _abort_absent(self, pdu: p.TaskManagementRequest) -> None:
        """ABORT TASK of a task this connection does not hold."""
        conn = self.conn
        s = conn.session
        assert s is not None
        ref = pdu.ref_cmdsn
        in_window = sn_le(s.exp_cmd_sn, ref) and sn_le(ref, s.max_cmd_sn)
        before_tmf = pdu.immediate or sn_lt(ref, pdu.cmdsn)
        if in_window and before_tmf and ref not in conn.held:
            # RFC 7143 11.5.1 b): the command has not arrived; consider its CmdSN received,
            # so that it is never executed, and report it aborted
            if ref == s.exp_cmd_sn:
                s.exp_cmd_sn = sn_add(ref, 1)
                conn.release_slot()
            else:
                conn.tombstone(ref)
            self._answer_now(pdu, TmfResponse.COMPLETE)
            conn.drain()
        else:
            self._answer_now(pdu, TmfResponse.TASK_DOES_NOT_EXIST)

    def _tasks_on(self, lun: int) -> list[Task]:
        return [t for t in self.conn.tasks.values() if t.lun == lun]

    def drop(self, tasks: list[Task]) -> list[int]:
        """Forget `tasks` (no responses will be sent); return those the host must cancel."""
        conn = self.conn
        running = []
        for task in tasks:
            conn.tasks.pop(task.itt, None)
            conn.transfer.forget(task)
            if task.state is TaskState.EXECUTING:
                running.append(task.itt)
            if not task.delivered:
                # still waiting for its CmdSN: keep the slot, but as a tombstone
                conn.tombstone(task.cmd_sn)
            elif not task.immediate:
                conn.release_slot()
        return running

    def abort_tasks(self, lun: int | None) -> list[int]:
        """For another session's LU/target reset: drop our tasks on `lun` (None: all)."""
        tasks = list(self.conn.tasks.values()) if lun is None else self._tasks_on(lun)
        return self.drop(tasks)

    def done(self, itt: int, response: TmfResponse) -> None:
        """The host finished the function of request `itt`: send its response."""
        req, immediate = self._pending.pop(itt, (None, True))
        conn = self.conn
        if req is None or not conn.in_full_feature_phase:
            return
        if not immediate:
            conn.release_slot()
        self._send_response(itt, response)
        if req.function is TmfFunction.TARGET_COLD_RESET and response is TmfResponse.COMPLETE:
            conn.close("target cold reset")

    def _answer_now(self, pdu: p.TaskManagementRequest, response: TmfResponse) -> None:
        self.conn.done_ordered(pdu)
        self._send_response(pdu.itt, response)

    def _send_response(self, itt: int, response: TmfResponse) -> None:
        conn = self.conn
        s = conn.session
        assert s is not None
        conn.send(
            p.TaskManagementResponse(
                response=response,
                itt=itt,
                statsn=conn.status_sn(),
                expcmdsn=s.exp_cmd_sn,
                maxcmdsn=s.max_cmd_sn,
            )
        )
