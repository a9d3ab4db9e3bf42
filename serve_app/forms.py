"""Strict parsing of request fields: the query string and multipart/form-data bodies.

Starlette's parsers are lenient in ways a hardened API should not be: a text field that is not
UTF-8 silently becomes Latin-1 (multipart) or U+FFFD (query), a second file or a 65th field is a
plain 400 whatever it was, and a text part over 1 MiB is refused without naming it. Here:

- a name or value that is not valid UTF-8 (or the charset the multipart body declares) is a 422
  `invalid_parameter` naming the field;
- limits on the number of files and fields are 422 too; one file part is allowed, and a second
  one is refused by the caller, naming it;
- broken framing (no boundary, garbage, a missing `name`) is a 400 `bad_image` on `image`, like any
  other upload that cannot be read.

The body's size is limited by the caller, in the chunks it hands over.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import unquote_to_bytes

from starlette.datastructures import FormData, Headers
from starlette.formparsers import MultiPartException, MultiPartParser

from deployments.errors import BadImage, ImgserveError, InvalidParameter

MAX_FILES = 4
"""File parts parsed at most; only `image` may be one, so any second file is refused by name."""
MAX_FIELDS = 64
"""Text parts parsed at most; every task has far fewer fields."""


def _text(raw: bytes, field: str | None, charset: str = "utf-8") -> str:
    try:
        return raw.decode(charset)
    except (UnicodeDecodeError, LookupError):
        raise InvalidParameter(f"not valid {charset} text (send UTF-8)", field) from None


def parse_query(query: bytes) -> list[tuple[str, str]]:
    """The query string's (name, value) pairs, blank values kept (as Starlette does); a name or
    value whose percent-decoded bytes are not UTF-8 is refused naming the field."""
    pairs = []
    for pair in query.split(b"&"):
        if not pair:
            continue
        name, _, value = pair.partition(b"=")
        key = _text(unquote_to_bytes(name.replace(b"+", b" ")), None)
        pairs.append((key, _text(unquote_to_bytes(value.replace(b"+", b" ")), key)))
    return pairs


class _StrictMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, except that a text part that does not decode in the body's
    charset is refused instead of being read as Latin-1."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            _text(bytes(part.data), part.field_name or None, self._charset)
        super().on_part_end()


async def parse_multipart(headers: Headers, chunks: AsyncIterator[bytes], limit: int) -> FormData:
    """The form in a multipart/form-data body, parsed from its `chunks` as they arrive; the caller
    size-limits them to `limit` bytes (raising its own error past it) and closes the form."""
    # Text parts may be as large as the body: the body limit already bounds them, and a long
    # prompt is then refused by name (422) instead of as an unreadable form.
    parser = _StrictMultiPartParser(headers, chunks, max_files=MAX_FILES, max_fields=MAX_FIELDS,
                                    max_part_size=limit + 1)
    try:
        return await parser.parse()
    except ImgserveError:
        raise
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise InvalidParameter(f"{exc.message} Only `image` may be a file.", "image") from None
        if exc.message.startswith("Too many fields"):
            raise InvalidParameter(exc.message, None) from None
        raise BadImage(f"malformed multipart body: {exc.message}", "image") from None
    except Exception as exc:  # python-multipart raises plain errors on broken framing
        raise BadImage(f"malformed multipart body: {exc}", "image") from None
