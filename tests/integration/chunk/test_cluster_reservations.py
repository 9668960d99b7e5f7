"""SCSI reservations across real chunk servers of a dev cluster (docs/scsi.md, "Reservations
across access points"): two initiators, each logged in to a different chunk server with a
small initiator built from our own codec (libiscsi's tools cannot hold a command queued while
another session runs PREEMPT AND ABORT)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.records import Keys
from lunastor.iscsi import pdu as p
from lunastor.iscsi.text import encode_text, parse_text
from tests.integration.chunk.test_replicated_cluster import Cluster, _target_url, _wait_lun
from tests.integration.test_iscsi_server import Initiator
from tests.support.devcluster import dev_up, lunastor
from tests.support.procs import async_wait_for

INI_A = "iqn.2026-11.test:pr-a"
INI_B = "iqn.2026-11.test:pr-b"
GOOD, CHECK_CONDITION, RESERVATION_CONFLICT = 0x00, 0x02, 0x18
TUR = b"\x00" * 6
READ10 = bytes([0x28, 0, 0, 0, 0, 16, 0, 0, 8, 0])  # LBA 16, 8 blocks
WRITE10 = bytes([0x2A, 0, 0, 0, 0, 16, 0, 0, 8, 0])


class Client(Initiator):
    """`Initiator` logged in as any initiator name, to any target, on any address."""

    @classmethod
    async def to(cls, portal: str, initiator: str, vol: dict[str, Any], isid: int) -> Client:
        host, _, port = portal.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        client = cls(reader, writer)
        keys = [
            ("InitiatorName", initiator),
            ("TargetName", vol["target_iqn"]),
            ("SessionType", "Normal"),
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "65536"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "Yes"),
        ]
        client.send(
            p.LoginRequest(
                transit=True, csg=1, nsg=3, isid=isid, itt=0, cmdsn=1, data=encode_text(keys)
            )
        )
        resp = await client.recv()
        assert isinstance(resp, p.LoginResponse) and resp.status_class == 0, resp
        assert dict(parse_text(resp.data))["HeaderDigest"] == "None"
        client.statsn = resp.statsn + 1
        client.lun = int(vol["lun"])
        return client

    lun = 0

    def command(self, cdb: bytes, *, read: int = 0, write: int = 0, imm: bytes = b"") -> int:
        """`Initiator.command` to this client's LUN."""
        self.itt += 1
        self.send(
            p.ScsiCommand(
                itt=self.itt,
                cmdsn=self.cmdsn,
                expstatsn=self.statsn,
                lun=p.lun_field(self.lun),
                cdb=cdb.ljust(16, b"\0"),
                read=bool(read),
                write=bool(write),
                expected_data_transfer_length=read or write,
                data=imm,
            )
        )
        self.cmdsn += 1
        return self.itt

    async def run(self, cdb: bytes, data: bytes = b"", read: int = 0) -> tuple[int, bytes]:
        self.pending_write = data
        itt = self.command(cdb, read=read, write=len(data), imm=data[:8192])
        return await self.result(itt)

    async def prout(self, sa: int, key: int, sa_key: int, ptype: int = 0) -> int:
        data = key.to_bytes(8, "big") + sa_key.to_bytes(8, "big") + bytes(8)
        status, _ = await self.run(bytes([0x5F, sa, ptype, 0, 0, 0, 0, 0, 24, 0]), data)
        return status

    async def sense(self, cdb: bytes) -> tuple[int, int, int]:
        """Key, ASC, ASCQ of the CHECK CONDITION `cdb` must end with."""
        itt = self.command(cdb)
        while True:
            pdu = await self.recv()
            assert pdu is not None, "connection closed"
            if isinstance(pdu, p.ScsiResponse) and pdu.itt == itt:
                assert pdu.status == CHECK_CONDITION, pdu
                sense = bytes(pdu.sense)
                return sense[2] & 0x0F, sense[12], sense[13]
            assert not isinstance(pdu, p.ScsiResponse | p.DataIn), f"unexpected {pdu!r}"

    async def clear_unit_attentions(self) -> None:
        for _ in range(8):
            status, _ = await self.run(TUR)
            if status == GOOD:
                return
        raise AssertionError("unit attentions never cleared")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    state = dev_up(tmp_path / "dev", chunks=3, lease_ttl=2.0)
    try:
        yield Cluster(tmp_path / "dev", state)
    finally:
        lunastor("dev", "down", "--dir", str(tmp_path / "dev"), check=False)


