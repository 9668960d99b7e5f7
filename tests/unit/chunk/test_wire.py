"""Data protocol codec: table-driven both ways and byte at a time, Hypothesis, fuzz."""

from __future__ import annotations

import random
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lunastor.chunk.wire import messages as wire
from lunastor.chunk.wire.messages import (
    Advance,
    Clone,
    CompareAndWrite,
    Copy,
    Create,
    Delete,
    Flush,
    Frame,
    FrameError,
    FrameReader,
    GetState,
    Hello,
    Nexus,
    Op,
    Ping,
    Preserve,
    Read,
    Request,
    Response,
    SetGen,
    Status,
    Unmap,
    WireError,
    Write,
    decode_request,
    decode_response,
    encode_frame,
    encode_request,
    encode_response,
)

NONCE = bytes(range(32))
SUMS = b"\x11" * 8 + bytes(8)

# (request, its header map on the wire, its payload)
REQUEST_CASES: list[tuple[Request, dict[str, Any], bytes]] = [
    (
        Hello(1, 1, "chunk-a", NONCE),
        {"op": "hello", "id": 1, "v": 1, "node": "chunk-a", "nonce": NONCE},
        b"",
    ),
    (Ping(7), {"op": "ping", "id": 7}, b""),
    (
        Write(2, "vol", 3, 5, 9, 4096, True, b"data"),
        {
            "op": "write",
            "id": 2,
            "vol": "vol",
            "ext": 3,
            "gen": 5,
            "seq": 9,
            "off": 4096,
            "fua": True,
        },
        b"data",
    ),
    (
        Write(3, "vol", 3, 5, 10, 0, False, b"x", Nexus("iqn.i", "iqn.t", 4)),
        {
            "op": "write",
            "id": 3,
            "vol": "vol",
            "ext": 3,
            "gen": 5,
            "seq": 10,
            "off": 0,
            "fua": False,
            "nexus": ["iqn.i", "iqn.t", 4],
        },
        b"x",
    ),
    (
        Unmap(4, "v", 0, 1, 0, 512, 8192, False, Nexus("iqn.i,i,0x00023d000001", "iqn.t", 2**40)),
        {
            "op": "unmap",
            "id": 4,
            "vol": "v",
            "ext": 0,
            "gen": 1,
            "seq": 0,
            "off": 512,
            "n": 8192,
            "fua": False,
            "nexus": ["iqn.i,i,0x00023d000001", "iqn.t", 2**40],
        },
        b"",
    ),
    (
        Unmap(4, "v", 0, 1, 2, 512, 8192, False),
        {
            "op": "unmap",
            "id": 4,
            "vol": "v",
            "ext": 0,
            "gen": 1,
            "seq": 2,
            "off": 512,
            "n": 8192,
            "fua": False,
        },
        b"",
    ),
    (
        Read(5, "v", 1, 2, 100, 50, True),
        {"op": "read", "id": 5, "vol": "v", "ext": 1, "gen": 2, "off": 100, "n": 50, "csum": True},
        b"",
    ),
    (
        GetState(6, "v", 1, False),
        {"op": "get_state", "id": 6, "vol": "v", "ext": 1, "csum": False},
        b"",
    ),
    (
        SetGen(8, "v", 1, 9, 77, 1),
        {"op": "set_gen", "id": 8, "vol": "v", "ext": 1, "gen": 9, "applied": 77, "state": 1},
        b"",
    ),
    (SetGen(9, "v", 1, 9), {"op": "set_gen", "id": 9, "vol": "v", "ext": 1, "gen": 9}, b""),
    (
        Copy(10, "v", 1, 9, 8192, 8192, b"\1" * 8192, SUMS),
        {"op": "copy", "id": 10, "vol": "v", "ext": 1, "gen": 9, "off": 8192, "n": 8192},
        b"\1" * 8192 + SUMS,
    ),
    (
        Copy(14, "v", 1, 9, 0, 4096, b"\2" * 4096, SUMS[:8], seq=5),
        {"op": "copy", "id": 14, "vol": "v", "ext": 1, "gen": 9, "off": 0, "n": 4096, "seq": 5},
        b"\2" * 4096 + SUMS[:8],
    ),
    (
        Advance(15, "v", 1, 9, 6),
        {"op": "advance", "id": 15, "vol": "v", "ext": 1, "gen": 9, "seq": 6},
        b"",
    ),
    (
        Copy(16, "v", 1, 9, 8192, 8192, b"\1" * 8192, SUMS, if_applied=5),
        {
            "op": "copy",
            "id": 16,
            "vol": "v",
            "ext": 1,
            "gen": 9,
            "off": 8192,
            "n": 8192,
            "if_applied": 5,
        },
        b"\1" * 8192 + SUMS,
    ),
    (
        Create(11, "v", 2, 3, 1),
        {"op": "create", "id": 11, "vol": "v", "ext": 2, "gen": 3, "state": 1},
        b"",
    ),
    (Delete(12, "v", 2, 3), {"op": "delete", "id": 12, "vol": "v", "ext": 2, "gen": 3}, b""),
    (Flush(13, "v", 2, 3), {"op": "flush", "id": 13, "vol": "v", "ext": 2, "gen": 3}, b""),
    (
        Clone(14, "v", 2, "v.e0", 1),
        {"op": "clone", "id": 14, "vol": "v", "ext": 2, "dst": "v.e0", "gen": 1},
        b"",
    ),
    (Preserve(15, "v", 2, 3), {"op": "preserve", "id": 15, "vol": "v", "ext": 2, "gen": 3}, b""),
    (
        CompareAndWrite(17, "v", 2, 3, 512, 4, False, b"old!", b"new!", Nexus("i", "t", 7)),
        {
            "op": "caw",
            "id": 17,
            "vol": "v",
            "ext": 2,
            "gen": 3,
            "off": 512,
            "n": 4,
            "fua": False,
            "nexus": ["i", "t", 7],
        },
        b"old!new!",
    ),
    (
        CompareAndWrite(18, "v", 2, 3, 0, 1, True, b"o", b"n", None, 2**63),
        {
            "op": "caw",
            "id": 18,
            "vol": "v",
            "ext": 2,
            "gen": 3,
            "off": 0,
            "n": 1,
            "fua": True,
            "token": 2**63,
        },
        b"on",
    ),
]


