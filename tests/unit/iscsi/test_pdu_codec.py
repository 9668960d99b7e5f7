"""Table-driven PDU codec cases in both directions, each also fed one byte at a time.

Wire images are written by hand from the RFC 7143 section 11 figures, one 4-byte word per
group, so they check the codec against the RFC rather than against itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lunastor.iscsi.errors import LocalProtocolError
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
    Opcode,
    Pdu,
    Reject,
    ScsiCommand,
    ScsiResponse,
    SnackRequest,
    TaskManagementRequest,
    TaskManagementResponse,
    TextRequest,
    TextResponse,
    codec_source,
    decode_pdu,
    encode_pdu,
    lun_field,
    lun_number,
)
from lunastor.iscsi.pdu.codec import _build
from lunastor.iscsi.pdu.messages import number
from tests.unit.iscsi.wire import hexbytes, one_byte_at_a_time, read_all

READ10 = hexbytes("28000000 00000000 08000000 00000000")
CDB32 = bytes(range(0x40, 0x60))
SENSE = hexbytes("70000500 0000000a 00000000 24000000 0000")  # ILLEGAL REQUEST, 24/00

# (name, pdu, wire image without digests)
CASES: list[tuple[str, Pdu, bytes]] = [
    (
        "nop-out ping",
        NopOut(immediate=True, itt=0x11, ttt=0xFFFFFFFF, cmdsn=9, expstatsn=4, data=b"ping"),
        hexbytes(
            "40 80 0000 | 00 000004 | 00000000 00000000 | 00000011 | ffffffff | 00000009"
            "| 00000004 | 00000000 00000000 00000000 00000000 | 70696e67"
        ),
    ),
    (
        "scsi command read(10)",
        ScsiCommand(
            final=True,
            read=True,
            attr=1,
            lun=lun_field(1),
            itt=0x10,
            expected_data_transfer_length=4096,
            cmdsn=5,
            expstatsn=7,
            cdb=READ10,
        ),
        hexbytes(
            "01 c1 0000 | 00 000000 | 00010000 00000000 | 00000010 | 00001000 | 00000005"
            "| 00000007 | 28000000 00000000 08000000 00000000"
        ),
    ),
    (
        "scsi command, extended CDB, bidi AHS and immediate data",
        ScsiCommand(
            immediate=True,
            final=True,
            read=True,
            write=True,
            attr=2,
            lun=lun_field(300),
            itt=1,
            expected_data_transfer_length=5,
            cmdsn=1,
            expstatsn=2,
            cdb=CDB32,
            bidi_expected_read_length=512,
            data=b"abcde",
        ),
        hexbytes(
            "41 e2 0000 | 07 000005 | 412c0000 00000000 | 00000001 | 00000005 | 00000001"
            "| 00000002 | 40414243 44454647 48494a4b 4c4d4e4f"
            # extended CDB AHS: AHSLength 17, type 1, reserved, 16 CDB bytes (20 bytes, no pad)
            "| 0011 01 00 | 50515253 54555657 58595a5b 5c5d5e5f"
            # bidirectional read length AHS: AHSLength 5, type 2, reserved, length
            "| 0005 02 00 | 00000200"
            "| 61626364 65000000"
        ),
    ),
    (
        "task management abort task",
        TaskManagementRequest(
            immediate=True,
            function=1,
            lun=lun_field(2),
            itt=0x20,
            referenced_task_tag=0x10,
            cmdsn=8,
            expstatsn=3,
            ref_cmdsn=6,
            exp_data_sn=2,
        ),
        hexbytes(
            "42 81 0000 | 00 000000 | 00020000 00000000 | 00000020 | 00000010 | 00000008"
            "| 00000003 | 00000006 | 00000002 | 00000000 00000000"
        ),
    ),
    (
        "login request security -> operational",
        LoginRequest(
            transit=True,
            csg=0,
            nsg=1,
            isid=0x023D00000001,
            tsih=0,
            itt=0,
            cid=0,
            cmdsn=1,
            expstatsn=0,
            data=b"InitiatorName=iqn.x\0",
        ),
        hexbytes(
            "43 81 00 00 | 00 000014 | 023d0000 00010000 | 00000000 | 0000 0000 | 00000001"
            "| 00000000 | 00000000 00000000 00000000 00000000"
            "| 496e6974 6961746f 724e616d 653d6971 6e2e7800"
        ),
    ),
    (
        "login request continue, operational -> ffp, cid 5",
        LoginRequest(
            cont=True, csg=1, nsg=3, isid=1, tsih=7, itt=3, cid=5, cmdsn=2, expstatsn=1, data=b"A"
        ),
        hexbytes(
            "43 47 00 00 | 00 000001 | 00000000 00010007 | 00000003 | 0005 0000 | 00000002"
            "| 00000001 | 00000000 00000000 00000000 00000000 | 41000000"
        ),
    ),
    (
        "text request sendtargets",
        TextRequest(
            final=True, itt=4, ttt=0xFFFFFFFF, cmdsn=3, expstatsn=2, data=b"SendTargets=All\0"
        ),
        hexbytes(
            "04 80 0000 | 00 000010 | 00000000 00000000 | 00000004 | ffffffff | 00000003"
            "| 00000002 | 00000000 00000000 00000000 00000000"
            "| 53656e64 54617267 6574733d 416c6c00"
        ),
    ),
    (
        "data-out final",
        DataOut(
            final=True,
            lun=lun_field(1),
            itt=0x10,
            ttt=0x99,
            expstatsn=7,
            data_sn=3,
            buffer_offset=8192,
            data=b"\x01\x02",
        ),
        hexbytes(
            "05 80 0000 | 00 000002 | 00010000 00000000 | 00000010 | 00000099 | 00000000"
            "| 00000007 | 00000000 | 00000003 | 00002000 | 00000000 | 01020000"
        ),
    ),
    (
        "logout request close connection",
        LogoutRequest(immediate=True, reason=1, itt=9, cid=2, cmdsn=11, expstatsn=10),
        hexbytes(
            "46 81 0000 | 00 000000 | 00000000 00000000 | 00000009 | 0002 0000 | 0000000b"
            "| 0000000a | 00000000 00000000 00000000 00000000"
        ),
    ),
    (
        "snack status",
        SnackRequest(snack_type=1, itt=0xFFFFFFFF, expstatsn=5, begrun=3, run_length=2),
        hexbytes(
            "10 81 0000 | 00 000000 | 00000000 00000000 | ffffffff | ffffffff | 00000000"
            "| 00000005 | 00000000 00000000 | 00000003 | 00000002"
        ),
    ),
    (
        "nop-in reply",
        NopIn(itt=0x11, statsn=4, expcmdsn=10, maxcmdsn=73, data=b"ping"),
        hexbytes(
            "20 80 0000 | 00 000004 | 00000000 00000000 | 00000011 | ffffffff | 00000004"
            "| 0000000a | 00000049 | 00000000 00000000 00000000 | 70696e67"
        ),
    ),
    (
        "scsi response check condition with sense",
        ScsiResponse(
            underflow=True,
            status=0x02,
            itt=0x10,
            statsn=4,
            expcmdsn=6,
            maxcmdsn=69,
            residual_count=512,
            sense=SENSE,
        ),
        hexbytes(
            "21 82 00 02 | 00 000014 | 00000000 00000000 | 00000010 | 00000000 | 00000004"
            "| 00000006 | 00000045 | 00000000 | 00000000 | 00000200"
            "| 0012 7000 | 05000000 | 000a0000 | 00002400 | 00000000"
        ),
    ),
    (
        "scsi response good",
        ScsiResponse(itt=1, statsn=1, expcmdsn=2, maxcmdsn=3),
        hexbytes(
            "21 80 00 00 | 00 000000 | 00000000 00000000 | 00000001 | 00000000 | 00000001"
            "| 00000002 | 00000003 | 00000000 00000000 00000000"
        ),
    ),
    (
        "task management response",
        TaskManagementResponse(response=1, itt=0x20, statsn=5, expcmdsn=9, maxcmdsn=72),
        hexbytes(
            "22 80 01 00 | 00 000000 | 00000000 00000000 | 00000020 | 00000000 | 00000005"
            "| 00000009 | 00000048 | 00000000 00000000 00000000"
        ),
    ),
    (
        "login response target moved temporarily",
        LoginResponse(
            csg=0,
            nsg=0,
            isid=0x023D00000001,
            itt=0,
            statsn=0,
            expcmdsn=1,
            maxcmdsn=1,
            status_class=1,
            status_detail=1,
            data=b"TargetAddress=10.0.0.2:3260,1\0",
        ),
        hexbytes(
            "23 00 00 00 | 00 00001e | 023d0000 00010000 | 00000000 | 00000000 | 00000000"
            "| 00000001 | 00000001 | 0101 0000 | 00000000 00000000"
            "| 54617267 65744164 64726573 733d3130 2e302e30 2e323a33 3236302c 3100"
            "0000"  # pad
        ),
    ),
    (
        "login response operational -> ffp success",
        LoginResponse(
            transit=True,
            csg=1,
            nsg=3,
            version_max=0,
            version_active=0,
            isid=5,
            tsih=0x1234,
            itt=7,
            statsn=1,
            expcmdsn=3,
            maxcmdsn=66,
        ),
        hexbytes(
            "23 87 00 00 | 00 000000 | 00000000 00051234 | 00000007 | 00000000 | 00000001"
            "| 00000003 | 00000042 | 0000 0000 | 00000000 00000000"
        ),
    ),
    (
        "text response with continue",
        TextResponse(
            final=False, cont=True, itt=4, ttt=0x55, statsn=2, expcmdsn=4, maxcmdsn=67, data=b"Ta"
        ),
        hexbytes(
            "24 40 0000 | 00 000002 | 00000000 00000000 | 00000004 | 00000055 | 00000002"
            "| 00000004 | 00000043 | 00000000 00000000 00000000 | 54610000"
        ),
    ),
    (
        "data-in final with status",
        DataIn(
            final=True,
            status_present=True,
            underflow=True,
            status=0,
            lun=lun_field(1),
            itt=0x10,
            statsn=4,
            expcmdsn=6,
            maxcmdsn=69,
            data_sn=0,
            buffer_offset=0,
            residual_count=4093,
            data=b"xyz",
        ),
        hexbytes(
            "25 83 00 00 | 00 000003 | 00010000 00000000 | 00000010 | ffffffff | 00000004"
            "| 00000006 | 00000045 | 00000000 | 00000000 | 00000ffd | 78797a00"
        ),
    ),
    (
        "logout response",
        LogoutResponse(itt=9, statsn=7, expcmdsn=12, maxcmdsn=75, time2wait=2, time2retain=20),
        hexbytes(
            "26 80 00 00 | 00 000000 | 00000000 00000000 | 00000009 | 00000000 | 00000007"
            "| 0000000c | 0000004b | 00000000 | 0002 0014 | 00000000"
        ),
    ),
    (
        "r2t",
        R2T(
            lun=lun_field(1),
            itt=0x10,
            ttt=0x99,
            statsn=5,
            expcmdsn=6,
            maxcmdsn=69,
            r2t_sn=1,
            buffer_offset=65536,
            desired_data_transfer_length=262144,
        ),
        hexbytes(
            "31 80 0000 | 00 000000 | 00010000 00000000 | 00000010 | 00000099 | 00000005"
            "| 00000006 | 00000045 | 00000001 | 00010000 | 00040000"
        ),
    ),
    (
        "async message logout requested",
        AsyncMessage(
            statsn=8, expcmdsn=9, maxcmdsn=72, async_event=1, parameter3=5, event_data=b"\x01"
        ),
        hexbytes(
            "32 80 0000 | 00 000003 | 00000000 00000000 | ffffffff | 00000000 | 00000008"
            "| 00000009 | 00000048 | 01 00 0000 | 0000 0005 | 00000000 | 00000100"
        ),
    ),
    (
        "reject with offending header",
        Reject(reason=0x09, statsn=3, expcmdsn=4, maxcmdsn=67, header=bytes(range(48))),
        hexbytes(
            "3f 80 09 00 | 00 000030 | 00000000 00000000 | ffffffff | 00000000 | 00000003"
            "| 00000004 | 00000043 | 00000000 00000000 00000000"
        )
        + bytes(range(48)),
    ),
]

IDS = [c[0] for c in CASES]


@pytest.mark.parametrize(("name", "pdu", "wire"), CASES, ids=IDS)
def test_encode_matches_rfc_layout(name: str, pdu: Pdu, wire: bytes) -> None:
    assert b"".join(encode_pdu(pdu)) == wire


@pytest.mark.parametrize(("name", "pdu", "wire"), CASES, ids=IDS)
def test_decode_whole(name: str, pdu: Pdu, wire: bytes) -> None:
    assert read_all([wire]) == [pdu]


@pytest.mark.parametrize(("name", "pdu", "wire"), CASES, ids=IDS)
def test_decode_one_byte_at_a_time(name: str, pdu: Pdu, wire: bytes) -> None:
    assert read_all(one_byte_at_a_time(wire)) == [pdu]


@pytest.mark.parametrize("digests", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize(("name", "pdu", "wire"), CASES, ids=IDS)
def test_digests_round_trip_byte_at_a_time(
    name: str, pdu: Pdu, wire: bytes, digests: tuple[bool, bool]
) -> None:
    hd, dd = digests
    encoded = b"".join(encode_pdu(pdu, header_digest=hd, data_digest=dd))
    assert len(encoded) == len(wire) + 4 * hd + 4 * (dd and len(wire) > 48 + 4 * wire[4])
    assert read_all(one_byte_at_a_time(encoded), header_digest=hd, data_digest=dd) == [pdu]


def test_all_cases_in_one_blob() -> None:
    blob = b"".join(wire for _, _, wire in CASES)
    assert read_all([blob]) == [pdu for _, pdu, _ in CASES]


def test_decode_pdu_on_split_segments() -> None:
    _, pdu, wire = CASES[2]  # the one with AHS and data
    ahs_len = wire[4] * 4
    header, ahs, data = wire[:48], wire[48 : 48 + ahs_len], wire[48 + ahs_len : 48 + ahs_len + 5]
    assert decode_pdu(header, ahs, memoryview(data)) == pdu


def test_data_digest_uses_rfc3720_byte_order() -> None:
    # RFC 3720 B.4: CRC32C of 32 bytes of zeroes is transmitted as aa 36 91 8a
    wire = encode_pdu(NopIn(data=bytes(32)), data_digest=True)
    assert bytes(wire[-1]) == hexbytes("aa36918a")


def test_data_segment_is_not_copied() -> None:
    payload = bytearray(b"q" * 4096)
    buffers = encode_pdu(DataIn(data=memoryview(payload)), data_digest=True)
    assert buffers[1].obj is payload  # type: ignore[union-attr]
    blob = b"".join(encode_pdu(DataOut(data=bytes(4096))))
    (pdu,) = read_all([blob])
    assert isinstance(pdu, DataOut)
    assert isinstance(pdu.data, memoryview) and pdu.data.obj is blob


@pytest.mark.parametrize(
    ("pdu", "message"),
    [
        (NopOut(itt=1 << 32), "field out of range"),
        (LoginRequest(isid=1 << 48), "ISID"),
        (LoginRequest(csg=2), "stage"),
        (LogoutResponse(time2wait=1 << 16), "Time2Wait"),
        (ScsiCommand(cdb=bytes(2000)), "AHS"),
        (ScsiResponse(sense=bytes(70000)), "sense"),
        (AsyncMessage(parameter1=1 << 16), "Parameter1"),
        (LoginResponse(status_class=256), "status"),
        # bit fields sharing a byte: an oversized value must not spill into its neighbours
        (ScsiCommand(attr=8), "ATTR"),
        (TaskManagementRequest(function=0x80), "Function"),
        (LoginRequest(tsih=1 << 16), "TSIH"),
    ],
)
def test_encode_refuses_fields_out_of_range(pdu: Pdu, message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        encode_pdu(pdu)


def test_short_cdb_is_zero_padded() -> None:
    wire = b"".join(encode_pdu(ScsiCommand(cdb=b"\x00" * 6)))
    assert wire[32:48] == bytes(16)


@pytest.mark.parametrize(
    ("field", "number"),
    [
        (0x0000000000000000, 0),
        (0x0001000000000000, 1),
        (0x00FF000000000000, 255),
        (0x4100000000000000, 256),
        (0x7FFF000000000000, 16383),
    ],
)
def test_lun_addressing_both_ways(field: int, number: int) -> None:
    assert lun_field(number) == field
    assert lun_number(field) == number


def test_lun_flat_form_of_small_numbers_is_understood() -> None:
    assert lun_number(0x4005000000000000) == 5


@pytest.mark.parametrize(
    "field",
    [
        0x0101000000000000,  # peripheral addressing on bus 1
        0xC101000000000000,  # REPORT LUNS well-known LUN (extended addressing)
        0x8001000000000000,  # logical unit addressing
        0x0001000100000000,  # second level
    ],
)
def test_lun_forms_we_cannot_address(field: int) -> None:
    assert lun_number(field) is None


@pytest.mark.parametrize("number", [-1, 16384])
def test_lun_field_out_of_range(number: int) -> None:
    with pytest.raises(LocalProtocolError):
        lun_field(number)


def test_one_set_of_enums() -> None:
    """The codec's task attribute and task management enums are the SCSI layer's: one
    definition each (RFC 7143 11.3.1.3, 11.5.1, 11.6.1), one set of member names."""
    from lunastor.iscsi import pdu as p
    from lunastor.iscsi.scsi import types

    assert p.TaskAttribute is types.TaskAttribute
    assert p.TmfFunction is types.TmfFunction
    assert p.TmfResponse is types.TmfResponse
    assert p.TaskManagementResponse().response == types.TmfResponse.COMPLETE


def test_the_decoders_are_generated_from_the_declarations() -> None:
    source = codec_source(DataIn)
    # one unpack of only the fields Data-In has (bytes 2 and 4-7 are not among them) ...
    assert "u1, u3, u8, u16, u20, u24, u28, u32, u36, u40, u44 = UNPACK(h)" in source
    # ... and the dataclass built positionally
    assert "return DataIn((u1 & 128) != 0," in source


def test_a_bad_declaration_fails_when_its_codec_is_generated() -> None:
    @dataclass(slots=True)
    class Overlapping(Pdu):
        opcode = Opcode.NOP_OUT
        NAME = "overlapping"
        itt: int = number(16, "I", "Initiator Task Tag")
        ttt: int = number(18, "I", "Target Transfer Tag")

    @dataclass(slots=True)
    class Undeclared(Pdu):
        opcode = Opcode.NOP_OUT
        NAME = "undeclared"
        itt: int = 0

    with pytest.raises(TypeError, match="overlap at byte 18"):
        _build(Overlapping)
    with pytest.raises(TypeError, match="itt is not declared"):
        _build(Undeclared)
