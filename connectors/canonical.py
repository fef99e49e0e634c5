"""The gateway's own JSON format: what a partner without a native format pushes.

    {
      "provider": "Contoso Scanner",          optional; must be the client's provider
      "scan": {"type": "full"},               optional; "full" resolves what is not reported
      "findings": [ {                          one object per provider record
        "id": "provider's own id",             required, unique per provider
        "resource": {"cloudId", "agentId", "fqdn", "hostname", "netbios", "mac",
                     "ipv4": [...], "ipv6": [...], "kind", "name", "os"},
                                               required, at least one identifier
        "title": "...",                        required
        "severity": "informational|low|medium|high|critical",   required
        "status": "open|fixed",                default open
        "cves": ["CVE-2024-3094"], "vendorId": "QID-38739",
        "kind": "vulnerability|compliance", "recommendation": "type key",
        "description", "remediation", "evidence", "references": [...],
        "cvssScore": 9.8, "cvssVector": "CVSS:3.1/...",
        "firstSeen", "lastSeen", "providerTimestamp": ISO 8601 date-times
      } ]
    }

A document of up to ``WHOLE_DOCUMENT_BYTES`` is decoded at once with msgspec (about ten
times faster than streaming); a larger one is streamed with ijson, so memory stays flat
whatever the size.  The envelope keys may come in any order.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from functools import lru_cache
from itertools import chain
from typing import Any, BinaryIO

import ijson
import msgspec

from connectors.base import ParseOptions, find_cves, parse_time
from connectors.model import (
    IDENTIFIER_KINDS,
    SEVERITIES,
    FindingRecord,
    FormatError,
    Rejected,
    ResourceRef,
)

FORMAT = "canonical"
TITLE = "Gateway canonical findings JSON"
CONTENT_TYPES = ("application/json",)
RECORD_KIND = "findings"

_RESOURCE_KEYS = {
    "cloudId": "cloud_id",
    "agentId": "agent_id",
    "fqdn": "fqdn",
    "hostname": "hostname",
    "netbios": "netbios",
    "mac": "mac",
}
_MAX_TEXT = 65536
WHOLE_DOCUMENT_BYTES = 64 << 20


_FOREIGN_MARKERS = (b'"SchemaVersion"', b'"ProductArn"', b'"ruleName"', b'"entityDome9Id"', b'"bundleId"')


def sniff(head: bytes) -> bool:
    """A JSON object with "findings" whose records carry "resource", and no other format's keys."""
    text = head.lstrip()
    return (
        text.startswith(b"{")
        and b'"findings"' in text
        and b'"resource"' in text
        and not any(marker in text for marker in _FOREIGN_MARKERS)
    )


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[FindingRecord | Rejected]:
    """The findings of a canonical document: decoded at once when small, else streamed."""
    head = _read_up_to(stream, WHOLE_DOCUMENT_BYTES + 1)
    if len(head) <= WHOLE_DOCUMENT_BYTES:
        yield from _records(_whole(head))
        return
    index = [-1]
    try:
        yield from _records(ijson.items(_Joined(head, stream), "findings.item", use_float=True), index)
    except ijson.JSONError as exc:
        raise FormatError(f"not well-formed JSON after findings[{index[0]}]: {exc}") from None


def _read_up_to(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes: fewer only at the end of the stream (``read`` may return less)."""
    parts, total = [], 0
    while total < size:
        part = stream.read(min(size - total, 1 << 20))
        if not part:
            break
        parts.append(part)
        total += len(part)
    return b"".join(parts)


def _whole(data: bytes) -> list:
    try:
        document = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise FormatError(f"not well-formed JSON: {exc}") from None
    if not isinstance(document, dict):
        return []
    items = document.get("findings")
    return items if isinstance(items, list) else []


def _records(items, position: list[int] | None = None) -> Iterator[FindingRecord | Rejected]:
    for index, item in enumerate(items):
        if position is not None:
            position[0] = index
        try:
            yield to_record(item)
        except (TypeError, ValueError, KeyError) as exc:
            provider_id = item.get("id") if isinstance(item, dict) else None
            yield Rejected(
                position=f"findings[{index}]",
                reason=str(exc),
                provider_id=provider_id if isinstance(provider_id, str) else None,
            )


class _Joined(io.RawIOBase):
    """The bytes already read, then the rest of the stream."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self.parts = chain([head], iter(lambda: rest.read(1 << 20), b""))
        self.buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:  # type: ignore[override]
        while not self.buffer:
            part = next(self.parts, None)
            if part is None:
                return 0
            self.buffer = memoryview(part)
        n = min(len(target), len(self.buffer))
        target[:n] = self.buffer[:n]
        self.buffer = self.buffer[n:]
        return n


def _text(item: dict, key: str, required: bool = False) -> str | None:
    value = item.get(key)
    if value is None:
        if required:
            raise ValueError(f"'{key}' is required")
        return None
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string")
    if required and not value.strip():
        raise ValueError(f"'{key}' must not be empty")
    return value[:_MAX_TEXT]


def _strings(item: dict, key: str) -> list[str]:
    value = item.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"'{key}' must be a list of strings")
    return value