def raw_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    return b"".join(bytes(b) for b in encode_frame(header, payload))


def feed_bytewise(data: bytes) -> list[Frame]:
    reader = FrameReader()
    frames = []
    for i in range(len(data)):
        frames += reader.feed(data[i : i + 1])
    assert reader.buffered == 0
    return frames


@pytest.mark.parametrize(("req", "header", "payload"), REQUEST_CASES)
def test_request_encoding_matches_the_table(
    req: Request, header: dict[str, Any], payload: bytes
) -> None:
    data = b"".join(bytes(b) for b in encode_request(req))
    assert data == raw_frame(header, payload)
    (hlen,) = struct.unpack(">I", data[:4])
    assert msgpack.unpackb(data[4 : 4 + hlen]) == {**header, "len": len(payload)}
    assert data[4 + hlen :] == payload  # the payload follows the header, outside msgpack


def test_a_copy_crosses_the_wire_with_no_copy_of_its_data() -> None:
    # Issue 12: a rebuild moves every byte of a lost replica as `copy` payloads (4 MiB runs);
    # joining data and checksums into one buffer to send, and slicing them apart again on
    # arrival, were two more copies of each at both ends (fresh memory, page faults).
    data, sums = bytes(range(256)) * 32, SUMS
    sent = encode_request(Copy(10, "v", 1, 9, 8192, len(data), data, sums, seq=5))
    assert any(isinstance(b, memoryview) and b.obj is data for b in sent)
    assert any(isinstance(b, memoryview) and b.obj is sums for b in sent)
    [frame] = FrameReader().feed(b"".join(bytes(b) for b in sent))
    got = decode_request(frame)
    assert isinstance(got, Copy) and got.data == data and got.checksums == sums
    for part in (got.data, got.checksums):  # views of the frame's own payload
        assert isinstance(part, memoryview) and part.obj is frame.payload
    # A payload that lands in a buffer of its own (the usual case for a 1 MiB run) is that
    # buffer in the frame and under the decoded copy's views: it was copied once more (to
    # bytes) on arrival, a sixth of the target's samples in a rebuild.
    wire_bytes = b"".join(bytes(b) for b in sent)
    split = 4 + struct.unpack(">I", wire_bytes[:4])[0] + 1  # the header and one payload byte
    reader = FrameReader()
    assert reader.feed(wire_bytes[:split]) == []
    landing = reader.get_buffer()
    [frame] = reader.feed(wire_bytes[split:])
    assert frame.payload is landing.obj
    got = decode_request(frame)
    assert isinstance(got, Copy) and got.data == data and got.checksums == sums
    assert isinstance(got.data, memoryview) and got.data.obj is landing.obj


