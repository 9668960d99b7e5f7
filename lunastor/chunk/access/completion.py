"""The future a replicated write's command awaits at the access point, resumed without a Task.

It lives here, not beside the block-device interface in `lunastor/iscsi/blockdev.py`, because
that package is sans-IO (no asyncio: tests/unit/test_layout.py); the iSCSI server that drives
the commands is this package's.
"""

from __future__ import annotations

import asyncio


class Completion(asyncio.Future[None]):
    """A future a device's command coroutine may await (and so yield to whoever drives it)
    with a promise: once it is done, the coroutine runs to its end, or to its next yield,
    without needing an asyncio Task (no `asyncio.timeout`, TaskGroup or `current_task`
    there). The iSCSI server then resumes the command from the future's done callback
    instead of running it in a Task (iscsi_server.py); any other driver treats
    it as a plain future. A replicated write waiting for its secondaries' answers is one
    (volume.py, `ReplicatedVolume.write`)."""

    __slots__ = ()
