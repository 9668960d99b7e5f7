"""A TCP proxy that cuts connectivity on command, to break client streams deterministically,
or holds what the client sends (a slow link) until released, or delays what the server sends."""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.procs import free_port


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target` ("host:port") until `cut()`; `restore()` again.

    `hold()` keeps the connections open but stops forwarding what clients send (it is read and
    kept, in order) until `release()`; `held` counts the bytes waiting. `reply_delay`: seconds
    what the server sends waits before it is forwarded (in order: a late stream)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.open = True
        self.held = 0
        self.reply_delay = 0.0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Drop every connection and refuse new ones (they are closed at once)."""
        self.open = False
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.open = True

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer, upstream=True),
            self._pipe(up_reader, writer),
            return_exceptions=True,
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool = False
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if upstream and not self._flowing.is_set():
                    self.held += len(data)
                    await self._flowing.wait()
                    self.held -= len(data)
                elif not upstream and self.reply_delay:
                    await asyncio.sleep(self.reply_delay)
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