@pytest.mark.parametrize(("req", "header", "payload"), REQUEST_CASES)
def test_request_decoding_whole_and_byte_at_a_time(
    req: Request, header: dict[str, Any], payload: bytes
) -> None:
    data = raw_frame(header, payload)
    [whole] = FrameReader().feed(data)
    [bytewise] = feed_bytewise(data)
    assert decode_request(whole) == decode_request(bytewise) == req


RESPONSE_CASES: list[tuple[Op, Response, dict[str, Any]]] = [
    (Op.PING, Response(1, Status.OK), {"id": 1, "status": "ok"}),
    (
        Op.WRITE,
        Response(2, Status.OK, {"applied_seq": 9}),
        {"id": 2, "status": "ok", "applied": 9},
    ),
    (
        Op.WRITE,
        Response(3, Status.STALE_GENERATION, {"gen": 6, "message": "fenced"}),
        {"id": 3, "status": "stale_generation", "gen": 6, "msg": "fenced"},
    ),
    (
        Op.WRITE,
        Response(4, Status.OUT_OF_ORDER, {"expected": 11}),
        {"id": 4, "status": "out_of_order", "expected": 11},
    ),
    (
        Op.READ,
        Response(5, Status.CHECKSUM_MISMATCH, {"blocks": [3, 4]}),
        {"id": 5, "status": "checksum_mismatch", "blocks": [3, 4]},
    ),
    (Op.READ, Response(6, Status.OK, {}, b"abc"), {"id": 6, "status": "ok"}),
    (
        Op.GET_STATE,
        Response(
            7,
            Status.OK,
            {"gen": 2, "applied_seq": 5, "durable_seq": 4, "state": 0, "mapped_blocks": 1},
            SUMS,
        ),
        {"id": 7, "status": "ok", "gen": 2, "applied": 5, "durable": 4, "state": 0, "mapped": 1},
    ),
    (Op.WRITE, Response(8, Status.NO_SPACE), {"id": 8, "status": "no_space"}),
    (Op.READ, Response(9, Status.NOT_FOUND), {"id": 9, "status": "not_found"}),
    (Op.AUTH, Response(10, Status.UNAUTHENTICATED), {"id": 10, "status": "unauthenticated"}),
    (
        Op.HELLO,
        Response(11, Status.BAD_REQUEST, {"versions": [1]}),
        {"id": 11, "status": "bad_request", "versions": [1]},
    ),
    (
        Op.WRITE,
        Response(12, Status.FENCED, {"epoch": 977}),
        {"id": 12, "status": "fenced", "epoch": 977},
    ),
    (
        Op.UNMAP,
        Response(13, Status.FENCED, {"epoch": 5, "message": "superseded"}),
        {"id": 13, "status": "fenced", "epoch": 5, "msg": "superseded"},
    ),
    (
        Op.CAW,
        Response(14, Status.OK, {"applied_seq": 12}),
        {"id": 14, "status": "ok", "applied": 12},
    ),
    (
        Op.CAW,
        Response(15, Status.MISCOMPARE, {"offset": 511}),
        {"id": 15, "status": "miscompare", "off": 511},
    ),
]


@pytest.mark.parametrize(("op", "resp", "header"), RESPONSE_CASES)
def test_responses_both_ways(op: Op, resp: Response, header: dict[str, Any]) -> None:
    data = b"".join(bytes(b) for b in encode_response(op, resp))
    assert data == raw_frame(header, resp.payload)
    [frame] = feed_bytewise(data)
    assert decode_response(frame, op) == resp


def _hdr(**kw: Any) -> dict[str, Any]:
    return {
        "op": "write",
        "id": 1,
        "vol": "v",
        "ext": 0,
        "gen": 1,
        "seq": 1,
        "off": 0,
        "fua": False,
        **kw,
    }


# (raw bytes, error class, text in the message, request id the server can still answer)
def head_only(header: Any, extra: bytes = b"") -> bytes:
    packed = msgpack.packb(header) + extra
    return struct.pack(">I", len(packed)) + packed


