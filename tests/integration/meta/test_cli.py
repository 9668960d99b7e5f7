"""The `lunastor` CLI against a real meta process and a real etcd."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from lunastor.cli.main import main
from lunastor.common.etcd import Etcd, EtcdConfig
from lunastor.common.records import Keys
from tests.integration.meta.conftest import TOKENS, MetaProcess, register_chunk
from tests.support.etcd import EtcdServer
from tests.support.procs import free_port, wait_for

GIB = 1 << 30


class Lunastor:
    def __init__(self, meta: MetaProcess) -> None:
        self.meta = meta
        self.runner = CliRunner()

    def run(self, *args: str, token: str = TOKENS["admin"], input: str | None = None) -> Result:
        group, command, *rest = args
        argv = [group, command, "--api", self.meta.url, "--token", token, *rest]
        return self.runner.invoke(main, argv, input=input, catch_exceptions=False)

    def json(self, *args: str) -> Any:
        result = self.run(*args, "--json")
        assert result.exit_code == 0, result.output + (result.stderr or "")
        return json.loads(result.stdout)


@pytest.fixture
def cli(meta_process: MetaProcess) -> Lunastor:
    return Lunastor(meta_process)


def test_volume_lifecycle(cli: Lunastor) -> None:
    vol = cli.json("volume", "create", "db-1", "--size", "10GiB", "--label", "team=db")
    assert vol["size_bytes"] == 10 * GIB and vol["labels"] == {"team": "db"}
    assert cli.json("volume", "create", "db-1", "--size", "10GiB", "--label", "team=db") == vol
    got = cli.json("volume", "get", "db-1")
    assert got == {**vol, "exports": []}
    table = cli.run("volume", "list")
    assert table.exit_code == 0 and "db-1" in table.stdout and "10 GiB" in table.stdout
    assert [v["id"] for v in cli.json("volume", "list")] == [vol["id"]]

    grown = cli.json("volume", "expand", "db-1", "--size", "20G")
    assert grown["size_bytes"] == 20 * GIB
    shrink = cli.run("volume", "expand", vol["id"], "--size", "1GiB")
    assert shrink.exit_code == 1
    assert "400 shrink_not_supported" in shrink.stderr and len(shrink.stderr.splitlines()) == 1

    exp = cli.json("export", "add", "db-1", "iqn.2020-01.org.example:node-1")
    assert exp["portal"] and exp["lun"] == vol["lun"] and exp["target_iqn"] == vol["target_iqn"]
    assert [e["initiator"] for e in cli.json("export", "list", "db-1")] == [
        "iqn.2020-01.org.example:node-1"
    ]
    refused = cli.run("volume", "delete", "db-1")
    assert refused.exit_code == 1 and "409 volume_in_use" in refused.stderr
    cli.json("export", "remove", "db-1", "iqn.2020-01.org.example:node-1")
    assert cli.json("export", "list", "db-1") == []

    snap = cli.json("snapshot", "create", "db-1-snap", "db-1")
    assert snap["ready_to_use"] and snap["source_volume_id"] == vol["id"]
    assert cli.json("snapshot", "get", "db-1-snap") == snap
    assert cli.json("snapshot", "list", "--volume", "db-1") == [snap]
    clone = cli.json("volume", "create", "db-2", "--size", "20GiB", "--from-snapshot", "db-1-snap")
    assert clone["source"] == {"snapshot_id": snap["id"]}
    cli.json("snapshot", "delete", "db-1-snap")
    assert cli.json("snapshot", "list") == []

    assert cli.json("volume", "delete", "db-1") == {"deleted": vol["id"]}
    assert cli.json("volume", "delete", "db-1") == {"deleted": None}
    missing = cli.run("volume", "get", "db-1")
    assert missing.exit_code == 1 and "no volume named 'db-1'" in missing.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("volume", "create", "x", "--size", "10XB"), "unknown size unit 'XB'"),
        (("volume", "create", "x", "--size", "ten"), "not a size"),
        (("volume", "create", "x", "--size", "1.5"), "not a whole number of bytes"),
    ],
)
def test_bad_sizes_are_usage_errors(cli: Lunastor, args: tuple[str, ...], message: str) -> None:
    result = cli.run(*args)
    assert result.exit_code == 2 and message in result.stderr


def test_api_errors_are_one_line(cli: Lunastor) -> None:
    result = cli.run("volume", "create", "bad name", "--size", "1GiB")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: 400 invalid_field: name:")
    assert len(result.stderr.strip().splitlines()) == 1
    denied = cli.run("volume", "create", "x", "--size", "1GiB", token=TOKENS["reader"])
    assert denied.exit_code == 1 and "403 forbidden" in denied.stderr
    unknown = cli.run("volume", "list", token="nope")
    assert unknown.exit_code == 1 and "401 unauthenticated" in unknown.stderr


def test_targets_and_chap_secrets_never_printed(cli: Lunastor) -> None:
    vol = cli.json("volume", "create", "t-1", "--size", "1GiB")
    secret = "very-secret-123"
    out = cli.run("target", "set-chap", vol["target_iqn"], "--user", "alice", "--secret", secret)
    assert out.exit_code == 0 and "CHAP on: user alice" in out.stdout
    prompted = cli.run("target", "discovery-chap", "--user", "disc", input=f"{secret}\n{secret}\n")
    assert prompted.exit_code == 0 and "CHAP on: user disc" in prompted.stdout
    listing = cli.json("target", "list")
    assert listing["discovery_chap_enabled"] is True
    assert listing["items"][0]["chap_user"] == "alice"
    shown = cli.run("target", "list").stdout + cli.run("target", "discovery-chap").stdout
    assert secret not in shown and secret not in json.dumps(listing)
    off = cli.run("target", "set-chap", vol["target_iqn"], "--disable")
    assert off.exit_code == 0 and "CHAP off" in off.stdout


def test_chunk_servers_and_capacity(cli: Lunastor) -> None:
    async def setup() -> None:
        config = EtcdConfig(endpoints=[cli.meta.etcd_endpoint], namespace=cli.meta.namespace)
        async with await Etcd.connect(config) as etcd:
            await register_chunk(etcd, "chunk-00000000c001", "z1", capacity=8 * GIB, free=GIB)

    asyncio.run(setup())
    (chunk,) = cli.json("chunk", "list")
    assert chunk["id"] == "chunk-00000000c001" and chunk["state"] == "up"
    capacity = cli.json("cluster", "capacity")
    assert capacity["total_bytes"] == 8 * GIB and capacity["free_bytes"] == GIB
    text = cli.run("cluster", "capacity").stdout
    assert "8 GiB" in text and "z1" in text
    refused = cli.run("chunk", "remove", "chunk-00000000c001")
    assert refused.exit_code == 1 and "chunk_server_in_service" in refused.stderr
    op = cli.json("chunk", "drain", "chunk-00000000c001")
    assert op["kind"] == "drain"
    wait_for(
        lambda: cli.json("chunk", "list")[0]["admin_state"] == "drained", 15, "drain to finish"
    )
    assert cli.json("cluster", "capacity")["free_bytes"] == GIB  # the server still runs
    assert cli.json("cluster", "operations", op["id"])["state"] == "succeeded"
    assert op["id"] in cli.run("cluster", "operations").stdout

    async def another() -> None:
        config = EtcdConfig(endpoints=[cli.meta.etcd_endpoint], namespace=cli.meta.namespace)
        async with await Etcd.connect(config) as etcd:
            await register_chunk(etcd, "chunk-00000000c002", "z1", capacity=8 * GIB, free=GIB)

    asyncio.run(another())
    waited = cli.run("chunk", "drain", "chunk-00000000c002", "--wait")
    assert waited.exit_code == 0, waited.stderr
    assert "succeeded" in waited.stdout and "100%" in waited.stdout

    async def stop_server() -> None:  # what a clean stop does: its lease and live record go
        config = EtcdConfig(endpoints=[cli.meta.etcd_endpoint], namespace=cli.meta.namespace)
        async with await Etcd.connect(config) as etcd:
            await etcd.delete(Keys.live_chunk("chunk-00000000c001"))

    asyncio.run(stop_server())
    assert cli.json("chunk", "list")[0]["state"] == "down"
    assert cli.json("chunk", "remove", "chunk-00000000c001") == {"removed": "chunk-00000000c001"}
    assert [c["id"] for c in cli.json("chunk", "list")] == ["chunk-00000000c002"]


def test_backup_and_restore_round_trip(
    cli: Lunastor, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    vol = cli.json("volume", "create", "keep-me", "--size", "3GiB")
    backup = tmp_path / "meta.db"
    saved = cli.runner.invoke(
        main, ["cluster", "backup", str(backup), "--etcd", etcd_server.endpoint]
    )
    assert saved.exit_code == 0, saved.output
    assert "saved" in saved.stdout and backup.stat().st_size > 0

    restored_dir = tmp_path / "restored"
    restored_dir.mkdir()
    peer = free_port()
    done = cli.runner.invoke(
        main,
        [
            "cluster", "restore", str(backup), "--data-dir", str(restored_dir / "data"),
            "--name", "test", "--peer-url", f"http://127.0.0.1:{peer}",
        ],
    )  # fmt: skip
    assert done.exit_code == 0, done.output + (done.stderr or "")
    again = cli.runner.invoke(
        main, ["cluster", "restore", str(backup), "--data-dir", str(restored_dir / "data")]
    )
    assert again.exit_code == 1 and "not empty" in again.stderr

    server = EtcdServer(data_dir=restored_dir, peer_port=peer).start()
    try:

        async def read() -> Any:
            config = EtcdConfig(endpoints=[server.endpoint], namespace=cli.meta.namespace)
            async with await Etcd.connect(config) as etcd:
                return await etcd.get(Keys.volume(vol["id"]))

        kv = asyncio.run(read())
        assert kv is not None and json.loads(kv.value)["name"] == "keep-me"
    finally:
        server.cleanup()


def test_volume_qos_limits(cli: Lunastor) -> None:
    vol = cli.json(
        "volume", "create", "q-1", "--size", "1GiB", "--write-iops", "500",
        "--bps", "100MiB", "--bps-burst", "200MiB", "--burst-seconds", "5",
    )  # fmt: skip
    assert vol["qos"] == {
        "write_iops": 500,
        "bps": 100 << 20,
        "bps_burst": 200 << 20,
        "burst_seconds": 5,
    }
    shown = cli.run("volume", "get", "q-1")
    assert "write_iops=500" in shown.stdout and "burst 200 MiB/s for 5" in shown.stdout
    changed = cli.json("volume", "set-qos", "q-1", "--write-iops", "0", "--read-iops", "70")
    want = {"read_iops": 70, "bps": 100 << 20, "bps_burst": 200 << 20, "burst_seconds": 5}
    assert changed["qos"] == want
    assert cli.json("volume", "set-qos", "q-1", "--clear")["qos"] == {}
    assert cli.json("volume", "set-qos", "q-1", "--clear", "--iops", "9")["qos"] == {"iops": 9}
    # bad combinations are refused before any call, naming the option
    bad = cli.run("volume", "create", "q-2", "--size", "1GiB", "--iops-burst", "10")
    assert bad.exit_code == 1 and "--iops-burst" in bad.stderr
    bad = cli.run("volume", "set-qos", "q-1", "--iops", "-3")
    assert bad.exit_code == 2
    bad = cli.run("volume", "set-qos", "q-1")
    assert bad.exit_code == 1 and "at least one limit" in bad.stderr
    # the server refuses what only the merged limits show (a burst below the rate)
    bad = cli.run("volume", "set-qos", "q-1", "--iops-burst", "5")
    assert bad.exit_code == 1 and "400 invalid_field" in bad.stderr and "iops_burst" in bad.stderr
