"""Per-volume quality of service: the limits a volume record carries (docs/qos.md).

Shared by meta (validation, the REST API), the CLI, the CSI driver and the chunk servers that
enforce them (`lunastor/chunk/access/qos.py`), so that writer and reader agree on the fields.

Six rates, each 0 (unlimited) or a positive number per second: IOPS and bytes for reads, for
writes, and for both together (`iops`, `bps`). Each rate may have a burst: `<rate>_burst` is
the rate the volume may run at for `burst_seconds` after it was idle (a token bucket whose
size is `(burst - rate) * burst_seconds`); without it the bucket holds 50 ms of the rate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

RATES = ("iops", "read_iops", "write_iops", "bps", "read_bps", "write_bps")
BURSTS = tuple(f"{r}_burst" for r in RATES)
FIELDS = (*RATES, *BURSTS, "burst_seconds")
MAX_RATE = 1 << 50  # 1 PiB/s or 10^15 IOPS: "no limit" is 0, not a huge number
MAX_BURST_SECONDS = 3600
DEFAULT_BURST_SECONDS = 1.0


class QosError(ValueError):
    """Limits that do not make sense; `field` names the offending one."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class QosLimits:
    """A volume's limits. All zero: no limits (the volume gets no limiter at all)."""

    iops: int = 0
    read_iops: int = 0
    write_iops: int = 0
    bps: int = 0
    read_bps: int = 0
    write_bps: int = 0
    iops_burst: int = 0
    read_iops_burst: int = 0
    write_iops_burst: int = 0
    bps_burst: int = 0
    read_bps_burst: int = 0
    write_bps_burst: int = 0
    burst_seconds: float = 0.0  # 0: DEFAULT_BURST_SECONDS when a burst is set

    def __post_init__(self) -> None:
        for name in RATES + BURSTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise QosError(name, f"must be an integer, not {value!r}")
            if not 0 <= value <= MAX_RATE:
                raise QosError(name, f"must be between 0 (unlimited) and {MAX_RATE}")
        for rate in RATES:
            burst = getattr(self, f"{rate}_burst")
            if burst and not getattr(self, rate):
                raise QosError(f"{rate}_burst", f"a burst needs {rate} (the sustained rate) set")
            if burst and burst <= getattr(self, rate):
                raise QosError(f"{rate}_burst", f"must be above {rate} ({getattr(self, rate)})")
        seconds = self.burst_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise QosError("burst_seconds", f"must be a number, not {seconds!r}")
        if not 0 <= seconds <= MAX_BURST_SECONDS:
            raise QosError("burst_seconds", f"must be between 0 and {MAX_BURST_SECONDS}")
        if seconds and not any(getattr(self, b) for b in BURSTS):
            raise QosError("burst_seconds", "only means something with a *_burst rate")

    @property
    def limited(self) -> bool:
        return any(getattr(self, r) for r in RATES)

    @property
    def burst_duration(self) -> float:
        return float(self.burst_seconds) or DEFAULT_BURST_SECONDS

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> QosLimits:
        """From a record or request body; unknown fields are an error (QosError)."""
        if not raw:
            return cls()
        if not isinstance(raw, dict):
            raise QosError("qos", "must be an object")
        unknown = sorted(set(raw) - set(FIELDS))
        if unknown:
            raise QosError(unknown[0], f"unknown QoS field (known: {', '.join(FIELDS)})")
        return cls(**raw)

    def to_dict(self) -> dict[str, int | float]:
        """Only the fields that are set: {} for an unlimited volume."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v}

    def merged(self, changes: dict[str, Any]) -> QosLimits:
        """These limits with `changes` applied (a PATCH: a field set to 0 or None clears it)."""
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise QosError(unknown[0], f"unknown QoS field (known: {', '.join(FIELDS)})")
        base: dict[str, Any] = self.to_dict()
        for key, value in changes.items():
            if value is None or value == 0:
                base.pop(key, None)
            else:
                base[key] = value
        return QosLimits.from_dict(base)