BAD_FRAMES: list[tuple[bytes, type[WireError], str, int | None]] = [
    (b"\0\0\0\0", FrameError, "header length 0", None),
    (struct.pack(">I", wire.MAX_HEADER + 1), FrameError, "header length", None),
    (struct.pack(">I", 2) + b"\xc1\xc1", FrameError, "not valid msgpack", None),
    (head_only(5), FrameError, "map", None),
    (head_only([1, 2]), FrameError, "map", None),
    (head_only({1: 2}), FrameError, "not valid msgpack", None),
    (head_only({"op": "ping", "id": 1, "len": 0}, b"\xc0"), FrameError, "not valid msgpack", None),
    (struct.pack(">I", 3) + b"\xa2\xff\xfe", FrameError, "not valid msgpack", None),
    (head_only({"op": "ping", "id": 1}), FrameError, "'len'", None),
    (head_only({"op": "ping", "id": 1, "len": -1}), FrameError, "'len'", None),
    (head_only({"op": "ping", "id": 1, "len": "3"}), FrameError, "'len'", None),
    (head_only({"op": "ping", "id": 1, "len": True}), FrameError, "'len'", None),
    (head_only({"op": "ping", "id": 1, "len": 2**31}), FrameError, "exceeds", None),
]
BAD_REQUESTS: list[tuple[dict[str, Any], bytes, str, int | None, type[WireError]]] = [
    ({"op": "ping"}, b"", "request id", None, FrameError),
    ({"op": "ping", "id": -1}, b"", "request id", None, FrameError),
    ({"op": "ping", "id": True}, b"", "request id", None, FrameError),
    ({"op": "nope", "id": 4}, b"", "unknown op", 4, WireError),
    ({"op": 17, "id": 4}, b"", "unknown op", 4, WireError),
    (_hdr(), b"", "at least one byte", 1, WireError),
    (_hdr(gen=-1), b"x", "'gen'", 1, WireError),
    (_hdr(gen=1.0), b"x", "'gen'", 1, WireError),
    (_hdr(fua=1), b"x", "'fua'", 1, WireError),
    (_hdr(vol=""), b"x", "'vol'", 1, WireError),
    (_hdr(vol="x" * 300), b"x", "'vol'", 1, WireError),
    (_hdr(vol=b"bytes"), b"x", "'vol'", 1, WireError),
    (_hdr(nexus=["a", "b"]), b"x", "'nexus'", 1, WireError),
    (_hdr(nexus=["a", "b", 1, 2]), b"x", "'nexus'", 1, WireError),
    (_hdr(nexus=["a", "b", -1]), b"x", "'nexus'", 1, WireError),
    (_hdr(nexus=["a", "b", True]), b"x", "'nexus'", 1, WireError),
    (_hdr(nexus=["", "b", 1]), b"x", "'nexus'", 1, WireError),
    (_hdr(nexus=["a", "b" * 300, 1]), b"x", "'nexus'", 1, WireError),
    (_hdr(nexus=[b"a", "b", 1]), b"x", "'nexus'", 1, WireError),
    (_hdr(nexus={"a": 1}), b"x", "'nexus'", 1, WireError),
    ({k: v for k, v in _hdr().items() if k != "seq"}, b"x", "missing field 'seq'", 1, WireError),
    ({"op": "ping", "id": 2}, b"zz", "no payload", 2, WireError),
    (
        {"op": "copy", "id": 3, "vol": "v", "ext": 0, "gen": 1, "off": 0, "n": 4096},
        b"\0" * 4096,
        "checksums",
        3,
        WireError,
    ),
    (
        {"op": "copy", "id": 3, "vol": "v", "ext": 0, "gen": 1, "off": 0, "n": 100},
        b"\0" * 100,
        "blocks",
        3,
        WireError,
    ),
    (
        {"op": "caw", "id": 7, "vol": "v", "ext": 0, "gen": 1, "off": 0, "n": 4, "fua": False},
        b"old!new",
        "verify data and the write data",
        7,
        WireError,
    ),
    (
        {"op": "caw", "id": 7, "vol": "v", "ext": 0, "gen": 1, "off": 0, "n": 0, "fua": False},
        b"",
        "verify data and the write data",
        7,
        WireError,
    ),
    (
        {"op": "read", "id": 5, "vol": "v", "ext": 0, "gen": 1, "off": 0, "n": 0},
        b"",
        "positive",
        5,
        WireError,
    ),
    (
        {"op": "create", "id": 6, "vol": "v", "ext": 0, "gen": 1, "state": 3},
        b"",
        "state",
        6,
        WireError,
    ),
    (
        {"op": "hello", "id": 6, "v": 1, "node": "n", "nonce": b"short"},
        b"",
        "'nonce'",
        6,
        WireError,
    ),
]


