"""Microsoft Graph security alerts JSON (legacy ``alert`` and ``alerts_v2``) -> AlertRecord.

Accepted shapes: one alert object, a Graph list response ``{"value": [...],
"@odata.nextLink": ...}``, or a bare JSON array.  The version is told by its keys:
``vendorInformation``/``hostStates``/``lastModifiedDateTime`` (legacy, security/alerts)
or ``evidence``/``serviceSource``/``providerAlertId``/``lastUpdateDateTime`` (v2).

    id -> provider_id; title; description; category
    severity informational/low/medium/high -> severity; unknown/unknownFutureValue ->
        medium with extra.severityOriginal (not silently deprioritized)
    status: legacy newAlert/inProgress/resolved/unknown kept; v2 new -> newAlert,
        inProgress, resolved, unknown/unknownFutureValue -> unknown; the original ->
        extra.providerStatus
    createdDateTime -> created; lastModifiedDateTime (v2: lastUpdateDateTime) ->
        last_modified and provider_timestamp (else createdDateTime)
    recommendedActions (legacy: list; v2: string) -> recommended_actions
    resource, legacy: hostStates[0] fqdn (hostname when not dotted), netBiosName,
        privateIpAddress/publicIpAddress -> ipv4/ipv6, os; an Azure resource id in
        securityResources[0].resource -> cloud_id
    resource, v2: the first deviceEvidence: deviceDnsName -> fqdn/hostname, mdeDeviceId ->
        agent_id, ipInterfaces -> ipv4/ipv6, osPlatform -> os; else the first
        azureResourceEvidence resourceId -> cloud_id
    extra, legacy: hostStates, userStates, processes, fileStates, networkConnections (their
        text fields and fileHash, at most 20 each: what suppression rules match on)
    extra: vendorInformation (legacy), serviceSource, detectionSource, productName,
        providerAlertId, incidentId, classification, determination, alertWebUrl,
        mitreTechniques (v2), an evidence summary (type, name, verdict), the other
        hosts, eventDateTime/firstActivityDateTime/lastActivityDateTime, confidence
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from typing import Any, BinaryIO

from connectors._json import (
    clip,
    dict_at,
    iter_json_records,
    json_head,
    rejected,
    required_text,
    strings,
    time_field,
)
from connectors.base import ParseOptions
from connectors.model import SEVERITIES, AlertRecord, Rejected, ResourceRef

FORMAT = "graph_alert"
TITLE = "Microsoft Graph security alerts JSON (alert and alerts_v2)"
PRODUCT = "Microsoft Graph"
CONTENT_TYPES = ("application/json",)
RECORD_KIND = "alerts"

ENVELOPE_KEYS = ("value",)
_MARKERS = (b'"vendorInformation"', b'"serviceSource"', b'"providerAlertId"',
            b"microsoft.graph.security.alert", b"microsoft.graph.alert")
_LEGACY_MARKERS = (b'"azureTenantId"', b'"eventDateTime"', b'"hostStates"', b'"userStates"',
                   b'"cloudAppStates"', b'"networkConnections"', b'"malwareStates"')
_LEGACY_STATUSES = ("newAlert", "inProgress", "resolved", "unknown")
_V2_STATUSES = {"new": "newAlert", "inprogress": "inProgress", "resolved": "resolved"}
_UNKNOWN_SEVERITIES = ("unknown", "unknownfuturevalue")
_MAX_EVIDENCE = 20


def sniff(head: bytes) -> bool:
    """JSON with Graph alert keys: vendorInformation (legacy), serviceSource/providerAlertId (v2).

    A legacy alert lists vendorInformation last, so two of its other state keys also do.
    """
    text = json_head(head)
    if text[:1] not in (b"[", b"{"):
        return False
    return any(marker in text for marker in _MARKERS) or sum(m in text for m in _LEGACY_MARKERS) >= 2


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[AlertRecord | Rejected]:
    """Stream the alerts of a single alert, a Graph list response or an array."""
    for position, item in iter_json_records(stream, ENVELOPE_KEYS):
        try:
            yield to_record(item)
        except (TypeError, ValueError, KeyError) as exc:
            yield rejected(position, exc, item, "id")


def is_v2(item: dict) -> bool:
    """True for an alerts_v2 object, False for a legacy alert."""
    if "vendorInformation" in item or "hostStates" in item or "lastModifiedDateTime" in item:
        return False
    odata = item.get("@odata.type")
    if isinstance(odata, str) and odata.endswith("security.alert"):
        return True
    return any(key in item for key in ("evidence", "serviceSource", "providerAlertId", "lastUpdateDateTime"))


def _add_ip(fields: dict, value: Any) -> None:
    if not isinstance(value, str):
        return
    try:
        version = ipaddress.ip_address(value.strip().split("%")[0]).version
    except ValueError:
        return
    key = "ipv6" if version == 6 else "ipv4"
    if value not in fields.setdefault(key, []):
        fields[key].append(value.strip())


def _add_name(fields: dict, value: Any) -> None:
    name = clip(value, 255)
    if name:
        fields["fqdn" if "." in name else "hostname"] = name.strip()


def _legacy_resource(item: dict, extra: dict) -> ResourceRef | None:
    hosts = [h for h in item.get("hostStates") or [] if isinstance(h, dict)]
    fields: dict[str, Any] = {}
    if hosts:
        host = hosts[0]
        _add_name(fields, host.get("fqdn"))
        if clip(host.get("netBiosName"), 64):
            fields["netbios"] = host["netBiosName"]
        _add_ip(fields, host.get("privateIpAddress"))
        _add_ip(fields, host.get("publicIpAddress"))
        if clip(host.get("os"), 200):
            fields["os"] = host["os"]
        others = [h.get("fqdn") or h.get("netBiosName") for h in hosts[1:]]
        if any(others):
            extra["otherHosts"] = [o for o in others if isinstance(o, str) and o]
    for security_resource in item.get("securityResources") or []:
        value = security_resource.get("resource") if isinstance(security_resource, dict) else None
        if isinstance(value, str) and value.lower().startswith("/subscriptions/"):
            fields["cloud_id"] = value
            break
    if not fields:
        return None
    fields["kind"] = "host" if hosts else "cloud_resource"
    return ResourceRef(**fields)


def _evidence_type(evidence: dict) -> str:
    odata = evidence.get("@odata.type")
    return odata.rsplit(".", 1)[-1] if isinstance(odata, str) else "evidence"


def _v2_resource(item: dict, extra: dict) -> ResourceRef | None:
    evidence = [e for e in item.get("evidence") or [] if isinstance(e, dict)]
    summary = []
    for entry in evidence[:_MAX_EVIDENCE]:
        kind = _evidence_type(entry)
        label = next((entry[k] for k in ("deviceDnsName", "resourceName", "ipAddress", "url", "detectedUrl")
                      if isinstance(entry.get(k), str) and entry[k]), None)
        if label is None:
            label = dict_at(entry, "userAccount").get("userPrincipalName") or dict_at(
                entry, "fileDetails").get("fileName")
        summary.append({k: v for k, v in (("type", kind), ("name", label), ("verdict", entry.get("verdict")),
                                           ("roles", strings(entry.get("roles")) or None)) if v})
    if summary:
        extra["evidence"] = summary
    device = next((e for e in evidence if _evidence_type(e) == "deviceEvidence"), None)
    if device is not None:
        fields: dict[str, Any] = {"kind": "host"}
        _add_name(fields, device.get("deviceDnsName"))
        if clip(device.get("mdeDeviceId"), 200):
            fields["agent_id"] = device["mdeDeviceId"]
        for ip in device.get("ipInterfaces") or []:
            _add_ip(fields, ip)
        if clip(device.get("osPlatform"), 200):
            fields["os"] = device["osPlatform"]
        if clip(device.get("azureAdDeviceId"), 200):
            extra["azureAdDeviceId"] = device["azureAdDeviceId"]
        if len(fields) > 1:
            return ResourceRef(**fields)
    azure = next((e for e in evidence if _evidence_type(e) == "azureResourceEvidence"
                  and clip(e.get("resourceId"), 2048)), None)
    if azure is not None:
        return ResourceRef(cloud_id=azure["resourceId"], kind="cloud_resource",
                           name=clip(azure.get("resourceName"), 300))
    return None


# The entity states of a legacy alert kept in ``extra`` under their Graph names (at most
# _MAX_ENTITIES each, text fields only, each clipped): what suppression rules match on
# (gateway/suppression.py).  ``fileHash`` is Graph's {hashType, hashValue}.
_ENTITY_FIELDS = {
    "hostStates": ("fqdn", "netBiosName", "privateIpAddress", "publicIpAddress"),
    "userStates": ("accountName", "domainName", "userPrincipalName", "logonIp"),
    "processes": ("name", "commandLine", "path", "accountName", "parentProcessName", "fileHash"),
    "fileStates": ("name", "path", "fileHash"),
    "networkConnections": ("sourceAddress", "destinationAddress", "natSourceAddress", "natDestinationAddress",
                           "destinationDomain", "destinationUrl"),
}
_MAX_ENTITIES = 20
_MAX_ENTITY_TEXT = 4000


def _legacy_entities(item: dict, extra: dict) -> None:
    for key, names in _ENTITY_FIELDS.items():
        kept = []
        for state in item.get(key) or []:
            if not isinstance(state, dict):
                continue
            entry: dict[str, Any] = {}
            for name in names:
                value = state.get(name)
                if name == "fileHash" and isinstance(value, dict):
                    digest = clip(value.get("hashValue"), 200)
                    if digest:
                        entry[name] = {"hashType": clip(value.get("hashType"), 50), "hashValue": digest}
                elif clip(value, _MAX_ENTITY_TEXT):
                    entry[name] = value[:_MAX_ENTITY_TEXT]
            if entry:
                kept.append(entry)
            if len(kept) == _MAX_ENTITIES:
                break
        if kept:
            extra[key] = kept


_CLASSIFICATIONS = ("unknown", "falsePositive", "truePositive", "informationalExpectedActivity")
DETERMINATIONS = ("unknown", "apt", "malware", "securityPersonnel", "securityTesting", "unwantedSoftware",
                  "other", "multiStagedAttack", "compromisedAccount", "phishing", "maliciousUserActivity",
                  "notMalicious", "notEnoughDataToValidate", "confirmedUserActivity",
                  "lineOfBusinessApplication")
_MAX_EVIDENCE_BYTES = 16_384


def _kept_evidence(item: dict) -> list[dict] | None:
    """The typed evidence objects as pushed (at most _MAX_EVIDENCE, each at most 16 KiB of JSON)."""
    kept = []
    for entry in item.get("evidence") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("@odata.type"), str):
            continue
        if len(json.dumps(entry, default=str)) <= _MAX_EVIDENCE_BYTES:
            kept.append(entry)
        if len(kept) == _MAX_EVIDENCE:
            break
    return kept or None


def _word(item: dict, key: str, allowed: tuple[str, ...]) -> str | None:
    value = item.get(key)
    return value if isinstance(value, str) and value in allowed else None


def _v2_state(item: dict) -> dict[str, Any]:
    """The alerts_v2 fields the store keeps in columns of their own."""
    techniques = [t[:50] for t in strings(item.get("mitreTechniques"))][:100]
    return {
        "incident_id": clip(str(item["incidentId"]) if isinstance(item.get("incidentId"), (str, int))
                            and not isinstance(item.get("incidentId"), bool) else None, 200),
        "service_source": clip(item.get("serviceSource"), 100),
        "detection_source": clip(item.get("detectionSource"), 100),
        "mitre_techniques": techniques or None,
        "first_activity": time_field(item, "firstActivityDateTime"),
        "last_activity": time_field(item, "lastActivityDateTime"),
        "evidence": _kept_evidence(item),
        "classification": _word(item, "classification", _CLASSIFICATIONS),
        "determination": _word(item, "determination", DETERMINATIONS),
    }


def _severity(item: dict, extra: dict) -> str:
    raw = item.get("severity")
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError("'severity' is required (informational, low, medium, high)")
    word = raw.strip().lower()
    if word in SEVERITIES:
        return word
    if word in _UNKNOWN_SEVERITIES:
        extra["severityOriginal"] = raw
        return "medium"
    raise ValueError(f"'severity' {raw[:40]!r} is not a Graph alert severity "
                     "(informational, low, medium, high, unknown)")


def to_record(item: Any) -> AlertRecord:
    """Map one Graph alert (legacy or v2) to an AlertRecord (ValueError when it cannot be)."""
    if not isinstance(item, dict):
        raise ValueError("an alert must be a JSON object")
    provider_id = required_text(item, "id")
    if len(provider_id) > 512:
        raise ValueError("'id' is longer than 512 characters")
    title = required_text(item, "title")
    v2 = is_v2(item)
    extra: dict[str, Any] = {"schema": "alerts_v2" if v2 else "alert"}
    severity = _severity(item, extra)
    raw_status = item.get("status")
    if raw_status is not None and not isinstance(raw_status, str):
        raise ValueError("'status' must be a string")
    if raw_status:
        extra["providerStatus"] = raw_status
    if v2:
        status = _V2_STATUSES.get((raw_status or "new").lower(), "unknown")
        modified_key = "lastUpdateDateTime"
        resource = _v2_resource(item, extra)
        actions = item.get("recommendedActions")
        recommended = [actions.strip()] if isinstance(actions, str) and actions.strip() else []
        keys = ("serviceSource", "detectionSource", "productName", "providerAlertId", "incidentId",
                "classification", "determination", "alertWebUrl", "incidentWebUrl", "tenantId",
                "threatDisplayName", "actorDisplayName", "detectorId")
        for key in ("mitreTechniques", "systemTags"):
            if strings(item.get(key)):
                extra[key] = strings(item.get(key))
        times = ("firstActivityDateTime", "lastActivityDateTime", "resolvedDateTime")
    else:
        if raw_status in _LEGACY_STATUSES:
            status = raw_status
        else:
            status = "unknown" if raw_status else "newAlert"
        modified_key = "lastModifiedDateTime"
        resource = _legacy_resource(item, extra)
        recommended = strings(item.get("recommendedActions"))
        vendor = {k: v for k, v in dict_at(item, "vendorInformation").items() if isinstance(v, str) and v}
        if vendor:
            extra["vendorInformation"] = vendor
        keys = ("azureTenantId", "confidence", "activityGroupName", "riskScore")
        _legacy_entities(item, extra)
        users = [u.get("userPrincipalName") for u in item.get("userStates") or [] if isinstance(u, dict)]
        if any(isinstance(u, str) for u in users):
            extra["users"] = [u for u in users if isinstance(u, str)][:20]
        cves = [v.get("cve") for v in item.get("vulnerabilityStates") or [] if isinstance(v, dict)]
        if any(isinstance(c, str) for c in cves):
            extra["cves"] = [c for c in cves if isinstance(c, str)]
        if strings(item.get("sourceMaterials")):
            extra["sourceMaterials"] = strings(item.get("sourceMaterials"))
        times = ("eventDateTime", "lastEventDateTime", "closedDateTime")
    for key in keys:
        value = item.get(key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and value != "":
            extra[key] = value
    for key in times:
        value = time_field(item, key)
        if value is not None:
            extra[key] = value.isoformat()
    created = time_field(item, "createdDateTime")
    modified = time_field(item, modified_key)
    v2_state = _v2_state(item) if v2 else {}
    return AlertRecord(
        **v2_state,
        provider_id=provider_id,
        title=title,
        severity=severity,
        category=clip(item.get("category"), 200),
        description=clip(item.get("description")),
        status=status,
        created=created,
        last_modified=modified,
        provider_timestamp=modified or created,
        resource=resource,
        recommended_actions=[action[:4000] for action in recommended][:50],
        extra=extra,
    )
