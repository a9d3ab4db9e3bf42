"""Turns any exception raised while serving one request into the one JSON error shape.

`{"error": {"code", "message", "field"?, "type", "param"}}` with the status from the design's table:
`code`, `message` and `field` are the service's own; `type` and `param` (= `field`, or null) are
OpenAI's, so an OpenAI client reads the same body (`openai.BadRequestError` & co. by status). This is the only
place where errors become HTTP; deployments raise the tiny classes of `deployments.errors`, which
reach the ingress through Ray (wrapped in RayTaskError, which is still an instance of the cause).
"""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse
from ray import exceptions as ray_exceptions
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.errors import (
    BadImage,
    ImgserveError,
    InvalidParameter,
    ModelFailure,
    OutOfMemory,
    TimedOut,
    TooLarge,
    Unavailable,
    UnsupportedFormat,
)

log = logging.getLogger("imgserve")

STATUS: dict[type[ImgserveError], int] = {
    BadImage: 400,
    UnsupportedFormat: 415,
    TooLarge: 413,
    InvalidParameter: 422,
    OutOfMemory: 507,
    ModelFailure: 500,
    TimedOut: 504,
}


class NotFound(ImgserveError):
    """The route or resource does not exist."""

    code = "not_found"


class MethodNotAllowed(ImgserveError):
    """The route exists but not with this HTTP method."""

    code = "method_not_allowed"


class NotReady(ImgserveError):
    """A job has no result (yet): it is still queued or running, or it failed or was cancelled."""

    code = "not_ready"


class QueueFull(ImgserveError):
    """The job queue is at its configured depth; retry later."""

    code = "queue_full"


class Unauthorized(ImgserveError):
    """No API key, or one that is not accepted, on a route that needs one."""

    code = "unauthorized"


class RateLimited(ImgserveError):
    """This key (or client address) has used its requests for now; `retry_after_s` until the next."""

    code = "rate_limited"

    def __init__(self, message: str, field: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message, field)
        self.retry_after_s = retry_after_s


class QuotaExceeded(RateLimited):
    """This key has `jobs.max_queued_per_key` jobs waiting; `retry_after_s` is a hint."""

    code = "quota_exceeded"


class InsufficientStorage(ImgserveError):
    """The job store cannot take more bytes (its disk is full, or `jobs.max_store_bytes` is
    reached with nothing finished left to forget); nothing was accepted."""

    code = "insufficient_storage"


class ReadTimeout(ImgserveError):
    """The client stopped sending its body for `ingress.read_timeout_s`; its slot is given back."""

    code = "read_timeout"


class TooManyStreams(RateLimited):
    """Event streams are capped per key and per ingress replica; close one or poll the status."""

    code = "too_many_streams"


class IdempotencyConflict(ImgserveError):
    """An `Idempotency-Key` already used by this API key for a different request (within the
    retention of idempotency keys); send a new key for a new request."""

    code = "idempotency_conflict"


STATUS.update({NotFound: 404, MethodNotAllowed: 405, NotReady: 409, QueueFull: 503, Unauthorized: 401,
               RateLimited: 429, InsufficientStorage: 507, Unavailable: 503, ReadTimeout: 408, IdempotencyConflict: 422})


def status_of(exc: ImgserveError) -> int:
    """The HTTP status of one of the service's errors (500 for a class the table does not know)."""
    return next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)


def openai_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(code: str, message: str, field: str | None = None, status: int = 500) -> dict:
    """The one error shape; `status` (the response's) gives OpenAI's `type`."""
    error = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    error.update(type=openai_type(status), param=field)
    return {"error": error}


def error_response(exc: BaseException, retry_after_s: int) -> JSONResponse:
    """The response for `exc`; unknown exceptions are logged and answered 500 without internals."""
    if isinstance(exc, ImgserveError):
        status = status_of(exc)
        headers = {}
        if status in (429, 503):  # the error's own wait (a rate limit's next token), else the configured one
            headers["Retry-After"] = str(getattr(exc, "retry_after_s", None) or retry_after_s)
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="imgserve"'
        return JSONResponse(error_body(exc.code, exc.message, exc.field, status), status_code=status, headers=headers or None)
    if isinstance(exc, BackPressureError):
        return JSONResponse(
            error_body("queue_full", "the service is at capacity; retry after the indicated delay", status=503),
            status_code=503,
            headers={"Retry-After": str(retry_after_s)},
        )
    if isinstance(exc, (ray_exceptions.ActorDiedError, ray_exceptions.ActorUnavailableError, DeploymentUnavailableError)):
        log.warning("replica unavailable: %s", exc)
        return JSONResponse(
            error_body("unavailable", "a model replica became unavailable; retry the request", status=503),
            status_code=503,
            headers={"Retry-After": str(retry_after_s)},
        )
    log.exception("internal error while serving a request", exc_info=exc)
    return JSONResponse(error_body("internal", "internal error; the request was not completed"), status_code=500)
