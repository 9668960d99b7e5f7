"""Malformed PDUs and the stream reader's limits: each gets its precise typed error."""

from __future__ import annotations

import pytest

from lunastor.iscsi.errors import (
    DataDigestError,
    FramingError,
    HeaderDigestError,
    LoginStatus,
    RejectReason,
    RemoteProtocolError,
)
from lunastor.iscsi.pdu import (
    DataIn,
    DataOut,
    NopOut,
    PduReader,
    ScsiCommand,
    decode_pdu,
    encode_pdu,
)
from tests.unit.iscsi.wire import drain, hexbytes, one_byte_at_a_time

ZERO_WORDS = " 00000000" * 10  # bytes 8-47

# (name, wire image, Reject reason the error must carry)
MALFORMED: list[tuple[str, bytes, RejectReason]] = [
    (
        "unknown opcode 0x07",
        hexbytes("07 80 0000 | 00 000000" + ZERO_WORDS),
        RejectReason.COMMAND_NOT_SUPPORTED,
    ),
    (
        "vendor opcode 0x1c",
        hexbytes("1c 80 0000 | 00 000000" + ZERO_WORDS),
        RejectReason.COMMAND_NOT_SUPPORTED,
    ),
    (
        "reserved task attribute 5",
        hexbytes("01 85 0000 | 00 000000" + ZERO_WORDS),
        RejectReason.INVALID_PDU_FIELD,
    ),
    (
        "reserved logout reason 3",
        hexbytes("06 83 0000 | 00 000000" + ZERO_WORDS),
        RejectReason.INVALID_PDU_FIELD,
    ),
    (
        "reserved snack type 4",
        hexbytes("10 84 0000 | 00 000000" + ZERO_WORDS),
        RejectReason.INVALID_PDU_FIELD,
    ),
    (
        "task management request with data",
        hexbytes("02 81 0000 | 00 000004" + ZERO_WORDS + "61626364"),
        RejectReason.INVALID_PDU_FIELD,
    ),
    (
        "logout request with AHS",
        hexbytes("06 80 0000 | 01 000000" + ZERO_WORDS + "0001 01 00"),
        RejectReason.INVALID_PDU_FIELD,
    ),
    (
        "scsi command with unknown AHS type 3",
        hexbytes("01 81 0000 | 02 000000" + ZERO_WORDS + "0005 03 00 00000000"),
        RejectReason.INVALID_PDU_FIELD,
    ),
    (
        "scsi command AHS overrunning TotalAHSLength",
        hexbytes("01 81 0000 | 01 000000" + ZERO_WORDS + "0009 01 00"),
        RejectReason.INVALID_PDU_FIELD,
    ),
    (
        "scsi command with two extended CDB AHS",
        hexbytes(
            "01 81 0000 | 04 000000" + ZERO_WORDS + "0002 01 00 41000000 | 0002 01 00 42000000"
        ),
        RejectReason.INVALID_PDU_FIELD,
    ),
    (
        "bidi AHS of the wrong length",
        hexbytes("01 81 0000 | 02 000000" + ZERO_WORDS + "0004 02 00 00000000"),
        RejectReason.INVALID_PDU_FIELD,
    ),
    (
        "scsi response SenseLength overruns the segment",
        hexbytes("21 80 0000 | 00 000004" + ZERO_WORDS + "0010 7000"),
        RejectReason.INVALID_PDU_FIELD,
    ),
    (
        "scsi response one-byte data segment",
        hexbytes("21 80 0000 | 00 000001" + ZERO_WORDS + "00000000"),
        RejectReason.INVALID_PDU_FIELD,
    ),
]


