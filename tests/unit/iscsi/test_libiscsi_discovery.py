"""The codec, login negotiator, CHAP and SendTargets against a real initiator: libiscsi's iscsi-ls.

A minimal asyncio discovery portal (test glue only: the real one is the session layer's)
drives PduReader, LoginNegotiator and TextNegotiator; iscsi-ls logs in, asks SendTargets=All
and logs out.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

from lunastor.iscsi.chap import ChapCredentials
from lunastor.iscsi.errors import FramingError, RemoteProtocolError
from lunastor.iscsi.login import LoginNegotiator, LoginStep, TargetDecision
from lunastor.iscsi.params import ConnectionParams
from lunastor.iscsi.pdu import (
    LoginRequest,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Pdu,
    PduReader,
    TextRequest,
    encode_pdu,
)
from lunastor.iscsi.sendtargets import TargetPortals, TextNegotiator, TextStep
from tests.unit.iscsi.login_support import Policy

ISCSI_LS = shutil.which("iscsi-ls")
INITIATOR = "iqn.2026-01.io.lunastor:test-initiator"
TARGETS = [
    TargetPortals("iqn.2026-01.io.lunastor:vol-a", ("10.9.0.1:3260,1", "10.9.0.2:3260,1")),
    TargetPortals("iqn.2026-01.io.lunastor:vol-b", ("10.9.0.3:3260,1",)),
]


class DiscoveryPortal:
    """Serves one discovery connection at a time with the sans-IO pieces under test."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.errors: list[Exception] = []
        self.logged_in = 0
        self.connections: list[ConnectionParams] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pdus = PduReader(sender="initiator")
        login = LoginNegotiator(self.policy)
        text: TextNegotiator | None = None
        statsn = 1
        expcmdsn = 0

        def send(pdu: Pdu) -> None:
            writer.writelines(
                encode_pdu(pdu, pdus.header_digest, pdus.data_digest)  # type: ignore[arg-type]
            )

        try:
            while data := await reader.read(65536):
                pdus.feed(data)
                for pdu in pdus:
                    if isinstance(pdu, LoginRequest):
                        expcmdsn = pdu.cmdsn
                        reply = login.step(LoginStep.from_pdu(pdu))
                        send(reply.to_pdu(statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=expcmdsn + 1))
                        statsn += 1
                        if reply.done and reply.connection is None:
                            writer.close()
                            return
                        if reply.done:
                            assert reply.connection is not None and reply.session is not None
                            self.logged_in += 1
                            self.connections.append(reply.connection)
                            pdus.header_digest = reply.connection.header_digest
                            pdus.data_digest = reply.connection.data_digest
                            pdus.max_recv_data_segment_length = (
                                reply.connection.max_recv_data_segment_length
                            )
                            text = TextNegotiator(
                                lambda: TARGETS,
                                discovery=reply.session.discovery,
                                max_send_data_segment_length=(
                                    reply.connection.max_send_data_segment_length
                                ),
                            )
                    elif isinstance(pdu, TextRequest) and text is not None:
                        expcmdsn = pdu.cmdsn + (0 if pdu.immediate else 1)
                        answer = text.step(TextStep.from_pdu(pdu))
                        send(answer.to_pdu(statsn=statsn, expcmdsn=expcmdsn, maxcmdsn=expcmdsn + 1))
                        statsn += 1
                    elif isinstance(pdu, NopOut):
                        if pdu.itt != 0xFFFFFFFF:
                            send(NopIn(itt=pdu.itt, statsn=statsn, expcmdsn=expcmdsn,
                                       maxcmdsn=expcmdsn + 1, data=bytes(pdu.data)))  # fmt: skip
                            statsn += 1
                    elif isinstance(pdu, LogoutRequest):
                        expcmdsn = pdu.cmdsn + (0 if pdu.immediate else 1)
                        send(LogoutResponse(itt=pdu.itt, statsn=statsn, expcmdsn=expcmdsn,
                                            maxcmdsn=expcmdsn + 1))  # fmt: skip
                        await writer.drain()
                        writer.close()
                        return
                    else:
                        raise AssertionError(f"unexpected {pdu!r}")
        except (RemoteProtocolError, FramingError, AssertionError) as exc:
            self.errors.append(exc)
            writer.close()


async def _iscsi_ls(
    policy: Policy, url_auth: str = "", query: str = ""
) -> tuple[int, str, DiscoveryPortal]:
    portal = DiscoveryPortal(policy)
    server = await asyncio.start_server(portal.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    assert ISCSI_LS is not None
    try:
        proc = await asyncio.create_subprocess_exec(
            ISCSI_LS,
            "-i",
            INITIATOR,
            f"iscsi://{url_auth}127.0.0.1:{port}{query}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=20)
    finally:
        server.close()
        await server.wait_closed()
    return proc.returncode or 0, out.decode(errors="replace"), portal


def test_iscsi_ls_is_installed() -> None:
    # the interop tests below need libiscsi-bin (COMMON.md lists it as installed)
    assert ISCSI_LS is not None


async def test_discovery_without_authentication() -> None:
    rc, out, portal = await _iscsi_ls(Policy())
    assert rc == 0, out
    assert portal.errors == [] and portal.logged_in == 1
    for target in TARGETS:
        for address in target.addresses:
            assert f"Target:{target.name} Portal:{address}" in out, out


async def test_discovery_with_header_digest() -> None:
    rc, out, portal = await _iscsi_ls(Policy(), query="?header_digest=crc32c")
    assert rc == 0, out
    assert portal.errors == [] and portal.connections[0].header_digest
    assert f"Target:{TARGETS[0].name}" in out


@pytest.mark.parametrize(("password", "ok"), [("discovery-secret", True), ("wrong-secret!", False)])
async def test_discovery_chap_against_libiscsi(password: str, ok: bool) -> None:
    creds = ChapCredentials(username="alice", secret=b"discovery-secret")
    policy = Policy(discovery=TargetDecision(chap=creds))
    rc, out, portal = await _iscsi_ls(policy, f"alice%{password}@")
    assert portal.errors == []
    if ok:
        assert rc == 0, out
        assert f"Target:{TARGETS[1].name}" in out
    else:
        assert rc != 0 and portal.logged_in == 0, out
        assert "Authentication failure(513)" in out, out


MUTUAL = ChapCredentials(
    username="alice",
    secret=b"discovery-secret",
    mutual_username="lunastor",
    mutual_secret=b"target-secret-16b",
)


@pytest.mark.parametrize(("target_password", "ok"), [("target-secret-16b", True), ("nope", False)])
async def test_mutual_chap_checked_by_libiscsi(target_password: str, ok: bool) -> None:
    # libiscsi verifies our CHAP_R with the target secret it was given
    query = f"?target_user=lunastor&target_password={target_password}"
    policy = Policy(discovery=TargetDecision(chap=MUTUAL))
    rc, out, portal = await _iscsi_ls(policy, "alice%discovery-secret@", query)
    assert portal.errors == []
    if ok:
        assert rc == 0 and f"Target:{TARGETS[0].name}" in out, out
    else:
        assert rc != 0 and "Invalid CHAP_R response from the target" in out, out
