"""The chunk-to-chunk data protocol: frames and messages, sans-IO (docs/data-protocol.md).

A frame is `[4-byte big-endian header length][msgpack map][payload of header["len"] bytes]`:
the payload (block data, checksum arrays) travels after the header, never inside msgpack, so
it is never copied through the msgpack decoder. Version 2 adds fixed binary frames for the
hot path (a write and its `ok` answer): a first byte of 0x80 or above, which a version-1
reader takes for a header length above its cap, so it closes instead of misreading one.
Version 3 adds the cumulative ack frame ("extent handle H applied through seq N"), which
answers a secondary's forwarded writes; its rules are the sessions' (session.py).
`FrameReader` turns bytes into frames (`Frame`, `BinFrame`); `decode_request` /
`decode_response` turn frames into typed messages, validated against the schema tables below;
`encode_request` / `encode_response` go the other way.

Two error kinds, as in h11: everything the peer got wrong is a `WireError` (with the status to
answer, when the frame was good enough to answer at all); our own misuse is a plain
ValueError/TypeError from the encoder.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum, StrEnum
from typing import Any, ClassVar, TypeGuard

import msgpack

PROTOCOL_VERSION = 3
# Readers accept the current and the previous version (ARCHITECTURE.md, "Versions"), and
# still version 1, the released one (versions 2 and 3 are steps of one rewrite, issue 12): a
# connection negotiated at version 1 simply never carries a binary frame, one at version 2
# never a cumulative ack.
ACCEPTED_VERSIONS = frozenset({1, 2, 3})
BINARY_VERSION = 2  # the first version with binary frames and handles
ACK_VERSION = 3  # the first version with cumulative acks of forwarded writes

BLOCK_SIZE = 4096  # checksum granularity: COPY data and checksum arrays come in these units
CHECKSUM_SIZE = 8
NONCE_SIZE = 32
PROOF_SIZE = 32  # HMAC-SHA256
MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 64 * 1024 * 1024 + 128 * 1024  # one 64 MiB extent and its checksum array
MAX_STR = 256
MAX_BLOCK_LIST = 16384  # block indices in a checksum_mismatch answer (a 64 MiB extent's worth)
U64 = 2**64

_LEN = struct.Struct(">I")

# Binary frames (version 2, docs/data-protocol.md "Binary frames"). Big-endian, fixed size.
BIN_WRITE = 0xB1  # a write: kind, flags, -, payload length, id, extent handle, nexus handle,
_BIN_WRITE = struct.Struct(">BBxxIQIIQQQ")  # gen, seq, offset; then the data
BIN_WRITE_OK = 0xB2  # the ok answer to a write: kind, -, payload length (0), id, applied seq
_BIN_WRITE_OK = struct.Struct(">BxxxIQQ")
# a cumulative ack (version 3): kind, -, payload length (0), extent handle, how many writes it
# answers, the seq they were applied through
BIN_ACK = 0xB3
_BIN_ACK = struct.Struct(">BxxxIIIQ")
BIN_FUA = 0x01  # the only write flag
BIN_KINDS = {BIN_WRITE: _BIN_WRITE, BIN_WRITE_OK: _BIN_WRITE_OK, BIN_ACK: _BIN_ACK}
MAX_HANDLES = 1 << 16  # extent (and nexus) handles one connection may bind
# a reader's receive buffer for headers and small payloads: any header fits, so it never grows
_SCRATCH = MAX_HEADER + 64


# -- errors -----------------------------------------------------------------------------------


class Status(StrEnum):
    OK = "ok"
    STALE_GENERATION = "stale_generation"
    OUT_OF_ORDER = "out_of_order"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    NO_SPACE = "no_space"
    NOT_FOUND = "not_found"
    EXISTS = "exists"
    NOT_CURRENT = "not_current"
    UNAUTHENTICATED = "unauthenticated"
    BAD_REQUEST = "bad_request"
    UNAVAILABLE = "unavailable"  # a data directory failed, or the server is shutting down
    FENCED = "fenced"  # an access write from a superseded login of its I_T nexus
    MISCOMPARE = "miscompare"  # a `caw` whose verify data differs from the primary's data


class WireError(Exception):
    """The peer sent something we cannot accept.

    `request_id` is set when the frame was intact enough to answer with `status`; otherwise
    the connection cannot be trusted to stay in step and MUST be closed.
    """

    def __init__(
        self, message: str, *, request_id: int | None = None, status: Status = Status.BAD_REQUEST
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.status = status


class FrameError(WireError):
    """The byte stream itself is broken (lengths, caps, msgpack): close the connection."""


class AuthFailed(WireError):
    def __init__(self, message: str, *, request_id: int | None = None) -> None:
        super().__init__(message, request_id=request_id, status=Status.UNAUTHENTICATED)


# -- frames -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    header: dict[str, Any]
    payload: bytes | bytearray  # a bytearray: landed in a buffer of its own (not copied)


@dataclass(frozen=True, slots=True)
class BinFrame:
    """A version-2 binary frame: its kind (first byte) and the struct's other fields, in
    order (`BIN_KINDS[kind]`), and the payload (landed in a buffer of its own)."""

    kind: int
    values: tuple[int, ...]
    payload: bytes | bytearray


def encode_frame(
    header: Mapping[str, Any],
    payload: bytes | bytearray | memoryview = b"",
    tail: bytes | bytearray | memoryview = b"",
) -> list[bytes | memoryview]:
    """The frame as buffers for `writelines`; its payload is `payload` then `tail` (a copy's
    data and checksums), neither copied."""
    size = len(payload) + len(tail)
    head = dict(header)
    head["len"] = size
    packed = msgpack.packb(head, use_bin_type=True)
    if len(packed) > MAX_HEADER:
        raise ValueError(f"header of {len(packed)} bytes exceeds {MAX_HEADER}")
    if size > MAX_PAYLOAD:
        raise ValueError(f"payload of {size} bytes exceeds {MAX_PAYLOAD}")
    out: list[bytes | memoryview] = [_LEN.pack(len(packed)) + packed]
    out.extend(memoryview(part) for part in (payload, tail) if part)
    return out


def encode_bin_write(
    rid: int, ext_handle: int, nexus_handle: int, req: Write
) -> list[bytes | memoryview]:
    """A write as a binary frame (version 2; the handles are bound on the connection)."""
    if len(req.data) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(req.data)} bytes exceeds {MAX_PAYLOAD}")
    flags = BIN_FUA if req.fua else 0
    head = _BIN_WRITE.pack(
        BIN_WRITE,
        flags,
        len(req.data),
        rid,
        ext_handle,
        nexus_handle,
        req.gen,
        req.seq,
        req.offset,
    )
    return [head, memoryview(req.data)]


def encode_bin_write_ok(rid: int, applied: int) -> bytes:
    return _BIN_WRITE_OK.pack(BIN_WRITE_OK, 0, rid, applied)


def encode_bin_ack(ext_handle: int, count: int, through: int) -> bytes:
    """`count` forwarded writes of extent handle `ext_handle` applied, through seq `through`
    (version 3, docs/data-protocol.md "Cumulative acks")."""
    return _BIN_ACK.pack(BIN_ACK, 0, ext_handle, count, through)


class FrameReader:
    """Streaming frame parser: feed any slicing of the byte stream, get whole frames out.

    Works as an `asyncio.BufferedProtocol` wants: `get_buffer()` says where the next bytes
    go, `buffer_updated(n)` parses them. Headers and small payloads land in a scratch buffer;
    a payload that has not fully arrived with its header gets a buffer of its own, and the
    socket then reads straight into it (one landing, no re-copying as it grows). `feed`
    copies given bytes through the same path. The header is parsed as soon as it is
    complete, so an oversized payload is refused before any of it is buffered. After a
    FrameError the reader stays failed. Binary frames are parsed only once `binary` is set
    (a connection negotiated at version 2, after authentication).
    """

    def __init__(self, max_header: int = MAX_HEADER, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_header = max_header
        self.max_payload = max_payload
        self.binary = False
        self._buf = bytearray(_SCRATCH)
        self._start = 0
        self._end = 0
        # a frame whose payload is landing in its own buffer: (header or struct values, buffer)
        self._landing: tuple[dict[str, Any] | tuple[int, ...], bytearray] | None = None
        self._have = 0
        self._failed: FrameError | None = None

    @property
    def buffered(self) -> int:
        return self._end - self._start + (self._have if self._landing is not None else 0)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._landing is not None:
            return memoryview(self._landing[1])[self._have :]
        if self._end == len(self._buf):
            # move what is left (part of one header, never more) to the front
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start : self._end]
            self._start, self._end = 0, n
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Frame | BinFrame]:
        if self._failed is not None:
            raise self._failed
        frames: list[Frame | BinFrame] = []
        if self._landing is not None:
            self._have += nbytes
            head, payload = self._landing
            if self._have < len(payload):
                return frames
            self._landing, self._have = None, 0
            frames.append(_frame(head, payload))
            return frames
        self._end += nbytes
        try:
            self._parse(frames)
        except FrameError as exc:
            self._failed = exc
            raise
        return frames

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | BinFrame]:
        if self._failed is not None:
            raise self._failed
        view = memoryview(data).cast("B")
        frames: list[Frame | BinFrame] = []
        while view:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            frames += self.buffer_updated(n)
        return frames

    def _parse(self, frames: list[Frame | BinFrame]) -> None:
        buf = self._buf
        while True:
            avail = self._end - self._start
            if avail == 0:
                self._start = self._end = 0
                return
            head: dict[str, Any] | tuple[int, ...]
            st = BIN_KINDS.get(buf[self._start]) if self.binary else None
            if st is not None:
                if avail < st.size:
                    return
                head = st.unpack_from(buf, self._start)
                plen = head[2] if head[0] == BIN_WRITE else head[1]
                self._start += st.size
            else:
                if avail < _LEN.size:
                    return
                (hlen,) = _LEN.unpack_from(buf, self._start)
                if hlen == 0 or hlen > self.max_header:
                    raise FrameError(f"header length {hlen} not in 1..{self.max_header}")
                if avail < _LEN.size + hlen:
                    return
                a = self._start + _LEN.size
                head = _unpack_header(bytes(buf[a : a + hlen]))
                raw_len: Any = head.get("len")
                if not _is_uint(raw_len):
                    raise FrameError(
                        f"header 'len' must be a non-negative integer, got {raw_len!r}"
                    )
                plen = raw_len
                self._start = a + hlen
            if plen > self.max_payload:
                raise FrameError(f"payload length {plen} exceeds {self.max_payload}")
            avail = self._end - self._start
            if plen <= avail:
                a = self._start
                self._start += plen
                if isinstance(head, tuple):
                    frames.append(BinFrame(head[0], head[1:], buf[a : a + plen]))
                else:
                    frames.append(Frame(head, bytes(memoryview(buf)[a : a + plen])))
                continue
            # the rest of the payload lands in a buffer of its own
            payload = bytearray(plen)
            payload[:avail] = buf[self._start : self._end]
            self._landing, self._have = (head, payload), avail
            self._start = self._end = 0
            return


def _frame(head: dict[str, Any] | tuple[int, ...], payload: bytearray) -> Frame | BinFrame:
    if isinstance(head, tuple):
        return BinFrame(head[0], head[1:], payload)
    # the buffer is this frame's alone (a new one per landing): no copy of a rebuild's copy
    return Frame(head, payload)


def _unpack_header(raw: bytes) -> dict[str, Any]:
    try:
        # msgpack bounds every length by len(raw), itself capped by MAX_HEADER
        header = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:  # ExtraData, FormatError, StackError,
        # UnicodeDecodeError and non-string map keys are all ValueErrors or UnpackExceptions
        raise FrameError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict) or not all(isinstance(k, str) for k in header):
        raise FrameError("header must be a msgpack map with string keys")
    return header


def _is_uint(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < U64


# -- field kinds ------------------------------------------------------------------------------


class Kind(Enum):
    U64 = "u64"
    BOOL = "bool"
    STR = "str"
    NONCE = "nonce"  # 32 bytes
    PROOF = "proof"  # 32 bytes
    NEXUS = "nexus"  # [initiator port, target iqn, epoch] or nil: the nexus epoch of a write
    BLOCKS = "blocks"  # list of u64
    VERSIONS = "versions"  # list of u64


@dataclass(frozen=True, slots=True)
class Nexus:
    """An I_T nexus and its login epoch (docs/datapath.md, "Fencing stale writes").

    `initiator` is the SCSI initiator port name ("<iqn>,i,0x<isid, 12 hex digits>"), so two
    paths of a multipath initiator (two ISIDs) are two nexuses; `target` the target IQN;
    `epoch` the etcd revision of the nexus's latest login."""

    initiator: str
    target: str
    epoch: int


