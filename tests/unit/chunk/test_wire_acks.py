"""Version 3 of the data protocol: cumulative acks of forwarded writes ("handle H applied
through seq N", docs/data-protocol.md "Cumulative acks"), and negotiation with the version-2
code itself (tests/support/wire_v2), which keeps per-write answers or refuses cleanly."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from lunastor.chunk.wire import messages as wire
from lunastor.chunk.wire.messages import (
    BIN_ACK,
    BIN_WRITE,
    BIN_WRITE_OK,
    BinFrame,
    FrameReader,
    Response,
    Status,
    Write,
    encode_bin_ack,
)
from lunastor.chunk.wire.session import ClientConnection, Phase, ServerConnection
from tests.support.wire_v2 import messages as wire_v2
from tests.support.wire_v2 import session as session_v2

SECRET = b"cluster secret: 32 random bytes!"


def drain(conn: Any) -> bytes:
    return b"".join(bytes(b) for b in conn.data_to_send())


def pump(client: Any, server: Any) -> list[Any]:
    got: list[Any] = []
    while True:
        c2s = drain(client)
        if c2s:
            got += server.receive_data(c2s)
        s2c = drain(server)
        if s2c:
            client.receive_data(s2c)
        if not c2s and not s2c:
            return got


def opened(client: Any = None, server: Any = None) -> tuple[Any, Any]:
    client = client or ClientConnection(SECRET, "primary")
    server = server or ServerConnection(SECRET, "secondary")
    client.start()
    assert pump(client, server) == []
    assert client.authenticated
    return client, server


def forwards(client: ClientConnection, seqs: range, extent: int = 0, **kw: Any) -> list[Write]:
    out = []
    for seq in seqs:
        w = Write(client.next_id(), "vol", extent, 5, seq, seq * 4096, False, b"d" * 16, **kw)
        client.send_request(w)
        out.append(w)
    return out


def ok(w: Write) -> Response:
    return Response(w.id, Status.OK, {"applied_seq": w.seq})


def kinds(raw: bytes) -> list[int | str]:
    """Each frame of a server's output: a binary frame's kind, or a msgpack answer's status."""
    reader = FrameReader()
    reader.binary = True
    return [f.kind if isinstance(f, BinFrame) else f.header["status"] for f in reader.feed(raw)]


def test_the_ack_frame_layout() -> None:
    raw = encode_bin_ack(7, 3, 2**40 + 5)
    assert len(raw) == 24
    assert raw[0] == BIN_ACK == 0xB3 and raw[1:4] == b"\0\0\0"
    assert struct.unpack(">IIIQ", raw[4:]) == (0, 7, 3, 2**40 + 5)  # len, handle, count, seq
    reader = FrameReader()
    reader.binary = True
    # bytewise: the struct is parsed only once whole
    frames = [f for i in range(len(raw)) for f in reader.feed(raw[i : i + 1])]
    assert frames == [BinFrame(BIN_ACK, (0, 7, 3, 2**40 + 5), bytearray())]


def test_writes_answered_in_one_loop_iteration_leave_as_one_ack_per_handle() -> None:
    client, server = opened()
    assert client.version == server.version == 3
    a = forwards(client, range(1, 6))
    b = forwards(client, range(1, 3), extent=1)
    assert pump(client, server) == a + b
    for w in a + b:
        server.send_response(ok(w))
    out = drain(server)
    assert len(out) == 2 * 24 and kinds(out) == [BIN_ACK, BIN_ACK]
    answers = client.receive_data(out)
    assert sorted((r.id, r.status, r.fields["applied_seq"]) for r in answers) == sorted(
        (w.id, Status.OK, w.seq) for w in a + b
    )


def test_an_ack_per_iteration_covers_what_was_applied_since_the_last() -> None:
    client, server = opened()
    writes = forwards(client, range(1, 8))
    pump(client, server)
    for w in writes[:3]:
        server.send_response(ok(w))
    first = drain(server)  # the end of one loop iteration
    for w in writes[3:6]:  # the next one; the 7th still unanswered
        server.send_response(ok(w))
    second = drain(server)
    assert len(first) == len(second) == 24
    assert [r.id for r in client.receive_data(first)] == [w.id for w in writes[:3]]
    assert [r.id for r in client.receive_data(second)] == [w.id for w in writes[3:6]]
    server.send_response(ok(writes[6]))
    assert [r.id for r in client.receive_data(drain(server))] == [writes[6].id]


def test_an_error_goes_at_once_on_its_own_and_the_ack_around_it_skips_it() -> None:
    client, server = opened()
    writes = forwards(client, range(1, 6))
    pump(client, server)
    server.send_response(ok(writes[0]))
    server.send_response(ok(writes[1]))
    refused = Response(writes[2].id, Status.OUT_OF_ORDER, {"expected": 9, "message": "late"})
    server.send_response(refused)
    server.send_response(ok(writes[3]))
    server.send_response(ok(writes[4]))
    out = drain(server)
    # the error before the ack: the client never settles it as applied
    assert kinds(out) == ["out_of_order", BIN_ACK]
    answers = {r.id: r for r in client.receive_data(out)}
    assert answers[writes[2].id].status is Status.OUT_OF_ORDER
    assert answers[writes[2].id].fields["expected"] == 9
    assert all(answers[w.id].ok for w in writes[:2] + writes[3:]) and len(answers) == 5
    # and the next ack of the handle is not confused by the one answered on its own
    [w] = forwards(client, range(6, 7))
    pump(client, server)
    server.send_response(ok(w))
    assert [r.id for r in client.receive_data(drain(server))] == [w.id]


