"""COMPARE AND WRITE atomic across access points (docs/datapath.md, "COMPARE AND WRITE").

Two initiators (real libiscsi sessions, tests/tools/nexus_client.c) log in through two access
points on two chunk servers of an in-process cluster (real etcd, real data nodes on real
sockets, 3 replicas) and run the VMware ATS heartbeat pattern on one block: each reads the
block, then both COMPARE AND WRITE old -> their own new value at once, many rounds. With the
`caw` op executed by the extent's primary inside its ordering exactly one of the two succeeds
in every round, the other gets MISCOMPARE; the negative control (each access point reads,
compares and writes under its own lock, as before `caw`) lets both succeed for the same old
value.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from lunastor.chunk.replication.node import first_difference
from lunastor.chunk.wire.messages import CompareAndWrite, Request, Status
from lunastor.common.etcd import Etcd
from lunastor.common.records import Keys, LunRecord, VolumeRecord
from lunastor.iscsi.blockdev import Miscompare, NexusLost
from tests.integration.chunk import test_fencing_login, test_replication
from tests.integration.chunk.test_fencing import NEXUS, login, make_cluster
from tests.integration.chunk.test_fencing_login import Client, serve_iscsi, url
from tests.integration.chunk.test_replication import EXTENT, Cluster, checksum_arrays

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or not Path("/usr/include/iscsi/iscsi.h").exists(),
    reason="gcc and libiscsi-dev are needed",
)
HOSTS = ("iqn.2026-11.org.example:esx-a", "iqn.2026-11.org.example:esx-b")
VOL = "vol-t"
ROUNDS = 100  # new values 1..200: every value written is unique (no ABA)
KILL_AT = 30  # the round whose CAWs are in flight when the primary is killed (primary-killed)
MISCOMPARE_AT_0 = "MISCOMPARE 0"  # sense key 0Eh; INFORMATION: the first differing byte
# the same real fixtures: an in-process cluster (etcd, three data nodes), the libiscsi tool
cluster = test_replication.cluster
etcd = test_fencing_login.etcd
client_binary = test_fencing_login.client_binary


async def start_client(binary: Path, initiator: str) -> Client:
    proc = await asyncio.create_subprocess_exec(
        str(binary), initiator, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    return Client(proc)


@pytest.mark.parametrize("mode", ["caw-at-primary", "access-point-only", "primary-killed"])
async def test_two_initiators_racing_caw_on_two_access_points_never_both_succeed(
    etcd: Etcd, tmp_path: Path, client_binary: Path, mode: str
) -> None:
    """`primary-killed`: the extent's primary is killed while the CAWs of round KILL_AT are in
    flight; the access points fail over to a survivor, which compares against its own copy
    (it holds every acknowledged write). That round may have no winner (a CAW applied whose
    answer died with the primary is retried and miscompares: docs/datapath.md, "Missing");
    never two, and every later round has exactly one."""
    at_primary = mode != "access-point-only"
    c = Cluster(etcd, tmp_path)
    for i, zone in enumerate(("z1", "z2", "z3")):
        await c.add(f"chunk-{i}", zone, fence=True)
    await c.wait_known()
    for n in c.nodes.values():
        n.path.caw_at_primary = at_primary
    vol = VolumeRecord(id=VOL, name=VOL, size_bytes=4 * EXTENT, target=0, lun=0, replicas=3)
    await etcd.put(Keys.volume(VOL), vol.to_json())
    await etcd.put(Keys.lun(0, 0), LunRecord(volume_id=VOL, initiators=list(HOSTS)).to_json())
    # the extent allocated first (another block of it), then the two access points are the
    # two servers that are not its primary: both reach it over the data port, a fair race
    await c.volume("chunk-0").write(8, b"\x05" * 4096, fua=False)
    rec = c.nodes["chunk-0"].emap.get(VOL, 0)
    assert rec is not None and len(rec.replicas) == 3
    aps = [cid for cid in c.nodes if cid != rec.primary]
    served = [await serve_iscsi(etcd, c.nodes[cid], port) for port, cid in enumerate(aps, 1)]
    a, b = [await start_client(client_binary, h) for h in HOSTS]
    try:
        assert await a(f"login s 1 1 {url(served[0][1])}") == "OK"
        assert await b(f"login s 2 1 {url(served[1][1])}") == "OK"
        value, doubles, wins = 0, 0, {"a": 0, "b": 0}
        for r in range(ROUNDS):
            # the block (LBA 0, the first 512 bytes of the tool's 4 KiB read) as each sees it
            seen = {(await a("read s 0")).split()[1], (await b("read s 0")).split()[1]}
            assert seen == {str(value)}, (r, seen)  # both hold the same old value
            new = {"a": 2 * r + 1, "b": 2 * r + 2}
            order = [(a, "a"), (b, "b")] if r % 2 else [(b, "b"), (a, "a")]  # who sends first
            kill = mode == "primary-killed" and r == KILL_AT
            answers = await asyncio.gather(
                *(client(f"caw s 0 {value} {new[k]}") for client, k in order),
                *([c.kill(rec.primary)] if kill else []),
            )
            got = {k: line for (_, k), line in zip(order, answers, strict=False)}
            won = [k for k, line in got.items() if line == "GOOD"]
            assert all(line in ("GOOD", MISCOMPARE_AT_0) for line in got.values()), got
            if kill:
                assert len(won) <= 1, (r, got)
                old = value
                value = int((await a("read s 0")).split()[1])
                assert value in {old, *new.values()}, (r, value, got)
                print(f"round {r}, primary killed: {got}, block now {value}")
                for k in won:
                    wins[k] += 1
                continue
            if at_primary:
                assert len(won) == 1, (r, got)  # never both for one old value, never neither
            elif len(won) == 2:
                doubles += 1
                break  # the negative control has shown what it must
            for k in won:
                wins[k] += 1
            value = int((await a("read s 0")).split()[1])
            assert value in {new[k] for k in won}, (r, value, got)
        if at_primary:
            print(f"caw race: {ROUNDS} rounds, wins a={wins['a']} b={wins['b']}, 0 doubles")
            assert min(wins.values()) > 0  # both access points won some rounds: a real race
            arrays = await checksum_arrays(c, VOL, 0)  # of the servers alive
            assert len(arrays) == (2 if mode == "primary-killed" else 3)
            assert len(set(arrays.values())) == 1  # identical replicas
        else:
            print(f"access-point-only CAW: both won round {r}")
            assert doubles == 1  # without `caw` at the primary both CAWs of one value succeed
        assert await a("logout s") == "OK"
        assert await b("logout s") == "OK"
    finally:
        await a.close()
        await b.close()
        for host, server in served:
            await server.close()
            await host.stop()
        await c.close()


async def test_caw_compares_with_the_primary_data_and_reports_the_first_difference(
    cluster: Cluster,
) -> None:
    v0, v2 = cluster.volume("chunk-0"), cluster.volume("chunk-2")
    assert await v0.read(10, 1) == bytes(512)
    await v0.compare_and_write(10, bytes(512), b"\x07" * 512)  # unallocated: compared with zeros
    rec = cluster.nodes["chunk-0"].emap.get(VOL, 0)
    assert rec is not None and len(rec.replicas) == 3
    with pytest.raises(Miscompare) as err:
        await v2.compare_and_write(10, b"\x07" * 300 + b"\x08" * 212, b"\x09" * 512)
    assert err.value.offset == 300
    assert await v2.read(10, 1) == b"\x07" * 512  # nothing written
    await v2.compare_and_write(10, b"\x07" * 512, b"\x09" * 512)
    assert await v0.read(10, 1) == b"\x09" * 512
    assert len(set((await checksum_arrays(cluster, VOL, 0)).values())) == 1
    # spanning two extents (only an ORWRITE's compare-and-write can: the LU caps COMPARE AND
    # WRITE at one block): the access point's fallback, still all or nothing
    lba = EXTENT // 512 - 1
    await v0.write(lba, b"\x01" * 1024, fua=False)
    with pytest.raises(Miscompare) as err:
        await v2.compare_and_write(lba, b"\x01" * 1000 + b"\x02" * 24, b"\x03" * 1024)
    assert err.value.offset == 1000
    assert await v0.read(lba, 2) == b"\x01" * 1024
    await v2.compare_and_write(lba, b"\x01" * 1024, b"\x03" * 1024)
    assert await v0.read(lba, 2) == b"\x03" * 1024


async def test_a_superseded_sessions_caw_is_fenced_and_writes_nothing(
    etcd: Etcd, tmp_path: Path
) -> None:
    # the nexus logs in again through another access point (a path failover): the old
    # session's CAW, even one whose compare would match, is refused before the compare
    c = await make_cluster(etcd, tmp_path, fence=True)
    try:
        await c.volume("chunk-0").write(8, b"\x05" * 4096, fua=False)  # allocates extent 0
        rec = c.nodes["chunk-0"].emap.get(VOL, 0)
        assert rec is not None
        old, new = (n for n in c.nodes.values() if n.id != rec.primary)
        login(old, NEXUS)
        v_old, v_new = c.volume(old.id), c.volume(new.id)
        await v_old.compare_and_write(0, bytes(512), b"\x01" * 512, NEXUS)
        login(new, NEXUS)
        await v_new.compare_and_write(0, b"\x01" * 512, b"\x02" * 512, NEXUS)
        with pytest.raises(NexusLost):
            await v_old.compare_and_write(0, b"\x02" * 512, b"\x03" * 512, NEXUS)
        assert await v_new.read(0, 1) == b"\x02" * 512
        assert len(set((await checksum_arrays(c, VOL, 0)).values())) == 1
    finally:
        await c.close()


async def test_a_retried_caw_is_answered_from_its_token_not_compared_again(
    cluster: Cluster,
) -> None:
    # an access point whose answer was lost (a dropped connection, or `unavailable` after
    # the primary applied it) sends the same command again, with the same token
    await cluster.volume("chunk-0").write(8, b"\x05" * 4096, fua=False)  # allocates extent 0
    rec = cluster.nodes["chunk-0"].emap.get(VOL, 0)
    assert rec is not None
    ap = next(n for n in cluster.nodes.values() if n.id != rec.primary)

    def caw(token: int) -> Callable[[int], Request]:
        def build(i: int) -> Request:
            return CompareAndWrite(i, VOL, 0, rec.gen, 0, 512, False, bytes(512), b"\x01" * 512,
                                   None, token)  # fmt: skip

        return build

    first = await ap.replicas.call(rec.primary, caw(77))
    assert first.ok
    again = await ap.replicas.call(rec.primary, caw(77))
    assert again.ok and again.fields["applied_seq"] == first.fields["applied_seq"]
    # another command (another token) with the same verify data is compared: miscompare
    other = await ap.replicas.call(rec.primary, caw(78))
    assert other.status is Status.MISCOMPARE and other.fields["offset"] == 0
    for n in cluster.nodes.values():  # applied once, everywhere
        replica = await n.store.open(VOL, 0)
        assert replica.applied_seq == first.fields["applied_seq"]
        assert await replica.read(0, 512) == b"\x01" * 512


async def test_a_caw_retried_at_the_primary_that_took_over_is_answered_from_its_token(
    cluster: Cluster,
) -> None:
    # The primary applies a caw and forwards it (as a write carrying the token), and dies
    # before its answer reaches the access point, which retries it, same token, at the
    # survivor that takes the extent over. Compared again with its own new data, it was
    # answered MISCOMPARE although it was written.
    await cluster.volume("chunk-0").write(8, b"\x05" * 4096, fua=False)  # allocates extent 0
    rec = cluster.nodes["chunk-0"].emap.get(VOL, 0)
    assert rec is not None
    ap = next(n for n in cluster.nodes.values() if n.id != rec.primary)
    new_value = b"\x01" * 512

    def caw(token: int) -> Callable[[int, int], Request]:
        def build(i: int, gen: int) -> Request:
            return CompareAndWrite(i, VOL, 0, gen, 0, 512, False, bytes(512), new_value,
                                   None, token)  # fmt: skip

        return build

    first = await ap.replicas.call(rec.primary, lambda i: caw(77)(i, rec.gen))
    assert first.ok  # ... and the answer is lost with its primary
    await cluster.kill(rec.primary)
    assert await ap.path.mutate(VOL, 0, 3, caw(77), allocate=False)
    after = ap.emap.get(VOL, 0)
    assert after is not None and after.primary != rec.primary and after.gen > rec.gen
    for n in cluster.nodes.values():  # applied once, on every survivor
        if n.alive:
            replica = await n.store.open(VOL, 0)
            assert replica.applied_seq == first.fields["applied_seq"]
            assert await replica.read(0, 512) == new_value
    # another command (another token) with the same verify data is compared: miscompare
    with pytest.raises(Miscompare):
        await ap.path.mutate(VOL, 0, 3, caw(78), allocate=False)


def test_first_difference() -> None:
    for n in (1, 2, 7, 512, 4096):
        for k in range(n):
            a = bytes(n)
            assert first_difference(a, a[:k] + b"\x01" + a[k + 1 :]) == k
    with pytest.raises(ValueError):
        first_difference(b"ab", b"ab")
