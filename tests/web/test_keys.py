"""The web page and the API reference with API keys configured, in a browser that enforces their
Content-Security-Policy and reaches only the service: each asks for the key, keeps it in the
browser (one storage for both pages), and sends it as `Authorization: Bearer` with its requests,
/openapi.json included, never in a URL.

A service of its own (the demo with one key), deployed before the package's `web_service` like
test_generic.py's (conftest runs both modules first).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from serve_app.keys import hash_key
from tests.conftest import Service, sample_path
from tests.web.conftest import MAX_LONG_EDGE
from tests.web.test_docs import REAL_OPERATION, offline
from tests.web.test_page import start_and_wait

pytestmark = [pytest.mark.serve, pytest.mark.browser]

KEY = f"isk_web_{secrets.token_urlsafe(24)}"


@pytest.fixture(scope="module")
def keyed_service(demo_service) -> Iterator[Service]:
    yield from demo_service({"preprocess": {"max_long_edge": MAX_LONG_EDGE},
                             "ingress": {"api_keys_sha256": [hash_key(KEY)]}})


def keyed_requests(requests: list[tuple[str, str | None]], path: str) -> list[str | None]:
    """The Authorization header of each request for `path`, in order."""
    return [authorization for url, authorization in requests if url.split("?")[0].endswith(path)]


def test_with_keys_the_page_asks_for_one_and_sends_it_with_every_request(browser, keyed_service: Service) -> None:
    with offline(browser, keyed_service) as browsing:
        page = browsing.page()
        page.goto("/")
        page.wait_for_selector("#error:not([hidden])")
        assert page.text_content("#error-title") == "An API key is needed"
        assert page.get_attribute("#api-key", "aria-invalid") == "true"
        page.fill("#api-key", KEY)
        page.press("#api-key", "Tab")  # the field's change: the page reloads the tasks with the key
        page.wait_for_selector("#real-lora option", state="attached")
        assert page.is_hidden("#error")
        # the form is built from openapi.json, which needs the key: it was sent (and never in a URL)
        assert keyed_requests(browsing.requests, "/openapi.json")[-1] == f"Bearer {KEY}"
        assert keyed_requests(browsing.requests, "/v1/models")[-1] == f"Bearer {KEY}"
        page.set_input_files("#file", str(sample_path("photo_1.jpg")))
        page.wait_for_selector("#preview:not([hidden])")
        page.check('input[name="task"][value="anime"]')
        start_and_wait(page)  # a job: submitted, followed (a keyed event stream) and fetched with the key
        assert page.text_content("#progress-state") == "Done"
        jobs = [authorization for url, authorization in browsing.requests if "/v1/jobs" in url]
        assert jobs and set(jobs) == {f"Bearer {KEY}"}

        # the API reference in the same browser finds the key the page keeps
        page.goto("/docs")
        page.locator(REAL_OPERATION).wait_for(state="visible")
        assert page.text_content("#key-state") == "Key in use."
        assert KEY not in " ".join(url for url, _ in browsing.requests)
        assert browsing.elsewhere() == [] and browsing.refused == []


def test_with_keys_the_api_reference_asks_for_one_then_shows_the_operations(browser, keyed_service: Service) -> None:
    with offline(browser, keyed_service) as browsing:
        page = browsing.page()
        page.goto("/docs")
        page.wait_for_selector("#key-state.problem")
        assert page.text_content("#key-state") == "This service needs an API key to show its reference: enter it above."
        assert page.get_attribute("#api-key", "aria-invalid") == "true"
        assert page.locator(".opblock").count() == 0  # the document was refused: no operation shown
        page.fill("#api-key", "not-the-key")
        page.click("#key-form button")
        page.wait_for_selector("#key-state:has-text('not accepted')")
        page.fill("#api-key", KEY)
        page.click("#key-form button")
        page.locator(REAL_OPERATION).wait_for(state="visible")
        assert page.text_content("#key-state") == "Key in use."
        assert page.get_attribute("#api-key", "aria-invalid") is None
        assert keyed_requests(browsing.requests, "/openapi.json") == [None, "Bearer not-the-key", f"Bearer {KEY}"]
        assert KEY not in " ".join(url for url, _ in browsing.requests)
        assert browsing.elsewhere() == [] and browsing.refused == []
