"""Reading an upload at the ingress: a multipart form or a raw image body, bounded in size and time.

Contract: `read_upload(request, max_image_bytes, read_timeout_s, min_rate)` returns (image bytes, text fields)
or raises a `deployments.errors` / `serve_app.errors` class the ingress maps to its status:
- 413 `too_large` as soon as the body passes its limit (a declared Content-Length over it is refused
  before a byte is read): the body is never read whole first;
- 408 `read_timeout` when the client pauses longer than `read_timeout_s` between two pieces of its
  body, or, once `read_timeout_s` has passed since the body began, its average rate is below
  `min_rate` bytes/s (raw or multipart: the form is parsed from the same chunks as they arrive);
  so a client that stops, or trickles one byte a second, holds its ingress slot for about
  `read_timeout_s`, while a large upload on a slow but live link still arrives;
- the field errors of `serve_app.forms` (422/400), and 415 for any other content type.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.requests import Request

from deployments.errors import BadImage, InvalidParameter, TooLarge, UnsupportedFormat
from serve_app import forms
from serve_app.errors import ReadTimeout

FORM_OVERHEAD_BYTES = 256 * 1024
"""What a multipart body may carry on top of the image limit: its framing and the text fields."""


async def body_chunks(request: Request, limit: int, read_timeout_s: float,
                      min_rate: float = 0.0) -> AsyncIterator[bytes]:
    """The request body as it arrives, refusing (413) as soon as it passes `limit` bytes and (408)
    when the next piece takes longer than `read_timeout_s` to come, or the body, past its first
    `read_timeout_s`, arrives slower than `min_rate` bytes a second on average."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes", "image")
    size = 0
    started = time.monotonic()
    pieces = request.stream().__aiter__()
    while True:
        try:
            # per piece, not for the whole body: a large upload on a slow but live link still arrives
            chunk = await asyncio.wait_for(pieces.__anext__(), read_timeout_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise ReadTimeout(f"no part of the request body arrived for {read_timeout_s:g} s; send the body "
                              "without pauses") from None
        size += len(chunk)
        elapsed = time.monotonic() - started
        if elapsed > read_timeout_s and size < min_rate * elapsed:
            raise ReadTimeout(f"the request body arrived at {size / elapsed:.0f} bytes/s for {elapsed:.0f} s, below the "
                              f"minimum of {min_rate:g} bytes/s; send it faster") from None
        if size > limit:
            raise TooLarge(f"body exceeds the limit of {limit} bytes", "image")
        if chunk:
            yield chunk


async def read_body(request: Request, limit: int, read_timeout_s: float, min_rate: float = 0.0) -> bytes:
    return b"".join([chunk async for chunk in body_chunks(request, limit, read_timeout_s, min_rate)])


def add_field(fields: dict[str, str], key: str, value: str) -> None:
    if key in fields:
        raise InvalidParameter("given more than once", key)
    fields[key] = value


async def read_upload(request: Request, max_image_bytes: int, read_timeout_s: float,
                      min_rate: float = 0.0, image_fields: tuple[str, ...] = ("image",)) -> tuple[bytes, dict[str, str]]:
    """(image bytes, text fields) from a multipart form or a raw image body with query fields;
    the image is the one file part, named one of `image_fields` (OpenAI's edits form may say `image[]`)."""
    fields: dict[str, str] = {}
    for key, value in forms.parse_query(request.scope.get("query_string", b"")):  # 422 on non-UTF-8
        add_field(fields, key, value)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        # parsed as it arrives: the image is copied once, into the form's file, not first into a body
        limit = max_image_bytes + FORM_OVERHEAD_BYTES
        form = await forms.parse_multipart(request.headers, body_chunks(request, limit, read_timeout_s, min_rate), limit)
        image: bytes | None = None
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key not in image_fields:
                        names = " or ".join(f"`{name}`" for name in image_fields)
                        raise InvalidParameter(f"only the {names} field may be a file", key)
                    if image is not None:  # every task takes one picture
                        raise BadImage("a second image: every task takes one image per request", key)
                    image = await value.read()
                elif key in image_fields:
                    raise BadImage(f"`{key}` must be a file part, not a text field", key)
                else:
                    add_field(fields, key, value)
        finally:
            await form.close()
        if image is None:
            raise BadImage("the multipart body has no `image` file", "image")
        return image, fields
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return await read_body(request, max_image_bytes, read_timeout_s, min_rate), fields
    raise UnsupportedFormat(
        f"content type {content_type or '(none)'!r}: send multipart/form-data with an `image` file "
        "or a raw image/* body",
        "image",
    )
