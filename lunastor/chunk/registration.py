"""A chunk server's identity and its presence in etcd.

The stable ID lives in every data directory (`chunk-id`), so a chunk server keeps its identity
across restarts and address changes. Two records describe it in etcd (docs/etcd-schema.md):
a persistent `ChunkServerInfo` and a lease-bound `ChunkServerStatus`, whose lease keep-alive is
the heartbeat: when the process dies, the lease expires and the cluster sees it down.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from lunastor.common.daemon import StartupError
from lunastor.common.records import ChunkServerInfo, ChunkServerStatus, DataDirCapacity, Keys

ID_FILE = "chunk-id"


def load_or_create_id(data_dirs: list[str]) -> str:
    """The chunk server's stable ID, created on first start and stored in every data dir."""
    found: dict[str, str] = {}
    for d in data_dirs:
        path = Path(d)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"data directory {d}: {exc.strerror or exc}") from None
        id_path = path / ID_FILE
        if id_path.exists():
            value = id_path.read_text().strip()
            if not value:
                raise StartupError(f"{id_path} is empty")
            found[d] = value
    ids = set(found.values())
    if len(ids) > 1:
        detail = ", ".join(f"{d}={i}" for d, i in found.items())
        raise StartupError(f"data directories belong to different chunk servers: {detail}")
    chunk_id = ids.pop() if ids else f"chunk-{uuid.uuid4().hex[:12]}"
    for d in data_dirs:
        id_path = Path(d) / ID_FILE
        if not id_path.exists():
            _write_durably(id_path, chunk_id + "\n")
    return chunk_id


def _write_durably(path: Path, text: str) -> None:
    """Create `path` holding `text` so that a power loss leaves it whole or absent.

    Without the fsyncs, ext4 may commit the rename before the data: after a power loss soon
    after a first start the ID file existed but was empty, and the chunk server could never
    start again (found by the kernel power-loss scenario, tests/kernel).
    """
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def probe_capacity(
    data_dirs: list[str], failed: Mapping[str, str] | None = None
) -> list[DataDirCapacity]:
    """Capacity and free space of each data directory's file system; a failed one (path ->
    why) counts as none."""
    result = []
    failed = failed or {}
    for d in data_dirs:
        if d in failed:
            result.append(
                DataDirCapacity(path=d, capacity=0, free=0, state="failed", error=failed[d])
            )
            continue
        try:
            st = os.statvfs(d)
        except OSError as exc:  # failing under us: the data directory monitor will retire it
            result.append(
                DataDirCapacity(path=d, capacity=0, free=0, state="failed", error=str(exc))
            )
            continue
        result.append(
            DataDirCapacity(
                path=d,
                capacity=st.f_blocks * st.f_frsize,
                free=st.f_bavail * st.f_frsize,
                used=used_bytes(d),
            )
        )
    return result


def used_bytes(data_dir: str) -> int:
    """Bytes allocated to replica files under `data_dir` (sparse files count what they hold)."""
    total = 0
    for dirpath, _, names in os.walk(os.path.join(data_dir, "extents")):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue  # deleted while we walked
    return total


def build_status(
    chunk_id: str,
    *,
    portal: str,
    data_address: str,
    admin_address: str,
    zone: str,
    version: str,
    started_at: float,
    lease: int,
    data_dirs: list[str],
    state: str = "up",
    failed_dirs: Mapping[str, str] | None = None,
    replace_after: float = 0.0,
    data_workers: list[str] | None = None,
) -> ChunkServerStatus:
    return ChunkServerStatus(
        id=chunk_id,
        portal=portal,
        data_address=data_address,
        admin_address=admin_address,
        zone=zone,
        state=state,
        version=version,
        started_at=started_at,
        lease=lease,
        data_dirs=[vars(c) for c in probe_capacity(data_dirs, failed_dirs)],
        replace_after=replace_after,
        data_workers=data_workers or [],
    )


def build_info(chunk_id: str, *, portal: str, data_address: str, zone: str) -> ChunkServerInfo:
    return ChunkServerInfo(
        id=chunk_id, portal=portal, data_address=data_address, zone=zone, registered_at=time.time()
    )


def info_key(chunk_id: str) -> str:
    return Keys.chunk(chunk_id)


def status_key(chunk_id: str) -> str:
    return Keys.live_chunk(chunk_id)
