"""The API reference at /docs as a browser shows it, offline: Swagger UI served by the service
itself (from an installed package), under the same self-only Content-Security-Policy as the page.
Every request the browser makes is recorded, and any to another host is refused, as on a cluster
without internet access."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import Service
from tests.web.conftest import VIEWPORT

pytestmark = [pytest.mark.serve, pytest.mark.browser]

REAL_OPERATION = '.opblock-post .opblock-summary-path[data-path="/v1/real"]'
"""Swagger UI's block of the `POST /v1/real` operation."""


@dataclass
class Offline:
    """A browser profile that enforces the pages' policy and reaches only the service."""

    context: Any
    host: str
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    """(URL, Authorization header) of every request its pages made, refused ones included."""
    refused: list[str] = field(default_factory=list)
    """Content-Security-Policy complaints and script errors of its pages."""

    def page(self) -> Any:
        page = self.context.new_page()
        page.on("console", lambda message: self.refused.append(message.text)
                if "Content Security Policy" in message.text else None)
        page.on("pageerror", lambda error: self.refused.append(f"page error: {error}"))
        return page

    def elsewhere(self) -> list[str]:
        """The URLs of requests to any other host than the service."""
        return [url for url, _ in self.requests if urlsplit(url).netloc != self.host]


@contextlib.contextmanager
def offline(browser, service: Service) -> Iterator[Offline]:
    """An `Offline` profile for `service`, closed on leaving."""
    context = browser.new_context(viewport=VIEWPORT, base_url=service.url)
    context.set_default_timeout(120_000)
    recorded = Offline(context, urlsplit(service.url).netloc)

    def route(route) -> None:
        request = route.request
        recorded.requests.append((request.url, request.headers.get("authorization")))
        route.continue_() if urlsplit(request.url).netloc == recorded.host else route.abort()

    context.route("**/*", route)
    try:
        yield recorded
    finally:
        context.close()


def test_the_api_reference_works_offline_under_its_content_security_policy(browser, web_service: Service) -> None:
    with offline(browser, web_service) as browsing:
        page = browsing.page()
        response = page.goto("/docs")
        policy = response.headers["content-security-policy"]
        assert policy == web_service.http.get("/").headers["content-security-policy"]  # the page's own
        assert "default-src 'self'" in policy and "http" not in policy
        operation = page.locator(REAL_OPERATION)
        operation.wait_for(state="visible")
        assert page.locator('.opblock-summary-path[data-path="/v1/anime"]').is_visible()
        # unfolded, the operation shows the task's own fields from the running config
        operation.click()
        opened = page.locator(".opblock-post.is-open").first
        opened.locator(".opblock-body").wait_for(state="visible")
        assert "multipart/form-data" in opened.text_content() and "lora" in opened.text_content()
        assert page.text_content("#key-state") == ""  # keys are off: nothing to ask for
        assert any(url.endswith("/docs/assets/swagger-ui-bundle.js") for url, _ in browsing.requests)
        assert browsing.elsewhere() == []
        assert browsing.refused == []