def _check(kind: Kind, key: str, value: Any) -> Any:
    """Validate one decoded value; returns the Python value the message field holds."""
    ok: bool
    if kind is Kind.U64:
        ok = _is_uint(value)
    elif kind is Kind.BOOL:
        ok = isinstance(value, bool)
    elif kind is Kind.STR:
        ok = isinstance(value, str) and 0 < len(value.encode()) <= MAX_STR
    elif kind is Kind.NONCE:
        ok = isinstance(value, bytes) and len(value) == NONCE_SIZE
    elif kind is Kind.PROOF:
        ok = isinstance(value, bytes) and len(value) == PROOF_SIZE
    elif kind is Kind.NEXUS:
        if value is None:
            return None
        ok = (
            isinstance(value, list)
            and len(value) == 3
            and all(isinstance(v, str) and 0 < len(v.encode()) <= MAX_STR for v in value[:2])
            and _is_uint(value[2])
        )
        if ok:
            return Nexus(value[0], value[1], value[2])
    elif kind in (Kind.BLOCKS, Kind.VERSIONS):
        ok = (
            isinstance(value, list)
            and len(value) <= MAX_BLOCK_LIST
            and all(_is_uint(v) for v in value)
        )
    else:  # pragma: no cover - the enum is exhaustive
        ok = False
    if not ok:
        raise ValueError(f"field {key!r}: expected {kind.value}, got {type(value).__name__}")
    return value