def test_an_ok_that_overtakes_an_earlier_write_goes_on_its_own() -> None:
    """A FUA write still flushing at the secondary while the write behind it is done: the
    later one may not be acked cumulatively (the ack would answer the FUA write too)."""
    client, server = opened()
    fua, after = forwards(client, range(1, 3))
    pump(client, server)
    server.send_response(ok(after))
    out = drain(server)
    assert kinds(out) == [BIN_WRITE_OK]
    assert [r.id for r in client.receive_data(out)] == [after.id]
    server.send_response(ok(fua))
    out = drain(server)
    assert kinds(out) == [BIN_ACK]
    assert [r.id for r in client.receive_data(out)] == [fua.id]


def test_an_ack_that_does_not_add_up_closes_the_connection() -> None:
    client, server = opened()
    forwards(client, range(1, 3))
    pump(client, server)
    with pytest.raises(wire.FrameError, match="answers 3 writes, 2 were waiting"):
        client.receive_data(encode_bin_ack(1, 3, 2))
    assert client.phase is Phase.CLOSED


def test_a_forward_that_goes_back_in_seq_goes_as_msgpack_and_is_answered_on_its_own() -> None:
    client, server = opened()
    first = forwards(client, range(1, 4))
    pump(client, server)
    [again] = forwards(client, range(2, 3))  # a retry of seq 2 (e.g. a primary back)
    raw = drain(client)
    assert raw[0] < 0x80  # msgpack
    assert server.receive_data(raw) == [again]
    [later] = forwards(client, range(4, 5))
    assert drain(client)[0] == BIN_WRITE
    for w in first:
        server.send_response(ok(w))
    server.send_response(ok(again))
    out = drain(server)
    assert kinds(out) == [BIN_WRITE_OK, BIN_ACK]  # the msgpack one answered on its own
    assert {r.id for r in client.receive_data(out)} == {w.id for w in [*first, again]}
    assert later.id in client._pending


def test_access_writes_seq_0_keep_per_write_answers() -> None:
    client, server = opened()
    writes = [Write(client.next_id(), "vol", 0, 5, 0, 0, False, b"d") for _ in range(3)]
    for w in writes:
        client.send_request(w)
    pump(client, server)
    for w in reversed(writes):  # a primary answers its access writes in any order
        server.send_response(Response(w.id, Status.OK, {"applied_seq": 7}))
    out = drain(server)
    assert kinds(out) == [BIN_WRITE_OK] * 3
    assert [r.id for r in client.receive_data(out)] == [w.id for w in reversed(writes)]


# -- negotiation with the version-2 code --------------------------------------------------------


def test_a_v2_server_keeps_per_write_answers_for_a_v3_client() -> None:
    client, server = opened(server=session_v2.ServerConnection(SECRET, "old"))
    assert client.version == server.version == 2
    writes = forwards(client, range(1, 4))
    got = pump(client, server)
    assert [g.seq for g in got] == [1, 2, 3]
    for g in got:
        server.send_response(wire_v2.Response(g.id, wire_v2.Status.OK, {"applied_seq": g.seq}))
    out = drain(server)
    assert kinds(out) == [BIN_WRITE_OK] * 3
    assert [r.id for r in client.receive_data(out)] == [w.id for w in writes]


def test_a_v2_client_gets_per_write_answers_from_a_v3_server() -> None:
    client, server = opened(client=session_v2.ClientConnection(SECRET, "old"))
    assert client.version == server.version == 2
    for seq in (1, 2, 3):
        client.send_request(wire_v2.Write(client.next_id(), "vol", 0, 5, seq, 0, False, b"d"))
    got = pump(client, server)
    for g in got:
        server.send_response(ok(g))
    out = drain(server)
    assert kinds(out) == [BIN_WRITE_OK] * 3
    assert [r.ok for r in client.receive_data(out)] == [True] * 3


def test_a_v2_reader_refuses_an_ack_frame_outright() -> None:
    """An ack sent by mistake on a version-2 connection: a framing error, not a misparse."""
    reader = wire_v2.FrameReader()
    reader.binary = True
    with pytest.raises(wire_v2.FrameError, match="header length"):
        reader.feed(encode_bin_ack(1, 1, 1))
    client = ClientConnection(SECRET, "new")
    client.offer = 2  # our own code, negotiated at 2
    opened(client=client)
    with pytest.raises(wire.FrameError, match="not an answer"):
        client.receive_data(encode_bin_ack(1, 0, 1))
