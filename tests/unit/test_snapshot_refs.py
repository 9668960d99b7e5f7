"""Snapshot version lookup and GC reference counting, as pure functions (docs/snapshots.md)."""

from __future__ import annotations

import pytest

from lunastor.chunk.replication.extentmap import Entry
from lunastor.chunk.replication.snapshots import pick_preserved
from lunastor.common.records import (
    ExtentRecord,
    SnapshotRecord,
    VolumeRecord,
    parse_preserved,
    preserved_volume,
)
from lunastor.meta.gc import pins, referenced


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("vol-0123456789abcdef.e0", ("vol-0123456789abcdef", 0)),
        ("vol-0123456789abcdef.e17", ("vol-0123456789abcdef", 17)),
        ("vol-0123456789abcdef", None),
        ("vol-1.e", None),
        (".e3", None),
        ("vol-1.ex3", None),
    ],
)
def test_preserved_names(name: str, parsed: tuple[str, int] | None) -> None:
    assert parse_preserved(name) == parsed
    if parsed is not None:
        assert preserved_volume(*parsed) == name


def entry(epoch: int) -> Entry:
    return Entry(ExtentRecord(volume=preserved_volume("v", epoch), index=0), epoch + 100)


@pytest.mark.parametrize(
    ("epochs", "at", "want"),
    [
        ([], 5, None),
        ([0], 0, 0),
        ([0], 7, 0),  # several snapshots with no writes between share one copy
        ([2, 5], 1, None),  # the extent did not exist yet at epoch 1
        ([2, 5], 2, 2),
        ([2, 5], 4, 2),
        ([2, 5], 5, 5),
        ([2, 5], 9, 5),
    ],
)
def test_pick_preserved_takes_the_newest_copy_at_or_before(
    epochs: list[int], at: int, want: int | None
) -> None:
    got = pick_preserved(epochs, at, entry)
    assert (got.mod_revision - 100 if got else None) == want


def test_pins_come_from_snapshots_and_clone_chains() -> None:
    snaps = [
        SnapshotRecord(id="s1", source_volume_id="a", epoch=0),
        SnapshotRecord(id="s2", source_volume_id="c", epoch=3, base=[{"volume": "a", "epoch": 4}]),
    ]
    vols = [
        VolumeRecord(id="a", epoch=5),
        VolumeRecord(id="c", base=[{"volume": "a", "epoch": 4}, {"volume": "b", "epoch": 1}]),
    ]
    assert pins(snaps, vols) == {"a": {0, 4}, "b": {1}, "c": {3}}


def live(volume: str, epoch: int) -> ExtentRecord:
    return ExtentRecord(volume=volume, epoch=epoch)


def kept(volume: str, first: int, until: int) -> ExtentRecord:
    return ExtentRecord(volume=preserved_volume(volume, first), epoch=first, until=until)


@pytest.mark.parametrize(
    ("rec", "alive", "pinned", "want"),
    [
        (live("a", 0), {"a"}, {}, True),  # a volume's own extent while it exists
        (live("a", 2), set(), {}, False),  # deleted, no snapshot
        (live("a", 2), set(), {"a": {1}}, False),  # the snapshot predates its data
        (live("a", 2), set(), {"a": {2}}, True),  # frozen at its epoch
        (live("a", 2), set(), {"a": {7}}, True),
        (kept("a", 1, 3), {"a"}, {}, False),  # its snapshot was deleted
        (kept("a", 1, 3), {"a"}, {"a": {0}}, False),
        (kept("a", 1, 3), {"a"}, {"a": {1}}, True),
        (kept("a", 1, 3), {"a"}, {"a": {2}}, True),
        (kept("a", 1, 3), {"a"}, {"a": {3}}, False),  # epoch 3 reads a newer version
        (kept("a", 1, 3), set(), {"b": {1}}, False),  # another volume's pins
        (kept("a", 1, 0), set(), {"a": {9}}, True),  # a damaged bound keeps the copy
    ],
)
def test_referenced(
    rec: ExtentRecord, alive: set[str], pinned: dict[str, set[int]], want: bool
) -> None:
    assert referenced(rec, alive, pinned) is want
