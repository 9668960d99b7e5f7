"""A data directory that goes read-only or is unmounted under the store: typed, never silent."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunastor.chunk.store import DataDirFailed, ExtentStore, SpaceExhausted
from lunastor.chunk.store.fsio import data_dir_io

EXTENT = 256 * 1024


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (errno.EIO, DataDirFailed),
        (errno.EROFS, DataDirFailed),
        (errno.ENODEV, DataDirFailed),
        (errno.ENOENT, DataDirFailed),
        (errno.ESTALE, DataDirFailed),
        (errno.ENOSPC, SpaceExhausted),
        (errno.EDQUOT, SpaceExhausted),
    ],
)
def test_os_errors_map_to_the_two_typed_failures(err: int, expected: type[Exception]) -> None:
    with pytest.raises(expected) as info, data_dir_io("/data/x"):
        raise OSError(err, "injected")
    assert info.value.path == "/data/x"  # type: ignore[attr-defined]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "dir"
    mnt.mkdir()
    result = _run("mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mnt))
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root/CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield mnt
    finally:
        _run("umount", "-l", str(mnt))


async def test_read_only_data_dir_is_reported(mounted: Path) -> None:
    store = ExtentStore([mounted], EXTENT)
    r = await store.create("v", 0, 1)
    await r.write(0, b"data", seq=1, gen=1, fua=True)
    await store.close()
    assert _run("mount", "-o", "remount,ro", str(mounted)).returncode == 0
    again = ExtentStore([mounted], EXTENT)
    assert [i.volume for i in again.list_replicas().replicas] == ["v"]  # still readable
    with pytest.raises(DataDirFailed) as info:
        await again.open("v", 0)  # opening for update fails
    assert (info.value.path, info.value.errno) == (str(mounted), errno.EROFS)
    with pytest.raises(DataDirFailed):
        await again.create("w", 0, 1)
    assert [f.path for f in again.check_data_dirs()] == [str(mounted)]
    assert str(mounted) in again.failed


async def test_unmounted_data_dir_is_noticed_by_flush_and_probe(mounted: Path) -> None:
    store = ExtentStore([mounted], EXTENT)
    assert store.check_data_dirs() == []
    r = await store.create("v", 0, 1)
    await r.write(0, b"data", seq=1, gen=1, fua=False)
    assert _run("umount", "-l", str(mounted)).returncode == 0
    # the open files still work (a detached file system), which is exactly the danger
    await r.write(4, b"more", seq=2, gen=1, fua=False)
    with pytest.raises(DataDirFailed):
        await r.flush()
    [failed] = store.check_data_dirs()
    assert failed.path == str(mounted) and failed.errno == errno.ENODEV
