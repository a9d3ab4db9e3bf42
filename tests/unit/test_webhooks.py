"""Webhooks without Ray: the Standard Webhooks signature (checked by a verifier written here from
the specification and proven on its published test vector), the allow list and address rules, the
retry schedule, and deliveries through the real delivery loop to a real local HTTP receiver, from
the real SQLite store (retried, given up, redirect not followed, after a restart, DNS checked)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from deployments.errors import InvalidParameter
from serve_app.config import load_config
from serve_app.store import SqliteJobStore
from serve_app.webhook_rules import (
    BACKOFF_CAP_S,
    address_refusal,
    backoff,
    check_url,
    parse_allow,
    parse_allow_entry,
    parse_events,
    parse_secret,
    sign,
)
from serve_app.webhooks import Webhooks, load_secret
from tests.conftest import free_port

SECRET = "whsec_" + base64.b64encode(b"imgserve webhook test key, 32 b").decode()

# The Standard Webhooks specification's published test vector.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def verify(secret: str, headers: dict[str, str], body: bytes, now: float | None = None,
           tolerance_s: float = 300) -> dict[str, Any]:
    """A receiver's check, from the Standard Webhooks specification: the key is the base64 after
    `whsec_`; the signed content is `{webhook-id}.{webhook-timestamp}.{body}`; the header holds
    space-separated `v1,<base64 HMAC-SHA256>` entries, one of which must match; the timestamp must
    be recent. Returns the JSON body; AssertionError when it does not verify."""
    headers = {k.lower(): v for k, v in headers.items()}
    key = base64.b64decode(secret.split("_", 1)[1])
    message_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    assert abs((time.time() if now is None else now) - int(timestamp)) <= tolerance_s, "stale timestamp"
    expected = base64.b64encode(hmac.new(key, f"{message_id}.{timestamp}.".encode() + body,
                                         hashlib.sha256).digest()).decode()
    given = [entry.split(",", 1) for entry in headers["webhook-signature"].split(" ")]
    assert any(version == "v1" and hmac.compare_digest(sig, expected) for version, sig in given), "bad signature"
    return json.loads(body)


class Receiver:
    """A real HTTP server on 127.0.0.1 (a thread): records every POST and answers each path from
    its script (a list of statuses, one per request, then 200). A 302 points at /ok."""

    def __init__(self, script: dict[str, list[int]] | None = None) -> None:
        self.script = {path: list(statuses) for path, statuses in (script or {}).items()}
        self.requests: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.changed:
                    statuses = receiver.script.get(self.path, [])
                    status = statuses.pop(0) if statuses else 200
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                              "status": status, "at": time.time()})
                    receiver.changed.notify_all()
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", "/ok")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def on(self, path: str) -> list[dict[str, Any]]:
        with self.changed:
            return [r for r in self.requests if r["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver({"/flaky": [503, 503], "/down": [503] * 1000, "/redirect": [302] * 1000})
    yield server
    server.close()


# -- signing and secrets -------------------------------------------------------------------------------
def test_the_verifier_passes_the_published_vector_and_our_signature_is_that_vector() -> None:
    headers = {"webhook-id": VECTOR_ID, "webhook-timestamp": str(VECTOR_TS), "webhook-signature": VECTOR_SIGNATURE}
    assert verify(VECTOR_SECRET, headers, VECTOR_BODY, now=VECTOR_TS) == {"test": 2432232314}
    with pytest.raises(AssertionError, match="bad signature"):
        verify(VECTOR_SECRET, headers, b'{"test": 2432232315}', now=VECTOR_TS)
    with pytest.raises(AssertionError, match="stale"):
        verify(VECTOR_SECRET, headers, VECTOR_BODY, now=VECTOR_TS + 301)
    ours = sign(parse_secret(VECTOR_SECRET), VECTOR_ID, VECTOR_TS, VECTOR_BODY)
    assert ours == VECTOR_SIGNATURE
    rotated = f"v1,bogus {sign(parse_secret(SECRET), VECTOR_ID, VECTOR_TS, VECTOR_BODY)}"  # several entries
    assert verify(SECRET, {**headers, "webhook-signature": rotated}, VECTOR_BODY, now=VECTOR_TS)


def test_secrets_must_be_whsec_base64_and_the_environment_wins() -> None:
    for bad in ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!", "whsec_c2hvcnQ=", "whsec_"):
        with pytest.raises(ValueError):
            parse_secret(bad)
    config = load_config({"jobs": {"webhook_secret": SECRET}}).jobs
    assert load_secret(config, {}) == (parse_secret(SECRET), None)
    assert load_secret(config, {"IMGSERVE_WEBHOOK_SECRET": VECTOR_SECRET})[0] == parse_secret(VECTOR_SECRET)
    key, why = load_secret(config, {"IMGSERVE_WEBHOOK_SECRET": "whsec_!!"})
    assert key is None and "not valid" in why
    key, why = load_secret(load_config({}).jobs, {})
    assert key is None and "no signing secret" in why


# -- allow list and addresses ----------------------------------------------------------------------------
def test_allow_list_entries_parse_or_are_refused_naming_the_entry() -> None:
    assert parse_allow_entry("Hooks.Example.COM").name == "hooks.example.com"
    rule = parse_allow_entry("hooks.example.com:8443")
    assert (rule.name, rule.port) == ("hooks.example.com", 8443)
    assert parse_allow_entry("10.0.0.0/8").network == ipaddress.ip_network("10.0.0.0/8")
    assert parse_allow_entry("127.0.0.1:9000").port == 9000
    assert parse_allow_entry("::1").network == ipaddress.ip_network("::1/128")
    rule = parse_allow_entry("[fd00::/8]:443")
    assert (rule.network, rule.port) == (ipaddress.ip_network("fd00::/8"), 443)
    for bad in ("", "10.0.0.1/8", "300.1.2.3", "host:0", "host:99999", "bad host", "a..b", "[::1]x", "10.0.0.0/33"):
        with pytest.raises(ValueError) as refused:
            parse_allow_entry(bad)
        assert repr(bad) in str(refused.value)


def test_a_url_is_admitted_only_when_its_host_is_listed() -> None:
    rules = parse_allow(["hooks.example.com", "api.example.org:8443", "10.1.2.3", "192.168.0.0/16", "[::1]:9000"])
    assert check_url("https://hooks.example.com/a?b=1", rules) == ("hooks.example.com", 443)
    assert check_url("http://HOOKS.example.com:8080/", rules) == ("hooks.example.com", 8080)  # a name entry: any port
    assert check_url("https://api.example.org:8443/", rules) == ("api.example.org", 8443)
    assert check_url("http://10.1.2.3/", rules) == ("10.1.2.3", 80)
    assert check_url("http://192.168.7.7:81/", rules) == ("192.168.7.7", 81)
    assert check_url("http://[::1]:9000/", rules) == ("::1", 9000)
    refused = {
        "https://api.example.org/": "not in",  # listed only with port 8443
        "https://evil.example.com/": "not in",
        "http://10.1.2.4/": "not in",  # a private address not listed
        "http://127.0.0.1/": "not in",
        "http://[::1]:9001/": "not in",
        "ftp://hooks.example.com/": "http",
        "hooks.example.com/x": "http",
        "http:///nohost": "http",
        "http://hooks.example.com:99999/": "port",
        "http://hooks.example.com/a b": "spaces",
    }
    for url, why in refused.items():
        with pytest.raises(ValueError, match=why):
            check_url(url, rules)
    with pytest.raises(ValueError, match="webhooks are off"):
        check_url("https://hooks.example.com/", [])


def test_resolved_addresses_must_be_public_or_listed() -> None:
    rules = parse_allow(["hooks.example.com", "10.0.0.0/8", "127.0.0.1:9000"])
    ip = ipaddress.ip_address
    assert address_refusal(ip("93.184.215.14"), 443, rules) is None  # public
    assert address_refusal(ip("2606:4700::1111"), 443, rules) is None
    assert address_refusal(ip("10.20.30.40"), 443, rules) is None  # in a listed block
    assert address_refusal(ip("127.0.0.1"), 9000, rules) is None  # listed with this port
    for address, port in (("127.0.0.1", 9001), ("192.168.1.1", 80), ("172.16.0.1", 80), ("169.254.169.254", 80),
                          ("::1", 80), ("fe80::1", 80), ("fc00::1", 80), ("100.64.0.1", 80), ("0.0.0.0", 80),
                          ("224.0.0.1", 80), ("240.0.0.1", 80)):
        assert "private, loopback" in address_refusal(ip(address), port, rules), address


def test_events_are_named_comma_separated_with_a_default() -> None:
    assert parse_events(None) == parse_events("") == ["succeeded", "failed", "cancelled"]
    assert parse_events("progress, started,succeeded,progress") == ["started", "progress", "succeeded"]
    assert parse_events(["cancelled", "started,failed"]) == ["started", "failed", "cancelled"]
    with pytest.raises(ValueError, match="unknown event 'done'"):
        parse_events("succeeded,done")


def test_backoff_doubles_from_one_second_to_five_minutes_with_jitter() -> None:
    rng = random.Random(7)
    expected = [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    pauses = [backoff(n, rng) for n in range(1, len(expected) + 1)]
    for pause, base in zip(pauses, expected):
        assert base <= pause <= base * 1.1
    assert len({round(p / b, 6) for p, b in zip(pauses, expected)}) > 1  # jittered, not one fixed factor
    assert backoff(10_000, rng) <= BACKOFF_CAP_S * 1.1
    assert sum(min(2 ** k, 300) for k in range(12)) < 3600  # a default hour holds a dozen and more attempts


# -- the Webhooks object on a real store --------------------------------------------------------------
def make_hooks(tmp_path: Path, allow: list[str], **jobs: Any) -> Webhooks:
    config = load_config({"jobs": {"directory": str(tmp_path / "jobs"), "webhook_allow": allow,
                                   "webhook_secret_env": None, "webhook_secret": SECRET, **jobs}}).jobs
    return Webhooks(SimpleNamespace(config=config, store=SqliteJobStore(config.directory)))


def test_check_refuses_naming_the_field(tmp_path: Path) -> None:
    hooks = make_hooks(tmp_path, ["127.0.0.1"])
    assert hooks.check(None, None) is None and hooks.check("", "") is None
    assert hooks.check("http://127.0.0.1:9/h", "started,succeeded") == {
        "url": "http://127.0.0.1:9/h", "events": ["started", "succeeded"]}
    cases = [("http://10.0.0.1/h", None, "webhook_url"), ("file:///etc/passwd", None, "webhook_url"),
             ("http://127.0.0.1/h", "finished", "webhook_events"), (None, "succeeded", "webhook_events")]
    for url, events, field in cases:
        with pytest.raises(InvalidParameter) as refused:
            hooks.check(url, events)
        assert refused.value.field == field
    unsigned = make_hooks(tmp_path / "2", ["127.0.0.1"], webhook_secret=None)
    with pytest.raises(InvalidParameter, match="no signing secret") as refused:
        unsigned.check("http://127.0.0.1/h", None)
    assert refused.value.field == "webhook_url"


def new_job(hooks: Webhooks, url: str, events: list[str] | None = None):
    return hooks.runner.store.create("anime", {}, b"image", webhook=hooks.check(url, ",".join(events or [])))


async def deliver_until(hooks: Webhooks, condition, what: str, timeout: float = 60.0) -> Any:
    """Run the delivery loop until `condition()` (a deadline against hangs, not a timing assertion)."""
    task = asyncio.get_running_loop().create_task(hooks.run())
    try:
        deadline = time.monotonic() + timeout
        while not (value := condition()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            assert not task.done(), task
            await asyncio.sleep(0.02)
        return value
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_delivery_is_retried_until_the_receiver_answers_2xx(tmp_path: Path, receiver: Receiver,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Webhooks, "backoff_base_s", 0.05)
    hooks = make_hooks(tmp_path, ["127.0.0.1"])
    job = new_job(hooks, receiver.url("/flaky"))
    hooks.notify(dataclasses.replace(job, state="running"), "started")  # not asked for: nothing sent
    hooks.notify(dataclasses.replace(job, state="succeeded"), "succeeded")
    summary = asyncio.run(deliver_until(hooks, lambda: (s := hooks.summary(job))["delivered"] and s, "delivery"))
    assert summary == {"url": receiver.url("/flaky"), "events": ["succeeded", "failed", "cancelled"], "attempts": 3,
                       "last_status": 200, "last_error": None, "delivered": 1, "pending": 0, "failed": 0}
    attempts = receiver.on("/flaky")
    assert [a["status"] for a in attempts] == [503, 503, 200]
    assert len({a["headers"]["webhook-id"] for a in attempts}) == 1 and len({a["body"] for a in attempts}) == 1
    for attempt in attempts:
        payload = verify(SECRET, attempt["headers"], attempt["body"])
        assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job.id
        assert payload["data"]["state"] == "succeeded" and payload["timestamp"].endswith("Z")
        assert attempt["headers"]["host"] == f"127.0.0.1:{receiver.port}"
    assert attempts[1]["at"] - attempts[0]["at"] >= 0.05 and attempts[2]["at"] - attempts[1]["at"] >= 0.1


def test_a_delivery_is_given_up_after_the_retry_time_with_one_warning(tmp_path: Path, receiver: Receiver,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(Webhooks, "backoff_base_s", 0.05)
    hooks = make_hooks(tmp_path, ["127.0.0.1"], webhook_retry_s=0.5)
    job = new_job(hooks, receiver.url("/down"))
    with caplog.at_level(logging.WARNING, logger="imgserve.webhooks"):
        hooks.notify(dataclasses.replace(job, state="failed"), "failed")
        summary = asyncio.run(deliver_until(hooks, lambda: (s := hooks.summary(job))["failed"] and s, "giving up"))
    assert summary["pending"] == 0 and summary["delivered"] == 0 and summary["last_status"] == 503
    assert summary["attempts"] == len(receiver.on("/down")) >= 3 and summary["last_error"] == "HTTP 503"
    warnings = [r for r in caplog.records if "given up" in r.getMessage()]
    assert len(warnings) == 1 and job.id in warnings[0].getMessage()


def test_redirects_are_not_followed(tmp_path: Path, receiver: Receiver) -> None:
    hooks = make_hooks(tmp_path, ["127.0.0.1"])
    job = new_job(hooks, receiver.url("/redirect"))
    hooks.notify(dataclasses.replace(job, state="cancelled"), "cancelled")
    summary = asyncio.run(deliver_until(hooks, lambda: (s := hooks.summary(job))["attempts"] >= 2 and s,
                                        "two attempts"))
    assert summary["last_status"] == 302 and "redirect" in summary["last_error"] and summary["pending"] == 1
    assert receiver.on("/ok") == []


def test_deliveries_survive_a_restart(tmp_path: Path, receiver: Receiver) -> None:
    hooks = make_hooks(tmp_path, ["127.0.0.1"])
    job = new_job(hooks, receiver.url("/after-restart"))
    hooks.notify(dataclasses.replace(job, state="succeeded"), "succeeded")  # recorded; the loop never ran
    hooks.runner.store._db.close()
    again = make_hooks(tmp_path, ["127.0.0.1"])
    asyncio.run(deliver_until(again, lambda: again.summary(job)["delivered"], "the delivery after the restart"))
    [request] = receiver.on("/after-restart")
    assert verify(SECRET, request["headers"], request["body"])["data"]["id"] == job.id


def test_a_name_resolving_to_loopback_is_refused_unless_the_address_is_listed(tmp_path: Path,
                                                                              receiver: Receiver) -> None:
    by_name = make_hooks(tmp_path, ["localhost"])
    job = new_job(by_name, receiver.url("/named", host="localhost"))
    by_name.notify(dataclasses.replace(job, state="succeeded"), "succeeded")
    summary = asyncio.run(deliver_until(by_name, lambda: (s := by_name.summary(job))["attempts"] and s, "an attempt"))
    assert summary["last_status"] is None and "private, loopback" in summary["last_error"]
    assert receiver.on("/named") == []
    by_name.runner.store._db.close()
    listed = make_hooks(tmp_path, ["localhost", "127.0.0.1"])  # the same message, now allowed
    asyncio.run(deliver_until(listed, lambda: listed.summary(job)["delivered"], "the delivery"))
    [request] = receiver.on("/named")
    assert request["headers"]["host"] == f"localhost:{receiver.port}"  # pinned address, the URL's Host
    assert verify(SECRET, request["headers"], request["body"])["type"] == "job.succeeded"


def test_progress_is_recorded_at_most_once_a_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hooks = make_hooks(tmp_path, ["127.0.0.1"])
    job = new_job(hooks, "http://127.0.0.1:9/h", ["progress", "succeeded"])
    clock = [1000.0]
    monkeypatch.setattr("serve_app.webhooks.time.monotonic", lambda: clock[0])
    for step in range(10):  # ten reports within 0.9 s: one message
        hooks.notify(dataclasses.replace(job, state="running", step=step), "progress")
        clock[0] += 0.1
    clock[0] += 0.1
    hooks.notify(dataclasses.replace(job, state="running", step=11), "progress")  # 1.0 s after the first
    hooks.notify(dataclasses.replace(job, state="succeeded"), "succeeded")
    hooks.notify(dataclasses.replace(job, state="failed"), "failed")  # not asked for
    assert hooks.summary(job)["pending"] == 3
    bodies = [json.loads(b) for (b,) in hooks.runner.store._db.execute(
        "SELECT body FROM webhook_deliveries WHERE job_id = ? ORDER BY created_at", (job.id,))]
    assert [(b["type"], b["data"]["step"]) for b in bodies] == [
        ("job.progress", 0), ("job.progress", 11), ("job.succeeded", None)]
