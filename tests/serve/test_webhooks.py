"""Webhooks through real Ray Serve on the demo graph: a real local HTTP receiver that is down for
the first attempts, signatures checked by the test's own verifier (written from the Standard
Webhooks specification), the job's `webhook` status, redirects not followed, refusals naming the
field, and `started`/`progress` events when asked for. Signals (receiver requests, job status),
not sleeps."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import datetime

import pytest

from tests.conftest import Service, wait_until
from tests.serve.conftest import assert_error, job_status, submit
from tests.serve.gate import SlowRealModel
from tests.unit.test_webhooks import SECRET, Receiver, verify


@pytest.fixture(scope="module")
def hooked(demo_service) -> Iterator[tuple[Service, Receiver]]:
    receiver = Receiver({"/flaky": [503, 503], "/redirect": [302] * 1000})
    overrides = {"jobs": {"webhook_allow": ["127.0.0.1"], "webhook_secret_env": None, "webhook_secret": SECRET}}
    try:
        for service in demo_service(overrides, models={"real": SlowRealModel}):
            yield service, receiver
    finally:
        receiver.close()


def webhook_status(service: Service, job_id: str, condition) -> dict:
    """The job's `webhook` status once `condition` holds for it."""
    return wait_until(lambda: condition(w := job_status(service, job_id)["webhook"]) and w, f"{job_id}'s webhook")


def test_a_finished_job_is_delivered_signed_once_the_receiver_recovers(hooked) -> None:
    service, receiver = hooked
    url = receiver.url("/flaky")
    response = submit(service, {"steps": 2, "seed": 5, "webhook_url": url})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert response.json()["webhook"] == {"url": url, "events": ["succeeded", "failed", "cancelled"], "attempts": 0,
                                          "last_status": None, "last_error": None, "delivered": 0, "pending": 0,
                                          "failed": 0}
    attempts = wait_until(lambda: [r for r in receiver.on("/flaky") if r["status"] == 200] and receiver.on("/flaky"),
                          "the receiver to get the delivery")
    assert [a["status"] for a in attempts] == [503, 503, 200]
    payloads = [verify(SECRET, a["headers"], a["body"]) for a in attempts]
    assert len({a["headers"]["webhook-id"] for a in attempts}) == 1  # one message, retried
    payload = payloads[-1]
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job_id
    assert payload["data"]["state"] == "succeeded" and payload["data"]["task"] == "real"
    status = webhook_status(service, job_id, lambda w: w["delivered"])
    assert status["attempts"] == 3 and status["last_status"] == 200 and status["last_error"] is None
    assert status["pending"] == 0 and status["failed"] == 0


def test_started_and_progress_events_are_delivered_when_asked_for(hooked) -> None:
    service, receiver = hooked
    response = submit(service, {"steps": 6, "seed": 6, "webhook_url": receiver.url("/events"),
                                "webhook_events": "started, progress,succeeded"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    wait_until(lambda: any(verify(SECRET, r["headers"], r["body"])["type"] == "job.succeeded"
                           for r in receiver.on("/events")), "job.succeeded")
    payloads = [verify(SECRET, r["headers"], r["body"]) for r in receiver.on("/events")]
    assert all(p["data"]["id"] == job_id for p in payloads)
    kinds = [p["type"] for p in payloads]
    assert kinds.count("job.started") == 1 and kinds.count("job.succeeded") == 1
    progress = sorted((p for p in payloads if p["type"] == "job.progress"), key=lambda p: p["timestamp"])
    # the slow test model denoises for at least 6 × 0.25 s: reports span more than a second
    assert len(progress) >= 2 and all(p["data"]["state"] == "running" for p in progress)
    assert {p["data"]["stage"] for p in progress} <= {"queued", "preprocess", "encode_prompt", "denoise", "decode",
                                                       "postprocess"}
    times = [datetime.fromisoformat(p["timestamp"]).timestamp() for p in progress]
    assert all(b - a >= 0.999 for a, b in itertools.pairwise(times)), times  # at most one a second (ms resolution)
    status = webhook_status(service, job_id, lambda w: w["pending"] == 0)
    assert status["events"] == ["started", "progress", "succeeded"]
    assert status["delivered"] == len(payloads) and status["last_status"] == 200


def test_a_redirect_is_a_failed_attempt_and_is_not_followed(hooked) -> None:
    service, receiver = hooked
    job_id = submit(service, {"steps": 2, "seed": 7, "webhook_url": receiver.url("/redirect")}).json()["id"]
    status = webhook_status(service, job_id, lambda w: w["attempts"] >= 1)
    assert status["last_status"] == 302 and "redirect" in status["last_error"]
    assert status["delivered"] == 0 and status["pending"] == 1  # retried later, until jobs.webhook_retry_s
    assert receiver.on("/ok") == []  # where the redirect pointed


def test_urls_and_events_that_are_not_allowed_are_refused_naming_the_field(hooked) -> None:
    service, receiver = hooked
    for url in ("http://hooks.example.com/h", "http://10.0.0.1/h", f"http://localhost:{receiver.port}/h",
                "ftp://127.0.0.1/h", "not a url"):
        error = assert_error(submit(service, {"steps": 2, "webhook_url": url}), 422, "invalid_parameter",
                             "webhook_url")
        assert error["param"] == "webhook_url", error
    assert_error(submit(service, {"steps": 2, "webhook_url": receiver.url("/x"), "webhook_events": "done"}), 422,
                 "invalid_parameter", "webhook_events")
    assert_error(submit(service, {"steps": 2, "webhook_events": "succeeded"}), 422, "invalid_parameter",
                 "webhook_events")
    assert not receiver.on("/x") and not receiver.on("/h")
