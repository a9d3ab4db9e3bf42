"""The web page's routes without a browser: `/` is the page, its assets come with the right types,
nothing else is served from the web directory, and the files are package data; the same for the API
reference at /docs, whose Swagger UI comes from an installed package (no CDN)."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from importlib import resources

import pytest

from tests.conftest import REPO, Service
from tests.serve.conftest import assert_error

pytestmark = pytest.mark.serve

ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
DOCS_FILES = ("docs.html", "docs.js", "docs.css")
"""The API reference page's own files (serve_app/web/); Swagger UI's come from its package."""
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
               "favicon-32x32.png": "image/png", "docs.js": "text/javascript; charset=utf-8",
               "docs.css": "text/css; charset=utf-8"}


def packaged(name: str) -> bytes:
    return resources.files("serve_app").joinpath("web", name).read_bytes()


def test_root_is_the_page_and_assets_have_their_content_types(web_service: Service) -> None:
    page = web_service.http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.content == packaged("index.html")
    assert '<script src="web/app.js" defer></script>' in page.text
    assert '<link rel="stylesheet" href="web/style.css">' in page.text
    for name, media_type in ASSETS.items():
        response = web_service.http.get(f"/web/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"] == f"{media_type}; charset=utf-8"
        assert response.content == packaged(name)


def test_only_the_page_files_are_served(web_service: Service) -> None:
    for path in ("/web/ingress.py", "/web/..%2Fingress.py", "/web/", "/web/index.htm"):
        assert_error(web_service.http.get(path), 404, "not_found")
    # the API's own document stays about the API
    paths = web_service.http.get("/openapi.json").json()["paths"]  # without keys configured: open
    assert "/" not in paths and "/web/{name}" not in paths
    assert "/docs" not in paths and "/docs/assets/{name}" not in paths


def test_the_api_reference_and_its_assets_come_from_the_service(web_service: Service) -> None:
    from swagger_ui_bundle import swagger_ui_path

    page = web_service.http.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.content == packaged("docs.html")
    for name, media_type in DOCS_ASSETS.items():
        response = web_service.http.get(f"/docs/assets/{name}")
        assert response.status_code == 200 and response.headers["content-type"] == media_type, name
        origin = packaged(name) if name in DOCS_FILES else (swagger_ui_path / name).read_bytes()
        assert response.content == origin, name
    # a second visit revalidates: 304 without the 1.5 MB bundle
    first = web_service.http.get("/docs/assets/swagger-ui-bundle.js")
    again = web_service.http.get("/docs/assets/swagger-ui-bundle.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    for path in ("/docs/assets/index.html", "/docs/assets/swagger-ui.js.map", "/docs/assets/..%2Fdocs.html",
                 "/docs/assets/docs.html", "/redoc", "/docs/oauth2-redirect"):
        assert_error(web_service.http.get(path), 404, "not_found")


def test_the_api_reference_loads_nothing_from_elsewhere_and_runs_nothing_inline() -> None:
    for name in DOCS_FILES:
        text = packaged(name).decode("utf-8")
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import", text, re.IGNORECASE), name
    html = packaged("docs.html").decode("utf-8")
    assert sorted(re.findall(r'(?:src|href)="([^"]+)"', html)) == sorted(f"docs/assets/{name}" for name in DOCS_ASSETS)
    assert not re.search(r"<script>|<style|\son[a-z]+=|style=", html)  # nothing the page's policy would refuse


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """Works offline: no absolute URL, no protocol-relative URL, no import of another file."""
    for name in ("index.html", *ASSETS):
        text = packaged(name).decode("utf-8")
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import", text, re.IGNORECASE), name
    html = packaged("index.html").decode("utf-8")
    assert sorted(re.findall(r'(?:src|href)="(web/[^"]+)"', html)) == ["web/app.js", "web/style.css"]


def test_the_page_files_are_package_data() -> None:
    """`[tool.setuptools.package-data]` names every file of the page, so a non-editable install
    (a wheel on a cluster node) serves it too."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["serve_app"]
    files = sorted(p.relative_to(REPO / "serve_app").as_posix() for p in (REPO / "serve_app" / "web").iterdir())
    assert files == ["web/app.js", "web/docs.css", "web/docs.html", "web/docs.js", "web/index.html", "web/style.css"]
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