def _to_wire(kind: Kind, value: Any) -> Any:
    if kind is Kind.NEXUS and value is not None:
        return [value.initiator, value.target, value.epoch]
    return value


@dataclass(frozen=True, slots=True)
class Field:
    attr: str
    key: str
    kind: Kind
    required: bool = True


# -- requests ---------------------------------------------------------------------------------


class Op(StrEnum):
    HELLO = "hello"
    AUTH = "auth"
    PING = "ping"
    CREATE = "create"
    DELETE = "delete"
    WRITE = "write"
    UNMAP = "unmap"
    READ = "read"
    FLUSH = "flush"
    GET_STATE = "get_state"
    SET_GEN = "set_gen"
    COPY = "copy"
    ADVANCE = "advance"
    CLONE = "clone"  # snapshots: copy a local replica into a new one (docs/snapshots.md)
    PRESERVE = "preserve"  # snapshots: ask a primary to preserve an extent's frozen data
    BIND = "bind"  # version 2: name an extent by a connection-local handle
    BIND_NEXUS = "bind_nexus"  # version 2: name a nexus (and its epoch) by a handle
    CAW = "caw"  # COMPARE AND WRITE at the extent's primary, inside its ordering


_VOL = Field("volume", "vol", Kind.STR)
_EXT = Field("extent", "ext", Kind.U64)
_GEN = Field("gen", "gen", Kind.U64)
_SEQ = Field("seq", "seq", Kind.U64)
_OFF = Field("offset", "off", Kind.U64)
_N = Field("length", "n", Kind.U64)
_FUA = Field("fua", "fua", Kind.BOOL)
_NEXUS = Field("nexus", "nexus", Kind.NEXUS, required=False)
_TOKEN = Field("token", "token", Kind.U64, required=False)  # a `caw`'s (CompareAndWrite)
_CSUM = Field("with_checksums", "csum", Kind.BOOL, required=False)
_SEQ_OPT = Field("seq", "seq", Kind.U64, required=False)


