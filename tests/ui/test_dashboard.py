"""The operator dashboard in headless Chromium against a real dev cluster (docs/dashboard.md).

One cluster for the module (four chunk servers, three replicas); the chunk server SIGKILL
comes last. Each test saves screenshots under test-artifacts/ui/.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, expect

from tests.integration.chunk.test_replicated_cluster import QEMU_IQN, run
from tests.support.devcluster import lunastor
from tests.support.procs import wait_for
from tests.ui.conftest import PHONE, READER_TOKEN, Cluster, Tab, open_tab

MIB = 1 << 20
DATA_MIB = 24  # 24 one-MiB extents: a rebuild moves in visible steps at 1 MiB/s


def _portal(cluster: Cluster, daemon: str) -> str:
    return str(cluster.state["daemons"][daemon]["endpoints"]["portal"])


def _url(cluster: Cluster, daemon: str, vol: dict[str, Any]) -> str:
    return f"iscsi://{_portal(cluster, daemon)}/{vol['target_iqn']}/{vol['lun']}"


def _volume_with_data(cluster: Cluster, name: str, tmp_path: Path) -> dict[str, Any]:
    """A volume exported to qemu's initiator name, written in full through chunk1."""
    vol = cluster.cli("volume", "create", name, "--size", f"{DATA_MIB}MiB")
    cluster.cli("export", "add", name, QEMU_IQN)
    url = _url(cluster, "chunk1", vol)
    wait_for(
        lambda: run("iscsi-inq", "-i", QEMU_IQN, url, timeout=20).returncode == 0,
        30,
        f"{url} to answer INQUIRY",
    )
    image = tmp_path / f"{name}.raw"
    image.write_bytes(os.urandom(DATA_MIB * MIB))
    conv = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), url)
    assert conv.returncode == 0, conv.stderr
    return dict(vol)


def _no_horizontal_scroll(tab: Tab) -> bool:
    return bool(
        tab.page.evaluate(
            "document.documentElement.scrollWidth <= document.documentElement.clientWidth + 1"
        )
    )


