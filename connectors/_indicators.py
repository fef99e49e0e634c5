"""What the indicator connectors share: observables normalized the way the gateway stores and
matches them (gateway/intel/observables.py normalizes alert evidence with the same functions).

    ipv4 / ipv6  the address in its canonical text ("2001:db8::1"); a CIDR is refused unless it is
                 one address (/32, /128): ranges are not matched
    domain       lower case, without a trailing dot
    url          scheme and host lower case, the rest as given
    email        lower case
    md5 sha1 sha256 sha512   lower-case hex of the right length
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit, urlunsplit

OBSERVABLE_TYPES = ("ipv4", "ipv6", "domain", "url", "email", "md5", "sha1", "sha256", "sha512")
HASH_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
_HEX = re.compile(r"^[0-9a-f]+$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_-]{1,63}$")
MAX_VALUE = 2048


def normalize(observable_type: str, raw: object) -> str:
    """The stored form of an observable; ValueError naming the problem when it is not one."""
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"the {observable_type} observable is empty")
    value = raw.strip()
    if observable_type in ("ipv4", "ipv6"):
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value[:80]!r} is not an IP address") from None
        if network.num_addresses != 1:
            raise ValueError(f"{value[:80]!r} is an address range; only single addresses are matched")
        address = network.network_address
        if f"ipv{address.version}" != observable_type:
            raise ValueError(f"{value[:80]!r} is not an {observable_type.upper()} address")
        return str(address)
    if observable_type == "domain":
        name = value.lower().rstrip(".")
        if not _DOMAIN.match(name):
            raise ValueError(f"{value[:80]!r} is not a domain name")
        return name
    if observable_type == "url":
        parts = urlsplit(value)
        if not parts.scheme or not parts.netloc:
            raise ValueError(f"{value[:80]!r} is not an absolute URL")
        normalized = urlunsplit(
            (parts.scheme.lower(), parts.netloc.lower(), parts.path, parts.query, parts.fragment)
        )
        if len(normalized) > MAX_VALUE:
            raise ValueError(f"the URL is longer than {MAX_VALUE} characters")
        return normalized
    if observable_type == "email":
        if "@" not in value or len(value) > 320:
            raise ValueError(f"{value[:80]!r} is not an email address")
        return value.lower()
    if observable_type in HASH_LENGTHS:
        digest = value.lower()
        if len(digest) != HASH_LENGTHS[observable_type] or not _HEX.match(digest):
            raise ValueError(
                f"{value[:80]!r} is not a {observable_type.upper()} hash "
                f"({HASH_LENGTHS[observable_type]} hex digits)"
            )
        return digest
    raise ValueError(f"unknown observable type {observable_type!r}")


def try_normalize(observable_type: str, raw: object) -> str | None:
    """The stored form, or None when ``raw`` is not such an observable (for evidence, never rejected)."""
    try:
        return normalize(observable_type, raw)
    except ValueError:
        return None


def ip_type(raw: object) -> str | None:
    """``ipv4`` or ``ipv6`` for an address (a scope suffix ``%...`` ignored), else None."""
    if not isinstance(raw, str):
        return None
    try:
        return f"ipv{ipaddress.ip_address(raw.strip().split('%')[0]).version}"
    except ValueError:
        return None
