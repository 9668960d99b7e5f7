"""A coroutine driven by hand from callbacks, without an asyncio Task.

The chunk server's hot paths answer from callbacks: the iSCSI server runs a command's first
step inline and resumes a replicated write from its `Completion`'s done callback
(access/iscsi_server.py), a member starts a Flush round in the data port's receive callback
and answers from the round's completion (replication/replicas.py). A Task per request would
cost its creation and a loop iteration per step. `Stepped` holds what a Task would hold for
such a coroutine (the future it waits on) and does what a Task does with it: take the future
over and resume the coroutine from its done callback.

Only for coroutines that need no Task of their own: no `asyncio.timeout`, TaskGroup,
`current_task` or shielding there (they need the running Task). A subclass says what to do
with the coroutine's result or exception, and may hand a coroutine that waits on anything
else to a Task from there on (`yielded`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Stepped(Generic[T]):
    """Start with `step()`; then `finished(result)` or `failed(exc, cancelled)` is called
    once, from `step` itself or from a done callback."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self.coro = coro
        # the future the coroutine last waited on through us (None: not yet, or handed on)
        self.waiting: asyncio.Future[Any] | None = None

    def step(self, thrown: BaseException | None = None) -> None:
        """Run the coroutine to its next yield (`thrown`: raised in it where it waits)."""
        try:
            waiting = self.coro.send(None) if thrown is None else self.coro.throw(thrown)
        except StopIteration as done:
            self.finished(done.value)
            return
        except (Exception, asyncio.CancelledError) as exc:
            self.failed(exc, thrown is not None)
            return
        self.yielded(waiting)

    def yielded(self, waiting: Any) -> None:
        """The coroutine waits on `waiting`: by default it is resumed once that is done, as a
        Task would (a bare yield, `asyncio.sleep(0)`: at the next loop iteration)."""
        if waiting is None:
            asyncio.get_running_loop().call_soon(self.step)
            return
        self.wait_on(waiting)

    def wait_on(self, waiting: asyncio.Future[Any]) -> None:
        waiting._asyncio_future_blocking = False  # taken over, as a Task does
        self.waiting = waiting
        waiting.add_done_callback(self.resume)

    def resume(self, _: object) -> None:
        self.step()

    def cancel(self) -> None:
        """End the coroutine here and now, as a Task's cancellation would: the future it
        waits on is cancelled and CancelledError raised where it waits (`failed` gets it,
        `cancelled` True, unless the coroutine ends or waits again)."""
        waiting = self.waiting
        if waiting is not None:
            waiting.remove_done_callback(self.resume)
            waiting.cancel()
        self.step(asyncio.CancelledError())

    def finished(self, result: T) -> None:
        raise NotImplementedError

    def failed(self, exc: BaseException, cancelled: bool) -> None:
        """`exc`: Exception or CancelledError; `cancelled`: it came out of `cancel`."""
        raise NotImplementedError
