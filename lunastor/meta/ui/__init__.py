"""The operator dashboard's static files, served by meta at `/ui/` (docs/dashboard.md).

Hand-written HTML, CSS and JavaScript modules in `static/`, no build step and nothing fetched
from elsewhere. The files hold no secret and need no token: the page asks the operator for a
bearer token, keeps it in the tab's sessionStorage and sends it as the Authorization header of
its REST calls, the same calls and roles as every other client. So the token is never in a URL
or in the HTML, and the page can show nothing the token's role may not GET.

Files are read once at startup and served from memory by name: no path from a request ever
reaches the file system.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from aiohttp import web

PREFIX = "/ui"
STATIC = Path(__file__).parent / "static"
TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".svg": "image/svg+xml",
}
HEADERS = {
    # only our own files; inline scripts and styles refused, so injected markup cannot run
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so an upgraded meta serves its own files
}


def is_ui_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def load_files(root: Path = STATIC) -> dict[str, tuple[bytes, str]]:
    """name relative to `root` -> (content, content type), for every file under it."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            kind = TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
            files[path.relative_to(root).as_posix()] = (path.read_bytes(), kind or "text/plain")
    return files


def add_ui_routes(app: web.Application) -> None:
    files = load_files()

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(PREFIX + "/")

    async def serve(request: web.Request) -> web.Response:
        name = request.match_info.get("name") or "index.html"
        found = files.get(name)
        if found is None:
            raise web.HTTPNotFound(text=f"no file {name} in the dashboard")
        body, kind = found
        charset = "utf-8" if kind.startswith("text/") else None
        return web.Response(body=body, content_type=kind, charset=charset, headers=HEADERS)

    app.router.add_get(PREFIX, redirect)
    app.router.add_get(PREFIX + "/", serve)
    app.router.add_get(PREFIX + "/{name:.+}", serve)
