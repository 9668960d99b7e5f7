"""Version 2 of the data protocol: binary write frames over handles bound per connection,
binary answers, and negotiation with a version-1 peer (the released v1 code itself, in
tests/support/wire_v1) — which either talks version 1 or refuses cleanly, never half-reads."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest

from lunastor.chunk.wire import messages as wire
from lunastor.chunk.wire.messages import (
    BIN_WRITE,
    BIN_WRITE_OK,
    MAX_HANDLES,
    BinFrame,
    FrameReader,
    Nexus,
    Ping,
    Response,
    Status,
    Write,
    encode_bin_write,
)
from lunastor.chunk.wire.session import ClientConnection, Phase, ServerConnection
from tests.support.wire_v1 import messages as wire_v1
from tests.support.wire_v1 import session as session_v1

SECRET = b"cluster secret: 32 random bytes!"
NEXUS = Nexus("iqn.2026-01.test:host,i,0x023d00000001", "iqn.2026-11.io.lunastor:tgt-0", 77)


def drain(conn: Any) -> bytes:
    return b"".join(bytes(b) for b in conn.data_to_send())


def pump(client: Any, server: Any, *, bytewise: bool = False) -> list[Any]:
    got: list[Any] = []
    while True:
        c2s = drain(client)
        for piece in [c2s[i : i + 1] for i in range(len(c2s))] if bytewise else [c2s]:
            got += server.receive_data(piece)
        s2c = drain(server)
        if s2c:
            client.receive_data(s2c)
        if not c2s and not s2c:
            return got


def opened(client: Any, server: Any, offer: int = 2) -> None:
    client.offer = offer  # version 3 (cumulative acks): tests/unit/chunk/test_wire_acks.py
    client.start()
    assert pump(client, server) == []
    assert server.phase.value == "open" and client.authenticated


def test_writes_go_as_binary_frames_over_handles_bound_once() -> None:
    client, server = ClientConnection(SECRET, "a"), ServerConnection(SECRET, "b")
    opened(client, server)
    assert client.version == server.version == 2
    writes = [
        Write(client.next_id(), "vol", 3, 5, 1, 0, False, b"x" * 4096, NEXUS),
        Write(client.next_id(), "vol", 3, 5, 2, 4096, True, b"y" * 10, NEXUS),
        Write(client.next_id(), "vol", 4, 2, 1, 512, False, b"z" * 512),
    ]
    client.send_request(writes[0])
    first = drain(client)
    # bind extent, bind nexus (msgpack control frames), then the write: 48 bytes + data
    got = server.receive_data(first)
    assert got == [writes[0]]
    assert first[-(48 + 4096)] == BIN_WRITE and first.endswith(b"x" * 4096)
    client.send_request(writes[1])
    second = drain(client)
    assert len(second) == 48 + 10 and second[0] == BIN_WRITE  # handles already bound
    assert server.receive_data(second) == [writes[1]]
    client.send_request(writes[2])
    assert pump(client, server, bytewise=True) == [writes[2]]  # one new bind: the extent
    for w in writes:
        server.send_response(Response(w.id, Status.OK, {"applied_seq": w.seq}))
    answers = drain(server)
    assert len(answers) == 3 * 24 and answers[0] == BIN_WRITE_OK
    assert [(r.id, r.status, r.fields) for r in client.receive_data(answers)] == [
        (w.id, Status.OK, {"applied_seq": w.seq}) for w in writes
    ]
    # errors still answer in msgpack, with their fields
    w = Write(client.next_id(), "vol", 3, 4, 3, 0, False, b"q")
    client.send_request(w)
    assert server.receive_data(drain(client)) == [w]
    server.send_response(Response(w.id, Status.STALE_GENERATION, {"gen": 5}))
    [refused] = client.receive_data(drain(server))
    assert refused.status is Status.STALE_GENERATION and refused.fields["gen"] == 5


def test_bad_binary_writes_are_answered_bad_request_and_the_connection_stays() -> None:
    client, server = ClientConnection(SECRET, "a"), ServerConnection(SECRET, "b")
    opened(client, server)
    unbound = Write(41, "v", 0, 1, 1, 0, False, b"d")
    raw = b"".join(bytes(b) for b in encode_bin_write(41, 9, 0, unbound))
    assert server.receive_data(raw) == []
    [frame] = FrameReader().feed(drain(server))
    assert not isinstance(frame, BinFrame)
    assert frame.header["id"] == 41 and frame.header["status"] == "bad_request"
    assert "not bound" in frame.header["msg"]
    # an unknown flag, and an empty write (handle 1 bound by a real write first)
    client.send_request(Write(client.next_id(), "v", 0, 1, 1, 0, False, b"d"))
    assert len(server.receive_data(drain(client))) == 1
    drain(server)  # the bind's answer
    head = bytearray(raw[:48])
    head[1] = 0x80
    struct.pack_into(">I", head, 4, 1)
    struct.pack_into(">I", head, 16, 1)  # extent handle 1
    assert server.receive_data(bytes(head) + b"d") == []
    empty = bytearray(head)
    empty[1] = 0
    struct.pack_into(">I", empty, 4, 0)
    assert server.receive_data(bytes(empty)) == []
    msgs = [f.header["msg"] for f in FrameReader().feed(drain(server))]  # type: ignore[union-attr]
    assert "unknown flags" in msgs[0] and "at least one byte" in msgs[1]
    assert server.phase is Phase.OPEN


def test_an_answer_frame_sent_as_a_request_closes_the_connection() -> None:
    client, server = ClientConnection(SECRET, "a"), ServerConnection(SECRET, "b")
    opened(client, server)
    server.receive_data(wire.encode_bin_write_ok(5, 1))
    assert server.closed and "not a request" in (server.close_reason or "")


def test_binds_beyond_the_limit_fall_back_to_msgpack_writes() -> None:
    client, server = ClientConnection(SECRET, "a"), ServerConnection(SECRET, "b")
    opened(client, server)
    client._extent_handles = {("x", i): i + 1 for i in range(MAX_HANDLES)}  # all used up
    w = Write(client.next_id(), "v", 0, 1, 1, 0, False, b"d")
    client.send_request(w)
    out = drain(client)
    assert out[0] != BIN_WRITE
    [frame] = FrameReader().feed(out)
    assert frame.header["op"] == "write"  # type: ignore[union-attr]


def test_a_write_carrying_a_caw_token_goes_as_msgpack_and_keeps_it() -> None:
    # a forwarded `caw` (node.py): the binary frame has no room for the token, which a
    # member that takes over needs to answer the caw's retry
    client, server = ClientConnection(SECRET, "a"), ServerConnection(SECRET, "b")
    opened(client, server)
    w = Write(client.next_id(), "v", 0, 1, 1, 0, False, b"d" * 512, NEXUS, token=77)
    client.send_request(w)
    out = drain(client)
    [frame] = FrameReader().feed(out)
    assert frame.header["op"] == "write" and frame.header["token"] == 77  # type: ignore[union-attr]
    assert server.receive_data(out) == [w]
    # a v1 server ignores the field it does not know: the write itself is the same
    old = session_v1.ServerConnection(SECRET, "old")
    client = ClientConnection(SECRET, "a")
    client.start()
    pump(client, old)
    client.send_request(dataclasses.replace(w, id=client.next_id()))
    [got] = old.receive_data(drain(client))
    assert (got.volume, got.seq, bytes(got.data)) == ("v", 1, b"d" * 512)


# -- negotiation with the released version-1 code ----------------------------------------------


def test_a_v1_client_is_served_version_1_without_binary_frames() -> None:
    client = session_v1.ClientConnection(SECRET, "old")
    server = ServerConnection(SECRET, "new")
    client.start()
    pump(client, server)
    assert client.authenticated and client.version == server.version == 1
    w = wire_v1.Write(client.next_id(), "v", 0, 1, 1, 0, True, b"d" * 100)
    client.send_request(w)
    [got] = pump(client, server)
    assert (got.volume, got.seq, got.fua, got.data) == ("v", 1, True, b"d" * 100)
    server.send_response(Response(got.id, Status.OK, {"applied_seq": 1}))
    out = drain(server)
    assert out[0] < 0x80  # a msgpack frame: the v1 reader understands it
    [answer] = client.receive_data(out)
    assert answer.ok and answer.fields["applied_seq"] == 1
    # a binary frame on a version-1 connection is a framing error: closed, never misread
    server.receive_data(b"".join(bytes(b) for b in encode_bin_write(9, 1, 0, got)))
    assert server.closed and "header length" in (server.close_reason or "")


def test_a_v2_client_talks_version_1_to_a_v1_server() -> None:
    client = ClientConnection(SECRET, "new")
    server = session_v1.ServerConnection(SECRET, "old")
    client.start()
    pump(client, server)
    assert client.authenticated and client.version == server.version == 1
    w = Write(client.next_id(), "v", 0, 1, 1, 0, False, b"d" * 10, NEXUS)
    client.send_request(w)
    out = drain(client)
    assert out[0] < 0x80  # no bind, no binary frame
    [got] = server.receive_data(out)
    assert (got.volume, got.extent, got.data, got.nexus.epoch) == ("v", 0, b"d" * 10, 77)
    server.send_response(wire_v1.Response(got.id, wire_v1.Status.OK, {"applied_seq": 1}))
    [answer] = client.receive_data(drain(server))
    assert answer.ok and answer.fields["applied_seq"] == 1


def test_the_v1_reader_refuses_a_binary_frame_outright() -> None:
    """What a v1 peer does with a v2 frame sent by mistake: a framing error (the connection
    closes), not a misparse."""
    w = Write(1, "v", 0, 1, 1, 0, False, b"d")
    with pytest.raises(wire_v1.FrameError, match="header length"):
        wire_v1.FrameReader().feed(b"".join(bytes(b) for b in encode_bin_write(1, 1, 0, w)))
    with pytest.raises(wire_v1.FrameError, match="header length"):
        wire_v1.FrameReader().feed(wire.encode_bin_write_ok(1, 1))


@pytest.mark.parametrize("offered", [0, 4])
def test_unknown_versions_are_refused_with_the_accepted_list(offered: int) -> None:
    client, server = ClientConnection(SECRET, "a"), ServerConnection(SECRET, "b")
    client.offer = offered
    client.start()
    if offered > 3:  # a newer client is talked down to 3
        pump(client, server)
        assert server.version == 3
        return
    server.receive_data(drain(client))
    [frame] = FrameReader().feed(drain(server))
    assert frame.header["status"] == "bad_request"  # type: ignore[union-attr]
    assert frame.header["versions"] == [1, 2, 3]  # type: ignore[union-attr]
    assert server.closed


def test_binding_on_a_v1_connection_is_refused() -> None:
    client = ClientConnection(SECRET, "a")
    server = ServerConnection(SECRET, "b")
    opened(client, server, offer=1)
    assert server.version == 1
    bind = wire.Bind(client.next_id(), 1, "v", 0)
    server.receive_data(b"".join(bytes(b) for b in wire.encode_request(bind)))
    [frame] = FrameReader().feed(drain(server))
    assert frame.header["status"] == "bad_request"  # type: ignore[union-attr]
    assert server.phase is Phase.OPEN


def test_binary_payload_lands_in_its_own_buffer_when_it_arrives_in_pieces() -> None:
    """The BufferedProtocol path: after the header, the socket reads straight into the
    payload's buffer (get_buffer returns a view of it)."""
    client, server = ClientConnection(SECRET, "a"), ServerConnection(SECRET, "b")
    opened(client, server)
    data = bytes(range(256)) * 4096  # 1 MiB
    w = Write(client.next_id(), "v", 0, 1, 1, 0, False, data)
    client.send_request(w)
    out = drain(client)
    cut = len(out) - len(data) + 1000  # header and 1000 bytes of the payload first
    first = server.get_buffer()
    first[:cut] = out[:cut]
    assert server.buffer_updated(cut) == []
    got: list[Any] = []
    pos = cut
    while pos < len(out):
        buf = server.get_buffer()
        assert len(buf) == len(out) - pos  # exactly the rest of this payload
        n = min(len(buf), 200_000)
        buf[:n] = out[pos : pos + n]
        pos += n
        del buf
        got += server.buffer_updated(n)
    assert got == [w]
    client.send_request(Ping(client.next_id()))
    assert [type(r) for r in pump(client, server)] == [Ping]  # and back to headers
