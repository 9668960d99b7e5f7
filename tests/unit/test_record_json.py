"""Record.to_json (lunastor/common/records.py) writes exactly what it wrote through
`dataclasses.asdict`: records already in etcd compare equal to new ones byte for byte (meta's
idempotent writes and the chunk servers' "unless it says the same" checks rely on it)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lunastor.common.events import EventRecord
from lunastor.common.records import (
    ChunkServerStatus,
    DataDirCapacity,
    ExtentRecord,
    LunRecord,
    OperationRecord,
    Record,
    VolumeRecord,
)


def as_before(rec: Record) -> bytes:
    body = {"v": rec.VERSION, **dataclasses.asdict(rec)}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


@dataclasses.dataclass
class Holder(Record):
    """A record with nested dataclasses (none of ours has one today; the encoding allows it)."""

    dirs: list[DataDirCapacity] = dataclasses.field(default_factory=list)
    one: DataDirCapacity | None = None
    by: dict[str, DataDirCapacity] = dataclasses.field(default_factory=dict)


RECORDS: list[Record] = [
    VolumeRecord(
        id="vol-0123456789abcdef",
        name="pvc-1",
        size_bytes=1 << 30,
        target=3,
        lun=7,
        labels={"a": "b"},
        source={"snapshot_id": "snap-1"},
        zones=["z1", "z2"],
        qos={"iops": 100},
        base=[{"volume": "vol-x", "epoch": 2}],
        created_at=1.5,
    ),
    LunRecord(volume_id="vol-1", initiators=["iqn.a", "iqn.b"]),
    ExtentRecord("vol-1", 3, gen=2, replicas=["chunk-1", "chunk-2"], strays=["chunk-3"]),
    ChunkServerStatus(
        id="chunk-1",
        data_dirs=[dataclasses.asdict(DataDirCapacity("/d", 10, 5))],
        data_workers=["127.0.0.1:1", "127.0.0.1:2"],
        started_at=2.25,
    ),
    Holder(dirs=[DataDirCapacity("/a", 1, 1)], one=DataDirCapacity("/b", 2, 2, "failed", "x")),
    Holder(by={"k": DataDirCapacity("/c", 3, 3)}),
]


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: type(r).__name__)
def test_to_json_is_what_asdict_gave(rec: Record) -> None:
    assert rec.to_json() == as_before(rec)
    assert type(rec).from_json(rec.to_json()) == rec or isinstance(rec, Holder)


def test_event_and_operation_records_too() -> None:
    for cls in (EventRecord, OperationRecord):
        rec = cls()  # every field has a default
        assert rec.to_json() == as_before(rec)


def test_a_value_json_cannot_encode_still_fails() -> None:
    with pytest.raises(TypeError):
        LunRecord(volume_id="v", initiators={"a"}).to_json()  # type: ignore[arg-type]


def test_from_json_leaves_out_fields_a_newer_writer_added() -> None:
    # from_json passes a record's own fields straight to the class and filters only when
    # the stored JSON has more (a newer version's): both ways must decode
    raw = b'{"v":1,"volume_id":"vol-1","initiators":["iqn.a"],"added_later":{"x":1}}'
    assert LunRecord.from_json(raw) == LunRecord(volume_id="vol-1", initiators=["iqn.a"])
    assert LunRecord.from_json(b'{"v":1,"volume_id":"vol-1"}') == LunRecord(volume_id="vol-1")


def test_each_record_class_decodes_with_its_own_fields() -> None:
    # the fields are looked up once per class and kept: a second class's decode must not
    # use the first one's (VolumeRecord has no `volume_id`, LunRecord no `id` or `name`)
    raw = b'{"v":1,"id":"vol-1","name":"n","volume_id":"x"}'
    assert VolumeRecord.from_json(raw) == VolumeRecord(id="vol-1", name="n")
    assert LunRecord.from_json(raw) == LunRecord(volume_id="x")
