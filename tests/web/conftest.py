"""The web page against the demo service on real Ray Serve, driven in Debian's headless Chromium.

One service for the whole package (the demo config with a 512 px long edge, a one-job queue and a
`real` model that can be held at a denoising step), on the session's local Ray (`ray_cluster` in
tests/conftest.py, the one tests/serve uses too).
The browser is /usr/bin/chromium driven by Playwright (never a downloaded browser); where either
is missing the browser tests skip and say why. Screenshots go to a temporary directory, or to
$IMGSERVE_SCREENSHOTS (e.g. docs/screenshots) when it is set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from tests.conftest import REPO, Service
from tests.serve.gate import Gate
from tests.web.hold import HOLD_NAME, HOLD_NAMESPACE, HeldRealModel

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
VIEWPORT = {"width": 1100, "height": 800}
MAX_LONG_EDGE = 512


OWN_SERVICES = ("test_generic.py", "test_keys.py")
"""Modules with a service of their own (module-scoped): they run before the package's `web_service`."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """One service at a time in this package: the modules of `OWN_SERVICES` run before the other
    modules here (the package's `web_service`), whatever order they were named in; two services do
    not fit the session's Ray at once and are the same app at the same route."""
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if item.path.parent == here]
    ordered = sorted((items[i] for i in slots), key=lambda item: item.path.name not in OWN_SERVICES)
    for i, item in zip(slots, ordered):
        items[i] = item


@pytest.fixture(scope="package")
def hold(ray_cluster: int) -> Iterator[object]:
    actor = Gate.options(name=HOLD_NAME, namespace=HOLD_NAMESPACE).remote()
    yield actor
    ray.kill(actor)


@pytest.fixture(scope="package")
def web_service(demo_service, hold) -> Iterator[Service]:
    yield from demo_service({"preprocess": {"max_long_edge": MAX_LONG_EDGE}, "jobs": {"max_queued": 1, "concurrency": 1}},
                            models={"real": HeldRealModel})


@pytest.fixture(scope="package")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing (Debian package `chromium`; scripts/setup.sh test installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (the `test` extra: pip install -e '.[test]')")
    with sync_playwright() as playwright:
        try:
            instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as exc:  # a broken install: say so instead of failing every test
            pytest.skip(f"{CHROMIUM} does not start under Playwright: {str(exc).splitlines()[0]}")
        yield instance
        instance.close()


@pytest.fixture()
def context(browser, web_service: Service):
    """A fresh browser profile (viewport 1100×800, downloads on) pointed at the service."""
    # the tests' string predicates (`wait_for_function`) are evaluated in the page, which the page's own
    # Content-Security-Policy forbids: bypassed here; test_page checks the page works under its policy
    ctx = browser.new_context(viewport=VIEWPORT, accept_downloads=True, base_url=web_service.url, bypass_csp=True)
    ctx.set_default_timeout(120_000)
    yield ctx
    ctx.close()


@pytest.fixture()
def page(context):
    return context.new_page()


@pytest.fixture(scope="package")
def screenshots(tmp_path_factory) -> Path:
    target = os.environ.get("IMGSERVE_SCREENSHOTS")
    path = (REPO / target) if target and not os.path.isabs(target) else Path(target) if target else None
    if path is None:
        path = tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path
