"""The sans-IO HTTP/1.1 server connection: bytes in -> requests, answers -> bytes out.

Each case is fed whole and one byte at a time (as h11's tests do): the requests and the bytes
out must not depend on how the input is cut."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from lunastor.common.http.connection import Limits, ServerConnection

DATE = b"Date: Thu, 01 Jan 1970 00:00:00 GMT\r\nServer: lunastor\r\n"


def conn(limits: Limits | None = None) -> ServerConnection:
    return ServerConnection(limits, clock=lambda: 0.0)


def ok(body: bytes = b"", close: bool = False, keep_alive_10: bool = False) -> bytes:
    extra = b"Connection: close\r\n" if close else b""
    extra += b"Connection: keep-alive\r\n" if keep_alive_10 else b""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s%s\r\n%s" % (len(body), extra, DATE, body)


def refused(status: int, phrase: bytes, detail: bytes) -> bytes:
    body = b"%d: %s\n%s\n" % (status, phrase, detail)
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n%s\r\n%s" % (status, phrase, len(body), DATE, body)
    )


@dataclass
class Case:
    name: str
    data: bytes
    # (method, path, query, body, keep_alive, too_large) of each request received
    requests: list[tuple[str, str, str, bytes, bool, bool]]
    out: bytes  # everything written when every request is answered `ok(path bytes)`
    done: bool  # the connection closes after that
    limits: Limits = field(default_factory=Limits)


BAD_LENGTH = b"Invalid character in Content-Length"
GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"

CASES = [
    Case("keep-alive", GET, [("GET", "/a", "", b"", True, False)], ok(b"/a"), False),
    Case(
        "query and fragment",
        b"GET /v1/x?limit=2&next=a%20b#frag HTTP/1.1\r\n\r\n",
        [("GET", "/v1/x", "limit=2&next=a%20b", b"", True, False)],
        ok(b"/v1/x"),
        False,
    ),
    Case(
        "connection close",
        b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
        [("GET", "/a", "", b"", False, False)],
        ok(b"/a", close=True),
        True,
    ),
    Case(
        "HTTP/1.0 closes",
        b"GET /a HTTP/1.0\r\n\r\n",
        [("GET", "/a", "", b"", False, False)],
        ok(b"/a", close=True),
        True,
    ),
    Case(
        "HTTP/1.0 keep-alive",
        b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        [("GET", "/a", "", b"", True, False)],
        ok(b"/a", keep_alive_10=True),
        False,
    ),
    Case(
        "pipelined, answered in order",
        b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /b HTTP/1.1\r\n\r\n",
        [("POST", "/a", "", b"hi", True, False), ("GET", "/b", "", b"", True, False)],
        ok(b"/a") + ok(b"/b"),
        False,
    ),
    Case(
        "chunked body",
        b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        [("POST", "/a", "", b"abcde", True, False)],
        ok(b"/a"),
        False,
    ),
    Case(
        "100-continue",
        b"PUT /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
        [("PUT", "/a", "", b"x", True, False)],
        b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"/a"),
        False,
    ),
    Case(
        "100-continue on HTTP/1.0 is not sent",
        b"PUT /a HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
        [("PUT", "/a", "", b"x", False, False)],
        ok(b"/a", close=True),
        True,
    ),
    Case(
        "declared body over the limit: at once, nothing more read",
        b"POST /a HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world" + GET,
        [("POST", "/a", "", b"", False, True)],
        ok(b"/a", close=True),
        True,
        Limits(max_body=10),
    ),
    Case(
        "chunked body over the limit",
        b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n6\r\nghijkl\r\n",
        [("POST", "/a", "", b"", False, True)],
        ok(b"/a", close=True),
        True,
        Limits(max_body=10),
    ),
    Case(
        "malformed",
        b"GARBAGE\r\n\r\n",
        [],
        refused(400, b"Bad Request", b"malformed HTTP request: Invalid method encountered"),
        True,
    ),
    Case(
        "malformed after a good request: its answer first",
        GET + b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        [("GET", "/a", "", b"", True, False)],
        ok(b"/a")
        + refused(
            400, b"Bad Request", b"malformed HTTP request: Invalid character in Content-Length"
        ),
        True,
    ),
    Case(
        "request line over the limit",
        b"GET /" + b"a" * 20 + b" HTTP/1.1\r\n\r\n",
        [],
        refused(414, b"Request-URI Too Long", b"request target over 16 bytes"),
        True,
        Limits(max_line=16),
    ),
    Case(
        "header over the limit",
        b"GET / HTTP/1.1\r\nX: " + b"v" * 20 + b"\r\n\r\n",
        [],
        refused(431, b"Request Header Fields Too Large", b"a header name or value over 16 bytes"),
        True,
        Limits(max_field=16),
    ),
    Case(
        "too many headers",
        b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n",
        [],
        refused(431, b"Request Header Fields Too Large", b"more than 2 headers"),
        True,
        Limits(max_headers=2),
    ),
    Case(
        "upgrade: answered, then closed",
        b"GET /a HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x00\x01",
        [("GET", "/a", "", b"", True, False)],
        ok(b"/a", close=True),
        True,
    ),
]


def run(case: Case, one_byte_at_a_time: bool) -> tuple[list[tuple[object, ...]], bytes, bool]:
    c = conn(case.limits)
    pieces = (
        [case.data[i : i + 1] for i in range(len(case.data))] if one_byte_at_a_time else [case.data]
    )
    got: list[tuple[object, ...]] = []
    out = b""
    for piece in pieces:
        for r in c.receive(piece):
            got.append((r.method, r.path, r.query_string, r.body, r.keep_alive, r.too_large))
            out += c.data_to_send()
            c.respond(200, [], r.path.encode())
        out += c.data_to_send()
    return got, out, c.done


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("one_byte_at_a_time", [False, True], ids=["whole", "bytewise"])
def test_cases(case: Case, one_byte_at_a_time: bool) -> None:
    got, out, done = run(case, one_byte_at_a_time)
    assert got == case.requests
    assert out == case.out
    assert done == case.done


def test_headers_are_kept_case_insensitive_and_repeated() -> None:
    c = conn()
    [r] = c.receive(b"GET / HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\nAuthorization: Bearer t\r\n\r\n")
    assert r.headers.getall("X-A") == ["1", "2"]
    assert r.headers["authorization"] == "Bearer t"
    assert r.version == "1.1" and r.target == "/"


def test_pipelined_answers_wait_for_earlier_ones() -> None:
    """Two requests received; an answer is always to the oldest, and `unanswered` counts."""
    c = conn()
    assert len(c.receive(GET + b"GET /b HTTP/1.1\r\n\r\n")) == 2
    assert c.unanswered == 2 and not c.receiving
    c.respond(200, [], b"1")
    c.respond(204)
    assert c.unanswered == 0
    assert c.data_to_send() == ok(b"1") + b"HTTP/1.1 204 No Content\r\n" + DATE + b"\r\n"


def test_100_continue_waits_for_the_answers_owed() -> None:
    """Behind an unanswered request, `100 Continue` goes out after its answer, not before."""
    c = conn()
    expect = b"PUT /b HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"
    assert len(c.receive(GET + expect)) == 1
    assert c.data_to_send() == b"" and c.receiving
    c.respond(200)
    assert c.data_to_send() == ok() + b"HTTP/1.1 100 Continue\r\n\r\n"
    [put] = c.receive(b"x")
    assert put.body == b"x"


def test_head_answer_has_the_length_and_no_body() -> None:
    c = conn()
    c.receive(b"HEAD /a HTTP/1.1\r\n\r\n")
    c.respond(200, [("Content-Type", "text/plain")], b"hello", head=True)
    assert c.data_to_send() == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n" + DATE + b"\r\n"
    )


def test_own_headers_are_not_taken_from_the_response() -> None:
    c = conn()
    c.receive(GET)
    c.respond(201, [("Content-Length", "99"), ("X-Request-Id", "r1"), ("Connection", "x")], b"ab")
    assert c.data_to_send() == (
        b"HTTP/1.1 201 Created\r\nX-Request-Id: r1\r\nContent-Length: 2\r\n" + DATE + b"\r\nab"
    )


def test_partial_request_is_receiving() -> None:
    c = conn()
    assert not c.receiving
    assert c.receive(b"GET / HT") == []
    assert c.receiving
    c.receive(b"TP/1.1\r\n\r\n")
    assert not c.receiving


def test_head_over_its_total_limit() -> None:
    """Headers arriving a little at a time stop at `max_head`, though each is in its limits."""
    c = conn(Limits(max_head=64))
    c.receive(b"GET / HTTP/1.1\r\n")
    for i in range(10):
        c.receive(b"X-%d: %s\r\n" % (i, b"v" * 8))
    assert c.done
    assert c.data_to_send().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")


def test_nothing_is_read_once_done() -> None:
    c = conn()
    c.receive(b"GET / HTTP/1.0\r\n\r\n")
    c.respond(200)
    assert c.done
    assert c.receive(GET) == []
