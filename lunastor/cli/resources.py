"""`lunastor volume|export|snapshot|target|chunk ...` and `lunastor cluster capacity|backup|
restore`: thin REST calls, a table or `--json` out, one-line errors."""

from __future__ import annotations

import datetime
import time
import urllib.parse
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from lunastor.cli import backup, qos
from lunastor.cli.options import (
    SIZE,
    Cli,
    api_command,
    console,
    dir_option,
    err_console,
    fail,
    human_bytes,
    table,
)


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _volume_id(cli: Cli, ref: str) -> str:
    """A volume id, or the id of the volume named `ref`."""
    if ref.startswith("vol-"):
        return ref
    found = cli.call("GET", f"/v1/volumes?name={_q(ref)}")["items"]
    if not found:
        fail(f"no volume named {ref!r}")
    return str(found[0]["id"])


def _snapshot_id(cli: Cli, ref: str) -> str:
    if ref.startswith("snap-"):
        return ref
    found = cli.call("GET", f"/v1/snapshots?name={_q(ref)}")["items"]
    if not found:
        fail(f"no snapshot named {ref!r}")
    return str(found[0]["id"])


def _all_pages(cli: Cli, path: str, limit: int | None) -> list[dict[str, Any]]:
    sep = "&" if "?" in path else "?"
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        page_size = min(1000, limit - len(items)) if limit else 1000
        url = f"{path}{sep}limit={page_size}" + (f"&next={token}" if token else "")
        page = cli.call("GET", url)
        items += page["items"]
        token = page["next"]
        if not token or (limit and len(items) >= limit):
            return items


# --- volumes -------------------------------------------------------------------------------


def _volume_rows(volumes: list[dict[str, Any]]) -> None:
    rows = [
        (
            v["id"],
            v["name"],
            human_bytes(v["size_bytes"]),
            v["replicas"],
            v["block_size"],
            f"{v['target_iqn']} lun {v['lun']}",
            ",".join(f"{k}={val}" for k, val in sorted(v["labels"].items())),
            _when(v["created_at"]),
        )
        for v in volumes
    ]
    cols = ("id", "name", "size", "replicas", "block", "target / lun", "labels", "created")
    table("volumes", cols, rows)


@click.group()
def volume() -> None:
    """Create, inspect, grow and delete volumes."""


@volume.command("create")
@click.argument("name")
@click.option("--size", type=SIZE, required=True, help="e.g. 10GiB")
@click.option("--replicas", type=click.IntRange(1, 5), default=3, show_default=True)
@click.option("--block-size", type=click.Choice(["512", "4096"]), default="512", show_default=True)
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="repeatable")
@click.option("--from-snapshot", metavar="SNAPSHOT", help="clone a snapshot (id or name)")
@click.option("--from-volume", metavar="VOLUME", help="clone a volume (id or name)")
@qos.qos_options
@api_command
def volume_create(
    cli: Cli,
    name: str,
    size: int,
    replicas: int,
    block_size: str,
    labels: tuple[str, ...],
    from_snapshot: str | None,
    from_volume: str | None,
    **limits: Any,
) -> None:
    """Create volume NAME (the same command twice gives the same volume). The QoS limits
    (docs/qos.md) change later with `volume set-qos`."""
    parsed: dict[str, str] = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--label {item!r}: expected KEY=VALUE")
        parsed[key] = value
    body: dict[str, Any] = {
        "name": name,
        "size_bytes": size,
        "replicas": replicas,
        "block_size": int(block_size),
        "labels": parsed,
    }
    if qos.given(limits):
        body["qos"] = qos.limits_for_create(limits)
    if from_snapshot and from_volume:
        fail("give --from-snapshot or --from-volume, not both")
    if from_snapshot:
        body["source"] = {"snapshot_id": _snapshot_id(cli, from_snapshot)}
    elif from_volume:
        body["source"] = {"volume_id": _volume_id(cli, from_volume)}
    created = cli.call("POST", "/v1/volumes", body)
    cli.emit(created, lambda v: _volume_rows([v]))


