"""Backpressure: a full model queue answers 503 + Retry-After with the JSON error, never 500 or a hang."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait

import pytest
import ray

from tests.conftest import wait_until
from tests.serve.conftest import small_png
from tests.serve.gate import GatedRealModel

BURST = 8
DEADLINE_S = 120  # a generous bound for "never a hang", not a timing assertion


@pytest.fixture(scope="module")
def gated(demo_service, gate):
    overrides = {"real": {"serve": {"max_ongoing_requests": 1, "max_queued_requests": 1}},
                 "ingress": {"retry_after_s": 3}}
    for service in demo_service(overrides, models={"real": GatedRealModel}):
        yield service, gate



def test_burst_gets_503_with_retry_after_and_accepted_requests_finish(gated) -> None:
    service, gate = gated
    image = small_png()
    with ThreadPoolExecutor(BURST) as pool:
        futures = [pool.submit(service.post_image, image, {"steps": 2, "seed": i}) for i in range(BURST)]
        # The gate holds the first request inside the model; the rest queue or are refused.
        wait_until(lambda: ray.get(gate.count.remote()) >= 1, "a request to enter the model")
        wait_until(lambda: sum(f.done() for f in futures) >= BURST - 2, "refusals of the burst")
        refused = [f.result() for f in futures if f.done()]
        assert refused and all(r.status_code == 503 for r in refused), [r.status_code for r in refused]
        for response in refused:
            assert response.headers["retry-after"] == "3"
            assert response.json()["error"]["code"] == "queue_full"
        accepted = [f for f in futures if not f.done()]
        assert 1 <= len(accepted) <= 2
        gate.open.remote()
        done, pending = wait(accepted, timeout=DEADLINE_S)
        assert not pending
        assert all(f.result().status_code == 200 for f in done)
    # the service keeps answering after the burst
    assert service.post_image(image, {"steps": 2}).status_code == 200
