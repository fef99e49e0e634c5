"""Azure Security Center / Defender for Cloud security assessments JSON -> FindingRecord.

Accepted shapes: one assessment resource (``GET .../providers/Microsoft.Security/
assessments/{name}``), a list response ``{"value": [...], "nextLink": ...}``, or a bare
JSON array of assessments.  The body of ``PUT .../assessments/{name}`` has no id: it is
mapped by :func:`assessment_from_put_body`, which takes the name and resource id from
the URL.  Each assessment is one check on one resource (kind "compliance"):

    name (else the last segment of id) -> recommendation and vendor_id (the assessment key)
    the resource id: properties.resourceDetails.id/Id (a trailing
        "/providers/Microsoft.Security/assessments/<name>" is cut off), else id without
        that suffix -> resource.cloud_id (leading "/" ensured); its last segment -> name;
        its type -> kind (virtualMachines -> vm, Microsoft.Web/sites -> web_app,
        HybridCompute machines and OnPremise sources -> host, else cloud_resource)
    provider_id = "<resource id, lower-case>|<assessment name, lower-case>" (ARM ids are
        case-insensitive and come back in varying case)
    resourceDetails.Source (Azure, OnPremise, OnPremiseSql...) -> extra.source;
        OnPremise machineName -> hostname (fqdn when dotted), sourceComputerId ->
        agent_id, vmuuid/workspaceId/serverName/databaseName -> extra
    properties.status.code Healthy -> fixed, Unhealthy -> open, NotApplicable -> fixed
        with extra.notApplicable; cause/description -> extra.statusCause/statusDescription
    properties.status.firstEvaluationDate -> first_seen, statusChangeDate -> provider_timestamp
    properties.metadata: displayName (else properties.displayName, else
        "Assessment <name>") -> title; severity Low/Medium/High -> severity (medium when
        absent, flagged extra.severityDefaulted); description -> description;
        remediationDescription -> remediation; categories, assessmentType, userImpact,
        implementationEffort, threats, policyDefinitionId, partnerData (never its
        secret) -> extra
    properties.additionalData -> extra.additionalData; links.azurePortalUri -> references

Sub-assessments (type .../assessments/subAssessments) are not assessments: rejected.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, BinaryIO

from connectors._json import (
    clip,
    dict_at,
    iter_json_records,
    json_head,
    rejected,
    strings,
    time_field,
)
from connectors.base import ParseOptions, severity_from_word
from connectors.model import FindingRecord, Rejected, ResourceRef

FORMAT = "asc_assessment"
TITLE = "Azure Security Center (Defender for Cloud) security assessments JSON"
PRODUCT = "Microsoft Defender for Cloud"
CONTENT_TYPES = ("application/json",)
RECORD_KIND = "findings"

ENVELOPE_KEYS = ("value",)
ASSESSMENT_SUFFIX = re.compile(r"/providers/Microsoft\.Security/assessments/([^/]+)/?$", re.IGNORECASE)
_STATUSES = {"healthy": "fixed", "unhealthy": "open", "notapplicable": "fixed"}
_METADATA_EXTRA = ("categories", "assessmentType", "userImpact", "implementationEffort", "threats",
                   "policyDefinitionId", "preview", "plannedDeprecationDate", "tactics", "techniques")
_MAX_ADDITIONAL = 50


def sniff(head: bytes) -> bool:
    """JSON with an assessment's resourceDetails and status (sub-assessments excluded)."""
    text = json_head(head)
    if text[:1] not in (b"[", b"{"):
        return False
    return b'"resourceDetails"' in text and b'"status"' in text and b"/subassessments" not in text.lower()


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[FindingRecord | Rejected]:
    """Stream the assessments of a single assessment, a list response or an array."""
    for position, item in iter_json_records(stream, ENVELOPE_KEYS):
        try:
            yield to_record(item)
        except (TypeError, ValueError, KeyError) as exc:
            yield rejected(position, exc, item, "id")


def normalize_resource_id(resource_id: str) -> str:
    """An ARM resource id with one leading slash, no trailing slash and no assessment suffix."""
    value = resource_id.strip().rstrip("/")
    value = ASSESSMENT_SUFFIX.sub("", value)
    return "/" + value.lstrip("/")


def _lower_keys(value: dict) -> dict:
    return {key.lower(): item for key, item in value.items() if isinstance(key, str)}


def _resource(resource_id: str, details: dict, extra: dict) -> ResourceRef:
    source = details.get("source")
    fields: dict[str, Any] = {"cloud_id": resource_id[:2048]}
    lowered = resource_id.lower()
    if "/providers/microsoft.compute/virtualmachines/" in lowered:
        kind = "vm"
    elif "/providers/microsoft.web/sites/" in lowered:
        kind = "web_app"
    elif "/providers/microsoft.hybridcompute/machines/" in lowered:
        kind = "host"
    else:
        kind = "cloud_resource"
    if isinstance(source, str) and source:
        extra["source"] = source
        if source.lower().startswith("onpremise"):
            kind = "host"
            machine = clip(details.get("machinename"), 255)
            if machine:
                fields["fqdn" if "." in machine else "hostname"] = machine
            if clip(details.get("sourcecomputerid"), 200):
                fields["agent_id"] = details["sourcecomputerid"]
            for key, name in (("vmuuid", "vmUuid"), ("workspaceid", "workspaceId"),
                              ("servername", "serverName"), ("databasename", "databaseName")):
                if clip(details.get(key), 1024):
                    extra[name] = details[key]
    fields["kind"] = kind
    fields["name"] = clip(resource_id.rstrip("/").rsplit("/", 1)[-1], 300)
    return ResourceRef(**fields)


