"""The built browser app (clients/web/dist): the page and its hashed assets."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web


def add_static_routes(app: web.Application, static_dir: Path) -> None:
    index = static_dir / "index.html"

    async def page(request: web.Request) -> web.StreamResponse:
        if not index.is_file():
            return web.Response(
                status=503, content_type="text/plain",
                text=f"the web app is not built ({index} is missing): run `make web`",
            )
        return web.FileResponse(index, headers={"Cache-Control": "no-cache"})

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = (static_dir / "assets" / name).resolve()
        if path.parent != (static_dir / "assets").resolve() or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "public, max-age=31536000, immutable"})

    app.router.add_get("/", page)
    app.router.add_get("/index.html", page)
    app.router.add_get("/assets/{name}", asset)
