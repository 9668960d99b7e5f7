"""HELLO/AUTH handshake and connection gating, driven byte-for-byte between the two machines."""

from __future__ import annotations

import msgpack
import pytest

from lunastor.chunk.wire import messages as wire
from lunastor.chunk.wire.messages import (
    Auth,
    AuthFailed,
    FrameReader,
    Hello,
    Op,
    Ping,
    Read,
    Response,
    Status,
    Write,
    decode_response,
    encode_request,
)
from lunastor.chunk.wire.session import ClientConnection, Phase, ServerConnection

SECRET = b"cluster secret: 32 random bytes!"


def pump(client: ClientConnection, server: ServerConnection, *, bytewise: bool = False) -> list:
    """Move bytes both ways until quiet; returns the requests the server app received."""
    got = []
    while True:
        c2s = b"".join(bytes(b) for b in client.data_to_send())
        for piece in [c2s[i : i + 1] for i in range(len(c2s))] if bytewise else [c2s]:
            got += server.receive_data(piece)
        s2c = b"".join(bytes(b) for b in server.data_to_send())
        if s2c:
            client.receive_data(s2c)
        if not c2s and not s2c:
            return got


@pytest.mark.parametrize("bytewise", [False, True])
def test_right_secret_authenticates_both_sides_and_releases_queued_requests(
    bytewise: bool,
) -> None:
    client = ClientConnection(SECRET, "chunk-a")
    server = ServerConnection(SECRET, "chunk-b")
    client.start()
    client.send_request(Ping(client.next_id()))  # queued until authenticated
    got = pump(client, server, bytewise=bytewise)
    assert client.authenticated and server.phase is Phase.OPEN
    assert (client.peer, server.peer, client.version, server.version) == (
        "chunk-b",
        "chunk-a",
        wire.PROTOCOL_VERSION,
        wire.PROTOCOL_VERSION,
    )
    assert [type(r) for r in got] == [Ping]
    # pipelined requests, answered out of order, matched by id
    r1 = Read(client.next_id(), "v", 0, 1, 0, 10)
    client.send_request(r1)
    got += pump(client, server)
    server.send_response(Response(r1.id, Status.OK, {}, b"0123456789"))
    server.send_response(Response(got[0].id, Status.OK))
    out = b"".join(bytes(b) for b in server.data_to_send())
    answers = client.receive_data(out)
    assert [(a.id, a.payload) for a in answers] == [(r1.id, b"0123456789"), (got[0].id, b"")]


def test_client_with_wrong_secret_rejects_the_server_first() -> None:
    client = ClientConnection(b"wrong secret", "chunk-a")
    server = ServerConnection(SECRET, "chunk-b")
    client.start()
    server.receive_data(b"".join(bytes(b) for b in client.data_to_send()))
    with pytest.raises(AuthFailed, match="does not know the cluster secret"):
        client.receive_data(b"".join(bytes(b) for b in server.data_to_send()))
    assert client.data_to_send() == []  # no AUTH sent: nothing to learn from us


def _server_hello(server: ServerConnection, nonce: bytes = b"n" * 32) -> Response:
    server.receive_data(b"".join(bytes(b) for b in encode_request(Hello(1, 1, "evil", nonce))))
    [frame] = FrameReader().feed(b"".join(bytes(b) for b in server.data_to_send()))
    return decode_response(frame, Op.HELLO)


@pytest.mark.parametrize(
    "proof",
    [b"\0" * 32, b"reflect"],  # garbage, and the server's own proof sent back
)
def test_server_refuses_a_client_that_cannot_prove_the_secret(proof: bytes) -> None:
    server = ServerConnection(SECRET, "chunk-b")
    hello = _server_hello(server)
    assert hello.ok
    if proof == b"reflect":
        proof = hello.fields["proof"]
    got = server.receive_data(b"".join(bytes(b) for b in encode_request(Auth(2, proof))))
    assert got == []
    [frame] = FrameReader().feed(b"".join(bytes(b) for b in server.data_to_send()))
    assert decode_response(frame, Op.AUTH).status is Status.UNAUTHENTICATED
    assert server.closed
    # nothing more is read from a closed connection
    assert server.receive_data(b"".join(bytes(b) for b in encode_request(Ping(3)))) == []