def _metadata_extra(metadata: dict, extra: dict) -> None:
    for key in _METADATA_EXTRA:
        value = metadata.get(key)
        if value not in (None, "", []):
            extra[key] = value
    partner = dict_at(metadata, "partnerData")
    if partner:
        extra["partner"] = {k: v for k, v in partner.items() if k.lower() != "secret" and isinstance(v, str)}


def build_record(name: str, properties: dict, resource_id: str, assessment_id: str | None = None,
                 metadata: dict | None = None) -> FindingRecord:
    """The FindingRecord of an assessment's properties on a resource (ValueError when invalid)."""
    if not isinstance(properties, dict):
        raise ValueError("'properties' must be an object")
    status = dict_at(properties, "status")
    code = status.get("code")
    status_value = _STATUSES.get(code.strip().lower()) if isinstance(code, str) else None
    if status_value is None:
        raise ValueError(f"'properties.status.code' {code!r} is not Healthy, Unhealthy or NotApplicable")
    meta = metadata if isinstance(metadata, dict) and metadata else dict_at(properties, "metadata")
    extra: dict[str, Any] = {"statusCode": code}
    if assessment_id:
        extra["assessmentId"] = assessment_id
    if code.strip().lower() == "notapplicable":
        extra["notApplicable"] = True
    for key, target in (("cause", "statusCause"), ("description", "statusDescription")):
        if clip(status.get(key), 4000):
            extra[target] = status[key]
    raw_severity = meta.get("severity")
    if raw_severity in (None, ""):
        severity = "medium"
        extra["severityDefaulted"] = True
    else:
        severity = severity_from_word(raw_severity) if isinstance(raw_severity, str) else None
        if severity is None:
            raise ValueError(f"'metadata.severity' {raw_severity!r} is not Low, Medium or High")
    details = _lower_keys(dict_at(properties, "resourceDetails"))
    resource = _resource(resource_id, details, extra)
    _metadata_extra(meta, extra)
    additional = dict_at(properties, "additionalData")
    if additional:
        extra["additionalData"] = {key: (value[:4000] if isinstance(value, str) else value)
                                   for key, value in list(additional.items())[:_MAX_ADDITIONAL]}
    portal = clip(dict_at(properties, "links").get("azurePortalUri"), 2048)
    title = clip(meta.get("displayName")) or clip(properties.get("displayName")) or f"Assessment {name}"
    return FindingRecord(
        provider_id=f"{resource_id.lower()}|{name.lower()}"[:512],
        resource=resource,
        title=title,
        severity=severity,
        severity_original=raw_severity if isinstance(raw_severity, str) and raw_severity else None,
        severity_scale="asc",
        vendor_id=name,
        status=status_value,
        kind="compliance",
        description=clip(meta.get("description")),
        remediation=clip(meta.get("remediationDescription")),
        recommendation=name,
        first_seen=time_field(status, "firstEvaluationDate"),
        provider_timestamp=time_field(status, "statusChangeDate"),
        references=[portal] if portal else [],
        extra=extra,
    )


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or "/" in name or len(name) > 200:
        raise ValueError("the assessment name must be a non-empty path segment (usually a GUID)")
    return name.strip()


def to_record(item: Any) -> FindingRecord:
    """Map one assessment resource (with id or name) to a FindingRecord (ValueError when invalid)."""
    if not isinstance(item, dict):
        raise ValueError("an assessment must be a JSON object")
    kind = item.get("type")
    if isinstance(kind, str) and kind.lower().endswith("/subassessments"):
        raise ValueError("a sub-assessment (Microsoft.Security/assessments/subAssessments), "
                         "not an assessment")
    properties = dict_at(item, "properties")
    if not properties:
        raise ValueError("'properties' is required")
    assessment_id = clip(item.get("id"), 2048)
    match = ASSESSMENT_SUFFIX.search(assessment_id) if assessment_id else None
    name = item.get("name") or (match.group(1) if match else None)
    if not name:
        raise ValueError("'id' or 'name' is required (a bare PUT body needs the assessment URL)")
    name = _check_name(name)
    details = _lower_keys(dict_at(properties, "resourceDetails"))
    detail_id = clip(details.get("id"), 2048)
    if detail_id:
        resource_id = normalize_resource_id(detail_id)
    elif match and assessment_id:
        resource_id = normalize_resource_id(assessment_id)
    else:
        raise ValueError("the resource is unknown: need 'properties.resourceDetails.id' or an assessment "
                         "'id' ending in /providers/Microsoft.Security/assessments/<name>")
    return build_record(name, properties, resource_id, assessment_id)


def assessment_from_put_body(name: str, body: dict, resource_id: str, *,
                             metadata: dict | None = None) -> FindingRecord:
    """The FindingRecord of a ``PUT {resource_id}/providers/Microsoft.Security/assessments/{name}`` body.

    ``metadata`` (the partner's assessment metadata: displayName, severity, description,
    remediationDescription...) fills what the body's properties.metadata lacks.  Raises
    ValueError with a client-facing message when the body is not a valid assessment.
    """
    name = _check_name(name)
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    properties = body.get("properties")
    if not isinstance(properties, dict):
        raise ValueError("'properties' is required")
    if not isinstance(resource_id, str) or not resource_id.strip("/ "):
        raise ValueError("the resource id is required")
    resource = normalize_resource_id(resource_id)
    if not strings([resource.strip("/")]):
        raise ValueError("the resource id is required")
    merged = dict(dict_at(properties, "metadata"))
    if metadata:
        merged.update({key: value for key, value in metadata.items() if value not in (None, "")})
    return build_record(name, properties, resource,
                        f"{resource}/providers/Microsoft.Security/assessments/{name}", merged or None)
