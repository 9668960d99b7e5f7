"""Sense data encoding and the BlockDevice error mapping."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lunastor.iscsi import blockdev
from lunastor.iscsi.scsi import sense
from lunastor.iscsi.scsi.sense import FieldPointer, build_sense, device_error_check, parse_sense

CODES = [v for v in vars(sense).values() if isinstance(v, sense.SenseCode)]

fields = st.none() | st.builds(
    FieldPointer, st.booleans(), st.integers(0, 0xFFFF), st.none() | st.integers(0, 7)
)


@given(st.sampled_from(CODES), fields, st.none() | st.integers(0, 0xFFFFFFFF), st.booleans())
def test_sense_round_trips_in_both_formats(
    code: sense.SenseCode, field: FieldPointer | None, info: int | None, descriptor: bool
) -> None:
    data = build_sense(code, field, info, descriptor=descriptor)
    parsed = parse_sense(data)
    assert (parsed.key, parsed.asc, parsed.ascq) == (code.key, code.asc, code.ascq)
    assert parsed.field == field and parsed.information == info
    assert parsed.descriptor == descriptor
    assert len(data) == (18 if not descriptor else 8 + data[7])


def test_fixed_sense_layout() -> None:
    data = build_sense(sense.INVALID_FIELD_IN_CDB, FieldPointer(True, 1, 5))
    assert data == bytes.fromhex("700005000000000a00000000240000cd0001")


def test_codes_are_distinct() -> None:
    triples = [(c.key, c.asc, c.ascq) for c in CODES]
    assert len(triples) == len(set(triples))


ERRORS = [
    (blockdev.OutOfRange(), (5, 0x21, 0x00), None),
    (blockdev.MediumError(lba=7), (3, 0x11, 0x00), 7),
    (blockdev.MediumError(lba=9, write=True), (3, 0x0C, 0x00), 9),
    (blockdev.SpaceExhausted(), (7, 0x27, 0x07), None),
    (blockdev.NotReady(), (2, 0x04, 0x0A), None),
    (blockdev.WriteProtected(), (7, 0x27, 0x00), None),
    (blockdev.Miscompare(33), (0xE, 0x1D, 0x00), 33),
    (blockdev.NexusLost(), (0xB, 0x29, 0x07), None),
    (blockdev.BlockDeviceError(), (4, 0x44, 0x00), None),
]


@pytest.mark.parametrize(
    ("error", "ksa", "info"), ERRORS, ids=[type(e[0]).__name__ for e in ERRORS]
)
def test_block_device_errors_map_onto_sense(
    error: blockdev.BlockDeviceError, ksa: tuple[int, int, int], info: int | None
) -> None:
    check = device_error_check(error)
    assert (check.code.key, check.code.asc, check.code.ascq) == ksa
    assert check.information == info


def test_every_block_device_error_class_is_mapped() -> None:
    classes = {type(e) for e, _, _ in ERRORS}
    defined = {
        c
        for c in vars(blockdev).values()
        if isinstance(c, type) and issubclass(c, blockdev.BlockDeviceError)
    }
    assert defined == classes
    assert len({ksa for _, ksa, _ in ERRORS}) == len(ERRORS)  # one-to-one


@given(st.binary(max_size=64))
def test_parse_sense_never_raises_anything_but_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        parse_sense(data)
