"""Access and safety through real Ray Serve: API keys, rate limit, CORS, request ids, JSON logs, and
upload limits enforced before the body has arrived (over a raw socket)."""

from __future__ import annotations

import json
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serve_app.uploads import FORM_OVERHEAD_BYTES
from serve_app.keys import hash_key, key_id
from tests import conftest as root
from tests.conftest import Service, wait_until
from tests.serve.conftest import assert_error, small_png, submit

MAX_BYTES = 1024 * 1024
ALLOWED = "https://studio.example.com"
# One key per test, so one test's use of the rate limit never starves another.
KEYS = {name: f"isk_{name}_{secrets.token_urlsafe(24)}" for name in ("auth", "rate", "cors", "ids", "upload", "jobs",
                                                                         "headers", "docs")}
WRONG_KEY = f"isk_wrong_{secrets.token_urlsafe(24)}"
BURST = 5
PER_MINUTE = 6  # one token every 10 s after the burst
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def service(demo_service) -> Iterator[Service]:
    ingress = {"api_keys_sha256": [hash_key(key) for key in KEYS.values()], "rate_limit_per_minute": PER_MINUTE,
               "rate_limit_burst": BURST, "cors_origins": [ALLOWED]}
    # What `logging_config: {encoding: JSON}` does in configs/*.yaml, for every deployment of the app.
    yield from demo_service({"preprocess": {"max_long_edge": 256, "max_bytes": MAX_BYTES}, "ingress": ingress},
                            logging_config={"encoding": "JSON"})


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def one_request_id(response: httpx.Response) -> str:
    values = response.headers.get_list("x-request-id")
    assert len(values) == 1, values  # one id: Serve's, never a second one of ours
    return values[0]


# -- keys ---------------------------------------------------------------------------------------------
def test_v1_routes_need_a_configured_key_in_either_header(service: Service) -> None:
    missing = service.http.get("/v1/models")
    assert_error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert_error(service.http.get("/v1/models", headers={"Authorization": f"Bearer {WRONG_KEY}"}), 401, "unauthorized")
    assert_error(service.http.get("/v1/models", headers={"X-API-Key": WRONG_KEY}), 401, "unauthorized")
    assert_error(service.post_image(small_png(), task="anime"), 401, "unauthorized")  # refused before the upload is read
    assert service.http.get("/v1/models", headers=bearer("auth")).status_code == 200
    assert service.http.get("/v1/models", headers={"X-API-Key": KEYS["auth"]}).json()["tasks"]


def test_health_the_web_page_and_the_api_reference_page_stay_open(service: Service) -> None:
    assert service.http.get("/healthz").json()["status"] == "ok"
    assert service.http.get("/").status_code == 200
    page = service.http.get("/web/app.js")
    assert page.status_code == 200 and "Authorization" in page.text  # the page can send a key
    for path in ("/docs", "/docs/assets/swagger-ui-bundle.js", "/docs/assets/docs.js"):
        assert service.http.get(path).status_code == 200, path
    assert "Authorization" in service.http.get("/docs/assets/docs.js").text  # the reference page sends a key too


def test_with_keys_the_openapi_document_needs_one(service: Service) -> None:
    """It lists the LoRA versions and styles that /v1/models protects."""
    missing = service.http.get("/openapi.json")
    assert_error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"].startswith("Bearer") and "v2511" not in missing.text
    assert_error(service.http.get("/openapi.json", headers={"X-API-Key": WRONG_KEY}), 401, "unauthorized")
    document = service.http.get("/openapi.json", headers=bearer("docs"))
    assert document.status_code == 200 and "/v1/real" in document.json()["paths"]
    assert service.http.get("/openapi.json", headers={"X-API-Key": KEYS["docs"]}).json()["paths"]


def test_pages_and_the_api_send_security_headers_and_head_answers_like_get(service: Service) -> None:
    for path, headers in (("/", {}), ("/web/app.js", {}), ("/healthz", {}), ("/v1/models", bearer("headers")),
                          ("/v1/models", {}), ("/docs", {}), ("/docs/assets/swagger-ui-bundle.js", {}),
                          ("/openapi.json", bearer("headers"))):
        response = service.http.get(path, headers=headers)
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["x-frame-options"] == "DENY" and response.headers["referrer-policy"] == "no-referrer"
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, path
        assert "http" not in policy  # nothing from another origin
    # the API reference is served by the service (no CDN): the same policy; FastAPI's CDN pages are gone
    assert service.http.get("/docs").headers["content-security-policy"] == service.http.get("/").headers[
        "content-security-policy"]
    for path in ("/redoc", "/docs/oauth2-redirect"):
        assert_error(service.http.get(path), 404, "not_found")
    page, head = service.http.get("/"), service.http.head("/")
    assert head.status_code == 200 and head.headers["content-type"] == page.headers["content-type"]
    assert head.headers["content-length"] == page.headers["content-length"] and head.content == b""