@volume.command("get")
@click.argument("volume_ref", metavar="VOLUME")
@api_command
def volume_get(cli: Cli, volume_ref: str) -> None:
    """Show one volume (by id or name) and who it is exported to."""
    vid = _volume_id(cli, volume_ref)
    vol = cli.call("GET", f"/v1/volumes/{vid}")
    exports = cli.call("GET", f"/v1/volumes/{vid}/exports")["items"]
    vol = {**vol, "exports": [e["initiator"] for e in exports]}

    def render(v: dict[str, Any]) -> None:
        _volume_rows([v])
        console.print(f"exported to: {', '.join(v['exports']) or 'nobody'}", highlight=False)
        console.print(f"QoS limits: {qos.describe(v.get('qos') or {})}", highlight=False)

    cli.emit(vol, render)


@volume.command("list")
@click.option("--limit", type=click.IntRange(1), help="at most this many (default: all)")
@api_command
def volume_list(cli: Cli, limit: int | None) -> None:
    """List volumes (every page, read at one etcd revision)."""
    cli.emit(_all_pages(cli, "/v1/volumes", limit), _volume_rows)


@volume.command("delete")
@click.argument("volume_ref", metavar="VOLUME")
@click.option("--force", is_flag=True, help="delete even while exported")
@api_command
def volume_delete(cli: Cli, volume_ref: str, force: bool) -> None:
    """Delete a volume (deleting a missing one succeeds)."""
    if not volume_ref.startswith("vol-"):
        found = cli.call("GET", f"/v1/volumes?name={_q(volume_ref)}")["items"]
        if not found:
            cli.emit({"deleted": None}, lambda _: console.print("no such volume; nothing to do"))
            return
        volume_ref = found[0]["id"]
    cli.call("DELETE", f"/v1/volumes/{volume_ref}" + ("?force=true" if force else ""))
    cli.emit({"deleted": volume_ref}, lambda _: console.print(f"deleted {volume_ref}"))


@volume.command("expand")
@click.argument("volume_ref", metavar="VOLUME")
@click.option("--size", type=SIZE, required=True, help="new size, e.g. 20GiB")
@api_command
def volume_expand(cli: Cli, volume_ref: str, size: int) -> None:
    """Grow a volume online (shrinking is refused)."""
    vid = _volume_id(cli, volume_ref)
    cli.emit(cli.call("POST", f"/v1/volumes/{vid}/expand", {"size_bytes": size}),
             lambda v: _volume_rows([v]))  # fmt: skip


# --- exports -------------------------------------------------------------------------------


def _export_rows(exports: list[dict[str, Any]]) -> None:
    rows = [
        (e["volume_id"], e["initiator"], e["portal"], e["target_iqn"], e["lun"]) for e in exports
    ]
    table("exports", ("volume", "initiator", "portal", "target", "lun"), rows)


@click.group()
def export() -> None:
    """Publish volumes to initiators (LUN masking)."""


@export.command("add")
@click.argument("volume_ref", metavar="VOLUME")
@click.argument("initiator")
@api_command
def export_add(cli: Cli, volume_ref: str, initiator: str) -> None:
    """Let INITIATOR (its IQN) see VOLUME; prints the portal, target and LUN to log into."""
    vid = _volume_id(cli, volume_ref)
    out = cli.call("POST", f"/v1/volumes/{vid}/exports", {"initiator": initiator})
    cli.emit(out, lambda e: _export_rows([e]))


@export.command("remove")
@click.argument("volume_ref", metavar="VOLUME")
@click.argument("initiator")
@api_command
def export_remove(cli: Cli, volume_ref: str, initiator: str) -> None:
    """Hide VOLUME from INITIATOR."""
    vid = _volume_id(cli, volume_ref)
    cli.call("DELETE", f"/v1/volumes/{vid}/exports/{_q(initiator)}")
    cli.emit({"removed": initiator}, lambda _: console.print(f"{initiator} removed from {vid}"))


@export.command("list")
@click.argument("volume_ref", metavar="VOLUME")
@api_command
def export_list(cli: Cli, volume_ref: str) -> None:
    """Initiators VOLUME is exported to."""
    vid = _volume_id(cli, volume_ref)
    cli.emit(cli.call("GET", f"/v1/volumes/{vid}/exports")["items"], _export_rows)


# --- snapshots -----------------------------------------------------------------------------


