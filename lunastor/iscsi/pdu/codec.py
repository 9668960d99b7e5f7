"""Encoding and decoding of whole PDUs, generated from the field declarations of `messages.py`.

    encode_pdu(pdu, header_digest, data_digest) -> list of buffers for transport.writelines
    decode_pdu(header, ahs, data) -> Pdu        # one PDU whose segments are already split

For each PDU type the declarations are compiled once, at import, into one encoder and one decoder
function (the way `dataclasses` builds `__init__`): the encoder packs the whole BHS with one
precompiled struct, the decoder unpacks only the fields the type has (reserved bytes are pad
bytes of its struct) and builds the dataclass positionally. That is what a hand-written
codec for the hot path would do, without writing each of the 18 PDU types twice by hand.
`codec_source(cls)` shows the generated code.

Data segments are never copied: decoded PDUs hold memoryviews into the received buffer and
encoding returns the caller's data object as one of the output buffers.
"""

from __future__ import annotations

import linecache
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from crc32c import crc32c

from lunastor.iscsi.errors import LocalProtocolError, RejectReason, RemoteProtocolError
from lunastor.iscsi.pdu.enums import (
    BHS_LENGTH,
    MAX_AHS_LENGTH,
    MAX_DATA_SEGMENT_LENGTH,
    AhsType,
)
from lunastor.iscsi.pdu.messages import (
    INITIATOR_PDUS,
    TARGET_PDUS,
    BidiAhs,
    Buffer,
    Field,
    Fixed,
    Flag,
    LoginRequest,
    LoginResponse,
    Part,
    Pdu,
    ScsiCommand,
    Segment,
    wire_of,
)

_AHS_HDR = struct.Struct(">HBB")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")  # indexed by length % 4
_EMPTY = memoryview(b"")

Encoder = Callable[[Any], tuple[bytes, Buffer]]
Decoder = Callable[[Buffer, Buffer, memoryview], Pdu]


# --- errors -----------------------------------------------------------------------------------


def pdu_error(
    header: Buffer, message: str, reason: RejectReason = RejectReason.INVALID_PDU_FIELD
) -> RemoteProtocolError:
    """The peer's PDU is wrong: the error carries the Reject reason and the offending BHS."""
    return RemoteProtocolError(message, reason=reason, header=bytes(header[:BHS_LENGTH]))


def _limit(f: Field) -> int:
    if f.mask:
        return f.mask >> _shift(f.mask)
    return (1 << 8 * struct.calcsize(f.fmt)) - 1


def _out_of_range(pdu: Pdu, detail: object = None) -> LocalProtocolError:
    """Our own PDU has a field the wire cannot carry: name the field."""
    for name, part in wire_of(type(pdu)):
        if isinstance(part, Field) and not part.fmt.endswith("s"):
            value = getattr(pdu, name)
            limit = _limit(part)
            if not isinstance(value, int) or not 0 <= value <= limit:
                return LocalProtocolError(
                    f"{type(pdu).__name__}: field out of range: {part.rfc} "
                    f"({name}={value!r}, 0..{limit})"
                )
    return LocalProtocolError(f"{type(pdu).__name__}: field out of range: {detail}")


# --- the parts no table can say: AHS, sense data, login stages --------------------------------


def _command_ahs(pdu: ScsiCommand) -> tuple[bytes, bytes]:
    """The 16-byte CDB field and the AHS (extended CDB, bidirectional read length)."""
    cdb = pdu.cdb
    ahs = b""
    if len(cdb) > 16:
        ext = cdb[16:]
        rec = _AHS_HDR.pack(len(ext) + 1, AhsType.EXTENDED_CDB, 0) + ext
        ahs = rec + _PAD[len(rec) % 4]
        cdb = cdb[:16]
    if pdu.bidi_expected_read_length is not None:
        ahs += _AHS_HDR.pack(5, AhsType.BIDIRECTIONAL_READ_LENGTH, 0) + _U32.pack(
            pdu.bidi_expected_read_length
        )
    if len(ahs) > MAX_AHS_LENGTH:
        raise LocalProtocolError(f"CDB of {len(pdu.cdb)} bytes does not fit the AHS")
    return cdb, ahs


