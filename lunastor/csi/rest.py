"""The controller's client of the meta REST API (bearer token of role `csi`).

Every failure becomes a `CsiError`: a problem body through `errors.status_for`, a meta that
cannot be reached as UNAVAILABLE (the CO retries), so a handler only says what it asks for.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import aiohttp
import grpc

from lunastor.csi.errors import CsiError, status_for

Json = dict[str, Any]


class ApiError(CsiError):
    """A problem answer: the CSI status, plus what the API said (`status`, `code`, body)."""

    def __init__(self, status: int, code: str, detail: str, body: Json) -> None:
        super().__init__(status_for(status, code, body.get("field")), f"{code}: {detail}")
        self.status = status
        self.problem = code
        self.body = body


class RestClient:
    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, headers={"Authorization": f"Bearer {self.token}"}
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(
        self, method: str, path: str, body: Json | None = None, query: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        """(HTTP status, decoded JSON or None) of a successful call; a problem raises ApiError."""
        params = {k: str(v) for k, v in (query or {}).items() if v is not None}
        try:
            async with self._client().request(
                method, self.base_url + path, json=body, params=params
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise CsiError(
                grpc.StatusCode.UNAVAILABLE, f"meta API {self.base_url} unreachable: {exc}"
            ) from None
        data: Any = None
        if raw:
            try:
                data = json.loads(raw)
            except ValueError:
                raise CsiError(
                    grpc.StatusCode.INTERNAL, f"{method} {path}: answer is not JSON ({status})"
                ) from None
        if status >= 400:
            problem = data if isinstance(data, dict) else {}
            raise ApiError(
                status, str(problem.get("code", "")), str(problem.get("detail", "")), problem
            )
        return status, data

    async def get(self, path: str, **query: Any) -> Any:
        return (await self.call("GET", path, query=query))[1]

    async def post(self, path: str, body: Json) -> Any:
        return (await self.call("POST", path, body))[1]

    async def patch(self, path: str, body: Json) -> Any:
        return (await self.call("PATCH", path, body))[1]

    async def delete(self, path: str) -> None:
        await self.call("DELETE", path)


def segment(value: str) -> str:
    """A path segment: ids come from the CO, so nothing in them may change the path."""
    return quote(value, safe="")
