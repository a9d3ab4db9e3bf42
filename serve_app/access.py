"""Access and safety at the HTTP edge: API keys, per-key rate limits, CORS, request ids, one log line.

Everything here runs in the ingress replica as one pure ASGI middleware (`AccessMiddleware`,
registered on the module-level FastAPI `api`), so it sees every HTTP request before a route does,
and every response (errors included) on its way out. The replica hands it its settings once, in
`Ingress.__init__` (`configure`). The Python handle path (`Ingress.run`) never passes here: callers
inside the cluster are trusted.

- **Keys** are stored only as SHA-256 hex digests (config `ingress.api_keys_sha256` plus the
  environment variable named by `ingress.api_keys_env`). A request to `/v1/*` presents its key as
  `Authorization: Bearer <key>` or `X-API-Key: <key>`; the presented key is hashed and compared
  with every stored digest by `hmac.compare_digest`. Logs name a key by its id, the first 8 hex
  characters of its digest, never by the key.
- **Rate limit**: a token bucket per key id (per client address when keys are off) in this
  replica's memory: `burst` tokens, refilled at `per_minute / 60` tokens a second. With N ingress
  replicas a client can get up to N times the configured rate (see docs/architecture.md).
- **Request ids** are Ray Serve's own: its HTTP proxy takes a client's `X-Request-Id` or makes a
  UUID, puts it on the request, on every response and on every log record of the request. This
  middleware refuses (422 `invalid_parameter`) a client id that is not short and plain, so every id
  this service logs in its own line or stores with a job is; Serve's proxy still echoes the raw
  header on that 422 and puts it on its own log records.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import InvalidParameter
from serve_app.errors import RateLimited, Unauthorized, error_response

# A child of Serve's logger: its records go to the replica's Serve log file, in Serve's encoding
# (JSON with `logging_config: {encoding: JSON}`), with Serve's request id, route and replica.
log = logging.getLogger("ray.serve.imgserve")

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
"""A client-supplied X-Request-Id must match this (UUIDs, ULIDs, nginx/Envoy ids all do)."""
KEY_ID_CHARS = 8
CORS_ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_ALLOW_HEADERS = "Authorization, X-API-Key, Content-Type, X-Request-Id"
CORS_EXPOSE_ALWAYS = ("X-Request-Id", "Retry-After", "Location", "WWW-Authenticate")
CORS_MAX_AGE_S = 600
NO_RETRY_AFTER = 1
"""`error_response`'s fallback wait, never sent from here: 401 and 422 carry no Retry-After, and a
429 carries the rate limiter's own wait."""
CLIENT_CLOSED = 499
"""The status logged and counted for a request whose client left before the answer began (the
"client closed request" of common proxies): not a server error."""
MAX_BUCKETS = 10_000
"""Rate-limit buckets kept per replica; full (idle) buckets are dropped first, then the oldest."""


