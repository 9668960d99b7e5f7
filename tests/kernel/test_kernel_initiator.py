"""Linux's own iSCSI initiator (open-iscsi, in a QEMU guest) against lunastor's target.

Each scenario boots the host's stock Debian kernel under TCG in a namespace the test makes;
see tests/kernel/README.md. Skipped only where QEMU or the kernel package is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel import writer
from tests.kernel.cluster import NetCluster, wait_until
from tests.kernel.cluster_scenarios import NAMES as CLUSTER_NAMES
from tests.kernel.cluster_scenarios import run_cluster_scenarios
from tests.kernel.harness import BootFiles, Guest, GuestNet, boot_files, unavailable
from tests.kernel.initramfs import GUEST_DIR, Kernel, find_kernel
from tests.kernel.scenarios import MIB, SCENARIOS, ScenarioResult, run_scenario
from tests.kernel.target import REPO

reason = unavailable()
needs_guest = pytest.mark.skipif(reason is not None, reason=reason or "")


@pytest.fixture(scope="module")
def boot() -> BootFiles:
    # cached across runs next to the other build output; rebuilt when its inputs change
    return boot_files(REPO / "build" / "kernel-guest")


def report(result: ScenarioResult, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(f"\n{result.line()}")


@needs_guest
@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(
    name: str, boot: BootFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the target logs at INFO (as in production); the log is kept only when the scenario fails
    result = run_scenario(SCENARIOS[name](), boot, tmp_path / name, keep_target_log=False)
    report(result, capsys)
    tail = result.guest.serial_tail() if result.guest else ""
    assert result.passed, f"{result.line()}\n--- serial.log (end) ---\n{tail}"
    assert result.guest is not None
    assert all(step.ok for step in result.guest.steps)


@pytest.fixture(scope="module")
def cluster_results(
    boot: BootFiles, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, ScenarioResult]:
    """Every dev-cluster scenario, run once (one namespace, one cluster, their boots)."""
    workdir = tmp_path_factory.mktemp("cluster")
    build = REPO / "build" / "kernel-guest"
    return {r.name: r for r in run_cluster_scenarios(list(CLUSTER_NAMES), boot, workdir, build)}


@needs_guest
@pytest.mark.slow
@pytest.mark.parametrize("name", CLUSTER_NAMES)
def test_scenario_on_the_dev_cluster(
    name: str, cluster_results: dict[str, ScenarioResult], capsys: pytest.CaptureFixture[str]
) -> None:
    result = cluster_results[name]
    report(result, capsys)
    tail = result.guest.serial_tail() if result.guest else ""
    assert result.passed, f"{result.line()}\n--- serial.log (end) ---\n{tail}"


@needs_guest
def test_time_limit_kills_qemu_and_namespace_goes(boot: BootFiles, tmp_path: Path) -> None:
    """A guest that overruns its limit is killed, reported as such, and leaves nothing behind."""
    with GuestNet() as net:
        # 1 s is far less than a boot takes under TCG, so the scenario never gets to start
        result = Guest(net, tmp_path, boot).run(GUEST_DIR / "iscsi_chap.py", {}, timeout=1)
        pids = subprocess.run(
            ["ip", "netns", "pids", net.name], capture_output=True, text=True, check=True
        ).stdout.split()
        assert pids == []  # QEMU was the only process in the namespace
    assert result.status == "timeout"
    assert not result.passed
    assert result.wall_seconds < 15
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert net.name not in names


@needs_guest
@pytest.mark.slow
def test_extra_disk_reaches_the_guest(boot: BootFiles, tmp_path: Path) -> None:
    """The optional virtio disk is attached, readable and writable (a harness self-test)."""
    disk = tmp_path / "extra.img"
    size = 8 << 20
    with open(disk, "wb") as f:
        f.truncate(size)
        f.write(b"written-by-the-host")
    params = {"size": size, "host_marker": "written-by-the-host", "guest_marker": "and-the-guest"}
    with GuestNet() as net:
        result = Guest(net, tmp_path, boot, disks=[disk]).run(
            GUEST_DIR / "extra_disk.py", params, timeout=180
        )
    assert result.passed, f"{result.status} {result.messages}\n{result.serial_tail()}"
    with open(disk, "rb") as f:
        f.seek(4096)
        assert f.read(13) == b"and-the-guest"


def test_without_qemu_the_reason_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no qemu-system-x86_64
    reason = unavailable()
    assert reason is not None
    assert "qemu-system-x86" in reason


def test_main_exits_77_when_guests_cannot_boot(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernel"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 77, proc.stderr
    assert proc.stdout.startswith("SKIP kernel-initiator scenarios: qemu-system-x86_64")


PASSED_DOC = {"status": "passed", "steps": [{"name": "a", "seconds": 1.0, "ok": True}]}
FAILED_DOC = {
    "status": "failed",
    "steps": [{"name": "a", "seconds": 1.0, "ok": False, "message": "boom"}],
    "messages": ["FAILED a: boom"],
}


@pytest.mark.parametrize(
    ("doc", "exit_code", "timed_out", "status"),
    [
        (PASSED_DOC, "0", False, "passed"),
        (PASSED_DOC, "1", False, "failed"),  # the program's exit code has the last word
        (PASSED_DOC, None, False, "failed"),  # passed, but the guest never finished
        (FAILED_DOC, "1", False, "failed"),
        ({"status": "running", "steps": []}, None, True, "timeout"),
        (PASSED_DOC, "0", True, "timeout"),
        (None, None, False, "no-result"),
        ("{not json", "0", False, "no-result"),
    ],
)
def test_guest_status_from_what_it_left(
    tmp_path: Path, doc: object, exit_code: str | None, timed_out: bool, status: str
) -> None:
    """The verdict comes from results.json, the exit code and the time limit, never a guess."""
    results = tmp_path / "results"
    results.mkdir()
    if doc is not None:
        text = doc if isinstance(doc, str) else json.dumps(doc)
        (results / "results.json").write_text(text)
    if exit_code is not None:
        (results / "exit_code").write_text(exit_code + "\n")
    boot = BootFiles("v", tmp_path / "vmlinux", tmp_path / "initrd")
    guest = Guest(GuestNet(), tmp_path, boot)
    result = guest._collect(results, tmp_path / "serial.log", 1.0, timed_out, None)
    assert result.status == status
    assert result.passed == (status == "passed")
    if status != "passed":
        assert result.messages  # a failure always says something


def _kernel_tree(root: Path, images: list[str], with_modules: list[str]) -> tuple[Path, Path]:
    boot, modules = root / "boot", root / "lib" / "modules"
    boot.mkdir(parents=True)
    for version in images:
        (boot / f"vmlinuz-{version}").write_bytes(b"")
    for version in with_modules:
        (modules / version).mkdir(parents=True)
        (modules / version / "modules.dep").write_text("")
    return boot, modules


@pytest.mark.parametrize(
    ("images", "with_modules", "expected"),
    [
        ([], [], None),
        (["6.1.0-56-amd64"], [], None),  # an image without its modules cannot run the guest
        (["6.1.0-56-amd64"], ["6.1.0-56-amd64"], "6.1.0-56-amd64"),
        (
            ["6.1.0-9-amd64", "6.1.0-56-amd64"],
            ["6.1.0-9-amd64", "6.1.0-56-amd64"],
            "6.1.0-56-amd64",
        ),
        (["6.1.0-9-amd64", "6.1.0-56-amd64"], ["6.1.0-9-amd64"], "6.1.0-9-amd64"),
        (["6.12.9-amd64", "6.1.0-56-amd64"], ["6.12.9-amd64", "6.1.0-56-amd64"], "6.12.9-amd64"),
    ],
)
def test_find_kernel_picks_newest_with_modules(
    tmp_path: Path, images: list[str], with_modules: list[str], expected: str | None
) -> None:
    boot, modules = _kernel_tree(tmp_path, images, with_modules)
    found: Kernel | None = find_kernel(boot, modules)
    assert (found.version if found else None) == expected


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_namespace_dev_cluster_serves_a_one_replica_volume(tmp_path: Path) -> None:
    """The cluster the dev-cluster scenarios use, without a guest: reachable only inside the
    namespace, and a 1-replica volume (power-loss's) takes FUA writes through the VIP."""
    tool = writer.build(tmp_path)
    with GuestNet() as net, NetCluster(net, tmp_path / "cluster") as cluster:
        assert cluster.portal.startswith(f"{cluster.prefix}.0.100:")
        vol = cluster.create_volume("one-copy", 8 * MIB, 1, ["iqn.2025-01.io.lunastor.test:w"])
        url = f"iscsi://{cluster.portal}/{vol['target_iqn']}/{vol['lun']}"
        initiator = "iqn.2025-01.io.lunastor.test:w"
        # the export reaches the access point through its etcd watch, after the API answered:
        # log in once discovery shows the LUN (a login right away met "Target not found")
        listing = net.cmd(["iscsi-ls", "-s", "-i", initiator, f"iscsi://{cluster.portal}"])
        wait_until(
            lambda: (
                f"Lun:{vol['lun']} "
                in subprocess.run(listing, capture_output=True, text=True, timeout=20).stdout
            ),
            60,
            "discovery through the VIP to list the new LUN",
        )
        out, stop = tmp_path / "writer.out", tmp_path / "stop"
        argv = [str(tool), url, initiator, "8", str(MIB), str(stop)]
        with out.open("w") as stdout:
            proc = subprocess.Popen(net.cmd(argv), stdout=stdout, stderr=subprocess.PIPE)
        try:
            wait_until(
                lambda: proc.poll() is not None or writer.Journal.parse(out.read_text()).acks >= 16,
                120,
                "two rounds of acknowledged writes",
            )
        finally:
            stop.touch()
            _, err = proc.communicate(timeout=120)
        journal = writer.Journal.parse(out.read_text())
        assert proc.returncode == 0, err
        assert journal.failed == 0
        assert journal.acks >= 16
    assert not any(str(tmp_path) in line for line in Path("/proc/mounts").read_text().splitlines())
