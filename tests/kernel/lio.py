"""Scenario lio-export: a replicated volume exported through the guest kernel's LIO (TCMU).

Host side, all inside the guest's network namespace (192.168.77.1 on tap0): etcd, meta and
three `lunastor-chunk` servers (their userspace iSCSI portals on ports 3261-3263), and a
volume exported to the libiscsi initiator names. The guest (192.168.77.2) loads LIO and runs
`lunastor.chunk.access.lio.main` against them (guest/lio_export.py). When it asks ("lio-ready"), the
host checks, with libiscsi and qemu-img run in the namespace:

- INQUIRY through LIO answers with lunastor's identity (LIO passes it to the TCMU handler),
  READ CAPACITY(16) the volume's size;
- 8 MiB written through LIO read back identically through chunk1's userspace portal, and
  8 MiB written through chunk2's portal read back identically through LIO;
- throughput through LIO and through a userspace portal (qemu-img timings, and iscsi-bench
  when /work/shared/tools/iscsi-bench.c compiles);
- with `conformance="ALL"`: `iscsi-test-cu -d -v --test=ALL` against the LIO export, classified
  with cu-classify.sh (a separate, explicitly invoked run: it takes long under TCG).

    PYTHONPATH=. .venv/bin/python -m tests.kernel.lio [--conformance [TESTS]]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lunastor.common.config import to_toml_table
from tests.kernel.harness import BootFiles, Guest, GuestNet, boot_files, unavailable
from tests.kernel.initramfs import GUEST_DIR
from tests.kernel.scenarios import ScenarioResult

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
TOKEN = "lio-admin-token"
SECRET_KEY = "lio-test-sealing-key-0123"
CLUSTER_SECRET = "lio-test-cluster-secret-0123"
# libiscsi's own initiator names (iscsi-test-cu uses both), and iscsi-bench's
HOST_IQN = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test"
HOST_IQN_2 = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2"
BENCH_IQN = "iqn.2024-01.test.anchor:bench"
STRANGER_IQN = "iqn.2026-11.org.example:not-in-the-acl"
CHAP_USER = "lio-guest"
CHAP_SECRET = "lio-chap-secret-16"
CHUNKS = 3
GUEST_USERSPACE_PORT = 3261  # the guest export process's own userspace portal
PATTERN = 8 * MIB
CLASSIFY = Path("/work/shared/tools/cu-classify.sh")
BENCH_SOURCE = Path("/work/shared/tools/iscsi-bench.c")


class LioScenarioError(Exception):
    """The host side could not be set up or a host check failed."""


def _sh(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@dataclass
class LioCluster:
    net: GuestNet
    workdir: Path
    size: int = 64 * MIB
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    target: str = ""
    lun: int = 0
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def addr(self) -> str:
        return self.net.host_addr

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return _sh(self.net.cmd(list(argv)), timeout)

    def daemon(self, name: str, module: str, table: dict[str, Any]) -> None:
        config = self.workdir / f"{name}.toml"
        config.write_text(to_toml_table(table))
        env = dict(os.environ, PYTHONPATH=str(REPO))
        argv = [sys.executable, "-m", module, "--config", str(config)]
        self.procs[name] = self.net.popen(argv, self.workdir / f"{name}.log", env=env)

    def etcd_settings(self) -> dict[str, Any]:
        return {"endpoints": [f"{self.addr}:2379"], "namespace": "/lunastor"}

    def call(self, method: str, path: str, body: Any = None) -> Any:
        args = ["curl", "-s", "-m", "10", "-X", method, "-w", "\n%{http_code}"]
        args += ["-H", f"Authorization: Bearer {TOKEN}"]
        if body is not None:
            args += ["-H", "Content-Type: application/json", "--data", json.dumps(body)]
        out = self.run(*args, f"http://{self.addr}:8080{path}").stdout
        text, _, code = out.rpartition("\n")
        if not code.startswith("2"):
            raise LioScenarioError(f"{method} {path}: HTTP {code or '?'} {text[:300]}")
        return json.loads(text) if text.strip() else None

    def wait(self, what: str, timeout: float, check: Any) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-1500:]
                    raise LioScenarioError(f"{name} exited {proc.returncode}: {tail}")
            try:
                value = check()
            except LioScenarioError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise LioScenarioError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.2)

    def start(self) -> None:
        a = self.addr
        etcd = self.workdir / "etcd"
        argv = ["etcd", "--name", "lio", "--data-dir", str(etcd)]
        argv += ["--listen-client-urls", f"http://{a}:2379"]
        argv += ["--advertise-client-urls", f"http://{a}:2379"]
        argv += ["--listen-peer-urls", f"http://{a}:2380"]
        argv += ["--initial-advertise-peer-urls", f"http://{a}:2380"]
        argv += ["--initial-cluster", f"lio=http://{a}:2380"]
        self.procs["etcd"] = self.net.popen(argv, self.workdir / "etcd.log")
        self.wait(
            "etcd", 30, lambda: "true" in self.run("curl", "-s", f"http://{a}:2379/health").stdout
        )
        log = {"level": "info", "format": "kv"}
        self.daemon(
            "meta",
            "lunastor.meta.main",
            {
                "listen": f"{a}:8080",
                "portal": f"{a}:3261",
                "secret_key": SECRET_KEY,
                "auth": {"admin_tokens": [TOKEN]},
                "etcd": self.etcd_settings(),
                "log": log,
            },
        )
        for i in range(1, CHUNKS + 1):
            data = self.workdir / f"chunk{i}-data"
            data.mkdir()
            self.daemon(
                f"chunk{i}",
                "lunastor.chunk.main",
                {
                    "data_dirs": [str(data)],
                    "zone": f"zone{i}",
                    "iscsi_listen": f"{a}:{3260 + i}",
                    "data_listen": f"{a}:{3270 + i}",
                    "admin_listen": f"{a}:{9100 + i}",
                    "cluster_secret": CLUSTER_SECRET,
                    "secret_key": SECRET_KEY,
                    "etcd": self.etcd_settings(),
                    "log": log,
                },
            )

        def all_up() -> bool:
            items = self.call("GET", "/v1/chunks")["items"]
            return sum(i["state"] == "up" for i in items) == CHUNKS

        self.wait("every chunk server up", 90, all_up)
        vol = self.call("POST", "/v1/volumes", {"name": "lio", "size_bytes": self.size})
        for initiator in (HOST_IQN, HOST_IQN_2, BENCH_IQN):
            self.call("POST", f"/v1/volumes/{vol['id']}/exports", {"initiator": initiator})
        self.target, self.lun = vol["target_iqn"], vol["lun"]
        self.wait(
            "chunk1's portal to list the target",
            30,
            lambda: self.target in self.run("iscsi-ls", "-i", HOST_IQN, self.url(1)).stdout,
        )

    def url(self, chunk: int | None = None, lun: bool = False) -> str:
        """The LIO export (chunk None) or chunk N's userspace portal, as a libiscsi URL."""
        portal = self.net.guest_addr if chunk is None else f"{self.addr}:{3260 + chunk}"
        return f"iscsi://{portal}/{self.target}/{self.lun}" if lun else f"iscsi://{portal}"

    def image_opts(self, chunk: int | None = None) -> str:
        portal = f"{self.net.guest_addr}:3260" if chunk is None else f"{self.addr}:{3260 + chunk}"
        return (
            f"driver=iscsi,transport=tcp,portal={portal},target={self.target},"
            f"lun={self.lun},initiator-name={HOST_IQN}"
        )

    def stop(self) -> list[str]:
        """SIGTERM every daemon (each must exit 0), etcd last."""
        problems = []
        for name in sorted(self.procs, key=lambda n: n == "etcd"):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
                    problems.append(f"{name} did not stop within 20s of SIGTERM")
                    continue
            if name != "etcd" and proc.returncode != 0:
                problems.append(f"{name} exited {proc.returncode} (see {name}.log)")
        return problems

    # -- the checks the guest asks for ---------------------------------------------------

    def _write(self, source: Path, chunk: int | None) -> float:
        started = time.monotonic()
        proc = self.run(
            "qemu-img", "convert", "-n", "-f", "raw", str(source),
            "--target-image-opts", self.image_opts(chunk), timeout=600,
        )  # fmt: skip
        if proc.returncode != 0:
            raise LioScenarioError(f"qemu-img write via {self._where(chunk)}: {proc.stderr[-500:]}")
        return time.monotonic() - started

    def _read(self, out: Path, chunk: int | None) -> float:
        out.unlink(missing_ok=True)
        started = time.monotonic()
        proc = self.run(
            "qemu-img", "dd", "--image-opts", f"if={self.image_opts(chunk)}", f"of={out}",
            "bs=1M", f"count={PATTERN // MIB}", timeout=600,
        )  # fmt: skip
        if proc.returncode != 0:
            raise LioScenarioError(f"qemu-img read via {self._where(chunk)}: {proc.stderr[-500:]}")
        return time.monotonic() - started

    @staticmethod
    def _where(chunk: int | None) -> str:
        return "LIO" if chunk is None else f"chunk{chunk}'s userspace portal"

    def cross_check(self) -> None:
        """Data written through one access point reads back through the other, both ways."""
        m = self.measured
        for label, writer, reader in (("lio-to-userspace", None, 1), ("userspace-to-lio", 2, None)):
            pattern = self.workdir / f"{label}.pattern"
            pattern.write_bytes(os.urandom(PATTERN))
            back = self.workdir / f"{label}.back"
            write_s = self._write(pattern, writer)
            read_s = self._read(back, reader)
            if back.read_bytes() != pattern.read_bytes():
                raise LioScenarioError(
                    f"{label}: {PATTERN // MIB} MiB written via {self._where(writer)} read back "
                    f"differently via {self._where(reader)}"
                )
            m[f"{label} write MiB/s ({self._where(writer)})"] = round(PATTERN / MIB / write_s, 2)
            m[f"{label} read MiB/s ({self._where(reader)})"] = round(PATTERN / MIB / read_s, 2)
            pattern.unlink()
            back.unlink()

    def identity(self) -> None:
        url = self.url(lun=True)
        inq = self.run("iscsi-inq", "-i", HOST_IQN, url)
        if inq.returncode != 0 or "LUNASTOR" not in inq.stdout:
            raise LioScenarioError(f"iscsi-inq via LIO: rc {inq.returncode} {inq.stdout[-400:]}")
        cap = self.run("iscsi-readcapacity16", "-i", HOST_IQN, url)
        if cap.returncode != 0 or str(self.size) not in cap.stdout:
            raise LioScenarioError(f"READ CAPACITY(16) via LIO: {cap.stdout[-400:]}")
        self.measured["inquiry"] = inq.stdout.strip().splitlines()[:6]
        stranger = self.run("iscsi-inq", "-i", STRANGER_IQN, url)
        if stranger.returncode == 0:
            raise LioScenarioError("an initiator outside the LUN's ACL logged in through LIO")

    def chap(self) -> None:
        """CHAP set on the target through meta reaches LIO: without it login fails, with it
        login works; cleared again, login without CHAP works again."""
        started = time.monotonic()
        url = self.url(lun=True)
        with_chap = url.replace("iscsi://", f"iscsi://{CHAP_USER}%{CHAP_SECRET}@")

        def inq(u: str) -> bool:
            return self.run("iscsi-inq", "-i", HOST_IQN, u).returncode == 0

        path = f"/v1/targets/{self.target}/chap"
        self.call("PUT", path, {"user": CHAP_USER, "secret": CHAP_SECRET})
        self.wait("LIO to require CHAP", 60, lambda: not inq(url))
        if not inq(with_chap):
            raise LioScenarioError("login through LIO with the target's CHAP secret failed")
        self.call("DELETE", path)
        self.wait("LIO to drop CHAP", 60, lambda: inq(url))
        self.measured["chap on, checked, off (s)"] = round(time.monotonic() - started, 1)

    def bench(self, seconds: float) -> None:
        """iscsi-bench (libiscsi, async) through LIO and through a userspace portal."""
        binary = self.workdir / "iscsi-bench"
        if not binary.exists():
            gcc = _sh(["gcc", "-O2", "-o", str(binary), str(BENCH_SOURCE), "-liscsi"])
            if gcc.returncode != 0:
                self.measured["bench"] = f"iscsi-bench not built: {gcc.stderr[-200:]}"
                return
        guest_userspace = f"iscsi://{self.net.guest_addr}:{GUEST_USERSPACE_PORT}"
        guest_userspace += f"/{self.target}/{self.lun}"
        for where, url in (
            ("guest LIO", self.url(lun=True)),
            ("guest userspace", guest_userspace),
            ("host chunk1 userspace", self.url(1, lun=True)),
        ):
            for mode, bs, qd in (("w", 256 * 1024, 8), ("r", 256 * 1024, 8), ("w", 4096, 1)):
                proc = self.run(
                    str(binary), url, mode, "seq", str(bs), str(qd), str(seconds),
                    timeout=seconds + 120,
                )  # fmt: skip
                what = "write" if mode == "w" else "read"
                key = f"bench {where} seq {what} {bs // 1024}k qd{qd}"
                self.measured[key] = (proc.stdout + proc.stderr).strip().splitlines()[:1]

    def conformance(self, tests: str) -> None:
        log = self.workdir / "cu-lio.log"
        started = time.monotonic()
        with open(log, "w") as out:
            proc = subprocess.run(
                self.net.cmd(
                    ["iscsi-test-cu", "-d", "-v", f"--test={tests}", self.url(lun=True)],
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=6 * 3600,
            )
        self.measured["conformance seconds"] = round(time.monotonic() - started)
        self.measured["conformance exit"] = proc.returncode
        classified = _sh(["bash", str(CLASSIFY), str(log)]).stdout
        (self.workdir / "cu-lio.classified").write_text(classified)
        counts = Counter(line.split()[0] for line in classified.splitlines() if line.strip())
        self.measured["conformance"] = dict(counts)
        self.measured["conformance failed"] = [
            line.split()[1] for line in classified.splitlines() if line.startswith("FAILED")
        ]

    def lio_ready(self, conformance: str | None, bench_seconds: float) -> str:
        started = time.monotonic()
        self.identity()
        self.cross_check()
        if bench_seconds > 0:
            self.bench(bench_seconds)
        if conformance:
            self.conformance(conformance)
        self.chap()
        self.measured["host checks seconds"] = round(time.monotonic() - started, 1)
        (self.workdir / "lio-host.json").write_text(json.dumps(self.measured, indent=1))
        return json.dumps(self.measured)


def guest_config(cluster: LioCluster) -> str:
    return to_toml_table(
        {
            "data_dirs": ["/tmp/lio-export"],
            "lio_listen": f"{cluster.net.guest_addr}:3260",
            "cluster_secret": CLUSTER_SECRET,
            "secret_key": SECRET_KEY,
            "io_timeout": 60.0,
            # a TCG guest is slow: gRPC's handshake alone can take seconds
            "etcd": {**cluster.etcd_settings(), "timeout": 30.0},
            "log": {"level": "info", "format": "kv"},
        }
    )


def scenario_name(conformance: str | None) -> str:
    if conformance is None:
        return "lio-export"
    if conformance == "ALL":
        return "lio-export-conformance"
    return "lio-export-cu-" + "".join(c if c.isalnum() else "-" for c in conformance)


def run_lio(
    boot: BootFiles,
    workdir: Path,
    *,
    conformance: str | None = None,
    bench_seconds: float = 5.0,
    timeout: float = 600,
) -> ScenarioResult:
    """The lio-export scenario: one boot, everything torn down before returning.

    `conformance`: an iscsi-test-cu --test spec ("ALL", "ALL.ProutRegister", ...) to run
    against the LIO export, or None."""
    name = scenario_name(conformance)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    host_steps: dict[str, float] = {}
    problems: list[str] = []
    guest_result = None
    with GuestNet() as net:
        cluster = LioCluster(net, workdir)
        started = time.monotonic()
        try:
            cluster.start()
            host_steps["cluster-start"] = time.monotonic() - started
            params = {
                "iqn": cluster.target,
                "config": guest_config(cluster),
                "python": sys.executable,
                "repo": str(REPO),
                # the same process also serves its userspace target: same guest, same data
                # path, the other front end (for the throughput comparison)
                "userspace_portal": f"{net.guest_addr}:{GUEST_USERSPACE_PORT}",
                "start_timeout": 180,
                "host_timeout": timeout,
            }
            guest = Guest(net, workdir, boot)
            actions = {"lio-ready": lambda _arg: cluster.lio_ready(conformance, bench_seconds)}
            guest_result = guest.run(GUEST_DIR / "lio_export.py", params, timeout, actions)
            host_steps["guest"] = guest_result.wall_seconds
        except LioScenarioError as exc:
            problems.append(str(exc))
        finally:
            problems += cluster.stop()
        if guest_result is not None and not guest_result.passed:
            problems += [f"guest {guest_result.status}", *guest_result.messages]
    passed = guest_result is not None and guest_result.passed and not problems
    return ScenarioResult(name, passed, guest_result, host_steps, problems, workdir)


# what `python -m tests.kernel` can run beside SCENARIOS: name -> runner(boot, workdir)
LIO_SCENARIOS = {
    "lio-export": lambda boot, workdir: run_lio(boot, workdir, bench_seconds=3),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.kernel.lio", description=__doc__)
    ap.add_argument("--build-dir", type=Path, default=Path("build/kernel-guest"))
    ap.add_argument(
        "--conformance",
        nargs="?",
        const="ALL",
        metavar="TESTS",
        help="also run iscsi-test-cu --test=TESTS (default ALL)",
    )
    ap.add_argument("--bench-seconds", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=600, help="the guest's time limit")
    args = ap.parse_args(argv)
    reason = unavailable()
    if reason is not None:
        print(f"SKIP lio-export: {reason}")
        return 77
    boot = boot_files(args.build_dir)
    name = scenario_name(args.conformance)
    result = run_lio(
        boot,
        args.build_dir / "runs" / name,
        conformance=args.conformance,
        bench_seconds=args.bench_seconds,
        timeout=args.timeout,
    )
    print(result.line())
    if result.guest is not None:
        print(json.dumps(result.guest.data.get("host", ""))[:3000])
    if not result.passed:
        print(f"  run directory: {result.workdir}")
        if result.guest is not None:
            print(result.guest.serial_tail())
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
