"""Deciding again once a view caught up with its source: the asyncio side, for every host.

A host that follows its source (etcd) some time behind must not refuse on the view of before
what was committed just before (a volume exported through meta, and logged in to at once). It
holds such a refusal, waits for `catch_up` (the view holds all that the source holds now) and
decides again. The chunk server's iSCSI server and the redirector's portal both do so for a
login refused as not found or not authorised (the sans-IO part, what to run again, is
`lunastor/iscsi/login_replay.py`'s `LoginReplay`), the chunk server also for a command to a
LUN the session does not see.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

CatchUp = Callable[[], Awaitable[None]]


async def caught_up(catch_up: CatchUp, refused: str) -> None:
    """Wait for `catch_up` before deciding again on what was `refused`; if it fails, the
    host decides on what it has (the refusal, most likely)."""
    try:
        # a task of its own: the caller may run outside any task (a command's first step,
        # driven without a Task: lunastor/chunk/stepped.py), where asyncio.timeout cannot work
        await asyncio.ensure_future(catch_up())
    except Exception as exc:
        log.warning("%s; the view could not catch up with its source: %r", refused, exc)


def login_again(
    transport: asyncio.Transport,
    catch_up: CatchUp,
    closing: Callable[[], bool],
    again: Callable[[bytes], None],
    sent: bytes,
) -> asyncio.Task[None]:
    """A login's refusal is held (`LoginReplay.refused`, `sent`: the login's bytes): read
    nothing more from `transport` until the view caught up, then, unless the connection
    closed meanwhile, read again and `again(sent)` (a fresh connection state fed the same
    bytes). The caller keeps the Task."""
    transport.pause_reading()
    loop = asyncio.get_running_loop()
    return loop.create_task(_again(transport, catch_up, closing, again, sent))


async def _again(
    transport: asyncio.Transport,
    catch_up: CatchUp,
    closing: Callable[[], bool],
    again: Callable[[bytes], None],
    sent: bytes,
) -> None:
    await caught_up(catch_up, "login refused")
    if closing() or transport.is_closing():
        return
    transport.resume_reading()
    again(sent)