@dataclass(frozen=True, slots=True)
class Request:
    OP: ClassVar[Op]
    FIELDS: ClassVar[tuple[Field, ...]] = ()
    id: int


@dataclass(frozen=True, slots=True)
class Hello(Request):
    OP = Op.HELLO
    FIELDS = (
        Field("version", "v", Kind.U64),
        Field("node", "node", Kind.STR),
        Field("nonce", "nonce", Kind.NONCE),
    )
    version: int
    node: str
    nonce: bytes


@dataclass(frozen=True, slots=True)
class Auth(Request):
    OP = Op.AUTH
    FIELDS = (Field("proof", "proof", Kind.PROOF),)
    proof: bytes


@dataclass(frozen=True, slots=True)
class Ping(Request):
    OP = Op.PING


@dataclass(frozen=True, slots=True)
class Create(Request):
    OP = Op.CREATE
    FIELDS = (_VOL, _EXT, _GEN, Field("state", "state", Kind.U64))
    volume: str
    extent: int
    gen: int
    state: int = 0


@dataclass(frozen=True, slots=True)
class Delete(Request):
    OP = Op.DELETE
    FIELDS = (_VOL, _EXT, _GEN)
    volume: str
    extent: int
    gen: int


@dataclass(frozen=True, slots=True)
class Write(Request):
    """`token`: set on a `caw` the primary forwards (CompareAndWrite), so that a member that
    takes over can answer its retry; such a write goes as a msgpack frame."""

    OP = Op.WRITE
    FIELDS = (_VOL, _EXT, _GEN, _SEQ, _OFF, _FUA, _NEXUS, _TOKEN)
    volume: str
    extent: int
    gen: int
    seq: int
    offset: int
    fua: bool
    # a bytearray when it landed from a binary frame (version 2); a memoryview of the iSCSI
    # buffer a large write arrived in, at its access point (chunk/access/volume.py)
    data: bytes | bytearray | memoryview
    nexus: Nexus | None = None
    token: int | None = None


