"""Per-volume IO metrics: defined once here, recorded where IO enters a chunk server (the
access point), read back by meta for the dashboard (docs/dashboard.md, "Volume metrics").

The access point records each command of a volume it serves: its latency, from entering the
volume's block device to completion, in `lunastor_volume_io_seconds{volume, op}` (a histogram,
so its `_count` is the number of commands) and its payload in
`lunastor_volume_io_bytes_total{volume, op}`. Per-volume quality of service (docs/qos.md)
adds the time its commands waited for the volume's limiter in
`lunastor_volume_io_throttled_seconds_total{volume, op}` (the histogram does not include
that wait: it is the storage's latency), so that every per-volume metric has one home.

Meta's `GET /v1/volumes/{id}/metrics` fetches `/metrics` from each live chunk server, keeps
this volume's series (`parse`) and adds them up across access points (`IoTotals.add`). Rates
are the differences between two readings, which the dashboard takes itself.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client import Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

IO_SECONDS_NAME = "lunastor_volume_io_seconds"
IO_BYTES_NAME = "lunastor_volume_io_bytes_total"
THROTTLED_NAME = "lunastor_volume_io_throttled_seconds_total"
OPS = ("read", "write")
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)

IO_SECONDS = Histogram(
    IO_SECONDS_NAME,
    "Latency of a volume's commands at this access point, by operation",
    ["volume", "op"],
    buckets=BUCKETS,
)
IO_BYTES = Counter(
    IO_BYTES_NAME.removesuffix("_total"),
    "Bytes a volume's commands moved at this access point, by operation",
    ["volume", "op"],
)

THROTTLED = Counter(
    THROTTLED_NAME.removesuffix("_total"),
    "Seconds a volume's commands waited for its QoS limits at this access point, by operation",
    ["volume", "op"],
)

T = TypeVar("T")


class VolumeIo:
    """One volume's series at this access point. A volume gets series on its first command
    here (every chunk server serves every LUN: series for idle volumes would fill each
    server's /metrics), then keeps them bound (a label lookup per command takes a lock)."""

    __slots__ = ("_bound", "_throttled", "volume")

    def __init__(self, volume: str) -> None:
        self.volume = volume
        self._bound: dict[str, tuple[Any, Any]] = {}  # op -> (latency child, bytes child)
        self._throttled: dict[str, Any] = {}  # op -> throttled-seconds child (limited only)

    async def timed(self, op: str, nbytes: int, command: Awaitable[T]) -> T:
        """Await `command` and record it as one `op` of `nbytes` (failures are not counted:
        a failed command moved no data, and its latency would only blur the histogram)."""
        start = time.perf_counter()
        result = await command
        self.done(op, nbytes, start)
        return result

    def done(self, op: str, nbytes: int, start: float) -> None:
        """Record one `op` of `nbytes` that began at `start` (time.perf_counter()): for a
        command that completed without awaiting anything (a local read)."""
        bound = self._bound.get(op)
        if bound is None:
            bound = IO_SECONDS.labels(self.volume, op), IO_BYTES.labels(self.volume, op)
            self._bound[op] = bound
        bound[0].observe(time.perf_counter() - start)
        bound[1].inc(nbytes)

    def throttled(self, op: str, seconds: float) -> None:
        """One `op` command waited `seconds` for the volume's QoS limits."""
        child = self._throttled.get(op)
        if child is None:
            child = self._throttled[op] = THROTTLED.labels(self.volume, op)
        child.inc(seconds)

    def forget(self) -> None:
        """The volume is no longer served here: drop its series."""
        for op in self._bound:
            IO_SECONDS.remove(self.volume, op)
            IO_BYTES.remove(self.volume, op)
        for op in self._throttled:
            THROTTLED.remove(self.volume, op)
        self._bound.clear()
        self._throttled.clear()


# --- reading them back (meta) -------------------------------------------------------------------


@dataclass
class OpTotals:
    ops: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0  # summed latency
    throttled_seconds: float = 0.0  # summed wait for the volume's QoS limits
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count

    def add(self, other: OpTotals) -> None:
        self.ops += other.ops
        self.bytes += other.bytes
        self.seconds += other.seconds
        self.throttled_seconds += other.throttled_seconds
        for le, n in other.buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + n

    def view(self) -> dict[str, object]:
        return {
            "ops": self.ops,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "throttled_seconds": self.throttled_seconds,
            # +Inf as JSON cannot carry it: the last bucket's count is `ops` anyway
            "buckets": [[le, n] for le, n in sorted(self.buckets.items()) if le != float("inf")],
        }


@dataclass
class IoTotals:
    ops: dict[str, OpTotals] = field(default_factory=lambda: {op: OpTotals() for op in OPS})

    def add(self, other: IoTotals) -> None:
        for op, totals in other.ops.items():
            self.ops.setdefault(op, OpTotals()).add(totals)

    def view(self) -> dict[str, object]:
        return {op: t.view() for op, t in self.ops.items()}


def parse(exposition: str, volume: str) -> IoTotals:
    """This volume's IO series from a chunk server's `/metrics` text.

    Only lines naming the volume are handed to the parser (a server's page holds every volume
    it serves, so parsing all of it for one would cost the most where it matters least)."""
    needle = f'volume="{volume}"'
    lines = [
        line
        for line in exposition.splitlines()
        if line.startswith("lunastor_volume_io_") and needle in line
    ]
    totals = IoTotals()
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            op = sample.labels.get("op", "")
            if sample.labels.get("volume") != volume or not op:
                continue
            t = totals.ops.setdefault(op, OpTotals())
            if sample.name == IO_SECONDS_NAME + "_count":
                t.ops = sample.value
            elif sample.name == IO_SECONDS_NAME + "_sum":
                t.seconds = sample.value
            elif sample.name == IO_SECONDS_NAME + "_bucket":
                t.buckets[float(sample.labels["le"])] = sample.value
            elif sample.name == IO_BYTES_NAME:
                t.bytes = sample.value
            elif sample.name == THROTTLED_NAME:
                t.throttled_seconds = sample.value
    return totals
