"""Webhooks: a job's events delivered to the URL its submission named, signed, retried, allowed.

Contract (the runner's side): `check(url, events)` validates a submission's `webhook_url` and
`webhook_events` (422 naming the field) and returns what the job stores (`{"url", "events"}`);
`notify(job, event)` records a delivery for one of the job's events (`started`, `progress` at most
one a second, `succeeded`, `failed`, `cancelled`) without waiting for it; `run()` is the delivery
loop the runner starts; `summary(job)` is the job status's `webhook` entry.

A message is persisted (`serve_app.store_webhooks`) before `notify` returns, so it survives a
runner restart, and is sent by `run()` with at most `CONCURRENCY` attempts in flight: the runner's
dispatch never waits on a receiver. Each attempt re-checks the URL against `jobs.webhook_allow`,
resolves the host then, refuses private/loopback/link-local/reserved addresses that are not listed,
and connects to the address it checked (the Host header and TLS name stay the URL's host), so a
name that resolves elsewhere later (DNS rebinding) cannot redirect it; redirects are not followed
(a 3xx is a failed attempt), proxies from the environment are not used. Signing follows Standard
Webhooks (`serve_app.webhook_rules.sign`), with a fresh timestamp on every attempt and the same
`webhook-id` and body. A 2xx answer delivers; anything else is retried (`webhook_rules.backoff`)
until `jobs.webhook_retry_s` after the event, then given up with one warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx

from deployments.errors import InvalidParameter
from serve_app.job_record import FINAL_STATES
from serve_app.store_webhooks import Delivery, WebhookStore
from serve_app.webhook_rules import (
    BACKOFF_BASE_S,
    IPAddress,
    address_refusal,
    backoff,
    check_url,
    literal_ip,
    parse_allow,
    parse_events,
    parse_secret,
    sign,
)

if TYPE_CHECKING:
    from serve_app.config import JobsSection
    from serve_app.jobs import JobRunner
    from serve_app.job_record import Job


log = logging.getLogger("imgserve.webhooks")

CONCURRENCY = 8
USER_AGENT = "imgserve-webhooks/1"
_PROGRESS_KEPT = 10_000  # jobs whose last progress message time is remembered (memory stays bounded)
_CLEANUP_S = 300.0
_IDLE_S = 5.0  # longest the loop sleeps without a wake-up (another process may have added messages)


class _Refused(Exception):
    """This attempt may not connect (not allowed, nothing to sign with, no acceptable address)."""


def load_secret(config: JobsSection, environ: Any = os.environ) -> tuple[bytes | None, str | None]:
    """(signing key, None), or (None, why webhooks are refused). The environment wins over the config."""
    name = config.webhook_secret_env
    if name and environ.get(name):
        value, source = environ[name], f"the environment variable {name}"
    elif config.webhook_secret:
        value, source = config.webhook_secret, "jobs.webhook_secret"
    else:
        return None, ("webhooks are off on this server: no signing secret is configured "
                      "(jobs.webhook_secret_env or jobs.webhook_secret)")
    try:
        return parse_secret(value.strip()), None
    except ValueError as exc:
        log.error("webhooks are off: %s is not a valid webhook secret: %s", source, exc)
        return None, "webhooks are off on this server: its signing secret is not valid"


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:200]


class Webhooks:
    """The runner's webhook deliveries (one per runner; its table lives in the runner's store)."""

    backoff_base_s = BACKOFF_BASE_S
    """First retry pause; doubles per failed attempt (a class attribute so a unit test can shorten it)."""
    progress_interval_s = 1.0
    """Least time between two `progress` messages of one job; reports in between are not sent."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner
        self.config = runner.config
        self.rules = parse_allow(self.config.webhook_allow)
        self.key, self._no_key = load_secret(self.config)
        self.deliveries = WebhookStore(runner.store)
        self._last_progress: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()  # notify runs on the loop and on Serve's pool threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._inflight: dict[str, asyncio.Task] = {}

    # -- the runner's calls --------------------------------------------------------------------------
    def check(self, url: str | None, events: str | list[str] | None) -> dict[str, Any] | None:
        """What a job submitted with `url` and `events` stores; None without a URL. 422 naming the field."""
        if url is None or (isinstance(url, str) and not url.strip()):
            if events not in (None, "", []):
                raise InvalidParameter("needs webhook_url", "webhook_events")
            return None
        try:
            names = parse_events(events)
        except ValueError as exc:
            raise InvalidParameter(str(exc), "webhook_events") from None
        try:
            check_url(url, self.rules)
        except ValueError as exc:
            raise InvalidParameter(str(exc), "webhook_url") from None
        if self.key is None:
            raise InvalidParameter(self._no_key or "no signing secret", "webhook_url")
        return {"url": url, "events": names}

    def notify(self, job: Job, event: str) -> None:
        """Record `event` of `job` for delivery when the job asked for it; never raises, never waits
        on a receiver (one SQLite write)."""
        hook = job.webhook
        if event in FINAL_STATES:
            with self._lock:
                self._last_progress.pop(job.id, None)
        if not hook or event not in hook.get("events", ()):
            return
        if event == "progress" and not self._progress_due(job.id):
            return
        body = json.dumps({"type": f"job.{event}", "timestamp": _iso_now(), "data": job.public()},
                          separators=(",", ":")).encode()
        try:
            self.deliveries.add(job.id, hook["url"], event, body, self.config.webhook_retry_s)
        except (sqlite3.Error, OSError) as exc:
            log.warning("job %s: its %s webhook could not be recorded: %s", job.id, event, exc)
            return
        self._kick()

    def summary(self, job: Job) -> dict[str, Any] | None:
        """{"url", "events", "attempts", "last_status", "last_error", "delivered", "pending", "failed"}."""
        if not job.webhook:
            return None
        return {"url": job.webhook.get("url"), "events": job.webhook.get("events"),
                **self.deliveries.summary(job.id)}

    # -- the delivery loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Send due messages, `CONCURRENCY` at a time, until cancelled (the runner's stop)."""
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        client = httpx.AsyncClient(follow_redirects=False, timeout=self.config.webhook_timeout_s, trust_env=False,
                                   # no pooled connections: each attempt connects to the address it checked
                                   limits=httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0))
        lease_s = self.config.webhook_timeout_s + 30.0
        cleaned = time.monotonic()
        try:
            while True:
                self._wake.clear()
                next_at = None
                try:
                    free = CONCURRENCY - len(self._inflight)
                    if free > 0:
                        due = await asyncio.to_thread(self.deliveries.claim_due, free, lease_s, set(self._inflight))
                        for delivery in due:
                            self._start(client, delivery)
                    if time.monotonic() - cleaned >= _CLEANUP_S:
                        cleaned = time.monotonic()
                        await asyncio.to_thread(self.deliveries.forget_orphans)
                    next_at = await asyncio.to_thread(self.deliveries.next_due)
                except (sqlite3.Error, OSError):
                    log.exception("webhook deliveries: job store error; retrying")
                full = len(self._inflight) >= CONCURRENCY
                wait = _IDLE_S if next_at is None or full else min(max(next_at - time.time(), 0.01), _IDLE_S)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
        finally:
            tasks = list(self._inflight.values())
            for task in tasks:
                task.cancel()  # their messages stay pending: due again once their lease lapses
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.aclose()

    def _start(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(client, delivery))
        self._inflight[delivery.id] = task

        def done(_: asyncio.Task) -> None:
            self._inflight.pop(delivery.id, None)
            if self._wake is not None:
                self._wake.set()

        task.add_done_callback(done)

    async def _deliver(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        try:
            status, error = await self.attempt(client, delivery)
        except Exception as exc:  # a bug here must cost one attempt, not the message's lease
            log.exception("job %s: webhook %s: attempt failed unexpectedly", delivery.job_id, delivery.id)
            status, error = None, _short(exc)
        delivered = status is not None and 200 <= status < 300
        next_at = None
        attempts = delivery.attempts + 1
        if not delivered:
            now = time.time()
            if now < delivery.deadline:
                next_at = min(now + backoff(attempts, base_s=self.backoff_base_s), delivery.deadline)
            else:
                log.warning("job %s: webhook %s (job.%s) given up after %d attempts in %.0f s; last: %s",
                            delivery.job_id, delivery.id, delivery.event, attempts, self.config.webhook_retry_s, error)
        try:
            await asyncio.to_thread(self.deliveries.attempted, delivery.id, status, error, next_at, delivered)
        except (sqlite3.Error, OSError):
            log.exception("job %s: webhook %s: its attempt could not be recorded", delivery.job_id, delivery.id)

    async def attempt(self, client: httpx.AsyncClient, delivery: Delivery) -> tuple[int | None, str | None]:
        """One POST of `delivery`: (HTTP status or None, None when 2xx else a short reason)."""
        timeout = self.config.webhook_timeout_s
        try:
            async with asyncio.timeout(timeout):
                try:
                    host, port = check_url(delivery.url, self.rules)  # the allow list may have changed
                except ValueError as exc:
                    raise _Refused(str(exc)) from None
                if self.key is None:
                    raise _Refused(self._no_key or "no signing secret")
                address = await self._address(host, port)
                url = httpx.URL(delivery.url)
                stamp = int(time.time())
                headers = {"host": url.netloc.decode("ascii"), "content-type": "application/json",
                           "user-agent": USER_AGENT, "webhook-id": delivery.id, "webhook-timestamp": str(stamp),
                           "webhook-signature": sign(self.key, delivery.id, stamp, delivery.body)}
                # TLS is checked against the URL's host name, not the pinned address
                extensions = {"sni_hostname": host} if url.scheme == "https" and literal_ip(host) is None else {}
                request = client.build_request("POST", url.copy_with(host=str(address)), content=delivery.body,
                                               headers=headers, extensions=extensions)
                response = await client.send(request, stream=True)
                await response.aclose()  # the answer's body is not read: a receiver cannot hold us with it
        except TimeoutError:
            return None, f"no answer within {timeout:g} s"
        except _Refused as exc:
            return None, str(exc)[:300]
        except (httpx.HTTPError, OSError) as exc:
            return None, _short(exc)
        status = response.status_code
        if 200 <= status < 300:
            return status, None
        if 300 <= status < 400:
            return status, f"redirect ({status}) not followed"
        return status, f"HTTP {status}"

    async def _address(self, host: str, port: int) -> IPAddress:
        """The address to connect to: the first of `host`'s that the rules accept; _Refused if none."""
        ip = literal_ip(host)
        if ip is not None:
            candidates = [ip]
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise _Refused(f"{host[:100]} could not be resolved: {exc}") from None
            candidates = list(dict.fromkeys(ip for info in infos if (ip := literal_ip(str(info[4][0]))) is not None))
        refusals = []
        for candidate in candidates:
            refusal = address_refusal(candidate, port, self.rules)
            if refusal is None:
                return candidate
            refusals.append(refusal)
        raise _Refused(f"{host[:100]}: {refusals[0] if refusals else 'no address'}")

    # -- helpers -----------------------------------------------------------------------------------
    def _progress_due(self, job_id: str) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last_progress.get(job_id)
            if last is not None and now - last < self.progress_interval_s:
                return False
            self._last_progress[job_id] = now
            self._last_progress.move_to_end(job_id)
            while len(self._last_progress) > _PROGRESS_KEPT:
                self._last_progress.popitem(last=False)
        return True

    def _kick(self) -> None:
        """Wake the delivery loop, from its own thread or another."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the message waits for the next start
                loop.call_soon_threadsafe(wake.set)
