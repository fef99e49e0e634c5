"""The tenant's alerts in Microsoft Graph's security ``alert`` (alerts_v2) shape.

The same rows as the legacy ``alerts`` collection, shown the way Graph shows them today:

    status       newAlert -> new, inProgress, resolved/dismissed -> resolved
    severity     critical (a legacy/partner word Graph v2 lacks) -> high; the others as stored
    classification, determination   their columns (unknown when unset); PATCH of a classification
                 also sets the legacy feedback (informationalExpectedActivity <-> benignPositive)
    recommendedActions   the stored list joined by newlines (a string in v2)
    comments     {comment, createdByDisplayName, createdDateTime}
    evidence     the partner's typed evidence when it pushed v2 evidence, else derived from the
                 alert's resource: a deviceEvidence (FQDN, hostname, IPs), an ipEvidence per IP and
                 an azureResourceEvidence for a cloud id
    lastUpdateDateTime, resolvedDateTime   lastModifiedDateTime, closedDateTime of the legacy shape
    suppressedBy the id of the suppression rule that resolved the alert (gateway/suppression.py), or
                 null (not Graph's: the gateway's own, as in the legacy shape)
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

from sqlalchemy import case, func, literal, literal_column, select

from gateway.models import Alert, Epoch, ResourceIdentifier, Tenant
from gateway.odata import Field, ListField, json_element, json_elements
from gateway.query import Collection, OrderField, Workflow
from gateway.schemas import (
    V2_CLASSIFICATIONS,
    V2_DETERMINATIONS,
    V2_STATUSES,
    AlertV2Out,
    AlertV2Patch,
    fast_dumper,
)

A, RI, TENANTS = Alert.__table__, ResourceIdentifier.__table__, Tenant.__table__
V2_SEVERITIES = ("unknown", "informational", "low", "medium", "high")
STATUS_FOR_V2 = {"new": "newAlert", "inProgress": "inProgress", "resolved": "resolved"}
FEEDBACK_FOR_CLASSIFICATION = {"unknown": None, "truePositive": "truePositive",
                               "falsePositive": "falsePositive",
                               "informationalExpectedActivity": "benignPositive"}
EVIDENCE_TYPE = "#microsoft.graph.security.{}"
_EXTRA_TEXT = ("productName", "detectorId", "alertWebUrl", "incidentWebUrl", "actorDisplayName",
               "threatDisplayName")


def _const(text: str):
    return literal_column(f"'{text}'")  # this module's own words, never input


STATUS = case((A.c.status == _const("inProgress"), _const("inProgress")),
              (A.c.status.in_([_const("resolved"), _const("dismissed")]), _const("resolved")),
              else_=_const("new"))
SEVERITY = case((A.c.severity == _const("critical"), _const("high")), else_=A.c.severity)
CLASSIFICATION = func.coalesce(A.c.classification, _const("unknown"))
DETERMINATION = func.coalesce(A.c.determination, _const("unknown"))


def _rank(expression, values):
    return case(*[(expression == _const(name), literal_column(str(rank)))
                  for rank, name in enumerate(values)],
                else_=literal_column("-1"))


def _evidence_base(created: datetime | None) -> dict:
    return {"createdDateTime": created.isoformat() if created else None, "verdict": "unknown",
            "remediationStatus": "none", "remediationStatusDetails": None, "roles": [], "detailedRoles": [],
            "tags": []}


def resource_evidence(identifiers: dict[str, list[str]], created: datetime | None) -> list[dict]:
    """Typed evidence derived from the alert's resource: its device, its IPs, its cloud id."""
    out = []
    ips = [value.partition("%")[0] for kind in ("ipv4", "ipv6") for value in identifiers.get(kind, ())]
    ips = list(dict.fromkeys(ips))
    fqdn = next(iter(identifiers.get("fqdn", ())), None)
    hostname = next(iter(identifiers.get("hostname", ())), None) or (fqdn.split(".", 1)[0] if fqdn else None)
    if fqdn or hostname:
        out.append({"@odata.type": EVIDENCE_TYPE.format("deviceEvidence"), **_evidence_base(created),
                    "deviceDnsName": fqdn or hostname, "hostName": hostname,
                    "mdeDeviceId": next(iter(identifiers.get("agent_id", ())), None), "ipInterfaces": ips})
    for ip in ips:
        out.append({"@odata.type": EVIDENCE_TYPE.format("ipEvidence"), **_evidence_base(created),
                    "ipAddress": ip})
    for cloud_id in identifiers.get("cloud_id", ()):
        out.append({"@odata.type": EVIDENCE_TYPE.format("azureResourceEvidence"), **_evidence_base(created),
                    "resourceId": cloud_id, "resourceName": cloud_id.rstrip("/").rsplit("/", 1)[-1],
                    "resourceType": None})
    return out


def v2_comments(stored: list | None) -> list[dict]:
    """Stored comments ({text, by, at}) as Graph's alertComment."""
    return [{"comment": c.get("text"), "createdByDisplayName": c.get("by"), "createdDateTime": c.get("at")}
            for c in stored or () if isinstance(c, dict)]


def _text(value) -> str | None:
    return value if isinstance(value, str) and value else None


