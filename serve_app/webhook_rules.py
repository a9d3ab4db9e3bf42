"""The rules of webhooks, pure and standard library only (the config validates with them too).

- Events: `parse_events` reads `webhook_events` (comma-separated names, or a list of them).
- Allow list: `parse_allow` reads `jobs.webhook_allow` entries — a host name (`hooks.example.com`),
  a name with a port (`hooks.example.com:8443`), an IP address (`203.0.113.7`, `[::1]:9000`) or a
  CIDR block (`10.0.0.0/8`, with `:port` after a bracketed IPv6 block or an IPv4 one). `check_url`
  says whether a `webhook_url` may be called: http(s), and its host listed by name (a name entry) or
  by address (an address or block entry containing the literal IP). `address_refusal` is the
  delivery-time rule for the address a name resolved to: public addresses pass, private, loopback,
  link-local, reserved and multicast ones only when an address or block entry contains them.
- Secret and signature (Standard Webhooks): the secret is `whsec_` + base64 of the key;
  `sign` gives `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
- Retries: `backoff(n)`, the pause after the n-th failed attempt: 1 s doubling, at most 5 min,
  plus up to 10 % jitter (so many receivers that come back at once are not hit in step).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

EVENTS: tuple[str, ...] = ("started", "progress", "succeeded", "failed", "cancelled")
DEFAULT_EVENTS: tuple[str, ...] = ("succeeded", "failed", "cancelled")
MAX_URL_CHARS = 2048
SECRET_PREFIX = "whsec_"
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0
JITTER = 0.1

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class AllowRule:
    """One `webhook_allow` entry: a host `name`, or a `network` (an address is a /32 or /128);
    `port` None: any port."""

    entry: str
    name: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    def admits_port(self, port: int) -> bool:
        return self.port is None or self.port == port


def parse_events(events: str | Iterable[str] | None) -> list[str]:
    """The events asked for, in EVENTS order; DEFAULT_EVENTS when none are named. ValueError
    naming an unknown one."""
    parts = [events] if events is None or isinstance(events, str) else list(events)
    names: set[str] = set()
    for part in parts:
        if not isinstance(part, str) and part is not None:
            raise ValueError(f"not an event name: {part!r}")
        for name in (part or "").split(","):
            name = name.strip().lower()
            if name and name not in EVENTS:
                raise ValueError(f"unknown event {name[:40]!r}; events are {', '.join(EVENTS)} "
                                 "(comma-separated)")
            if name:
                names.add(name)
    return [name for name in EVENTS if name in names] or list(DEFAULT_EVENTS)


def _host_name(text: str) -> str | None:
    """`text` as a lower-case ASCII host name (IDNA for non-ASCII), None when it is not one."""
    text = text.strip().rstrip(".").lower()
    try:
        text = text.encode("idna").decode("ascii") if not text.isascii() else text
    except UnicodeError:
        return None
    return text if _NAME.match(text) else None


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{entry!r}: the port must be 1..65535")
    return int(text)


def parse_allow_entry(entry: str) -> AllowRule:
    """One allow-list entry as a rule; ValueError saying why it is not one."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"{entry!r}: expected a host, host:port, an IP address or a CIDR block")
    text, port = entry.strip(), None
    if text.startswith("["):  # [IPv6] or [IPv6/len], with an optional :port
        inside, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{entry!r}: expected [address]:port")
            port = _port(rest[1:], entry)
        text = inside
    elif text.count(":") == 1:  # a name, IPv4 address or IPv4 block with a port
        text, port_text = text.split(":")
        port = _port(port_text, entry)
    try:
        network = ipaddress.ip_network(text, strict=True) if "/" in text else ipaddress.ip_network(text)
    except ValueError as exc:
        if "/" in text or ":" in text or re.fullmatch(r"[\d.]+", text):
            raise ValueError(f"{entry!r}: not an IP address or CIDR block ({exc})") from None
        name = _host_name(text)
        if name is None:
            raise ValueError(f"{entry!r}: not a host name, IP address or CIDR block") from None
        return AllowRule(entry, name=name, port=port)
    return AllowRule(entry, network=network, port=port)


def parse_allow(entries: Iterable[str]) -> list[AllowRule]:
    return [parse_allow_entry(entry) for entry in entries]


def literal_ip(host: str) -> IPAddress | None:
    """`host` as an IP address (IPv4-mapped IPv6 as the IPv4 it is; a zone dropped), else None."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _listed(ip: IPAddress, port: int, rules: list[AllowRule]) -> bool:
    return any(rule.network is not None and ip.version == rule.network.version and ip in rule.network
               and rule.admits_port(port) for rule in rules)


def check_url(url: str, rules: list[AllowRule]) -> tuple[str, int]:
    """(host, port) of a `webhook_url` the allow list admits; ValueError saying why not."""
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise ValueError(f"must be an http or https URL of at most {MAX_URL_CHARS} characters")
    if any(ord(c) <= 32 or ord(c) == 127 for c in url):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("not a valid URL (its host or port)") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    port = port or _DEFAULT_PORTS[scheme]
    if not rules:
        raise ValueError("webhooks are off on this server (jobs.webhook_allow is empty)")
    ip = literal_ip(parts.hostname)
    if ip is not None:
        if not _listed(ip, port, rules):
            raise ValueError(f"address {ip} (port {port}) is not in this server's jobs.webhook_allow")
        return str(ip), port
    host = _host_name(parts.hostname)
    if host is None:
        raise ValueError("its host is not a valid host name")
    if not any(rule.name == host and rule.admits_port(port) for rule in rules):
        raise ValueError(f"host {host[:100]} (port {port}) is not in this server's jobs.webhook_allow")
    return host, port


def needs_listing(ip: IPAddress) -> bool:
    """Private, loopback, link-local, shared, reserved, unspecified or multicast: not for the
    public internet, so called only when the operator listed it."""
    return not ip.is_global or ip.is_multicast


def address_refusal(ip: IPAddress, port: int, rules: list[AllowRule]) -> str | None:
    """Why a resolved address may not be called (None: it may): the delivery-time rule."""
    if needs_listing(ip) and not _listed(ip, port, rules):
        return (f"{ip} is a private, loopback, link-local or reserved address; list it (or a block "
                "containing it) in jobs.webhook_allow to allow it")
    return None


def parse_secret(secret: str) -> bytes:
    """The signing key of a `whsec_<base64>` secret; ValueError when it is not one."""
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret is {SECRET_PREFIX!r} followed by base64")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the part after {SECRET_PREFIX!r} is not valid base64") from None
    if len(key) < 16:
        raise ValueError("the key is too short: at least 16 bytes (24 to 64 recommended)")
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value (one `v1` signature)."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def backoff(failed_attempts: int, rng: random.Random | None = None, base_s: float = BACKOFF_BASE_S) -> float:
    """Seconds to wait after the `failed_attempts`-th failed attempt (1, 2, …)."""
    delay = min(base_s * 2 ** min(max(0, failed_attempts - 1), 30), BACKOFF_CAP_S)
    return delay * (1 + (rng or random).uniform(0, JITTER))