def _snapshot_rows(snaps: list[dict[str, Any]]) -> None:
    rows = [
        (s["id"], s["name"], s["source_volume_id"], human_bytes(s["size_bytes"]),
         "yes" if s["ready_to_use"] else "no", _when(s["created_at"]))
        for s in snaps
    ]  # fmt: skip
    table("snapshots", ("id", "name", "volume", "size", "ready", "created"), rows)


@click.group()
def snapshot() -> None:
    """Copy-on-write snapshots (metadata only, ready at once)."""


@snapshot.command("create")
@click.argument("name")
@click.argument("volume_ref", metavar="VOLUME")
@api_command
def snapshot_create(cli: Cli, name: str, volume_ref: str) -> None:
    """Snapshot VOLUME as NAME."""
    body = {"name": name, "volume_id": _volume_id(cli, volume_ref)}
    cli.emit(cli.call("POST", "/v1/snapshots", body), lambda s: _snapshot_rows([s]))


@snapshot.command("get")
@click.argument("snapshot_ref", metavar="SNAPSHOT")
@api_command
def snapshot_get(cli: Cli, snapshot_ref: str) -> None:
    sid = _snapshot_id(cli, snapshot_ref)
    cli.emit(cli.call("GET", f"/v1/snapshots/{sid}"), lambda s: _snapshot_rows([s]))


@snapshot.command("list")
@click.option("--volume", "volume_ref", help="only snapshots of this volume")
@api_command
def snapshot_list(cli: Cli, volume_ref: str | None) -> None:
    path = "/v1/snapshots"
    if volume_ref:
        path += f"?volume_id={_volume_id(cli, volume_ref)}"
    cli.emit(_all_pages(cli, path, None), _snapshot_rows)


@snapshot.command("delete")
@click.argument("snapshot_ref", metavar="SNAPSHOT")
@api_command
def snapshot_delete(cli: Cli, snapshot_ref: str) -> None:
    if not snapshot_ref.startswith("snap-"):
        found = cli.call("GET", f"/v1/snapshots?name={_q(snapshot_ref)}")["items"]
        if not found:
            cli.emit({"deleted": None}, lambda _: console.print("no such snapshot; nothing to do"))
            return
        snapshot_ref = found[0]["id"]
    cli.call("DELETE", f"/v1/snapshots/{snapshot_ref}")
    cli.emit({"deleted": snapshot_ref}, lambda _: console.print(f"deleted {snapshot_ref}"))


# --- targets and CHAP ----------------------------------------------------------------------


def _chap_body(
    user: str, secret: str, mutual_user: str | None, mutual_secret: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"user": user, "secret": secret}
    if mutual_user or mutual_secret:
        if not (mutual_user and mutual_secret):
            fail("mutual CHAP needs both --mutual-user and --mutual-secret")
        body.update(mutual_user=mutual_user, mutual_secret=mutual_secret)
    return body


def _chap_line(view: dict[str, Any]) -> None:
    if not view["chap_enabled"]:
        console.print("CHAP off")
        return
    mutual = f", mutual user {view['mutual_user']}" if view.get("mutual_chap_enabled") else ""
    console.print(f"CHAP on: user {view['user']}{mutual}", highlight=False)


chap_options = [
    click.option("--user", help="CHAP user name the initiator sends"),
    click.option(
        "--secret",
        envvar="LUNASTOR_CHAP_SECRET",
        help="CHAP secret, 12-255 characters (or LUNASTOR_CHAP_SECRET; prompted if omitted)",
    ),
    click.option("--mutual-user", help="user name the target answers with (mutual CHAP)"),
    click.option("--mutual-secret", envvar="LUNASTOR_CHAP_MUTUAL_SECRET", help="mutual secret"),
    click.option("--disable", is_flag=True, help="turn CHAP off"),
]


def with_chap_options(f: Any) -> Any:
    for option in reversed(chap_options):
        f = option(f)
    return f


def _apply_chap(
    cli: Cli,
    path: str,
    user: str | None,
    secret: str | None,
    mutual_user: str | None,
    mutual_secret: str | None,
    disable: bool,
) -> None:
    if disable:
        cli.call("DELETE", path)
        cli.emit({"chap_enabled": False}, _chap_line)
        return
    if user is None:
        cli.emit(cli.call("GET", path), _chap_line)
        return
    if secret is None:
        secret = click.prompt("CHAP secret", hide_input=True, confirmation_prompt=True)
    cli.emit(
        cli.call("PUT", path, _chap_body(user, secret, mutual_user, mutual_secret)), _chap_line
    )


