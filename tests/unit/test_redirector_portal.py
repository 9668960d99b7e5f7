"""The redirector's portal: decisions as a table, then over a socket with raw PDUs and iscsi-ls."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lunastor.common.exports import ExportIndex
from lunastor.common.records import (
    ChapRecord,
    ChunkAdminRecord,
    ChunkServerStatus,
    Keys,
    LunRecord,
    target_iqn,
)
from lunastor.common.sealing import Sealer
from lunastor.iscsi import pdu as p
from lunastor.iscsi.errors import LoginStatus
from lunastor.iscsi.text import encode_text, parse_text
from lunastor.redirector.choose import ServerChoice, choose_chunk_server
from lunastor.redirector.portal import LOGIN_FAILURES, REDIRECTS, PortalServer, RedirectPolicy
from lunastor.redirector.servers import ServerTable
from tests.support.procs import async_wait_for

SEALER = Sealer("portal-test-sealing-key")
A, B, C = (f"iqn.2026-11.org.example:{n}" for n in ("a", "b", "c"))
T0, T1, T5 = target_iqn(0), target_iqn(1), target_iqn(5)
VIP = "10.0.0.100:3260"


def live(server_id: str, portal: str, state: str = "up") -> tuple[str, bytes]:
    record = ChunkServerStatus(id=server_id, portal=portal, state=state)
    return Keys.live_chunk(server_id), record.to_json()


def drain(server_id: str, state: str = "draining") -> tuple[str, bytes]:
    return Keys.chunk_admin(server_id), ChunkAdminRecord(id=server_id, state=state).to_json()


LUNS = [
    (Keys.lun(0, 1), LunRecord(volume_id="v1", initiators=[A, B]).to_json()),
    (Keys.lun(1, 1), LunRecord(volume_id="v2", initiators=[B]).to_json()),
    (Keys.lun(5, 3), LunRecord(volume_id="v3", initiators=[]).to_json()),
]
THREE = [live("c1", "10.0.0.1:3260"), live("c2", "10.0.0.2:3260"), live("c3", "10.0.0.3:3261")]


Records = Sequence[tuple[str, bytes]]


def policy(servers: Records, admin: Records = (), **kw: bytes) -> RedirectPolicy:
    index = ExportIndex.build(LUNS, discovery_chap=kw.get("chap"), sealer=SEALER)
    table = ServerTable.build(servers, admin)
    return RedirectPolicy(lambda: index, lambda: table, VIP)


def expected_server(initiator: str, target: str, servers: Records, admin: Records = ()) -> str:
    table = ServerTable.build(servers, admin)
    chosen = choose_chunk_server(initiator, target, table.choices)
    assert chosen is not None
    return f"{table.portals[chosen]},1"


# --- the server table ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("live_records", "admin", "up", "draining"),
    [
        (THREE, [], ["c1", "c2", "c3"], []),
        (THREE, [drain("c2")], ["c1", "c3"], ["c2"]),
        (THREE, [drain("c2", "drained"), drain("c9")], ["c1", "c3"], ["c2"]),
        ([*THREE[:2], live("c3", "10.0.0.3:3260", "draining")], [], ["c1", "c2"], ["c3"]),
        ([live("c1", ""), (Keys.live_chunk("c2"), b"{}"), THREE[2]], [], ["c3"], []),
        ([], [drain("c1")], [], []),
    ],
)
def test_server_table(
    live_records: list[tuple[str, bytes]],
    admin: list[tuple[str, bytes]],
    up: list[str],
    draining: list[str],
) -> None:
    table = ServerTable.build(live_records, admin)
    assert table.up == up
    assert [c.id for c in table.choices if c.state == "draining"] == draining


def test_server_table_names_bad_records() -> None:
    table = ServerTable.build([(Keys.live_chunk("x"), b"[")], [(Keys.chunk_admin("y"), b"{}")])
    assert table.choices == () and len(table.bad_records) == 2


# --- decisions ----------------------------------------------------------------------------

DECISIONS = [
    # (initiator, target, live servers, admin records, status)
    (A, T0, THREE, [], LoginStatus.TARGET_MOVED_TEMPORARILY),
    (B, T1, THREE, [], LoginStatus.TARGET_MOVED_TEMPORARILY),
    (A, T1, THREE, [], LoginStatus.AUTHORIZATION_FAILURE),  # T1 exists, not published to A
    (A, T5, THREE, [], LoginStatus.AUTHORIZATION_FAILURE),  # published to nobody
    (C, T0, THREE, [], LoginStatus.AUTHORIZATION_FAILURE),
    (A, target_iqn(9), THREE, [], LoginStatus.NOT_FOUND),  # no LUN at all
    (A, "iqn.2000-01.com.example:other", THREE, [], LoginStatus.NOT_FOUND),
    (A, T0, [], [], LoginStatus.SERVICE_UNAVAILABLE),
    (A, T0, THREE, [drain("c1"), drain("c2"), drain("c3")], LoginStatus.SERVICE_UNAVAILABLE),
]


@pytest.mark.parametrize(("initiator", "target", "servers", "admin", "status"), DECISIONS)
def test_login_decisions(
    initiator: str,
    target: str,
    servers: list[tuple[str, bytes]],
    admin: list[tuple[str, bytes]],
    status: LoginStatus,
) -> None:
    decision = policy(servers, admin).authorize(initiator, target)
    assert decision.status is status
    if status is LoginStatus.TARGET_MOVED_TEMPORARILY:
        assert decision.target_address == expected_server(initiator, target, servers, admin)
    else:
        assert decision.target_address is None


def test_a_drain_moves_only_the_drained_servers_initiators() -> None:
    initiators = [f"iqn.2026-11.org.example:n{i}" for i in range(60)]
    before = {i: policy(THREE).redirect(i, T0) for i in initiators}
    after = {i: policy(THREE, [drain("c2")]).redirect(i, T0) for i in initiators}
    moved = {i for i in initiators if before[i] != after[i]}
    assert moved == {i for i in initiators if before[i] == "10.0.0.2:3260,1"}
    assert moved and "10.0.0.2:3260,1" not in after.values()


def test_discoverable_lists_only_visible_targets_at_the_vip() -> None:
    pol = policy(THREE)
    assert [(t.name, t.addresses) for t in pol.discoverable(B, "ignored:1")] == [
        (T0, (f"{VIP},1",)),
        (T1, (f"{VIP},1",)),
    ]
    assert pol.discoverable(C, "x") == []


def test_discovery_chap_that_cannot_be_opened_refuses_discovery() -> None:
    sealed_elsewhere = ChapRecord(user="u", secret=Sealer("x" * 16).seal("s" * 12)).to_json()
    assert policy(THREE, chap=sealed_elsewhere).authorize_discovery(A).status is (
        LoginStatus.TARGET_ERROR
    )
    good = ChapRecord(user="u", secret=SEALER.seal("s" * 12)).to_json()
    chap = policy(THREE, chap=good).authorize_discovery(A).chap
    assert chap is not None and chap.secret == b"s" * 12


# --- over a socket ----------------------------------------------------------------------------


async def start(pol: RedirectPolicy) -> tuple[PortalServer, int]:
    server = PortalServer(pol)
    await server.start("127.0.0.1", 0)
    return server, server.addresses[0][1]


async def login_once(port: int, keys: list[tuple[str, str]]) -> p.LoginResponse:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = p.LoginRequest(
            transit=True, csg=0, nsg=1, isid=0x23D000000001, itt=7, cmdsn=1, data=encode_text(keys)
        )
        writer.writelines(p.encode_pdu(request, False, False))
        pdus = p.PduReader(sender="target")
        while True:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "connection closed without a Login Response"
            pdus.feed(data)
            pdu = pdus.next_pdu()
            if pdu is not None:
                assert isinstance(pdu, p.LoginResponse)
                # the connection is closed after a failed or redirected login
                assert await asyncio.wait_for(reader.read(1), 5) == b""
                return pdu
    finally:
        writer.close()


def normal(initiator: str, target: str) -> list[tuple[str, str]]:
    return [("InitiatorName", initiator), ("TargetName", target), ("SessionType", "Normal")]


WIRE = [
    (A, T0, 0x0101),
    (A, T1, 0x0202),
    (A, target_iqn(9), 0x0203),
]


async def test_logins_over_the_wire() -> None:
    server, port = await start(policy(THREE))
    try:
        for initiator, target, status in WIRE:
            failures = LOGIN_FAILURES.labels(f"0x{status:04x}")._value.get()
            resp = await login_once(port, normal(initiator, target))
            assert (resp.status_class << 8 | resp.status_detail) == status
            keys = dict(parse_text(bytes(resp.data)))
            if status == 0x0101:
                assert keys == {"TargetAddress": expected_server(initiator, target, THREE)}
            else:
                assert "TargetAddress" not in keys
                assert LOGIN_FAILURES.labels(f"0x{status:04x}")._value.get() == failures + 1
        chosen = expected_server(A, T0, THREE)
        server_id = {"10.0.0.1": "c1", "10.0.0.2": "c2", "10.0.0.3": "c3"}[chosen.split(":")[0]]
        assert REDIRECTS.labels(server_id)._value.get() >= 1
        resp = await login_once(port, [("InitiatorName", A)])  # no TargetName
        assert (resp.status_class, resp.status_detail) == (2, 7)
    finally:
        await server.close()
    empty, port = await start(policy([]))
    try:
        resp = await login_once(port, normal(A, T0))
        assert (resp.status_class, resp.status_detail) == (3, 1)
    finally:
        await empty.close()


ISCSI_LS = shutil.which("iscsi-ls")


async def iscsi_ls(
    port: int, initiator: str, chap: str = "", query: str = ""
) -> subprocess.CompletedProcess[str]:
    url = f"iscsi://{chap}127.0.0.1:{port}{query}"
    proc = await asyncio.create_subprocess_exec(
        "iscsi-ls", "-i", initiator, url, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    return subprocess.CompletedProcess([], proc.returncode or 0, out.decode(), err.decode())


def listed(stdout: str) -> set[tuple[str, str]]:
    """(target, portal) pairs from iscsi-ls output (it lists targets in reverse order)."""
    words = stdout.split()
    assert all(w.startswith(("Target:", "Portal:")) for w in words), stdout
    return {
        (t.removeprefix("Target:"), a.removeprefix("Portal:"))
        for t, a in zip(words[::2], words[1::2], strict=True)
    }


@pytest.mark.skipif(ISCSI_LS is None, reason="libiscsi-bin (iscsi-ls) is not installed")
async def test_discovery_with_iscsi_ls_and_chap() -> None:
    server, port = await start(policy(THREE))
    try:
        out = await iscsi_ls(port, B)
        assert out.returncode == 0, out.stderr
        assert listed(out.stdout) == {(T0, f"{VIP},1"), (T1, f"{VIP},1")}
        out = await iscsi_ls(port, C)
        assert out.returncode == 0 and out.stdout.strip() == ""
        # digests switch on after the final Login Response, for SendTargets and Logout
        out = await iscsi_ls(port, A, query="?header_digest=crc32c")
        assert out.returncode == 0, out.stderr
        assert listed(out.stdout) == {(T0, f"{VIP},1")}
    finally:
        await server.close()
    chap = ChapRecord(user="disc", secret=SEALER.seal("discovery-secret")).to_json()
    server, port = await start(policy(THREE, chap=chap))
    try:
        refused = await iscsi_ls(port, A)
        assert refused.returncode != 0
        ok = await iscsi_ls(port, A, "disc%discovery-secret@")
        assert ok.returncode == 0, ok.stderr
        assert listed(ok.stdout) == {(T0, f"{VIP},1")}
        wrong = await iscsi_ls(port, A, "disc%wrong-secret-123@")
        assert wrong.returncode != 0
    finally:
        await server.close()


# --- property: every answer is one of the table's, a redirect only ever to an up server --------

server_ids = st.sampled_from([f"chunk-{i:02d}" for i in range(8)])
iqns = st.sampled_from([A, B, C, "iqn.2026-11.org.example:d"])


@given(
    servers=st.dictionaries(server_ids, st.sampled_from(["up", "draining"]), max_size=8),
    drained=st.sets(server_ids, max_size=4),
    acl=st.dictionaries(st.integers(0, 3), st.sets(iqns, max_size=3), max_size=4),
    initiator=iqns,
    target=st.integers(0, 4),
)
def test_decisions_property(
    servers: dict[str, str],
    drained: set[str],
    acl: dict[int, set[str]],
    initiator: str,
    target: int,
) -> None:
    live_records = [
        live(sid, f"10.1.0.{i}:3260", state) for i, (sid, state) in enumerate(servers.items())
    ]
    luns = [
        (Keys.lun(t, 1), LunRecord(volume_id=f"v{t}", initiators=sorted(who)).to_json())
        for t, who in acl.items()
    ]
    index = ExportIndex.build(luns)
    table = ServerTable.build(live_records, [drain(s) for s in drained])
    pol = RedirectPolicy(lambda: index, lambda: table, VIP)
    decision = pol.authorize(initiator, target_iqn(target))
    up = {sid for sid, state in servers.items() if state == "up" and sid not in drained}
    if target not in acl:
        assert decision.status is LoginStatus.NOT_FOUND
    elif initiator not in acl[target]:
        assert decision.status is LoginStatus.AUTHORIZATION_FAILURE
    elif not up:
        assert decision.status is LoginStatus.SERVICE_UNAVAILABLE
    else:
        assert decision.status is LoginStatus.TARGET_MOVED_TEMPORARILY
        portal_of = {sid: f"10.1.0.{i}:3260,1" for i, sid in enumerate(servers)}
        assert decision.target_address in {portal_of[s] for s in up}
        # the choice over the whole table equals the choice over the up servers alone
        only_up = [ServerChoice(s, "up") for s in sorted(up)]
        assert (
            decision.target_address
            == portal_of[str(choose_chunk_server(initiator, target_iqn(target), only_up))]
        )
    listed = [t.name for t in pol.discoverable(initiator, "x")]
    assert listed == [target_iqn(t) for t in sorted(acl) if initiator in acl[t]]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff" * 48,  # an opcode initiators never send
        bytes(48),  # a NOP-Out before login
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(30),
    ],
)
async def test_garbage_closes_the_connection_and_the_portal_keeps_serving(garbage: bytes) -> None:
    server, port = await start(policy(THREE))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(garbage)
        await asyncio.wait_for(reader.read(65536), 5)  # whatever it answers, then EOF
        assert await asyncio.wait_for(reader.read(1), 5) == b""
        writer.close()
        resp = await login_once(port, normal(A, T0))
        assert (resp.status_class, resp.status_detail) == (1, 1)
    finally:
        await server.close()


async def test_a_silent_connection_is_closed_after_the_login_timeout() -> None:
    server = PortalServer(policy(THREE), login_timeout=0.3)
    await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.addresses[0][1])
        assert await asyncio.wait_for(reader.read(1), 5) == b""
        writer.close()

        async def forgotten() -> bool:
            return not server.connections

        await async_wait_for(forgotten, 5, "the portal to forget the connection")
    finally:
        await server.close()