def test_no_request_passes_before_authentication() -> None:
    server = ServerConnection(SECRET, "chunk-b")
    got = server.receive_data(b"".join(bytes(b) for b in encode_request(Read(1, "v", 0, 1, 0, 5))))
    assert got == []
    [frame] = FrameReader().feed(b"".join(bytes(b) for b in server.data_to_send()))
    assert decode_response(frame, Op.READ).status is Status.UNAUTHENTICATED
    assert server.closed


def test_the_secret_never_crosses_the_wire() -> None:
    client = ClientConnection(SECRET, "chunk-a")
    server = ServerConnection(SECRET, "chunk-b")
    client.start()
    seen = b""
    for _ in range(3):
        c2s = b"".join(bytes(b) for b in client.data_to_send())
        server.receive_data(c2s)
        s2c = b"".join(bytes(b) for b in server.data_to_send())
        client.receive_data(s2c)
        seen += c2s + s2c
    assert client.authenticated
    assert SECRET not in seen and SECRET[:8] not in seen


def test_nonces_make_every_handshake_different() -> None:
    a = _server_hello(ServerConnection(SECRET, "s"), b"x" * 32)
    b = _server_hello(ServerConnection(SECRET, "s"), b"x" * 32)
    assert a.fields["nonce"] != b.fields["nonce"] and a.fields["proof"] != b.fields["proof"]


@pytest.mark.parametrize(
    ("client_version", "answer"),
    [
        (wire.PROTOCOL_VERSION, wire.PROTOCOL_VERSION),
        (wire.PROTOCOL_VERSION + 1, wire.PROTOCOL_VERSION),  # a newer client talks down to us
        (0, None),  # older than anything we accept
    ],
)
def test_version_negotiation(client_version: int, answer: int | None) -> None:
    server = ServerConnection(SECRET, "s")
    hello = Hello(1, client_version, "c", b"c" * 32)
    server.receive_data(b"".join(bytes(b) for b in encode_request(hello)))
    [frame] = FrameReader().feed(b"".join(bytes(b) for b in server.data_to_send()))
    resp = decode_response(frame, Op.HELLO)
    if answer is None:
        assert resp.status is Status.BAD_REQUEST and server.closed
        assert resp.fields["versions"] == sorted(wire.ACCEPTED_VERSIONS)
    else:
        assert resp.ok and resp.fields["version"] == answer


def test_garbage_before_hello_closes_without_crashing() -> None:
    server = ServerConnection(SECRET, "s")
    assert server.receive_data(b"\0\0\0\2" + msgpack.packb([1]) + b"junk") == []
    assert server.closed and server.close_reason and "map" in server.close_reason


def test_bad_request_after_authentication_is_answered_and_the_connection_stays() -> None:
    client = ClientConnection(SECRET, "chunk-a")
    server = ServerConnection(SECRET, "chunk-b")
    client.start()
    pump(client, server)
    bad = msgpack.packb({"op": "frobnicate", "id": 50, "len": 0})
    server.receive_data(len(bad).to_bytes(4, "big") + bad)
    [frame] = FrameReader().feed(b"".join(bytes(b) for b in server.data_to_send()))
    assert frame.header["status"] == "bad_request" and frame.header["id"] == 50
    assert not server.closed


def _server_in(phase: Phase) -> ServerConnection:
    server = ServerConnection(SECRET, "s")
    if phase is Phase.AWAIT_HELLO:
        return server
    client = ClientConnection(SECRET, "c")
    client.start()
    server.receive_data(b"".join(bytes(b) for b in client.data_to_send()))
    if phase is Phase.AWAIT_AUTH:
        server.data_to_send()
        return server
    client.receive_data(b"".join(bytes(b) for b in server.data_to_send()))
    server.receive_data(b"".join(bytes(b) for b in client.data_to_send()))
    server.data_to_send()
    assert server.phase is Phase.OPEN
    return server


