"""Idempotent submission: the `Idempotency-Key` header and the fingerprint of a request.

Contract: `idempotency(request_headers, route, task, fields, image)` → None when the request has no
`Idempotency-Key`, else (key, fingerprint): the fingerprint is the SHA-256 of the request as sent
(route, task, its fields in sorted order, the image's bytes), never of the resolved request (a
random seed resolved on the first try would make every retry differ). A key is 1 to 255 printable
ASCII characters (422 naming `Idempotency-Key` otherwise). The job store keeps (owner, key) →
(fingerprint, job) for `jobs.idempotency_ttl_s`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from deployments.errors import InvalidParameter

HEADER = "idempotency-key"
FIELD = "Idempotency-Key"
MAX_KEY_CHARS = 255


def fingerprint(route: str, task: str, fields: Mapping[str, Any], image: bytes) -> str:
    """What makes two requests "the same request" for one idempotency key."""
    digest = hashlib.sha256()
    digest.update(json.dumps([route, task, sorted((str(k), str(v)) for k, v in fields.items())]).encode())
    digest.update(b"\0")
    digest.update(image)
    return digest.hexdigest()


def idempotency(headers: Mapping[str, str], route: str, task: str, fields: Mapping[str, Any],
                image: bytes) -> tuple[str, str] | None:
    """(key, fingerprint) of a request that carries an Idempotency-Key; None without one."""
    key = headers.get(HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_CHARS or not all(32 < ord(c) < 127 for c in key):
        raise InvalidParameter(f"must be 1 to {MAX_KEY_CHARS} printable ASCII characters without spaces", FIELD)
    return key, fingerprint(route, task, fields, image)