@dataclass(frozen=True, slots=True)
class Unmap(Request):
    OP = Op.UNMAP
    FIELDS = (_VOL, _EXT, _GEN, _SEQ, _OFF, _N, _FUA, _NEXUS)
    volume: str
    extent: int
    gen: int
    seq: int
    offset: int
    length: int
    fua: bool
    nexus: Nexus | None = None


@dataclass(frozen=True, slots=True)
class CompareAndWrite(Request):
    """An access mutation sent to the extent's primary (like a `write` with `seq = 0`): under
    the extent's lock the primary compares `verify` with its current data at `offset`; equal,
    `data` is written there as the next ordered write (forwarded as a plain `write`);
    different, nothing is written and the answer is `miscompare` with the offset of the first
    differing byte. Payload = verify || data, `n` bytes each (docs/data-protocol.md).
    `token` (optional, non-zero) names the command: a retry carrying the token of one the
    primary applied is answered `ok` with its seq instead of being compared again."""

    OP = Op.CAW
    FIELDS = (_VOL, _EXT, _GEN, _OFF, _N, _FUA, _NEXUS, _TOKEN)
    volume: str
    extent: int
    gen: int
    offset: int
    length: int
    fua: bool
    verify: bytes
    data: bytes
    nexus: Nexus | None = None
    token: int | None = None


@dataclass(frozen=True, slots=True)
class Read(Request):
    OP = Op.READ
    FIELDS = (_VOL, _EXT, _GEN, _OFF, _N, _CSUM)
    volume: str
    extent: int
    gen: int
    offset: int
    length: int
    with_checksums: bool = False


@dataclass(frozen=True, slots=True)
class Flush(Request):
    OP = Op.FLUSH
    FIELDS = (_VOL, _EXT, _GEN)
    volume: str
    extent: int
    gen: int


@dataclass(frozen=True, slots=True)
class GetState(Request):
    OP = Op.GET_STATE
    FIELDS = (_VOL, _EXT, _CSUM)
    volume: str
    extent: int
    with_checksums: bool = False


@dataclass(frozen=True, slots=True)
class SetGen(Request):
    OP = Op.SET_GEN
    FIELDS = (
        _VOL,
        _EXT,
        _GEN,
        Field("applied_seq", "applied", Kind.U64, required=False),
        Field("state", "state", Kind.U64, required=False),
    )
    volume: str
    extent: int
    gen: int
    applied_seq: int | None = None
    state: int | None = None


