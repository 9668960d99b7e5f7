"""decode_records: one undecodable key is skipped and reported, never fatal."""

from __future__ import annotations

from lunastor.common.etcd import KeyValue
from lunastor.common.records import ChunkAdminRecord, RecordError, decode_records


def kv(key: str, value: bytes) -> KeyValue:
    return KeyValue(key=key, value=value, create_revision=1, mod_revision=1, version=1, lease=0)


def test_bad_records_are_skipped_and_reported() -> None:
    good = ChunkAdminRecord(id="c1", state="drained")
    kvs = [kv("/a", good.to_json()), kv("/b", b"{not json"), kv("/c", b'{"version": 99}')]
    skipped: list[tuple[str, RecordError]] = []
    records = decode_records(kvs, ChunkAdminRecord, lambda key, exc: skipped.append((key, exc)))
    assert records == [good]
    assert [key for key, _ in skipped] == ["/b", "/c"]
    assert decode_records(kvs, ChunkAdminRecord) == [good]
