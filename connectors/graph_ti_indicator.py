"""Microsoft Graph threat-intelligence indicators (``tiIndicator``) JSON -> IndicatorRecord.

Accepted shapes: one tiIndicator, ``{"value": [...]}`` (the body of submitTiIndicators) or a bare
array.  Required, as Graph requires them: ``targetProduct``, ``expirationDateTime``, ``threatType``
and at least one observable; ``action``, ``tlpLevel``, ``confidence`` are checked when present.

    externalId (else id) -> external_id; description; threatType; tlpLevel; confidence (0-100);
    action; targetProduct; tags; expirationDateTime -> expires_at; lastReportedDateTime (else
    ingestedDateTime) -> provider_timestamp; severity, killChain, malwareFamilyNames,
    activityGroupNames, knownFalsePositives -> extra
    observables, one record each: networkIPv4 networkSourceIPv4 networkDestinationIPv4 -> ipv4;
    networkIPv6 networkSourceIPv6 networkDestinationIPv6 -> ipv6; domainName -> domain; url ->
    url; emailSenderAddress -> email; fileHashType (md5 sha1 sha256) + fileHashValue -> that hash.
    An indicator with an observable the gateway cannot match (networkCidrBlock, an
    authenticodeHash256 or ctph hash, ...) and none it can is rejected with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

from connectors._indicators import normalize
from connectors._json import clip, iter_json_records, json_head, rejected, strings, time_field
from connectors.base import ParseOptions
from connectors.model import IndicatorRecord, Rejected

FORMAT = "graph_tiindicator"
TITLE = "Microsoft Graph threat-intelligence indicators JSON (tiIndicator)"
PRODUCT = "Microsoft Graph"
CONTENT_TYPES = ("application/json",)
RECORD_KIND = "indicators"

ENVELOPE_KEYS = ("value",)
_MARKERS = (b'"targetProduct"', b"microsoft.graph.tiIndicator")
THREAT_TYPES = (
    "Botnet",
    "C2",
    "CryptoMining",
    "Darknet",
    "DDoS",
    "MaliciousUrl",
    "Malware",
    "Phishing",
    "Proxy",
    "PUA",
    "WatchList",
)
ACTIONS = ("unknown", "allow", "block", "alert")
TLP_LEVELS = ("unknown", "white", "green", "amber", "red")
OBSERVABLE_FIELDS = {
    "networkIPv4": "ipv4",
    "networkSourceIPv4": "ipv4",
    "networkDestinationIPv4": "ipv4",
    "networkIPv6": "ipv6",
    "networkSourceIPv6": "ipv6",
    "networkDestinationIPv6": "ipv6",
    "domainName": "domain",
    "url": "url",
    "emailSenderAddress": "email",
}
HASH_TYPES = {"md5": "md5", "sha1": "sha1", "sha256": "sha256"}
UNMATCHED_FIELDS = (
    "networkCidrBlock",
    "networkSourceCidrBlock",
    "networkDestinationCidrBlock",
    "emailSourceDomain",
    "emailSourceIpAddress",
    "fileName",
    "filePath",
    "userPrincipalName",
)
_EXTRA_KEYS = (
    "severity",
    "killChain",
    "malwareFamilyNames",
    "activityGroupNames",
    "knownFalsePositives",
    "isActive",
    "azureTenantId",
    "additionalInformation",
    "diamondModel",
)


def sniff(head: bytes) -> bool:
    text = json_head(head)
    return (
        text[:1] in (b"[", b"{")
        and any(marker in text for marker in _MARKERS)
        and b'"expirationDateTime"' in text
    )


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[IndicatorRecord | Rejected]:
    """Stream the indicators: one record per observable of each tiIndicator."""
    for position, item in iter_json_records(stream, ENVELOPE_KEYS):
        try:
            yield from to_records(item)
        except (TypeError, ValueError, KeyError) as exc:
            yield rejected(
                position, exc, item, "externalId" if isinstance(item, dict) and "externalId" in item else "id"
            )


def _choice(item: dict, key: str, allowed: tuple[str, ...], required: bool = False) -> str | None:
    value = item.get(key)
    if value is None and not required:
        return None
    folded = {a.lower(): a for a in allowed}
    if not isinstance(value, str) or value.lower() not in folded:
        raise ValueError(f"'{key}' must be one of {', '.join(allowed)}")
    return folded[value.lower()]


def observables(item: dict) -> list[tuple[str, str]]:
    """The (type, normalized value) pairs of a tiIndicator; ValueError for a malformed one."""
    found: list[tuple[str, str]] = []
    for key, kind in OBSERVABLE_FIELDS.items():
        if item.get(key) not in (None, ""):
            found.append((kind, normalize(kind, item[key])))
    if item.get("fileHashValue") not in (None, ""):
        hash_type = item.get("fileHashType")
        kind = HASH_TYPES.get(hash_type.lower()) if isinstance(hash_type, str) else None
        if kind is None:
            raise ValueError(
                f"'fileHashType' {str(hash_type)[:40]!r} cannot be matched; one of md5, sha1, sha256"
            )
        found.append((kind, normalize(kind, item["fileHashValue"])))
    if not found:
        unmatched = [key for key in UNMATCHED_FIELDS if item.get(key)]
        if unmatched:
            raise ValueError(
                f"'{unmatched[0]}' is not an observable the gateway matches; give one of "
                + ", ".join(list(OBSERVABLE_FIELDS) + ["fileHashValue"])
            )
        raise ValueError("the indicator has no observable (networkIPv4, domainName, url, fileHashValue, ...)")
    return list(dict.fromkeys(found))


def to_records(item: Any) -> list[IndicatorRecord]:
    """Map one tiIndicator to its records (ValueError when it cannot be)."""
    if not isinstance(item, dict):
        raise ValueError("an indicator must be a JSON object")
    target = clip(item.get("targetProduct"), 100)
    if target is None:
        raise ValueError("'targetProduct' is required")
    expires = time_field(item, "expirationDateTime")
    if expires is None:
        raise ValueError("'expirationDateTime' is required")
    threat_type = _choice(item, "threatType", THREAT_TYPES, required=True)
    confidence = item.get("confidence")
    if confidence is not None and (
        isinstance(confidence, bool) or not isinstance(confidence, int) or not 0 <= confidence <= 100
    ):
        raise ValueError("'confidence' must be an integer from 0 to 100")
    external_id = clip(item.get("externalId"), 300) or clip(item.get("id"), 300)
    timestamp = time_field(item, "lastReportedDateTime") or time_field(item, "ingestedDateTime")
    extra = {key: item[key] for key in _EXTRA_KEYS if item.get(key) not in (None, "", [])}
    common = dict(
        external_id=external_id,
        description=clip(item.get("description"), 4000),
        threat_type=threat_type,
        tlp_level=_choice(item, "tlpLevel", TLP_LEVELS),
        confidence=confidence,
        action=_choice(item, "action", ACTIONS),
        target_product=target,
        tags=[tag[:100] for tag in strings(item.get("tags"))][:50],
        extra=extra or None,
        valid_from=None,
        expires_at=expires,
        provider_timestamp=timestamp,
    )
    return [IndicatorRecord(observable_type=kind, value=value, **common) for kind, value in observables(item)]
