"""Each extent-store error maps onto exactly one wire status, with the fields it requires."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lunastor.chunk import store as s
from lunastor.chunk.replication.replicas import DataService, error_response
from lunastor.chunk.wire.messages import (
    Advance,
    Copy,
    Create,
    FrameReader,
    GetState,
    Op,
    Ping,
    Read,
    Status,
    Write,
    decode_response,
    encode_response,
)

CASES: list[tuple[s.ExtentStoreError, Status, dict[str, Any]]] = [
    (s.StaleGeneration(5, 4), Status.STALE_GENERATION, {"gen": 5}),
    (s.FutureGeneration(5, 6), Status.STALE_GENERATION, {"gen": 5}),
    (s.OutOfOrder(8, 3), Status.OUT_OF_ORDER, {"expected": 8}),
    (s.ChecksumMismatch([1, 9]), Status.CHECKSUM_MISMATCH, {"blocks": [1, 9]}),
    (s.SpaceExhausted("/d"), Status.NO_SPACE, {}),
    (s.ReplicaNotFound("v", 1), Status.NOT_FOUND, {}),
    (s.ReplicaClosed("gone"), Status.NOT_FOUND, {}),
    (s.ReplicaExists("v", 1), Status.EXISTS, {}),
    (s.ReplicaNotCurrent(1, "serve reads"), Status.NOT_CURRENT, {}),
    (s.InvalidRequest("bad range"), Status.BAD_REQUEST, {}),
    (s.DataDirFailed("/d", 5, "EIO"), Status.UNAVAILABLE, {}),
    (s.HeaderDamaged("/d/h", "torn"), Status.UNAVAILABLE, {}),
]


@pytest.mark.parametrize(("exc", "status", "fields"), CASES)
def test_error_mapping_survives_the_wire(
    exc: s.ExtentStoreError, status: Status, fields: dict[str, Any]
) -> None:
    resp = error_response(7, exc)
    assert resp.status is status
    data = b"".join(bytes(b) for b in encode_response(Op.WRITE, resp))
    [frame] = FrameReader().feed(data)
    decoded = decode_response(frame, Op.WRITE)
    assert decoded.status is status
    assert {k: v for k, v in decoded.fields.items() if k != "message"} == fields
    assert decoded.fields["message"]


def test_every_store_error_class_has_a_status() -> None:
    covered = {type(exc) for exc, _, _ in CASES}
    leaves = {
        cls
        for cls in vars(s).values()
        if isinstance(cls, type)
        and issubclass(cls, s.ExtentStoreError)
        and cls not in (s.ExtentStoreError, s.GenerationMismatch)
    }
    assert leaves <= covered


async def test_service_answers_requests_against_a_real_store(tmp_path: Path) -> None:
    service = DataService(s.ExtentStore([tmp_path], 64 * 1024))
    assert (await service.handle(Ping(1))).ok
    assert (await service.handle(Create(2, "v", 0, 3, 0))).ok
    w = await service.handle(Write(3, "v", 0, 3, 1, 10, False, b"abc"))
    assert w.ok and w.fields == {"applied_seq": 1}
    r = await service.handle(Read(4, "v", 0, 3, 10, 3))
    assert r.ok and r.payload == b"abc"
    st = await service.handle(GetState(5, "v", 0, True))
    assert st.fields["applied_seq"] == 1 and len(st.payload) == 16 * 8
    assert (await service.handle(Read(6, "v", 0, 2, 10, 3))).status is Status.STALE_GENERATION
    assert (await service.handle(Read(7, "v", 0, 3, 1, 5, True))).status is Status.BAD_REQUEST


async def test_ordered_copy_and_advance_take_their_turn_in_seq_order(tmp_path: Path) -> None:
    # A joining member gets a copy as write `seq`; the other members an `advance` for it.
    service = DataService(s.ExtentStore([tmp_path], 64 * 1024))
    assert (await service.handle(Create(1, "v", 0, 3, 1))).ok  # syncing
    block = b"\7" * 4096
    got = await service.handle(Read(2, "v", 0, 3, 0, 4096))
    assert got.status is Status.NOT_CURRENT  # a syncing replica serves no reads
    (tmp_path / "src").mkdir()
    src = s.ExtentStore([tmp_path / "src"], 64 * 1024)
    r = await src.create("v", 0, 3)
    await r.write(0, block, seq=1, gen=3, fua=False)
    data, sums = await r.read_for_copy(0, 4096)
    early = await service.handle(Copy(3, "v", 0, 3, 0, 4096, data, sums, seq=2))
    assert early.status is Status.OUT_OF_ORDER and early.fields["expected"] == 1
    assert (await service.handle(Write(4, "v", 0, 3, 1, 100, False, b"x"))).ok
    assert (await service.handle(Copy(5, "v", 0, 3, 0, 4096, data, sums, seq=2))).ok
    adv = await service.handle(Advance(6, "v", 0, 3, 3))
    assert adv.ok and adv.fields == {"applied_seq": 3}
    again = await service.handle(Advance(7, "v", 0, 3, 3))
    assert again.status is Status.OUT_OF_ORDER and again.fields["expected"] == 4
    stale = await service.handle(Advance(8, "v", 0, 2, 4))
    assert stale.status is Status.STALE_GENERATION
    st = await service.handle(GetState(9, "v", 0, True))
    assert st.fields["applied_seq"] == 3 and st.payload[:8] == sums  # the copy replaced the write
    await src.close()
