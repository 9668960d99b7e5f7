"""Control-plane benchmark: the meta REST API against raw etcd, measured in the same run.

    python -m bench.control_plane [--ops 300] [--volumes 10000]

Starts its own etcd and a real `lunastor-meta` process, then measures:

- create+publish and unpublish+delete (two REST calls each) at 1, 10 and 50 concurrent
  clients: p50/p99 latency and full cycles per second;
- listing 10,000 volumes through REST (pages of 1000 pinned to one revision) against reading
  and decoding the same keys straight from etcd.

Goals (issue 4): create+publish p99 < 20 ms at 50 clients; the full 10,000 list < 300 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from lunastor.common.config import to_toml_table
from lunastor.common.etcd import Compare, Delete, Etcd, EtcdConfig, Put
from lunastor.common.records import Keys, LunRecord, VolumeRecord
from tests.support.etcd import EtcdServer
from tests.support.procs import free_port, wait_for

TOKEN = "bench-admin"
GIB = 1 << 30


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


async def cycles(url: str, clients: int, ops: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    create_publish: list[float] = []
    unpublish_delete: list[float] = []
    counter = iter(range(ops))
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, headers=headers, connector=connector) as http:

        async def client(c: int) -> None:
            for n in counter:
                name = f"bench-{clients}-{n}"
                start = time.perf_counter()
                async with http.post("/v1/volumes", json={"name": name, "size_bytes": GIB}) as r:
                    assert r.status == 201, await r.text()
                    vid = (await r.json())["id"]
                initiator = f"iqn.2026-01.io.bench:node-{c}"
                async with http.post(
                    f"/v1/volumes/{vid}/exports", json={"initiator": initiator}
                ) as r:
                    assert r.status == 201, await r.text()
                mid = time.perf_counter()
                async with http.delete(f"/v1/volumes/{vid}/exports/{initiator}") as r:
                    assert r.status == 204, await r.text()
                async with http.delete(f"/v1/volumes/{vid}") as r:
                    assert r.status == 204, await r.text()
                end = time.perf_counter()
                create_publish.append(mid - start)
                unpublish_delete.append(end - mid)

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
    return {
        "clients": clients,
        "cycles": ops,
        "cp_p50": percentile(create_publish, 0.5) * 1000,
        "cp_p99": percentile(create_publish, 0.99) * 1000,
        "ud_p50": percentile(unpublish_delete, 0.5) * 1000,
        "ud_p99": percentile(unpublish_delete, 0.99) * 1000,
        "cycles_per_s": ops / elapsed,
    }


async def raw_cycles(etcd: Etcd, clients: int, ops: int) -> dict[str, Any]:
    """The anchor: the same etcd reads and transactions a cycle makes, without meta."""
    create_publish: list[float] = []
    counter = iter(range(ops))

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
            start = time.perf_counter()
            created = await etcd.txn(
                [Compare.version(nkey) == 0, Compare.version(lkey) == 0],
                [Put(vkey, vol.to_json()), Put(nkey, vol.id.encode()),
                 Put(lkey, LunRecord(volume_id=vol.id).to_json())],
            )  # fmt: skip
            assert created.succeeded
            v, lr = await etcd.get(vkey), await etcd.get(lkey)
            assert v is not None and lr is not None
            acl = LunRecord(volume_id=vol.id, initiators=[f"iqn.2026-01.io.bench:node-{c}"])
            await etcd.txn(
                [Compare.mod_revision(vkey) == v.mod_revision,
                 Compare.mod_revision(lkey) == lr.mod_revision],
                [Put(lkey, acl.to_json())],
            )  # fmt: skip
            create_publish.append(time.perf_counter() - start)
            await etcd.txn([], [Delete(vkey), Delete(nkey), Delete(lkey)])

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.perf_counter() - start
    return {
        "cp_p50": percentile(create_publish, 0.5) * 1000,
        "cp_p99": percentile(create_publish, 0.99) * 1000,
        "cycles_per_s": ops / elapsed,
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


async def run(ops: int, volumes: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lunastor-bench-"))
    server = EtcdServer().start()
    namespace = "/bench"
    proc, url = start_meta(server, namespace, tmp)
    try:
        rows = []
        for clients in (1, 10, 50):
            rows.append(await cycles(url, clients, max(ops, clients * 4)))
        print("\ncreate+publish / unpublish+delete (REST, real meta process, real etcd)")
        print(f"{'clients':>7} {'cycles':>6} {'c+p p50':>9} {'c+p p99':>9} "
              f"{'u+d p50':>9} {'u+d p99':>9} {'cycles/s':>9}")  # fmt: skip
        for r in rows:
            latencies = " ".join(
                f"{r[k]:>7.1f}ms" for k in ("cp_p50", "cp_p99", "ud_p50", "ud_p99")
            )
            print(f"{r['clients']:>7} {r['cycles']:>6} {latencies} {r['cycles_per_s']:>9.0f}")
        config = EtcdConfig(endpoints=[server.endpoint], namespace=namespace + "-raw")
        async with await Etcd.connect(config) as raw_etcd:
            raws = [await raw_cycles(raw_etcd, c, max(ops, c * 4)) for c in (1, 10, 50)]
        print("anchor: the same etcd operations straight from one client (no meta)")
        for clients, r in zip((1, 10, 50), raws, strict=True):
            print(f"{clients:>7} {'':>6} {r['cp_p50']:>7.1f}ms {r['cp_p99']:>7.1f}ms "
                  f"{'':>9} {'':>9} {r['cycles_per_s']:>9.0f}")  # fmt: skip
        goal = rows[-1]["cp_p99"]
        print(f"goal: create+publish p99 < 20 ms at 50 clients: {goal:.1f} ms "
              f"({'met' if goal < 20 else 'NOT met'})")  # fmt: skip

        config = EtcdConfig(endpoints=[server.endpoint], namespace=namespace)
        async with await Etcd.connect(config) as etcd:
            await etcd.delete_prefix("/")
            await populate(etcd, volumes)
            rest = [await list_rest(url) for _ in range(5)]
            raw = [await list_raw(etcd) for _ in range(5)]
        assert all(n == volumes for _, n in rest + raw)
        rest_ms = statistics.median(t for t, _ in rest) * 1000
        raw_ms = statistics.median(t for t, _ in raw) * 1000
        print(f"\nlist {volumes} volumes (median of 5)")
        print(f"  REST, pages of 1000: {rest_ms:7.1f} ms")
        print(f"  raw etcd + decode:   {raw_ms:7.1f} ms   (REST / raw = {rest_ms / raw_ms:.1f}x)")
        print(f"goal: full list < 300 ms: {'met' if rest_ms < 300 else 'NOT met'}")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.control_plane")
    parser.add_argument("--ops", type=int, default=300, help="cycles per concurrency level")
    parser.add_argument("--volumes", type=int, default=10_000, help="volumes to list")
    args = parser.parse_args()
    asyncio.run(run(args.ops, args.volumes))


if __name__ == "__main__":
    main()
