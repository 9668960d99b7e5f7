"""`GET /v1/whoami`: the caller's role and the operations it may call, from the route table.

The dashboard shows an action only when the caller may call it; asking the server keeps the
rules in one place (`Route.roles`) instead of a copy in the browser. The API refuses anyway.
"""

from __future__ import annotations

from aiohttp import web

from lunastor.meta.context import ROLE_KEY
from lunastor.meta.routing import ALL_ROLES, Call, Route, json_response

ROUTES_KEY = web.AppKey("routes", tuple)  # the application's route table (set by make_app)


async def whoami(call: Call) -> web.Response:
    role = call.request[ROLE_KEY]
    routes: tuple[Route, ...] = call.app[ROUTES_KEY]
    may = sorted(r.operation_id for r in routes if role in r.roles)
    return json_response({"role": role, "may": may})


ROUTES = [
    Route(
        "GET",
        "/v1/whoami",
        whoami,
        "whoami",
        "The caller's role and the operations (operationId) it may call",
        "cluster",
        ALL_ROLES,
        responses={200: "WhoAmI"},
    ),
]
