"""The API reference at /docs, offline: Swagger UI served by the service itself, no CDN.

- `GET /docs` is the page `serve_app/web/docs.html`; `GET /docs/assets/{name}` serves exactly the
  files of `ASSETS`: Swagger UI's bundle, style sheet and icon from the installed
  `swagger-ui-bundle-v2` package (import name `swagger_ui_bundle`, Swagger UI 5.x, which renders
  the OpenAPI 3.1 that FastAPI writes), and the page's own start script and style
  (`serve_app/web/docs.js`, `docs.css`, package data). Any other name is a 404 in the one JSON
  error shape. Each file has its content type and an ETag (a repeated visit gets 304).
- Nothing is loaded from another origin and nothing runs inline, so the page works under the
  self-only Content-Security-Policy every response carries (`serve_app.access`); Swagger UI's
  validator badge (which would call validator.swagger.io) is turned off in docs.js.
- With API keys configured `/openapi.json` needs a key (`serve_app.access`); the page itself
  stays public and asks for the key in a field, as the web page does (the same browser storage,
  so a key typed in either is used by both), and sends it as `Authorization: Bearer` with every
  request to this origin, never in a URL.
- ReDoc is not served: no Python package ships its bundle. FastAPI's own /docs, /redoc and
  /docs/oauth2-redirect (CDN scripts, inline code) are turned off where the app is made
  (`docs_url=None, redoc_url=None`).
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response

from serve_app.errors import NotFound, error_response

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets/{name}"
JS = "text/javascript; charset=utf-8"
CSS = "text/css; charset=utf-8"
SWAGGER_UI = "swagger-ui"
"""Where an asset comes from: Swagger UI's package; the page's own files are in serve_app/web/."""
ASSETS: dict[str, tuple[str, str]] = {
    "swagger-ui-bundle.js": (SWAGGER_UI, JS),
    "swagger-ui.css": (SWAGGER_UI, CSS),
    "favicon-32x32.png": (SWAGGER_UI, "image/png"),
    "docs.js": ("web", JS),
    "docs.css": ("web", CSS),
}
"""The files /docs/assets/ serves: name → (where it comes from, content type)."""
PAGE = "docs.html"


def swagger_ui_dir() -> Path:
    """The Swagger UI distribution of the installed package (imported here, at first use, so a
    missing install names the package in the error)."""
    from swagger_ui_bundle import swagger_ui_path  # the `swagger-ui-bundle-v2` distribution

    return Path(str(swagger_ui_path))


@functools.cache
def _read(source: str, name: str) -> tuple[bytes, str]:
    """A file's bytes and ETag, read once per replica (the bundle is 1.5 MB; package files do not
    change while the service runs)."""
    if source == SWAGGER_UI:
        data = (swagger_ui_dir() / name).read_bytes()
    else:
        data = resources.files("serve_app").joinpath(source, name).read_bytes()
    return data, f'"{hashlib.sha256(data).hexdigest()[:32]}"'


def _file(request: Request, source: str, name: str, media_type: str) -> Response:
    data, etag = _read(source, name)
    # no-cache: the browser revalidates (the ETag makes that a 304), so an upgrade shows at once
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag in (tag.strip() for tag in request.headers.get("if-none-match", "").split(",")):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)


async def docs_page(request: Request) -> Response:
    """The API reference page (Swagger UI on this service's openapi.json)."""
    return _file(request, "web", PAGE, "text/html; charset=utf-8")


async def docs_asset(request: Request, name: str) -> Response:
    """One file of the API reference page; 404 in the one JSON shape for any other name."""
    if name not in ASSETS:
        return error_response(NotFound(f"no file {name[:64]!r} in the API reference"), retry_after_s=1)
    source, media_type = ASSETS[name]
    return _file(request, source, name, media_type)


def add_routes(api: FastAPI) -> None:
    """Add `GET /docs` and `GET /docs/assets/{name}` to the app (not in its OpenAPI document)."""
    api.add_api_route(DOCS_PATH, docs_page, methods=["GET"], include_in_schema=False)
    api.add_api_route(ASSETS_PATH, docs_asset, methods=["GET"], include_in_schema=False)
