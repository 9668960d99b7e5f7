"""Slot for issue 12's locality line: the share of writes sequenced by the access point's own
process (the primary follows the access point), from the chunk servers' Prometheus metrics.

Summed over every chunk server: the change of `SEQUENCED_LOCAL` (writes a primary ordered that
arrived through an access point in its own process) over the change of `SEQUENCED` (every
write a primary ordered) across the measured jobs. While the data path does not export these
counters the line reads n/a; the data path names them here if it chooses other names.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.systems.devcluster import DevCluster, metric_samples

SEQUENCED = "lunastor_writes_sequenced_total"
SEQUENCED_LOCAL = "lunastor_writes_sequenced_local_total"


@dataclass(frozen=True)
class Counters:
    sequenced: float
    local: float


def sample(cluster: DevCluster) -> Counters | None:
    """Both counters summed over the chunk servers; None when no server exports them."""
    sequenced = local = 0.0
    found = False
    for chunk in cluster.chunk_names():
        text = cluster.metrics(chunk)
        total = metric_samples(text, SEQUENCED)
        if total:
            found = True
            sequenced += sum(total.values())
            local += sum(metric_samples(text, SEQUENCED_LOCAL).values())
    return Counters(sequenced, local) if found else None


def share(before: Counters | None, after: Counters | None) -> float | None:
    """Local share of the writes sequenced between two samples (None: not measurable)."""
    if before is None or after is None or after.sequenced <= before.sequenced:
        return None
    return (after.local - before.local) / (after.sequenced - before.sequenced)


def line(value: float | None, what: str) -> str:
    shown = (
        "n/a (the chunk servers export no " + SEQUENCED + ")" if value is None else (f"{value:.1%}")
    )
    return f"writes sequenced by the access point's own process ({what}): {shown}"
