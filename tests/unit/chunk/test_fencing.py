"""The primary's nexus-epoch decision (lunastor/chunk/replication/fencing.py), table-driven,
plus the
`fenced` answer on the wire and the etcd key of a nexus."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lunastor.chunk.replication.fencing import EpochTable, Fenced
from lunastor.chunk.wire.messages import (
    FrameError,
    FrameReader,
    Nexus,
    Op,
    Status,
    decode_response,
    encode_frame,
)
from lunastor.common.records import Keys

I1 = "iqn.2026-11.org.example:host1,i,0x00023d000001"
I2 = "iqn.2026-11.org.example:host1,i,0x00023d000002"  # the same host's other path
T = "iqn.2026-11.io.lunastor:tgt-1"

# (name, etcd knows, earlier writes admitted (epoch), the write's epoch, refused with newest,
#  newest afterwards)
CASES: list[tuple[str, int | None, list[int], int, int | None, int | None]] = [
    ("first write, nothing known", None, [], 5, None, 5),
    ("same login again", None, [5], 5, None, 5),
    ("newer login supersedes", None, [5], 9, None, 9),
    ("older login after a newer one", None, [9], 5, 9, 9),
    ("etcd knows a newer login", 9, [], 5, 9, 9),
    ("etcd knows exactly this login", 9, [], 9, None, 9),
    ("the write is newer than the cache (watch lags)", 5, [], 9, None, 9),
    ("seen newer than etcd (a login deleted at logout)", 3, [7], 5, 7, 7),
    ("zero epoch is just small", 1, [], 0, 1, 1),
]


@pytest.mark.parametrize(
    ("known", "before", "epoch", "refused", "after"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_admit(
    known: int | None, before: list[int], epoch: int, refused: int | None, after: int | None
) -> None:
    table = EpochTable(lambda i, t: known if (i, t) == (I1, T) else None)
    for e in before:
        table.admit(Nexus(I1, T, e))
    if refused is None:
        table.admit(Nexus(I1, T, epoch))
    else:
        with pytest.raises(Fenced) as err:
            table.admit(Nexus(I1, T, epoch))
        assert err.value.newest == refused
        assert err.value.nexus == Nexus(I1, T, epoch)
    assert table.newest(I1, T) == after


# (name, forwarded epochs noted, then a write's epoch, refused with)
NOTE_CASES: list[tuple[str, list[int], int, int | None]] = [
    ("a secondary that became primary refuses the older login", [9], 5, 9),
    ("notes never move backwards", [9, 5], 7, 9),
    ("the noted login itself is accepted", [9], 9, None),
]


@pytest.mark.parametrize(
    ("noted", "epoch", "refused"), [c[1:] for c in NOTE_CASES], ids=[c[0] for c in NOTE_CASES]
)
def test_note_then_admit(noted: list[int], epoch: int, refused: int | None) -> None:
    table = EpochTable()
    for e in noted:
        table.note(Nexus(I1, T, e))
    if refused is None:
        table.admit(Nexus(I1, T, epoch))
    else:
        with pytest.raises(Fenced) as err:
            table.admit(Nexus(I1, T, epoch))
        assert err.value.newest == refused


def test_other_path_of_a_multipath_initiator_is_not_fenced() -> None:
    # Two ISIDs are two nexuses: a login on one path does not fence the other.
    table = EpochTable()
    table.admit(Nexus(I1, T, 100))
    table.admit(Nexus(I2, T, 50))
    table.admit(Nexus(I1, "iqn.2026-11.io.lunastor:tgt-2", 10))
    assert table.newest(I1, T) == 100 and table.newest(I2, T) == 50
    assert len(table) == 3


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=40))
def test_accepted_epochs_never_go_backwards(ops: list[tuple[bool, int]]) -> None:
    """Whatever arrives in whatever order, the accepted epochs of one nexus are monotonic,
    and a refusal always names an epoch newer than the refused one."""
    table = EpochTable()
    accepted: list[int] = []
    for forwarded, e in ops:
        if forwarded:
            table.note(Nexus(I1, T, e))
            continue
        try:
            table.admit(Nexus(I1, T, e))
        except Fenced as exc:
            assert exc.newest > e
        else:
            accepted.append(e)
    assert accepted == sorted(accepted)


def _frame(header: dict[str, object]) -> bytes:
    return b"".join(bytes(b) for b in encode_frame({**header, "len": 0}, b""))


@pytest.mark.parametrize(
    "header",
    [
        {"id": 1, "status": "fenced"},  # epoch is required
        {"id": 1, "status": "fenced", "epoch": -3},
        {"id": 1, "status": "fenced", "epoch": "7"},
    ],
)
def test_fenced_answer_without_a_valid_epoch_is_a_frame_error(header: dict[str, object]) -> None:
    [frame] = FrameReader().feed(_frame(header))
    with pytest.raises(FrameError, match="epoch"):
        decode_response(frame, Op.WRITE)


def test_fenced_answer_decodes() -> None:
    [frame] = FrameReader().feed(_frame({"id": 4, "status": "fenced", "epoch": 12}))
    resp = decode_response(frame, Op.UNMAP)
    assert resp.status is Status.FENCED and resp.fields == {"epoch": 12}


KEY_CASES = [
    (I1, T, "/v1/nexus-epochs/iqn.2026-11.io.lunastor:tgt-1/"
     "iqn.2026-11.org.example:host1,i,0x00023d000001"),
    ("iqn.x/y,i,0x000000000001", "iqn.t", "/v1/nexus-epochs/iqn.t/iqn.x%2Fy,i,0x000000000001"),
    ("iqn.a b,i,0x1", "iqn.t/../x", "/v1/nexus-epochs/iqn.t%2F..%2Fx/iqn.a%20b,i,0x1"),
]  # fmt: skip


@pytest.mark.parametrize(("initiator", "target", "key"), KEY_CASES)
def test_nexus_epoch_key(initiator: str, target: str, key: str) -> None:
    # One key per nexus, and a name can never reach outside the prefix or another nexus's key.
    assert Keys.nexus_epoch(initiator, target) == key