# -- keys --------------------------------------------------------------------------------------------
def hash_key(key: str) -> str:
    """The SHA-256 hex digest under which a key is stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(digest: str) -> str:
    """What logs call a key: the first 8 hex characters of its digest."""
    return digest[:KEY_ID_CHARS]


def new_key() -> tuple[str, str]:
    """A fresh random key (256 bits, URL-safe) and its digest."""
    key = "isk_" + secrets.token_urlsafe(32)
    return key, hash_key(key)


def check_digest(item: str, where: str) -> str:
    """`item` as a lowercase SHA-256 hex digest; the error names `where`, never the value (it may
    be a key stored by mistake)."""
    if not SHA256_HEX.match(item.lower()):
        raise ValueError(f"{where} is not a SHA-256 hex digest (64 hex characters): "
                         "store the output of `imgserve key hash`, never the key itself")
    return item.lower()


def parse_digests(value: str, source: str) -> list[str]:
    """Comma-separated SHA-256 hex digests (e.g. an environment variable's value); blanks skipped."""
    items = [part.strip() for part in value.split(",")]
    return [check_digest(item, f"{source}: item {index}") for index, item in enumerate(items) if item]


def presented_key(headers: Headers | dict[str, str]) -> str | None:
    """The key a request presents: `Authorization: Bearer <key>`, else `X-API-Key: <key>`."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


class ApiKeys:
    """The accepted keys, as digests; `check` answers a presented key's id, or None."""

    def __init__(self, digests: Iterable[str]) -> None:
        self.digests = tuple(dict.fromkeys(digests))

    def __bool__(self) -> bool:
        return bool(self.digests)

    def check(self, key: str | None) -> str | None:
        if key is None:
            return None
        presented = hash_key(key)
        match = None
        for digest in self.digests:  # every digest is compared: the time does not depend on which matched
            if hmac.compare_digest(presented, digest):
                match = digest
        return key_id(match) if match else None


# -- rate limit -------------------------------------------------------------------------------------
@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets: each holds up to `burst` tokens and refills `per_minute / 60` tokens a second;
    a request takes one token or is refused with the seconds until one is there."""

    def __init__(self, per_minute: int, burst: int | None = None, max_buckets: int = MAX_BUCKETS) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst if burst is not None else per_minute)
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, who: str, now: float | None = None) -> int | None:
        """None when the request may pass (a token was taken), else Retry-After in whole seconds (≥ 1)."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(who)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[who] = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + max(0.0, now - bucket.updated) * self.rate)
            bucket.updated = now
            self._buckets.move_to_end(who)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return max(1, math.ceil((1.0 - bucket.tokens) / self.rate))

    def _make_room(self, now: float) -> None:
        """Room for one more bucket: drop the full ones (a full bucket is the same as none), then the
        least recently used."""
        if len(self._buckets) < self.max_buckets:
            return
        full = [who for who, b in self._buckets.items() if b.tokens + (now - b.updated) * self.rate >= self.burst]
        for who in full:
            del self._buckets[who]
        while len(self._buckets) >= self.max_buckets:
            self._buckets.popitem(last=False)


# -- settings the replica hands over ----------------------------------------------------------------
@dataclass
class AccessSettings:
    keys: ApiKeys = field(default_factory=lambda: ApiKeys(()))
    limiter: RateLimiter | None = None
    cors_origins: frozenset[str] = frozenset()

    def cors_origin(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for this origin, or None (no CORS headers)."""
        if not origin or not self.cors_origins:
            return None
        if origin in self.cors_origins:
            return origin
        return "*" if "*" in self.cors_origins else None


_settings = AccessSettings()


def configure(ingress: Any, environ: dict[str, str] | None = None) -> AccessSettings:
    """Build this replica's settings from the `ingress` config section (and the environment's key
    digests) and make the middleware use them. Raises ValueError naming a bad environment value."""
    global _settings
    environ = os.environ if environ is None else environ
    digests = list(ingress.api_keys_sha256)
    if ingress.api_keys_env and environ.get(ingress.api_keys_env):
        digests += parse_digests(environ[ingress.api_keys_env], f"environment variable {ingress.api_keys_env}")
    limiter = None
    if ingress.rate_limit_per_minute is not None:
        limiter = RateLimiter(ingress.rate_limit_per_minute, ingress.rate_limit_burst)
    _settings = AccessSettings(ApiKeys(digests), limiter, frozenset(ingress.cors_origins))
    log.info("access: %d API keys (ids %s), rate limit %s, CORS origins %s", len(_settings.keys.digests),
             ", ".join(key_id(d) for d in _settings.keys.digests) or "-",
             f"{ingress.rate_limit_per_minute}/min" if limiter else "off", sorted(_settings.cors_origins) or "none")
    return _settings


def note(request: Any, **facts: Any) -> None:
    """Add facts (task, job id) to this request's log line; a route calls it."""
    facts_dict = request.scope.get("state", {}).get("imgserve")
    if isinstance(facts_dict, dict):
        facts_dict.update(facts)


def route_path(scope: Scope) -> str:
    """The request's path as the routes see it: without the app's `root_path` (its route prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def is_api_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def _task_of(method: str, path: str) -> str | None:
    parts = path.strip("/").split("/")
    if method == "POST" and len(parts) == 2 and parts[0] == "v1" and parts[1] not in ("jobs", "models"):
        return parts[1][:32]
    return None


class AnswerStatus:
    """The status a request was answered with, as a middleware's `send` wrapper sees it: 500 until
    a response starts (an error nothing turned into a response); CLIENT_CLOSED where the request is
    cancelled before that (Serve cancels the app's task when its client hangs up)."""

    def __init__(self) -> None:
        self.code = 500
        self._started = False

    def see(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.code, self._started = message["status"], True

    def cancelled(self) -> None:
        if not self._started:
            self.code = CLIENT_CLOSED


# -- the middleware ---------------------------------------------------------------------------------
class AccessMiddleware:
    """CORS, request-id check, API key, rate limit, then the app; CORS headers and one JSON log line
    on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = _settings
        started = time.perf_counter()
        headers = Headers(scope=scope)
        method = scope["method"]
        path = route_path(scope)
        request_id = headers.get("x-request-id")
        own_request_id = request_id is None  # no Serve proxy in front (e.g. a test client): make one here
        if own_request_id:
            request_id = uuid.uuid4().hex
        allow_origin = settings.cors_origin(headers.get("origin"))
        facts: dict[str, Any] = {"task": _task_of(method, path), "key_id": None}
        scope.setdefault("state", {})["imgserve"] = facts
        answer = AnswerStatus()

        async def send_with_headers(message: Message) -> None:
            answer.see(message)
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                if own_request_id:
                    out["X-Request-Id"] = request_id
                if allow_origin is not None:
                    out["Access-Control-Allow-Origin"] = allow_origin
                    out.add_vary_header("Origin")
                    names = [*CORS_EXPOSE_ALWAYS, *(k for k in out.keys() if k.lower().startswith("x-imgserve-"))]
                    out["Access-Control-Expose-Headers"] = ", ".join(dict.fromkeys(names))
            await send(message)

        response: Response | None = None
        if method == "OPTIONS" and allow_origin is not None and "access-control-request-method" in headers:
            response = Response(status_code=204, headers={
                "Access-Control-Allow-Methods": CORS_ALLOW_METHODS,
                "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
                "Access-Control-Max-Age": str(CORS_MAX_AGE_S),
            })
        elif not REQUEST_ID.match(request_id):
            response = error_response(InvalidParameter(
                f"must be 1 to 128 characters of letters, digits and . _ : - (got {len(request_id)} characters)",
                "X-Request-Id"), retry_after_s=NO_RETRY_AFTER)
            request_id = "(invalid)"  # what the log line says instead
        elif is_api_path(path) and method != "OPTIONS":
            response = self._admit(settings, headers, scope, facts)
        try:
            if response is not None:
                await response(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        except asyncio.CancelledError:
            answer.cancelled()
            raise
        finally:
            duration_ms = (time.perf_counter() - started) * 1000.0
            line = {"event": "http_request", "request_id": request_id, "method": method, "path": path[:200],
                    "status": answer.code, "duration_ms": round(duration_ms, 1), **facts}
            log.info("%s %s %s %.1fms task=%s key=%s job=%s", method, path[:200], answer.code, duration_ms,
                     facts.get("task") or "-", facts.get("key_id") or "-", facts.get("job_id") or "-",
                     extra=line)

    @staticmethod
    def _admit(settings: AccessSettings, headers: Headers, scope: Scope, facts: dict[str, Any]) -> Response | None:
        """None when the request may go on; else its 401 or 429."""
        who = None
        if settings.keys:
            presented = presented_key(headers)
            kid = settings.keys.check(presented)
            if kid is None:
                facts["auth"] = "missing" if presented is None else "invalid"
                message = ("this API needs a key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
                           if presented is None else "the API key is not valid")
                return error_response(Unauthorized(message), retry_after_s=NO_RETRY_AFTER)
            facts["key_id"] = who = kid
        if settings.limiter is not None:
            if who is None:
                client = scope.get("client")
                who = f"ip:{client[0]}" if client else "ip:unknown"
            wait = settings.limiter.take(who)
            if wait is not None:
                return error_response(RateLimited(f"rate limit reached; a request is allowed again in {wait} s",
                                                  retry_after_s=wait), retry_after_s=NO_RETRY_AFTER)
        return None
