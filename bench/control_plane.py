"""Control-plane benchmark: the meta REST API against raw etcd, measured in the same run.

    python -m bench.control_plane [--ops 500] [--rounds 4] [--volumes 10000] [--client c]

Starts its own etcd and a real `lunastor-meta` process, then measures:

- create+publish and unpublish+delete (two REST calls each) at 1, 10 and 50 concurrent
  clients: p50/p99 latency and full cycles per second;
- listing 10,000 volumes through REST (pages of 1000 pinned to one revision) against reading
  and decoding the same keys straight from etcd.

The anchor does exactly the etcd round trips meta makes for each REST call, from one client in
this process; meta and the anchor alternate so that other load on the machine hits both.
Goals (issue 17): create+publish p99 at 50 clients within 1.5x of the anchor's; the full
10,000-volume list < 300 ms.

The REST side's cycles use a C client (bench/http_cycles.c) sending byte for byte the requests
aiohttp's client sends, at a few microseconds of CPU a request: it shares the two cores with
meta and etcd here, while in production the REST clients run on other machines
(docs/scale.md, "The REST client in C"). `--client aiohttp` measures with aiohttp's client instead.
The listing uses aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from bench import iscsi_load
from lunastor.common.config import to_toml_table
from lunastor.common.etcd import Compare, Delete, Etcd, EtcdConfig, Get, Put
from lunastor.common.records import Keys, LunRecord, VolumeRecord
from lunastor.meta.store import lun_target_prefix
from tests.support.etcd import EtcdServer
from tests.support.procs import free_port, wait_for

TOKEN = "bench-admin"
GIB = 1 << 30
INITIATOR = "iqn.2026-01.io.bench:node-"  # client c publishes to INITIATOR + c
HTTP_CYCLES = iscsi_load.Client(Path(__file__).parent / "http_cycles.c", "http-cycles", ())


@dataclass(frozen=True)
class Round:
    """One side's round at one concurrency: every cycle's latencies (seconds), its wall time,
    the CPU seconds of the side measured (meta's process; the anchor's own), of the bench
    process as the client, and of etcd (set by `timed`)."""

    create_publish: list[float]
    unpublish_delete: list[float]
    elapsed: float
    cpu: float
    client_cpu: float
    etcd_cpu: float = 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_meta(etcd: EtcdServer, namespace: str, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    listen = f"127.0.0.1:{free_port()}"
    config = {
        "listen": listen,
        "portal": "127.0.0.1:3260",
        "secret_key": "bench-sealing-key-0123456789",
        "auth": {"admin_tokens": [TOKEN]},
        "etcd": {"endpoints": [etcd.endpoint], "namespace": namespace},
        "log": {"level": "warning"},
    }
    path = tmp / "meta.toml"
    path.write_text(to_toml_table(config))
    log = open(tmp / "meta.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "lunastor.meta.main", "--config", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://{listen}"

    def up() -> bool:
        import urllib.request

        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as resp:
            return resp.status == 200

    wait_for(up, 30, "meta to start")
    return proc, url


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process `pid`, all threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class HttpError(Exception):
    """A response the bench's client cannot take: a malformed or unsupported message, a closed
    connection, or a status other than the one the call expects."""


def expect(status: int, body: bytes, want: int) -> bytes:
    if status != want:
        raise HttpError(f"status {status}, expected {want}: {body[:500]!r}")
    return body


def request_headers(host: str, port: int) -> str:
    """The header lines aiohttp's client (the CSI driver's) sends with each request, byte for
    byte, for the C client to send the same requests (docs/scale.md, "The REST client in C")."""
    return (
        f"Host: {host}:{port}\r\nAuthorization: Bearer {TOKEN}\r\nAccept: */*\r\n"
        f"Accept-Encoding: gzip, deflate\r\nUser-Agent: {aiohttp.http.SERVER_SOFTWARE}\r\n"
    )


def c_client_argv(binary: Path, url: str, clients: int, ops: int) -> list[str]:
    host, _, port = url.removeprefix("http://").partition(":")
    return [str(binary), host, port, str(clients), str(ops), f"bench-{clients}", INITIATOR,
            request_headers(host, int(port))]  # fmt: skip


def parse_c_client(out: str) -> tuple[list[float], list[float], float, float]:
    """bench/http_cycles.c's output: the create+publish and unpublish+delete latencies
    (seconds) of every cycle, its wall time for them and its CPU seconds."""
    create_publish: list[float] = []
    unpublish_delete: list[float] = []
    elapsed = cpu = -1.0
    for line in out.splitlines():
        first, _, second = line.partition(" ")
        if first == "elapsed":
            elapsed = float(second)
        elif first == "cpu":
            cpu = float(second)
        else:
            create_publish.append(int(first) / 1e9)
            unpublish_delete.append(int(second) / 1e9)
    if elapsed < 0 or cpu < 0:
        raise HttpError(f"http-cycles printed no totals: {out[-300:]!r}")
    return create_publish, unpublish_delete, elapsed, cpu


async def c_cycles(binary: Path, url: str, clients: int, ops: int, meta_pid: int) -> Round:
    """`ops` cycles from `clients` connections of the C client (the default)."""
    cpu = cpu_seconds(meta_pid)
    proc = await asyncio.create_subprocess_exec(
        *c_client_argv(binary, url, clients, ops),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    cpu = cpu_seconds(meta_pid) - cpu
    if proc.returncode != 0:
        raise HttpError(f"http-cycles failed ({proc.returncode}): {err.decode()[-500:]}")
    create_publish, unpublish_delete, elapsed, client_cpu = parse_c_client(out.decode())
    if len(create_publish) != ops:
        raise HttpError(f"http-cycles ran {len(create_publish)} cycles of {ops}")
    return Round(create_publish, unpublish_delete, elapsed, cpu, client_cpu)


async def aiohttp_cycles(url: str, clients: int, ops: int, meta_pid: int) -> Round:
    """The same cycles through aiohttp's client (`--client aiohttp`): a shared session with a
    keep-alive pool of one connection per concurrent client."""
    create_publish: list[float] = []
    unpublish_delete: list[float] = []
    counter = iter(range(ops))
    connector = aiohttp.TCPConnector(limit=clients)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(url, headers=headers, connector=connector) as http:

        async def request(method: str, path: str, want: int, body: Any = None) -> bytes:
            async with http.request(method, path, json=body) as r:
                return expect(r.status, await r.read(), want)

        async def client(c: int) -> None:
            for n in counter:
                start = time.perf_counter()
                created = await request(
                    "POST", "/v1/volumes", 201, {"name": f"bench-{clients}-{n}", "size_bytes": GIB}
                )
                vid = json.loads(created)["id"]
                initiator = f"{INITIATOR}{c}"
                await request("POST", f"/v1/volumes/{vid}/exports", 201, {"initiator": initiator})
                mid = time.perf_counter()
                await request("DELETE", f"/v1/volumes/{vid}/exports/{initiator}", 204)
                await request("DELETE", f"/v1/volumes/{vid}", 204)
                end = time.perf_counter()
                create_publish.append(mid - start)
                unpublish_delete.append(end - mid)

        start, cpu = time.perf_counter(), cpu_seconds(meta_pid)
        mine = time.process_time()
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(meta_pid) - cpu
        mine = time.process_time() - mine
    return Round(create_publish, unpublish_delete, elapsed, cpu, mine)


async def raw_cycles(etcd: Etcd, clients: int, ops: int) -> Round:
    """The anchor: exactly the etcd round trips meta makes for the four REST calls of a
    cycle (lunastor/meta/store.py), from one client with no HTTP and no meta in between.

    create: 1 txn (name and LUN absent; on failure it reads the name and the target's LUNs
    back). publish, unpublish
    and delete: 1 guarded txn each, against the revisions of the previous commit (meta
    remembers the state it committed, `Store._known`, and reads only when a compare fails).
    """
    create_publish: list[float] = []
    unpublish_delete: list[float] = []
    counter = iter(range(ops))

    async def set_acl(vkey: str, vrev: int, lkey: str, lrev: int, acl: LunRecord) -> int:
        done = await etcd.txn(
            [Compare.mod_revision(vkey) == vrev, Compare.mod_revision(lkey) == lrev],
            [Put(lkey, acl.to_json())],
        )
        assert done.succeeded
        return done.revision

    async def client(c: int) -> None:
        for n in counter:
            target, lun = divmod(n, 255)
            vol = VolumeRecord(id=f"vol-{n:016x}", name=f"raw-{clients}-{n}", size_bytes=GIB,
                               target=target, lun=lun + 1)  # fmt: skip
            vkey, nkey, lkey = (
                Keys.volume(vol.id),
                Keys.volume_name(vol.name),
                Keys.lun(target, lun + 1),
            )
            initiator = f"{INITIATOR}{c}"
            start = time.perf_counter()
            created = await etcd.txn(
                [Compare.version(nkey) == 0, Compare.version(lkey) == 0],
                [Put(vkey, vol.to_json()), Put(nkey, vol.id.encode()),
                 Put(lkey, LunRecord(volume_id=vol.id).to_json())],
                [Get(nkey), Get(lun_target_prefix(target), prefix=True)],
            )  # fmt: skip
            assert created.succeeded
            vrev = created.revision
            acl = LunRecord(volume_id=vol.id, initiators=[initiator])
            lrev = await set_acl(vkey, vrev, lkey, vrev, acl)
            mid = time.perf_counter()
            lrev = await set_acl(vkey, vrev, lkey, lrev, LunRecord(volume_id=vol.id))
            deleted = await etcd.txn(
                [Compare.mod_revision(vkey) == vrev, Compare.mod_revision(lkey) == lrev,
                 Compare.value(nkey) == vol.id.encode()],
                [Delete(vkey), Delete(nkey), Put(Keys.gc_volume(vol.id), vol.to_json()),
                 Delete(lkey)],
            )  # fmt: skip
            assert deleted.succeeded
            end = time.perf_counter()
            create_publish.append(mid - start)
            unpublish_delete.append(end - mid)

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    return Round(create_publish, unpublish_delete, elapsed, cpu, cpu)  # its own client


async def timed(etcd_pid: int, side: Awaitable[Round]) -> Round:
    """`side`'s round with the CPU etcd spent meanwhile: on two cores etcd's work competes
    with meta's and the client's, so the rows say what each cycle cost the whole machine."""
    before = cpu_seconds(etcd_pid)
    done = await side
    return replace(done, etcd_cpu=cpu_seconds(etcd_pid) - before)


def pooled(rounds: list[Round]) -> dict[str, Any]:
    """One side's row: latency percentiles over the samples of all its rounds, cycles per
    second and CPU per cycle over their summed time."""
    cp = [t for r in rounds for t in r.create_publish]
    ud = [t for r in rounds for t in r.unpublish_delete]
    n = len(cp)
    return {
        "cycles": n,
        "cpu_ms": sum(r.cpu for r in rounds) / n * 1000,
        "client_cpu_ms": sum(r.client_cpu for r in rounds) / n * 1000,
        "etcd_cpu_ms": sum(r.etcd_cpu for r in rounds) / n * 1000,
        "cp_p50": percentile(cp, 0.5) * 1000,
        "cp_p99": percentile(cp, 0.99) * 1000,
        "ud_p50": percentile(ud, 0.5) * 1000,
        "ud_p99": percentile(ud, 0.99) * 1000,
        "cycles_per_s": n / sum(r.elapsed for r in rounds),
        # the spread a single round would have shown (how noisy the machine was)
        "round_cp_p99": [percentile(r.create_publish, 0.99) * 1000 for r in rounds],
    }


async def populate(etcd: Etcd, count: int) -> None:
    """Write `count` volumes the way a create does (record, name, LUN), 40 per transaction."""
    batch: list[Put] = []
    for i in range(count):
        target, lun = divmod(i, 255)
        vol = VolumeRecord(
            id=f"vol-{i:016x}",
            name=f"list-{i:05d}",
            size_bytes=GIB,
            created_at=time.time(),
            target=target,
            lun=lun + 1,
        )
        batch += [
            Put(Keys.volume(vol.id), vol.to_json()),
            Put(Keys.volume_name(vol.name), vol.id.encode()),
            Put(Keys.lun(target, lun + 1), LunRecord(volume_id=vol.id).to_json()),
        ]
        if len(batch) >= 120:
            await etcd.txn([], list(batch))
            batch.clear()
    if batch:
        await etcd.txn([], list(batch))


async def list_rest(url: str) -> tuple[float, int]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(url, headers=headers) as http:
        start = time.perf_counter()
        total, token = 0, None
        while True:
            path = "/v1/volumes?limit=1000" + (f"&next={token}" if token else "")
            async with http.get(path) as r:
                page = await r.json()
            total += len(page["items"])
            token = page["next"]
            if not token:
                return time.perf_counter() - start, total


async def list_raw(etcd: Etcd) -> tuple[float, int]:
    start = time.perf_counter()
    kvs, _ = await etcd.get_prefix(Keys.VOLUMES, page_size=1000)
    decoded = [VolumeRecord.from_json(kv.value) for kv in kvs]
    return time.perf_counter() - start, len(decoded)


async def compare_listing(config: EtcdConfig, url: str, volumes: int) -> None:
    """Write `volumes` volumes, then list them through REST and straight from etcd."""
    async with await Etcd.connect(config) as etcd:
        await etcd.delete_prefix("/")
        await populate(etcd, volumes)
        rest = [await list_rest(url) for _ in range(5)]
        raw = [await list_raw(etcd) for _ in range(5)]
    assert all(n == volumes for _, n in rest + raw)
    rest_ms = statistics.median(t for t, _ in rest) * 1000
    raw_ms = statistics.median(t for t, _ in raw) * 1000
    print(f"\nlist {volumes} volumes (median of 5)")
    runs = " ".join(f"{t * 1000:.0f}" for t, _ in rest)
    print(f"  REST, pages of 1000: {rest_ms:7.1f} ms   (runs: {runs})")
    print(f"  raw etcd + decode:   {raw_ms:7.1f} ms   (REST / raw = {rest_ms / raw_ms:.1f}x)")
    print(f"goal: full list < 300 ms: {'met' if rest_ms < 300 else 'NOT met'}")


async def run(ops: int, volumes: int, rounds: int, client: str, listing_only: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lunastor-bench-"))
    binary = (
        iscsi_load.build(tmp / "bin", HTTP_CYCLES) if client == "c" and not listing_only else None
    )
    server = EtcdServer().start()
    namespace = "/bench"
    proc, url = start_meta(server, namespace, tmp)
    assert server.proc is not None
    etcd_pid = server.proc.pid
    print(f"meta pid {proc.pid} (profile it: py-spy record -p {proc.pid})", flush=True)
    listing = EtcdConfig(endpoints=[server.endpoint], namespace=namespace)
    try:
        if listing_only:
            await compare_listing(listing, url, volumes)
            return
        # Meta and the anchor alternate at each level (`rounds` times each), so that load
        # from other jobs on the machine falls on both alike; each row pools its side's
        # rounds: p99 over rounds x ops cycles, not over one round's few hundred (where it is
        # the 3rd-worst sample and one stall of the shared machine decides it).
        config = EtcdConfig(endpoints=[server.endpoint], namespace=namespace + "-raw")
        rows: list[tuple[int, dict[str, Any], dict[str, Any]]] = []
        async with await Etcd.connect(config) as raw_etcd:
            for clients in (1, 10, 50):
                count = max(ops, clients * 4)
                rest_rounds, raw_rounds = [], []
                for _ in range(rounds):
                    rest = (
                        c_cycles(binary, url, clients, count, proc.pid)
                        if binary is not None
                        else aiohttp_cycles(url, clients, count, proc.pid)
                    )
                    rest_rounds.append(await timed(etcd_pid, rest))
                    raw_rounds.append(await timed(etcd_pid, raw_cycles(raw_etcd, clients, count)))
                rows.append((clients, pooled(rest_rounds), pooled(raw_rounds)))
        print("\ncreate+publish / unpublish+delete: REST (real meta process, real etcd) against")
        print("raw etcd (the same transactions from one client, no HTTP, no meta)")
        print(f"{'clients':>7} {'path':>5} {'c+p p50':>9} {'c+p p99':>9} "
              f"{'u+d p50':>9} {'u+d p99':>9} {'cycles/s':>9} {'CPU/cycle':>9} "
              f"{'client':>9} {'etcd':>9}")  # fmt: skip
        for clients, rest_row, raw_row in rows:
            for path, r in (("REST", rest_row), ("raw", raw_row)):
                latencies = " ".join(
                    f"{r[k]:>7.1f}ms" for k in ("cp_p50", "cp_p99", "ud_p50", "ud_p99")
                )
                print(
                    f"{clients:>7} {path:>5} {latencies} {r['cycles_per_s']:>9.0f} "
                    f"{r['cpu_ms']:>7.2f}ms {r['client_cpu_ms']:>7.2f}ms {r['etcd_cpu_ms']:>7.2f}ms"
                )
        _, rest50, raw50 = rows[-1]
        client_name = "bench/http_cycles.c" if client == "c" else "aiohttp"
        ratio = rest50["cp_p99"] / raw50["cp_p99"]
        print(f"goal: create+publish p99 at 50 clients within 1.5x of raw etcd: "
              f"{rest50['cp_p99']:.1f} / {raw50['cp_p99']:.1f} ms = {ratio:.2f}x "
              f"({'met' if ratio <= 1.5 else 'NOT met'}; {rest50['cycles']} cycles a side "
              f"in {rounds} alternating rounds; REST client: {client_name})")  # fmt: skip
        pairs = zip(rest50["round_cp_p99"], raw50["round_cp_p99"], strict=True)
        spread = [f"{a:.0f}/{b:.0f}" for a, b in pairs]
        print(f"  single rounds' c+p p99 at 50 clients, REST/raw ms: {' '.join(spread)}")
        # What a cycle costs the two cores all processes share (docs/scale.md: at 50 clients
        # the REST side's latency follows it): REST meta + its HTTP client + etcd, raw the
        # anchor (its own client) + etcd.
        rest_total = rest50["cpu_ms"] + rest50["client_cpu_ms"] + rest50["etcd_cpu_ms"]
        raw_total = raw50["cpu_ms"] + raw50["etcd_cpu_ms"]
        print(f"  CPU per cycle at 50 clients, all processes: REST {rest_total:.2f} ms "
              f"(meta {rest50['cpu_ms']:.2f} + client {rest50['client_cpu_ms']:.2f} + etcd "
              f"{rest50['etcd_cpu_ms']:.2f}), raw {raw_total:.2f} ms (anchor "
              f"{raw50['cpu_ms']:.2f} + etcd {raw50['etcd_cpu_ms']:.2f}): "
              f"{rest_total / raw_total:.2f}x")  # fmt: skip
        print("CPU/cycle: the meta process's CPU (REST), the anchor's CPU (raw);")
        print(f"client: the REST client's CPU per cycle ({client_name}, --client; raw: the "
              f"anchor)")  # fmt: skip
        print("etcd: the etcd process's CPU per cycle (REST: meta's background work included)")

        await compare_listing(listing, url, volumes)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.control_plane")
    parser.add_argument(
        "--ops", type=int, default=500, help="cycles per round at each concurrency level"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="alternating rounds per side at each level"
    )
    parser.add_argument("--volumes", type=int, default=10_000, help="volumes to list")
    parser.add_argument(
        "--client",
        choices=("c", "aiohttp"),
        default="c",
        help="the REST side's HTTP client: bench/http_cycles.c (default; see docs/scale.md) "
        "or aiohttp's",
    )
    parser.add_argument(
        "--only-listing", action="store_true", help="measure only the listing (no cycles)"
    )
    args = parser.parse_args()
    asyncio.run(run(args.ops, args.volumes, args.rounds, args.client, args.only_listing))


if __name__ == "__main__":
    main()
