"""Access and safety at the HTTP edge: API keys, per-key rate limits, CORS, request-id checks.

One pure ASGI middleware (`AccessMiddleware`) in the ingress replica, so it sees every HTTP request
before a route does and every response (errors included) on its way out. It gets its settings
where it is constructed (`AccessSettings.from_config`, when the ingress builds its app in the
replica). The Python handle path (`Ingress.run`) never passes here: callers inside the cluster are
trusted. The request's log line and metrics are the observability middleware's, which runs
outside this one and so also sees its refusals.

- **Keys** are stored only as SHA-256 hex digests (config `ingress.api_keys_sha256` plus the
  environment variable named by `ingress.api_keys_env`, read when the replica starts). A request
  to `/v1/*`, and with keys configured to `/openapi.json` (it lists the LoRA versions and styles
  that `/v1/models` protects), presents its key as `Authorization: Bearer <key>` or
  `X-API-Key: <key>`; the presented key is hashed and compared with every stored digest by
  `hmac.compare_digest`. Logs name a key by its id, the first 8 hex characters of its digest,
  never by the key (`serve_app.keys`).
- **Rate limit**: a token bucket per key id (per client address when keys are off) in this
  replica's memory: `burst` tokens, refilled at `per_minute / 60` tokens a second. With N ingress
  replicas a client can get up to N times the configured rate (see docs/architecture.md).
- **Wrong keys** take a token from the client address's bucket, so keys cannot be guessed at full speed
  (a missing key does not: it is a client that forgot, answered 401 at once).
- **Security headers** on every response: `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY`,
  `Referrer-Policy: no-referrer`, and a Content-Security-Policy of the service's own origin only, the
  same for every path: the web page and the API reference (/docs, Swagger UI served by the service,
  `serve_app.docs_page`) load nothing from elsewhere and run no inline code.
- **CORS** for the listed origins: answered preflights and readable result headers. Starlette's
  `CORSMiddleware` does not fit: it refuses a preflight it does not like with a plain-text 400,
  outside the one JSON error shape, and exposes only a fixed list of headers.
- **Request ids** are Ray Serve's own: its HTTP proxy takes a client's `X-Request-Id` or makes a
  UUID, puts it on the request, on every response and on every log record of the request. This
  middleware refuses (422 `invalid_parameter`) a client id that is not short and plain, so every id
  this service logs in its own line or stores with a job is; Serve's proxy still echoes the raw
  header on that 422 and puts it on its own log records.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import InvalidParameter
from serve_app.errors import RateLimited, Unauthorized, error_response
from serve_app.keys import hash_key, key_id, parse_digests

# A child of Serve's logger: its records go to the replica's Serve log file, in Serve's encoding
# (JSON with `logging_config: {encoding: JSON}`), with Serve's request id, route and replica.
log = logging.getLogger("ray.serve.imgserve")

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
"""A client-supplied X-Request-Id must match this (UUIDs, ULIDs, nginx/Envoy ids all do)."""
CORS_ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_ALLOW_HEADERS = "Authorization, X-API-Key, Content-Type, X-Request-Id, Idempotency-Key"
CORS_EXPOSE_ALWAYS = ("X-Request-Id", "Retry-After", "Location", "WWW-Authenticate", "Idempotent-Replayed")
CORS_MAX_AGE_S = 600
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
"""On every response: no content sniffing, no framing (clickjacking), no URLs leaked in Referer."""
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")
"""The page loads only its own files (result previews are blob: URLs); the API's JSON and images
are never rendered as a page that could run anything else."""
KEYED_DOCUMENTS = ("/openapi.json",)
"""Paths outside /v1 that need a key (and count against its rate limit) once keys are configured:
the OpenAPI document lists LoRA versions and styles. Without keys they stay open and unlimited."""
NO_RETRY_AFTER = 1
"""`error_response`'s fallback wait, never sent from here: 401 and 422 carry no Retry-After, and a
429 carries the rate limiter's own wait."""
MAX_BUCKETS = 10_000
"""Rate-limit buckets kept per replica; full (idle) buckets are dropped first, then the oldest."""


# -- keys --------------------------------------------------------------------------------------------
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


