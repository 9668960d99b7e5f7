"""The chunk-to-chunk data protocol: frames and messages, sans-IO (docs/data-protocol.md).

A frame is `[4-byte big-endian header length][msgpack map][payload of header["len"] bytes]`:
the payload (block data, checksum arrays) travels after the header, never inside msgpack, so
it is never copied through the msgpack decoder. `FrameReader` turns bytes into frames;
`decode_request` / `decode_response` turn frames into typed messages, validated against the
schema tables below; `encode_request` / `encode_response` go the other way.

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

PROTOCOL_VERSION = 1
# Readers accept the current and the previous version (ARCHITECTURE.md, "Versions"); version 1
# is the first, so the previous one does not exist yet.
ACCEPTED_VERSIONS = frozenset({PROTOCOL_VERSION, PROTOCOL_VERSION - 1}) - {0}

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
    payload: bytes


def encode_frame(
    header: Mapping[str, Any], payload: bytes | bytearray | memoryview = b""
) -> list[bytes | memoryview]:
    """The frame as buffers for `writelines` (the payload is not copied)."""
    head = dict(header)
    head["len"] = len(payload)
    packed = msgpack.packb(head, use_bin_type=True)
    if len(packed) > MAX_HEADER:
        raise ValueError(f"header of {len(packed)} bytes exceeds {MAX_HEADER}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    out: list[bytes | memoryview] = [_LEN.pack(len(packed)) + packed]
    if payload:
        out.append(memoryview(payload))
    return out


class FrameReader:
    """Streaming frame parser: feed any slicing of the byte stream, get whole frames out.

    The header is parsed as soon as it is complete, so an oversized payload is refused
    before any of it is buffered. After a FrameError the reader stays failed.
    """

    def __init__(self, max_header: int = MAX_HEADER, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_header = max_header
        self.max_payload = max_payload
        self._buf = bytearray()
        self._header: dict[str, Any] | None = None
        self._need_payload = 0
        self._failed: FrameError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._failed is not None:
            raise self._failed
        self._buf += data
        frames: list[Frame] = []
        try:
            while True:
                frame = self._next()
                if frame is None:
                    return frames
                frames.append(frame)
        except FrameError as exc:
            self._failed = exc
            raise

    def _next(self) -> Frame | None:
        if self._header is None:
            if len(self._buf) < _LEN.size:
                return None
            (hlen,) = _LEN.unpack_from(self._buf)
            if hlen == 0 or hlen > self.max_header:
                raise FrameError(f"header length {hlen} not in 1..{self.max_header}")
            if len(self._buf) < _LEN.size + hlen:
                return None
            header = _unpack_header(bytes(self._buf[_LEN.size : _LEN.size + hlen]))
            del self._buf[: _LEN.size + hlen]
            plen: Any = header.get("len")
            if not _is_uint(plen):
                raise FrameError(f"header 'len' must be a non-negative integer, got {plen!r}")
            if plen > self.max_payload:
                raise FrameError(f"payload length {plen} exceeds {self.max_payload}")
            self._header, self._need_payload = header, plen
        if len(self._buf) < self._need_payload:
            return None
        payload = bytes(self._buf[: self._need_payload])
        del self._buf[: self._need_payload]
        frame = Frame(self._header, payload)
        self._header, self._need_payload = None, 0
        return frame


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


_VOL = Field("volume", "vol", Kind.STR)
_EXT = Field("extent", "ext", Kind.U64)
_GEN = Field("gen", "gen", Kind.U64)
_SEQ = Field("seq", "seq", Kind.U64)
_OFF = Field("offset", "off", Kind.U64)
_N = Field("length", "n", Kind.U64)
_FUA = Field("fua", "fua", Kind.BOOL)
_NEXUS = Field("nexus", "nexus", Kind.NEXUS, required=False)
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
    OP = Op.WRITE
    FIELDS = (_VOL, _EXT, _GEN, _SEQ, _OFF, _FUA, _NEXUS)
    volume: str
    extent: int
    gen: int
    seq: int
    offset: int
    fua: bool
    data: bytes
    nexus: Nexus | None = None


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
    data: bytes
    checksums: bytes
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
    elif isinstance(req, Copy):
        payload = bytes(req.data) + bytes(req.checksums)
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


def _check_payload(cls: type[Request], kw: dict[str, Any], payload: bytes, rid: int) -> None:
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
        kw["data"], kw["checksums"] = payload[:n], payload[n:]
    elif payload:
        raise bad("carries no payload")
    if (cls is Unmap or cls is Read) and kw["length"] == 0:
        raise bad("length must be positive")
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
    Op.WRITE: (Field("applied_seq", "applied", Kind.U64),),
    Op.UNMAP: (Field("applied_seq", "applied", Kind.U64),),
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
    if status is Status.OK:
        _check_response_payload(op, frame.payload, values)
    elif frame.payload:
        raise FrameError(f"{op} response {status} carries no payload")
    return Response(rid, status, values, frame.payload)


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


def request_fields(req: Request) -> dict[str, Any]:
    """The message's fields by attribute name (for logs; payloads shown by size)."""
    out: dict[str, Any] = {}
    for f in fields(req):
        value = getattr(req, f.name)
        out[f.name] = f"<{len(value)} bytes>" if isinstance(value, bytes) else value
    return out
