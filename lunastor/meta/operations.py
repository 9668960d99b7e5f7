"""`/v1/operations`: long-running jobs (drains today) and their progress."""

from __future__ import annotations

from aiohttp import web

from lunastor.meta import schemas
from lunastor.meta.context import CLUSTER_STORE_KEY
from lunastor.meta.routing import ALL_ROLES, Call, Param, Route, json_response, listing_response


async def list_operations(call: Call) -> web.Response:
    limit = call.params.get("limit", schemas.LIST_LIMIT_DEFAULT)
    store = call.app[CLUSTER_STORE_KEY]
    return listing_response(await store.list_operations(limit, call.params.get("next")))


async def get_operation(call: Call) -> web.Response:
    store = call.app[CLUSTER_STORE_KEY]
    return json_response(await store.get_operation(call.params["operation_id"]))


ROUTES = [
    Route(
        "GET",
        "/v1/operations",
        list_operations,
        "listOperations",
        "Long-running operations, paginated",
        "operations",
        ALL_ROLES,
        params=(
            Param("limit", "query", schemas.LIMIT, "page size (default 100)"),
            Param("next", "query", schemas.NEXT, "token from the previous page"),
        ),
        responses={200: "OperationPage", 410: "Problem"},
    ),
    Route(
        "GET",
        "/v1/operations/{operation_id}",
        get_operation,
        "getOperation",
        "One operation with its progress",
        "operations",
        ALL_ROLES,
        params=(Param("operation_id", "path", schemas.operation_id, "operation id (op-...)"),),
        responses={200: "Operation"},
    ),
]