def _etcd(cluster: Cluster) -> Etcd:
    etcd = cluster.state["etcd"]
    return Etcd(EtcdConfig(endpoints=etcd["endpoints"], namespace=etcd["namespace"], timeout=5))


async def _applied_everywhere(cluster: Cluster, volume_id: str) -> bool:
    """Whether every live chunk server enforces the volume's latest reservation state."""
    async with _etcd(cluster) as etcd:
        state = await etcd.get(Keys.RESERVATIONS + volume_id)
        acks, _ = await etcd.get_prefix(Keys.LIVE_RESERVATIONS_APPLIED)
        live, _ = await etcd.get_prefix(Keys.LIVE_CHUNKS)
    assert state is not None
    applied = {
        kv.key.removeprefix(Keys.LIVE_RESERVATIONS_APPLIED): json.loads(kv.value) for kv in acks
    }
    assert set(applied) == {kv.key.removeprefix(Keys.LIVE_CHUNKS) for kv in live}
    return all(a["revision"] >= state.mod_revision for a in applied.values())


def _metric(cluster: Cluster, chunk: str, name: str) -> float:
    admin = cluster.state["daemons"][chunk]["endpoints"]["admin"]
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _volume(cluster: Cluster) -> tuple[dict[str, Any], list[str]]:
    vol = cluster.create_exported_volume("pr", "64MiB", INI_A, INI_B)
    portals = [cluster.portal(c) for c in cluster.chunks]
    for portal in portals[:2]:
        for ini in (INI_A, INI_B):
            _wait_lun(_target_url(portal, vol["target_iqn"], vol["lun"]), ini)
    return vol, portals


async def test_reservations_and_resets_through_one_chunk_server_hold_on_another_at_once(
    cluster: Cluster,
) -> None:
    vol, portals = _volume(cluster)
    a = await Client.to(portals[0], INI_A, vol, 0x400001)
    b = await Client.to(portals[1], INI_B, vol, 0x400002)
    await a.clear_unit_attentions()
    await b.clear_unit_attentions()
    assert await a.prout(0, 0, 0xA) == GOOD  # REGISTER
    assert await a.prout(1, 0xA, 0, ptype=3) == GOOD  # RESERVE, EXCLUSIVE ACCESS
    # GOOD came back: chunk 2 enforces it already (no waiting here) and so does chunk 3
    assert await _applied_everywhere(cluster, vol["id"])
    assert (await b.run(READ10, read=4096))[0] == RESERVATION_CONFLICT
    assert (await b.run(WRITE10, bytes(4096)))[0] == RESERVATION_CONFLICT
    assert (await a.run(WRITE10, b"a" * 4096))[0] == GOOD
    # the holder releases through chunk 1: chunk 2 lets b in at once
    assert await a.prout(3, 0xA, 0) == GOOD  # CLEAR
    assert (await b.run(READ10, read=4096)) == (GOOD, b"a" * 4096)
    # RESERVE(6) through chunk 1 conflicts on chunk 2 ...
    assert (await a.run(bytes([0x16, 0, 0, 0, 0, 0])))[0] == GOOD
    assert (await b.run(bytes([0x16, 0, 0, 0, 0, 0])))[0] == RESERVATION_CONFLICT
    # ... until a LUN reset through chunk 2, which raises BUS DEVICE RESET on chunk 1's nexus
    # by the time the reset is answered (libiscsi's MultipathIO.Reset)
    reset = p.TaskManagementRequest(
        function=5, itt=700, lun=p.lun_field(b.lun), cmdsn=b.cmdsn, immediate=True
    )
    b.send(reset)
    resp = await b.recv()
    assert isinstance(resp, p.TaskManagementResponse) and resp.response == 0
    assert await a.sense(TUR) == (6, 0x29, 0x03)
    assert await b.sense(TUR) == (6, 0x29, 0x03)
    assert (await b.run(bytes([0x16, 0, 0, 0, 0, 0])))[0] == GOOD
    b.close()  # the holder's session ends on chunk 2: its RESERVE(6) ends everywhere

    async def reserved_by_a() -> bool:
        return (await a.run(bytes([0x16, 0, 0, 0, 0, 0])))[0] == GOOD

    await async_wait_for(reserved_by_a, 10, "RESERVE(6) of the closed session to end")
    a.close()