@dataclass(frozen=True, slots=True)
class Copy(Request):
    """Whole blocks and their checksums (payload = data || checksums; `n` = data length)."""

    OP = Op.COPY
    FIELDS = (
        _VOL,
        _EXT,
        _GEN,
        _OFF,
        _N,
        _SEQ_OPT,
        Field("if_applied", "if_applied", Kind.U64, required=False),
    )
    volume: str
    extent: int
    gen: int
    offset: int
    length: int
    data: bytes | memoryview
    checksums: bytes | memoryview
    seq: int | None = None  # an ordered copy: applied as write `seq` (a joining member)
    if_applied: int | None = None  # install only while the replica's applied_seq is this


@dataclass(frozen=True, slots=True)
class Advance(Request):
    """An ordered no-op: write `seq` is a copy to a joining member; the others only count it."""

    OP = Op.ADVANCE
    FIELDS = (_VOL, _EXT, _GEN, _SEQ)
    volume: str
    extent: int
    gen: int
    seq: int


@dataclass(frozen=True, slots=True)
class Clone(Request):
    """Make replica `dst`/`extent` (at generation `gen`) a copy of this server's own replica
    `volume`/`extent`, chunk-locally (copy_file_range; reflinks on XFS/btrfs)."""

    OP = Op.CLONE
    FIELDS = (_VOL, _EXT, Field("dst", "dst", Kind.STR), _GEN)
    volume: str
    extent: int
    dst: str
    gen: int


@dataclass(frozen=True, slots=True)
class Preserve(Request):
    """Sent to an extent's primary: if its data predates the volume's newest snapshot, copy
    it aside now (on every replica), as the first write would (docs/snapshots.md)."""

    OP = Op.PRESERVE
    FIELDS = (_VOL, _EXT, _GEN)
    volume: str
    extent: int
    gen: int


_HANDLE = Field("handle", "h", Kind.U64)


@dataclass(frozen=True, slots=True)
class Bind(Request):
    """Version 2: handle `handle` names extent `volume`/`extent` on this connection, for the
    binary write frames that follow. Handled by the connection itself (session.py)."""

    OP = Op.BIND
    FIELDS = (_HANDLE, _VOL, _EXT)
    handle: int
    volume: str
    extent: int


@dataclass(frozen=True, slots=True)
class BindNexus(Request):
    """Version 2: handle `handle` names `nexus` (with its epoch) on this connection."""

    OP = Op.BIND_NEXUS
    FIELDS = (_HANDLE, Field("nexus", "nexus", Kind.NEXUS))
    handle: int
    nexus: Nexus


REQUEST_TYPES: dict[Op, type[Request]] = {
    cls.OP: cls
    for cls in (
        Hello,
        Auth,
        Ping,
        Create,
        Delete,
        Write,
        Unmap,
        Read,
        Flush,
        GetState,
        SetGen,
        Copy,
        Advance,
        Clone,
        Preserve,
        Bind,
        BindNexus,
        CompareAndWrite,
    )
}
_STATE_MAX = 2  # ReplicaState values on the wire: 0 current, 1 syncing, 2 stale


def encode_request(req: Request) -> list[bytes | memoryview]:
    header: dict[str, Any] = {"op": req.OP.value, "id": req.id}
    for f in req.FIELDS:
        value = getattr(req, f.attr)
        if value is None and not f.required:
            continue
        header[f.key] = _to_wire(f.kind, value)
    payload: bytes | bytearray | memoryview = b""
    if isinstance(req, Write):
        payload = req.data
    elif isinstance(req, Copy):  # a rebuild's 4 MiB runs: no joined copy of the data
        return encode_frame(header, req.data, req.checksums)
    elif isinstance(req, CompareAndWrite):
        if len(req.verify) != req.length or len(req.data) != req.length:
            raise ValueError("caw: verify and data must be `length` bytes each")
        payload = bytes(req.verify) + bytes(req.data)
    return encode_frame(header, payload)


def decode_request(frame: Frame) -> Request:
    h = frame.header
    rid: Any = h.get("id")
    if not _is_uint(rid):
        raise FrameError(f"request id must be a non-negative integer, got {rid!r}")
    op_name: Any = h.get("op")
    try:
        op = Op(op_name)
    except ValueError:
        raise WireError(f"unknown op {op_name!r}", request_id=rid) from None
    cls = REQUEST_TYPES[op]
    kwargs: dict[str, Any] = {"id": rid}
    try:
        for f in cls.FIELDS:
            if f.key in h:
                kwargs[f.attr] = _check(f.kind, f.key, h[f.key])
            elif f.required:
                raise ValueError(f"missing field {f.key!r}")
    except ValueError as exc:
        raise WireError(f"{op}: {exc}", request_id=rid) from None
    _check_payload(cls, kwargs, frame.payload, rid)
    return cls(**kwargs)


