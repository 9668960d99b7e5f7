"""Operator-facing transactions: target CHAP, chunk server drain/remove, operations, capacity.

Same discipline as `store.py`: read, decide, commit with compares on what was read.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from lunastor.common.etcd import Delete, Etcd, EtcdError, Put
from lunastor.common.events import EVENTS
from lunastor.common.extent_pages import extent_records
from lunastor.common.records import (
    MAX_TARGETS,
    TARGET_IQN_PREFIX,
    ChapRecord,
    ChunkAdminRecord,
    ChunkServerInfo,
    ChunkServerStatus,
    Keys,
    OperationRecord,
    TargetRecord,
    decode_records,
    target_iqn,
)
from lunastor.common.sealing import Sealer
from lunastor.meta.luns import LunMap
from lunastor.meta.problems import Problem
from lunastor.meta.store import MAX_ATTEMPTS, Listing, aborted, as_json, list_page, new_id, read


def chap_view(chap: ChapRecord | None) -> dict[str, Any]:
    """What the API shows of CHAP settings: never a secret, sealed or not."""
    if chap is None:
        return {"chap_enabled": False, "mutual_chap_enabled": False}
    view: dict[str, Any] = {
        "chap_enabled": True,
        "mutual_chap_enabled": bool(chap.mutual_secret),
        "user": chap.user,
        "updated_at": chap.updated_at,
    }
    if chap.mutual_secret:
        view["mutual_user"] = chap.mutual_user
    return view


def operation_view(op: OperationRecord) -> dict[str, Any]:
    return {
        "id": op.id,
        "kind": op.kind,
        "subject": op.subject,
        "state": op.state,
        "progress": op.progress,
        "created_at": op.created_at,
        "updated_at": op.updated_at,
        "detail": op.detail,
    }


def parse_target(iqn: str) -> int:
    index = int(iqn.removeprefix(TARGET_IQN_PREFIX))
    if index >= MAX_TARGETS:
        raise Problem(404, "target_not_found", f"no target {iqn} (targets are 0..4095)")
    return index


class ClusterStore:
    def __init__(self, etcd: Etcd, luns: LunMap, sealer: Sealer | None) -> None:
        self.etcd = etcd
        self.luns = luns
        self.sealer = sealer

    # --- CHAP -----------------------------------------------------------------------------

    def _seal(self, secret: str) -> str:
        if self.sealer is None:
            raise Problem(
                409,
                "sealing_key_missing",
                "this meta service has no secret_key configured, so it cannot store secrets",
            )
        return self.sealer.seal(secret)

    def _chap(self, body: dict[str, Any]) -> ChapRecord:
        mutual_user, mutual_secret = body.get("mutual_user"), body.get("mutual_secret")
        if (mutual_user is None) != (mutual_secret is None):
            missing = "mutual_secret" if mutual_secret is None else "mutual_user"
            raise Problem(
                400,
                "invalid_field",
                f"{missing}: mutual CHAP needs both mutual_user and mutual_secret",
                field=missing,
            )
        if mutual_secret is not None and mutual_secret == body["secret"]:
            raise Problem(
                400,
                "invalid_field",
                "mutual_secret: must differ from secret (RFC 7143 12.1.3)",
                field="mutual_secret",
            )
        return ChapRecord(
            user=body["user"],
            secret=self._seal(body["secret"]),
            mutual_user=mutual_user or "",
            mutual_secret=self._seal(mutual_secret) if mutual_secret else "",
            updated_at=round(time.time(), 6),
        )

    async def _target_chap(self, index: int) -> tuple[ChapRecord | None, Any]:
        target, tv = await read(self.etcd, Keys.target(index), TargetRecord)
        chap = ChapRecord(**target.chap) if target is not None and target.chap else None
        return chap, tv

    async def _write_target_chap(self, index: int, chap: ChapRecord | None, tv: Any) -> bool:
        record = TargetRecord(
            target=index, chap=dataclasses.asdict(chap) if chap is not None else None
        )
        result = await self.etcd.txn([tv.unchanged], [Put(tv.key, record.to_json())])
        return result.succeeded

    def target_view(self, index: int, chap: ChapRecord | None) -> dict[str, Any]:
        view = chap_view(chap)
        out: dict[str, Any] = {
            "iqn": target_iqn(index),
            "index": index,
            "luns": self.luns.counts().get(index, 0),
            "chap_enabled": view["chap_enabled"],
            "mutual_chap_enabled": view["mutual_chap_enabled"],
        }
        if chap is not None:
            out["chap_user"] = chap.user
            if chap.mutual_secret:
                out["mutual_user"] = chap.mutual_user
        return out

    async def list_targets(self) -> dict[str, Any]:
        records, _ = await self.etcd.get_prefix(Keys.TARGETS)
        chaps: dict[int, ChapRecord | None] = {}
        for kv in records:
            target = TargetRecord.from_json(kv.value)
            chaps[target.target] = ChapRecord(**target.chap) if target.chap else None
        indexes = sorted(set(self.luns.counts()) | set(chaps))
        discovery = await self.etcd.get(Keys.DISCOVERY_CHAP)
        return {
            "items": [self.target_view(i, chaps.get(i)) for i in indexes],
            "discovery_chap_enabled": discovery is not None,
        }

    async def get_target(self, iqn: str) -> dict[str, Any]:
        index = parse_target(iqn)
        chap, _ = await self._target_chap(index)
        return self.target_view(index, chap)

    async def set_target_chap(self, iqn: str, body: dict[str, Any]) -> dict[str, Any]:
        index = parse_target(iqn)
        chap = self._chap(body)
        for _ in range(MAX_ATTEMPTS):
            _, tv = await self._target_chap(index)
            if await self._write_target_chap(index, chap, tv):
                return chap_view(chap)
        raise aborted(f"set CHAP on {iqn}")

    async def rotate_target_chap(self, iqn: str, body: dict[str, Any]) -> dict[str, Any]:
        index = parse_target(iqn)
        for _ in range(MAX_ATTEMPTS):
            chap, tv = await self._target_chap(index)
            rotated = self._rotate(chap, body, iqn)
            if await self._write_target_chap(index, rotated, tv):
                return chap_view(rotated)
        raise aborted(f"rotate CHAP on {iqn}")

    def _rotate(self, chap: ChapRecord | None, body: dict[str, Any], what: str) -> ChapRecord:
        if chap is None:
            raise Problem(409, "chap_not_enabled", f"{what} has no CHAP to rotate; set it first")
        mutual = body.get("mutual_secret")
        if mutual is not None and not chap.mutual_secret:
            raise Problem(409, "mutual_chap_not_enabled", f"{what} has no mutual CHAP to rotate")
        if mutual is not None and mutual == body["secret"]:
            raise Problem(
                400,
                "invalid_field",
                "mutual_secret: must differ from secret",
                field="mutual_secret",
            )
        return dataclasses.replace(
            chap,
            secret=self._seal(body["secret"]),
            mutual_secret=self._seal(mutual) if mutual is not None else chap.mutual_secret,
            updated_at=round(time.time(), 6),
        )

    async def clear_target_chap(self, iqn: str) -> None:
        index = parse_target(iqn)
        for _ in range(MAX_ATTEMPTS):
            chap, tv = await self._target_chap(index)
            if chap is None or await self._write_target_chap(index, None, tv):
                return
        raise aborted(f"clear CHAP on {iqn}")

    async def get_discovery_chap(self) -> dict[str, Any]:
        chap, _ = await read(self.etcd, Keys.DISCOVERY_CHAP, ChapRecord)
        return chap_view(chap)

    async def set_discovery_chap(self, body: dict[str, Any]) -> dict[str, Any]:
        chap = self._chap(body)
        # A whole-record replace: no read to race with, so a plain put is one transaction.
        await self.etcd.put(Keys.DISCOVERY_CHAP, chap.to_json())
        return chap_view(chap)

    async def rotate_discovery_chap(self, body: dict[str, Any]) -> dict[str, Any]:
        for _ in range(MAX_ATTEMPTS):
            chap, cv = await read(self.etcd, Keys.DISCOVERY_CHAP, ChapRecord)
            rotated = self._rotate(chap, body, "discovery")
            result = await self.etcd.txn([cv.unchanged], [Put(cv.key, rotated.to_json())])
            if result.succeeded:
                return chap_view(rotated)
        raise aborted("rotate discovery CHAP")

    async def clear_discovery_chap(self) -> None:
        await self.etcd.delete(Keys.DISCOVERY_CHAP)

    # --- chunk servers --------------------------------------------------------------------

    async def _holds_extents(self, chunk_id: str, revision: int | None = None) -> bool:
        page = await self.etcd.get_page(Keys.chunk_extents(chunk_id), None, 1, revision)
        if page.kvs:
            return True
        # Extents not moved into pages yet are not in the reverse index.
        kvs, _ = await self.etcd.get_prefix(Keys.EXTENTS, revision=revision)
        return any(chunk_id in rec.replicas for rec in extent_records(kvs))

    async def list_chunks(self) -> list[dict[str, Any]]:
        infos, rev = await self.etcd.get_prefix(Keys.CHUNKS)
        lives, _ = await self.etcd.get_prefix(Keys.LIVE_CHUNKS, revision=rev)
        admins, _ = await self.etcd.get_prefix(Keys.CHUNK_ADMIN, revision=rev)
        by_info = {i.id: i for i in decode_records(infos, ChunkServerInfo)}
        by_live = {s.id: s for s in decode_records(lives, ChunkServerStatus)}
        by_admin = {a.id: a for a in decode_records(admins, ChunkAdminRecord)}
        out = []
        for cid in sorted(by_info.keys() | by_live.keys()):
            holds = await self._holds_extents(cid, rev)
            view = chunk_view(cid, by_info.get(cid), by_live.get(cid), by_admin.get(cid), holds)
            out.append(view)
        return out

    async def get_chunk(self, chunk_id: str) -> dict[str, Any]:
        info, _ = await read(self.etcd, Keys.chunk(chunk_id), ChunkServerInfo)
        live, _ = await read(self.etcd, Keys.live_chunk(chunk_id), ChunkServerStatus)
        if info is None and live is None:
            raise Problem(404, "chunk_server_not_found", f"no chunk server {chunk_id}")
        admin, _ = await read(self.etcd, Keys.chunk_admin(chunk_id), ChunkAdminRecord)
        return chunk_view(chunk_id, info, live, admin, await self._holds_extents(chunk_id))

    async def drain_chunk(self, chunk_id: str) -> tuple[dict[str, Any], bool]:
        """Start draining (idempotent): returns the drain operation and whether it is new."""
        for _ in range(MAX_ATTEMPTS):
            info, iv = await read(self.etcd, Keys.chunk(chunk_id), ChunkServerInfo)
            if info is None:
                raise Problem(404, "chunk_server_not_found", f"no chunk server {chunk_id}")
            admin, av = await read(self.etcd, Keys.chunk_admin(chunk_id), ChunkAdminRecord)
            if admin is not None:
                op, _ = await read(self.etcd, Keys.operation(admin.operation_id), OperationRecord)
                if op is not None:
                    return operation_view(op), False
            now = round(time.time(), 6)
            op = OperationRecord(
                id=new_id("op"),
                kind="drain",
                subject=chunk_id,
                created_at=now,
                updated_at=now,
                detail="moving every extent replica off this chunk server",
            )
            admin = ChunkAdminRecord(id=chunk_id, requested_at=now, operation_id=op.id)
            result = await self.etcd.txn(
                [iv.unchanged, av.unchanged],
                [Put(av.key, admin.to_json()), Put(Keys.operation(op.id), op.to_json())],
            )
            if result.succeeded:
                await EVENTS.write("drain_started", chunk_id, op.id)
                return operation_view(op), True
        raise aborted(f"drain {chunk_id}")

    async def remove_chunk(self, chunk_id: str) -> None:
        """Forget a chunk server: only when it is down or drained, and holds no extent."""
        for _ in range(MAX_ATTEMPTS):
            info, iv = await read(self.etcd, Keys.chunk(chunk_id), ChunkServerInfo)
            if info is None:
                return
            live, lv = await read(self.etcd, Keys.live_chunk(chunk_id), ChunkServerStatus)
            admin, av = await read(self.etcd, Keys.chunk_admin(chunk_id), ChunkAdminRecord)
            if live is not None and admin is None:
                raise Problem(
                    409,
                    "chunk_server_in_service",
                    f"{chunk_id} is up and not drained; drain it or stop it first",
                )
            if await self._holds_extents(chunk_id):
                raise Problem(
                    409,
                    "chunk_server_not_empty",
                    f"{chunk_id} still holds extent replicas; wait for its drain",
                )
            result = await self.etcd.txn(
                [iv.unchanged, lv.unchanged, av.unchanged],
                [Delete(iv.key), Delete(av.key)],
            )
            if result.succeeded:
                return
        raise aborted(f"remove {chunk_id}")

    # --- capacity and health --------------------------------------------------------------

    async def capacity(self, zone: str | None) -> dict[str, Any]:
        lives, _ = await self.etcd.get_prefix(Keys.LIVE_CHUNKS)
        zones: dict[str, dict[str, Any]] = {}
        for s in decode_records(lives, ChunkServerStatus):
            if zone is not None and s.zone != zone:
                continue
            z = zones.setdefault(
                s.zone, {"zone": s.zone, "total_bytes": 0, "free_bytes": 0, "chunk_servers": 0}
            )
            z["total_bytes"] += s.capacity
            # A draining server takes no new data: its free space is not offered.
            z["free_bytes"] += s.free if s.state == "up" else 0
            z["chunk_servers"] += 1
        listed = [zones[k] for k in sorted(zones)]
        return {
            "total_bytes": sum(z["total_bytes"] for z in listed),
            "free_bytes": sum(z["free_bytes"] for z in listed),
            "chunk_servers": sum(z["chunk_servers"] for z in listed),
            "zones": listed,
        }

    async def health(self) -> dict[str, Any]:
        problems: list[str] = []
        try:
            revision = await self.etcd.revision()
        except EtcdError as exc:
            raise Problem(503, "metadata_unavailable", f"etcd: {exc}") from None
        infos, rev = await self.etcd.get_prefix(Keys.CHUNKS)
        lives, _ = await self.etcd.get_prefix(Keys.LIVE_CHUNKS, revision=rev)
        metas, _ = await self.etcd.get_prefix(Keys.LIVE_META, revision=rev)
        leaders, _ = await self.etcd.get_prefix(Keys.REDIRECTOR_ELECTION + "/", revision=rev)
        live_ids = {s.id for s in decode_records(lives, ChunkServerStatus)}
        down = sorted({i.id for i in decode_records(infos, ChunkServerInfo)} - live_ids)
        leader = min(leaders, key=lambda kv: kv.create_revision, default=None)
        if not live_ids:
            problems.append("no chunk server is up")
        if down:
            problems.append(f"chunk servers down: {', '.join(down)}")
        if leader is None:
            problems.append("no redirector leads: initiators cannot log in through the VIP")
        return {
            "status": "degraded" if problems else "ok",
            "etcd_revision": revision,
            "chunk_servers_up": len(live_ids),
            "chunk_servers_down": len(down),
            "meta_instances": len(metas),
            "redirector_leader": leader.value.decode(errors="replace") if leader else None,
            "problems": problems,
        }

    # --- operations -----------------------------------------------------------------------

    async def get_operation(self, operation_id: str) -> dict[str, Any]:
        op, _ = await read(self.etcd, Keys.operation(operation_id), OperationRecord)
        if op is None:
            raise Problem(404, "operation_not_found", f"no operation {operation_id}")
        return operation_view(op)

    async def list_operations(self, limit: int, token: str | None) -> Listing:
        return await list_page(
            self.etcd,
            Keys.OPERATIONS,
            limit,
            token,
            as_json(lambda kv: operation_view(OperationRecord.from_json(kv.value))),
        )


def chunk_view(
    chunk_id: str,
    info: ChunkServerInfo | None,
    live: ChunkServerStatus | None,
    admin: ChunkAdminRecord | None,
    holds: bool,
) -> dict[str, Any]:
    base = live or info
    assert base is not None
    state = "down" if live is None else live.state if live.state == "draining" else "up"
    return {
        "id": chunk_id,
        "state": state,
        "admin_state": admin.state if admin is not None else None,
        "operation_id": admin.operation_id if admin is not None else None,
        "zone": base.zone,
        "portal": base.portal,
        "capacity": live.capacity if live is not None else None,
        "free": live.free if live is not None else None,
        "holds_extents": holds,
    }
