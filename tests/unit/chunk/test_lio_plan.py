"""The LIO plan from the LUN map (pure), and finding a backstore's uio device in sysfs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lunastor.chunk.access.lio.plan import Acl, Backstore, LunExport, PlanError, backstore_for, plan
from lunastor.chunk.access.lio.tcmu import find_uio, uio_name
from lunastor.iscsi.chap import ChapCredentials

T1 = "iqn.2026-11.io.lunastor:tgt-1"
T2 = "iqn.2026-11.io.lunastor:tgt-2"
A = "iqn.2026-11.org.example:a"
B = "iqn.2026-11.org.example:b"
CHAP = ChapCredentials("user", b"secret-secret-16")
PORTALS = [("192.168.77.2", 3260)]


def export(target: str, lun: int, volume: str, *initiators: str, bs: int = 512) -> LunExport:
    return LunExport(target, lun, volume, 64 << 20, bs, frozenset(initiators))


def test_targets_luns_and_acls_map_one_to_one() -> None:
    p = plan(
        [export(T1, 1, "vol-a", A, B), export(T1, 2, "vol-b", B), export(T2, 1, "vol-c", A)],
        lambda iqn: CHAP if iqn == T2 else None,
        PORTALS,
    )
    assert p.portals == (("192.168.77.2", 3260),)
    assert p.backstores["lunastor-vol-a"] == Backstore(
        "lunastor-vol-a", "lunastor/vol-a", "vol-a", 64 << 20, 512
    )
    assert set(p.backstores) == {"lunastor-vol-a", "lunastor-vol-b", "lunastor-vol-c"}
    t1, t2 = p.targets[T1], p.targets[T2]
    assert t1.luns == {1: "lunastor-vol-a", 2: "lunastor-vol-b"}
    assert t1.acls == (Acl(A, (1,)), Acl(B, (1, 2)))
    assert not t1.authentication
    assert t2.acls == (Acl(A, (1,), CHAP),) and t2.authentication
    assert p.problems == ()


def test_a_volume_without_initiators_is_served_to_nobody() -> None:
    p = plan([export(T1, 1, "vol-a")], lambda iqn: None, PORTALS)
    assert p.targets[T1].luns == {1: "lunastor-vol-a"} and p.targets[T1].acls == ()


@pytest.mark.parametrize(
    ("volume", "block_size", "size", "message"),
    [
        ("vol/a", 512, 1 << 20, "cannot name a LIO backstore"),
        ("vol a", 512, 1 << 20, "cannot name a LIO backstore"),
        ("", 512, 1 << 20, "cannot name a LIO backstore"),
        ("vol-a", 520, 1 << 20, "block size 520"),
        ("vol-a", 4096, 512, "less than one block"),
    ],
)
def test_unrepresentable_volumes_are_problems_not_crashes(
    volume: str, block_size: int, size: int, message: str
) -> None:
    with pytest.raises(PlanError, match=message):
        backstore_for(volume, size, block_size)
    bad = LunExport(T1, 1, volume, size, block_size, frozenset([A]))
    p = plan([bad, export(T1, 2, "vol-ok", A)], lambda iqn: None, PORTALS)
    assert list(p.backstores) == ["lunastor-vol-ok"]
    assert len(p.problems) == 1 and message in p.problems[0]


def fake_uio(root: Path, index: int, label: str, size: str) -> None:
    entry = root / f"uio{index}"
    (entry / "maps" / "map0").mkdir(parents=True)
    (entry / "name").write_text(label + "\n")
    (entry / "maps" / "map0" / "size").write_text(size + "\n")


def test_find_uio_matches_name_and_config(tmp_path: Path) -> None:
    fake_uio(tmp_path, 0, "uio_pci_generic", "0x1000")
    fake_uio(tmp_path, 1, uio_name(0, "lunastor-vol-a", "lunastor/vol-a"), "0x40800000")
    fake_uio(tmp_path, 2, uio_name(0, "lunastor-vol-b", "lunastor/vol-b"), "0x800000")
    assert find_uio("lunastor-vol-b", "lunastor/vol-b", tmp_path) == (Path("/dev/uio2"), 1 << 23)
    assert find_uio("lunastor-vol-a", "lunastor/vol-a", tmp_path) == (
        Path("/dev/uio1"),
        0x40800000,
    )
    assert find_uio("lunastor-vol-c", "lunastor/vol-c", tmp_path) is None
    assert find_uio("x", "y", tmp_path / "missing") is None


def test_lio_listen_is_validated() -> None:
    from lunastor.chunk.config import ChunkConfig
    from lunastor.common.config import ConfigError

    ChunkConfig(lio_export=True, lio_listen="192.168.77.2:3260").validate()
    with pytest.raises(ConfigError, match="lio_listen"):
        ChunkConfig(lio_export=True, lio_listen="no-port").validate()
