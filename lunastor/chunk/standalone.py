"""`lunastor-chunk standalone`: one iSCSI target over one local file, no cluster.

    python -m lunastor.chunk.standalone --file PATH --iqn IQN --listen HOST:PORT
        [--lun N] [--allow INITIATOR_IQN ...] [--chap USER:SECRET]
        [--mutual-chap USER:SECRET] [--read-only] [--removable] [--size BYTES]

With no --allow every initiator is admitted. --chap makes initiators authenticate (the same
credentials for discovery and login); --mutual-chap is what the target answers when an
initiator asks it to authenticate itself. SIGTERM/SIGINT shut it down cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from lunastor.chunk.access.iscsi_server import IscsiServer, ServerConfig
from lunastor.iscsi.chap import ChapCredentials
from lunastor.iscsi.scsi.target import LogicalUnit, ScsiTarget
from lunastor.iscsi.scsi.types import Nexus
from lunastor.iscsi.session import TargetInfo

log = logging.getLogger("lunastor.chunk.standalone")


class UsageError(Exception):
    """A bad argument or an environment problem, reported as one line."""


@dataclass(slots=True)
class StandaloneHost:
    """The `TargetHost` of a single static target."""

    iqn: str
    target: ScsiTarget
    allow: frozenset[str] | None  # None: everybody
    chap_secrets: ChapCredentials | None
    tpgt: int = 1
    server: IscsiServer | None = None

    def abort_tasks(self, nexus: Nexus, lun: int) -> None:
        """PREEMPT AND ABORT, from the SCSI layer: the session layer aborts the tasks."""
        if self.server is not None:
            self.server.abort_nexus_tasks(nexus, lun)

    def target_exists(self, target: str) -> bool:
        return target == self.iqn

    def may_login(self, initiator: str, target: str) -> bool:
        return target == self.iqn and (self.allow is None or initiator in self.allow)

    def chap(self, target: str | None) -> ChapCredentials | None:
        return self.chap_secrets

    def discoverable(self, initiator: str, portal: str) -> Sequence[TargetInfo]:
        if not self.may_login(initiator, self.iqn):
            return []
        return [TargetInfo(self.iqn, (f"{portal},{self.tpgt}",) if portal else ())]

    def redirect(self, initiator: str, target: str) -> str | None:
        return None

    def scsi_target(self, name: str) -> ScsiTarget | None:
        return self.target if name == self.iqn else None


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {value!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _user_secret(option: str, value: str | None) -> tuple[str, bytes] | None:
    if value is None:
        return None
    user, sep, secret = value.partition(":")
    if not sep or not user or not secret:
        raise UsageError(f"{option}: expected USER:SECRET")
    return user, secret.encode()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lunastor-chunk standalone",
        description="Serve one local file as an iSCSI LUN.",
    )
    ap.add_argument("--file", required=True, help="backing file (sparse)")
    ap.add_argument("--iqn", required=True, help="target name")
    ap.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    ap.add_argument("--lun", type=int, default=0, help="LUN number (default 0)")
    ap.add_argument("--allow", nargs="+", action="extend", metavar="INITIATOR_IQN")
    ap.add_argument("--chap", metavar="USER:SECRET", help="initiators must authenticate")
    ap.add_argument("--mutual-chap", metavar="USER:SECRET", help="the target's own CHAP")
    ap.add_argument("--read-only", action="store_true")
    ap.add_argument("--removable", action="store_true")
    ap.add_argument("--size", type=int, metavar="BYTES", help="create/extend the file")
    ap.add_argument("--log-level", default="WARNING")
    return ap


def _identity(iqn: str, lun: int) -> tuple[int, str]:
    """A stable NAA 6 identifier and serial number for (target, LUN)."""
    digest = hashlib.sha256(f"{iqn}/{lun}".encode()).digest()
    naa = (0x6 << 124) | (int.from_bytes(digest[:16], "big") >> 4)
    return naa, digest[:8].hex()


def build(args: argparse.Namespace) -> tuple[StandaloneHost, ServerConfig, object]:
    from lunastor.chunk.access.filedev import FileBlockDevice

    if not args.iqn.startswith(("iqn.", "eui.", "naa.")):
        raise UsageError(f"--iqn {args.iqn!r}: not an iSCSI name (iqn./eui./naa.)")
    if not 0 <= args.lun <= 16383:
        raise UsageError(f"--lun {args.lun}: must be 0..16383")
    if args.size is not None and args.size <= 0:
        raise UsageError("--size must be positive")
    chap = _user_secret("--chap", args.chap)
    mutual = _user_secret("--mutual-chap", args.mutual_chap)
    if mutual is not None and chap is None:
        raise UsageError("--mutual-chap needs --chap")
    listen = _host_port(args.listen)
    if args.read_only and args.size is not None:
        raise UsageError("--size cannot create or extend a --read-only file")
    if args.size is None and not os.path.exists(args.file):
        raise UsageError(f"--file {args.file}: no such file (give --size to create it)")
    try:
        device = FileBlockDevice(args.file, size=args.size, read_only=args.read_only)
    except OSError as exc:
        raise UsageError(f"--file {args.file}: {exc.strerror}") from None
    if device.num_blocks == 0:
        raise UsageError(f"--file {args.file}: empty (give --size)")
    naa, serial = _identity(args.iqn, args.lun)
    lu = LogicalUnit(device, naa_id=naa, serial=serial, removable=args.removable)
    holder: list[StandaloneHost] = []
    target = ScsiTarget(
        args.iqn,
        {args.lun: lu},
        abort_tasks=lambda nexus, lun: holder[0].abort_tasks(nexus, lun),
        spawn=asyncio.ensure_future,
    )
    secrets = None
    if chap is not None:
        secrets = ChapCredentials(
            chap[0],
            chap[1],
            mutual[0] if mutual else None,
            mutual[1] if mutual else None,
        )
    host = StandaloneHost(
        iqn=args.iqn,
        target=target,
        allow=frozenset(args.allow) if args.allow else None,
        chap_secrets=secrets,
    )
    holder.append(host)
    return host, ServerConfig(listen=[listen]), device


async def serve(host: StandaloneHost, config: ServerConfig) -> None:
    server = host.server = IscsiServer(host, config)
    try:
        await server.start()
    except OSError as exc:
        addr = "{}:{}".format(*config.listen[0])
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"--listen {addr}: address already in use") from None
        raise UsageError(f"--listen {addr}: {exc.strerror or exc}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = ", ".join(f"{h}:{p}" for h, p in server.addresses)
    log.warning("serving %s on %s", host.iqn, bound)
    try:
        await stop.wait()
    finally:
        await server.close()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        host, config, device = build(args)
    except UsageError as exc:
        print(f"lunastor-chunk standalone: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.run(serve(host, config))
    except UsageError as exc:
        print(f"lunastor-chunk standalone: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        close = getattr(device, "close", None)
        if close is not None:
            with contextlib.suppress(OSError):
                close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