def test_wrong_keys_cost_the_client_address_its_tokens(service: Service) -> None:
    answers = [service.http.get("/v1/models", headers={"X-API-Key": f"{WRONG_KEY}{i}"}) for i in range(BURST + 1)]
    limited = [response for response in answers if response.status_code == 429]
    assert limited and limited[0].json()["error"]["code"] == "rate_limited" and int(limited[0].headers["retry-after"]) >= 1
    assert all(response.status_code == 401 for response in answers[:answers.index(limited[0])])
    assert service.http.get("/v1/models", headers=bearer("headers")).status_code == 200  # a right key has its own bucket


# -- rate limit ---------------------------------------------------------------------------------------
def test_past_the_burst_a_key_gets_429_with_retry_after(service: Service) -> None:
    statuses = [service.http.get("/v1/models", headers=bearer("rate")).status_code for _ in range(BURST)]
    assert statuses == [200] * BURST
    limited = service.http.get("/v1/models", headers=bearer("rate"))
    assert_error(limited, 429, "rate_limited")
    assert 1 <= int(limited.headers["retry-after"]) <= 60 // PER_MINUTE
    # other keys keep their own budget
    assert service.http.get("/v1/models", headers=bearer("cors")).status_code == 200


# -- CORS ---------------------------------------------------------------------------------------------
def test_preflight_and_cors_headers_only_for_listed_origins(service: Service) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = service.http.options("/v1/real", headers={"Origin": ALLOWED, **preflight})
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert {"authorization", "content-type"} <= {h.strip().lower() for h in allowed.headers["access-control-allow-headers"].split(",")}
    other = service.http.options("/v1/real", headers={"Origin": "https://elsewhere.example", **preflight})
    assert "access-control-allow-origin" not in other.headers

    response = service.post_image(small_png(), task="anime", filename="a.png", content_type="image/png",
                                  headers={"Origin": ALLOWED, **bearer("cors")})
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ALLOWED and "origin" in response.headers["vary"].lower()
    exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "retry-after", "x-imgserve-style", "x-imgserve-size"} <= exposed
    denied = service.http.get("/v1/models", headers={"Origin": ALLOWED})  # the page can read its 401
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ALLOWED
    plain = service.http.get("/v1/models", headers={"Origin": "https://elsewhere.example", **bearer("cors")})
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


# -- request ids --------------------------------------------------------------------------------------
def test_every_response_carries_one_request_id_and_a_safe_client_id_is_kept(service: Service) -> None:
    assert UUID.match(one_request_id(service.http.get("/v1/models", headers=bearer("ids"))))
    assert UUID.match(one_request_id(service.http.get("/v1/models")))  # 401
    assert UUID.match(one_request_id(service.http.get("/healthz")))
    assert UUID.match(one_request_id(service.http.post("/v1/nope", headers=bearer("ids"))))  # 404
    own = "client-req_42.a"
    response = service.http.get("/v1/models", headers={**bearer("ids"), "X-Request-Id": own})
    assert response.status_code == 200 and one_request_id(response) == own
    error = service.http.post("/v1/anime", headers={**bearer("ids"), "X-Request-Id": own + "-err"},
                              content=b"not an image", params={"style": "paprika"})
    assert error.status_code in (400, 415) and one_request_id(error) == own + "-err"
    unsafe = service.http.get("/healthz", headers={"X-Request-Id": "a" * 200})
    assert assert_error(unsafe, 422, "invalid_parameter")["field"] == "X-Request-Id"


def test_a_job_keeps_the_request_id_of_its_submission(service: Service) -> None:
    submitted = submit(service, {}, task="anime", headers={**bearer("jobs"), "X-Request-Id": "job-submit-1"})
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["request_id"] == "job-submit-1"
    status = service.http.get(f"/v1/jobs/{submitted.json()['id']}", headers=bearer("jobs")).json()
    assert status["request_id"] == "job-submit-1"


