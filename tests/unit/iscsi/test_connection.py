"""The sans-IO target connection, driven PDU by PDU like the asyncio server drives it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lunastor.iscsi import pdu as p
from lunastor.iscsi.chap import ChapCredentials
from lunastor.iscsi.connection import (
    CloseConnection,
    ExecuteCommand,
    Phase,
    SessionReinstated,
    SessionStarted,
    TargetConnection,
    TaskManagement,
    _header_of,
)
from lunastor.iscsi.errors import DataDigestError, LoginStatus, RejectReason
from lunastor.iscsi.scsi.types import ScsiResult, Status, TmfFunction, TmfResponse
from lunastor.iscsi.session import SessionRegistry, TargetInfo
from lunastor.iscsi.text import encode_text, parse_text

TARGET = "iqn.2024-01.test:disk"
OTHER = "iqn.2024-01.test:other"
INITIATOR = "iqn.2024-01.test:host1"
STRANGER = "iqn.2024-01.test:stranger"
ISID = 0x23D000000001
CMDSN = 100
SENSE = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0])


@dataclass
class StaticPortal:
    """A real, static `Portal`: two targets, one ACL each, optional CHAP."""

    acl: dict[str, set[str]] = field(
        default_factory=lambda: {TARGET: {INITIATOR}, OTHER: {STRANGER}}
    )
    secrets: ChapCredentials | None = None

    def target_exists(self, target: str) -> bool:
        return target in self.acl

    def may_login(self, initiator: str, target: str) -> bool:
        return initiator in self.acl.get(target, set())

    def chap(self, target: str | None) -> ChapCredentials | None:
        return self.secrets

    def discoverable(self, initiator: str, portal: str) -> Sequence[TargetInfo]:
        return [
            TargetInfo(t, (f"{portal},1",))
            for t in sorted(self.acl)
            if self.may_login(initiator, t)
        ]

    def redirect(self, initiator: str, target: str) -> str | None:
        return None


OP_KEYS = [
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("InitialR2T", "No"),
    ("ImmediateData", "Yes"),
    ("MaxBurstLength", "16384"),
    ("FirstBurstLength", "8192"),
    ("MaxRecvDataSegmentLength", "4096"),
    ("MaxOutstandingR2T", "2"),
    ("ErrorRecoveryLevel", "0"),
]


def make_conn(portal: StaticPortal | None = None, **kw: object) -> TargetConnection:
    conn = TargetConnection(
        portal or StaticPortal(), kw.pop("registry", SessionRegistry()), queue_depth=8, **kw
    )  # type: ignore[arg-type]
    conn.local_address = "127.0.0.1:3260"
    return conn


def login_request(keys: list[tuple[str, str]], **kw: object) -> p.LoginRequest:
    fields: dict[str, object] = dict(
        transit=True, csg=1, nsg=3, isid=ISID, itt=1, cmdsn=CMDSN, data=encode_text(keys)
    )
    fields.update(kw)
    return p.LoginRequest(**fields)  # type: ignore[arg-type]


def logged_in(
    initiator: str = INITIATOR, target: str = TARGET, extra: list[tuple[str, str]] | None = None
) -> TargetConnection:
    conn = make_conn()
    keys = [("InitiatorName", initiator), ("TargetName", target), ("SessionType", "Normal")]
    overrides = dict(extra or [])
    op_keys = [(k, overrides.pop(k, v)) for k, v in OP_KEYS] + list(overrides.items())
    conn.receive_pdu(login_request(keys + op_keys))
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.LoginResponse)
    assert (resp.status_class, resp.status_detail, resp.transit, resp.nsg) == (0, 0, True, 3)
    assert conn.phase is Phase.FULL_FEATURE
    assert isinstance(conn.events()[0], SessionStarted)
    return conn


def cmd(
    itt: int,
    cmdsn: int,
    cdb: bytes = b"\x28" + bytes(15),
    *,
    read: bool = False,
    write: bool = False,
    edtl: int = 0,
    data: bytes = b"",
    final: bool = True,
    immediate: bool = False,
) -> p.ScsiCommand:
    return p.ScsiCommand(
        itt=itt,
        cmdsn=cmdsn,
        cdb=cdb,
        read=read,
        write=write,
        expected_data_transfer_length=edtl,
        data=data,
        final=final,
        immediate=immediate,
    )


def executed(conn: TargetConnection) -> list[ExecuteCommand]:
    return [e for e in conn.events() if isinstance(e, ExecuteCommand)]


# --- login ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "status"),
    [
        ([("TargetName", TARGET)], LoginStatus.MISSING_PARAMETER),
        ([("InitiatorName", INITIATOR)], LoginStatus.MISSING_PARAMETER),
        ([("InitiatorName", INITIATOR), ("TargetName", "iqn.x:none")], LoginStatus.NOT_FOUND),
        ([("InitiatorName", STRANGER), ("TargetName", TARGET)], LoginStatus.AUTHORIZATION_FAILURE),
        (
            [("InitiatorName", INITIATOR), ("SessionType", "Bogus")],
            LoginStatus.SESSION_TYPE_NOT_SUPPORTED,
        ),
        (
            [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("MaxBurstLength", "x")],
            LoginStatus.INITIATOR_ERROR,
        ),
    ],
)
def test_login_refused(keys: list[tuple[str, str]], status: LoginStatus) -> None:
    conn = make_conn()
    conn.receive_pdu(login_request(keys))
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.LoginResponse)
    assert (resp.status_class << 8 | resp.status_detail) == status
    assert conn.phase is Phase.CLOSED
    assert any(isinstance(e, CloseConnection) for e in conn.events())


def test_login_negotiates_and_assigns_tsih() -> None:
    conn = make_conn()
    keys = [("InitiatorName", INITIATOR), ("TargetName", TARGET), *OP_KEYS]
    conn.receive_pdu(login_request(keys))
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.LoginResponse)
    answer = dict(parse_text(resp.data))
    assert answer["MaxBurstLength"] == "16384"
    assert answer["InitialR2T"] == "No" and answer["ImmediateData"] == "Yes"
    assert answer["MaxConnections" if "MaxConnections" in answer else "ErrorRecoveryLevel"] in (
        "0",
        "1",
    )
    assert resp.tsih != 0 and resp.expcmdsn == CMDSN
    s = conn.session
    assert s is not None and s.tsih == resp.tsih
    assert conn.max_xmit == 4096  # the initiator's MaxRecvDataSegmentLength
    assert s.params.first_burst_length == 8192 and s.params.max_outstanding_r2t == 2


def test_login_in_two_stages_with_continuation() -> None:
    conn = make_conn()
    first = encode_text([("InitiatorName", INITIATOR), ("TargetName", TARGET)])
    conn.receive_pdu(login_request([], csg=0, nsg=1, transit=False, cont=True, data=first[:10]))
    (ack,) = conn.pdus_to_send()
    assert isinstance(ack, p.LoginResponse) and ack.status_class == 0 and not ack.transit
    rest = first[10:] + encode_text([("AuthMethod", "None")])
    conn.receive_pdu(login_request([], csg=0, nsg=1, transit=True, data=rest))
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.LoginResponse) and resp.transit and resp.nsg == 1
    assert dict(parse_text(resp.data))["AuthMethod"] == "None"
    conn.receive_pdu(login_request(OP_KEYS))
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.LoginResponse) and resp.nsg == 3 and resp.status_class == 0
    assert conn.phase is Phase.FULL_FEATURE


def _chap_login(secret: bytes, mutual: bool) -> tuple[TargetConnection, p.LoginResponse]:
    portal = StaticPortal(
        secrets=ChapCredentials("alice", b"s3cret-s3cret", "tgt", b"t-secret-123")
    )
    conn = make_conn(portal, random_bytes=lambda n: bytes(range(1, n + 1)))
    ident = [("InitiatorName", INITIATOR), ("TargetName", TARGET)]
    conn.receive_pdu(login_request([*ident, ("AuthMethod", "CHAP,None")], csg=0, nsg=1))
    (r1,) = conn.pdus_to_send()
    assert isinstance(r1, p.LoginResponse)
    assert dict(parse_text(r1.data))["AuthMethod"] == "CHAP" and not r1.transit
    conn.receive_pdu(login_request([("CHAP_A", "5")], csg=0, nsg=1, transit=False))
    (r2,) = conn.pdus_to_send()
    assert isinstance(r2, p.LoginResponse)
    got = dict(parse_text(r2.data))
    ident_byte = int(got["CHAP_I"])
    challenge = bytes.fromhex(got["CHAP_C"][2:])
    response = hashlib.md5(bytes([ident_byte]) + secret + challenge).hexdigest()
    keys = [("CHAP_N", "alice"), ("CHAP_R", "0x" + response)]
    if mutual:
        keys += [("CHAP_I", "7"), ("CHAP_C", "0x" + "ab" * 16)]
    conn.receive_pdu(login_request(keys, csg=0, nsg=1))
    (r3,) = conn.pdus_to_send()
    assert isinstance(r3, p.LoginResponse)
    return conn, r3


def test_chap_right_secret_passes_and_mutual_answers() -> None:
    _conn, resp = _chap_login(b"s3cret-s3cret", mutual=True)
    assert resp.status_class == 0 and resp.transit and resp.nsg == 1
    answer = dict(parse_text(resp.data))
    expected = hashlib.md5(bytes([7]) + b"t-secret-123" + bytes.fromhex("ab" * 16)).hexdigest()
    assert answer["CHAP_N"] == "tgt" and answer["CHAP_R"] == "0x" + expected


def test_chap_wrong_secret_fails() -> None:
    conn, resp = _chap_login(b"wrong", mutual=False)
    assert (resp.status_class << 8 | resp.status_detail) == LoginStatus.AUTHENTICATION_FAILURE
    assert conn.phase is Phase.CLOSED


def test_chap_required_but_skipped() -> None:
    portal = StaticPortal(secrets=ChapCredentials("alice", b"s3cret-s3cret"))
    conn = make_conn(portal)
    conn.receive_pdu(login_request([("InitiatorName", INITIATOR), ("TargetName", TARGET)]))
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.LoginResponse)
    assert (resp.status_class << 8 | resp.status_detail) == LoginStatus.AUTHENTICATION_FAILURE


def test_reinstatement_replaces_the_old_session() -> None:
    registry = SessionRegistry()
    first = make_conn(registry=registry)
    keys = [("InitiatorName", INITIATOR), ("TargetName", TARGET), *OP_KEYS]
    first.receive_pdu(login_request(keys))
    old = first.session
    second = make_conn(registry=registry)
    second.receive_pdu(login_request(keys))
    events = second.events()
    assert any(isinstance(e, SessionReinstated) and e.old is old for e in events)
    assert registry.find(INITIATOR, ISID, TARGET) is second.session
    assert old is not None and old.closed


def test_discovery_send_targets_lists_only_permitted_targets() -> None:
    conn = make_conn()
    conn.receive_pdu(login_request([("InitiatorName", INITIATOR), ("SessionType", "Discovery")]))
    conn.pdus_to_send()
    conn.receive_pdu(p.TextRequest(itt=5, cmdsn=CMDSN, data=encode_text([("SendTargets", "All")])))
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.TextResponse) and resp.final
    assert parse_text(resp.data) == [
        ("TargetName", TARGET),
        ("TargetAddress", "127.0.0.1:3260,1"),
    ]
    conn.receive_pdu(cmd(6, CMDSN + 1))  # no SCSI in discovery sessions
    assert isinstance(conn.pdus_to_send()[0], p.Reject)


# --- CmdSN ordering and the window -------------------------------------------------------------


def test_commands_wait_for_the_cmdsn_gap() -> None:
    conn = logged_in()
    conn.receive_pdu(cmd(2, CMDSN + 1, read=True, edtl=512))
    conn.receive_pdu(cmd(3, CMDSN + 2, read=True, edtl=512))
    assert executed(conn) == []
    conn.receive_pdu(cmd(1, CMDSN, read=True, edtl=512))
    assert [e.itt for e in executed(conn)] == [1, 2, 3]
    assert conn.exp_cmd_sn == CMDSN + 3


def test_window_slides_only_when_commands_complete() -> None:
    conn = logged_in()
    assert conn.max_cmd_sn == CMDSN + 7
    for i in range(8):
        conn.receive_pdu(cmd(10 + i, CMDSN + i, read=True, edtl=512))
    conn.receive_pdu(cmd(99, CMDSN + 8, read=True, edtl=512))  # beyond MaxCmdSN: dropped
    assert [e.itt for e in executed(conn)] == list(range(10, 18))
    conn.command_done(10, ScsiResult(data_in=bytes(512), transfer_length=512))
    (data_in,) = conn.pdus_to_send()
    assert isinstance(data_in, p.DataIn) and data_in.maxcmdsn == CMDSN + 8


@pytest.mark.parametrize("cmdsn", [CMDSN - 1, CMDSN - 100, CMDSN + 8, CMDSN + 2**31])
def test_commands_outside_the_window_are_dropped(cmdsn: int) -> None:
    conn = logged_in()
    conn.receive_pdu(cmd(1, cmdsn % 2**32, read=True, edtl=512))
    assert executed(conn) == [] and conn.pdus_to_send() == []


def test_immediate_command_skips_the_queue() -> None:
    conn = logged_in()
    conn.receive_pdu(cmd(2, CMDSN + 1, read=True, edtl=8))
    conn.receive_pdu(cmd(1, CMDSN, cdb=b"\x00" * 16, immediate=True))
    assert [e.itt for e in executed(conn)] == [1]
    assert conn.exp_cmd_sn == CMDSN


# --- write data ------------------------------------------------------------------------------


def test_immediate_data_only() -> None:
    conn = logged_in()
    conn.receive_pdu(cmd(1, CMDSN, write=True, edtl=1024, data=b"x" * 1024))
    (ev,) = executed(conn)
    assert bytes(ev.command.data_out) == b"x" * 1024


def test_immediate_unsolicited_then_r2ts() -> None:
    conn = logged_in()
    edtl = 8192 + 2 * 16384 + 100
    conn.receive_pdu(cmd(1, CMDSN, write=True, edtl=edtl, data=b"a" * 4096, final=False))
    assert conn.pdus_to_send() == []
    conn.receive_pdu(p.DataOut(itt=1, data_sn=0, buffer_offset=4096, data=b"b" * 4096, final=True))
    r2ts = conn.pdus_to_send()
    assert [(r.r2t_sn, r.buffer_offset, r.desired_data_transfer_length) for r in r2ts] == [
        (0, 8192, 16384),
        (1, 24576, 16384),
    ]  # MaxOutstandingR2T=2, each at most MaxBurstLength
    for r in r2ts:
        assert isinstance(r, p.R2T)
        for sn, off in enumerate(range(r.buffer_offset, r.buffer_offset + 16384, 4096)):
            last = off + 4096 == r.buffer_offset + 16384
            conn.receive_pdu(
                p.DataOut(
                    itt=1, ttt=r.ttt, data_sn=sn, buffer_offset=off, data=b"c" * 4096, final=last
                )
            )
    (r3,) = conn.pdus_to_send()
    assert isinstance(r3, p.R2T) and r3.r2t_sn == 2 and r3.desired_data_transfer_length == 100
    assert executed(conn) == []
    conn.receive_pdu(
        p.DataOut(itt=1, ttt=r3.ttt, buffer_offset=r3.buffer_offset, data=b"d" * 100, final=True)
    )
    (ev,) = executed(conn)
    assert bytes(ev.command.data_out) == b"a" * 4096 + b"b" * 4096 + b"c" * 32768 + b"d" * 100


@pytest.mark.parametrize(
    "bad",
    [
        dict(data_sn=1),
        dict(buffer_offset=512),
        dict(final=False),
        dict(ttt=12345),
    ],
)
def test_bad_data_out_ends_the_task_with_check_condition(bad: dict[str, object]) -> None:
    conn = logged_in(extra=[("InitialR2T", "Yes")])
    conn.receive_pdu(cmd(1, CMDSN, write=True, edtl=512, final=True))
    (r2t,) = conn.pdus_to_send()
    assert isinstance(r2t, p.R2T)
    fields: dict[str, object] = dict(itt=1, ttt=r2t.ttt, data=bytes(512), final=True)
    fields.update(bad)
    conn.receive_pdu(p.DataOut(**fields))  # type: ignore[arg-type]
    assert executed(conn) == []
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.ScsiResponse) and resp.status == Status.CHECK_CONDITION
    assert bytes(resp.sense)[2] == 0x0B and bytes(resp.sense)[12] == 0x4B
    assert conn.phase is Phase.FULL_FEATURE


def test_write_beyond_the_cap_is_refused_without_buffering() -> None:
    conn = logged_in()
    conn.transfer.max_write_length = 4096
    conn.receive_pdu(cmd(1, CMDSN, write=True, edtl=8192, final=True))
    assert executed(conn) == []
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.ScsiResponse) and resp.status == Status.CHECK_CONDITION


# --- Data-In and responses --------------------------------------------------------------------


def test_data_in_is_split_and_status_collapsed() -> None:
    conn = logged_in()
    conn.receive_pdu(cmd(1, CMDSN, read=True, edtl=10000))
    executed(conn)
    data = bytes(range(256)) * 40  # 10240 bytes: more than EDTL
    conn.command_done(1, ScsiResult(data_in=data, transfer_length=10240))
    pdus = conn.pdus_to_send()
    assert all(isinstance(x, p.DataIn) for x in pdus)
    assert [(x.buffer_offset, len(x.data), x.data_sn) for x in pdus] == [
        (0, 4096, 0),
        (4096, 4096, 1),
        (8192, 1808, 2),
    ]
    last = pdus[-1]
    assert isinstance(last, p.DataIn)
    assert last.status_present and last.final and last.overflow and last.residual_count == 240
    assert b"".join(bytes(x.data) for x in pdus) == data[:10000]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("read", "write", "edtl", "result", "flags"),
    [
        (True, False, 4096, ScsiResult(data_in=bytes(512), transfer_length=512), ("U", 3584)),
        (False, True, 512, ScsiResult(transfer_length=1024), ("O", 512)),
        (False, True, 1024, ScsiResult(transfer_length=512), ("U", 512)),
        (False, False, 0, ScsiResult(), ("", 0)),
        (False, False, 512, ScsiResult(), ("U", 512)),
        (True, False, 36, ScsiResult(data_in=bytes(0), transfer_length=0), ("U", 36)),
    ],
)
def test_residuals(
    read: bool, write: bool, edtl: int, result: ScsiResult, flags: tuple[str, int]
) -> None:
    conn = logged_in(extra=[("ImmediateData", "Yes")])
    data = bytes(edtl) if write else b""
    conn.receive_pdu(cmd(1, CMDSN, read=read, write=write, edtl=edtl, data=data))
    executed(conn)
    conn.command_done(1, result)
    last = conn.pdus_to_send()[-1]
    assert isinstance(last, p.DataIn | p.ScsiResponse)
    got = ("O" if last.overflow else "") + ("U" if last.underflow else "")
    assert (got, last.residual_count) == flags


def test_sense_goes_in_a_scsi_response_after_the_data() -> None:
    conn = logged_in()
    conn.receive_pdu(cmd(1, CMDSN, read=True, edtl=512))
    executed(conn)
    conn.command_done(1, ScsiResult(Status.CHECK_CONDITION, bytes(512), SENSE, 512))
    data_in, resp = conn.pdus_to_send()
    assert isinstance(data_in, p.DataIn) and not data_in.status_present
    assert isinstance(resp, p.ScsiResponse) and bytes(resp.sense) == SENSE
    assert resp.statsn + 1 == conn.stat_sn


# --- NOP, text, logout, SNACK -------------------------------------------------------------------


def test_nop_out_is_echoed() -> None:
    conn = logged_in()
    conn.receive_pdu(p.NopOut(itt=9, cmdsn=CMDSN, immediate=True, data=b"ping"))
    (nop,) = conn.pdus_to_send()
    assert isinstance(nop, p.NopIn) and nop.itt == 9 and bytes(nop.data) == b"ping"
    assert nop.ttt == p.RESERVED_TAG


def test_target_pings_an_idle_initiator_and_gives_up() -> None:
    conn = logged_in()
    conn.tick(5.0)
    assert conn.pdus_to_send() == []
    conn.tick(10.0)
    (ping,) = conn.pdus_to_send()
    assert isinstance(ping, p.NopIn) and ping.ttt != p.RESERVED_TAG and ping.itt == p.RESERVED_TAG
    conn.receive_pdu(p.NopOut(itt=p.RESERVED_TAG, ttt=ping.ttt, immediate=True, cmdsn=CMDSN))
    conn.last_rx = 10.0
    conn.tick(20.0)
    (ping2,) = conn.pdus_to_send()
    assert isinstance(ping2, p.NopIn)
    conn.tick(41.0)
    assert any(isinstance(e, CloseConnection) for e in conn.events())


@pytest.mark.parametrize(
    ("reason", "cid", "code", "closes"),
    [
        (p.LogoutReason.CLOSE_SESSION, 0, p.LogoutResponseCode.CLOSED_SUCCESSFULLY, True),
        (p.LogoutReason.CLOSE_CONNECTION, 0, p.LogoutResponseCode.CLOSED_SUCCESSFULLY, True),
        (p.LogoutReason.CLOSE_CONNECTION, 5, p.LogoutResponseCode.CID_NOT_FOUND, False),
        (
            p.LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY,
            0,
            p.LogoutResponseCode.RECOVERY_NOT_SUPPORTED,
            False,
        ),
    ],
)
def test_logout(reason: int, cid: int, code: int, closes: bool) -> None:
    conn = logged_in()
    conn.receive_pdu(p.LogoutRequest(itt=4, reason=reason, cid=cid, cmdsn=CMDSN, immediate=True))
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.LogoutResponse) and resp.response == code
    assert any(isinstance(e, CloseConnection) for e in conn.events()) is closes


def test_snack_is_rejected_at_erl0() -> None:
    conn = logged_in()
    conn.receive_pdu(p.SnackRequest(itt=1))
    (rej,) = conn.pdus_to_send()
    assert isinstance(rej, p.Reject) and rej.reason == RejectReason.PROTOCOL_ERROR
    assert len(rej.header) == 48 and rej.header[0] & 0x3F == p.Opcode.SNACK_REQUEST


# --- task management --------------------------------------------------------------------------


def tmf(
    function: int, itt: int = 50, ref: int = p.RESERVED_TAG, ref_cmdsn: int = 0, cmdsn: int = CMDSN
) -> p.TaskManagementRequest:
    return p.TaskManagementRequest(
        function=function,
        itt=itt,
        referenced_task_tag=ref,
        ref_cmdsn=ref_cmdsn,
        cmdsn=cmdsn,
        immediate=True,
    )


def test_abort_task_of_a_running_command() -> None:
    conn = logged_in()
    conn.receive_pdu(cmd(1, CMDSN, read=True, edtl=512))
    executed(conn)
    conn.receive_pdu(tmf(TmfFunction.ABORT_TASK, ref=1, ref_cmdsn=CMDSN, cmdsn=CMDSN + 1))
    (ev,) = [e for e in conn.events() if isinstance(e, TaskManagement)]
    assert ev.abort == [1] and ev.response is TmfResponse.COMPLETE
    conn.tmf_done(ev.itt, ev.response)
    conn.command_done(1, ScsiResult(data_in=bytes(512), transfer_length=512))  # too late
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.TaskManagementResponse) and resp.response == 0


def test_abort_task_before_the_command_arrives() -> None:
    conn = logged_in()
    conn.receive_pdu(tmf(TmfFunction.ABORT_TASK, ref=7, ref_cmdsn=CMDSN, cmdsn=CMDSN + 1))
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.TaskManagementResponse)
    assert resp.response == TmfResponse.COMPLETE
    conn.receive_pdu(cmd(7, CMDSN, read=True, edtl=512))  # arrives late: never executed
    assert executed(conn) == []
    conn.receive_pdu(cmd(8, CMDSN + 1, read=True, edtl=512))
    assert [e.itt for e in executed(conn)] == [8]


def test_abort_task_unknown_outside_window() -> None:
    conn = logged_in()
    conn.receive_pdu(tmf(TmfFunction.ABORT_TASK, ref=7, ref_cmdsn=CMDSN + 50))
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.TaskManagementResponse)
    assert resp.response == TmfResponse.TASK_DOES_NOT_EXIST


@pytest.mark.parametrize(
    ("function", "others"),
    [
        (TmfFunction.ABORT_TASK_SET, False),
        (TmfFunction.CLEAR_TASK_SET, False),
        (TmfFunction.LOGICAL_UNIT_RESET, True),
        (TmfFunction.TARGET_WARM_RESET, True),
    ],
)
def test_task_set_functions_abort_everything_on_the_lun(function: int, others: bool) -> None:
    conn = logged_in()
    conn.receive_pdu(cmd(1, CMDSN, read=True, edtl=512))
    conn.receive_pdu(cmd(2, CMDSN + 2, read=True, edtl=512))  # waiting for CmdSN+1
    executed(conn)
    conn.receive_pdu(tmf(function))
    (ev,) = [e for e in conn.events() if isinstance(e, TaskManagement)]
    assert ev.abort == [1] and ev.others is others and ev.response is None
    conn.tmf_done(ev.itt, TmfResponse.COMPLETE)
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.TaskManagementResponse)
    conn.receive_pdu(cmd(3, CMDSN + 1, read=True, edtl=512))
    assert [e.itt for e in executed(conn)] == [3]  # the aborted CmdSN+2 stays dead


def test_target_cold_reset_closes_the_connection_after_answering() -> None:
    conn = logged_in()
    conn.receive_pdu(tmf(TmfFunction.TARGET_COLD_RESET))
    (ev,) = [e for e in conn.events() if isinstance(e, TaskManagement)]
    assert ev.others
    conn.tmf_done(ev.itt, TmfResponse.COMPLETE)
    assert isinstance(conn.pdus_to_send()[0], p.TaskManagementResponse)
    assert any(isinstance(e, CloseConnection) for e in conn.events())


@pytest.mark.parametrize(("function", "code"), [(8, 4), (20, 255)])
def test_unsupported_tmf(function: int, code: int) -> None:
    conn = logged_in()
    conn.receive_pdu(tmf(function))
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.TaskManagementResponse) and resp.response == code


# --- robustness -------------------------------------------------------------------------------

_tags = st.sampled_from([0, 1, 2, p.RESERVED_TAG])
_sns = st.integers(CMDSN - 2, CMDSN + 10) | st.integers(0, 2**32 - 1)
_lens = st.sampled_from([0, 1, 512, 4096, 9000])

_pdus = st.one_of(
    st.builds(
        p.ScsiCommand,
        itt=_tags,
        cmdsn=_sns,
        read=st.booleans(),
        write=st.booleans(),
        final=st.booleans(),
        immediate=st.booleans(),
        expected_data_transfer_length=_lens,
        data=_lens.map(bytes),
        lun=st.sampled_from([0, 1 << 48, 0xFFFF << 48]),
    ),
    st.builds(
        p.DataOut,
        itt=_tags,
        ttt=st.integers(0, 3) | st.just(p.RESERVED_TAG),
        data_sn=st.integers(0, 3),
        buffer_offset=st.sampled_from([0, 512, 4096, 8192]),
        final=st.booleans(),
        data=_lens.map(bytes),
    ),
    st.builds(p.NopOut, itt=_tags, ttt=_tags, cmdsn=_sns, immediate=st.booleans()),
    st.builds(
        p.TaskManagementRequest,
        function=st.integers(0, 10),
        itt=_tags,
        referenced_task_tag=_tags,
        cmdsn=_sns,
        ref_cmdsn=_sns,
        immediate=st.booleans(),
    ),
    st.builds(
        p.TextRequest,
        itt=_tags,
        ttt=_tags,
        cmdsn=_sns,
        immediate=st.booleans(),
        data=st.sampled_from([b"", b"SendTargets=All\0", b"Foo=bar\0", b"bad"]),
    ),
    st.builds(p.LogoutRequest, reason=st.integers(0, 3), cmdsn=_sns, immediate=st.booleans()),
    st.builds(p.SnackRequest, itt=_tags),
    st.builds(p.LoginRequest, data=st.just(b"InitiatorName=x\0")),
)
_host = st.sampled_from(["done", "tmf", "tick", "none"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_pdus, _host), max_size=40))
def test_random_pdu_sequences_never_break_the_machine(
    steps: list[tuple[p.Pdu, str]],
) -> None:
    conn = logged_in()
    running: list[int] = []
    tmfs: list[TaskManagement] = []
    now = 0.0
    for pdu, host in steps:
        conn.receive_pdu(pdu)  # the claim: never raises, whatever arrives
        for ev in conn.events():
            if isinstance(ev, ExecuteCommand):
                running.append(ev.itt)
            elif isinstance(ev, TaskManagement):
                tmfs.append(ev)
        if host == "done" and running:
            conn.command_done(running.pop(0), ScsiResult(data_in=bytes(100), transfer_length=100))
        elif host == "tmf" and tmfs:
            ev = tmfs.pop(0)
            conn.tmf_done(ev.itt, ev.response or TmfResponse.COMPLETE)
        elif host == "tick":
            now += 15
            conn.tick(now)
        for out in conn.data_to_send():
            assert len(out) < 1 << 20
        s = conn.session
        assert s is not None
        # never more than queue_depth non-immediate commands accepted but unanswered
        window = (s.max_cmd_sn - s.exp_cmd_sn + 1) % 2**32
        assert 0 <= window <= 8


def test_digests_start_after_the_final_login_response() -> None:
    conn = make_conn()
    keys = [("InitiatorName", INITIATOR), ("TargetName", TARGET)]
    ops = [(k, "CRC32C" if k.endswith("Digest") else v) for k, v in OP_KEYS]
    conn.receive_pdu(login_request(keys + ops))
    header, *_ = conn.data_to_send()
    assert len(header) == 48  # the Login Response itself goes without digests
    assert (conn.header_digest, conn.data_digest) == (True, True)
    conn.receive_pdu(p.NopOut(itt=3, cmdsn=CMDSN, immediate=True))
    (header,) = conn.data_to_send()
    assert len(header) == 52


@dataclass
class RedirectingPortal(StaticPortal):
    def redirect(self, initiator: str, target: str) -> str | None:
        return "10.0.0.7:3260,1"


def test_login_redirect_for_the_redirector() -> None:
    conn = make_conn(RedirectingPortal())
    conn.receive_pdu(login_request([("InitiatorName", INITIATOR), ("TargetName", TARGET)]))
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.LoginResponse)
    assert (resp.status_class << 8 | resp.status_detail) == LoginStatus.TARGET_MOVED_TEMPORARILY
    assert dict(parse_text(resp.data))["TargetAddress"] == "10.0.0.7:3260,1"
    assert conn.phase is Phase.CLOSED


def test_long_send_targets_answer_is_continued() -> None:
    many = {f"iqn.2024-01.test:t{i:03d}": {INITIATOR} for i in range(200)}
    conn = make_conn(StaticPortal(acl=many))
    conn.receive_pdu(login_request([("InitiatorName", INITIATOR), ("SessionType", "Discovery")]))
    conn.pdus_to_send()
    conn.max_xmit = 1024
    conn.receive_pdu(p.TextRequest(itt=5, cmdsn=CMDSN, data=encode_text([("SendTargets", "All")])))
    text = b""
    for turn in range(100):
        (resp,) = conn.pdus_to_send()
        assert isinstance(resp, p.TextResponse) and len(resp.data) <= 1024
        text += bytes(resp.data)
        if resp.final:
            break
        assert resp.cont and resp.ttt != p.RESERVED_TAG
        conn.receive_pdu(p.TextRequest(itt=5, ttt=resp.ttt, cmdsn=CMDSN + 1 + turn))
    names = [v for k, v in parse_text(text) if k == "TargetName"]
    assert names == sorted(many)


def test_r2ts_wait_for_the_write_budget() -> None:
    conn = logged_in(extra=[("InitialR2T", "Yes")])
    conn.transfer.write_budget = 16384
    conn.receive_pdu(cmd(1, CMDSN, write=True, edtl=16384))
    conn.receive_pdu(cmd(2, CMDSN + 1, write=True, edtl=16384))
    r2ts = conn.pdus_to_send()
    assert [r.itt for r in r2ts if isinstance(r, p.R2T)] == [1]  # task 2 waits for buffers
    r2t = r2ts[0]
    assert isinstance(r2t, p.R2T)
    for sn, off in enumerate(range(0, 16384, 4096)):
        conn.receive_pdu(
            p.DataOut(
                itt=1,
                ttt=r2t.ttt,
                data_sn=sn,
                buffer_offset=off,
                data=bytes(4096),
                final=off == 12288,
            )
        )
    (ev,) = executed(conn)
    assert conn.pdus_to_send() == []
    conn.command_done(ev.itt, ScsiResult(transfer_length=16384))
    out = conn.pdus_to_send()
    assert isinstance(out[0], p.ScsiResponse)
    assert [r.itt for r in out if isinstance(r, p.R2T)] == [2]  # now its turn


def test_data_out_digest_error_ends_the_task() -> None:
    conn = logged_in(extra=[("InitialR2T", "Yes")])
    conn.receive_pdu(cmd(1, CMDSN, write=True, edtl=512))
    (r2t,) = conn.pdus_to_send()
    assert isinstance(r2t, p.R2T)
    bad = p.DataOut(itt=1, ttt=r2t.ttt, data=bytes(512), final=True)
    conn.receive_error(DataDigestError("data digest mismatch", header=_header_of(bad)))
    rej, resp = conn.pdus_to_send()
    assert isinstance(rej, p.Reject) and rej.reason == RejectReason.DATA_DIGEST_ERROR
    assert isinstance(resp, p.ScsiResponse) and resp.status == Status.CHECK_CONDITION
    assert bytes(resp.sense)[12:14] == b"\x47\x05"
    assert executed(conn) == [] and conn.phase is Phase.FULL_FEATURE


def test_continued_text_request() -> None:
    conn = make_conn()
    conn.receive_pdu(login_request([("InitiatorName", INITIATOR), ("SessionType", "Discovery")]))
    conn.pdus_to_send()
    text = encode_text([("SendTargets", "All")])
    conn.receive_pdu(p.TextRequest(itt=5, cmdsn=CMDSN, cont=True, final=False, data=text[:7]))
    (ack,) = conn.pdus_to_send()
    assert isinstance(ack, p.TextResponse) and not ack.final and not ack.data
    assert ack.ttt != p.RESERVED_TAG
    conn.receive_pdu(p.TextRequest(itt=5, ttt=ack.ttt, cmdsn=CMDSN + 1, data=text[7:]))
    (resp,) = conn.pdus_to_send()
    assert isinstance(resp, p.TextResponse) and resp.final
    assert ("TargetName", TARGET) in parse_text(resp.data)


def test_target_requests_logout() -> None:
    conn = logged_in()
    statsn = conn.stat_sn
    conn.request_logout(within=5)
    (msg,) = conn.pdus_to_send()
    assert isinstance(msg, p.AsyncMessage)
    assert msg.async_event == p.AsyncEvent.LOGOUT_REQUESTED and msg.parameter3 == 5
    assert msg.statsn == statsn and conn.stat_sn == statsn + 1