@click.group()
def target() -> None:
    """iSCSI targets (255 LUNs each) and their CHAP settings."""


@target.command("list")
@api_command
def target_list(cli: Cli) -> None:
    def render(out: dict[str, Any]) -> None:
        rows = [
            (t["iqn"], t["luns"], "on" if t["chap_enabled"] else "off", t.get("chap_user"),
             "on" if t["mutual_chap_enabled"] else "off")
            for t in out["items"]
        ]  # fmt: skip
        table("targets", ("iqn", "luns", "chap", "chap user", "mutual"), rows)
        console.print(f"discovery CHAP: {'on' if out['discovery_chap_enabled'] else 'off'}")

    cli.emit(cli.call("GET", "/v1/targets"), render)


@target.command("set-chap")
@click.argument("target_iqn", metavar="TARGET")
@with_chap_options
@api_command
def target_set_chap(
    cli: Cli,
    target_iqn: str,
    user: str | None,
    secret: str | None,
    mutual_user: str | None,
    mutual_secret: str | None,
    disable: bool,
) -> None:
    """Set, replace (rotate) or --disable CHAP on TARGET (its IQN). Secrets are never shown."""
    if user is None and not disable:
        fail("give --user (and --secret) to set CHAP, or --disable")
    _apply_chap(cli, f"/v1/targets/{target_iqn}/chap", user, secret, mutual_user, mutual_secret,
                disable)  # fmt: skip


@target.command("discovery-chap")
@with_chap_options
@api_command
def target_discovery_chap(
    cli: Cli,
    user: str | None,
    secret: str | None,
    mutual_user: str | None,
    mutual_secret: str | None,
    disable: bool,
) -> None:
    """Show, set or --disable CHAP for discovery sessions."""
    _apply_chap(cli, "/v1/discovery-chap", user, secret, mutual_user, mutual_secret, disable)


# --- chunk servers -------------------------------------------------------------------------


def _chunk_rows(chunks: list[dict[str, Any]]) -> None:
    rows = [
        (c["id"], c["state"], c["admin_state"], c["zone"], c["portal"],
         human_bytes(c["capacity"]), human_bytes(c["free"]), "yes" if c["holds_extents"] else "no")
        for c in chunks
    ]  # fmt: skip
    cols = ("id", "state", "admin", "zone", "portal", "capacity", "free", "holds data")
    table("chunk servers", cols, rows)


def _operation_rows(ops: list[dict[str, Any]]) -> None:
    rows = [(o["id"], o["kind"], o["subject"], o["state"], f"{o['progress']:.0%}") for o in ops]
    table("operations", ("id", "kind", "subject", "state", "progress"), rows)


@click.group()
def chunk() -> None:
    """Chunk servers: list, drain, remove."""


@chunk.command("list")
@api_command
def chunk_list(cli: Cli) -> None:
    cli.emit(cli.call("GET", "/v1/chunks")["items"], _chunk_rows)


@chunk.command("drain")
@click.argument("chunk_id")
@click.option("--wait", is_flag=True, help="follow the drain with a progress bar until it ends")
@click.option("--timeout", default=3600.0, show_default=True, help="seconds --wait waits at most")
@api_command
def chunk_drain(cli: Cli, chunk_id: str, wait: bool, timeout: float) -> None:
    """Move everything off CHUNK_ID; prints the operation to follow (or follows it, --wait)."""
    op = cli.call("POST", f"/v1/chunks/{chunk_id}/drain")
    if wait:
        op = follow_operation(cli, op, timeout)
    cli.emit(op, lambda o: _operation_rows([o]))
    if op["state"] == "failed":
        fail(f"operation {op['id']} failed: {op.get('detail') or 'no detail'}")


