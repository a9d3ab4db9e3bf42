"""The ingress's request parsing without Ray: the body read deadline (raw and multipart), the
GET /v1/jobs query, and the ingress settings that keep event streams from taking every slot."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError
from starlette.requests import Request

from deployments.errors import InvalidParameter
from serve_app.config import load_config
from serve_app.errors import ReadTimeout
from serve_app.job_routes import list_query
from serve_app.uploads import read_upload

BOUNDARY = "b0undary"


def stalling_request(content_type: str, first: bytes) -> Request:
    """A request whose client sends `first` and then nothing more (the body never ends)."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": first, "more_body": True}
        await asyncio.Event().wait()  # the client stalls
        raise AssertionError("unreachable")

    scope = {"type": "http", "method": "POST", "path": "/v1/anime", "query_string": b"",
             "headers": [(b"content-type", content_type.encode())]}
    return Request(scope, receive)


@pytest.mark.parametrize("form", [False, True], ids=["raw", "multipart"])
def test_a_client_that_stops_sending_its_body_gets_read_timeout(form: bool) -> None:
    if form:
        request = stalling_request(f"multipart/form-data; boundary={BOUNDARY}",
                                   f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; "
                                   "filename=\"a.png\"\r\n\r\n\x89PNG".encode())
    else:
        request = stalling_request("image/png", b"\x89PNG")
    with pytest.raises(ReadTimeout) as stalled:
        asyncio.run(asyncio.wait_for(read_upload(request, 1024 * 1024, 0.2), 30))
    assert stalled.value.code == "read_timeout" and "0.2 s" in stalled.value.message


def test_a_body_that_keeps_coming_is_read_whatever_its_total_time() -> None:
    pieces = [b"\x89PNG", b"a" * 10, b"b" * 10, b""]

    async def receive() -> dict:
        await asyncio.sleep(0.15)  # each piece well within the deadline; all of them together past it
        body = pieces.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pieces)}

    request = Request({"type": "http", "method": "POST", "path": "/", "query_string": b"",
                       "headers": [(b"content-type", b"image/png")]}, receive)
    image, fields = asyncio.run(read_upload(request, 1024, 0.5))
    assert image == b"\x89PNG" + b"a" * 10 + b"b" * 10 and fields == {}


def trickling_request(every_s: float) -> Request:
    """A request whose client sends its body one byte every `every_s` seconds, forever."""
    async def receive() -> dict:
        await asyncio.sleep(every_s)
        return {"type": "http.request", "body": b"x", "more_body": True}

    return Request({"type": "http", "method": "POST", "path": "/", "query_string": b"",
                    "headers": [(b"content-type", b"image/png")]}, receive)


def test_a_client_trickling_its_body_is_cut_off_once_the_grace_has_passed() -> None:
    # never pauses past the deadline, but 20 bytes/s is below the minimum rate of 1000 bytes/s
    with pytest.raises(ReadTimeout) as trickled:
        asyncio.run(asyncio.wait_for(read_upload(trickling_request(0.05), 1024 * 1024, 0.3, 1000), 30))
    assert "below the minimum of 1000 bytes/s" in trickled.value.message


TASKS = ["real", "anime", "layers"]


def test_the_jobs_listing_query_defaults_and_values() -> None:
    assert list_query(b"", TASKS) == {"limit": 20, "cursor": None, "state": None, "task": None}
    assert list_query(b"limit=5&cursor=abc&state=running&task=anime", TASKS) == {
        "limit": 5, "cursor": "abc", "state": "running", "task": "anime"}
    assert list_query(b"state=&task=", TASKS)["state"] is None


@pytest.mark.parametrize(("query", "field"), [
    (b"limit=0", "limit"), (b"limit=101", "limit"), (b"limit=x", "limit"), (b"limit=-1", "limit"),
    (b"state=done", "state"), (b"task=sketch", "task"), (b"owner=someone", "owner"),
    (b"limit=1&limit=2", "limit"), (b"cursor=" + b"x" * 300, "cursor"), (b"state=%ff", "state"),
])
def test_a_bad_jobs_listing_query_is_refused_naming_the_parameter(query: bytes, field: str) -> None:
    with pytest.raises(InvalidParameter) as refused:
        list_query(query, TASKS)
    assert refused.value.field == field


def test_event_streams_must_leave_ingress_slots_for_other_requests() -> None:
    with pytest.raises(ValidationError, match=r"max_event_streams \(256\) must be below .*max_ongoing_requests \(256\)"):
        load_config({"ingress": {"max_event_streams": 256}})
    with pytest.raises(ValidationError, match="max_event_streams"):
        load_config({"ingress": {"serve": {"max_ongoing_requests": 8}}})
    config = load_config({"ingress": {"max_event_streams": 4, "serve": {"max_ongoing_requests": 8}}})
    assert config.ingress.max_event_streams == 4


@pytest.mark.parametrize("field", ["read_timeout_s", "event_stream_max_s", "event_heartbeat_s"])
def test_ingress_times_must_be_positive(field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        load_config({"ingress": {field: 0}})
