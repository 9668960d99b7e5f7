"""`Stepped`: a coroutine driven from callbacks, without a Task, ends as a Task would end it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from lunastor.chunk.stepped import Stepped


class Outcome(Stepped[Any]):
    """What the coroutine ended with, and whether it ran in a Task when it ended."""

    __slots__ = ("ended", "ends", "exc", "result")

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        super().__init__(coro)
        self.ended = asyncio.get_running_loop().create_future()
        self.result: Any = None
        self.exc: BaseException | None = None
        self.ends = 0

    def finished(self, result: Any) -> None:
        self.ends += 1
        self.result = result
        self.ended.set_result("finished")

    def failed(self, exc: BaseException, cancelled: bool) -> None:
        self.ends += 1
        if self.ends == 1:
            self.exc = exc
            self.ended.set_result("cancelled" if cancelled else "failed")


async def test_a_coroutine_that_never_waits_ends_within_step() -> None:
    async def at_once() -> int:
        return 7

    run = Outcome(at_once())
    run.step()
    assert run.ended.done() and run.result == 7


async def test_awaits_on_futures_resolved_later_resume_it_from_their_callbacks() -> None:
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    tasks: list[asyncio.Task[Any] | None] = []

    async def two_waits() -> int:
        a = await first
        tasks.append(asyncio.current_task())
        b = await second
        tasks.append(asyncio.current_task())
        return a + b

    run = Outcome(two_waits())
    run.step()
    assert not run.ended.done() and run.waiting is first
    loop.call_later(0.01, first.set_result, 1)
    await asyncio.sleep(0.02)
    assert not run.ended.done() and run.waiting is second
    second.set_result(2)
    assert await run.ended == "finished" and run.result == 3
    assert tasks == [None, None]  # resumed from the futures' callbacks, in no Task


async def test_a_bare_yield_resumes_it_at_the_next_loop_iteration() -> None:
    async def yields() -> str:
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return "done"

    run = Outcome(yields())
    run.step()
    assert not run.ended.done()
    assert await run.ended == "finished" and run.result == "done"


async def test_an_exception_reaches_the_coroutine_and_what_it_raises_reaches_failed() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()

    async def fails() -> None:
        try:
            await fut
        except KeyError as exc:
            raise ValueError("after the key error") from exc

    run = Outcome(fails())
    run.step()
    fut.set_exception(KeyError("k"))
    assert await run.ended == "failed"
    assert isinstance(run.exc, ValueError) and isinstance(run.exc.__cause__, KeyError)


async def test_a_coroutine_that_cancels_itself_fails_not_cancelled() -> None:
    async def cancels_itself() -> None:
        raise asyncio.CancelledError

    run = Outcome(cancels_itself())
    run.step()
    assert await run.ended == "failed" and isinstance(run.exc, asyncio.CancelledError)


async def test_cancel_cancels_what_it_waits_on_and_raises_where_it_waits() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    cleaned: list[str] = []

    async def waits() -> None:
        try:
            await fut
        finally:
            cleaned.append("finally")

    run = Outcome(waits())
    run.step()
    run.cancel()
    assert run.ended.done() and run.ended.result() == "cancelled"
    assert isinstance(run.exc, asyncio.CancelledError) and cleaned == ["finally"]
    assert fut.cancelled()
    await asyncio.sleep(0.01)
    assert run.ends == 1  # the cancelled future's callback was taken off: no second end


async def test_a_cancelled_coroutine_may_still_end_with_a_result() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()

    async def swallows() -> str:
        try:
            await fut
        except asyncio.CancelledError:
            return "cleaned up"
        return "not cancelled"

    run = Outcome(swallows())
    run.step()
    run.cancel()
    assert run.ended.result() == "finished" and run.result == "cleaned up"


def test_a_coroutine_that_never_waits_needs_no_event_loop() -> None:
    got: list[int] = []

    class Plain(Stepped[int]):
        def finished(self, result: int) -> None:
            got.append(result)

    async def at_once() -> int:
        return 1

    Plain(at_once()).step()  # no event loop running: it ran and ended within step
    assert got == [1]
