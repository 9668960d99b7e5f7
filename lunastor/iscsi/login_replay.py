"""A login run again from the start once the host's view caught up with its source.

A host that follows its targets and ACLs from a store (etcd) sees a change some time after it
committed; whoever made the change (an export through meta) may log in in between. Such a
login must not be refused on the view of before: the host holds the refusal, catches up, and
runs the login again on a fresh `TargetConnection` fed the same bytes. That is only sound
while nothing was answered: the login's first request names the target, so its first answer
is the one that refuses. Sans-IO: the host does the waiting and the sockets.
"""

from __future__ import annotations

from lunastor.iscsi.connection import Buffer, TargetConnection
from lunastor.iscsi.errors import LoginStatus

# What a view that lags answers wrongly; anything else is not about what the view holds.
STALE_REFUSALS = frozenset({LoginStatus.NOT_FOUND, LoginStatus.AUTHORIZATION_FAILURE})


class LoginReplay:
    """What the initiator sent until the first answer (the host drops it once answered)."""

    __slots__ = ("_sent",)

    def __init__(self) -> None:
        self._sent = bytearray()

    def received(self, data: Buffer) -> None:
        self._sent += data

    def refused(self, conn: TargetConnection) -> bytes | None:
        """The bytes to run the login again on when `conn`'s first answer, queued and not
        sent, refuses it as not found or not authorised (the answer is dropped); else None."""
        if conn.login_failure not in STALE_REFUSALS:
            return None
        conn.data_to_send()  # the refusal: decided again after the catch-up
        return bytes(self._sent)
