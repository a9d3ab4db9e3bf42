"""Access control without Ray: key digests, header parsing, token-bucket math, config validation, the
middleware on a bare Starlette app, and the job record keeping its request id."""

from __future__ import annotations

import hashlib
import io
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serve_app import access, cli
from serve_app.access import AccessMiddleware, AccessSettings, ApiKeys, RateLimiter, presented_key
from serve_app.config import load_config
from serve_app.errors import QueueFull, RateLimited, Unauthorized, error_response
from serve_app.keys import hash_key, key_id, new_key, parse_digests
from serve_app.observability import Observability
from serve_app.store import SqliteJobStore

KEY = "isk_unit-test-key"


# -- keys -------------------------------------------------------------------------------------------
def test_a_key_is_stored_as_its_sha256_and_named_by_eight_hex_characters() -> None:
    digest = hash_key(KEY)
    assert digest == hashlib.sha256(KEY.encode()).hexdigest() and len(digest) == 64
    assert key_id(digest) == digest[:8]
    key, new_digest = new_key()
    assert new_digest == hash_key(key) and len(key) >= 40 and key != new_key()[0]


def test_key_commands_print_a_digest_and_a_new_key(monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(f"  {KEY}\n"))
    assert cli.main(["key", "hash"]) == 0
    assert capsys.readouterr().out.strip() == hash_key(KEY)
    assert cli.main(["key", "new"]) == 0
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert hash_key(lines["key"].strip()) == lines["sha256"].strip()
    assert lines["id"].strip() == lines["sha256"].strip()[:8]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert cli.main(["key", "hash"]) == 1


def test_only_configured_keys_pass_and_answer_their_id() -> None:
    other = "isk_another"
    keys = ApiKeys([hash_key(KEY), hash_key(other)])
    assert keys.check(KEY) == key_id(hash_key(KEY))
    assert keys.check(other) == key_id(hash_key(other))
    assert keys.check(KEY + "x") is None and keys.check("") is None and keys.check(None) is None
    assert not ApiKeys([]) and keys


def test_the_key_comes_from_a_bearer_token_or_x_api_key() -> None:
    assert presented_key({"authorization": f"Bearer {KEY}"}) == KEY
    assert presented_key({"authorization": f"bearer   {KEY} "}) == KEY
    assert presented_key({"x-api-key": KEY}) == KEY
    assert presented_key({"authorization": "Basic dXNlcjpwYXNz", "x-api-key": KEY}) == KEY
    assert presented_key({"authorization": "Basic dXNlcjpwYXNz"}) is None
    assert presented_key({"authorization": "Bearer "}) is None
    assert presented_key({}) is None


def test_environment_digests_are_checked_naming_the_variable_not_the_value() -> None:
    digest = hash_key(KEY)
    assert parse_digests(f" {digest.upper()} ,, {hash_key('b')} ", "X") == [digest, hash_key("b")]
    with pytest.raises(ValueError, match=r"environment variable IMGSERVE_API_KEYS_SHA256: item 1") as error:
        AccessSettings.from_config(_section(), {"IMGSERVE_API_KEYS_SHA256": f"{digest},{KEY}"})
    assert KEY not in str(error.value)
    settings = AccessSettings.from_config(_section(api_keys_sha256=[hash_key("c")]), {"IMGSERVE_API_KEYS_SHA256": digest})
    assert set(settings.keys.digests) == {digest, hash_key("c")}
    assert not AccessSettings.from_config(_section(api_keys_env=None), {"IMGSERVE_API_KEYS_SHA256": digest}).keys


