"""iSCSI PDU codec (RFC 7143 section 11), sans-IO.

Every PDU is a 48-byte Basic Header Segment (BHS), optional Additional Header Segments (AHS),
an optional header digest, an optional data segment padded to 4 bytes and an optional data
digest. One slotted dataclass per PDU type; fields are named after the RFC in snake_case and
hold raw wire values (LUN as the 64-bit field, see `lun_number` / `lun_field`).

    decode_pdu(header, ahs, data) -> Pdu        # one PDU whose segments are already split
    encode_pdu(pdu, header_digest, data_digest) -> list of buffers for transport.writelines
    PduReader                                   # splits a byte stream into PDUs

The package: `enums` (the code values, one set), `messages` (the dataclasses, each with its
BHS described once as a table), `codec` (encoders and decoders generated from those tables),
`reader` (framing a byte stream). Everything public is importable from here.
"""

from lunastor.iscsi.errors import FramingError
from lunastor.iscsi.pdu.codec import codec_source, decode_pdu, encode_pdu
from lunastor.iscsi.pdu.enums import (
    BHS_LENGTH,
    MAX_AHS_LENGTH,
    MAX_DATA_SEGMENT_LENGTH,
    RESERVED_TAG,
    AhsType,
    AsyncEvent,
    LogoutReason,
    LogoutResponseCode,
    Opcode,
    SnackType,
    Stage,
    TaskAttribute,
    TmfFunction,
    TmfResponse,
)
from lunastor.iscsi.pdu.messages import (
    INITIATOR_PDUS,
    R2T,
    TARGET_PDUS,
    AsyncMessage,
    Buffer,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    Pdu,
    Reject,
    ScsiCommand,
    ScsiResponse,
    SnackRequest,
    TaskManagementRequest,
    TaskManagementResponse,
    TextRequest,
    TextResponse,
    lun_field,
    lun_number,
)
from lunastor.iscsi.pdu.reader import Frame, PduReader

__all__ = [
    "BHS_LENGTH",
    "INITIATOR_PDUS",
    "MAX_AHS_LENGTH",
    "MAX_DATA_SEGMENT_LENGTH",
    "R2T",
    "RESERVED_TAG",
    "TARGET_PDUS",
    "AhsType",
    "AsyncEvent",
    "AsyncMessage",
    "Buffer",
    "DataIn",
    "DataOut",
    "Frame",
    "FramingError",
    "LoginRequest",
    "LoginResponse",
    "LogoutReason",
    "LogoutRequest",
    "LogoutResponse",
    "LogoutResponseCode",
    "NopIn",
    "NopOut",
    "Opcode",
    "Pdu",
    "PduReader",
    "Reject",
    "ScsiCommand",
    "ScsiResponse",
    "SnackRequest",
    "SnackType",
    "Stage",
    "TaskAttribute",
    "TaskManagementRequest",
    "TaskManagementResponse",
    "TextRequest",
    "TextResponse",
    "TmfFunction",
    "TmfResponse",
    "codec_source",
    "decode_pdu",
    "encode_pdu",
    "lun_field",
    "lun_number",
]
