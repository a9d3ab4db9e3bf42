"""serve_app.client against a fake service (httpx.MockTransport): following a job's events across
streams the service ends (their lifetime), resuming with Last-Event-ID; listing jobs page by page."""

from __future__ import annotations

import json

import httpx

from serve_app.client import Client, Job


def sse(*events: tuple[int, dict], end: str = "") -> bytes:
    frames = [f"event: progress\nid: {i}\ndata: {json.dumps(e)}\n\n" for i, e in events]
    return ("".join(frames) + ": keep-alive\n\n" + end).encode()


def running(step: int) -> dict:
    return {"state": "running", "stage": "denoise", "step": step, "total_steps": 2, "queue_position": None}


def test_events_resume_after_a_stream_the_service_ended() -> None:
    asked: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        last = request.headers.get("last-event-id")
        asked.append(last)
        if last is None:  # the first stream ends at its lifetime, the job still running
            return httpx.Response(200, content=sse((1, running(1)), end=": stream lifetime reached\n\n"))
        assert last == "1"
        return httpx.Response(200, content=sse((2, running(2)), (3, {"state": "succeeded", "stage": "done"})))

    client = Client("http://imgserve")
    client.http = httpx.Client(base_url="http://imgserve", transport=httpx.MockTransport(handler))
    seen = list(Job(client, "j" * 32).events())
    assert [e.get("step") for e in seen] == [1, 2, None] and seen[-1]["state"] == "succeeded"
    assert asked == [None, "1"]


def test_events_stop_when_streams_keep_ending_empty() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, content=b": keep-alive\n\n")

    client = Client("http://imgserve")
    client.http = httpx.Client(base_url="http://imgserve", transport=httpx.MockTransport(handler))
    assert list(Job(client, "j" * 32).events()) == []
    assert len(calls) == 3


def test_jobs_lists_pages_and_all_jobs_follows_them() -> None:
    pages = {None: (["c", "b"], "cur1"), "cur1": (["a"], None)}

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/jobs" and request.url.params.get("state") == "succeeded"
        ids, cursor = pages[request.url.params.get("cursor")]
        return httpx.Response(200, json={"object": "list", "data": [{"id": i} for i in ids], "next_cursor": cursor})

    client = Client("http://imgserve")
    client.http = httpx.Client(base_url="http://imgserve", transport=httpx.MockTransport(handler))
    assert [j["id"] for j in client.jobs(state="succeeded")["data"]] == ["c", "b"]
    assert [j["id"] for j in client.all_jobs(state="succeeded")] == ["c", "b", "a"]
