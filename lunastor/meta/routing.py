"""One table of routes: the aiohttp router, the per-route auth rules and the OpenAPI document
are all generated from it, so they cannot drift apart."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from lunastor.meta.context import ROLE_KEY
from lunastor.meta.problems import Problem
from lunastor.meta.store import Listing, json_bytes
from lunastor.meta.validation import Schema, validate

ROLES = ("admin", "csi", "reader")
ALL_ROLES = frozenset(ROLES)
CSI_ROLES = frozenset({"admin", "csi"})
ADMIN_ONLY = frozenset({"admin"})


@dataclass(frozen=True)
class Param:
    name: str
    where: Literal["path", "query"]
    schema: Schema
    description: str = ""


@dataclass
class Call:
    """What a handler gets: the request, its validated parameters and body."""

    request: web.Request
    params: dict[str, Any]
    body: Any

    @property
    def app(self) -> web.Application:
        return self.request.app


Handler = Callable[[Call], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    tag: str
    roles: frozenset[str]
    params: tuple[Param, ...] = ()
    body: Schema | None = None
    #: status -> name of the response schema in `schemas.RESPONSES`, or None for no body.
    responses: Mapping[int, str | None] = field(default_factory=dict)

    def error_statuses(self) -> list[int]:
        """Errors every route may answer besides its own: auth, validation, etcd down."""
        statuses = {401, 403, 503}
        if self.body is not None or any(p.where == "query" for p in self.params):
            statuses.add(400)
        if self.body is not None:
            statuses.add(413)
        if any(p.where == "path" for p in self.params):
            statuses |= {400, 404}
        return sorted(statuses - set(self.responses))


def _parse_query(query: tuple[Param, ...], request: web.Request, out: dict[str, Any]) -> None:
    """Validate the query parameters `query` of `request` into `out`."""
    for p in query:
        values = request.query.getall(p.name, [])
        if not values:
            continue
        if len(values) > 1:
            raise Problem(400, "invalid_field", f"{p.name}: given more than once", field=p.name)
        raw = values[0]
        value: Any = raw
        kind = p.schema.get("type")
        if kind == "integer":
            try:
                value = int(raw)
            except ValueError:
                raise Problem(
                    400, "invalid_field", f"{p.name}: expected integer", field=p.name
                ) from None
        elif kind == "boolean":
            if raw not in ("true", "false"):
                raise Problem(
                    400, "invalid_field", f"{p.name}: expected true or false", field=p.name
                )
            value = raw == "true"
        out[p.name] = validate(p.schema, value, p.name)


async def _parse_body(route: Route, request: web.Request) -> Any:
    if route.body is None:
        return None
    raw = await request.read()
    if not raw.strip():
        raise Problem(400, "invalid_json", "a JSON request body is required", field="body")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Problem(400, "invalid_json", f"body is not JSON: {exc}", field="body") from None
    except RecursionError:  # "[[[[...]]]]" nested deeper than the parser's stack
        raise Problem(400, "invalid_json", "body is nested too deeply", field="body") from None
    return validate(route.body, data)


def wrap(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler for `route`: role check, then parameters and body, then the call."""
    # Sorted once here, not on every request.
    path_params = tuple(p for p in route.params if p.where == "path")
    query_params = tuple(p for p in route.params if p.where == "query")

    async def handler(request: web.Request) -> web.StreamResponse:
        role = request.get(ROLE_KEY)
        if role not in route.roles:
            raise Problem(403, "forbidden", f"role {role} may not {route.method} {route.path}")
        params: dict[str, Any] = {}
        for p in path_params:
            params[p.name] = validate(p.schema, request.match_info[p.name], p.name)
        if query_params:
            _parse_query(query_params, request, params)
        body = await _parse_body(route, request)
        return await route.handler(Call(request, params, body))

    handler.__name__ = route.operation_id
    return handler


def register(app: web.Application, routes: list[Route]) -> None:
    seen: set[tuple[str, str]] = set()
    for route in routes:
        key = (route.method, route.path)
        assert key not in seen, f"duplicate route {key}"
        seen.add(key)
        app.router.add_route(route.method, route.path, wrap(route))


def json_response(body: Any, status: int = 200) -> web.Response:
    return json_body_response(json_bytes(body), status)


def json_body_response(body: bytes, status: int = 200) -> web.Response:
    """A response whose JSON body is encoded already."""
    return web.Response(body=body, status=status, content_type="application/json")


def listing_response(listing: Listing) -> web.Response:
    return json_body_response(listing.body())