# -- settings ---------------------------------------------------------------------------------------
@dataclass
class AccessSettings:
    keys: ApiKeys = field(default_factory=lambda: ApiKeys(()))
    limiter: RateLimiter | None = None
    cors_origins: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, ingress: Any, environ: Mapping[str, str] | None = None) -> AccessSettings:
        """The settings of the `ingress` config section, with the key digests in the environment
        variable it names (read now: in the replica). Raises ValueError naming a bad environment value."""
        environ = os.environ if environ is None else environ
        digests = list(ingress.api_keys_sha256)
        if ingress.api_keys_env and environ.get(ingress.api_keys_env):
            digests += parse_digests(environ[ingress.api_keys_env], f"environment variable {ingress.api_keys_env}")
        limiter = None
        if ingress.rate_limit_per_minute is not None:
            limiter = RateLimiter(ingress.rate_limit_per_minute, ingress.rate_limit_burst)
        settings = cls(ApiKeys(digests), limiter, frozenset(ingress.cors_origins))
        log.info("access: %d API keys (ids %s), rate limit %s, CORS origins %s", len(settings.keys.digests),
                 ", ".join(key_id(d) for d in settings.keys.digests) or "-",
                 f"{ingress.rate_limit_per_minute}/min" if limiter else "off", sorted(settings.cors_origins) or "none")
        return settings

    def cors_origin(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for this origin, or None (no CORS headers)."""
        if not origin or not self.cors_origins:
            return None
        if origin in self.cors_origins:
            return origin
        return "*" if "*" in self.cors_origins else None


def facts(scope: Scope) -> dict[str, Any]:
    """This request's facts for its log line (task, key id, job id, request id), in its scope."""
    return scope.setdefault("state", {}).setdefault("imgserve", {})


def note(request: Any, **more: Any) -> None:
    """Add facts (task, job id) to this request's log line; a route calls it."""
    facts(request.scope).update(more)


def route_path(scope: Scope) -> str:
    """The request's path as the routes see it: without the app's `root_path` (its route prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def is_api_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def needs_admission(path: str, keys: ApiKeys) -> bool:
    """Whether a request to `path` goes through the key check and rate limit: /v1/*, and with keys
    configured the documents of `KEYED_DOCUMENTS`."""
    return is_api_path(path) or (bool(keys) and path in KEYED_DOCUMENTS)


# -- the middleware ---------------------------------------------------------------------------------
class AccessMiddleware:
    """CORS, request-id check, API key, rate limit, then the app; CORS headers on every response."""

    def __init__(self, app: ASGIApp, settings: AccessSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.settings
        headers = Headers(scope=scope)
        method = scope["method"]
        request_id = headers.get("x-request-id")
        allow_origin = settings.cors_origin(headers.get("origin"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    out.setdefault(name, value)
                out.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
            if message["type"] == "http.response.start" and allow_origin is not None:
                out = MutableHeaders(scope=message)
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
        elif request_id is not None and not REQUEST_ID.match(request_id):
            response = error_response(InvalidParameter(
                f"must be 1 to 128 characters of letters, digits and . _ : - (got {len(request_id)} characters)",
                "X-Request-Id"), retry_after_s=NO_RETRY_AFTER)
            facts(scope)["request_id"] = "(invalid)"  # what the log line says instead
        elif needs_admission(route_path(scope), settings.keys) and method != "OPTIONS":
            response = self._admit(settings, headers, scope)
        if response is not None:
            await response(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive, send_with_headers)

    @staticmethod
    def _admit(settings: AccessSettings, headers: Headers, scope: Scope) -> Response | None:
        """None when the request may go on; else its 401 or 429."""
        who = None
        if settings.keys:
            presented = presented_key(headers)
            kid = settings.keys.check(presented)
            if kid is None:
                facts(scope)["auth"] = "missing" if presented is None else "invalid"
                refused = AccessMiddleware._limit(settings, scope, None) if presented is not None else None
                if refused is not None:  # a wrong key costs its address a token: keys cannot be guessed at full speed
                    return refused
                message = ("this API needs a key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`"
                           if presented is None else "the API key is not valid")
                return error_response(Unauthorized(message), retry_after_s=NO_RETRY_AFTER)
            facts(scope)["key_id"] = who = kid
        return AccessMiddleware._limit(settings, scope, who)

    @staticmethod
    def _limit(settings: AccessSettings, scope: Scope, who: str | None) -> Response | None:
        """A token of `who`'s bucket (the client address when None), or its 429; None without a limit."""
        if settings.limiter is None:
            return None
        if who is None:
            client = scope.get("client")
            who = f"ip:{client[0]}" if client else "ip:unknown"
        wait = settings.limiter.take(who)
        if wait is None:
            return None
        return error_response(RateLimited(f"rate limit reached; a request is allowed again in {wait} s",
                                          retry_after_s=wait), retry_after_s=NO_RETRY_AFTER)