@pytest.mark.parametrize(("data", "error", "text", "rid"), BAD_FRAMES)
def test_broken_frames_raise_frame_error_whole_and_bytewise(
    data: bytes, error: type[WireError], text: str, rid: int | None
) -> None:
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        reader = FrameReader()
        with pytest.raises(error, match=text) as info:
            for chunk in chunks:
                for frame in reader.feed(chunk):
                    decode_request(frame)
        assert info.value.request_id == rid
        with pytest.raises(FrameError):
            reader.feed(b"more")  # a failed reader stays failed


@pytest.mark.parametrize(("header", "payload", "text", "rid", "error"), BAD_REQUESTS)
def test_invalid_requests_are_typed_and_answerable_when_possible(
    header: dict[str, Any], payload: bytes, text: str, rid: int | None, error: type[WireError]
) -> None:
    [frame] = FrameReader().feed(raw_frame(header, payload))
    with pytest.raises(error, match=text) as info:
        decode_request(frame)
    assert info.value.request_id == rid


def test_payload_cap_is_checked_before_buffering() -> None:
    reader = FrameReader(max_payload=1000)
    with pytest.raises(FrameError, match="exceeds 1000"):
        reader.feed(head_only({"op": "write", "id": 1, "len": 1001}))  # no payload byte yet


def test_many_pipelined_frames_in_one_feed() -> None:
    reqs = [Ping(i) for i in range(50)] + [Write(99, "v", 0, 1, 1, 0, False, b"z" * 10000)]
    data = b"".join(bytes(b) for r in reqs for b in encode_request(r))
    reader = FrameReader()
    got = reader.feed(data[:12345]) + reader.feed(data[12345:])
    assert [decode_request(f) for f in got] == reqs


# -- Hypothesis round trip --------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
name = st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode()) <= 256)
nexus = st.none() | st.builds(Nexus, name, name, u64)
blocks = st.integers(1, 4).flatmap(
    lambda n: st.tuples(
        st.binary(min_size=n * 4096, max_size=n * 4096), st.binary(min_size=n * 8, max_size=n * 8)
    )
)
requests = st.one_of(
    st.builds(Hello, u64, u64, name, st.binary(min_size=32, max_size=32)),
    st.builds(Ping, u64),
    st.builds(Write, u64, name, u64, u64, u64, u64, st.booleans(), st.binary(min_size=1), nexus),
    st.builds(
        Unmap, u64, name, u64, u64, u64, u64, st.integers(1, 2**64 - 1), st.booleans(), nexus
    ),
    st.builds(Read, u64, name, u64, u64, u64, st.integers(1, 2**64 - 1), st.booleans()),
    st.builds(GetState, u64, name, u64, st.booleans()),
    st.builds(SetGen, u64, name, u64, u64, st.none() | u64, st.none() | st.integers(0, 2)),
    st.builds(Create, u64, name, u64, u64, st.integers(0, 2)),
    st.builds(Delete, u64, name, u64, u64),
    st.builds(Flush, u64, name, u64, u64),
    st.builds(Advance, u64, name, u64, u64, u64),
    st.builds(
        lambda rid, vol, ext, gen, off, b, seq: Copy(
            rid, vol, ext, gen, off, len(b[0]), b[0], b[1], seq
        ),
        u64,
        name,
        u64,
        u64,
        u64,
        blocks,
        st.none() | u64,
    ),
)


@settings(max_examples=120, deadline=None)
@given(reqs=st.lists(requests, min_size=1, max_size=4), cut=st.integers(0, 10**6))
def test_any_request_sequence_round_trips_however_it_is_cut(reqs: list[Request], cut: int) -> None:
    data = b"".join(bytes(b) for r in reqs for b in encode_request(r))
    cut %= len(data) + 1
    reader = FrameReader()
    frames = reader.feed(data[:cut]) + reader.feed(data[cut:])
    assert [decode_request(f) for f in frames] == reqs


