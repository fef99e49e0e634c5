"""Helpers shared by the host security event connectors (``windows_events``, ``ocsf_events``).

No connector lives here: the small readers below turn the loose shapes shippers send (a value
or a list, an epoch in seconds or milliseconds, ``-`` for nothing) into the typed fields of
:class:`connectors.model.SecurityEventRecord`.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, datetime
from typing import Any

from connectors.base import parse_time

_NOTHING = {"", "-", "n/a", "null", "none", "unknown"}
_CLASS_UID = re.compile(rb'"class_uid"\s*:\s*"?(\d+)')
EVENT_CLASSES = frozenset({3002, 1007, 4001})  # OCSF Authentication, Process Activity, Network Activity


def first_class_uid(head: bytes) -> int | None:
    """The first ``class_uid`` value in a JSON head, if any."""
    match = _CLASS_UID.search(head)
    return int(match.group(1)) if match else None


def text(value: Any, limit: int = 500) -> str | None:
    """A short string, or None for empty and placeholder values; the first of a list."""
    if value is None:
        return None
    if type(value) is str:  # the common case, first (a parse calls this some 20 times an event)
        value = value.strip()
        return None if len(value) < 8 and value.lower() in _NOTHING else value[:limit]
    if isinstance(value, list):
        value = next((item for item in value if text(item, limit)), None)
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return None if value.lower() in _NOTHING else value[:limit]


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")  # dotted quad, canonical already (no leading zeros)


def ip(value: Any) -> str | None:
    """An IP address in its canonical text (IPv4-mapped IPv6 unwrapped), or None."""
    raw = text(value, 100)
    if raw is None:
        return None
    if _IPV4.fullmatch(raw):  # ipaddress would give it back unchanged, at ten times the cost
        return raw
    if raw.startswith("::ffff:") and "." in raw:
        raw = raw[len("::ffff:") :]
    try:
        return str(ipaddress.ip_address(raw.split("%", 1)[0]))
    except ValueError:
        return None


def ips(value: Any) -> tuple[list[str], list[str]]:
    """(IPv4, IPv6) addresses of a value or list, canonical, without loopback."""
    v4: list[str] = []
    v6: list[str] = []
    for item in value if isinstance(value, list) else [value]:
        address = ip(item)
        if address is None:
            continue
        if ":" in address:
            if not ipaddress.ip_address(address).is_loopback:
                v6.append(address)
        elif not address.startswith("127."):  # 127.0.0.0/8, IPv4's loopback
            v4.append(address)
    return v4, v6


def when(value: Any) -> datetime | None:
    """An event time: ISO 8601, or epoch seconds or milliseconds (OCSF ``time`` is milliseconds)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float) or (isinstance(value, str) and value.strip().isdigit()):
        number = float(value)
        return datetime.fromtimestamp(number / 1000 if number > 1e11 else number, tz=UTC)
    if isinstance(value, str):
        return parse_time(value)
    raise ValueError(f"not a time: {str(value)[:40]!r}")


def integer(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def at(item: Any, *path: str) -> Any:
    """``item[path[0]][path[1]]...``, or None where a step is missing or not an object."""
    for key in path:
        if not isinstance(item, dict):
            return None
        item = item.get(key)
    return item
