"""Pure parts of the meta service: sealing, validation, LUN policy, tokens, sizes, operation
progress, etcd compaction."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lunastor.common.records import MAX_TARGETS, ExtentRecord, OperationRecord
from lunastor.common.sealing import Sealer, SealError
from lunastor.common.units import format_size, parse_size
from lunastor.meta import schemas
from lunastor.meta.compaction import compaction_target
from lunastor.meta.gc import txn_groups
from lunastor.meta.luns import LUNS_PER_TARGET, next_free
from lunastor.meta.planners import advance
from lunastor.meta.problems import Problem
from lunastor.meta.store import decode_token, encode_token
from lunastor.meta.validation import Invalid, check

KEY = "0123456789abcdef-key"


@given(st.text(max_size=300))
def test_seal_round_trips_and_hides_the_secret(secret: str) -> None:
    sealer = Sealer(KEY)
    sealed = sealer.seal(secret)
    assert sealer.open(sealed) == secret
    if len(secret) >= 4:
        assert secret not in sealed
    assert sealer.seal(secret) != sealed  # a fresh nonce each time


def test_sealed_values_resist_tampering_and_other_keys() -> None:
    sealer = Sealer(KEY)
    sealed = sealer.seal("chap-secret-1234")
    head, blob = sealed.rsplit(":", 1)
    flipped = blob[:-3] + ("A" if blob[-3] != "A" else "B") + blob[-2:]
    for bad in (f"{head}:{flipped}", "v2:" + sealed[3:], "nonsense", f"{head}:!!", f"{head}:"):
        with pytest.raises(SealError):
            sealer.open(bad)
    with pytest.raises(SealError, match="another key"):
        Sealer("another-key-0123456789").open(sealed)
    with pytest.raises(ValueError):
        Sealer("short")


@pytest.mark.parametrize(
    ("schema", "value", "field"),
    [
        (schemas.VOLUME_CREATE, {"name": "a", "size_bytes": 512.5}, "size_bytes"),
        (schemas.VOLUME_CREATE, {"name": "a", "size_bytes": 1024, "labels": {"": "x"}}, "labels."),
        (schemas.VOLUME_CREATE, {"name": "a", "size_bytes": 1024, "source": None}, "source"),
        (schemas.EXPORT_CREATE, {"initiator": "IQN.2020-01.x"}, "initiator"),
        (schemas.CHAP_SET, {"user": "u", "secret": "x" * 256}, "secret"),
        (schemas.CHAP_SET, {"user": "", "secret": "x" * 12}, "user"),
    ],
)
def test_validation_names_the_field(schema: dict[str, Any], value: Any, field: str) -> None:
    with pytest.raises(Invalid) as info:
        check(schema, value)
    assert info.value.field == field


def test_validation_accepts_integral_floats_as_integers() -> None:
    out = check(schemas.VOLUME_CREATE, {"name": "a", "size_bytes": 1024.0})
    assert out == {"name": "a", "size_bytes": 1024} and isinstance(out["size_bytes"], int)


@pytest.mark.parametrize(
    ("used", "expected"),
    [
        ({}, (0, 1)),
        ({0: {1, 2, 3}}, (0, 4)),
        ({0: {2}}, (0, 1)),
        ({0: set(range(1, 256))}, (1, 1)),
        ({0: set(range(1, 256)), 1: set(range(1, 255))}, (1, 255)),
        ({t: set(range(1, 256)) for t in range(MAX_TARGETS)}, None),
    ],
)
def test_lun_policy_fills_targets_in_order(
    used: dict[int, set[int]], expected: tuple[int, int] | None
) -> None:
    assert next_free(used) == expected


def test_lun_policy_skips_avoided_and_never_lun_zero() -> None:
    assert next_free({}, {(0, 1), (0, 2)}) == (0, 3)
    avoid = {(0, lun) for lun in range(1, 256)}
    assert next_free({}, avoid) == (1, 1)
    assert LUNS_PER_TARGET == 255


@given(st.integers(1, 2**40), st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True))
def test_tokens_round_trip(revision: int, last_id: str) -> None:
    assert decode_token(encode_token(revision, last_id)) == (revision, last_id)


@pytest.mark.parametrize("token", ["", "x", "WzAsImEiXQ", "WyJhIiwiYiJd", "bnVsbA"])
def test_foreign_tokens_are_400(token: str) -> None:
    with pytest.raises(Problem) as info:
        decode_token(token)
    assert info.value.status == 400 and info.value.extra["field"] == "next"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("10GiB", 10 << 30),
        ("10G", 10 << 30),
        ("10gb", 10 * 10**9),
        ("1.5KiB", 1536),
        (" 2 TiB ", 2 << 40),
        ("512M", 512 << 20),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "10 XB", "-1", "1.3", "0x10"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size() -> None:
    assert [format_size(n) for n in (None, 0, 1536, 10 << 30)] == ["-", "0 B", "1.5 KiB", "10 GiB"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
BODIES = [
    schemas.VOLUME_CREATE,
    schemas.VOLUME_EXPAND,
    schemas.EXPORT_CREATE,
    schemas.SNAPSHOT_CREATE,
    schemas.CHAP_SET,
    schemas.CHAP_ROTATE,
]


@pytest.mark.parametrize("schema", BODIES)
@given(value=JSON)
def test_any_json_is_accepted_or_refused_with_a_field(schema: dict[str, Any], value: Any) -> None:
    try:
        check(schema, value)
    except Invalid as exc:
        assert exc.field and exc.message.startswith(exc.field)


@pytest.mark.parametrize(
    ("total", "progress", "pending", "want_total", "want_progress"),
    [
        (48, 0.0, 47, 48, 0.0208),  # one of 48 restored
        (48, 0.0208, 48, 48, 0.0208),  # it degraded again: the bar waits, it does not go back
        (48, 0.0208, 46, 48, 0.0417),  # and moves on once the work passes where it was
        (48, 0.0208, 60, 60, 0.0208),  # more found than counted at the start: the total grows
        (60, 0.0208, 30, 60, 0.5),
        (0, 0.0, 0, 0, 1.0),  # nothing to do is done
    ],
)
def test_operation_progress_never_goes_back(
    total: int, progress: float, pending: int, want_total: int, want_progress: float
) -> None:
    op = OperationRecord(id="op-1", kind="rebuild", total=total, progress=progress)
    moved = advance(op, pending, f"{pending} extents to restore")
    assert (moved.total, moved.progress) == (want_total, want_progress)
    assert moved.detail == f"{pending} extents to restore"


@pytest.mark.parametrize(
    ("seen", "now", "want", "left"),
    [
        ([], 100.0, None, []),
        ([(0.0, 5)], 299.0, None, [(0.0, 5)]),  # not old enough yet
        ([(0.0, 5)], 300.0, 5, []),
        ([(0.0, 5), (10.0, 9), (400.0, 12)], 500.0, 9, [(400.0, 12)]),  # the newest old one
    ],
)
def test_compaction_target_is_the_newest_revision_noted_keep_seconds_ago(
    seen: list[tuple[float, int]], now: float, want: int | None, left: list[tuple[float, int]]
) -> None:
    notes = deque(seen)
    assert compaction_target(notes, now, 300.0) == want
    assert list(notes) == left


def _doomed(*holders: int) -> list[tuple[ExtentRecord, int]]:
    """Extents 0.. of one volume, the i-th with `holders[i]` members and strays."""
    return [
        (ExtentRecord(volume="v", index=i, replicas=[f"c{m}" for m in range(min(n, 3))],
                      strays=[f"s{m}" for m in range(n - min(n, 3))]), i)
        for i, n in enumerate(holders)
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("holders", "sizes"),
    [
        ((), []),
        ((3,), [1]),
        ((3,) * 8, [8]),  # PER_TXN
        ((3,) * 9, [8, 1]),
        ((3,) * 20, [8, 8, 4]),
        ((10, 10, 10, 10), [3, 1]),  # WORK_PER_TXN: 30 work items, the 4th would be 40
        ((40, 3), [1, 1]),  # one beyond the bound still goes, alone
        ((3, 40), [1, 1]),
    ],
)
def test_gc_cuts_what_it_frees_into_bounded_transactions(
    holders: tuple[int, ...], sizes: list[int]
) -> None:
    doomed = _doomed(*holders)
    groups = txn_groups(doomed)
    assert [len(g) for g in groups] == sizes
    assert [item for g in groups for item in g] == doomed  # all of them, in order