def _parse_command_ahs(h: Buffer, ahs: Buffer, cdb: bytes) -> tuple[bytes, int | None]:
    bidi: int | None = None
    ext: bytes | None = None
    pos = 0
    end = len(ahs)
    while pos < end:
        if end - pos < 4:
            raise pdu_error(h, "truncated AHS")
        length, ahs_type, _ = _AHS_HDR.unpack_from(ahs, pos)
        body = pos + 3  # AHSLength counts the byte after AHSType
        stop = body + length
        if stop > end:
            raise pdu_error(h, "AHS overruns TotalAHSLength")
        if ahs_type == AhsType.EXTENDED_CDB:
            if ext is not None or length < 2:
                raise pdu_error(h, "bad or repeated extended CDB AHS")
            ext = bytes(ahs[body + 1 : stop])
        elif ahs_type == AhsType.BIDIRECTIONAL_READ_LENGTH:
            if bidi is not None or length != 5:
                raise pdu_error(h, "bad or repeated bidirectional read length AHS")
            (bidi,) = _U32.unpack_from(ahs, body + 1)
        else:
            raise pdu_error(h, f"unsupported AHS type {ahs_type}")
        pos = stop + (-(stop - pos) % 4)
    if ext is not None:
        cdb = cdb + ext
    return cdb, bidi


def _sense_segment(sense: Buffer, rest: Buffer) -> Buffer:
    """SenseLength, sense data, then the rest (response or event data); empty if both are."""
    if not sense and not rest:
        return b""
    if len(sense) > 0xFFFF:
        raise LocalProtocolError("sense data longer than 65535 bytes")
    return _U16.pack(len(sense)) + bytes(sense) + bytes(rest)


def _split_sense(h: Buffer, data: memoryview, name: str) -> tuple[memoryview, memoryview]:
    if not data:
        return _EMPTY, _EMPTY
    if len(data) < 2:
        raise pdu_error(h, f"{name} data segment shorter than SenseLength")
    (sense_len,) = _U16.unpack_from(data)
    if 2 + sense_len > len(data):
        raise pdu_error(h, f"{name} SenseLength {sense_len} overruns the data segment")
    return data[2 : 2 + sense_len], data[2 + sense_len :]


def _login_stages_to_send(pdu: LoginRequest | LoginResponse) -> None:
    if pdu.csg not in (0, 1, 3) or pdu.nsg not in (0, 1, 3):
        raise LocalProtocolError(f"invalid login stage CSG={pdu.csg} NSG={pdu.nsg}")


def _login_stages_received(h: Buffer, pdu: LoginRequest | LoginResponse) -> None:
    # NSG is reserved (so not checked) unless the T bit is set; a login failure, not a Reject
    if pdu.csg == 2 or (pdu.transit and pdu.nsg == 2):
        raise pdu_error(h, "reserved login stage code 2")


_ENCODE_CHECKS: dict[type[Pdu], Callable[[Any], None]] = {
    LoginRequest: _login_stages_to_send,
    LoginResponse: _login_stages_to_send,
}
_DECODE_CHECKS: dict[type[Pdu], Callable[[Buffer, Any], None]] = {
    LoginRequest: _login_stages_received,
    LoginResponse: _login_stages_received,
}


# --- generating the encoders and decoders -----------------------------------------------------

_LENGTHS = "lengths"  # bytes 4-7, TotalAHSLength and DataSegmentLength: the codec's own
Unit = tuple[int, str, list[tuple[str, Part]]]  # offset, struct format, (field name, part)s


@dataclass(frozen=True, slots=True)
class _Layout:
    """What the generator needs of one PDU type, read from its field declarations."""

    units: list[Unit]  # the BHS in offset order; fixed bits have the name ""
    segment: list[str]  # the fields the data segment is made of (0, 1 or 2)
    extended: tuple[str, str] | None  # (CDB field, bidirectional read length field): the AHS


def _shift(mask: int) -> int:
    return (mask & -mask).bit_length() - 1