# -- rate limit -------------------------------------------------------------------------------------
def test_a_bucket_allows_the_burst_then_one_request_per_refill_interval() -> None:
    limiter = RateLimiter(per_minute=6, burst=3)  # one token every 10 s
    assert [limiter.take("a", now=0.0) for _ in range(3)] == [None, None, None]
    assert limiter.take("a", now=0.0) == 10  # seconds until the next token
    assert limiter.take("a", now=4.0) == 6
    assert limiter.take("b", now=4.0) is None  # buckets are per key
    assert limiter.take("a", now=10.0) is None
    assert limiter.take("a", now=10.5) == 10
    assert [limiter.take("a", now=1000.0) for _ in range(4)] == [None, None, None, 10]  # refills up to the burst only


def test_retry_after_rounds_up_to_whole_seconds_and_burst_defaults_to_the_rate() -> None:
    limiter = RateLimiter(per_minute=120)  # burst 120, 2 tokens a second
    assert all(limiter.take("k", now=0.0) is None for _ in range(120))
    assert limiter.take("k", now=0.0) == 1  # 0.5 s → 1
    assert limiter.take("k", now=0.5) is None


def test_buckets_stay_bounded_dropping_idle_ones_first() -> None:
    limiter = RateLimiter(per_minute=60, burst=2, max_buckets=3)
    for who in "abc":
        limiter.take(who, now=0.0)
    limiter.take("c", now=0.0)
    limiter.take("d", now=1.5)  # a and b are full again by now: dropped; d is kept
    assert set(limiter._buckets) == {"c", "d"}
    assert limiter.take("d", now=1.5) is None and limiter.take("d", now=1.5) == 1  # d's use was counted
    for who in "efgh":
        limiter.take(who, now=1.5)
    assert len(limiter._buckets) == 3 and "h" in limiter._buckets


# -- config -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ingress, field, words", [
    ({"api_keys_sha256": [KEY]}, "ingress.api_keys_sha256", "api_keys_sha256[0] is not a SHA-256"),
    ({"api_keys_env": "NOT A NAME"}, "ingress.api_keys_env", "environment variable name"),
    ({"rate_limit_per_minute": 0}, "ingress.rate_limit_per_minute", "rate_limit_per_minute must be >= 1"),
    ({"rate_limit_per_minute": 10, "rate_limit_burst": 0}, "ingress.rate_limit_burst", "rate_limit_burst must be >= 1"),
    ({"rate_limit_burst": 5}, "ingress", "rate_limit_burst (5) needs rate_limit_per_minute"),
    ({"cors_origins": ["https://app.example.com/"]}, "ingress.cors_origins", "cors_origins[0] must be an origin"),
    ({"cors_origins": ["app.example.com"]}, "ingress.cors_origins", "cors_origins[0] must be an origin"),
])
def test_bad_access_settings_are_refused_naming_the_field(ingress: dict, field: str, words: str) -> None:
    with pytest.raises(ValidationError) as error:
        load_config({"ingress": ingress})
    (first,) = error.value.errors()
    assert ".".join(map(str, first["loc"])) == field
    assert words in first["msg"]
    if "api_keys_sha256" in ingress:
        assert KEY not in first["msg"]  # the message names the index, not what may be a key


def test_access_settings_default_to_open_and_accept_good_values() -> None:
    config = load_config({})
    assert config.ingress.api_keys_sha256 == [] and config.ingress.rate_limit_per_minute is None
    assert config.ingress.cors_origins == [] and config.ingress.api_keys_env == "IMGSERVE_API_KEYS_SHA256"
    config = load_config({"ingress": {"api_keys_sha256": [hash_key(KEY).upper()], "rate_limit_per_minute": 30,
                                      "cors_origins": ["https://app.example.com", "http://127.0.0.1:5173", "*"]}})
    assert config.ingress.api_keys_sha256 == [hash_key(KEY)]


# -- errors -----------------------------------------------------------------------------------------
def test_401_asks_for_a_bearer_token_and_429_says_when_to_retry() -> None:
    response = error_response(Unauthorized("no key"), retry_after_s=2)
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
    assert b'"code":"unauthorized"' in response.body
    response = error_response(RateLimited("slow down", retry_after_s=7), retry_after_s=2)
    assert response.status_code == 429 and response.headers["retry-after"] == "7"
    assert b'"code":"rate_limited"' in response.body
    assert error_response(QueueFull("full"), retry_after_s=2).headers["retry-after"] == "2"


