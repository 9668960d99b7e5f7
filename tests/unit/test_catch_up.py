"""`login_again`: a held login is run again once the view caught up, over a real connection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from lunastor.common.catch_up import login_again


class Held(asyncio.Protocol):
    def __init__(self) -> None:
        self.made: asyncio.Future[asyncio.Transport] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.made.set_result(transport)


@pytest.fixture
async def transport() -> AsyncIterator[asyncio.Transport]:
    held = Held()
    server = await asyncio.get_running_loop().create_server(lambda: held, "127.0.0.1", 0)
    _, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    try:
        yield await held.made
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


async def test_reading_waits_for_the_catch_up_then_the_login_runs_again(
    transport: asyncio.Transport,
) -> None:
    caught = asyncio.Event()

    async def catch_up() -> None:
        await caught.wait()

    again: list[bytes] = []
    task = login_again(transport, catch_up, lambda: False, again.append, b"login")
    await asyncio.sleep(0.01)
    assert not transport.is_reading() and again == []
    caught.set()
    await task
    assert transport.is_reading() and again == [b"login"]


async def test_a_failed_catch_up_decides_on_what_the_view_has(
    transport: asyncio.Transport, caplog: pytest.LogCaptureFixture
) -> None:
    async def fails() -> None:
        raise TimeoutError

    again: list[bytes] = []
    with caplog.at_level(logging.WARNING):
        await login_again(transport, fails, lambda: False, again.append, b"login")
    assert again == [b"login"] and "could not catch up" in caplog.text


async def test_a_connection_that_closed_meanwhile_is_not_logged_in_again(
    transport: asyncio.Transport,
) -> None:
    async def at_once() -> None:
        pass

    again: list[bytes] = []
    await login_again(transport, at_once, lambda: True, again.append, b"login")  # host closing
    transport.close()
    await login_again(transport, at_once, lambda: False, again.append, b"login")
    assert again == []
