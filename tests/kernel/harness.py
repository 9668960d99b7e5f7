"""Boot a stock Debian kernel under QEMU (TCG) in a network namespace the test creates.

    boot = boot_files(Path("build/kernel-guest"))  # vmlinux + initramfs, cached
    with GuestNet() as net:                         # namespace + tap0, 192.168.77.1 <-> .2
        target = net.popen([...], log=...)          # the target under test, inside the namespace
        result = Guest(net, workdir, boot).run(GUEST_DIR / "iscsi_basic.py", {...}, timeout=240)
        result.status, result.steps, result.data    # "passed", [Step(name, seconds, ok, ...)]

The guest's root filesystem is the host's, shared read-only over virtio-9p with a tmpfs overlay
(so the guest runs the host's own open-iscsi, fio, python3 and kernel modules); a second 9p
share, the run's `results/` directory, is writable and carries `params.json` in and
`results.json` (per-step timings, pass/fail, messages) out. The serial console goes to
`serial.log`. QEMU is killed when the time limit passes or the test ends; the namespace and
everything still running in it go away when the `GuestNet` closes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.kernel.initramfs import GUEST_DIR, find_kernel, initramfs, vmlinux

QEMU = "qemu-system-x86_64"
# a minimal firmware that jumps straight to the kernel's PVH entry point (SeaBIOS takes seconds)
QBOOT = Path("/usr/share/qemu/qboot.rom")
GUEST_INIT = GUEST_DIR / "init.sh"
_counter = itertools.count()


def unavailable() -> str | None:
    """Why guests cannot boot here, or None. Only a missing QEMU or kernel is a reason."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not installed (scripts/setup.sh installs qemu-system-x86)"
    if find_kernel() is None:
        return "no kernel with modules in /boot (scripts/setup.sh installs linux-image-amd64)"
    return None


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM its process group, then SIGKILL if it has not exited within `grace` seconds.

    The group, because QEMU may run under /usr/bin/time, which outlives a SIGTERM of its own
    only to leave QEMU behind.
    """

    def signal_group(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    if proc.poll() is None:
        signal_group(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            signal_group(signal.SIGKILL)
            proc.wait(10)
    signal_group(signal.SIGKILL)  # anything of the group that is left
    # QEMU may outlive /usr/bin/time (the Popen's own process) by the time its SIGKILL takes
    # to tear 512 MiB and its threads down, which a loaded machine stretches: wait for that,
    # so that the namespace is empty when we return (a kernel run met QEMU still listed).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@dataclass
class GuestNet:
    """A network namespace holding tap0 (host_addr); the guest's eth0 gets guest_addr.

    The /24 exists only inside this namespace: nothing is routed to or from it.
    """

    subnet: str = "192.168.77"
    name: str = field(default_factory=lambda: f"lskg{os.getpid() % 100000}x{next(_counter)}")
    tap: str = "tap0"

    @property
    def host_addr(self) -> str:
        return f"{self.subnet}.1"

    @property
    def guest_addr(self) -> str:
        return f"{self.subnet}.2"

    def __enter__(self) -> GuestNet:
        _run("ip", "netns", "add", self.name)
        try:
            _run("ip", "-n", self.name, "link", "set", "lo", "up")
            _run("ip", "-n", self.name, "tuntap", "add", "dev", self.tap, "mode", "tap")
            _run("ip", "-n", self.name, "addr", "add", f"{self.host_addr}/24", "dev", self.tap)
            _run("ip", "-n", self.name, "link", "set", self.tap, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cmd(self, argv: Sequence[str]) -> list[str]:
        """A command line that runs `argv` inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(
        self,
        argv: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
        append: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` in the namespace with stdout and stderr going to `log`."""
        with open(log, "ab" if append else "wb") as out:
            # `ip netns exec` execs the command, so the Popen's pid is the command's own
            return subprocess.Popen(
                self.cmd(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def close(self) -> None:
        for pid in _run("ip", "netns", "pids", self.name, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _run("ip", "netns", "del", self.name, check=False)


@dataclass
class Step:
    name: str
    seconds: float
    ok: bool
    message: str = ""
    part: str = ""  # the scenario it belongs to, when one boot carries several


@dataclass
class GuestResult:
    """What one boot produced: the guest's own results.json plus what the host saw."""

    status: str  # passed | failed | timeout | no-result
    steps: list[Step]
    messages: list[str]
    data: dict[str, Any]
    boot_seconds: float | None  # guest uptime when the scenario started
    wall_seconds: float  # QEMU start to exit, as the host measured it
    max_rss_kb: int | None  # QEMU's peak resident memory
    exit_code: int | None  # the scenario program's, None if it never finished
    serial_log: Path
    results_dir: Path

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def summary(self) -> str:
        """Step timings on one line: `iscsid 0.4s, discovery 1.2s, ...`."""
        return ", ".join(
            f"{s.name} {s.seconds:.1f}s{'' if s.ok else ' FAILED'}" for s in self.steps
        )

    def serial_tail(self, lines: int = 40) -> str:
        try:
            text = self.serial_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


Action = Callable[[str], str]  # the guest's argument -> the answer


def _serve_requests(results: Path, actions: Mapping[str, Action]) -> None:
    """Carry out the guest's new requests, each once, and write the replies."""
    for request in sorted((results / "requests").iterdir()):
        name = request.name
        reply = results / "replies" / name
        if name.endswith(".tmp") or reply.exists():
            continue
        action = actions.get(name)
        try:
            argument = request.read_text()
            answer = action(argument) if action else f"error: no host action {name!r}"
        except Exception as exc:  # reported to the guest, whose step then fails
            answer = f"error: {type(exc).__name__}: {exc}"
        partial = reply.with_name(f"{name}.tmp")
        partial.write_text(answer)
        partial.replace(reply)


def _parse_time_v(path: Path) -> int | None:
    """Peak RSS from GNU time -v output, if it was written."""
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            if "Maximum resident set size" in line:
                return int(line.rsplit(":", 1)[1])
    return None


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


@dataclass(frozen=True)
class BootFiles:
    version: str
    kernel: Path  # an uncompressed vmlinux (PVH) or a bzImage
    initrd: Path


def boot_files(build_dir: Path) -> BootFiles:
    """The host's kernel and the harness's initramfs, built into `build_dir` when missing."""
    kernel = find_kernel()
    if kernel is None:
        raise RuntimeError(unavailable() or "no kernel")
    return BootFiles(kernel.version, vmlinux(kernel, build_dir), initramfs(kernel, build_dir))


@dataclass
class Guest:
    """One QEMU guest: stock kernel, host root over 9p, results share, optional extra disk."""

    net: GuestNet
    workdir: Path
    boot: BootFiles
    memory_mb: int = 512
    # extra raw images, seen by the guest as /dev/vda, /dev/vdb, ... in this order; cache=none:
    # what the guest had not flushed is lost when QEMU is killed (power_cut)
    disks: Sequence[Path] = ()
    _qemu: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def power_cut(self) -> None:
        """SIGKILL QEMU (its process group: /usr/bin/time and QEMU) while it runs: the guest's
        page cache and everything not yet written to the virtio disk are lost, as in a power
        loss. Meant for a host action; `run` then collects what the guest left."""
        if self._qemu is not None and self._qemu.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._qemu.pid, signal.SIGKILL)
            self._qemu.wait(10)

    def command(self, script: Path, results: Path, serial: Path) -> list[str]:
        append = " ".join(
            [
                "console=ttyS0",
                "panic=-1",  # a dead PID 1 reboots, which -no-reboot turns into QEMU exiting
                "quiet" if os.environ.get("LUNASTOR_GUEST_VERBOSE") is None else "",
                f"lunastor.init={GUEST_INIT}",
                f"lunastor.addr={self.net.guest_addr}/24",
                f"lunastor.run={script.resolve()}",
            ]
        )
        argv = [
            QEMU,
            "-accel",
            "tcg,tb-size=128",
            "-cpu",
            "max",
            "-smp",
            "1",  # the machine's two cores are shared with other work
            "-m",
            str(self.memory_mb),
            "-nographic",
            "-no-reboot",
            "-monitor",
            "none",
            "-serial",
            f"file:{serial}",
            "-nodefaults",
            "-kernel",
            str(self.boot.kernel),
            "-initrd",
            str(self.boot.initrd),
            "-append",
            append,
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs",
            f"local,path={results},mount_tag=results,security_model=none,multidevs=remap",
            "-netdev",
            f"tap,id=n0,ifname={self.net.tap},script=no,downscript=no",
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",  # no iPXE: we boot with -kernel
        ]
        if QBOOT.is_file() and _is_elf(self.boot.kernel):
            argv += ["-bios", str(QBOOT)]
        for disk in self.disks:
            argv += ["-drive", f"file={disk},if=virtio,format=raw,cache=none,aio=threads"]
        return argv

    def run(
        self,
        script: Path,
        params: dict[str, Any],
        timeout: float,
        actions: Mapping[str, Action] | None = None,
    ) -> GuestResult:
        """Boot, run `script` in the guest with `params`, and collect what it left.

        `actions` are what the guest may ask the host to do mid-scenario (`Run.ask_host` in
        guest/steps.py): the guest drops `results/requests/NAME`, the host calls
        `actions[NAME](argument)` (what the guest wrote in the request) and answers in
        `results/replies/NAME` with its return value, or with "error: ..." if it raised or is
        unknown. An action may end the guest (`power_cut`): QEMU is then gone when it returns.
        """
        results = self.workdir / "results"
        if results.exists():
            shutil.rmtree(results)
        (results / "requests").mkdir(parents=True)
        (results / "replies").mkdir()
        (results / "params.json").write_text(json.dumps(params, indent=1))
        serial = self.workdir / "serial.log"
        timing = self.workdir / "qemu.time"
        argv = ["/usr/bin/time", "-v", "-o", str(timing)] if Path("/usr/bin/time").exists() else []
        argv += self.command(script, results, serial)
        started = time.monotonic()
        deadline = started + timeout
        qemu = self.net.popen(argv, log=self.workdir / "qemu.out")
        self._qemu = qemu
        timed_out = False
        try:
            while True:
                try:
                    qemu.wait(max(0.0, min(0.1, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        timed_out = True
                        break
                    _serve_requests(results, actions or {})
        finally:
            _stop(qemu, grace=2)
            self._qemu = None
        wall = time.monotonic() - started
        return self._collect(results, serial, wall, timed_out, _parse_time_v(timing))

    def _collect(
        self, results: Path, serial: Path, wall: float, timed_out: bool, rss: int | None
    ) -> GuestResult:
        doc: dict[str, Any] = {}
        messages: list[str] = []
        with contextlib.suppress(FileNotFoundError):
            try:
                doc = json.loads((results / "results.json").read_text())
            except ValueError as exc:
                messages.append(f"results.json unreadable: {exc}")
        exit_code = None
        with contextlib.suppress(FileNotFoundError, ValueError):
            exit_code = int((results / "exit_code").read_text())
        steps = [Step(**s) for s in doc.get("steps", [])]
        messages += doc.get("messages", [])
        if timed_out:
            status = "timeout"
            messages.append(f"guest did not finish within {wall:.0f}s; QEMU killed")
        elif not doc:
            status = "no-result"
            messages.append("the guest wrote no results.json (see serial.log)")
            with contextlib.suppress(OSError):
                qemu_out = (self.workdir / "qemu.out").read_text(errors="replace").strip()
                if qemu_out:
                    messages.append(f"QEMU said: {qemu_out[-1000:]}")
        elif exit_code == 0 and doc.get("status") == "passed":
            status = "passed"
        else:
            status = "failed"
            if exit_code is None:
                messages.append("the scenario program never finished (see serial.log)")
            elif exit_code != 0:
                messages.append(f"the scenario program exited {exit_code}")
        return GuestResult(
            status=status,
            steps=steps,
            messages=messages,
            data=doc.get("data", {}),
            boot_seconds=doc.get("boot_seconds"),
            wall_seconds=wall,
            max_rss_kb=rss,
            exit_code=exit_code,
            serial_log=serial,
            results_dir=results,
        )
