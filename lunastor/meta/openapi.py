"""The OpenAPI 3.1 document (JSON Schema 2020-12 inside), generated from the route table and
`schemas.py`."""

from __future__ import annotations

from typing import Any

import lunastor
from lunastor.meta.problems import TITLES
from lunastor.meta.routing import Route
from lunastor.meta.schemas import RESPONSES

PROBLEM_TYPE = "application/problem+json"


def _parameter(p: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": p.name,
        "in": p.where,
        "required": p.where == "path",
        "schema": p.schema,
    }
    if p.description:
        out["description"] = p.description
    return out


def _response(status: int, schema: str | None) -> dict[str, Any]:
    description = TITLES.get(status, "OK" if status < 300 else "Error")
    if status == 201:
        description = "Created"
    elif status == 202:
        description = "Accepted"
    elif status == 204:
        description = "No Content"
    if schema is None:
        return {"description": description}
    media = PROBLEM_TYPE if schema == "Problem" else "application/json"
    return {
        "description": description,
        "content": {media: {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def operation(route: Route) -> dict[str, Any]:
    responses = {str(s): _response(s, name) for s, name in sorted(route.responses.items())}
    for status in route.error_statuses():
        responses[str(status)] = _response(status, "Problem")
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.tag],
        "description": f"Roles: {', '.join(sorted(route.roles))}.",
        "responses": responses,
    }
    if route.params:
        op["parameters"] = [_parameter(p) for p in route.params]
    if route.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": route.body}},
        }
    return op


def build_spec(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "lunastor management API",
            "version": lunastor.__version__,
            "description": (
                "Volumes, exports (LUN masking), snapshots, targets and CHAP, chunk servers, "
                "capacity and operations. Errors are problem bodies with a stable `code` "
                "(docs/csi-mapping.md)."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": dict(RESPONSES),
        },
    }
