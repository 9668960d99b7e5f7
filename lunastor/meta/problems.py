"""Every API error is a JSON problem body (RFC 9457) with a stable machine-readable `code`."""

from __future__ import annotations

from typing import Any

from aiohttp import web


class Problem(Exception):
    """Raise from a handler to answer with `status` and a problem body naming `code`."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra


TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
    507: "Insufficient Storage",
}


def problem_response(status: int, code: str, detail: str, **extra: Any) -> web.Response:
    body = {
        "type": "about:blank",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "code": code,
        "detail": detail,
        **extra,
    }
    headers = {"WWW-Authenticate": 'Bearer realm="lunastor"'} if status == 401 else None
    return web.json_response(
        body, status=status, content_type="application/problem+json", headers=headers
    )
