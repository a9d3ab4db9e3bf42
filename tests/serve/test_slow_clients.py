"""Slow clients through real Ray Serve: a client that stops sending its body gets 408 `read_timeout`
and gives its ingress slot back, raw or multipart, while other clients are served."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.conftest import Service
from tests.serve.conftest import small_png

READ_TIMEOUT_S = 1.0
SLOTS = 3  # the ingress's max_ongoing_requests here: a few stalled clients fill it
BOUNDARY = "imgserve-slow-boundary"
FORM_HEAD = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
             "Content-Type: image/png\r\n\r\n").encode()


@pytest.fixture(scope="module")
def service(demo_service) -> Iterator[Service]:
    ingress = {"read_timeout_s": READ_TIMEOUT_S, "max_event_streams": SLOTS - 1,
               "serve": {"max_ongoing_requests": SLOTS, "max_queued_requests": 32}}
    yield from demo_service({"ingress": ingress})


def stall(port: int, form: bool, path: str = "/v1/anime") -> socket.socket:
    """A client that sends its headers and the start of a 100 kB body, then nothing more."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    content_type = f"multipart/form-data; boundary={BOUNDARY}" if form else "image/png"
    start = FORM_HEAD + small_png()[:40] if form else small_png()[:40]
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: {100_000}\r\n\r\n").encode() + start)
    return sock


def answer(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body the server answers on `sock` (then closed)."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before a response: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in
                   (line.split(":", 1) for line in head.decode("latin-1").split("\r\n")[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    finally:
        sock.close()
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("form", [False, True], ids=["raw-body", "multipart"])
def test_a_client_that_stops_sending_gets_408_while_others_are_served(service: Service, ray_cluster: int,
                                                                      form: bool) -> None:
    stalled = stall(ray_cluster, form)
    # another client meanwhile: a whole request, answered normally
    served = service.post_image(small_png(), task="anime", filename="a.png", content_type="image/png")
    assert served.status_code == 200, served.text
    status, body = answer(stalled)
    assert status == 408, body
    assert body["error"]["code"] == "read_timeout" and f"{READ_TIMEOUT_S:g} s" in body["error"]["message"]


def test_stalled_clients_beyond_every_slot_give_them_back(service: Service, ray_cluster: int) -> None:
    # twice as many stalled clients as the ingress has slots, on both upload routes: they fill the
    # slots and the queue; a normal request behind them is served once their deadlines pass
    stalled = [stall(ray_cluster, form=i % 2 == 1, path="/v1/jobs" if i % 3 == 0 else "/v1/anime")
               for i in range(2 * SLOTS)]
    try:
        normal = service.post_image(small_png(), task="anime", filename="a.png", content_type="image/png")
        assert normal.status_code == 200, normal.text
        assert service.http.get("/healthz").status_code == 200
    finally:
        answers = [answer(sock) for sock in stalled]
    assert [status for status, _ in answers] == [408] * len(stalled), answers
    # and the slots stay free: a round of requests, one per slot and more, all served
    assert all(service.http.get("/healthz").status_code == 200 for _ in range(2 * SLOTS))