# -- fuzz -------------------------------------------------------------------------------------


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        what = rng.randrange(5)
        pos = rng.randrange(len(buf) + 1)
        if what == 0 and buf:  # flip bits
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif what == 1 and buf:  # random byte
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif what == 2:  # insert
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif what == 3:  # delete
            del buf[pos : pos + rng.randint(1, 8)]
        else:  # truncate
            del buf[pos:]
    return bytes(buf)


def test_fuzz_mutated_frames_parse_or_raise_wire_error() -> None:
    """20,000 mutated frames: each parses, or raises WireError; never anything else."""
    rng = random.Random(20240525)
    seeds = [raw_frame(h, p) for _, h, p in REQUEST_CASES]
    seeds += [b"".join(bytes(b) for b in encode_response(op, r)) for op, r, _ in RESPONSE_CASES]
    ops = list(Op)
    outcomes = {"parsed": 0, "wire_error": 0, "incomplete": 0}
    for i in range(20_000):
        data = _mutate(rng, rng.choice(seeds))
        reader = FrameReader(max_payload=1 << 20)
        try:
            frames = (
                reader.feed(data)
                if i % 2
                else [f for j in range(len(data)) for f in reader.feed(data[j : j + 1])]
                if len(data) < 200
                else reader.feed(data)
            )
            for frame in frames:
                if "status" in frame.header:
                    decode_response(frame, rng.choice(ops))
                else:
                    decode_request(frame)
            outcomes["parsed" if frames else "incomplete"] += 1
        except WireError:
            outcomes["wire_error"] += 1
    assert sum(outcomes.values()) == 20_000
    assert min(outcomes.values()) > 100, outcomes  # the fuzzer reached every outcome


def _response_strategy() -> st.SearchStrategy[tuple[Op, Response]]:
    rid = u64
    plain = st.sampled_from(
        [Status.NO_SPACE, Status.NOT_FOUND, Status.EXISTS, Status.NOT_CURRENT,
         Status.UNAUTHENTICATED, Status.UNAVAILABLE]
    )  # fmt: skip
    msg = st.none() | name
    op = st.sampled_from([Op.WRITE, Op.UNMAP, Op.READ, Op.COPY, Op.FLUSH])

    def with_msg(fields: dict[str, Any], m: str | None) -> dict[str, Any]:
        return {**fields, "message": m} if m is not None else fields

    return st.one_of(
        st.builds(lambda o, i, s, m: (o, Response(i, s, with_msg({}, m))), op, rid, plain, msg),
        st.builds(
            lambda i, g, m: (
                Op.WRITE, Response(i, Status.STALE_GENERATION, with_msg({"gen": g}, m))
            ),
            rid, u64, msg,
        ),
        st.builds(
            lambda i, e: (Op.UNMAP, Response(i, Status.OUT_OF_ORDER, {"expected": e})), rid, u64
        ),
        st.builds(
            lambda o, i, e, m: (o, Response(i, Status.FENCED, with_msg({"epoch": e}, m))),
            st.sampled_from([Op.WRITE, Op.UNMAP]), rid, u64, msg,
        ),
        st.builds(
            lambda i, b: (Op.READ, Response(i, Status.CHECKSUM_MISMATCH, {"blocks": b})),
            rid, st.lists(u64, max_size=50),
        ),
        st.builds(lambda i, p: (Op.READ, Response(i, Status.OK, {}, p)), rid, st.binary()),
        st.builds(
            lambda i, g, a, d, s, n, p: (
                Op.GET_STATE,
                Response(i, Status.OK, {"gen": g, "applied_seq": a, "durable_seq": d,
                                        "state": s, "mapped_blocks": n}, p),
            ),
            rid, u64, u64, u64, st.integers(0, 2), u64,
            st.integers(0, 8).map(lambda k: bytes(range(8)) * k),
        ),
    )  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(pair=_response_strategy())
def test_any_response_round_trips(pair: tuple[Op, Response]) -> None:
    op, resp = pair
    data = b"".join(bytes(b) for b in encode_response(op, resp))
    [frame] = FrameReader().feed(data)
    assert decode_response(frame, op) == resp
