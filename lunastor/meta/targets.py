"""`/v1/targets` and `/v1/discovery-chap`: targets with their LUN counts, CHAP settings.

Secrets go in, never out: the API shows `chap_enabled` and the user names only.
"""

from __future__ import annotations

from aiohttp import web

from lunastor.meta import schemas
from lunastor.meta.context import CLUSTER_STORE_KEY
from lunastor.meta.routing import ADMIN_ONLY, ALL_ROLES, Call, Param, Route, json_response

TARGET = Param("target", "path", schemas.target_iqn, "target IQN")


async def list_targets(call: Call) -> web.Response:
    return json_response(await call.app[CLUSTER_STORE_KEY].list_targets())


async def get_target(call: Call) -> web.Response:
    return json_response(await call.app[CLUSTER_STORE_KEY].get_target(call.params["target"]))


async def set_target_chap(call: Call) -> web.Response:
    store = call.app[CLUSTER_STORE_KEY]
    return json_response(await store.set_target_chap(call.params["target"], call.body))


async def rotate_target_chap(call: Call) -> web.Response:
    store = call.app[CLUSTER_STORE_KEY]
    return json_response(await store.rotate_target_chap(call.params["target"], call.body))


async def clear_target_chap(call: Call) -> web.Response:
    await call.app[CLUSTER_STORE_KEY].clear_target_chap(call.params["target"])
    return web.Response(status=204)


async def get_discovery_chap(call: Call) -> web.Response:
    return json_response(await call.app[CLUSTER_STORE_KEY].get_discovery_chap())


async def set_discovery_chap(call: Call) -> web.Response:
    return json_response(await call.app[CLUSTER_STORE_KEY].set_discovery_chap(call.body))


async def rotate_discovery_chap(call: Call) -> web.Response:
    return json_response(await call.app[CLUSTER_STORE_KEY].rotate_discovery_chap(call.body))


async def clear_discovery_chap(call: Call) -> web.Response:
    await call.app[CLUSTER_STORE_KEY].clear_discovery_chap()
    return web.Response(status=204)


ROUTES = [
    Route(
        "GET",
        "/v1/targets",
        list_targets,
        "listTargets",
        "Targets in use, with LUN counts and whether CHAP is on",
        "targets",
        ALL_ROLES,
        responses={200: "TargetList"},
    ),
    Route(
        "GET",
        "/v1/targets/{target}",
        get_target,
        "getTarget",
        "One target",
        "targets",
        ALL_ROLES,
        params=(TARGET,),
        responses={200: "Target"},
    ),
    Route(
        "PUT",
        "/v1/targets/{target}/chap",
        set_target_chap,
        "setTargetChap",
        "Set (or replace) CHAP for a target; secrets are stored sealed and never returned",
        "targets",
        ADMIN_ONLY,
        params=(TARGET,),
        body=schemas.CHAP_SET,
        responses={200: "Chap", 409: "Problem"},
    ),
    Route(
        "POST",
        "/v1/targets/{target}/chap/rotate",
        rotate_target_chap,
        "rotateTargetChap",
        "Replace a target's CHAP secret(s), keeping the user names",
        "targets",
        ADMIN_ONLY,
        params=(TARGET,),
        body=schemas.CHAP_ROTATE,
        responses={200: "Chap", 409: "Problem"},
    ),
    Route(
        "DELETE",
        "/v1/targets/{target}/chap",
        clear_target_chap,
        "clearTargetChap",
        "Turn CHAP off for a target",
        "targets",
        ADMIN_ONLY,
        params=(TARGET,),
        responses={204: None, 409: "Problem"},
    ),
    Route(
        "GET",
        "/v1/discovery-chap",
        get_discovery_chap,
        "getDiscoveryChap",
        "Whether discovery sessions need CHAP",
        "targets",
        ALL_ROLES,
        responses={200: "Chap"},
    ),
    Route(
        "PUT",
        "/v1/discovery-chap",
        set_discovery_chap,
        "setDiscoveryChap",
        "Set (or replace) CHAP for discovery sessions",
        "targets",
        ADMIN_ONLY,
        body=schemas.CHAP_SET,
        responses={200: "Chap", 409: "Problem"},
    ),
    Route(
        "POST",
        "/v1/discovery-chap/rotate",
        rotate_discovery_chap,
        "rotateDiscoveryChap",
        "Replace the discovery CHAP secret(s)",
        "targets",
        ADMIN_ONLY,
        body=schemas.CHAP_ROTATE,
        responses={200: "Chap", 409: "Problem"},
    ),
    Route(
        "DELETE",
        "/v1/discovery-chap",
        clear_discovery_chap,
        "clearDiscoveryChap",
        "Turn discovery CHAP off",
        "targets",
        ADMIN_ONLY,
        responses={204: None},
    ),
]
