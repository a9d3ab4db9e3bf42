"""The text encoder stage in the served graph: one shared TextEncoder deployment, the LoRA load
overlapping the encoding, and failure and backpressure like every other stage.

The demo graph runs the stage (`text_encoder.mode: stage`). The test encoder holds requests with
a marked prompt at the gate, or meets the model's adapter load (tests/serve/gate.py): signals,
not sleeps, show what runs when.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait

import pytest
import ray
from ray import serve

from tests.conftest import wait_until
from tests.serve.conftest import job_status, small_png, submit, wait_state
from tests.serve.gate import (
    HOLD_PROMPT,
    OVERLAP_PROMPT,
    RENDEZVOUS_NAME,
    MeetingRealModel,
    Rendezvous,
    StageTestEncoder,
)
from tests.serve.test_jobs import replica_actor

DEADLINE_S = 120  # a generous bound for "never a hang", not a timing assertion


@pytest.fixture(scope="module")
def staged(demo_service, gate):
    rendezvous = Rendezvous.options(name=RENDEZVOUS_NAME).remote()
    overrides = {"text_encoder": {"serve": {"max_ongoing_requests": 1, "max_queued_requests": 1}},
                 "ingress": {"retry_after_s": 3}}
    try:
        for service in demo_service(overrides, models={"real": MeetingRealModel}, encoder=StageTestEncoder):
            yield service, gate, rendezvous
    finally:
        ray.kill(rendezvous)


def encoder_stats() -> dict:
    return serve.get_deployment_handle("TextEncoder", "imgserve").stats.remote().result()


def test_one_text_encoder_deployment_serves_real_and_layers(staged) -> None:
    service, _, _ = staged
    deployments = serve.status().applications["imgserve"].deployments
    assert "TextEncoder" in deployments and not any(name.startswith("TextEncoder_") for name in deployments)
    real = service.post_image(small_png(), {"steps": 2, "seed": 1, "lora": "none"}, content_type="image/png")
    layers = service.post_image(small_png(), {"steps": 2, "seed": 1, "layers": 2, "format": "zip"}, task="layers",
                                content_type="image/png")
    assert real.status_code == 200 and layers.status_code == 200, (real.text, layers.text)
    stats = encoder_stats()
    assert stats["encoders"] == 1  # the tiny pipelines' encoders are the same bytes: loaded once
    assert stats["tasks"]["real"] == stats["tasks"]["layers"]
    assert real.headers["x-imgserve-encoder"] == stats["replica"] == layers.headers["x-imgserve-encoder"]
    assert service.model_stats()["text_encoder"] == "stage"  # the model replica holds none


def test_a_cold_version_loads_while_the_prompt_is_encoded(staged) -> None:
    service, _, rendezvous = staged
    before = service.model_stats()["adapters"]
    cold = next(v for v in ("v2511-0715", "v2511-0801", "v2511-0823") if v not in before)
    ray.get(rendezvous.arm.remote())
    # the encoder waits for the load to start and the load for the encoding to start: one after
    # the other, neither would (each gives up after a minute and the request fails)
    response = service.post_image(small_png(), {"steps": 2, "seed": 3, "lora": cold, "prompt": OVERLAP_PROMPT},
                                  content_type="image/png")
    assert response.status_code == 200, response.text
    assert response.headers["x-imgserve-lora"] == cold
    assert response.headers["x-imgserve-lora-load"] == "cold"  # the request paid for the load, ahead of time
    assert cold in service.model_stats()["adapters"]


def test_a_full_encoder_queue_is_503_queue_full_with_retry_after(staged) -> None:
    service, gate, _ = staged
    ray.get(gate.close.remote())
    burst = 6
    # one request in the encoder, one in its queue, and one more that Serve's router may admit
    # while it retries a request the busy replica turned away: the rest are refused at once
    admitted = 3
    with ThreadPoolExecutor(burst) as pool:
        futures = [pool.submit(service.post_image, small_png(), {"steps": 2, "seed": i, "prompt": HOLD_PROMPT,
                                                                 "lora": "none"}, content_type="image/png")
                   for i in range(burst)]
        try:
            wait_until(lambda: ray.get(gate.count.remote()) >= 1, "a request to enter the encoder")
            wait_until(lambda: sum(f.done() for f in futures) >= burst - admitted, "refusals of the burst")
            refused = [f.result() for f in futures if f.done()]
            assert all(r.status_code == 503 for r in refused), [r.text for r in refused]
            for response in refused:
                assert response.headers["retry-after"] == "3"
                assert response.json()["error"]["code"] == "queue_full"
        finally:
            gate.open.remote()  # whatever happened above, nothing stays held for the next test
        done, pending = wait(futures, timeout=DEADLINE_S)
        assert not pending
        statuses = [f.result().status_code for f in futures]
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 1, statuses


def test_a_lost_encoder_replica_is_503_unavailable_and_a_job_is_retried(staged) -> None:
    service, gate, _ = staged
    ray.get(gate.close.remote())
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(service.post_image, small_png(), {"steps": 2, "seed": 5, "prompt": HOLD_PROMPT},
                           content_type="image/png")
        wait_until(lambda: ray.get(gate.count.remote()) >= 1, "the request to enter the encoder")
        ray.kill(replica_actor("TextEncoder"), no_restart=False)
        lost = held.result(timeout=DEADLINE_S)
    assert lost.status_code == 503, lost.text
    assert lost.json()["error"]["code"] == "unavailable" and lost.headers["retry-after"]

    ray.get(gate.close.remote())
    fields = {"steps": 2, "seed": 6, "prompt": HOLD_PROMPT, "lora": "none"}
    job_id = submit(service, fields).json()["id"]
    wait_until(lambda: ray.get(gate.count.remote()) >= 1, "the job to enter the encoder")
    assert job_status(service, job_id)["stage"] == "encode_prompt"  # the page's progress shows it
    ray.kill(replica_actor("TextEncoder"), no_restart=False)
    gate.open.remote()
    final = wait_state(service, job_id, "succeeded", "failed")
    assert final["state"] == "succeeded", final
    again = service.post_image(small_png(), fields, content_type="image/png")
    assert again.status_code == 200
    assert service.http.get(f"/v1/jobs/{job_id}/result").content == again.content