def serialize(conn, tenant_id: int, rows, selected) -> list[dict]:
    """A page of alerts in the v2 shape: one query for the page's resource identifiers, one for the tenant."""
    resource_ids = sorted({row.resource_id for row in rows
                           if row.resource_id is not None and not row.evidence})
    identifiers: dict[int, dict[str, list[str]]] = defaultdict(dict)
    if resource_ids and (selected is None or "evidence" in selected):
        for ident in conn.execute(select(RI.c.resource_id, RI.c.kind, RI.c.value).where(
                RI.c.tenant_id == tenant_id, RI.c.resource_id.in_(resource_ids))
                .order_by(RI.c.kind, RI.c.value)):
            identifiers[ident.resource_id].setdefault(ident.kind, []).append(ident.value)
    external = conn.execute(select(TENANTS.c.external_id).where(TENANTS.c.id == tenant_id)).scalar_one()
    out = []
    for row in rows:
        extra = row.extra or {}
        evidence = row.evidence or (resource_evidence(identifiers.get(row.resource_id, {}),
                                                      row.created_date_time) if row.resource_id else [])
        item = {
            "id": str(row.id), "providerAlertId": row.provider_id, "incidentId": row.incident_id,
            "status": row.v2_status, "severity": row.v2_severity, "classification": row.v2_classification,
            "determination": row.v2_determination, "serviceSource": row.service_source,
            "detectionSource": row.detection_source, "tenantId": external, "title": row.title,
            "description": row.description,
            "recommendedActions": "\n".join(row.recommended_actions or ()) or None,
            "category": row.category, "assignedTo": row.assigned_to,
            "mitreTechniques": list(row.mitre_techniques or ()), "createdDateTime": row.created_date_time,
            "lastUpdateDateTime": row.last_modified_date_time, "resolvedDateTime": row.closed_date_time,
            "firstActivityDateTime": row.first_activity_date_time,
            "lastActivityDateTime": row.last_activity_date_time,
            "comments": v2_comments(row.comments), "evidence": evidence,
            "suppressedBy": None if row.suppressed_by is None else str(row.suppressed_by),
        }
        for key in _EXTRA_TEXT:
            item[key] = _text(extra.get(key))
        if item["productName"] is None:
            item["productName"] = row.provider
        out.append(item)
    return _DUMP(out)


_DUMP = fast_dumper(AlertV2Out)


def _stamp(table, changes: dict, now: datetime) -> dict:
    """v2 words to the stored ones; resolving sets resolvedDateTime, reopening clears it."""
    values: dict = {"last_modified_date_time": now}
    if "status" in changes:
        values["status"] = STATUS_FOR_V2[changes["status"]]
        closed = table.c.closed_date_time
        values["closed_date_time"] = (func.coalesce(closed, literal(now, closed.type))
                                      if changes["status"] == "resolved" else None)
    if "classification" in changes:
        values["feedback"] = FEEDBACK_FOR_CLASSIFICATION[changes["classification"]]
    return values


WORKFLOW = Workflow(table=A, subject="alert", patch_schema=AlertV2Patch, stamp=_stamp, columns={
    "status": "status", "classification": "classification", "determination": "determination",
    "assignedTo": "assigned_to", "comments": "comments"})


def _base(tenant_id: int):
    return select(A, STATUS.label("v2_status"), SEVERITY.label("v2_severity"),
                  CLASSIFICATION.label("v2_classification"), DETERMINATION.label("v2_determination")
                  ).where(A.c.tenant_id == tenant_id)


def _time(column) -> Field:
    return Field(column, "datetime", nullable=True)


COLLECTION = Collection(
    name="alerts_v2",
    base=_base,
    id_column=A.c.id,
    fields={
        "id": Field(A.c.id, "id"),
        "providerAlertId": Field(A.c.provider_id),
        "incidentId": Field(A.c.incident_id, nullable=True),
        "status": Field(STATUS, "enum", values=V2_STATUSES),
        "severity": Field(SEVERITY, "enum", values=V2_SEVERITIES, rank=_rank(SEVERITY, V2_SEVERITIES)),
        "classification": Field(CLASSIFICATION, "enum", values=V2_CLASSIFICATIONS),
        "determination": Field(DETERMINATION, "enum", values=V2_DETERMINATIONS),
        "serviceSource": Field(A.c.service_source, nullable=True),
        "detectionSource": Field(A.c.detection_source, nullable=True),
        "title": Field(A.c.title),
        "description": Field(A.c.description, nullable=True),
        "category": Field(A.c.category, nullable=True),
        "assignedTo": Field(A.c.assigned_to, nullable=True),
        "createdDateTime": _time(A.c.created_date_time),
        "lastUpdateDateTime": _time(A.c.last_modified_date_time),
        "resolvedDateTime": _time(A.c.closed_date_time),
        "firstActivityDateTime": _time(A.c.first_activity_date_time),
        "lastActivityDateTime": _time(A.c.last_activity_date_time),
        "suppressedBy": Field(A.c.suppressed_by, "id", nullable=True),
        "mitreTechniques": ListField(element=json_element, rows=json_elements(A.c.mitre_techniques)),
    },
    order_fields={
        "id": OrderField(A.c.id, "int"),
        "severity": OrderField(_rank(SEVERITY, V2_SEVERITIES), "int"),
        "createdDateTime": OrderField(func.coalesce(A.c.created_date_time, Epoch()), "datetime"),
        "lastUpdateDateTime": OrderField(func.coalesce(A.c.last_modified_date_time, Epoch()), "datetime"),
    },
    default_order=(("id", False),),
    selectable=tuple(AlertV2Out().fields),
    count_base=lambda tenant_id: select(A.c.id).where(A.c.tenant_id == tenant_id),
    serialize=serialize,
)
