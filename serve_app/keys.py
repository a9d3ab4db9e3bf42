"""API keys as the service stores them: SHA-256 hex digests, never the keys; a key's id for logs.

A leaf (standard library only), so the config can check digests without importing the ingress.
"""

from __future__ import annotations

import hashlib
import re
import secrets

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
KEY_ID_CHARS = 8


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