SAMPLE = {
    Op.HELLO: Hello(90, 1, "x", b"h" * 32),
    Op.AUTH: Auth(90, b"p" * 32),
    Op.PING: Ping(90),
    Op.READ: Read(90, "v", 0, 1, 0, 1),
}
# (phase, op) -> what happens: "app" (handed to the application), or the status answered
# and whether the connection closes. Every pair not listed: unauthenticated + close.
EXPECTED = {
    (Phase.AWAIT_HELLO, Op.HELLO): ("ok", False),
    (Phase.AWAIT_AUTH, Op.AUTH): ("unauthenticated", True),  # wrong proof
    (Phase.OPEN, Op.HELLO): ("app", False),
    (Phase.OPEN, Op.AUTH): ("app", False),
    (Phase.OPEN, Op.PING): ("app", False),
    (Phase.OPEN, Op.READ): ("app", False),
}


@pytest.mark.parametrize("phase", [Phase.AWAIT_HELLO, Phase.AWAIT_AUTH, Phase.OPEN])
@pytest.mark.parametrize("op", list(SAMPLE))
def test_every_request_in_every_phase(phase: Phase, op: Op) -> None:
    server = _server_in(phase)
    got = server.receive_data(b"".join(bytes(b) for b in encode_request(SAMPLE[op])))
    outcome, closes = EXPECTED.get((phase, op), ("unauthenticated", True))
    if outcome == "app":
        assert got == [SAMPLE[op]] and server.data_to_send() == []
    else:
        assert got == []
        [frame] = FrameReader().feed(b"".join(bytes(b) for b in server.data_to_send()))
        assert frame.header["status"] == outcome and frame.header["id"] == 90
    assert server.closed is closes


def test_before_authentication_no_payload_is_buffered() -> None:
    server = ServerConnection(SECRET, "s")
    write = encode_request(Write(1, "v", 0, 1, 1, 0, False, b"x" * 1_000_000))
    header_only = bytes(write[0])  # the payload itself is never sent
    assert server.receive_data(header_only) == []
    assert server.closed and "exceeds 0" in (server.close_reason or "")
    big = msgpack.packb({"op": "hello", "id": 1, "len": 0, "pad": "x" * 2000})
    other = ServerConnection(SECRET, "s")
    other.receive_data(len(big).to_bytes(4, "big") + big)
    assert other.closed and "header length" in (other.close_reason or "")


def test_fuzzed_byte_streams_never_raise_out_of_the_server() -> None:
    """A server connection fed mutated handshakes and requests answers or closes; it never
    raises, and never hands an unauthenticated request to the application."""
    import random

    rng = random.Random(7)
    client = ClientConnection(SECRET, "c", nonce=b"c" * 32)
    client.start()
    server = ServerConnection(SECRET, "s", nonce=b"s" * 32)
    hello = b"".join(bytes(b) for b in client.data_to_send())
    server.receive_data(hello)
    client.receive_data(b"".join(bytes(b) for b in server.data_to_send()))
    auth = b"".join(bytes(b) for b in client.data_to_send())
    reqs = b"".join(
        bytes(b)
        for r in (Ping(5), Read(6, "v", 0, 1, 0, 9), Write(7, "v", 0, 1, 1, 0, True, b"abc"))
        for b in encode_request(r)
    )
    stream = hello + auth + reqs
    nonce_at = hello.index(b"c" * 32)
    proof_at = len(hello) + auth.index(b"\xc4\x20") + 2  # the one 32-byte bin value in AUTH
    guarded = [*range(nonce_at, nonce_at + 32), *range(proof_at, proof_at + 32)]
    for _ in range(5000):
        data = bytearray(stream)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(data))
            data[pos] = rng.randrange(256)
        server = ServerConnection(SECRET, "s", nonce=b"s" * 32)
        got = []
        cut = rng.randrange(len(data))
        got += server.receive_data(bytes(data[:cut]))
        got += server.receive_data(bytes(data[cut:]))
        server.data_to_send()
        if got:
            assert server.authenticated
        if any(data[i] != stream[i] for i in guarded):
            assert not server.authenticated  # a damaged nonce or proof never passes
