"""The exports read model: pure lookups over LUN, target and discovery-CHAP records."""

from __future__ import annotations

import pytest

from lunastor.common.exports import (
    ChapSecrets,
    ExportIndex,
    SecretUnavailable,
    parse_target_iqn,
)
from lunastor.common.records import ChapRecord, Keys, LunRecord, TargetRecord, target_iqn
from lunastor.common.sealing import Sealer

KEY = "unit-test-sealing-key-0123"
SEALER = Sealer(KEY)
A, B, C = (f"iqn.2026-11.org.example:{n}" for n in ("a", "b", "c"))
T0, T1, T2 = target_iqn(0), target_iqn(1), target_iqn(2)


def lun(target: int, number: int, volume: str, *initiators: str) -> tuple[str, bytes]:
    record = LunRecord(volume_id=volume, initiators=sorted(initiators))
    return Keys.lun(target, number), record.to_json()


def chap(user: str, secret: str, mutual_user: str = "", mutual: str = "") -> ChapRecord:
    return ChapRecord(
        user=user,
        secret=SEALER.seal(secret),
        mutual_user=mutual_user,
        mutual_secret=SEALER.seal(mutual) if mutual else "",
    )


LUNS = [
    lun(0, 1, "vol-a1", A),
    lun(0, 2, "vol-ab", A, B),
    lun(1, 1, "vol-b", B),
    lun(2, 7, "vol-nobody"),
]
INDEX = ExportIndex.build(LUNS)


@pytest.mark.parametrize(
    ("iqn", "number"),
    [
        (T0, 0),
        (target_iqn(4095), 4095),
        (target_iqn(4096), None),
        ("iqn.2026-11.io.lunastor:tgt-01", None),
        ("iqn.2026-11.io.lunastor:tgt-", None),
        ("iqn.2026-11.io.lunastor:tgt-1x", None),
        ("iqn.2026-11.io.lunastor:tgt-\u0661", None),  # a non-ASCII digit
        ("iqn.2026-11.org.example:tgt-1", None),
        ("", None),
    ],
)
def test_parse_target_iqn(iqn: str, number: int | None) -> None:
    assert parse_target_iqn(iqn) == number


@pytest.mark.parametrize(
    ("initiator", "targets"),
    [(A, [T0]), (B, [T0, T1]), (C, []), ("", [])],
)
def test_visible_targets(initiator: str, targets: list[str]) -> None:
    assert INDEX.visible_targets(initiator) == targets


@pytest.mark.parametrize(
    ("initiator", "target", "exists", "may_see", "luns"),
    [
        (A, T0, True, True, {1: "vol-a1", 2: "vol-ab"}),
        (B, T0, True, True, {2: "vol-ab"}),
        (B, T1, True, True, {1: "vol-b"}),
        (A, T1, True, False, {}),
        (A, T2, True, False, {}),  # a target whose only LUN is published to nobody
        (A, target_iqn(3), False, False, {}),  # no LUN at all: unknown
        (A, "iqn.2000-01.com.other:disk", False, False, {}),
    ],
)
def test_target_lookups(
    initiator: str, target: str, exists: bool, may_see: bool, luns: dict[int, str]
) -> None:
    assert INDEX.target_exists(target) is exists
    assert INDEX.may_see(initiator, target) is may_see
    assert INDEX.visible_luns(initiator, target) == luns


def test_bad_records_are_left_out_and_named() -> None:
    index = ExportIndex.build(
        [
            lun(0, 1, "vol-ok", A),
            (Keys.lun(0, 2), b"not json"),
            (Keys.lun(0, 3), b'{"v": 99, "volume_id": "x", "initiators": []}'),
            (Keys.lun(0, 4), b'{"v": 1, "volume_id": "x", "initiators": "' + A.encode() + b'"}'),
            (Keys.LUNS + "zz/1", LunRecord(volume_id="x", initiators=[B]).to_json()),
        ],
        [(Keys.target(9), b"[]")],
    )
    assert index.visible_luns(A, T0) == {1: "vol-ok"}
    assert index.visible_targets(B) == []
    assert len(index.bad_records) == 5
    assert all(r.startswith(Keys.LUNS) or r.startswith(Keys.TARGETS) for r in index.bad_records)


def _targets(*records: TargetRecord) -> list[tuple[str, bytes]]:
    return [(Keys.target(r.target), r.to_json()) for r in records]


CHAP_CASES = [
    # (target records, target asked, expected)
    ([], T0, None),
    ([TargetRecord(target=0, chap=None)], T0, None),
    (
        [TargetRecord(target=0, chap=vars(chap("alice", "alice-secret-12")))],
        T0,
        ChapSecrets("alice", b"alice-secret-12"),
    ),
    (
        [TargetRecord(target=1, chap=vars(chap("bob", "bob-secret-123", "tgt", "tgt-secret-12")))],
        T1,
        ChapSecrets("bob", b"bob-secret-123", "tgt", b"tgt-secret-12"),
    ),
    ([TargetRecord(target=1, chap=vars(chap("bob", "bob-secret-123")))], T0, None),
    ([TargetRecord(target=1, chap=vars(chap("bob", "bob-secret-123")))], "iqn.x:y", None),
]


@pytest.mark.parametrize(("records", "target", "expected"), CHAP_CASES)
def test_target_chap(
    records: list[TargetRecord], target: str, expected: ChapSecrets | None
) -> None:
    index = ExportIndex.build(LUNS, _targets(*records), sealer=SEALER)
    assert index.target_chap(target) == expected


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (None, None),
        (chap("disc", "discovery-secret"), ChapSecrets("disc", b"discovery-secret")),
        (
            chap("disc", "discovery-secret", "portal", "portal-secret1"),
            ChapSecrets("disc", b"discovery-secret", "portal", b"portal-secret1"),
        ),
    ],
)
def test_discovery_chap(record: ChapRecord | None, expected: ChapSecrets | None) -> None:
    raw = record.to_json() if record is not None else None
    assert ExportIndex.build([], discovery_chap=raw, sealer=SEALER).discovery_chap() == expected


SEALED_ELSEWHERE = ChapRecord(user="u", secret=Sealer("another-key-0123456789").seal("s" * 12))
TAMPERED = ChapRecord(user="u", secret=SEALER.seal("s" * 12)[:-4] + "AAAA")


@pytest.mark.parametrize(
    ("raw", "sealer", "message"),
    [
        (chap("u", "s" * 12).to_json(), None, "no secret_key is configured"),
        (SEALED_ELSEWHERE.to_json(), SEALER, "sealed with another key"),
        (TAMPERED.to_json(), SEALER, "integrity check"),
        (ChapRecord(user="u", secret="plain").to_json(), SEALER, "not a sealed value"),
        (b'{"v": 7}', SEALER, "unreadable record"),
    ],
)
def test_chap_that_cannot_be_opened_fails_closed(
    raw: bytes, sealer: Sealer | None, message: str
) -> None:
    """CHAP set but unusable must never read as "no CHAP": logins would go unauthenticated."""
    index = ExportIndex.build([], discovery_chap=raw, sealer=sealer)
    with pytest.raises(SecretUnavailable, match=message):
        index.discovery_chap()
    targets = [(Keys.target(0), b'{"v": 1, "target": 0, "chap": "nonsense"}')]
    with pytest.raises(SecretUnavailable, match="not an object"):
        ExportIndex.build(LUNS, targets, sealer=SEALER).target_chap(T0)


def test_secrets_stay_out_of_repr() -> None:
    assert "alice-secret" not in repr(ChapSecrets("alice", b"alice-secret-12"))
