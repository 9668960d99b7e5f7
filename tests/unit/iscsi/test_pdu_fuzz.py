"""Fuzz the reader and decoder with mutated valid PDUs.

The only claim: every input parses, or raises our ProtocolError; never another exception,
never a hang (every call to next_pdu either returns a PDU, returns None, or raises, and the
number of calls is bounded by the bytes fed). In the spirit of h11's fuzz/afl-server.py.
"""

from __future__ import annotations

import contextlib
import os
import random

from crc32c import crc32c

from lunastor.iscsi.errors import FramingError, ProtocolError
from lunastor.iscsi.pdu import (
    R2T,
    AsyncMessage,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    PduReader,
    Reject,
    ScsiCommand,
    ScsiResponse,
    SnackRequest,
    TaskManagementRequest,
    TaskManagementResponse,
    TextRequest,
    TextResponse,
    decode_pdu,
    encode_pdu,
)

RUNS = 100_000
SEEDS = [
    NopOut(itt=1, data=b"ping"),
    ScsiCommand(read=True, itt=2, cdb=bytes(range(16)), expected_data_transfer_length=512),
    ScsiCommand(write=True, itt=3, cdb=bytes(range(32)), bidi_expected_read_length=9, data=b"abc"),
    TaskManagementRequest(function=5, itt=4),
    LoginRequest(transit=True, csg=0, nsg=1, isid=7, data=b"InitiatorName=iqn.a\0"),
    TextRequest(itt=5, data=b"SendTargets=All\0"),
    DataOut(itt=6, ttt=7, data=bytes(100)),
    LogoutRequest(reason=1, itt=8, cid=1),
    SnackRequest(snack_type=1, begrun=1, run_length=1),
    NopIn(itt=1, ttt=2, data=b"pong"),
    ScsiResponse(status=2, sense=bytes(18), response_data=b"r"),
    TaskManagementResponse(response=5),
    LoginResponse(transit=True, csg=1, nsg=3, status_class=2, status_detail=1, data=b"A=B\0"),
    TextResponse(data=b"TargetName=iqn.t\0"),
    DataIn(final=True, status_present=True, data=bytes(33)),
    LogoutResponse(time2wait=2, time2retain=20),
    R2T(ttt=1, desired_data_transfer_length=4096),
    AsyncMessage(async_event=0, sense=bytes(18), event_data=b"e"),
    Reject(reason=9, header=bytes(48)),
]
PLAIN = [b"".join(encode_pdu(p)) for p in SEEDS]


def _mutate(rng: random.Random, wire: bytes) -> bytes:
    buf = bytearray(wire)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(8)
        if kind == 0 and buf:  # flip bits anywhere
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif kind == 1 and buf:  # random byte in the header
            buf[rng.randrange(min(len(buf), 48))] = rng.randrange(256)
        elif kind == 2:  # truncate
            del buf[rng.randrange(len(buf) + 1) :]
        elif kind == 3:  # append garbage
            buf += rng.randbytes(rng.randrange(64))
        elif kind == 4 and len(buf) >= 8:  # change DataSegmentLength
            n = rng.choice([0, 1, 3, 4, 255, rng.randrange(1 << 24)])
            buf[5:8] = n.to_bytes(3, "big")
        elif kind == 5 and len(buf) >= 5:  # change TotalAHSLength
            buf[4] = rng.choice([0, 1, 2, rng.randrange(256)])
        elif kind == 6 and buf:  # change the opcode, keep the I bit
            buf[0] = (buf[0] & 0x40) | rng.randrange(64)
        elif kind == 7 and len(buf) > 48:  # scribble over the AHS / data segment
            i = rng.randrange(48, len(buf))
            buf[i : i + 4] = rng.randbytes(4)
    return bytes(buf)


def _with_digests(rng: random.Random, wire: bytes, hd: bool, dd: bool) -> bytes:
    """Insert digests where the (possibly mutated) header says they go, mostly correct ones."""
    if len(wire) < 48 or not (hd or dd):
        return wire
    ahs_end = 48 + wire[4] * 4
    header, rest = wire[:ahs_end], wire[ahs_end:]
    out = header
    if hd:
        digest = crc32c(header)
        if rng.random() < 0.1:
            digest ^= 1
        out += digest.to_bytes(4, "little")
    dlen = int.from_bytes(wire[5:8], "big")
    padded = dlen + (-dlen % 4)
    out += rest[:padded]
    if dd and dlen and len(rest) >= padded:
        digest = crc32c(rest[:padded])
        if rng.random() < 0.1:
            digest ^= 1
        out += digest.to_bytes(4, "little") + rest[padded:]
    else:
        out += rest[padded:]
    return out


def _chunks(rng: random.Random, blob: bytes) -> list[bytes]:
    if rng.random() < 0.5:
        return [blob]
    out = []
    pos = 0
    while pos < len(blob):
        step = rng.choice([1, 2, 7, 48, 64, 1000])
        out.append(blob[pos : pos + step])
        pos += step
    return out


def _drive(rng: random.Random) -> int:
    """One stream of 1-3 PDUs, mostly mutated, through a reader; returns how many it held."""
    hd = rng.random() < 0.3
    dd = rng.random() < 0.3
    pdus = rng.sample(PLAIN, rng.randint(1, 3))
    stream = b"".join(
        _with_digests(rng, _mutate(rng, rng.choice(PLAIN)) if rng.random() < 0.9 else w, hd, dd)
        for w in pdus
    )
    reader = PduReader(
        sender=rng.choice(["initiator", "target", "any"]),
        header_digest=hd,
        data_digest=dd,
        max_recv_data_segment_length=rng.choice([0, 64, 8192, 1 << 24]),
    )
    budget = len(stream) + 8  # each call consumes a PDU (>= 48 bytes) or stops
    for chunk in _chunks(rng, stream):
        reader.feed(chunk)
        while True:
            budget -= 1
            assert budget > 0, "reader made no progress"
            try:
                if reader.next_pdu() is None:
                    break
            except FramingError:
                return len(pdus)
            except ProtocolError:
                continue
    return len(pdus)


def _decode_direct(rng: random.Random) -> int:
    wire = _mutate(rng, rng.choice(PLAIN))
    header = wire[:48]
    ahs_len = header[4] * 4 if len(header) > 4 else 0
    with contextlib.suppress(ProtocolError):
        decode_pdu(header, wire[48 : 48 + ahs_len], memoryview(wire[48 + ahs_len :]))
    return 1


def test_mutated_pdus_parse_or_raise_protocol_error() -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    i = 0
    pdus = 0
    try:
        for i in range(RUNS):
            if i % 4 == 0:
                pdus += _decode_direct(rng)
            else:
                pdus += _drive(rng)
    except Exception as exc:
        raise AssertionError(f"fuzz case {i} with seed {seed} raised {exc!r}") from exc
    assert pdus >= 100_000, pdus  # the floor: at least 100,000 PDUs per run