@pytest.mark.parametrize(("name", "wire", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_pdu_is_rejected_and_stream_continues(
    name: str, wire: bytes, reason: RejectReason
) -> None:
    ping = b"".join(encode_pdu(NopOut(itt=1, data=b"hi")))
    for chunks in ([wire + ping], one_byte_at_a_time(wire + ping)):
        error, after = drain(PduReader(sender="any"), chunks)
        assert isinstance(error, RemoteProtocolError)
        assert not isinstance(error, FramingError)
        assert error.reason == reason
        assert error.header == wire[:48]
        # the offending PDU was consumed whole: the next one parses
        assert after == NopOut(itt=1, data=b"hi")


def test_login_reserved_stage_is_a_login_failure() -> None:
    wire = hexbytes("43 88 0000 | 00 000000" + ZERO_WORDS)  # CSG=2
    with pytest.raises(RemoteProtocolError) as info:
        decode_pdu(wire)
    assert info.value.login_status == LoginStatus.INITIATOR_ERROR
    assert (info.value.status_class, info.value.status_detail) == (2, 0)


@pytest.mark.parametrize(
    ("header", "ahs", "data"),
    [
        (bytes(47), b"", b""),
        (hexbytes("00 80 0000 | 00 000004" + ZERO_WORDS), b"", b"abc"),
        (hexbytes("00 80 0000 | 01 000000" + ZERO_WORDS), b"", b""),
    ],
)
def test_decode_pdu_refuses_lengths_that_disagree(header: bytes, ahs: bytes, data: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_pdu(header, ahs, memoryview(data))
    assert info.value.reason == RejectReason.PROTOCOL_ERROR


def test_wrong_side_opcode() -> None:
    target_reader = PduReader(sender="initiator")
    target_reader.feed(b"".join(encode_pdu(DataIn(data=b"x"))))
    with pytest.raises(RemoteProtocolError) as info:
        target_reader.next_pdu()
    assert info.value.reason == RejectReason.PROTOCOL_ERROR
    initiator_reader = PduReader(sender="target")
    initiator_reader.feed(b"".join(encode_pdu(DataOut(data=b"x"))))
    with pytest.raises(RemoteProtocolError):
        initiator_reader.next_pdu()


def test_oversized_data_segment_fails_from_the_header_alone() -> None:
    reader = PduReader(max_recv_data_segment_length=8192)
    wire = b"".join(encode_pdu(DataOut(data=bytes(8196))))
    reader.feed(wire[:48])  # nothing beyond the header is needed to refuse it
    with pytest.raises(FramingError) as info:
        reader.next_pdu()
    assert info.value.header == wire[:48]
    reader.feed(wire[48:])
    with pytest.raises(FramingError):  # broken for good: the stream cannot be resynchronised
        reader.next_pdu()


def test_max_recv_data_segment_length_is_switchable() -> None:
    wire = b"".join(encode_pdu(DataOut(data=bytes(8196))))
    reader = PduReader(max_recv_data_segment_length=8192)
    reader.max_recv_data_segment_length = 65536
    reader.feed(wire)
    assert reader.next_pdu() == DataOut(data=bytes(8196))


def test_ahs_cap() -> None:
    cmd = ScsiCommand(cdb=bytes(16 + 300))
    reader = PduReader(max_ahs_length=272)
    reader.feed(b"".join(encode_pdu(cmd))[:48])
    with pytest.raises(FramingError):
        reader.next_pdu()
    reader = PduReader(max_ahs_length=1020)
    reader.feed(b"".join(encode_pdu(cmd)))
    assert reader.next_pdu() == cmd


def test_header_digest_mismatch_breaks_the_reader() -> None:
    wire = bytearray(b"".join(encode_pdu(NopOut(itt=5), header_digest=True)))
    wire[20] ^= 1
    reader = PduReader(header_digest=True)
    reader.feed(bytes(wire))
    with pytest.raises(HeaderDigestError):
        reader.next_pdu()
    reader.feed(b"".join(encode_pdu(NopOut(itt=6), header_digest=True)))
    with pytest.raises(HeaderDigestError):
        reader.next_pdu()


def test_header_digest_is_checked_before_trusting_lengths() -> None:
    # a corrupted DataSegmentLength must surface as a digest error, not a length error
    wire = bytearray(b"".join(encode_pdu(NopOut(itt=5), header_digest=True)))
    wire[5] = 0xFF
    reader = PduReader(header_digest=True)
    reader.feed(bytes(wire))
    with pytest.raises(HeaderDigestError):
        reader.next_pdu()


def test_data_digest_mismatch_drops_only_that_pdu() -> None:
    bad = bytearray(b"".join(encode_pdu(DataOut(itt=1, data=b"abcdef"), data_digest=True)))
    bad[50] ^= 0x40
    good = b"".join(encode_pdu(DataOut(itt=2, data=b"ok"), data_digest=True))
    reader = PduReader(data_digest=True)
    reader.feed(bytes(bad) + good)
    with pytest.raises(DataDigestError) as info:
        reader.next_pdu()
    assert info.value.reason == RejectReason.DATA_DIGEST_ERROR
    assert info.value.header == bytes(bad[:48])
    assert reader.next_pdu() == DataOut(itt=2, data=b"ok")


def test_digests_switch_on_between_pdus() -> None:
    # login runs without digests, the negotiated ones start with the first FFP PDU
    plain = b"".join(encode_pdu(NopOut(itt=1)))
    digested = b"".join(
        encode_pdu(NopOut(itt=2, data=b"abc"), header_digest=True, data_digest=True)
    )
    reader = PduReader()
    got = []
    for byte in one_byte_at_a_time(plain + digested):
        reader.feed(byte)
        pdu = reader.next_pdu()
        if pdu is not None:
            got.append(pdu)
            reader.header_digest = reader.data_digest = True
    assert got == [NopOut(itt=1), NopOut(itt=2, data=b"abc")]
    assert reader.buffered == 0


def test_truncated_stream_leaves_bytes_buffered() -> None:
    wire = b"".join(encode_pdu(NopOut(data=b"abcdef")))
    reader = PduReader()
    reader.feed(wire[:-1])
    assert reader.next_pdu() is None
    assert reader.buffered == len(wire) - 1


def test_feed_copies_mutable_buffers() -> None:
    wire = bytearray(b"".join(encode_pdu(NopOut(data=b"abcd"))))
    reader = PduReader()
    reader.feed(wire)
    wire[48:] = b"XXXX"
    pdu = reader.next_pdu()
    assert isinstance(pdu, NopOut) and bytes(pdu.data) == b"abcd"