def decode_bin_write(
    frame: BinFrame, extents: Mapping[int, tuple[str, int]], nexuses: Mapping[int, Nexus]
) -> Write:
    """A binary write frame, its handles resolved with the connection's bindings."""
    flags, _, rid, ext_h, nexus_h, gen, seq, offset = frame.values
    extent = extents.get(ext_h)
    if extent is None:
        raise WireError(f"write: extent handle {ext_h} is not bound", request_id=rid)
    nexus = None
    if nexus_h:
        nexus = nexuses.get(nexus_h)
        if nexus is None:
            raise WireError(f"write: nexus handle {nexus_h} is not bound", request_id=rid)
    if flags & ~BIN_FUA:
        raise WireError(f"write: unknown flags {flags:#x}", request_id=rid)
    if not frame.payload:
        raise WireError("write: a write carries at least one byte", request_id=rid)
    return Write(
        rid, extent[0], extent[1], gen, seq, offset, bool(flags & BIN_FUA), frame.payload, nexus
    )


def _check_payload(
    cls: type[Request], kw: dict[str, Any], payload: bytes | bytearray, rid: int
) -> None:
    def bad(why: str) -> WireError:
        return WireError(f"{cls.OP}: {why}", request_id=rid)

    if cls is Write:
        if not payload:
            raise bad("a write carries at least one byte")
        kw["data"] = payload
    elif cls is Copy:
        n = kw["length"]
        if n == 0 or n % BLOCK_SIZE or len(payload) != n + n // BLOCK_SIZE * CHECKSUM_SIZE:
            raise bad(f"payload must be {BLOCK_SIZE}-byte blocks followed by their checksums")
        view = memoryview(payload)  # views: the payload is this frame's own (not copied)
        kw["data"], kw["checksums"] = view[:n], view[n:]
    elif cls is CompareAndWrite:
        n = kw["length"]
        if n == 0 or len(payload) != 2 * n:
            raise bad("payload must be the verify data and the write data, `n` bytes each")
        view = memoryview(payload)
        kw["verify"], kw["data"] = bytes(view[:n]), bytes(view[n:])
    elif payload:
        raise bad("carries no payload")
    if (cls is Unmap or cls is Read) and kw["length"] == 0:
        raise bad("length must be positive")
    if cls is Bind or cls is BindNexus:
        if not 0 < kw["handle"] <= MAX_HANDLES:
            raise bad(f"handle {kw['handle']} is not 1..{MAX_HANDLES}")
        if cls is BindNexus and kw.get("nexus") is None:
            raise bad("bind_nexus needs a nexus")
    if "state" in kw and kw["state"] is not None and kw["state"] > _STATE_MAX:
        raise bad(f"state {kw['state']} is not 0..{_STATE_MAX}")


# -- responses --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    """An answer to request `id`. `fields` holds the status- and op-specific values."""

    id: int
    status: Status
    fields: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


