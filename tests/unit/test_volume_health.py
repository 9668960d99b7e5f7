"""Volume health (lunastor/meta/volume_health.py) and the chunk states it is computed over
(volume_status.ChunkStates): table tests of the pure rules."""

from __future__ import annotations

import pytest

from lunastor.common.records import (
    ChunkAdminRecord,
    ChunkServerInfo,
    ChunkServerStatus,
    ExtentRecord,
    OperationRecord,
)
from lunastor.meta.volume_health import Health, Servers, extent_health, volume_health
from lunastor.meta.volume_status import ChunkStates

ABCD = frozenset("abcd")


def ext(*replicas: str, index: int = 0, converging: bool = False) -> ExtentRecord:
    return ExtentRecord(volume="v", index=index, replicas=list(replicas), converging=converging)


@pytest.mark.parametrize(
    ("rec", "servers", "expected"),
    [
        (ext("a", "b", "c"), Servers(ABCD), Health.OK),
        (ext("a", "b", "c", "d"), Servers(ABCD), Health.OK),  # more than wanted
        (ext("a", "b", "c"), Servers(ABCD, draining=frozenset("c")), Health.OK),
        (ext("a", "b", "c"), Servers(frozenset("abd")), Health.DEGRADED),  # c down, named
        (ext("a", "b", "c"), Servers(frozenset("bcd")), Health.DEGRADED),  # primary down
        (ext("a", "b"), Servers(frozenset("abd")), Health.REBUILDING),  # d can take it
        (ext("a", "b"), Servers(frozenset("ab")), Health.DEGRADED),  # nobody can take it
        (ext("a", "b"), Servers(frozenset("abd"), draining=frozenset("d")), Health.DEGRADED),
        (ext("a", "b"), Servers(frozenset("abd"), waiting_for=frozenset("c")), Health.DEGRADED),
        (ext("a", "b", "c", converging=True), Servers(ABCD), Health.REBUILDING),
        (ext("a", "b", converging=True), Servers(frozenset("cd")), Health.UNAVAILABLE),
        # a failover's convergence with a member down or dropped is degraded, not a rebuild
        (ext("a", "b", "c", converging=True), Servers(frozenset("abd")), Health.DEGRADED),
        (
            ext("a", "b", converging=True),
            Servers(frozenset("abd"), waiting_for=frozenset("c")),
            Health.DEGRADED,
        ),
        (ext("a", "b", "c"), Servers(frozenset("d")), Health.UNAVAILABLE),
    ],
)
def test_extent_health(rec: ExtentRecord, servers: Servers, expected: Health) -> None:
    assert extent_health(rec, 3, servers) is expected


def test_the_volume_takes_its_worst_extent_and_says_why() -> None:
    servers = Servers(frozenset("abd"))
    extents = [ext("a", "b", "d", index=0), ext("a", "b", "c", index=1), ext("a", "d", index=2)]
    health = volume_health(extents, 3, servers)
    assert health.state is Health.REBUILDING  # rebuilding outranks degraded
    assert health.extents == 3
    assert health.counts == {"degraded": 1, "rebuilding": 1}
    assert health.detail == ("1 of 3 extents rebuilding; 1 of 3 extents missing a replica; down: c")
    assert volume_health(extents[:1], 3, servers).state is Health.OK
    unreachable = volume_health([*extents, ext("c", index=3)], 3, servers)
    assert unreachable.state is Health.UNAVAILABLE
    assert unreachable.detail.startswith("1 of 4 extents have no live replica")


def test_a_volume_never_written_is_ok() -> None:
    health = volume_health([], 3, Servers(frozenset()))
    assert (health.state, health.detail, health.counts) == (Health.OK, "no data written yet", {})


def test_a_wait_for_a_lost_server_is_named() -> None:
    servers = Servers(frozenset("abd"), waiting_for=frozenset("c"))
    health = volume_health([ext("a", "b")], 3, servers)
    assert health.state is Health.DEGRADED
    assert "waiting for c to come back" in health.detail


def rebuild(subject: str, created_at: float, state: str = "running") -> OperationRecord:
    return OperationRecord(
        id="op-1", kind="rebuild", subject=subject, state=state, created_at=created_at
    )


def test_chunk_states_from_records() -> None:
    infos = [ChunkServerInfo(id=c, zone=f"z{c}") for c in "abcd"]
    lives = [
        ChunkServerStatus(id="a", zone="za", replace_after=10.0),
        ChunkServerStatus(id="b", zone="zb", state="draining", replace_after=10.0),
        ChunkServerStatus(id="c", zone="zc", replace_after=10.0),
    ]
    admins = [ChunkAdminRecord(id="c", state="draining"), ChunkAdminRecord(id="a", state="drained")]
    states = ChunkStates.of(infos, lives, admins, [rebuild("d", 100.0)], now=105.0)
    assert states.states == {"a": "up", "b": "draining", "c": "draining", "d": "down"}
    assert states.zones == {"a": "za", "b": "zb", "c": "zc", "d": "zd"}
    assert states.servers == Servers(
        live=frozenset("abc"), draining=frozenset("bc"), waiting_for=frozenset("d")
    )


@pytest.mark.parametrize(
    ("ops", "now", "replace_after", "waiting"),
    [
        ([rebuild("d", 100.0)], 109.9, 10.0, {"d"}),
        ([rebuild("d", 100.0)], 110.0, 10.0, set()),  # replace_after is over: rebuilding
        ([rebuild("d", 100.0, "succeeded")], 101.0, 10.0, set()),
        ([rebuild("a", 100.0)], 101.0, 10.0, set()),  # a is back: nothing to wait for
        ([rebuild("d", 100.0)], 101.0, 0.0, set()),  # servers that do not say: no wait
    ],
)
def test_waiting_for_a_lost_server_mirrors_replace_after(
    ops: list[OperationRecord], now: float, replace_after: float, waiting: set[str]
) -> None:
    infos = [ChunkServerInfo(id=c) for c in "ad"]
    lives = [ChunkServerStatus(id="a", replace_after=replace_after)]
    states = ChunkStates.of(infos, lives, [], ops, now)
    assert states.servers.waiting_for == waiting


def test_a_server_lost_before_the_planner_saw_it_is_waited_for_where_it_is_still_named() -> None:
    # c was SIGKILLed a moment ago: the failover of extent 0 (which c led) dropped it, extent
    # 1 still names it, and no rebuild operation exists yet
    servers = Servers(frozenset("abd"), unplanned=frozenset("c"))
    dropped = ext("a", "b", index=0, converging=True)
    assert volume_health([dropped, ext("a", "b", "c", index=1)], 3, servers).state is (
        Health.DEGRADED
    )
    # once nothing names it, a missing replica is a rebuild (the planner's operation decides)
    assert volume_health([dropped], 3, servers).state is Health.REBUILDING