def test_every_page_loads_without_console_errors_wide_and_on_a_phone(
    cluster: Cluster, browser: Browser, tmp_path: Path
) -> None:
    vol = _volume_with_data(cluster, "shown", tmp_path)
    # IO through the redirector's VIP while the volume page is open: its charts must move
    vip_url = f"iscsi://{cluster.state['portal']}/{vol['target_iqn']}/{vol['lun']}"
    bench = subprocess.Popen(
        ["qemu-img", "bench", "-f", "raw", "-c", "400000", "-d", "4", "-s", "4096", vip_url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for viewport, suffix in ((None, ""), (PHONE, "-phone")):
            tab = open_tab(
                browser, cluster, cluster.admin_token, viewport or {"width": 1280, "height": 900}
            )
            tab.go("cluster")
            expect(tab.page.locator("tr[data-chunk]")).to_have_count(4)
            expect(tab.page.locator("section.zone")).to_have_count(3)  # zone1..zone3
            expect(tab.page.locator("[data-tile=redirector]")).to_contain_text("leads")
            expect(tab.page.locator("[data-tile=etcd]")).to_contain_text("revision")
            tab.shot(f"cluster{suffix}")
            assert _no_horizontal_scroll(tab), "the cluster page is wider than the screen"

            tab.go("volumes")
            row = tab.page.locator('tr[data-volume="shown"]')
            expect(row).to_have_attribute("data-health", "ok")
            tab.shot(f"volumes{suffix}")
            assert _no_horizontal_scroll(tab), "the volume list is wider than the screen"

            tab.go(f"volumes/{vol['id']}")
            expect(tab.page.locator("tr[data-extent]")).to_have_count(DATA_MIB)
            # three readings make two rates; the IOPS legend shows the reads of the bench
            reads = tab.page.locator('figure[data-chart="IOPS"] .value.read')
            expect(reads).not_to_have_text("—", timeout=15_000)
            wait_for(
                lambda r=reads: float(r.inner_text().split()[0]) > 0,  # type: ignore[misc]
                15,
                "the IOPS chart to show the bench's reads",
                interval=0.5,
            )
            tab.shot(f"volume{suffix}")
            assert _no_horizontal_scroll(tab), "the volume page is wider than the screen"

            tab.go("operations")
            expect(tab.page.locator("tr[data-event]").first).to_be_visible()
            tab.shot(f"operations{suffix}")
            assert _no_horizontal_scroll(tab), "the operations page is wider than the screen"
            assert tab.errors == []
            tab.page.close()
    finally:
        bench.kill()
        bench.wait()


def test_a_volume_created_and_expanded_in_the_browser_is_what_the_cli_lists(
    cluster: Cluster, browser: Browser
) -> None:
    tab = open_tab(browser, cluster, cluster.admin_token)
    tab.go("volumes")
    form = tab.page.locator("form[aria-label='Create volume']")
    form.locator("input[name=name]").fill("from-the-ui")
    form.locator("input[name=size]").fill("1")
    form.locator("select[name=unit]").select_option("GiB")
    form.locator("input[name=replicas]").fill("2")
    form.locator("button[type=submit]").click()
    expect(tab.page.locator("#notice")).to_contain_text("volume from-the-ui")
    row = tab.page.locator('tr[data-volume="from-the-ui"]')
    expect(row).to_be_visible()

    # the same name with another size is a conflict: its problem body is shown as it is
    form.locator("input[name=size]").fill("2")
    form.locator("button[type=submit]").click()
    expect(form.locator(".problem")).to_contain_text("409 already_exists_with_different_parameters")

    row.locator("a").click()
    expand = tab.page.locator("form[aria-label='Expand']")
    expand.locator("input[name=size]").fill("3")
    expand.locator("select[name=unit]").select_option("GiB")
    expand.locator("button[type=submit]").click()
    expect(tab.page.locator("#notice")).to_contain_text("is 3.0 GiB now")
    # shrinking is refused by the API, and the page says why
    expand.locator("input[name=size]").fill("1")
    expand.locator("button[type=submit]").click()
    expect(expand.locator(".problem")).to_contain_text("400 shrink_not_supported")

    tab.page.locator("form[aria-label='Publish'] input[name=initiator]").fill(
        "iqn.2026-11.org.example:ui-node"
    )
    tab.page.locator("form[aria-label='Publish'] button[type=submit]").click()
    expect(tab.page.locator("button[data-action=unpublish]")).to_have_count(1)
    tab.page.locator("form[aria-label='Snapshot'] input[name=name]").fill("from-the-ui-snap")
    tab.page.locator("form[aria-label='Snapshot'] button[type=submit]").click()
    expect(tab.page.get_by_text("from-the-ui-snap").first).to_be_visible()
    tab.shot("volume-actions")

    listed = {v["name"]: v for v in cluster.cli("volume", "list")}
    assert listed["from-the-ui"]["size_bytes"] == 3 << 30
    assert listed["from-the-ui"]["replicas"] == 2
    exports = cluster.cli("export", "list", "from-the-ui")
    assert [e["initiator"] for e in exports] == ["iqn.2026-11.org.example:ui-node"]

    # unpublish, then delete: each asks first
    tab.page.locator("button[data-action=unpublish]").click()
    tab.page.locator("dialog button[value=confirm]").click()
    expect(tab.page.locator("button[data-action=unpublish]")).to_have_count(0)
    tab.page.locator("form[aria-label='Delete'] button[type=submit]").click()
    tab.page.locator("dialog button[value=confirm]").click()
    expect(tab.page.locator('tr[data-volume="from-the-ui"]')).to_have_count(0)
    assert "from-the-ui" not in {v["name"] for v in cluster.cli("volume", "list")}
    # the browser reports the two refused requests, and nothing else
    refused = ["status of 409 (Conflict) (http", "status of 400 (Bad Request) (http"]
    assert len(tab.errors) == 2, tab.errors
    assert all(r in e for r, e in zip(refused, tab.errors, strict=True)), tab.errors


def test_a_reader_sees_every_page_but_has_no_action_and_the_api_refuses_it(
    cluster: Cluster, browser: Browser
) -> None:
    cluster.cli("volume", "create", "seen-by-a-reader", "--size", "1GiB")
    cluster.cli("export", "add", "seen-by-a-reader", "iqn.2026-11.org.example:reader-node")
    tab = open_tab(browser, cluster, READER_TOKEN)
    expect(tab.page.locator("#who")).to_contain_text("reader")
    tab.go("cluster")
    expect(tab.page.locator("tr[data-chunk]")).to_have_count(4)
    expect(tab.page.locator("button[data-action=drain]")).to_have_count(0)
    tab.go("volumes")
    row = tab.page.locator('tr[data-volume="seen-by-a-reader"]')
    expect(row).to_have_attribute("data-health", "ok")
    expect(tab.page.locator("form.action")).to_have_count(0)
    row.locator("a").click()
    expect(tab.page.locator("main h1")).to_contain_text("seen-by-a-reader")
    expect(tab.page.get_by_text("iqn.2026-11.org.example:reader-node")).to_be_visible()
    expect(tab.page.locator("form.action")).to_have_count(0)
    expect(tab.page.locator("button[data-action=unpublish]")).to_have_count(0)
    tab.shot("volume-reader")
    assert tab.errors == []

    # the page's own API client, with the reader's token, is refused by the server
    answer = tab.page.evaluate(
        """async () => {
            const { api } = await import('./api.js');
            try { await api('POST', '/v1/volumes', {name: 'by-a-reader', size_bytes: 1048576}); }
            catch (e) { return [e.status, e.code]; }
            return null;
        }"""
    )
    assert answer == [403, "forbidden"]
    assert "by-a-reader" not in {v["name"] for v in cluster.cli("volume", "list")}
    # and the token never reached the page's markup or its address
    assert READER_TOKEN not in tab.page.content()
    assert READER_TOKEN not in tab.page.url


def _states(tab: Tab, script: str) -> Any:
    return tab.page.evaluate(script)


def test_a_sigkilled_chunk_server_shows_down_then_its_volume_degraded_rebuilding_and_ok(
    cluster: Cluster, browser: Browser, tmp_path: Path
) -> None:
    vol = _volume_with_data(cluster, "survivor", tmp_path)
    status = cluster.cli("cluster", "status")
    portals = {c["id"]: c["portal"] for c in status["chunk_servers"]}
    by_portal = {_portal(cluster, d): d for d in cluster.state["daemons"] if d.startswith("chunk")}
    volumes_tab = open_tab(browser, cluster, cluster.admin_token)
    volumes_tab.go("volumes")
    expect(volumes_tab.page.locator('tr[data-volume="survivor"]')).to_have_attribute(
        "data-health", "ok"
    )
    extents = volumes_tab.page.evaluate(
        f"fetch('/v1/volumes/{vol['id']}/status', {{headers: {{Authorization: "
        "'Bearer ' + sessionStorage.getItem('lunastor.token')}}).then(r => r.json())"
    )["extent_map"]
    held: dict[str, int] = {}
    for e in extents:
        for r in e["replicas"]:
            held[r["chunk_id"]] = held.get(r["chunk_id"], 0) + 1
    victim_id = max((c for c in held if by_portal[portals[c]] != "chunk1"), key=held.__getitem__)
    victim = by_portal[portals[victim_id]]
    cluster_tab = open_tab(browser, cluster, cluster.admin_token)
    cluster_tab.go("cluster")
    ops_tab = open_tab(browser, cluster, cluster.admin_token)
    ops_tab.go("operations")

    lunastor("dev", "stop", victim, "--kill", "--dir", str(cluster.dir))
    killed = time.monotonic()
    # ok was seen just before the kill (the expect above); the crash guard can make the page
    # show degraded before the first poll below
    seen_health: list[str] = ["ok"]
    progress: list[float] = []
    server_states: set[str] = set()
    shots: set[str] = set()
    # The page lists the 100 newest events: a rebuild of many extents pushes the server's
    # down and the rebuild's start out of it before the end, so they are collected as shown.
    events_shown: set[str] = set()
    events_script = "[...document.querySelectorAll('tr[data-event]')].map(r => r.dataset.event)"
    deadline = killed + 150
    while time.monotonic() < deadline:
        server = cluster_tab.page.get_attribute(f'tr[data-chunk="{victim_id}"]', "data-state")
        server_states.add(server or "")
        health = volumes_tab.page.get_attribute('tr[data-volume="survivor"]', "data-health")
        if health and (not seen_health or seen_health[-1] != health):
            seen_health.append(health)
        op = _states(
            ops_tab,
            f"""(() => {{
                const row = document.querySelector(
                    'tr[data-kind="rebuild"][data-subject="{victim_id}"]');
                return row ? [row.dataset.state, row.querySelector('progress').value] : null;
            }})()""",
        )
        if op is not None and (not progress or progress[-1] != op[1]):
            progress.append(op[1])
        events_shown.update(_states(ops_tab, events_script))
        for name, tab, when in (
            ("cluster-server-down", cluster_tab, server == "down"),
            (f"volumes-{health}", volumes_tab, health in ("degraded", "rebuilding")),
            ("operations-rebuilding", ops_tab, op is not None and 0 < op[1] < 1),
        ):
            if when and name not in shots:
                tab.shot(name)
                shots.add(name)
        if op is not None and op[0] == "succeeded" and health == "ok":
            break
        time.sleep(0.3)
    took = time.monotonic() - killed
    print(
        f"\ndashboard after SIGKILL of {victim}: health {' -> '.join(seen_health)}, rebuild "
        f"progress seen {[round(p, 2) for p in progress]}, ok after {took:.1f} s"
    )
    ops_tab.shot("operations-rebuilt")
    assert "down" in server_states, f"{victim} never showed as down: {server_states}"
    assert seen_health[-1] == "ok", seen_health
    assert "degraded" in seen_health and "rebuilding" in seen_health, seen_health
    assert seen_health.index("degraded") < seen_health.index("rebuilding"), seen_health
    moving = [p for p in progress if 0 < p < 1]
    assert len(set(moving)) >= 2, f"the progress bar did not move: {progress}"
    assert progress == sorted(progress) and progress[-1] == 1, progress
    events_shown.update(_states(ops_tab, events_script))
    assert {"chunk_server_down", "rebuild_started", "replica_added", "rebuild_done"} <= (
        events_shown
    ), events_shown
    for tab in (volumes_tab, cluster_tab, ops_tab):
        assert tab.errors == []

    # an admin drains another server from the cluster page: the API records it at once
    drained = next(c for c in portals if c != victim_id and by_portal[portals[c]] != "chunk1")
    row = cluster_tab.page.locator(f'tr[data-chunk="{drained}"]')
    row.locator("button[data-action=drain]").click()
    cluster_tab.page.locator("dialog button[value=confirm]").click()
    expect(cluster_tab.page.locator("#notice")).to_contain_text(f"drain of {drained} started")
    expect(row).to_have_attribute("data-state", "draining")
    expect(row.locator("button[data-action=drain]")).to_have_count(0)
    expect(ops_tab.page.locator(f'tr[data-kind="drain"][data-subject="{drained}"]')).to_be_visible()
    listed = {c["id"]: c for c in cluster.cli("chunk", "list")}
    assert listed[drained]["admin_state"] == "draining"
    cluster_tab.shot("cluster-draining")
    assert cluster_tab.errors == []
