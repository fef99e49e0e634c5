"""Graph-style collections under ``/api/v1/tenants/<tenant>/security``: list (OData options, keyset
paging, CSV), get by id, workflow edits (one or many), history.

A collection is one entry of ``COLLECTIONS``: its tenant-scoped query, the fields ``$filter`` may
name, the orderings, the output schema, and (when it has customer-owned fields) its workflow.
Secure scores and control profiles plug in as further entries.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from datetime import UTC, datetime

from flask import Blueprint, current_app, g, jsonify, request, url_for
from marshmallow import ValidationError
from sqlalchemy import String, case, func, literal, literal_column, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from connectors.model import SEVERITIES
from gateway import bulk_export
from gateway.api import (
    alerts_v2,
    event_collection,
    governance_collections,
    posture_collections,
    score_collections,
)
from gateway.api import suppression as suppression_rules
from gateway.auth import require_scope, tenant_for_caller
from gateway.errors import BadRequest, NotFound
from gateway.intel import collection as intel_collection
from gateway.itsm import items as itsm_items
from gateway.models import (
    Alert,
    Epoch,
    Finding,
    FindingSource,
    LifecycleEvent,
    Observation,
    Recommendation,
    RecommendationType,
    Resource,
    ResourceIdentifier,
    ResourceSource,
    utcnow,
)
from gateway.odata import Field, FilterContext, ListField, json_element, json_elements, parse_select
from gateway.query import (
    Collection,
    ListRequest,
    OrderField,
    Workflow,
    apply_edit,
    count,
    parse_list_args,
    project,
    run_list,
)
from gateway.schemas import (
    ALERT_COMMENT_TYPE,
    AlertCommentIn,
    AlertOut,
    AlertPatch,
    EventOut,
    FindingOut,
    FindingPatch,
    MergedOut,
    ObservationOut,
    RecommendationOut,
    ResourceOut,
    SourceOut,
    fast_dumper,
)

PREFIX = "/api/v1/tenants/<tenant>/security"
blueprint = Blueprint("collections", __name__, url_prefix=PREFIX)

F, S, R, RT, RS, A = (Finding.__table__, FindingSource.__table__, Recommendation.__table__,
                      RecommendationType.__table__, Resource.__table__, Alert.__table__)
RI, EV = ResourceIdentifier.__table__, LifecycleEvent.__table__
RSRC, OBS = ResourceSource.__table__, Observation.__table__
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ALERT_SEVERITIES = ("unknown",) + SEVERITIES
FINDING_STATES = ("new", "active", "resolved", "reopened")
STATUS_OVERRIDES = ("inProgress", "riskAccepted", "falsePositive", "mitigated")


def _rank(column, values: tuple[str, ...]):
    """The position of ``column`` in ``values`` (-1 if absent): severities compare by rank.

    The values are written into the SQL as constants (they are this module's own), so that
    the expression is the one of the PostgreSQL index that serves ``$orderby=severity``
    (migration 0003).
    """
    return case(*[(column == literal_column(f"'{name}'"), literal_column(str(rank)))
                  for rank, name in enumerate(values)], else_=literal_column("-1"))


def _coalesce_time(column):
    """The column, or 1970-01-01 when NULL (as in the ordering indexes of migration 0003)."""
    return func.coalesce(column, Epoch())


def _severity(column, values=SEVERITIES) -> Field:
    return Field(column, "enum", values=values, rank=_rank(column, values))


def _text(column, nullable: bool = False) -> Field:
    return Field(column, "string", nullable=nullable)


def _time(column, nullable: bool = False) -> Field:
    return Field(column, "datetime", nullable=nullable)


def _tags(column) -> ListField:
    return ListField(element=json_element, rows=json_elements(column))


# -- identifiers ------------------------------------------------------------------------------

# The stored identifier kinds (gateway/merge/resources.py) as the API names them, in output order.
# ``name`` rows are the short names the identity rules compare (hostname, first label of an FQDN,
# NetBIOS name, cloud Name tag): shown as ``shortNames``.  IPs are stored with their network scope
# (``10.0.0.5%vpc-1``); the API shows the address alone in ``ipv4``/``ipv6`` and the scopes apart,
# in ``ipScopes`` (address -> the scopes it is held in; an address of the tenant's default scope,
# or a public one, has no entry).
IDENTIFIER_NAMES = {
    "cloud_id": "cloudId", "instance_id": "instanceId", "agent_id": "agentId", "fqdn": "fqdn",
    "hostname": "hostname", "netbios": "netbios", "cloud_name": "cloudName", "name": "shortNames",
    "mac": "mac", "ipv4": "ipv4", "ipv6": "ipv6",
}
IP_KINDS = ("ipv4", "ipv6")
IDENTIFIER_FIELDS = tuple(IDENTIFIER_NAMES.values()) + ("ipScopes",)  # the keys of ``identifiers``


def present_identifiers(pairs) -> dict:
    """``identifiers`` of a resource or host record from (kind, stored value) pairs."""
    found: dict[str, list[str]] = {}
    scopes: dict[str, list[str]] = {}
    for kind, value in pairs:
        name = IDENTIFIER_NAMES.get(kind)
        if name is None:  # a kind the API does not show (none today)
            continue
        if kind in IP_KINDS:
            value, _, scope = value.partition("%")
            if scope and scope not in scopes.setdefault(value, []):
                scopes[value].append(scope)
        values = found.setdefault(name, [])
        if value not in values:
            values.append(value)
    out = {name: sorted(found[name]) for name in IDENTIFIER_NAMES.values() if name in found}
    scoped = {address: sorted(names) for address, names in sorted(scopes.items()) if names}
    if scoped:
        out["ipScopes"] = scoped
    return out


class _BareAddress(FunctionElement):
    """An identifier value without its ``%scope`` (IPs are stored as ``10.0.0.5%vpc-1``)."""

    type = String()
    inherit_cache = True
    name = "bare_address"


@compiles(_BareAddress, "postgresql")
def _bare_address_postgresql(element, compiler, **kw) -> str:
    (value,) = element.clauses.clauses
    return compiler.process(func.split_part(value, literal("%"), 1), **kw)


@compiles(_BareAddress)
def _bare_address_default(element, compiler, **kw) -> str:
    (value,) = element.clauses.clauses
    cut = func.instr(value, literal("%"))
    return compiler.process(case((cut > 0, func.substr(value, 1, cut - 1)), else_=value), **kw)


# -- serializers ------------------------------------------------------------------------------


def _serialize_findings(conn, tenant_id, rows, selected) -> list[dict]:
    ids = [row.id for row in rows]
    sources = defaultdict(list)
    if ids and (selected is None or "sources" in selected):
        for source in conn.execute(select(S).where(S.c.tenant_id == tenant_id, S.c.finding_id.in_(ids))
                                   .order_by(S.c.id)):
            sources[source.finding_id].append(source._asdict())
    out = []
    for row in rows:
        data = row._asdict()
        data["sources"] = sources.get(row.id, [])
        out.append(data)
    if out and (selected is None or "governance" in selected):
        governance_collections.add_to_findings(conn, tenant_id, out)
    return _DUMP_FINDINGS(out)


def _serialize_resources(conn, tenant_id, rows, selected) -> list[dict]:
    """Resources with their identifiers and host records: one query each for the whole page."""
    ids = [row.id for row in rows]
    identifiers = defaultdict(list)
    if ids and (selected is None or "identifiers" in selected):
        for ident in conn.execute(select(RI.c.resource_id, RI.c.kind, RI.c.value).where(
                RI.c.tenant_id == tenant_id, RI.c.resource_id.in_(ids)).order_by(RI.c.kind, RI.c.value)):
            identifiers[ident.resource_id].append((ident.kind, ident.value))
    sources = defaultdict(list)
    if ids and (selected is None or "sources" in selected):
        for source in conn.execute(select(RSRC).where(RSRC.c.tenant_id == tenant_id,
                                                      RSRC.c.resource_id.in_(ids)).order_by(RSRC.c.id)):
            data = source._asdict()
            data["identifiers"] = present_identifiers(
                (kind, value) for kind, values in sorted((source.identifiers or {}).items())
                for value in (values if isinstance(values, list) else ()))
            sources[source.resource_id].append(data)
    out = []
    for row in rows:
        data = row._asdict()
        data["identifiers"] = present_identifiers(identifiers.get(row.id, ()))
        data["sources"] = sources.get(row.id, [])
        out.append(data)
    return _DUMP_RESOURCES(out)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _dump(schema):
    dump = fast_dumper(schema)
    return lambda conn, tenant_id, rows, selected: dump([row._asdict() for row in rows])


_DUMP_FINDINGS = fast_dumper(FindingOut)
_DUMP_RESOURCES = fast_dumper(ResourceOut)
_DUMP_EVENTS = fast_dumper(EventOut)
_DUMP_MERGED = fast_dumper(MergedOut)


# -- collections ------------------------------------------------------------------------------


# Recommendation types are per tenant: the join names the tenant too (and the composite foreign
# key (tenant_id, type id) keeps a row from referring to another tenant's type at all).


# A finding's exemption is its recommendation's (same resource, same type): read, not copied,
# so an exemption covering 100,000 recommendations writes no finding.
FINDING_EXEMPTION = (select(R.c.exemption_id)
                     .where(R.c.tenant_id == F.c.tenant_id, R.c.resource_id == F.c.resource_id,
                            R.c.type_id == F.c.recommendation_type_id)
                     .scalar_subquery())


def _finding_base(tenant_id: int):
    return (select(F, RT.c.key.label("recommendation_type_key"), RT.c.enabled.label("type_enabled"),
                   FINDING_EXEMPTION.label("exemption_id"))
            .join(RT, (RT.c.id == F.c.recommendation_type_id) & (RT.c.tenant_id == tenant_id))
            .where(F.c.tenant_id == tenant_id))


def _rec_base(tenant_id: int):
    return (select(R, RT.c.key.label("type_key"), RT.c.title.label("type_title"),
                   RT.c.kind.label("type_kind"), RT.c.remediation.label("type_remediation"),
                   RT.c.enabled.label("type_enabled"), RT.c.severity_override.label("type_severity_override"),
                   *governance_collections.REC_COLUMNS)
            .join(RT, (RT.c.id == R.c.type_id) & (RT.c.tenant_id == tenant_id))
            # its current governance assignment, if any
            .outerjoin(governance_collections.REC_GA, governance_collections.REC_JOIN)
            .where(R.c.tenant_id == tenant_id))


def _sources(context: FilterContext):
    sources = S.alias()
    return sources, (sources.c.finding_id == F.c.id) & _tenant_sources(sources, context)


def _tenant_sources(sources, context: FilterContext):
    # ``finding_id IS NOT NULL`` (true of every source) is the predicate of the index on
    # (tenant_id, provider, finding_id): naming it lets any() use that index (migration 0012)
    return (sources.c.tenant_id == context.tenant_id) & sources.c.finding_id.is_not(None)


def _source_owner(sources, context: FilterContext):
    """A source's finding, and the tenant's sources: every one of them is a source of one of its findings."""
    return sources.c.finding_id, _tenant_sources(sources, context)


def _source_fields(sources) -> dict[str, Field]:
    return {
        "provider": _text(sources.c.provider),
        "product": _text(sources.c.product, nullable=True),
        "format": _text(sources.c.format, nullable=True),
        "providerId": _text(sources.c.provider_id),
        "vendorId": _text(sources.c.vendor_id, nullable=True),
        "state": Field(sources.c.state, "enum", values=("open", "fixed")),
        "title": _text(sources.c.title),
        "severity": _severity(sources.c.severity),
        "cvssScore": Field(sources.c.cvss_score, "number", nullable=True),
        "firstSeen": _time(sources.c.first_seen, nullable=True),
        "lastSeen": _time(sources.c.last_seen, nullable=True),
        "providerTimestamp": _time(sources.c.provider_timestamp),
        "batchId": Field(sources.c.batch_id, "id", nullable=True),
        "scan": _text(sources.c.scan, nullable=True),
        "hostKey": _text(sources.c.host_key, nullable=True),
    }


def _identifiers(kind: str):
    def rows(context: FilterContext):
        identifiers = RI.alias()
        return identifiers, ((identifiers.c.resource_id == RS.c.id)
                             & (identifiers.c.tenant_id == context.tenant_id)
                             & (identifiers.c.kind == kind))

    def element(identifiers) -> Field:  # an IP compares without its scope, as it is shown
        return Field(_BareAddress(identifiers.c.value) if kind in IP_KINDS else identifiers.c.value)

    return ListField(element=element, rows=rows)


def _host_records(context: FilterContext):
    records = RSRC.alias()
    return records, (records.c.resource_id == RS.c.id) & (records.c.tenant_id == context.tenant_id)


def _host_record_fields(records) -> dict[str, Field]:
    return {
        "id": Field(records.c.id, "id"),
        "provider": _text(records.c.provider),
        "product": _text(records.c.product, nullable=True),
        "hostKey": _text(records.c.host_key, nullable=True),
        "firstSeen": _time(records.c.first_seen, nullable=True),
        "lastSeen": _time(records.c.last_seen, nullable=True),
        "batchId": Field(records.c.batch_id, "id", nullable=True),
    }


def _resource_observations(context: FilterContext):
    observations = OBS.alias()
    return observations, ((observations.c.resource_id == RS.c.id)
                          & (observations.c.tenant_id == context.tenant_id))


def _observation_fields(table) -> dict[str, Field]:
    return {
        "id": Field(table.c.id, "id"),
        "resourceId": Field(table.c.resource_id, "id"),
        "provider": _text(table.c.provider),
        "product": _text(table.c.product, nullable=True),
        "providerId": _text(table.c.provider_id),
        "vendorId": _text(table.c.vendor_id, nullable=True),
        "category": _text(table.c.category),
        "name": _text(table.c.name),
        "value": _text(table.c.value, nullable=True),
        "port": Field(table.c.port, "number", nullable=True),
        "protocol": _text(table.c.protocol, nullable=True),
        "service": _text(table.c.service, nullable=True),
        "evidence": _text(table.c.evidence, nullable=True),
        "scan": _text(table.c.scan, nullable=True),
        "hostKey": _text(table.c.host_key, nullable=True),
        "batchId": Field(table.c.batch_id, "id", nullable=True),
        "firstSeen": _time(table.c.first_seen, nullable=True),
        "lastSeen": _time(table.c.last_seen, nullable=True),
        "providerTimestamp": _time(table.c.provider_timestamp),
    }


def _customer_fields(table) -> dict[str, Field | ListField]:
    return {
        "statusOverride": Field(table.c.status_override, "enum", nullable=True, values=STATUS_OVERRIDES),
        "assignedTo": _text(table.c.assigned_to, nullable=True),
        "tags": _tags(table.c.tags),
    }


def _stamp_alert(table, changes: dict, now: datetime) -> dict:
    """Graph's alert bookkeeping: closing sets closedDateTime, reopening clears it."""
    values = {"last_modified_date_time": now}
    if "status" in changes and "closedDateTime" not in changes:
        if changes["status"] == "resolved":
            values["closed_date_time"] = func.coalesce(table.c.closed_date_time, literal(now,
                                                                                         table.c.closed_date_time.type))
        else:
            values["closed_date_time"] = None
    if "feedback" in changes:  # Graph v2's classification is the same verdict in today's words
        values["classification"] = {v: k for k, v in alerts_v2.FEEDBACK_FOR_CLASSIFICATION.items()
                                    if v}.get(changes["feedback"])
    return values


_CUSTOMER_COLUMNS = {"statusOverride": "status_override", "assignedTo": "assigned_to", "comments": "comments",
                     "tags": "tags"}

COLLECTIONS: dict[str, Collection] = {
    "alerts": Collection(
        name="alerts",
        base=lambda tenant_id: select(A).where(A.c.tenant_id == tenant_id),
        id_column=A.c.id,
        fields={
            "id": Field(A.c.id, "id"),
            "title": _text(A.c.title),
            "description": _text(A.c.description, nullable=True),
            "severity": _severity(A.c.severity, ALERT_SEVERITIES),
            "category": _text(A.c.category, nullable=True),
            "status": Field(A.c.status, "enum", values=("newAlert", "inProgress", "resolved")),
            "feedback": Field(A.c.feedback, "enum", nullable=True,
                              values=("truePositive", "falsePositive", "benignPositive")),
            "assignedTo": _text(A.c.assigned_to, nullable=True),
            "closedDateTime": _time(A.c.closed_date_time, nullable=True),
            "createdDateTime": _time(A.c.created_date_time, nullable=True),
            "lastModifiedDateTime": _time(A.c.last_modified_date_time, nullable=True),
            "resourceId": Field(A.c.resource_id, "id", nullable=True),
            "vendorInformation/provider": _text(A.c.provider),
            "vendorInformation/providerAlertId": _text(A.c.provider_id),
            "suppressedBy": Field(A.c.suppressed_by, "id", nullable=True),
            "tags": _tags(A.c.tags),
            "recommendedActions": _tags(A.c.recommended_actions),
            # raised by the gateway's own detection rules (gateway/detection/, issue 16)
            "detectionRule": _text(A.c.detection_rule, nullable=True),
            "mitreTechniques": _tags(A.c.mitre_techniques),
        },
        order_fields={
            "id": OrderField(A.c.id, "int"),
            "severity": OrderField(_rank(A.c.severity, ALERT_SEVERITIES), "int"),
            "createdDateTime": OrderField(_coalesce_time(A.c.created_date_time), "datetime"),
            "lastModifiedDateTime": OrderField(_coalesce_time(A.c.last_modified_date_time), "datetime"),
        },
        default_order=(("id", False),),
        selectable=tuple(AlertOut().fields),
        serialize=_dump(AlertOut),
        workflow=Workflow(table=A, subject="alert", patch_schema=AlertPatch, stamp=_stamp_alert, columns={
            "status": "status", "assignedTo": "assigned_to", "feedback": "feedback", "comments": "comments",
            "tags": "tags", "closedDateTime": "closed_date_time"}),
    ),
    "recommendations": Collection(
        name="recommendations",
        base=_rec_base,
        id_column=R.c.id,
        fields={
            "id": Field(R.c.id, "id"),
            "resourceId": Field(R.c.resource_id, "id"),
            "recommendationType": _text(RT.c.key),
            "displayName": _text(RT.c.title),
            "kind": _text(RT.c.kind),
            "status": Field(R.c.status, "enum", values=("Healthy", "Unhealthy", "NotApplicable")),
            "statusCause": Field(R.c.status_cause, "enum", nullable=True, values=("DisabledByPolicy", "Exempt")),
            "actualStatus": Field(R.c.actual_status, "enum", values=("Healthy", "Unhealthy")),
            "actualSeverity": _severity(R.c.actual_severity),
            "exemptionId": Field(R.c.exemption_id, "id", nullable=True),
            "policy/enabled": Field(RT.c.enabled, "bool"),
            "policy/severityOverride": Field(RT.c.severity_override, "enum", nullable=True, values=SEVERITIES),
            **governance_collections.RECOMMENDATION_FIELDS,
            "severity": _severity(R.c.severity),
            "firstEvaluated": _time(R.c.first_evaluated),
            "statusChangedAt": _time(R.c.status_changed_at),
            "updatedAt": _time(R.c.updated_at),
            **_customer_fields(R),
        },
        order_fields={
            "id": OrderField(R.c.id, "int"),
            "severity": OrderField(_rank(R.c.severity, SEVERITIES), "int"),
            "updatedAt": OrderField(R.c.updated_at, "datetime"),
        },
        default_order=(("id", False),),
        selectable=tuple(RecommendationOut().fields),
        count_base=lambda tenant_id: select(R.c.id).where(R.c.tenant_id == tenant_id),
        count_joined=(RT, governance_collections.REC_GA),
        serialize=_dump(RecommendationOut),
        workflow=Workflow(table=R, subject="recommendation", patch_schema=FindingPatch,
                          columns=_CUSTOMER_COLUMNS),
    ),
    "findings": Collection(
        name="findings",
        base=_finding_base,
        id_column=F.c.id,
        fields={
            "id": Field(F.c.id, "id"),
            "resourceId": Field(F.c.resource_id, "id"),
            "recommendationType": _text(RT.c.key),
            "correlationKey": _text(F.c.correlation_key),
            "kind": _text(F.c.kind),
            "title": _text(F.c.title),
            "description": _text(F.c.description, nullable=True),
            "remediation": _text(F.c.remediation, nullable=True),
            "severity": _severity(F.c.severity),
            "cvssScore": Field(F.c.cvss_score, "number", nullable=True),
            "state": Field(F.c.state, "enum", values=FINDING_STATES),
            "firstSeen": _time(F.c.first_seen, nullable=True),
            "lastSeen": _time(F.c.last_seen, nullable=True),
            "resolvedAt": _time(F.c.resolved_at, nullable=True),
            "stateChangedAt": _time(F.c.state_changed_at),
            "createdAt": _time(F.c.created_at),
            "updatedAt": _time(F.c.updated_at),
            # A finding is one CVE on one resource: its cves list is its cve column (empty when NULL).
            "cves": ListField(element=lambda _: Field(F.c.cve, nullable=True)),
            "exemptionId": Field(FINDING_EXEMPTION, "id", nullable=True),
            "policy/enabled": Field(RT.c.enabled, "bool"),
            **governance_collections.FINDING_FIELDS,
            "sources": ListField(members=_source_fields, rows=_sources, owner=_source_owner),
            **_customer_fields(F),
        },
        order_fields={
            "id": OrderField(F.c.id, "int"),
            "severity": OrderField(_rank(F.c.severity, SEVERITIES), "int"),
            "cvssScore": OrderField(func.coalesce(F.c.cvss_score, -1.0), "float"),
            "lastSeen": OrderField(_coalesce_time(F.c.last_seen), "datetime"),
            "firstSeen": OrderField(_coalesce_time(F.c.first_seen), "datetime"),
            "updatedAt": OrderField(F.c.updated_at, "datetime"),
        },
        default_order=(("id", False),),
        selectable=tuple(FindingOut().fields),
        # (tenant_id, recommendation_type_id) is NOT NULL with a foreign key: the join never changes a count.
        count_base=lambda tenant_id: select(F.c.id).where(F.c.tenant_id == tenant_id),
        count_joined=(RT,),
        serialize=_serialize_findings,
        workflow=Workflow(table=F, subject="finding", patch_schema=FindingPatch, columns=_CUSTOMER_COLUMNS),
    ),
    "resources": Collection(
        name="resources",
        # a resource merged into another is not listed: its id answers 301 with the surviving one
        base=lambda tenant_id: select(RS).where(RS.c.tenant_id == tenant_id, RS.c.merged_into.is_(None)),
        id_column=RS.c.id,
        fields={
            "id": Field(RS.c.id, "id"),
            "kind": _text(RS.c.kind, nullable=True),
            "name": _text(RS.c.name, nullable=True),
            "os": _text(RS.c.os, nullable=True),
            "firstSeen": _time(RS.c.first_seen, nullable=True),
            "lastSeen": _time(RS.c.last_seen, nullable=True),
            "createdAt": _time(RS.c.created_at),
            "tags": _tags(RS.c.tags),
            **{f"identifiers/{name}": _identifiers(kind) for kind, name in IDENTIFIER_NAMES.items()},
            "sources": ListField(members=_host_record_fields, rows=_host_records),
            "observations": ListField(members=_observation_fields, rows=_resource_observations),
        },
        order_fields={
            "id": OrderField(RS.c.id, "int"),
            "lastSeen": OrderField(_coalesce_time(RS.c.last_seen), "datetime"),
        },
        default_order=(("id", False),),
        selectable=tuple(ResourceOut().fields),
        serialize=_serialize_resources,
    ),
    # Graph's alert (v2) shape of the same rows; its edits are Graph's (PATCH one, comments), below
    "alerts_v2": alerts_v2.COLLECTION,
    # the tenant's security policy and exemptions (edits in gateway/api/posture.py)
    "policies": posture_collections.POLICIES,
    "exemptions": posture_collections.EXEMPTIONS,
    "alertSuppressionRules": suppression_rules.COLLECTION,  # writes: gateway/api/suppression.py
    # the Secure Score: history, per-control rows, control profiles (edits in gateway/api/score.py)
    "secureScores": score_collections.SECURE_SCORES,
    "secureScoreControls": score_collections.SECURE_SCORE_CONTROLS,
    "secureScoreControlProfiles": score_collections.SECURE_SCORE_CONTROL_PROFILES,
    # governance rules and assignments (edits in gateway/api/governance.py)
    "governanceRules": governance_collections.RULES,
    "governanceAssignments": governance_collections.ASSIGNMENTS,
    # the outbox, read-only (gateway/export/; pushed to destinations by gateway/api/exports.py's)
    "events": event_collection.EVENTS,
    # threat-intelligence indicators, read-only (pushed as batches, pulled from TAXII: gateway/intel/)
    "indicators": intel_collection.INDICATORS,
    "observations": Collection(
        name="observations",
        base=lambda tenant_id: select(OBS).where(OBS.c.tenant_id == tenant_id),
        id_column=OBS.c.id,
        fields=_observation_fields(OBS),
        order_fields={
            "id": OrderField(OBS.c.id, "int"),
            "lastSeen": OrderField(_coalesce_time(OBS.c.last_seen), "datetime"),
            "firstSeen": OrderField(_coalesce_time(OBS.c.first_seen), "datetime"),
        },
        default_order=(("id", False),),
        selectable=tuple(ObservationOut().fields),
        serialize=_dump(ObservationOut),
    ),
}


# findings, recommendations and alerts show their ITSM tickets and filter on them (gateway/itsm/items.py)
itsm_items.install(COLLECTIONS)


# -- views ------------------------------------------------------------------------------------


def _db():
    return current_app.extensions["gateway.db"]


def _tenant_id(tenant: str) -> int:
    with _db().sessions() as session:
        return tenant_for_caller(session, tenant).id


def _prepare(collection: Collection, tenant_id: int) -> None:
    if collection.prepare is not None:
        with _db().engine.begin() as conn:
            collection.prepare(conn, tenant_id)


def _context(tenant_id: int) -> FilterContext:
    return FilterContext(tenant_id=tenant_id, dialect=_db().engine.dialect.name)


def _item_id(name: str, item_id: str) -> int:
    collection = COLLECTIONS.get(name)  # (other modules' collections have decimal ids)
    if collection is not None and isinstance(collection.id_column.type, String) and 0 < len(item_id) <= 100:
        return item_id  # a named key (a control id)
    if not (item_id.isascii() and item_id.isdigit()) or len(item_id) > 18:
        raise NotFound(f"{_singular(name)} '{item_id[:40]}' not found")
    return int(item_id)


def _metadata(name: str, selected: tuple[str, ...] | None) -> str:
    context = f"{request.url_root}api/v1/$metadata#security/{name}"
    return context + (f"({','.join(selected)})" if selected else "")


def _list(tenant: str, name: str, *, tenant_id: int | None = None, within: tuple = (), bound: str = "",
          endpoint: str | None = None, url_args: dict | None = None):
    """One page (or the CSV) of a collection; ``within`` narrows it (conditions ANDed to the
    filter, e.g. one resource's observations) and ``bound`` binds paging tokens to that narrowing."""
    collection = COLLECTIONS[name]
    tenant_id = _tenant_id(tenant) if tenant_id is None else tenant_id
    config = current_app.config
    list_request = parse_list_args(collection, request.args, _context(tenant_id), config["PAGE_SIZE_DEFAULT"],
                                   config["PAGE_SIZE_MAX"], **bulk_export.accepted(request.accept_mimetypes))
    _prepare(collection, tenant_id)
    if within:
        list_request.conditions = list(within) + list_request.conditions
        list_request.fingerprint = hashlib.sha256(
            f"{list_request.fingerprint}\x1f{bound}".encode()).hexdigest()[:24]
    if bulk_export.export_format(list_request):  # the whole result, CSV or JSON Lines
        return bulk_export.export_response(current_app.response_class, _db().engine, collection, tenant_id,
                                           list_request, name, current_app.json.default,
                                           connections=config["EXPORT_CONNECTIONS"],
                                           reader_timeout=config["EXPORT_READER_TIMEOUT_SECONDS"])
    with _db().engine.connect() as conn:
        total = count(conn, collection, tenant_id, list_request) if list_request.count else None
        values, token = run_list(conn, collection, tenant_id, list_request, config["SECRET_KEY"],
                                 request.args.get("$skiptoken"))
    body: dict = {"@odata.context": _metadata(name, list_request.select)}
    if total is not None:
        body["@odata.count"] = total
    body["value"] = values
    if token:
        args = request.args.to_dict()
        args.pop("$skip", None)  # the token carries the position
        args["$skiptoken"] = token
        body["@odata.nextLink"] = url_for(endpoint or "collections.list_" + name, tenant=tenant,
                                          _external=True, **(url_args or {}), **args)
    return jsonify(body)


def _get_one(tenant: str, name: str, item_id: str, selected: tuple[str, ...] | None = None) -> dict:
    collection = COLLECTIONS[name]
    tenant_id = _tenant_id(tenant)
    _prepare(collection, tenant_id)
    with _db().engine.connect() as conn:
        rows = conn.execute(collection.base(tenant_id).where(collection.id_column == _item_id(name,
                                                                                              item_id))).all()
        if not rows:
            raise NotFound(f"{_singular(name)} '{item_id}' not found")
        return project(collection.serialize(conn, tenant_id, rows, selected), selected)[0]


def resource_state(conn, tenant_id: int, resource_id: int) -> int | None:
    """The resource's ``merged_into`` (None when it is live); 404 when the tenant has no such resource."""
    found = conn.execute(select(RS.c.id, RS.c.merged_into).where(RS.c.tenant_id == tenant_id,
                                                                 RS.c.id == resource_id)).first()
    if found is None:
        raise NotFound(f"resource '{resource_id}' not found")
    return found.merged_into


def moved_permanently(old_id: int, survivor: int, location: str):
    """The answer of a merged-away resource id: 301 to the surviving resource."""
    response = jsonify(_DUMP_MERGED([{"id": old_id, "merged_into": survivor}])[0])
    response.status_code = 301
    response.headers["Location"] = location
    return response


def _get_resource(tenant: str, item_id: str, selected: tuple[str, ...] | None):
    """A live resource; a merged-away id answers 301 with the surviving one (``merged_into`` is kept
    flattened to the final survivor by the merge)."""
    tenant_id = _tenant_id(tenant)
    resource_id = _item_id("resources", item_id)
    with _db().engine.connect() as conn:
        survivor = resource_state(conn, tenant_id, resource_id)
    if survivor is not None:
        location = url_for("collections.get_resources", tenant=tenant, item_id=survivor, _external=True,
                           **request.args.to_dict())
        return moved_permanently(resource_id, survivor, location)
    return jsonify(_get_one(tenant, "resources", item_id, selected))


def _only(allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        names = ", ".join(allowed) or "none"
        raise BadRequest(f"unknown query parameter '{unknown[0][:40]}'; allowed: {names}",
                         code="invalidParameter")


def _register(name: str) -> None:
    @require_scope("security.read")
    def list_view(tenant: str):
        return _list(tenant, name)

    @require_scope("security.read")
    def get_view(tenant: str, item_id: str):
        _only(("$select",))
        selected = parse_select(request.args["$select"], COLLECTIONS[name].selectable) \
            if "$select" in request.args else None
        if name == "resources":
            return _get_resource(tenant, item_id, selected)
        return jsonify(_get_one(tenant, name, item_id, selected))

    list_view.__doc__ = f"List {name}, scoped to the tenant (OData options; JSON or CSV)."
    get_view.__doc__ = f"One of the tenant's {name}."
    blueprint.add_url_rule(f"/{name}", f"list_{name}", list_view, methods=["GET"])
    blueprint.add_url_rule(f"/{name}/<item_id>", f"get_{name}", get_view, methods=["GET"])


for _name in COLLECTIONS:
    _register(_name)


# -- workflow -------------------------------------------------------------------------------------


def _changes(collection: Collection) -> dict:
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict) or not payload:
        raise BadRequest("the body must be a JSON object with the fields to change", code="invalidBody")
    try:
        return collection.workflow.patch_schema().load(payload)
    except ValidationError as exc:
        raise BadRequest("invalid fields: " + "; ".join(f"{k}: {v}" for k, v in exc.messages.items()),
                         code="invalidBody", details=exc.messages) from None


def _patch(tenant: str, name: str, item_id: str):
    collection = COLLECTIONS[name]
    _only(())
    changes = _changes(collection)
    tenant_id = _tenant_id(tenant)
    condition = collection.id_column == _item_id(name, item_id)
    with _db().engine.begin() as conn:
        if not apply_edit(conn, collection, tenant_id, [condition], changes, g.caller.client_id, utcnow(),
                          EV):
            raise NotFound(f"{_singular(name)} '{item_id}' not found")
    if "return=representation" in request.headers.get("Prefer", ""):
        return jsonify(_get_one(tenant, name, item_id))
    response = current_app.response_class(status=204)
    del response.headers["Content-Type"]
    return response


def _patch_many(tenant: str, name: str):
    collection = COLLECTIONS[name]
    _only(("$filter",))
    if not request.args.get("$filter", "").strip():
        raise BadRequest("a bulk update needs a '$filter' naming the items to change",
                         code="invalidParameter")
    changes = _changes(collection)
    tenant_id = _tenant_id(tenant)
    parsed = parse_list_args(collection, request.args, _context(tenant_id), 1, 1)
    with _db().engine.begin() as conn:
        updated = apply_edit(conn, collection, tenant_id, parsed.conditions, changes, g.caller.client_id,
                             utcnow(), EV)
    return jsonify({"updated": updated})


def _history(tenant: str, name: str, item_id: str):
    tenant_id = _tenant_id(tenant)
    _get_one(tenant, name, item_id)
    subject = COLLECTIONS[name].workflow.subject
    with _db().engine.connect() as conn:
        rows = conn.execute(select(EV).where(EV.c.tenant_id == tenant_id, EV.c.subject_type == subject,
                                             EV.c.subject_id == int(item_id)).order_by(EV.c.id)).all()
    return jsonify({"value": _DUMP_EVENTS([row._asdict() for row in rows])})


def _register_workflow(name: str) -> None:
    @require_scope("alerts.manage")
    def patch_view(tenant: str, item_id: str):
        return _patch(tenant, name, item_id)

    @require_scope("alerts.manage")
    def patch_many_view(tenant: str):
        return _patch_many(tenant, name)

    @require_scope("security.read")
    def history_view(tenant: str, item_id: str):
        return _history(tenant, name, item_id)

    patch_view.__doc__ = f"Change the customer-owned fields of one of the tenant's {name}."
    patch_many_view.__doc__ = f"Change the customer-owned fields of each of the tenant's {name} that match."
    history_view.__doc__ = f"The stored lifecycle events of one of the tenant's {name}."
    blueprint.add_url_rule(f"/{name}/<item_id>", f"patch_{name}", patch_view, methods=["PATCH"])
    blueprint.add_url_rule(f"/{name}", f"patch_many_{name}", patch_many_view, methods=["PATCH"])
    blueprint.add_url_rule(f"/{name}/<item_id>/history", f"history_{name}", history_view, methods=["GET"])


for _name, _collection in COLLECTIONS.items():
    if _collection.workflow is not None:
        _register_workflow(_name)

# -- alerts_v2 edits (Graph's: update one alert, add a comment) -------------------------------------


def _v2_edit(tenant: str, item_id: str, changes: dict) -> int:
    collection = dataclasses.replace(alerts_v2.COLLECTION, workflow=alerts_v2.WORKFLOW)
    tenant_id = _tenant_id(tenant)
    condition = A.c.id == _item_id("alerts_v2", item_id)
    with _db().engine.begin() as conn:
        if not apply_edit(conn, collection, tenant_id, [condition], changes, g.caller.client_id, utcnow(),
                          EV):
            raise NotFound(f"alert '{item_id[:40]}' not found")
    return tenant_id


@require_scope("alerts.manage")
def patch_alert_v2(tenant: str, item_id: str):
    """Update the customer-owned fields of one alert (status, classification, determination, assignedTo)."""
    _only(())
    changes = _changes(dataclasses.replace(alerts_v2.COLLECTION, workflow=alerts_v2.WORKFLOW))
    _v2_edit(tenant, item_id, changes)
    return jsonify(_get_one(tenant, "alerts_v2", item_id))


COMMENT_SHAPE = {"@odata.type": ALERT_COMMENT_TYPE, "comment": "text of the comment"}


@require_scope("alerts.manage")
def comment_alert_v2(tenant: str, item_id: str):
    """Add a comment to one alert; answer its comments, as Graph does."""
    _only(())
    payload = request.get_json(silent=True)
    shape = 'the body is {"@odata.type": "' + ALERT_COMMENT_TYPE + '", "comment": "..."}'
    if not isinstance(payload, dict):
        raise BadRequest(shape, code="invalidBody", details={"expected": COMMENT_SHAPE})
    try:
        comment = AlertCommentIn().load(payload)["comment"]
    except ValidationError as exc:
        raise BadRequest(shape + ": " + "; ".join(f"{k}: {v}" for k, v in exc.messages.items()),
                         code="invalidBody",
                         details={"expected": COMMENT_SHAPE, "errors": exc.messages}) from None
    _v2_edit(tenant, item_id, {"comments": [{"text": comment}]})
    alert = _get_one(tenant, "alerts_v2", item_id, ("id", "comments"))
    return jsonify({"@odata.context": f"{request.url_root}api/v1/$metadata#Collection("
                                      f"microsoft.graph.security.alertComment)", "value": alert["comments"]})


blueprint.add_url_rule("/alerts_v2/<item_id>", "patch_alerts_v2", patch_alert_v2, methods=["PATCH"])
blueprint.add_url_rule("/alerts_v2/<item_id>/comments", "comment_alerts_v2", comment_alert_v2,
                       methods=["POST"])

__all__ = ["COLLECTIONS", "IDENTIFIER_FIELDS", "ListRequest", "SourceOut", "blueprint", "present_identifiers"]


def _singular(collection: str) -> str:
    """"alerts" -> "alert", "alerts_v2" -> "alert", "policies" -> "policy" (for messages)."""
    name = collection.removesuffix("_v2")
    return name[:-3] + "y" if name.endswith("ies") else name.removesuffix("s")
