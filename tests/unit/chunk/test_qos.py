"""Per-volume QoS (lunastor/common/qos.py, lunastor/chunk/access/qos.py): the limits a record
carries, the token buckets of the limiter on a real event loop and clock, and the limited
device in front of a memory block device (docs/qos.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from lunastor.chunk.access.qos import (
    Bucket,
    LimitedVolume,
    Limiter,
    apply_limits,
    buckets_for,
)
from lunastor.chunk.access.qos_share import Demand, shares, used_fraction
from lunastor.common.qos import QosError, QosLimits
from lunastor.common.records import VolumeRecord
from lunastor.common.volume_io import VolumeIo
from lunastor.iscsi.blockdev import BlockDevice
from lunastor.iscsi.memdev import MemoryBlockDevice


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"iops": -1}, "iops"),
        ({"iops": 1.5}, "iops"),
        ({"iops": True}, "iops"),
        ({"bps": "10M"}, "bps"),
        ({"iops_burst": 100}, "iops_burst"),  # a burst needs its rate
        ({"iops": 100, "iops_burst": 100}, "iops_burst"),  # and must exceed it
        ({"iops": 100, "burst_seconds": 5}, "burst_seconds"),  # no burst to last
        ({"iops": 100, "iops_burst": 200, "burst_seconds": -1}, "burst_seconds"),
        ({"iops": 100, "iops_burst": 200, "burst_seconds": 10**6}, "burst_seconds"),
        ({"iopz": 100}, "iopz"),
        ({"iops": 1 << 51}, "iops"),
    ],
)
def test_bad_limits_name_their_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(QosError) as err:
        QosLimits.from_dict(raw)
    assert err.value.field == field


def test_limits_round_trip_and_merge() -> None:
    limits = QosLimits.from_dict({"read_iops": 100, "bps": 1 << 20, "bps_burst": 4 << 20})
    assert limits.limited and limits.burst_duration == 1.0
    assert limits.to_dict() == {"read_iops": 100, "bps": 1 << 20, "bps_burst": 4 << 20}
    assert QosLimits.from_dict(limits.to_dict()) == limits
    merged = limits.merged({"read_iops": None, "write_iops": 50, "bps_burst": 0})
    assert merged.to_dict() == {"write_iops": 50, "bps": 1 << 20}
    assert not QosLimits.from_dict({}).limited and not QosLimits().to_dict()
    with pytest.raises(QosError):
        limits.merged({"bogus": 0})


def test_bucket_sizes_follow_rate_burst_and_duration() -> None:
    limits = QosLimits(iops=100, iops_burst=300, burst_seconds=2, write_bps=1000)
    got = buckets_for(limits, 1.0)
    # (300 - 100) * 2 s above the rate, plus 50 ms of the rate; peak bucket: 10 ms of 300
    assert got == {
        "iops": (100, 405.0),
        "iops_peak": (300, 3.0),
        "write_bps": (1000, 50.0),
    }
    half = buckets_for(limits, 0.5)
    assert half["iops"] == (50, 202.5) and half["write_bps"] == (500, 25.0)


async def _hammer(limiter: Limiter, op: str, nbytes: int, seconds: float, depth: int) -> int:
    """`depth` workers admitting commands back to back for `seconds`; how many passed."""
    done = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop:
            waiter = limiter.admit(op, nbytes)
            if waiter is not None:
                await waiter
            if time.monotonic() <= stop:
                done += 1
            await asyncio.sleep(0)

    await asyncio.gather(*(worker() for _ in range(depth)))
    return done


async def test_iops_limit_holds_over_a_second() -> None:
    limiter = Limiter(QosLimits(write_iops=400))
    n = await _hammer(limiter, "write", 4096, 1.0, depth=16)
    # at most the rate + the bucket (50 ms) + commands in flight; a starved CPU may do less
    assert 0.75 * 400 <= n <= 400 * 1.05 + 20 + 16, n
    # reads are not limited by a write limit
    assert limiter.admit("read", 4096) is None


async def test_bytes_limit_counts_bytes_and_a_big_command_still_passes() -> None:
    limiter = Limiter(QosLimits(bps=1 << 20))  # 1 MiB/s, a 50 KiB bucket
    assert limiter.admit("read", 4 << 20) is None  # bigger than the bucket: passes, in debt
    start = time.monotonic()
    waiter = limiter.admit("write", 4096)
    assert waiter is not None
    await waiter
    assert 3.5 <= time.monotonic() - start <= 4.5  # waited for the 4 MiB debt


def test_burst_runs_at_the_peak_for_its_duration_then_at_the_rate() -> None:
    """The bucket arithmetic on a simulated clock (a loaded CPU cannot blur it): a greedy
    client admitted whenever every bucket is not in debt, in 1 ms steps."""
    limits = QosLimits(iops=100, iops_burst=1000, burst_seconds=0.5)
    buckets = [
        Bucket(name, False, rate, capacity, capacity, 0.0)
        for name, (rate, capacity) in buckets_for(limits, 1.0).items()
    ]
    admitted = []
    for step in range(2000):  # 2 s
        now = step / 1000
        for b in buckets:
            b.refill(now)
        while all(b.tokens >= 0 for b in buckets):
            for b in buckets:
                b.tokens -= 1
            admitted.append(now)
    first = sum(1 for t in admitted if t < 0.5)
    second = sum(1 for t in admitted if 1.0 <= t < 2.0)
    # 0.5 s near the peak: (1000 - 100) * 0.5 above the rate, plus the rate's 50
    assert 480 <= first <= 520, first
    assert 95 <= second <= 105, second  # then the rate


async def test_a_limit_changed_online_retimes_waiting_commands_at_once() -> None:
    limiter = Limiter(QosLimits(iops=2))
    assert limiter.admit("write", 0) is None  # the bucket's first token
    waiters = [limiter.admit("write", 0) for _ in range(10)]  # 5 s at 2 IOPS
    assert all(w is not None for w in waiters)
    await asyncio.sleep(0.05)
    start = time.monotonic()
    limiter.configure(QosLimits(iops=1000))
    await asyncio.gather(*(w for w in waiters if w is not None))
    assert time.monotonic() - start < 0.2
    # and removed: everything waiting goes at once
    limiter.configure(QosLimits(iops=1))
    late = [limiter.admit("write", 0) for _ in range(5)]
    limiter.release_all()
    await asyncio.gather(*(w for w in late if w is not None))


async def test_a_given_up_command_takes_nothing() -> None:
    limiter = Limiter(QosLimits(iops=10))
    assert limiter.admit("read", 0) is None
    gone = limiter.admit("read", 0)
    kept = limiter.admit("read", 0)
    assert gone is not None and kept is not None
    gone.cancel()
    start = time.monotonic()
    await kept
    assert time.monotonic() - start < 0.15  # one slot (100 ms), not two


async def test_a_volume_at_its_limit_never_delays_another_volume() -> None:
    slow = LimitedVolume(MemoryBlockDevice(2048), Limiter(QosLimits(iops=5)))
    fast = MemoryBlockDevice(2048)
    flood = [asyncio.ensure_future(slow.write(0, b"\1" * 512, False)) for _ in range(20)]
    start = time.monotonic()
    for _ in range(200):
        await fast.write(0, b"\2" * 512, False)
        assert bytes(await fast.read(0, 1)) == b"\2" * 512
    assert time.monotonic() - start < 1.0
    assert sum(f.done() for f in flood) < 5
    for f in flood:
        f.cancel()
    await asyncio.gather(*flood, return_exceptions=True)


async def test_limited_volume_passes_everything_through_and_counts_throttling() -> None:
    io = VolumeIo("vol-00000000000000aa")
    device = MemoryBlockDevice(2048)
    limited = LimitedVolume(device, Limiter(QosLimits(write_iops=20), io))
    assert limited.inline_ok is False
    assert (limited.block_size, limited.num_blocks) == (device.block_size, device.num_blocks)
    for i in range(5):
        await limited.write(i, bytes([i]) * 512, False)
    await limited.write_same(8, 2, b"\7" * 512, False)
    await limited.unmap([(8, 1)])
    assert bytes(await limited.read(3, 1)) == b"\3" * 512
    assert bytes(await limited.read(9, 1)) == b"\7" * 512
    await limited.flush()
    assert io._throttled["write"]._value.get() > 0.1  # 7 writes at 20/s, 1 from the bucket


class _Unit:
    def __init__(self, device: BlockDevice) -> None:
        self.device = device


def test_apply_limits_adds_reconfigures_and_removes_the_limiter() -> None:
    device = MemoryBlockDevice(2048)
    unit = _Unit(device)
    record = VolumeRecord(id="vol-00000000000000ab")
    seen: list[object] = []
    apply_limits(record, device, unit, on_change=lambda v, lim: seen.append(lim))
    assert unit.device is device and not seen  # no limits: no limiter object at all
    record.qos = {"iops": 100}
    apply_limits(record, device, unit, on_change=lambda v, lim: seen.append(lim))
    limited = unit.device
    assert isinstance(limited, LimitedVolume) and limited.device is device
    record.qos = {"iops": 200}
    apply_limits(record, device, unit)
    assert unit.device is limited and limited.limiter.limits.iops == 200
    record.qos = {"iops": -5}  # a bad record keeps what it had
    apply_limits(record, device, unit)
    assert unit.device is limited and limited.limiter.limits.iops == 200
    record.qos = {}
    apply_limits(record, device, unit, on_change=lambda v, lim: seen.append(lim))
    assert unit.device is device and seen == [limited.limiter, None]


@pytest.mark.parametrize(
    ("demands", "want"),
    [
        ({}, {}),
        ({"a": Demand(0.3, False)}, {"a": 1.0}),
        ({"a": Demand(3.0, True)}, {"a": 1.0}),
        # both want more: an even split
        ({"a": Demand(0.5, True), "b": Demand(0.5, True)}, {"a": 0.5, "b": 0.5}),
        ({"a": Demand(0.9, True), "b": Demand(0.1, True)}, {"a": 0.5, "b": 0.5}),
        # one is satisfied: it keeps what it used plus headroom, the other takes the rest
        ({"a": Demand(0.2, False), "b": Demand(0.8, True)}, {"a": 0.25, "b": 0.75}),
        # nobody is short: the spare is spread evenly
        ({"a": Demand(0.2, False), "b": Demand(0.0, False)}, {"a": 0.6, "b": 0.4}),
        # unthrottled headroom that does not fit leaves the throttled ones their floor
        (
            {"a": Demand(0.9, False), "b": Demand(0.5, False), "c": Demand(0.1, True)},
            {"a": 0.9 * 0.95 / 1.4, "b": 0.5 * 0.95 / 1.4, "c": 0.05},
        ),
        # three throttled, one idle-ish
        (
            {k: Demand(0.3, True) for k in "abc"} | {"d": Demand(0.0, False)},
            {"a": 0.95 / 3, "b": 0.95 / 3, "c": 0.95 / 3, "d": 0.05},
        ),
    ],
)
def test_shares_of_the_limits_between_access_points(
    demands: dict[str, Demand], want: dict[str, float]
) -> None:
    got = shares(demands)
    assert got == pytest.approx(want)
    if got:
        assert sum(got.values()) == pytest.approx(1.0)


def test_used_fraction_takes_the_tightest_limited_rate() -> None:
    limits = QosLimits(read_iops=100, bps=1000)
    ops = {"read": (20, 100), "write": (5, 900)}  # in 0.5 s: 40 read IOPS, 2000 B/s total
    assert used_fraction(limits, ops, 0.5) == pytest.approx(2.0)
    assert used_fraction(QosLimits(write_iops=10), ops, 1.0) == pytest.approx(0.5)
    assert used_fraction(QosLimits(iops=50), ops, 1.0) == pytest.approx(0.5)
