"""The bench's own iSCSI load clients, built on first use, run for a fixed time, each printing
one JSON line (requests, errors, latency percentiles: qemu-img bench reports only a total time):

* bench/iscsi_load.c (`LIBISCSI`, the default), on libiscsi: where a line needs percentiles or
  a time-bounded load rather than a request count: the noisy-neighbour line (p99 of a QD1 job)
  and the foreground load during re-replication.
* bench/iscsi_light.c (`LIGHT`), the same arguments and output without libiscsi: one send for
  every command that is ready, one recv for every response that has arrived. For lines whose
  clients share the machine's cores with the server they measure (bench/workers.py): libiscsi
  makes three system calls per request, qemu-img bench more.

The initiator name is BENCH_INITIATOR unless a load passes its own (several clients as several
hosts).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Client:
    """One of the load clients: its C source, binary name and libraries."""

    source: Path
    binary: str
    libs: tuple[str, ...]


LIBISCSI = Client(HERE / "iscsi_load.c", "iscsi-load", ("-liscsi",))
LIGHT = Client(HERE / "iscsi_light.c", "iscsi-light", ())


def build(out: Path, client: Client = LIBISCSI) -> Path:
    """Compile `client` into `out` unless an up-to-date binary is there."""
    binary = out / client.binary
    if not binary.exists() or binary.stat().st_mtime < client.source.stat().st_mtime:
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["gcc", "-O2", "-o", str(binary), str(client.source), *client.libs],
            check=True,
            capture_output=True,
        )
    return binary


@dataclass(frozen=True)
class LoadResult:
    ios: int
    errors: int
    seconds: float
    iops: float
    mbps: float
    p50_us: float
    p99_us: float
    mean_us: float


def parse_load_output(text: str) -> LoadResult:
    """The client's one JSON line; ValueError if it is not there."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            r = json.loads(line)
            return LoadResult(
                ios=int(r["ios"]),
                errors=int(r["errors"]),
                seconds=float(r["seconds"]),
                iops=float(r["iops"]),
                mbps=float(r["mbps"]),
                p50_us=float(r["lat_p50_us"]),
                p99_us=float(r["lat_p99_us"]),
                mean_us=float(r["lat_avg_us"]),
            )
    raise ValueError(f"no result line from iscsi-load: {text.strip()[-300:]!r}")


@dataclass(frozen=True)
class Load:
    """One load: `depth` requests of `block` bytes in flight for `seconds`."""

    write: bool
    random: bool
    block: int
    depth: int

    def argv(
        self, binary: Path, url: str, seconds: float, range_bytes: int, initiator: str = ""
    ) -> list[str]:
        """`initiator`: the client's initiator name ("": BENCH_INITIATOR)."""
        return [
            str(binary), url, "write" if self.write else "read",
            "rand" if self.random else "seq", str(self.block), str(self.depth),
            str(seconds), str(range_bytes), *([initiator] if initiator else []),
        ]  # fmt: skip


def start(
    binary: Path, url: str, load: Load, seconds: float, range_bytes: int
) -> subprocess.Popen[str]:
    """Start a load in the background; `finish` collects it."""
    return subprocess.Popen(
        load.argv(binary, url, seconds, range_bytes),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], seconds: float) -> LoadResult:
    try:
        out, err = proc.communicate(timeout=seconds + 60)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"iscsi-load failed ({proc.returncode}): {(err or out).strip()[-300:]}")
    return parse_load_output(out)


def run(binary: Path, url: str, load: Load, seconds: float, range_bytes: int) -> LoadResult:
    return finish(start(binary, url, load, seconds, range_bytes), seconds)