def _layout(cls: type[Pdu]) -> _Layout:
    by_offset: dict[int, tuple[str, list[tuple[str, Part]]]] = {
        0: ("B", []),
        4: ("I", [(_LENGTHS, Fixed(4, "I", 0))]),
    }
    segment: list[str] = []
    sense = []
    cdb = bidi = None
    named: list[tuple[str, Part]] = [("", fixed) for fixed in cls.FIXED]
    for name, wire in wire_of(cls):
        if isinstance(wire, Segment):
            segment.append(name)
            sense.append(wire.sense_length)
        elif isinstance(wire, BidiAhs):
            bidi = name
        else:
            named.append((name, wire))
            if isinstance(wire, Field) and wire.fmt == "16s":
                cdb = name
    for name, part in named:
        fmt = "B" if isinstance(part, Flag) else part.fmt
        unit = by_offset.setdefault(part.offset, (fmt, []))
        if unit[0] != fmt:
            raise TypeError(f"{cls.__name__}: byte {part.offset} packed as {unit[0]} and {fmt}")
        unit[1].append((name, part))
    units = [(offset, fmt, parts) for offset, (fmt, parts) in sorted(by_offset.items())]
    end = 0
    for offset, fmt, _ in units:
        if offset < end:
            raise TypeError(f"{cls.__name__}: fields overlap at byte {offset}")
        end = offset + struct.calcsize(">" + fmt)
    if end > BHS_LENGTH:
        raise TypeError(f"{cls.__name__}: fields beyond byte {BHS_LENGTH}")
    if sense not in ([], [False], [True, False]):
        raise TypeError(f"{cls.__name__}: a data segment is one field, or sense data and the rest")
    if (cdb is None) != (bidi is None):
        raise TypeError(f"{cls.__name__}: an extended CDB needs both the CDB and the AHS field")
    return _Layout(units, segment, (cdb, bidi) if cdb and bidi else None)


def _variable(parts: list[tuple[str, Part]]) -> bool:
    return any(not isinstance(part, Fixed) for _, part in parts)


def _struct(units: list[Unit], keep: Callable[[list[tuple[str, Part]]], bool]) -> struct.Struct:
    """The 48 bytes with the kept units, and pad bytes elsewhere."""
    fmt = ">"
    pos = 0
    for offset, unit, parts in units:
        if not keep(parts):
            continue
        if offset > pos:
            fmt += f"{offset - pos}x"
        fmt += unit
        pos = offset + struct.calcsize(">" + unit)
    if pos < BHS_LENGTH:
        fmt += f"{BHS_LENGTH - pos}x"
    return struct.Struct(fmt)


def _encoder_source(cls: type[Pdu], layout: _Layout) -> str:
    body: list[str] = []
    if cls in _ENCODE_CHECKS:
        body.append("check_out(self)")
    extended = layout.extended
    if extended:
        cdb, bidi = extended
        body += [
            f"cdb = self.{cdb}",
            f"if len(cdb) == 16 and self.{bidi} is None:",
            "    ahs = b''",
            "else:",
            "    cdb, ahs = command_ahs(self)",
        ]
    segment = layout.segment
    if not segment:
        body.append("data = b''")
        lengths = "0"
    else:
        if len(segment) == 1:
            body.append(f"data = self.{segment[0]}")
        else:
            body.append(f"data = sense_segment(self.{segment[0]}, self.{segment[1]})")
        body += [
            "n = len(data)",
            "if n > MAX_DATA:",
            "    raise LocalProtocolError(f'data segment of {n} bytes exceeds 2**24-1')",
        ]
        lengths = "n"
    if extended:
        lengths = f"len(ahs) << 22 | {lengths}"
    values: list[str] = []
    for offset, _, parts in layout.units:
        const = cls.opcode if offset == 0 else 0
        terms: list[str] = []
        for name, part in parts:
            if name == _LENGTHS:
                terms.append(lengths)
            elif isinstance(part, Fixed):
                const |= part.value
            elif isinstance(part, Flag):
                terms.append(f"({part.mask} if self.{name} else 0)")
            elif extended and name == extended[0]:
                terms.append("cdb")
            elif part.mask:
                shift = _shift(part.mask)
                body += [
                    f"if self.{name} & {~(part.mask >> shift)}:",
                    "    raise out_of_range(self)",
                ]
                terms.append(f"self.{name} << {shift}" if shift else f"self.{name}")
            else:
                terms.append(f"self.{name}")
        if const or not terms:
            terms.insert(0, str(const))
        values.append(" | ".join(terms))
    header = f"PACK({', '.join(values)})"
    if extended:
        body += [f"header = {header}", "return (header + ahs if ahs else header), data"]
    else:
        body.append(f"return {header}, data")
    lines = "\n".join("    " + line for line in body)
    return f"def encode_{cls.__name__}(self):\n{lines}\n"