async def test_preempt_and_abort_through_one_chunk_server_aborts_a_write_queued_on_another(
    cluster: Cluster,
) -> None:
    vol, portals = _volume(cluster)
    a = await Client.to(portals[0], INI_A, vol, 0x400011)
    b = await Client.to(portals[1], INI_B, vol, 0x400012)
    await a.clear_unit_attentions()
    await b.clear_unit_attentions()
    assert await b.prout(0, 0, 0xB) == GOOD
    assert await a.prout(0, 0, 0xA) == GOOD
    # b's WRITE waits on chunk 2 for its data (InitialR2T=Yes, no immediate data)
    queued = b.command(WRITE10, write=4096)
    r2t = await b.recv()
    assert isinstance(r2t, p.R2T) and r2t.itt == queued
    # PREEMPT AND ABORT of b's key through chunk 1 (no reservation is held: it only removes
    # b's registration, and aborts b's tasks)
    assert await a.prout(5, 0xA, 0xB, ptype=1) == GOOD
    # the write is gone on chunk 2 already: its data now finds no task, nothing is written
    b.send(p.DataOut(itt=queued, ttt=r2t.ttt, buffer_offset=0, data=b"b" * 4096, final=True))
    assert await b.sense(TUR) == (6, 0x2A, 0x05)  # REGISTRATIONS PREEMPTED, no write status
    assert (await a.run(READ10, read=4096)) == (GOOD, bytes(4096))  # it never landed
    assert await b.prout(0, 0xB, 0xB2) == RESERVATION_CONFLICT  # b's key is gone
    a.close()
    b.close()


async def test_a_restarted_chunk_server_enforces_the_reservation_it_missed(
    cluster: Cluster,
) -> None:
    vol, portals = _volume(cluster)
    second = cluster.chunks[1]
    lunastor("dev", "stop", second, "--kill", "--dir", str(cluster.dir))
    a = await Client.to(portals[0], INI_A, vol, 0x400021)
    await a.clear_unit_attentions()
    assert await a.prout(0, 0, 0xA) == GOOD
    assert await a.prout(1, 0xA, 0, ptype=1) == GOOD  # WRITE EXCLUSIVE, while chunk 2 is down
    lunastor("dev", "start", second, "--dir", str(cluster.dir))
    _wait_lun(_target_url(portals[1], vol["target_iqn"], vol["lun"]), INI_B)
    b = await Client.to(portals[1], INI_B, vol, 0x400022)
    await b.clear_unit_attentions()
    assert (await b.run(WRITE10, bytes(4096)))[0] == RESERVATION_CONFLICT
    assert (await b.run(READ10, read=4096))[0] == GOOD  # WRITE EXCLUSIVE lets others read
    status, data = await b.run(bytes([0x5E, 1, 0, 0, 0, 0, 0, 0, 24, 0]), read=24)
    assert status == GOOD and data[8:16] == (0xA).to_bytes(8, "big") and data[21] == 1
    a.close()
    b.close()


async def test_concurrent_registrations_through_two_chunk_servers_serialize(
    cluster: Cluster,
) -> None:
    vol, portals = _volume(cluster)
    chunks = cluster.chunks[:2]
    a = await Client.to(portals[0], INI_A, vol, 0x400031)
    b = await Client.to(portals[1], INI_B, vol, 0x400032)
    await a.clear_unit_attentions()
    await b.clear_unit_attentions()
    per_session = 8

    async def register_many(c: Client, base: int) -> list[int]:
        # pipelined on the session: REGISTER AND IGNORE EXISTING KEY bumps PRgeneration by one
        itts = []
        for i in range(per_session):
            data = bytes(8) + (base + i).to_bytes(8, "big") + bytes(8)
            c.pending_write = data
            itts.append(c.command(bytes([0x5F, 6, 0, 0, 0, 0, 0, 0, 24, 0]), write=24, imm=data))
        statuses: dict[int, int] = {}
        while len(statuses) < len(itts):  # they complete in any order
            pdu = await c.recv()
            assert pdu is not None, "connection closed"
            if isinstance(pdu, p.ScsiResponse):
                statuses[pdu.itt] = pdu.status
        assert set(statuses) == set(itts)
        return list(statuses.values())

    results = await asyncio.gather(register_many(a, 0xA00), register_many(b, 0xB00))
    assert set(results[0] + results[1]) == {GOOD}
    status, data = await a.run(bytes([0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0]), read=256)
    assert status == GOOD
    assert int.from_bytes(data[0:4], "big") == 2 * per_session  # no change was lost
    assert int.from_bytes(data[4:8], "big") == 16  # one key per I_T nexus
    # and they did collide in etcd (then were retried)
    assert sum(_metric(cluster, c, "lunastor_reservation_conflicts_total") for c in chunks) > 0
    a.close()
    b.close()
