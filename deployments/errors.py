"""Errors a deployment raises about one request.

Each class is tiny and carries a stable machine-readable ``code``, a human ``message`` and, where a
single request field is to blame, that ``field``. Deployments raise them; only the ingress turns
them into HTTP statuses. They pickle cleanly so they survive the hop between Ray replicas.
"""

from __future__ import annotations


class ImgserveError(Exception):
    """Base class: something about one request that the client should be told."""

    code = "error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message, field)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message if self.field is None else f"{self.field}: {self.message}"


class BadImage(ImgserveError):
    """The bytes are not a decodable image (empty, truncated, corrupt)."""

    code = "bad_image"


class UnsupportedFormat(ImgserveError):
    """The bytes are an image in a format or mode the service does not accept."""

    code = "unsupported_format"


class TooLarge(ImgserveError):
    """The upload exceeds the byte limit or the image exceeds the pixel limit."""

    code = "too_large"


class InvalidParameter(ImgserveError):
    """A request parameter is out of range or names something that does not exist."""

    code = "invalid_parameter"


class OutOfMemory(ImgserveError):
    """The accelerator ran out of memory on this request; the replica keeps serving."""

    code = "out_of_memory"


class ModelFailure(ImgserveError):
    """The model raised on this request for a reason that is not the client's input."""

    code = "model_failure"


class Cancelled(ImgserveError):
    """The request was cancelled by its client; the model stopped at the next step."""

    code = "cancelled"


class TimedOut(ImgserveError):
    """The request took longer than the configured limit; the model stopped at the next step."""

    code = "timeout"


class Unavailable(ImgserveError):
    """What the request needs exists but cannot be used now (the default LoRA version's file went
    bad and no replica holds it); the service reports it; retry later or choose another."""

    code = "unavailable"