# -- upload limits before the body --------------------------------------------------------------------
def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def test_a_declared_huge_body_is_refused_before_it_is_sent(service: Service, ray_cluster: int) -> None:
    declared = 10 * 1024**3  # 10 GiB announced, 64 KiB sent
    sock = _connect(ray_cluster)
    try:
        sock.sendall((f"POST /v1/anime HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                      f"X-API-Key: {KEYS['upload']}\r\nContent-Length: {declared}\r\n\r\n").encode() + b"\0" * 65536)
        status, headers, body = _read_response(sock)
    finally:
        sock.close()
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    assert UUID.match(headers["x-request-id"])


BOUNDARY = "imgserve-test-boundary"
FORM_HEAD = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
             "Content-Type: image/png\r\n\r\n").encode()


@pytest.mark.parametrize("form", [False, True], ids=["raw-body", "multipart"])
def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(service: Service, ray_cluster: int,
                                                                  form: bool) -> None:
    # One chunk past the limit, and the body never ends (no terminating chunk): only a server that
    # refuses as soon as the limit is passed answers at all; one that waited for the end of the body
    # would leave the read below to run into the socket's timeout. A form is parsed from the same
    # chunks as they arrive, and may carry FORM_OVERHEAD_BYTES of framing and fields on top.
    limit = MAX_BYTES + (FORM_OVERHEAD_BYTES if form else 0)
    content_type = f"multipart/form-data; boundary={BOUNDARY}" if form else "image/png"
    chunk = 64 * 1024
    chunks = limit // chunk + 1
    sock = _connect(ray_cluster)
    sent = 0
    try:
        sock.sendall((f"POST /v1/anime HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                      f"X-API-Key: {KEYS['upload']}\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
        for index in range(chunks):
            data = FORM_HEAD if form and index == 0 else b""
            data += b"\1" * (chunk - len(data))
            try:
                sock.sendall(f"{chunk:x}\r\n".encode() + data + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and stopped reading: its answer is waiting
            sent += chunk
        status, _, body = _read_response(sock)
    finally:
        sock.close()
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    assert limit <= sent <= chunks * chunk, sent  # not refused before the limit was passed


def test_a_broken_form_is_refused_before_the_rest_of_its_body_arrives(service: Service, ray_cluster: int) -> None:
    # 512 KiB announced, 64 KiB sent of a body with no multipart framing at all, and then nothing:
    # only a server that parses the form as it arrives answers; one that waited for the whole body
    # would leave the read below to run into the socket's timeout.
    sock = _connect(ray_cluster)
    try:
        sock.sendall((f"POST /v1/anime HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                      f"X-API-Key: {KEYS['upload']}\r\nContent-Length: {512 * 1024}\r\n\r\n").encode()
                     + b"\1" * (64 * 1024))
        status, _, body = _read_response(sock)
    finally:
        sock.close()
    assert status == 400, body
    error = json.loads(body)["error"]
    assert error["code"] == "bad_image" and error["field"] == "image" and "multipart" in error["message"]


def test_the_ingress_serves_normally_after_refused_uploads(service: Service) -> None:
    assert service.http.get("/healthz").status_code == 200
    response = service.post_image(small_png(), task="anime", filename="a.png", content_type="image/png",
                                  headers=bearer("upload"))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"


# -- logs ---------------------------------------------------------------------------------------------
def _serve_logs() -> Path:
    assert root.RAY_LOGS is not None, "the session's Ray is not started"
    return root.RAY_LOGS


def _ingress_lines(logs: Path, request_id: str) -> list[dict]:
    """The ingress replica's JSON log lines that mention `request_id`, as written so far."""
    return [json.loads(line) for path in (logs / "serve").glob("replica_imgserve_Ingress_*.log")
            for line in path.read_text(errors="replace").splitlines() if request_id in line]


def _logged_under(logs: Path, request_id: str, deployments: set[str]) -> set[str]:
    """Which of `deployments` have a JSON log line under `request_id` in their replica's log."""
    return {name for name in deployments for path in (logs / "serve").glob(f"replica_imgserve_{name}_*.log")
            if any(json.loads(line).get("request_id") == request_id
                   for line in path.read_text(errors="replace").splitlines() if request_id in line)}


def test_ingress_logs_are_json_lines_with_request_ids_and_key_ids_never_keys(service: Service) -> None:
    own = f"log-check-{secrets.token_hex(4)}"
    assert service.http.get("/v1/models", headers={**bearer("auth"), "X-Request-Id": own}).status_code == 200
    logs = _serve_logs()
    # this service's request line and Serve's own access line, both written after the response
    def both_lines() -> list[dict] | None:
        found = _ingress_lines(logs, own)
        return found if len(found) >= 2 else None

    lines = wait_until(both_lines, "two JSON lines for the request id in the ingress replica's log", interval=0.5)
    records = [line for line in lines if line.get("event") == "http_request"]
    assert len(records) == 1, lines
    record = records[0]
    assert record["request_id"] == own and record["status"] == 200 and record["method"] == "GET"
    assert record["key_id"] == key_id(hash_key(KEYS["auth"])) and record["duration_ms"] >= 0
    assert record["deployment"].endswith("Ingress") and record["replica"]
    # Serve's own access line for the same request carries the same id
    assert all(line["request_id"] == own for line in lines)
    # the replicas a request's handle calls reach log under the same id
    own = f"log-model-{secrets.token_hex(4)}"
    response = service.post_image(small_png(), task="anime", filename="a.png", content_type="image/png",
                                  headers={**bearer("auth"), "X-Request-Id": own})
    assert response.status_code == 200
    called = {"Preprocess", "AnimeModel", "Postprocess"}
    wait_until(lambda: _logged_under(logs, own, called) == called,
               f"{sorted(called)} to log under the request id", interval=0.5)
    # no key, not even a prefix of one, anywhere in this session's logs
    secrets_ = [key for key in KEYS.values()] + [WRONG_KEY]
    for path in logs.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".out", ".err", ".txt", ""):
            text = path.read_text(errors="replace")
            for key in secrets_:
                assert key[:16] not in text, f"{path} contains an API key"