def _decoder_source(cls: type[Pdu], layout: _Layout) -> str:
    body: list[str] = []
    if not layout.extended:
        body += ["if ahs:", f"    raise pdu_error(h, '{cls.NAME} carries an AHS')"]
    if not layout.segment:
        body += ["if data:", f"    raise pdu_error(h, '{cls.NAME} carries a data segment')"]
    kept = [unit for unit in layout.units if _variable(unit[2])]
    names = [f"u{offset}" for offset, _, _ in kept]
    body.append(f"{', '.join(names)}{',' if len(names) == 1 else ''} = UNPACK(h)")
    value: dict[str, str] = {}
    for offset, fmt, parts in kept:
        unit = f"u{offset}"
        whole = (1 << 8 * struct.calcsize(">" + fmt)) - 1
        for name, part in parts:
            if isinstance(part, Flag):
                value[name] = f"({unit} & {part.mask}) != 0"
            elif isinstance(part, Field):
                shift = _shift(part.mask)
                if not part.mask:
                    value[name] = unit
                elif part.mask == whole >> shift << shift:  # the top bits: no mask needed
                    value[name] = f"{unit} >> {shift}"
                elif shift:
                    value[name] = f"({unit} & {part.mask}) >> {shift}"
                else:
                    value[name] = f"{unit} & {part.mask}"
                if part.most is not None:
                    body += [
                        f"v_{name} = {value[name]}",
                        f"if v_{name} > {int(part.most)}:",
                        f"    raise pdu_error(h, f'{cls.NAME}: reserved {part.rfc} {{v_{name}}}')",
                    ]
                    value[name] = f"v_{name}"
    if layout.extended:
        cdb, bidi = layout.extended
        body += [
            f"v_{cdb} = {value[cdb]}",
            f"v_{bidi} = None",
            "if ahs:",
            f"    v_{cdb}, v_{bidi} = parse_command_ahs(h, ahs, v_{cdb})",
        ]
        value[cdb], value[bidi] = f"v_{cdb}", f"v_{bidi}"
    segment = layout.segment
    if len(segment) == 1:
        value[segment[0]] = "data"
    elif len(segment) == 2:
        body.append(f"v_sense, v_rest = split_sense(h, data, '{cls.NAME}')")
        value[segment[0]], value[segment[1]] = "v_sense", "v_rest"
    # positional, in field order: much cheaper than keywords on the hot path
    construct = f"{cls.__name__}({', '.join(value[name] for name, _ in wire_of(cls))})"
    if cls in _DECODE_CHECKS:
        body += [f"pdu = {construct}", "check_in(h, pdu)", "return pdu"]
    else:
        body.append(f"return {construct}")
    lines = "\n".join("    " + line for line in body)
    return f"def decode_{cls.__name__}(h, ahs, data):\n{lines}\n"


_SOURCES: dict[type[Pdu], str] = {}


def _compile(cls: type[Pdu], function: str, source: str, names: dict[str, object]) -> Any:
    """Define `function` from `source`; tracebacks through it show the generated lines."""
    _SOURCES[cls] = _SOURCES.get(cls, "") + source
    filename = f"<pdu codec {function}>"
    namespace = dict(names)
    exec(compile(source, filename, "exec"), namespace)  # the source comes from our own tables
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return namespace[function]