def _time(item: dict, key: str):
    value = item.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be an ISO 8601 date-time string")
    try:
        return _parse_time(value)
    except ValueError:
        raise ValueError(f"'{key}' is not an ISO 8601 date-time: {value[:64]!r}") from None


@lru_cache(maxsize=4096)
def _parse_time(value: str):
    return parse_time(value)  # a push repeats a few scan times thousands of times


def to_resource(raw: Any) -> ResourceRef:
    """Validate a canonical resource object."""
    if not isinstance(raw, dict):
        raise ValueError("'resource' must be an object")
    fields: dict[str, Any] = {}
    for key, attr in _RESOURCE_KEYS.items():
        value = _text(raw, key)
        if value:
            fields[attr] = value
    for key in ("ipv4", "ipv6"):
        values = _strings(raw, key)
        if values:
            fields[key] = values
    for key in ("kind", "name", "os"):
        value = _text(raw, key)
        if value:
            fields[key] = value
    if not any(kind in fields for kind in IDENTIFIER_KINDS):
        raise ValueError("'resource' needs at least one identifier (" + ", ".join(
            list(_RESOURCE_KEYS) + ["ipv4", "ipv6"]) + ")")
    return ResourceRef(**fields)


def to_record(item: Any) -> FindingRecord:
    """Validate one canonical finding object into a FindingRecord."""
    if not isinstance(item, dict):
        raise ValueError("a finding must be an object")
    provider_id = item.get("id")
    if isinstance(provider_id, (int, float)) and not isinstance(provider_id, bool):
        provider_id = str(provider_id)
    if not isinstance(provider_id, str) or not provider_id.strip():
        raise ValueError("'id' is required: the provider's own id of the record")
    if len(provider_id) > 512:
        raise ValueError("'id' is longer than 512 characters")
    severity = item.get("severity")
    if severity not in SEVERITIES:
        raise ValueError(f"'severity' must be one of {', '.join(SEVERITIES)}")
    status = item.get("status", "open")
    if status not in ("open", "fixed"):
        raise ValueError("'status' must be 'open' or 'fixed'")
    kind = item.get("kind", "vulnerability")
    if kind not in ("vulnerability", "compliance"):
        raise ValueError("'kind' must be 'vulnerability' or 'compliance'")
    cves = _strings(item, "cves")
    normalized_cves = find_cves(*cves)
    if len(normalized_cves) != len(set(c.upper() for c in cves)):
        raise ValueError("'cves' must hold CVE ids like CVE-2024-3094")
    score = item.get("cvssScore")
    if score is not None and (not isinstance(score, (int, float)) or not 0 <= score <= 10):
        raise ValueError("'cvssScore' must be a number from 0 to 10")
    vendor_id = item.get("vendorId")
    if isinstance(vendor_id, int) and not isinstance(vendor_id, bool):
        vendor_id = str(vendor_id)
    elif vendor_id is not None and not isinstance(vendor_id, str):
        raise ValueError("'vendorId' must be a string")
    return FindingRecord(
        provider_id=provider_id,
        resource=to_resource(item.get("resource")),
        title=_text(item, "title", required=True),
        severity=severity,
        severity_original=severity,
        severity_scale="canonical",
        cves=normalized_cves,
        vendor_id=vendor_id,
        status=status,
        kind=kind,
        description=_text(item, "description"),
        remediation=_text(item, "remediation"),
        recommendation=_text(item, "recommendation"),
        first_seen=_time(item, "firstSeen"),
        last_seen=_time(item, "lastSeen"),
        provider_timestamp=_time(item, "providerTimestamp"),
        cvss_score=float(score) if score is not None else None,
        cvss_vector=_text(item, "cvssVector"),
        evidence=_text(item, "evidence"),
        references=_strings(item, "references"),
    )
