"""A chunk server's worker processes (lunastor/chunk/workers.py): who owns which extent, the
shared lease, the worker addresses, the store that touches only its own extents, and the
configuration's checks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lunastor.chunk.config import ChunkConfig
from lunastor.chunk.store import ExtentStore, InvalidRequest
from lunastor.chunk.workers import (
    Shared,
    WorkerSpec,
    data_addresses,
    login_length,
    login_names,
    owner,
    pick_worker,
    worker_config,
)
from lunastor.common.config import ConfigError
from lunastor.common.records import preserved_volume

VOLUMES = [f"vol-{i:016x}" for i in range(300)]


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_every_volume_has_exactly_one_owner(count: int) -> None:
    specs = [WorkerSpec(i, count) for i in range(count)]
    for volume in VOLUMES:
        owners = [s.index for s in specs if s.owns(volume, 5)]
        assert owners == [owner(volume, count)]
        assert all(s.owns(volume, i) == s.owns(volume) for s in specs for i in range(4))


def test_ownership_spreads_volumes_over_the_workers() -> None:
    counts = [0, 0, 0]
    for volume in VOLUMES:
        counts[owner(volume, 3)] += 1
    assert all(70 <= c <= 130 for c in counts), counts


def test_a_snapshots_preserved_copy_shares_its_volumes_owner() -> None:
    # the primary copies a frozen extent aside locally: the copy must be the same worker's
    for volume in VOLUMES[:50]:
        assert owner(preserved_volume(volume, 4), 2) == owner(volume, 2)


def test_bad_ownership_questions_are_refused() -> None:
    with pytest.raises(ValueError):
        owner("vol-a", 0)
    with pytest.raises(ValueError):
        WorkerSpec(2, 2)
    with pytest.raises(ValueError):
        WorkerSpec(0, 65)


def login_pdu(*keys: str, opcode: int = 0x43, ahs: int = 0) -> bytes:
    data = b"".join(k.encode() + b"\0" for k in keys)
    bhs = bytearray(48)
    bhs[0] = opcode
    bhs[4] = ahs
    bhs[5:8] = len(data).to_bytes(3, "big")
    return bytes(bhs) + bytes(4 * ahs) + data + bytes(-len(data) % 4)


def test_a_login_requests_names_are_read_from_its_first_pdu() -> None:
    pdu = login_pdu("InitiatorName=iqn.i:1", "TargetName=iqn.t:2", "SessionType=Normal")
    assert login_names(pdu) == ("iqn.i:1", "iqn.t:2")
    assert login_names(login_pdu("InitiatorName=i", "TargetName=t", ahs=2)) == ("i", "t")
    assert login_names(pdu[:60]) is None  # not all of it yet
    assert login_length(pdu[:48]) == 48 + len(pdu[48:].rstrip(b"\0")) + 1
    assert login_names(login_pdu("InitiatorName=i", "SessionType=Discovery")) is None
    assert login_names(login_pdu("InitiatorName=i", "TargetName=t", opcode=0x01)) is None
    assert login_length(b"\x43" + bytes(10)) is None  # no whole header yet


def test_new_connections_go_to_the_least_busy_worker_ties_in_turn() -> None:
    assert pick_worker([3, 1, 2], 0) == 1
    assert [pick_worker([0, 0], t) for t in range(4)] == [0, 1, 0, 1]
    assert pick_worker([1, 0, 0], 2) == 2


def test_the_shared_lease_reads_what_worker_0_wrote() -> None:
    shared = Shared.create(3)
    try:
        assert shared.lease() == (0, 0.0)
        assert not shared.alive()
        deadline = time.monotonic() + 5
        shared.set_lease(0xABC, deadline)
        peer = Shared(shared.fd, 3)  # a worker's own mapping of the same memory
        assert peer.lease() == (0xABC, deadline)
        assert peer.alive()
        shared.set_lease(0xABC, time.monotonic() - 0.01)  # not renewed in time: not alive
        assert not peer.alive()
        shared.set_lease(0, 0.0)  # lost
        assert peer.lease() == (0, 0.0)
        peer.map.close()
    finally:
        shared.close()


def test_the_published_revision_is_the_lowest_of_every_worker() -> None:
    shared = Shared.create(3)
    try:
        assert not shared.started()
        shared.set_seen(1, 1)
        assert not shared.started()  # worker 2 not running yet
        shared.set_seen(2, 1)
        assert shared.started()
        assert shared.lowest_seen(50) == 1  # loading: nothing the fence may count on
        shared.set_seen(1, 40)
        shared.set_seen(2, 60)
        assert shared.lowest_seen(50) == 40
        shared.set_closed(1, 7)
        assert shared.counts(1) == (40, 7)
        with pytest.raises(IndexError):
            shared.counts(3)
    finally:
        shared.close()


def test_each_worker_listens_on_its_own_ports() -> None:
    config = ChunkConfig(
        data_listen="10.0.0.5:3270", admin_listen="127.0.0.1:9100", workers=3, lio_export=True
    )
    config.validate()
    assert data_addresses(config) == ["10.0.0.5:3270", "10.0.0.5:3271", "10.0.0.5:3272"]
    second = worker_config(config, 2)
    assert (second.data_listen, second.data_address) == ("10.0.0.5:3272", "10.0.0.5:3272")
    assert second.admin_listen == "127.0.0.1:9102"
    assert not second.lio_export  # LIO only in worker 0
    assert worker_config(config, 0) is config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"workers": 0}, "workers: expected 1..64"),
        ({"workers": 65}, "workers: expected 1..64"),
        ({"workers": 2, "data_listen": "10.0.0.5:0"}, "data_listen: workers > 1 need"),
        ({"workers": 3, "admin_listen": "127.0.0.1:65534"}, "admin_listen: port 65534 + 2"),
    ],
)
def test_bad_worker_settings_are_refused(changes: dict[str, object], message: str) -> None:
    config = ChunkConfig(**{"data_listen": "10.0.0.5:3270", **changes})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        config.validate()


async def test_a_workers_store_sees_and_touches_only_its_own_extents(tmp_path: Path) -> None:
    size = 1 << 20
    spec = WorkerSpec(1, 2)
    mine_vol = next(v for v in VOLUMES if spec.owns(v))
    other_vol = next(v for v in VOLUMES if not spec.owns(v))
    both = ExtentStore([tmp_path], size)
    for volume in (mine_vol, other_vol):
        for index in range(2):
            await (await both.create(volume, index, 1)).close()
    await both.close()
    mine = ExtentStore([tmp_path], size, owns=spec.owns)
    listing = mine.list_replicas()
    assert sorted((r.volume, r.extent) for r in listing.replicas) == [(mine_vol, 0), (mine_vol, 1)]
    assert not listing.problems  # the other worker's replicas are not problems
    assert mine.known_replicas() == [(mine_vol, 0), (mine_vol, 1)]
    assert not mine.has_replica(other_vol, 0)
    for touch in (mine.open, mine.remove):
        with pytest.raises(InvalidRequest, match="another worker"):
            await touch(other_vol, 0)
    with pytest.raises(InvalidRequest, match="another worker"):
        await mine.create(other_vol, 4, 1)
    # a clone of our extent into another worker's volume is made for that worker, closed here
    clone_vol = next(v for v in VOLUMES if not spec.owns(v) and v != other_vol)
    assert await mine.clone(mine_vol, 1, clone_vol, 1) is None
    assert mine.known_replicas() == [(mine_vol, 0), (mine_vol, 1)]
    theirs = ExtentStore([tmp_path], size, owns=WorkerSpec(0, 2).owns)
    theirs.list_replicas()
    assert (clone_vol, 1) in theirs.known_replicas()
    await (await theirs.open(clone_vol, 1)).close()
    await (await mine.open(mine_vol, 1)).close()
    await mine.close()
    await theirs.close()
    assert (tmp_path / "extents" / other_vol / f"{0:016x}.hdr").exists()  # untouched