def _build(cls: type[Pdu]) -> tuple[Encoder, Decoder]:
    layout = _layout(cls)
    names: dict[str, object] = {  # what the generated code refers to
        cls.__name__: cls,
        "PACK": _struct(layout.units, lambda parts: True).pack,
        "UNPACK": _struct(layout.units, _variable).unpack_from,
        "check_out": _ENCODE_CHECKS.get(cls),
        "check_in": _DECODE_CHECKS.get(cls),
        "command_ahs": _command_ahs,
        "parse_command_ahs": _parse_command_ahs,
        "sense_segment": _sense_segment,
        "split_sense": _split_sense,
        "pdu_error": pdu_error,
        "out_of_range": _out_of_range,
        "LocalProtocolError": LocalProtocolError,
        "MAX_DATA": MAX_DATA_SEGMENT_LENGTH,
    }
    name = cls.__name__
    encoder = _compile(cls, f"encode_{name}", _encoder_source(cls, layout), names)
    decoder = _compile(cls, f"decode_{name}", _decoder_source(cls, layout), names)
    return encoder, decoder


DECODERS: dict[int, Decoder] = {}  # by opcode (int keys: cheaper lookups than IntEnum keys)
for _cls in INITIATOR_PDUS + TARGET_PDUS:
    # the encoder becomes the class's `encode_bhs` method: cheaper to reach than a dict entry
    _cls.encode_bhs, DECODERS[int(_cls.opcode)] = _build(_cls)  # type: ignore[method-assign,assignment]


def codec_source(cls: type[Pdu]) -> str:
    """The generated encoder and decoder of a PDU type, as Python source."""
    return _SOURCES[cls]


# --- encoding ---------------------------------------------------------------------------------


def encode_pdu(pdu: Pdu, header_digest: bool = False, data_digest: bool = False) -> list[Buffer]:
    """The PDU as buffers for `transport.writelines`: header (+AHS, +digest), data, pad+digest.

    The data segment object is passed through, never copied. Raises LocalProtocolError for
    fields out of range.
    """
    try:
        header, data = pdu.encode_bhs()
    except (struct.error, TypeError) as exc:
        raise _out_of_range(pdu, exc) from None
    if header_digest:
        header = header + crc32c(header).to_bytes(4, "little")
    if not data:
        return [header]
    pad = _PAD[len(data) % 4]
    if data_digest:
        digest = crc32c(data)
        if pad:
            digest = crc32c(pad, digest)
        return [header, data, pad + digest.to_bytes(4, "little")]
    if pad:
        return [header, data, pad]
    return [header, data]


# --- decoding ---------------------------------------------------------------------------------


def decode_pdu(header: Buffer, ahs: Buffer = b"", data: Buffer = _EMPTY) -> Pdu:
    """Decode one PDU from its BHS, its AHS bytes and its data segment (no padding/digests).

    Raises RemoteProtocolError (with the Reject reason and the header) for an unknown or
    vendor-specific opcode (COMMAND_NOT_SUPPORTED), lengths that disagree with the header,
    reserved code values in defined fields and segments a PDU type cannot carry.
    """
    if len(header) != BHS_LENGTH:
        raise RemoteProtocolError(
            f"basic header segment is {len(header)} bytes, not 48",
            header=bytes(header[:BHS_LENGTH]) or None,
        )
    decoder = DECODERS.get(header[0] & 0x3F)
    if decoder is None:
        raise pdu_error(
            header,
            f"unsupported opcode 0x{header[0] & 0x3F:02x}",
            RejectReason.COMMAND_NOT_SUPPORTED,
        )
    if _U32.unpack_from(header, 4)[0] != (len(ahs) << 22 | len(data)) or len(ahs) & 3:
        raise pdu_error(
            header,
            "AHS or data length disagrees with TotalAHSLength/DataSegmentLength",
            RejectReason.PROTOCOL_ERROR,
        )
    if not isinstance(data, memoryview):
        data = memoryview(data)
    return decoder(header, ahs, data)
