"""Meta's API routes served straight from the route table, before aiohttp's application layer.

aiohttp's `Application` resolves every request through its router, builds match info, enters
the app's context and runs the middleware chain: at 50 concurrent clients that layer was a
measurable share of meta's CPU per request (docs/scale.md, "Measured (issue 17, fourth
session)"). `Dispatcher` replaces the application's handler on the server (aiohttp still
parses and writes HTTP): a request whose method and path match an API route exactly as
aiohttp's router would match them goes to that route's `Endpoint` through `app.serve`, the
same function the application's middleware calls; anything else (the UI, `/metrics`,
`/healthz`, the OpenAPI document, unknown paths and methods, requests that `Expect` an interim
answer) goes to the application unchanged. So a client cannot tell which way its request
went: same handler, checks, problems, headers, metrics and logs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from lunastor.meta.app import serve
from lunastor.meta.context import CONFIG_KEY
from lunastor.meta.routing import Endpoint, Route

RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# One compiled path: per segment the literal, or None for a parameter (then its name).
_Segments = tuple[tuple[str | None, str], ...]


def _segments(path: str) -> _Segments:
    out: list[tuple[str | None, str]] = []
    for part in path.split("/"):
        if part.startswith("{"):
            name = part[1:-1]
            assert name.isidentifier(), f"route parameters are plain names: {path}"
            out.append((None, name))
        else:
            assert "{" not in part and "}" not in part, path
            out.append((part, ""))
    return tuple(out)


def _unquote(value: str) -> str:
    """A path value as aiohttp's router gives it: the request's `path_safe` keeps `%2F` and
    `%25` encoded so that they cannot split segments, and the router decodes them in the
    value (`web_urldispatcher._unquote_path_safe`)."""
    if "%" not in value:
        return value
    return value.replace("%2F", "/").replace("%25", "%")


class Dispatcher:
    """The server's request handler: API routes straight to their `Endpoint`, the rest to
    `fallback` (the application's own handler)."""

    def __init__(self, app: web.Application, routes: list[Route], fallback: RequestHandler):
        self._app = app
        self._config = app[CONFIG_KEY]
        self._fallback = fallback
        # path -> method -> endpoint for paths without parameters;
        # per segment count, the patterns with parameters (checked in table order; two routes
        # never both match one path, `_check_disjoint`)
        self._plain: dict[str, dict[str, Endpoint]] = {}
        self._patterns: dict[int, list[tuple[_Segments, dict[str, Endpoint]]]] = {}
        for route in routes:
            endpoint = Endpoint(route)
            if "{" not in route.path:
                self._plain.setdefault(route.path, {})[route.method] = endpoint
                continue
            segments = _segments(route.path)
            same = self._patterns.setdefault(len(segments), [])
            for known, methods in same:
                if known == segments:
                    methods[route.method] = endpoint
                    break
            else:
                same.append((segments, {route.method: endpoint}))
        _check_disjoint(self._patterns)

    def match(self, method: str, path: str) -> tuple[Endpoint, dict[str, str]] | None:
        """The endpoint and path values for `method` on `path` (a request's `path_safe`), or
        None where aiohttp's router would not pick an API route for them."""
        methods = self._plain.get(path)
        if methods is not None:
            endpoint = methods.get(method)
            return None if endpoint is None else (endpoint, {})
        parts = path.split("/")
        for segments, methods in self._patterns.get(len(parts), ()):
            values: dict[str, str] = {}
            for part, (literal, name) in zip(parts, segments, strict=True):
                if literal is None:
                    # aiohttp's pattern for a parameter: [^{}/]+ (no "/": split already)
                    if not part or "{" in part or "}" in part:
                        break
                    values[name] = _unquote(part)
                elif part != literal:
                    break
            else:
                endpoint = methods.get(method)
                return None if endpoint is None else (endpoint, values)
        return None

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        found = self.match(request.method, request.rel_url.path_safe)
        if found is None or hdrs.EXPECT in request.headers:
            return await self._fallback(request)
        assert isinstance(request, web.Request)  # the application's request factory made it
        endpoint, values = found
        app = self._app

        async def call(request: web.Request) -> web.StreamResponse:
            return await endpoint(request, app, values)

        return await serve(request, call, endpoint.route.path, self._config, True)


def _check_disjoint(patterns: dict[int, list[tuple[_Segments, dict[str, Endpoint]]]]) -> None:
    """No path may match two patterns: the dispatcher takes the first match where aiohttp's
    router walks its own index, and they agree only if at most one can match."""
    for same in patterns.values():
        for i, (a, _) in enumerate(same):
            for b, _ in same[i + 1 :]:
                overlap = all(
                    x[0] is None or y[0] is None or x[0] == y[0] for x, y in zip(a, b, strict=True)
                )
                assert not overlap, f"routes {a} and {b} may match the same path"


def install(runner: web.AppRunner, routes: list[Route]) -> Dispatcher:
    """Make `runner`'s server answer `routes` through a `Dispatcher`, the rest through the
    handler it had (the application's). Connections take the server's handler when they open:
    one opened before this call is served by the application alone, just as correctly."""
    server = runner.server
    assert server is not None, "runner not set up"
    dispatcher = Dispatcher(runner.app, routes, server.request_handler)
    server.request_handler = dispatcher
    return dispatcher
