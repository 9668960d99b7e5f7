"""A sans-IO HTTP/1.1 server connection: bytes in -> requests out, responses in -> bytes out.

No sockets and no asyncio (the adapter is `server.py`); the parsing is httptools' (llhttp, C).
`receive(data)` returns the requests completed by `data`; `respond(...)` answers the oldest
request not yet answered (pipelined requests are answered in order); `data_to_send()` returns
what to write, and once `done` is true the adapter writes it and closes the connection.

What the connection decides itself:

- keep-alive: HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with `Connection: keep-alive`
  (httptools' `should_keep_alive`); a response to a request that does not keep the connection
  alive says `Connection: close` and is the last.
- `Expect: 100-continue` (HTTP/1.1): `100 Continue` is sent when the head is read, or, if
  earlier pipelined requests are still unanswered, right after the last of their responses.
- limits (`Limits`): the request line (`max_line`), each header's name and value (`max_field`),
  the number of headers (`max_headers`) and the whole head (`max_head`: what arrived before the
  head was complete) are answered 414 or 431 and the connection closed. A body over `max_body`
  (a declared Content-Length at once, a chunked one as soon as it passes the limit) gives a
  request with `too_large` set and no body: the adapter answers it (413) and the connection
  reads nothing more and closes after that answer.
- a request httptools refuses (malformed) is answered 400 after the responses owed to the
  requests before it, and the connection closes. A protocol upgrade (or CONNECT) is not
  followed: that request is answered and the connection closed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus

import httptools
from multidict import CIMultiDict

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
REASONS = {s.value: s.phrase for s in HTTPStatus}
# set by `respond` itself, whatever the response's own headers say
_OWN_HEADERS = frozenset({"content-length", "connection", "date", "server", "transfer-encoding"})


@dataclass(frozen=True)
class Limits:
    max_line: int = 8190  # the request line (as aiohttp's max_line_size)
    max_field: int = 8190  # one header's name or value (aiohttp's max_field_size)
    max_headers: int = 128  # header lines (aiohttp's max_headers)
    max_head: int = 64 * 1024  # the whole head, request line and headers
    max_body: int = 1024 * 1024  # as aiohttp's client_max_size default


@dataclass(slots=True)
class Request:
    """One request as received; `path` and `query_string` are undecoded."""

    method: str
    path: str
    query_string: str
    headers: CIMultiDict[str]
    body: bytes
    version: str  # "1.0" or "1.1"
    keep_alive: bool
    too_large: bool = False  # the body passed `Limits.max_body` (and is not here)
    target: str = field(default="", repr=False)  # the request target as sent


class _Stop(Exception):
    """Raised from a parser callback to stop parsing (a limit broken, or the last request
    read)."""


class _Date:
    """The Date header's value, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self, now: float) -> bytes:
        second = int(now)
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True).encode("ascii")
        return self._value


_DATE = _Date()  # one for every connection of the process


