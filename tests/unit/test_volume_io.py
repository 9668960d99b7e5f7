"""Per-volume IO metrics (lunastor/common/volume_io.py): recorded at the access point into the
process's real Prometheus registry, read back from its exposition text the way meta reads a
chunk server's /metrics."""

from __future__ import annotations

import secrets

import pytest
from prometheus_client import generate_latest

from lunastor.common.volume_io import IoTotals, VolumeIo, parse


def volume_id() -> str:
    return f"vol-{secrets.token_hex(8)}"


async def done(value: bytes = b"") -> bytes:
    return value


async def fails() -> None:
    raise OSError("medium error")


async def test_commands_are_counted_with_their_bytes_and_latency() -> None:
    vol, other = volume_id(), volume_id()
    io, io2 = VolumeIo(vol), VolumeIo(other)
    assert await io.timed("read", 4096, done(b"x")) == b"x"
    await io.timed("read", 8192, done())
    await io.timed("write", 512, done())
    await io2.timed("write", 1 << 20, done())
    with pytest.raises(OSError):
        await io.timed("write", 4096, fails())  # moved nothing: not counted
    totals = parse(generate_latest().decode(), vol)
    read, write = totals.ops["read"], totals.ops["write"]
    assert (read.ops, read.bytes, write.ops, write.bytes) == (2, 12288, 1, 512)
    assert 0 < read.seconds < 1
    assert read.buckets[10.0] == 2 and read.buckets[float("inf")] == 2
    view = totals.view()
    assert view["read"]["buckets"][-1] == [10.0, 2.0]  # type: ignore[index]


async def test_access_points_add_up() -> None:
    vol = volume_id()
    await VolumeIo(vol).timed("write", 4096, done())
    one = parse(generate_latest().decode(), vol)
    total = IoTotals()
    total.add(one)
    total.add(one)
    w = total.ops["write"]
    assert (w.ops, w.bytes) == (2, 8192)
    assert w.buckets[10.0] == 2 and total.ops["read"].ops == 0


async def test_an_idle_volume_has_no_series_and_a_forgotten_one_loses_them() -> None:
    vol = volume_id()
    io = VolumeIo(vol)
    assert vol not in generate_latest().decode()  # every server serves every LUN
    await io.timed("read", 512, done())
    assert vol in generate_latest().decode()
    io.forget()
    io.forget()  # twice is fine
    assert vol not in generate_latest().decode()
    assert parse(generate_latest().decode(), vol).ops["read"].ops == 0


def test_parse_keeps_only_the_volume_asked_for() -> None:
    text = "\n".join(
        [
            "# TYPE lunastor_volume_io_bytes_total counter",
            'lunastor_volume_io_bytes_total{op="read",volume="vol-a"} 100.0',
            'lunastor_volume_io_bytes_total{op="read",volume="vol-ab"} 7.0',
            'lunastor_volume_io_seconds_count{op="read",volume="vol-a"} 3.0',
            'lunastor_volume_io_seconds_sum{op="read",volume="vol-a"} 0.5',
            'lunastor_volume_io_seconds_bucket{le="0.001",op="read",volume="vol-a"} 1.0',
            'lunastor_other{volume="vol-a"} 9.0',
        ]
    )
    read = parse(text, "vol-a").ops["read"]
    assert (read.ops, read.bytes, read.seconds, read.buckets) == (3, 100, 0.5, {0.001: 1})