def follow_operation(
    cli: Cli, op: dict[str, Any], timeout: float, interval: float = 0.5
) -> dict[str, Any]:
    """Poll an operation until it ends, with a progress bar where a person waits."""
    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=cli.as_json,
        transient=True,
    ) as bar:
        task = bar.add_task(f"{op['kind']} {op['subject']}", total=1.0)
        while op["state"] == "running":
            bar.update(task, completed=float(op["progress"]))
            if time.monotonic() > deadline:
                fail(
                    f"operation {op['id']} still running after {timeout:.0f}s "
                    f"({op['progress']:.0%}); follow it with "
                    f"`lunastor cluster operations {op['id']}`"
                )
            time.sleep(interval)
            op = cli.call("GET", f"/v1/operations/{op['id']}")
        bar.update(task, completed=float(op["progress"]))
    return op


@chunk.command("remove")
@click.argument("chunk_id")
@api_command
def chunk_remove(cli: Cli, chunk_id: str) -> None:
    """Forget CHUNK_ID (it must be down or drained and hold nothing)."""
    cli.call("DELETE", f"/v1/chunks/{chunk_id}")
    cli.emit({"removed": chunk_id}, lambda _: console.print(f"removed {chunk_id}"))


# --- cluster -------------------------------------------------------------------------------


@api_command
def cluster_capacity(cli: Cli) -> None:
    """Total and free bytes of the live chunk servers, per zone."""

    def render(c: dict[str, Any]) -> None:
        rows = [(z["zone"], z["chunk_servers"], human_bytes(z["total_bytes"]),
                 human_bytes(z["free_bytes"])) for z in c["zones"]]  # fmt: skip
        rows.append(("all", c["chunk_servers"], human_bytes(c["total_bytes"]),
                     human_bytes(c["free_bytes"])))  # fmt: skip
        table("capacity", ("zone", "chunk servers", "total", "free"), rows)

    cli.emit(cli.call("GET", "/v1/capacity"), render)


etcd_option = click.option(
    "--etcd",
    "endpoints",
    metavar="HOST:PORT[,...]",
    envvar="LUNASTOR_ETCD",
    help="etcd endpoints (default: the dev cluster's, from --dir)",
)


@click.argument("operation_id", required=False)
@api_command
def cluster_operations(cli: Cli, operation_id: str | None) -> None:
    """Long-running operations (drains, rebuilds) with their progress, or one of them."""
    if operation_id:
        cli.emit(cli.call("GET", f"/v1/operations/{_q(operation_id)}"),
                 lambda o: _operation_rows([o]))  # fmt: skip
    else:
        cli.emit(cli.call("GET", "/v1/operations")["items"], _operation_rows)


def register(main: click.Group, cluster: click.Group) -> None:
    for group in (volume, export, snapshot, target, chunk):
        main.add_command(group)
    qos.register(volume, _volume_id)
    cluster.command("capacity")(cluster_capacity)
    cluster.command("operations")(cluster_operations)

    @cluster.command("backup")
    @click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
    @etcd_option
    @dir_option
    def cluster_backup(file: Path, endpoints: str | None, directory: Path) -> None:
        """Save an etcd snapshot (all metadata) to FILE; see docs/recovery.md."""
        try:
            info = backup.save(backup.endpoints_for(endpoints, directory), file)
        except backup.BackupError as exc:
            fail(str(exc))
        console.print(
            f"saved {info['bytes']} bytes to {file} (revision {info['revision']}, "
            f"{info['keys']} keys, hash {info['hash']})",
            highlight=False,
        )

    @cluster.command("restore")
    @click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
    @click.option("--data-dir", required=True, type=click.Path(path_type=Path),
                  help="new, empty etcd data directory")  # fmt: skip
    @click.option("--name", default="default", show_default=True, help="etcd member name")
    @click.option("--peer-url", default="http://127.0.0.1:2380", show_default=True,
                  help="the member's advertised peer URL")  # fmt: skip
    def cluster_restore(file: Path, data_dir: Path, name: str, peer_url: str) -> None:
        """Restore FILE into a new etcd data directory (etcdctl snapshot restore)."""
        try:
            backup.restore(file, data_dir, name, peer_url)
        except backup.BackupError as exc:
            fail(str(exc))
        console.print(
            f"restored {file} into {data_dir}; start etcd with --data-dir {data_dir} "
            f"--name {name} (docs/recovery.md)",
            highlight=False,
        )