# Fields every response with this status MUST carry (besides id, status, len).
STATUS_FIELDS: dict[Status, tuple[Field, ...]] = {
    Status.STALE_GENERATION: (Field("gen", "gen", Kind.U64),),
    Status.OUT_OF_ORDER: (Field("expected", "expected", Kind.U64),),
    Status.CHECKSUM_MISMATCH: (Field("blocks", "blocks", Kind.BLOCKS),),
    Status.BAD_REQUEST: (Field("versions", "versions", Kind.VERSIONS, required=False),),
    Status.FENCED: (Field("epoch", "epoch", Kind.U64),),
    Status.MISCOMPARE: (Field("offset", "off", Kind.U64),),
}
# Fields an `ok` answer to this op MUST carry.
OK_FIELDS: dict[Op, tuple[Field, ...]] = {
    Op.HELLO: (
        Field("version", "v", Kind.U64),
        Field("node", "node", Kind.STR),
        Field("nonce", "nonce", Kind.NONCE),
        Field("proof", "proof", Kind.PROOF),
    ),
    Op.GET_STATE: (
        Field("gen", "gen", Kind.U64),
        Field("applied_seq", "applied", Kind.U64),
        Field("durable_seq", "durable", Kind.U64),
        Field("state", "state", Kind.U64),
        Field("mapped_blocks", "mapped", Kind.U64),
    ),
    # the newest extent-map change the pinged primary knows of (read leases, docs/datapath.md)
    Op.PING: (Field("revision", "rev", Kind.U64, required=False),),
    Op.WRITE: (Field("applied_seq", "applied", Kind.U64),),
    Op.UNMAP: (Field("applied_seq", "applied", Kind.U64),),
    Op.CAW: (Field("applied_seq", "applied", Kind.U64),),
    Op.SET_GEN: (Field("applied_seq", "applied", Kind.U64),),
    Op.ADVANCE: (Field("applied_seq", "applied", Kind.U64),),
}
_MESSAGE = Field("message", "msg", Kind.STR, required=False)


def response_fields(op: Op, status: Status) -> tuple[Field, ...]:
    specific = OK_FIELDS.get(op, ()) if status is Status.OK else STATUS_FIELDS.get(status, ())
    return (*specific, _MESSAGE)


def encode_response(op: Op, resp: Response) -> list[bytes | memoryview]:
    header: dict[str, Any] = {"id": resp.id, "status": resp.status.value}
    for f in response_fields(op, resp.status):
        if f.attr in resp.fields and resp.fields[f.attr] is not None:
            header[f.key] = _to_wire(f.kind, resp.fields[f.attr])
        elif f.required:
            raise ValueError(f"{op} {resp.status}: missing field {f.attr!r}")
    return encode_frame(header, resp.payload)


def response_id(frame: Frame) -> int:
    """The id a response answers (to find its request, and so its op, before decoding)."""
    rid: Any = frame.header.get("id")
    if not _is_uint(rid):
        raise FrameError(f"response id must be a non-negative integer, got {rid!r}")
    return rid


def decode_response(frame: Frame, op: Op) -> Response:
    h = frame.header
    rid = response_id(frame)
    try:
        status = Status(h["status"])
    except (KeyError, ValueError, TypeError):
        raise FrameError(f"unknown status {h.get('status')!r}") from None
    values: dict[str, Any] = {}
    try:
        for f in response_fields(op, status):
            if f.key in h:
                values[f.attr] = _check(f.kind, f.key, h[f.key])
            elif f.required:
                raise ValueError(f"missing field {f.key!r}")
    except ValueError as exc:
        raise FrameError(f"{op} response {status}: {exc}") from None
    payload = bytes(frame.payload)  # answers stay bytes (no copy of one that already is)
    if status is Status.OK:
        _check_response_payload(op, payload, values)
    elif payload:
        raise FrameError(f"{op} response {status} carries no payload")
    return Response(rid, status, values, payload)


def _check_response_payload(op: Op, payload: bytes, values: dict[str, Any]) -> None:
    if op is Op.GET_STATE:
        if payload and len(payload) % CHECKSUM_SIZE:
            raise FrameError("get_state: checksum array is not a whole number of entries")
    elif op is not Op.READ and payload:
        raise FrameError(f"{op} response carries no payload")


def clip_message(text: str) -> str | None:
    """A `msg` value: at most 200 bytes of UTF-8, None when empty (then `msg` is omitted)."""
    clipped = text.encode()[:200].decode(errors="ignore")
    return clipped or None


def internal_error(rid: int, exc: BaseException) -> Response:
    """The answer to request `rid` when serving it raised what no status stands for (a bug):
    it costs that one answer, not the connection."""
    return Response(rid, Status.UNAVAILABLE, {"message": clip_message(f"internal error: {exc!r}")})


def request_fields(req: Request) -> dict[str, Any]:
    """The message's fields by attribute name (for logs; payloads shown by size)."""
    out: dict[str, Any] = {}
    for f in fields(req):
        value = getattr(req, f.name)
        out[f.name] = f"<{len(value)} bytes>" if isinstance(value, bytes) else value
    return out
