"""Continuing a coroutine whose first step already ran, without asyncio (sans-IO).

The hosts run a command's (or a store update's) first step inline: a device that answers
without waiting finishes there, with no task and no extra loop iteration. A coroutine that
did wait yielded the future it waits on; `Resumed(coro, waiting)` is an awaitable that
takes over from there exactly as `yield from coro` would have: it yields that same future to
whoever awaits it (an asyncio task, whose own bookkeeping of the future then applies), sends
the result back in, and passes throws (cancellation) through. No private attribute of the
future is touched.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Resumed(Generic[T]):
    __slots__ = ("_coro", "_waiting")

    def __init__(self, coro: Coroutine[Any, Any, T], waiting: Any) -> None:
        self._coro = coro
        self._waiting = waiting

    def __await__(self) -> Generator[Any, Any, T]:
        coro = self._coro
        waiting = self._waiting
        while True:
            try:
                sent = yield waiting
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation: the coroutine sees it where it waits
                try:
                    waiting = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    waiting = coro.send(sent)
                except StopIteration as done:
                    return done.value