# -- the middleware on a bare app -------------------------------------------------------------------
def _section(**changes) -> SimpleNamespace:
    values = dict(api_keys_sha256=[], api_keys_env="IMGSERVE_API_KEYS_SHA256", rate_limit_per_minute=None,
                  rate_limit_burst=None, cors_origins=[], retry_after_s=2)
    return SimpleNamespace(**{**values, **changes})


def client_for(**section: object) -> TestClient:
    """A bare app behind the middlewares as the ingress stacks them, with these access settings."""
    async def ok(request):
        access.note(request, task="anime")
        return JSONResponse({"ok": True}, headers={"X-Imgserve-Seed": "1"})

    async def health(request):
        return PlainTextResponse("ok")

    async def document(request):
        return JSONResponse({"openapi": "3.1.0", "paths": {"/v1/thing": {}}})

    app = Starlette(routes=[Route("/v1/thing", ok, methods=["GET", "POST"]), Route("/healthz", health),
                            Route("/openapi.json", document), Route("/docs", health)])
    app.add_middleware(AccessMiddleware, settings=AccessSettings.from_config(_section(**section), {}))
    app.add_middleware(Observability, tasks=["anime"])
    return TestClient(app)


def test_middleware_keys_limit_cors_and_request_ids() -> None:
    client = client_for(api_keys_sha256=[hash_key(KEY)], rate_limit_per_minute=60, rate_limit_burst=2,
                          cors_origins=["https://app.example.com"])
    response = client.get("/v1/thing")
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer") and response.headers["x-request-id"]
    assert client.get("/v1/thing", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/healthz").status_code == 200
    assert client.get("/v1/thing", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert client.get("/v1/thing", headers={"X-API-Key": KEY, "X-Request-Id": "abc-1"}).status_code == 200
    limited = client.get("/v1/thing", headers={"X-API-Key": KEY})
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    assert limited.headers["retry-after"] == "1"
    preflight = client.options("/v1/thing", headers={"Origin": "https://app.example.com",
                                                     "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "Authorization" in preflight.headers["access-control-allow-headers"]
    other = client.options("/v1/thing", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers
    denied = client.get("/v1/thing", headers={"Origin": "https://app.example.com"})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "X-Request-Id" in denied.headers["access-control-expose-headers"]
    bad_id = client.get("/healthz", headers={"X-Request-Id": "no spaces please"})
    assert bad_id.status_code == 422 and bad_id.json()["error"]["field"] == "X-Request-Id"


def test_without_keys_the_limit_is_per_client_address() -> None:
    client = client_for(api_keys_env=None, rate_limit_per_minute=6, rate_limit_burst=1)
    response = client.post("/v1/thing", headers={"Origin": "https://app.example.com"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers  # no CORS configured
    limited = client.get("/v1/thing")
    assert limited.status_code == 429 and limited.headers["retry-after"] == "10"
    assert client.get("/healthz").status_code == 200  # only /v1/* is limited


def test_cors_exposes_the_result_headers() -> None:
    client = client_for(api_keys_env=None, cors_origins=["*"])
    response = client.get("/v1/thing", headers={"Origin": "https://anywhere.example"})
    assert response.headers["access-control-allow-origin"] == "*"
    exposed = response.headers["access-control-expose-headers"].lower()
    assert {"x-request-id", "retry-after", "x-imgserve-seed"} <= {name.strip() for name in exposed.split(",")}


def test_wrong_keys_take_the_address_tokens_a_missing_key_does_not() -> None:
    client = client_for(api_keys_sha256=[hash_key(KEY)], rate_limit_per_minute=60, rate_limit_burst=2)
    assert [client.get("/v1/thing").status_code for _ in range(4)] == [401] * 4  # no key: a client that forgot
    answers = [client.get("/v1/thing", headers={"X-API-Key": "wrong"}) for _ in range(3)]
    assert [response.status_code for response in answers] == [401, 401, 429]
    assert answers[2].headers["retry-after"] == "1" and answers[2].json()["error"]["code"] == "rate_limited"
    assert client.get("/v1/thing", headers={"X-API-Key": KEY}).status_code == 200


def test_with_keys_the_openapi_document_needs_one_without_keys_nothing_changes() -> None:
    client = client_for(api_keys_sha256=[hash_key(KEY)], rate_limit_per_minute=60, rate_limit_burst=2)
    missing = client.get("/openapi.json")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
    assert missing.headers["www-authenticate"].startswith("Bearer") and "paths" not in missing.text
    assert client.get("/openapi.json", headers={"X-API-Key": "wrong"}).status_code == 401
    document = client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    assert document.status_code == 200 and "/v1/thing" in document.json()["paths"]
    assert client.get("/docs").status_code == 200  # the reference page stays open; it asks for the key
    # the document counts against its key's rate limit like the API
    assert client.get("/openapi.json", headers={"X-API-Key": KEY}).status_code == 200
    assert client.get("/openapi.json", headers={"X-API-Key": KEY}).status_code == 429

    open_client = client_for(api_keys_env=None, rate_limit_per_minute=6, rate_limit_burst=1)
    assert [open_client.get("/openapi.json").status_code for _ in range(3)] == [200] * 3  # open, not limited


def test_every_response_has_the_security_headers() -> None:
    client = client_for(api_keys_sha256=[hash_key(KEY)])
    for response in (client.get("/healthz"), client.get("/v1/thing"), client.get("/v1/thing", headers={"X-API-Key": KEY}),
                     client.get("/docs")):  # the API reference too: its Swagger UI is served locally
        assert {name: response.headers[name] for name in access.SECURITY_HEADERS} == access.SECURITY_HEADERS
        assert response.headers["content-security-policy"] == access.CONTENT_SECURITY_POLICY


def test_replica_and_encoder_headers_only_when_exposed() -> None:
    from deployments.postprocess import Encoded
    from serve_app.ingress import result_headers

    encoded = Encoded(data=b"x", media_type="image/png", metadata={"seed": 1},
                      served={"replica": "host:1", "encoder": "host:2", "model_seconds": 0.5})
    hidden = result_headers(encoded, ("seed",))
    assert hidden == {"X-Imgserve-Seed": "1", "X-Imgserve-Model-Seconds": "0.5"}
    shown = result_headers(encoded, ("seed",), expose_replica=True)
    assert shown["X-Imgserve-Replica"] == "host:1" and shown["X-Imgserve-Encoder"] == "host:2"


# -- jobs keep their request id ---------------------------------------------------------------------
def test_a_job_keeps_the_request_id_of_its_submission(tmp_path: Path) -> None:
    # a store written before request ids existed gains the column and keeps its jobs
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, task TEXT, state TEXT, stage TEXT, step INTEGER,"
               " total_steps INTEGER, error TEXT, created_at REAL, started_at REAL, finished_at REAL,"
               " attempts INTEGER, cancel_requested INTEGER, fields TEXT, media_type TEXT, metadata TEXT, served TEXT)")
    db.execute("INSERT INTO jobs VALUES (?, 'real', 'queued', NULL, NULL, NULL, NULL, 1.0, NULL, NULL, 0, 0,"
               " '{}', NULL, '{}', '{}')", ("a" * 32,))
    db.commit()
    db.close()
    store = SqliteJobStore(tmp_path)
    assert store.get("a" * 32).public()["request_id"] is None
    job = store.create("anime", {}, b"x", request_id="req-42")
    assert SqliteJobStore(tmp_path).get(job.id).public()["request_id"] == "req-42"