class ServerConnection:
    """The server side of one HTTP/1.1 connection (see the module's docstring)."""

    def __init__(
        self,
        limits: Limits | None = None,
        server: str = "lunastor",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits or Limits()
        self._server = server.encode("latin-1")
        self._clock = clock
        self._parser = httptools.HttpRequestParser(self)
        self._out: list[bytes] = []
        self._completed: list[Request] = []
        # requests received and not answered yet, oldest first: (keep_alive, version) each
        self._unanswered: list[tuple[bool, str]] = []
        self._closing = False  # nothing more is read; close once the owed answers are sent
        self._error: bytes = b""  # the answer to a refused request, sent after the owed ones
        self._continue_owed = False
        self._head_bytes = 0
        self._in_head = False
        self._in_message = False
        self._refusal: tuple[int, str] | None = None
        self._reset_message()

    # -- state the adapter reads

    @property
    def receiving(self) -> bool:
        """Part of a request has arrived and not all of it."""
        return self._in_message

    @property
    def unanswered(self) -> int:
        return len(self._unanswered)

    @property
    def done(self) -> bool:
        """Nothing more will be read or answered: write `data_to_send()`, then close."""
        return self._closing and not self._unanswered

    def close(self) -> None:
        """Read nothing more: the requests received are still answered, the last with
        `Connection: close`."""
        self._closing = True
        self._in_message = self._in_head = False

    # -- bytes in

    def receive(self, data: bytes) -> list[Request]:
        """Feed bytes from the peer; the requests they complete, in order."""
        if self._closing or not data:
            return []
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._closing = True  # that request is answered; what follows is not HTTP
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Stop):  # a bug of ours; the peer gets an answer
                self._refuse(400, f"malformed HTTP request: {exc.__context__ or exc}")
            elif self._refusal is not None:
                self._refuse(*self._refusal)
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed HTTP request: {exc}")
        completed, self._completed = self._completed, []
        if self._in_head and not self._closing:
            # all of `data` was this head unless requests completed before it began here
            self._head_bytes = self._head_bytes + len(data) if not completed else 0
            if self._head_bytes > self.limits.max_head:
                self._refuse(431, f"request head over {self.limits.max_head} bytes")
        return completed

    # -- bytes out

    def respond(
        self,
        status: int,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        reason: str | None = None,
        head: bool = False,
    ) -> None:
        """Answer the oldest unanswered request; `head`: a HEAD request (headers only, the
        Content-Length the body's)."""
        keep_alive, version = self._unanswered.pop(0)
        last = not self._unanswered
        if self._closing and last and not self._error:
            keep_alive = False  # the last answer on a closing connection says so
        self._out.append(self._serialise(status, reason, headers, body, keep_alive, version, head))
        if not keep_alive:
            self._closing = True
            self._unanswered.clear()
            self._error = b""
        elif last and self._error:
            self._out.append(self._error)
            self._error = b""
        elif last and self._continue_owed:
            self._continue_owed = False
            self._out.append(CONTINUE)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _serialise(
        self,
        status: int,
        reason: str | None,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        keep_alive: bool,
        version: str,
        head: bool,
    ) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason or REASONS.get(status, 'Unknown')}"]
        for name, value in headers:
            if name.lower() not in _OWN_HEADERS:
                lines.append(f"{name}: {value}")
        has_body = status >= 200 and status not in (204, 304)
        if has_body:
            lines.append(f"Content-Length: {len(body)}")
        if not keep_alive:
            lines.append("Connection: close")
        elif version == "1.0":
            lines.append("Connection: keep-alive")
        start = "\r\n".join(lines).encode("latin-1")
        return b"%s\r\nDate: %s\r\nServer: %s\r\n\r\n%s" % (
            start,
            _DATE.get(self._clock()),
            self._server,
            body if has_body and not head else b"",
        )

    def _refuse(self, status: int, detail: str) -> None:
        """Read nothing more; answer `status` after the answers owed, then close."""
        self._closing = True
        self._in_message = self._in_head = False
        body = f"{status}: {REASONS.get(status, 'Error')}\n{detail}\n".encode()
        headers = [("Content-Type", "text/plain; charset=utf-8")]
        answer = self._serialise(status, None, headers, body, False, "1.1", False)
        if self._unanswered:
            self._error = answer
        else:
            self._out.append(answer)

    # -- httptools callbacks

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._body: list[bytes] = []
        self._body_size = 0
        self._too_large = False

    def on_message_begin(self) -> None:
        self._reset_message()
        self._in_message = self._in_head = True
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_line:
            self._refusal = (414, f"request target over {self.limits.max_line} bytes")
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.limits
        if len(name) > limits.max_field or len(value) > limits.max_field:
            self._refusal = (431, f"a header name or value over {limits.max_field} bytes")
            raise _Stop
        if len(self._headers) >= limits.max_headers:
            self._refusal = (431, f"more than {limits.max_headers} headers")
            raise _Stop
        self._headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._in_head = False
        declared = self._headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.limits.max_body:
            self._too_large = True
            self._deliver()  # at once, without its body
            raise _Stop
        expect = self._headers.get("Expect")
        if (
            expect is not None
            and expect.lower() == "100-continue"
            and self._parser.get_http_version() == "1.1"
        ):  # the client waits for this before it sends the body
            if self._unanswered:
                self._continue_owed = True  # after the answers owed (in order)
            else:
                self._out.append(CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.limits.max_body:
            self._too_large = True
            self._body = []
            self._deliver()
            raise _Stop
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._deliver():
            raise _Stop  # the last request this connection reads

    def _deliver(self) -> bool:
        """Queue the request parsed; whether it is the last one (no keep-alive)."""
        parser = self._parser
        target = self._url.decode("latin-1")
        path, _, query = target.partition("#")[0].partition("?")
        version = parser.get_http_version()
        keep_alive = parser.should_keep_alive() and not self._too_large
        request = Request(
            parser.get_method().decode("ascii", "replace"),
            path,
            query,
            self._headers,
            b"".join(self._body),
            version,
            keep_alive,
            self._too_large,
            target,
        )
        self._in_message = self._in_head = False
        self._continue_owed = False
        self._unanswered.append((keep_alive, version))
        self._completed.append(request)
        self._reset_message()
        if not keep_alive:
            self._closing = True
        return not keep_alive
