"""Issue 12's locality line: the share of writes sequenced by the access point's own process
(the primary follows the access point, docs/datapath.md "Locality"), from the chunk servers'
Prometheus metrics.

Summed over every chunk server: the change of `SEQUENCED_LOCAL` (writes an access point had
ordered by a primary in its own process) over the change of `SEQUENCED` (every write an
access point had ordered) across the measured jobs. Before the jobs, `settle` is the
warm-up: it writes the volume through the access point until every extent's primary is the
access point's chunk server, or a time bound, then copies the volume's data back. (Writes,
not reads: a member's reads of its own replica do not claim the primary.)
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.qemu_img import fill
from bench.systems.devcluster import DevCluster, Volume, metric_samples

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


def settle(
    cluster: DevCluster,
    volume: Volume,
    access_point: str,
    portal: str,
    source: Path,
    timeout: float = 120.0,
) -> tuple[int, int, float]:
    """Warm-up: write `volume` through `portal` until every extent's primary is the chunk
    server `access_point`, at most `timeout` s, then copy `source` (the data it held) back
    onto it if it wrote. (extents settled, extents, seconds)."""
    me = cluster.chunk_id(access_point)
    start = time.monotonic()
    block = 64 << 10  # small writes: many IOs per extent in each claim window
    opts = volume.image_opts(portal)
    wrote = False
    while True:
        recs = cluster.extents(volume.id)
        done = sum(1 for r in recs if r.primary == me)
        took = time.monotonic() - start
        if (recs and done == len(recs)) or took > timeout:
            break
        argv = ["qemu-img", "bench", "--image-opts", "-w", "--pattern", "0x5a"]
        argv += ["-c", str(volume.size // block), "-d", "16", "-s", str(block), "-S", str(block)]
        subprocess.run(
            [*argv, opts], capture_output=True, timeout=max(10.0, timeout - took), check=False
        )
        wrote = True
    if wrote:
        fill(str(source), opts)
    return done, len(recs), took


def settled_line(done: int, total: int, seconds: float, what: str) -> str:
    return (
        f"locality warm-up ({what}): {done}/{total} extents' primary at the access point"
        f" after {seconds:.0f} s"
    )
