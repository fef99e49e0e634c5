"""The gateway's own JSON format: what a partner without a native format pushes.

    {
      "provider": "Contoso Scanner",          optional; must be the client's provider
      "scan": {"type": "full"},               optional; "full" resolves what is not reported
      "findings": [ {                          one object per provider record
        "id": "provider's own id",             required, unique per provider
        "resource": {"cloudId", "instanceId", "agentId", "fqdn", "hostname", "netbios", "mac",
                     "cloudName", "ipv4": [...], "ipv6": [...], "kind", "name", "os",
                     "network", "hostKey"},
                                               required, at least one identifier; "network"
                                               is the scope of its private IPs (a VPC, a
                                               scanner network), "hostKey" your own key
                                               of the host record (provenance)
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

import json
from collections.abc import Iterator
from functools import lru_cache
from typing import Any, BinaryIO

import ijson
import msgspec

from connectors._stream import Prefixed
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
PRODUCT = "Gateway canonical"
CONTENT_TYPES = ("application/json",)
RECORD_KIND = "findings"

_RESOURCE_KEYS = {
    "cloudId": "cloud_id",
    "instanceId": "instance_id",
    "agentId": "agent_id",
    "cloudName": "cloud_name",
    "fqdn": "fqdn",
    "hostname": "hostname",
    "netbios": "netbios",
    "mac": "mac",
}
_MAX_TEXT = 65536
WHOLE_DOCUMENT_BYTES = 16 << 20  # decoded whole: about six times its size in memory


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


class _Resource(msgspec.Struct, rename="camel"):
    cloud_id: str | None = None
    instance_id: str | None = None
    agent_id: str | None = None
    cloud_name: str | None = None
    network: str | None = None
    host_key: str | None = None
    fqdn: str | None = None
    hostname: str | None = None
    netbios: str | None = None
    mac: str | None = None
    ipv4: list[str] | None = None
    ipv6: list[str] | None = None
    kind: str | None = None
    name: str | None = None
    os: str | None = None


class _Item(msgspec.Struct, rename="camel"):
    """One finding object as typed JSON; ``to_record`` checks what types cannot say."""

    id: str | int | float | None = None
    resource: _Resource | None = None
    title: str | None = None
    severity: str | None = None
    status: str | None = "open"
    kind: str | None = "vulnerability"
    cves: list[str] | None = None
    vendor_id: str | int | None = None
    recommendation: str | None = None
    description: str | None = None
    remediation: str | None = None
    evidence: str | None = None
    references: list[str] | None = None
    cvss_score: float | None = None
    cvss_vector: str | None = None
    first_seen: str | None = None
    last_seen: str | None = None
    provider_timestamp: str | None = None


class _Document(msgspec.Struct):
    findings: list[_Item] = []


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[FindingRecord | Rejected]:
    """The findings of a canonical document: decoded at once when small, else streamed."""
    head = _read_up_to(stream, WHOLE_DOCUMENT_BYTES + 1)
    if len(head) <= WHOLE_DOCUMENT_BYTES:
        try:  # a document whose every record has the right types decodes in one pass
            items: Any = msgspec.json.decode(head, type=_Document).findings
        except msgspec.ValidationError:  # some record has not: check them one by one
            items = _whole(head)
        except msgspec.DecodeError as exc:
            if "surrogate" not in str(exc) and "escape" not in str(exc):
                raise FormatError(f"not well-formed JSON: {exc}") from None
            # An escaped UTF-16 surrogate without its pair ("\ud800") is well-formed JSON
            # that msgspec refuses: the standard library reads it, and the record holding it
            # is rejected by the merge's text check, not the whole document.
            items = _lenient(head)
        yield from _records(items)
        return
    index = [-1]
    try:
        yield from _records(ijson.items(Prefixed(head, stream), "findings.item", use_float=True), index)
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


def _lenient(data: bytes) -> list:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"not well-formed JSON: {str(exc)[:200]}") from None
    items = document.get("findings") if isinstance(document, dict) else None
    return items if isinstance(items, list) else []


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
            provider_id = item.get("id") if isinstance(item, dict) else getattr(item, "id", None)
            yield Rejected(
                position=f"findings[{index}]",
                reason=str(exc),
                provider_id=provider_id if isinstance(provider_id, str) else None,
            )


def _text(value: str | None, key: str, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise ValueError(f"'{key}' is required")
        return None
    if required and not value.strip():
        raise ValueError(f"'{key}' must not be empty")
    return value[:_MAX_TEXT]


def _time(value: str | None, key: str):
    if value is None:
        return None
    try:
        return _parse_time(value)
    except ValueError:
        raise ValueError(f"'{key}' is not an ISO 8601 date-time: {value[:64]!r}") from None


@lru_cache(maxsize=4096)
def _parse_time(value: str):
    return parse_time(value)  # a push repeats a few scan times thousands of times


_RESOURCE_FIELDS = ("cloud_id", "instance_id", "agent_id", "fqdn", "hostname", "netbios", "mac", "cloud_name")


def to_resource(raw: _Resource | None) -> ResourceRef:
    """Validate a canonical resource object."""
    if raw is None:
        raise ValueError("'resource' must be an object")
    fields: dict[str, Any] = {}
    for attr in _RESOURCE_FIELDS:
        value = getattr(raw, attr)
        if value:
            fields[attr] = value[:_MAX_TEXT]
    if raw.ipv4:
        fields["ipv4"] = raw.ipv4
    if raw.ipv6:
        fields["ipv6"] = raw.ipv6
    for attr in ("kind", "name", "os", "network", "host_key"):
        value = getattr(raw, attr)
        if value:
            fields[attr] = value[:_MAX_TEXT]
    if not any(kind in fields for kind in IDENTIFIER_KINDS):
        raise ValueError("'resource' needs at least one identifier (" + ", ".join(
            list(_RESOURCE_KEYS) + ["ipv4", "ipv6"]) + ")")
    return ResourceRef(**fields)


def to_record(item: Any) -> FindingRecord:
    """Validate one canonical finding (a JSON object, or one already typed) into a FindingRecord."""
    if not isinstance(item, _Item):
        if not isinstance(item, dict):
            raise ValueError("a finding must be an object")
        try:
            item = msgspec.convert(item, _Item)
        except msgspec.ValidationError as exc:
            raise ValueError(str(exc)) from None
    provider_id = item.id
    if isinstance(provider_id, (int, float)):
        provider_id = str(provider_id)
    if not provider_id or not provider_id.strip():
        raise ValueError("'id' is required: the provider's own id of the record")
    if len(provider_id) > 512:
        raise ValueError("'id' is longer than 512 characters")
    severity = item.severity
    if severity not in SEVERITIES:
        raise ValueError(f"'severity' must be one of {', '.join(SEVERITIES)}")
    if item.status not in ("open", "fixed"):
        raise ValueError("'status' must be 'open' or 'fixed'")
    if item.kind not in ("vulnerability", "compliance"):
        raise ValueError("'kind' must be 'vulnerability' or 'compliance'")
    cves = item.cves or []
    normalized_cves = find_cves(*cves)
    if len(normalized_cves) != len(set(c.upper() for c in cves)):
        raise ValueError("'cves' must hold CVE ids like CVE-2024-3094")
    score = item.cvss_score
    if score is not None and not 0 <= score <= 10:
        raise ValueError("'cvssScore' must be a number from 0 to 10")
    vendor_id = item.vendor_id
    if isinstance(vendor_id, int):
        vendor_id = str(vendor_id)
    return FindingRecord(
        provider_id=provider_id,
        resource=to_resource(item.resource),
        title=_text(item.title, "title", required=True),
        severity=severity,
        severity_original=severity,
        severity_scale="canonical",
        cves=normalized_cves,
        vendor_id=vendor_id,
        status=item.status,
        kind=item.kind,
        description=_text(item.description, "description"),
        remediation=_text(item.remediation, "remediation"),
        recommendation=_text(item.recommendation, "recommendation"),
        first_seen=_time(item.first_seen, "firstSeen"),
        last_seen=_time(item.last_seen, "lastSeen"),
        provider_timestamp=_time(item.provider_timestamp, "providerTimestamp"),
        cvss_score=score,
        cvss_vector=_text(item.cvss_vector, "cvssVector"),
        evidence=_text(item.evidence, "evidence"),
        references=item.references or [],
    )
