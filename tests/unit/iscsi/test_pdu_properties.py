"""Hypothesis: every PDU type survives encode -> stream in arbitrary pieces -> decode."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lunastor.iscsi.pdu import INITIATOR_PDUS, TARGET_PDUS, Pdu, encode_pdu
from tests.unit.iscsi.wire import read_all

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
DATA = st.binary(max_size=300)

# field name -> values the wire can carry; names not listed are 32-bit counters or tags
FIELDS: dict[str, st.SearchStrategy[object]] = {
    "lun": st.integers(0, 2**64 - 1),
    "isid": st.integers(0, 2**48 - 1),
    "tsih": U16,
    "cid": U16,
    "time2wait": U16,
    "time2retain": U16,
    "parameter1": U16,
    "parameter2": U16,
    "parameter3": U16,
    "version_max": U8,
    "version_min": U8,
    "version_active": U8,
    "status": U8,
    "response": U8,
    "status_class": U8,
    "status_detail": U8,
    "async_event": U8,
    "async_vcode": U8,
    "csg": st.sampled_from([0, 1, 3]),
    "nsg": st.sampled_from([0, 1, 3]),
    "attr": st.integers(0, 4),
    "function": st.integers(0, 0x7F),
    "snack_type": st.integers(0, 3),
    "cdb": st.binary(min_size=16, max_size=260),
    "bidi_expected_read_length": st.none() | U32,
    "data": DATA,
    "sense": DATA,
    "response_data": DATA,
    "event_data": DATA,
    "header": DATA,
}
REASONS = {"LogoutRequest": st.integers(0, 2), "Reject": U8}


def pdu_strategy(cls: type[Pdu]) -> st.SearchStrategy[Pdu]:
    kwargs: dict[str, st.SearchStrategy[object]] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if field.name == "reason":
            kwargs[field.name] = REASONS[cls.__name__]
        elif field.type == "bool":
            kwargs[field.name] = st.booleans()
        else:
            kwargs[field.name] = FIELDS.get(field.name, U32)
    return st.builds(cls, **kwargs)


@pytest.mark.parametrize("cls", INITIATOR_PDUS + TARGET_PDUS, ids=lambda c: c.__name__)
@given(data=st.data(), header_digest=st.booleans(), data_digest=st.booleans())
def test_round_trip_in_random_pieces(
    cls: type[Pdu], data: st.DataObject, header_digest: bool, data_digest: bool
) -> None:
    pdus = data.draw(st.lists(pdu_strategy(cls), min_size=1, max_size=3))
    wire = b"".join(
        b"".join(encode_pdu(p, header_digest=header_digest, data_digest=data_digest)) for p in pdus
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    assert read_all(pieces, header_digest=header_digest, data_digest=data_digest) == pdus
