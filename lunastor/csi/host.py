"""Running the node's tools (iscsiadm, mkfs, mount, blkid, resize2fs, xfs_growfs) as
subprocesses: one place that turns a failure into a CsiError naming the command."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from lunastor.common.logs import get_logger
from lunastor.csi.errors import CsiError

log = get_logger(component="csi-node")


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def error(self, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> CsiError:
        detail = (self.stderr or self.stdout).strip()[-400:]
        return CsiError(code, f"{' '.join(self.argv)}: exit {self.returncode}: {detail}")


async def run(argv: Sequence[str], timeout: float = 120, ok: Sequence[int] = (0,)) -> Result:
    """Run `argv`; a return code outside `ok` (or a missing tool, or the timeout) raises."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except OSError as exc:
        raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, f"{argv[0]}: {exc}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CsiError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"{' '.join(argv)}: no answer in {timeout:.0f}s"
        ) from None
    result = Result(
        tuple(argv),
        proc.returncode or 0,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
    )
    log.debug("ran", argv=" ".join(argv), rc=result.returncode)
    if result.returncode not in ok:
        raise result.error()
    return result
