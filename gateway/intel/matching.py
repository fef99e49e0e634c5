"""Matching indicators against alerts and resources, set-based, when either side arrives.

Each direction is one ``INSERT INTO ti_matches ... SELECT`` joining the indicators (live: not expired)
with ``alert_observables`` or ``resource_identifiers`` of the tenant; the unique key (indicator,
subject) makes a match happen once however often it is evaluated (a redelivered task, a batch pushed
again, the sweep), and the rows the INSERT returned are the new matches:

* an alert that names an indicator's observable is **enriched**: its ``extra.threatIntelligenceMatches``
  lists the indicators it matched (rebuilt from ``ti_matches`` after a push rewrote ``extra``), with an
  ``updated`` event;
* a resource whose public IP or FQDN is an indicator **raises** a ``ThreatIntelligenceMatch`` alert
  through the ordinary alert merge (suppression, events, export), one per (indicator, resource), its
  evidence naming the observable, the indicator and the resource.

Both run in the transaction of the merge that brought the new side.  Two merges committing at the
same moment (an indicator and an alert naming it) may each miss the other's uncommitted rows: the
beat's sweep (:func:`sweep`) matches again the indicators changed lately and closes that gap.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from functools import cache
from pathlib import Path

from sqlalchemy import and_, case, exists, func, literal, or_, select, update
from sqlalchemy.engine import Connection

from connectors.model import AlertRecord
from gateway.intel import observables
from gateway.merge.sql import in_values, insert_for, is_postgres, update_rows
from gateway.models import (
    Alert,
    AlertObservable,
    Indicator,
    IndicatorMatch,
    LifecycleEvent,
    ResourceIdentifier,
    ResourceSource,
    SecurityEvent,
    utcnow,
)

IND, AO, M = Indicator.__table__, AlertObservable.__table__, IndicatorMatch.__table__
RI, A, EV = ResourceIdentifier.__table__, Alert.__table__, LifecycleEvent.__table__
RSRC, SE = ResourceSource.__table__, SecurityEvent.__table__
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")
HASH_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
# the columns of a security event matched, and the indicator types each is compared with
EVENT_COLUMNS = {
    "remote_ip": ("ipv4", "ipv6"),
    "source_ip": ("ipv4", "ipv6"),
    "domain": ("domain",),
    "hash": HASH_TYPES,
}
PROVIDER = "Threat Intelligence"  # the provider of the alerts matching raises
ALERT_TYPE = "ThreatIntelligenceMatch"
LEVELS = ("informational", "low", "medium", "high")
RESOURCE_KINDS = {"ipv4": "ipv4", "ipv6": "ipv6", "domain": "fqdn"}  # indicator type -> identifier kind
EVIDENCE_TYPES = {
    "ipv4": ("ipEvidence", "ipAddress"),
    "ipv6": ("ipEvidence", "ipAddress"),
    "domain": ("hostLogonSessionEvidence", "domainName"),
    "url": ("urlEvidence", "url"),
    "email": ("mailboxEvidence", "primaryAddress"),
}


@cache
def _scale() -> dict:
    return json.loads((Path(__file__).with_name("severity.json")).read_text())


def severity(threat_type: str | None, confidence: int | None) -> str:
    """The alert severity of a match, from the indicator's threat type and confidence (severity.json)."""
    scale = _scale()
    level = LEVELS.index(scale["threatTypes"].get((threat_type or "").lower(), scale["default"]))
    if confidence is not None and confidence < scale["lowConfidenceBelow"]:
        level = max(0, level - 1)
    elif confidence is not None and confidence >= scale["highConfidenceFrom"]:
        level = min(len(LEVELS) - 1, level + 1)
    return LEVELS[level]


def _live(now: datetime):
    return or_(IND.c.expires_at.is_(None), IND.c.expires_at > now)


def _insert_matches(conn: Connection, query, now: datetime) -> list:
    """INSERT the (tenant, indicator, subject type, subject id, type, value) rows of ``query``, once per
    (indicator, subject); the new ones."""
    columns = [
        "tenant_id",
        "indicator_id",
        "subject_type",
        "subject_id",
        "observable_type",
        "value",
        "matched_at",
    ]
    statement = (
        insert_for(conn, M)
        .from_select(columns, query)
        .on_conflict_do_nothing(index_elements=["indicator_id", "subject_type", "subject_id"])
    )
    return conn.execute(
        statement.returning(
            M.c.id, M.c.indicator_id, M.c.subject_type, M.c.subject_id, M.c.observable_type, M.c.value
        )
    ).all()


def _alert_query(tenant_id: int, now: datetime, restriction):
    return (
        select(
            IND.c.tenant_id,
            IND.c.id,
            literal("alert"),
            AO.c.alert_id,
            IND.c.observable_type,
            IND.c.value,
            literal(now, M.c.matched_at.type),
        )
        .select_from(
            IND.join(
                AO,
                and_(
                    AO.c.tenant_id == IND.c.tenant_id,
                    AO.c.observable_type == IND.c.observable_type,
                    AO.c.value == IND.c.value,
                ),
            )
        )
        .where(IND.c.tenant_id == tenant_id, _live(now), restriction)
    )


def _resource_query(tenant_id: int, now: datetime, restriction):
    # the kind of each side as a function of the other's, so that either side's index serves the whole key
    kind = case(*[(IND.c.observable_type == k, literal(v)) for k, v in RESOURCE_KINDS.items()])
    observable_type = case(*[(RI.c.kind == v, literal(k)) for k, v in RESOURCE_KINDS.items()])
    return (
        select(
            IND.c.tenant_id,
            IND.c.id,
            literal("resource"),
            RI.c.resource_id,
            IND.c.observable_type,
            IND.c.value,
            literal(now, M.c.matched_at.type),
        )
        .select_from(
            IND.join(
                RI,
                and_(
                    RI.c.tenant_id == IND.c.tenant_id,
                    RI.c.kind == kind,
                    IND.c.observable_type == observable_type,
                    RI.c.value == IND.c.value,
                ),
            )
        )
        .where(
            IND.c.tenant_id == tenant_id,
            IND.c.observable_type.in_(tuple(RESOURCE_KINDS)),
            RI.c.kind.in_(tuple(RESOURCE_KINDS.values())),
            _live(now),
            restriction,
        )
    )


def _event_queries(tenant_id: int, now: datetime, restriction) -> list:
    """One query per matched event column, each an equi-join on the whole key of the indicators' index
    (tenant, type, value): the type follows from the value (an address with ':' is IPv6, a hash's
    length names its algorithm)."""
    queries = []
    for column in EVENT_COLUMNS:
        if column.endswith("_ip"):
            value = SE.c[column]
            kind = case((value.like("%:%"), literal("ipv6")), else_=literal("ipv4"))
        elif column == "domain":
            value, kind = func.lower(SE.c[column]), literal("domain")
        else:
            value = func.lower(SE.c[column])
            kind = case(
                *[(func.length(value) == length, literal(name)) for name, length in HASH_LENGTHS.items()],
                else_=literal("unknown"),
            )
        queries.append(
            select(
                IND.c.tenant_id,
                IND.c.id,
                literal("event"),
                SE.c.id,
                IND.c.observable_type,
                IND.c.value,
                literal(now, M.c.matched_at.type),
            )
            .select_from(
                SE.join(
                    IND,
                    and_(
                        IND.c.tenant_id == SE.c.tenant_id,
                        IND.c.observable_type == kind,
                        IND.c.value == value,
                    ),
                )
            )
            .where(SE.c.tenant_id == tenant_id, SE.c[column].is_not(None), _live(now), restriction)
        )
    return queries


def match_indicators(
    conn: Connection,
    tenant_id: int,
    indicator_ids: Sequence[int],
    cause: str,
    batch_id: int | None = None,
    now: datetime | None = None,
    events: bool = False,
) -> int:
    """Match these indicators against the tenant's alerts and resources (and, with ``events``, its
    security events: a pass over the tenant's stored window, left to the sweep); the new matches."""
    if not indicator_ids:
        return 0
    now = now or utcnow()
    new = _insert_matches(conn, _alert_query(tenant_id, now, in_values(conn, IND.c.id, indicator_ids)), now)
    new += _insert_matches(
        conn, _resource_query(tenant_id, now, in_values(conn, IND.c.id, indicator_ids)), now
    )
    if events:
        # one pass over the tenant's events, hashed against the indicators: the events' value columns have
        # no index (a hot table), and a nested loop would read them once per indicator
        if is_postgres(conn):
            conn.exec_driver_sql("SET LOCAL enable_nestloop = off")
        try:
            for query in _event_queries(tenant_id, now, in_values(conn, IND.c.id, indicator_ids)):
                new += _insert_matches(conn, query, now)
        finally:
            if is_postgres(conn):
                conn.exec_driver_sql("SET LOCAL enable_nestloop = on")
    _act(conn, tenant_id, new, cause, batch_id, now)
    return len(new)


def events_merged(
    conn: Connection, tenant_id: int, batch_id: int, first: datetime, last: datetime, cause: str
) -> int:
    """After an events merge: match the batch's events (stored between ``first`` and ``last``) against
    the tenant's live indicators; the new matches."""
    if not _has_indicators(conn, tenant_id):
        return 0
    now = utcnow()
    restriction = and_(SE.c.batch_id == batch_id, SE.c.occurred_at >= first, SE.c.occurred_at <= last)
    new = []
    for query in _event_queries(tenant_id, now, restriction):
        new += _insert_matches(conn, query, now)
    _act(conn, tenant_id, new, cause, batch_id, now)
    return len(new)


def match_alerts(
    conn: Connection,
    tenant_id: int,
    alert_ids: Sequence[int],
    cause: str,
    batch_id: int | None = None,
    now: datetime | None = None,
) -> int:
    """Match these alerts' stored observables against the tenant's live indicators; the new matches."""
    if not alert_ids or not _has_indicators(conn, tenant_id):
        return 0
    now = now or utcnow()
    new = _insert_matches(conn, _alert_query(tenant_id, now, in_values(conn, AO.c.alert_id, alert_ids)), now)
    _act(conn, tenant_id, new, cause, batch_id, now)
    return len(new)


def match_resources(
    conn: Connection,
    tenant_id: int,
    resource_ids: Sequence[int],
    cause: str,
    batch_id: int | None = None,
    now: datetime | None = None,
) -> int:
    """Match these resources' IPs and FQDNs against the tenant's live indicators; the new matches."""
    if not resource_ids or not _has_indicators(conn, tenant_id):
        return 0
    now = now or utcnow()
    new = _insert_matches(
        conn, _resource_query(tenant_id, now, in_values(conn, RI.c.resource_id, resource_ids)), now
    )
    _act(conn, tenant_id, new, cause, batch_id, now)
    return len(new)


def _has_indicators(conn: Connection, tenant_id: int) -> bool:
    return bool(conn.execute(select(exists().where(IND.c.tenant_id == tenant_id))).scalar())


def alerts_merged(
    conn: Connection, tenant_id: int, alert_ids: Sequence[int], cause: str, batch_id: int | None = None
) -> int:
    """After an alert merge: keep the alerts' observables, match them, and put back the enrichment
    of those matched before (a push rewrites ``extra``); the number of new matches."""
    ids = sorted(set(alert_ids))
    if not ids:
        return 0
    rows = conn.execute(
        select(A.c.id, A.c.evidence, A.c.extra).where(
            A.c.tenant_id == tenant_id, in_values(conn, A.c.id, ids)
        )
    ).all()
    observed = observables.store(conn, tenant_id, [(row.id, row.evidence, row.extra) for row in rows])
    found = match_alerts(conn, tenant_id, observed, cause, batch_id)
    matched_before = conn.execute(
        select(M.c.subject_id)
        .distinct()
        .where(M.c.tenant_id == tenant_id, M.c.subject_type == "alert", in_values(conn, M.c.subject_id, ids))
    ).scalars()
    _enrich(conn, tenant_id, sorted(matched_before), None, batch_id, utcnow(), events=False)
    return found


def _act(
    conn: Connection, tenant_id: int, new: list, cause: str, batch_id: int | None, now: datetime
) -> None:
    """Enrich the alerts and raise the alerts of new matches."""
    if not new:
        return
    alert_ids = sorted({row.subject_id for row in new if row.subject_type == "alert"})
    if alert_ids:
        conn.execute(
            update(M)
            .where(
                M.c.tenant_id == tenant_id,
                M.c.subject_type == "alert",
                in_values(conn, M.c.subject_id, alert_ids),
            )
            .values(alert_id=M.c.subject_id)
        )
        _enrich(conn, tenant_id, alert_ids, cause, batch_id, now)
    raising = [row for row in new if row.subject_type in ("resource", "event")]
    if raising:
        _raise(conn, tenant_id, raising, cause, batch_id, now)


def _indicators(conn: Connection, tenant_id: int, ids) -> dict[int, object]:
    return {
        row.id: row
        for row in conn.execute(
            select(IND).where(IND.c.tenant_id == tenant_id, in_values(conn, IND.c.id, sorted(set(ids))))
        ).all()
    }


def _summary(indicator, matched_at: datetime | None) -> dict:
    return {
        "indicatorId": str(indicator.id),
        "source": indicator.source,
        "externalId": indicator.external_id,
        "observableType": indicator.observable_type,
        "value": indicator.value,
        "threatType": indicator.threat_type,
        "confidence": indicator.confidence,
        "tlpLevel": indicator.tlp_level,
        "matchedDateTime": matched_at.isoformat() if matched_at else None,
    }


def _enrich(
    conn: Connection,
    tenant_id: int,
    alert_ids: Sequence[int],
    cause: str | None,
    batch_id: int | None,
    now: datetime,
    events: bool = True,
) -> None:
    """Set each alert's ``extra.threatIntelligenceMatches`` from its stored matches."""
    if not alert_ids:
        return
    matches = conn.execute(
        select(M.c.subject_id, M.c.indicator_id, M.c.matched_at)
        .where(
            M.c.tenant_id == tenant_id,
            M.c.subject_type == "alert",
            in_values(conn, M.c.subject_id, alert_ids),
        )
        .order_by(M.c.subject_id, M.c.id)
    ).all()
    indicators = _indicators(conn, tenant_id, [m.indicator_id for m in matches])
    per_alert: dict[int, list] = defaultdict(list)
    for match in matches:
        if match.indicator_id in indicators:
            per_alert[match.subject_id].append(_summary(indicators[match.indicator_id], match.matched_at))
    extras = {
        row.id: row.extra
        for row in conn.execute(
            select(A.c.id, A.c.extra).where(
                A.c.tenant_id == tenant_id, in_values(conn, A.c.id, sorted(per_alert))
            )
        )
    }
    changes = []
    for alert_id, found in per_alert.items():
        extra = dict(extras.get(alert_id) or {})
        if extra.get("threatIntelligenceMatches") == found:
            continue
        changes.append({"id": alert_id, "extra": extra | {"threatIntelligenceMatches": found}})
    if not changes:
        return
    update_rows(conn, A, sorted(changes, key=lambda c: c["id"]), constants={"updated_at": now})
    if events:
        conn.execute(
            EV.insert(),
            [
                {
                    "tenant_id": tenant_id,
                    "subject_type": "alert",
                    "subject_id": change["id"],
                    "event": "updated",
                    "at": now,
                    "cause": cause or "threat intelligence",
                    "batch_id": batch_id,
                    "actor": PROVIDER,
                    "details": {
                        "threatIntelligenceMatches": len(change["extra"]["threatIntelligenceMatches"])
                    },
                }
                for change in changes
            ],
        )


def _evidence(indicator, subject: dict) -> list[dict]:
    kind = indicator.observable_type
    if kind in EVIDENCE_TYPES:
        odata, key = EVIDENCE_TYPES[kind]
        observable = {"@odata.type": f"#microsoft.graph.security.{odata}", key: indicator.value}
    else:  # a file hash
        observable = {
            "@odata.type": "#microsoft.graph.security.fileHashEvidence",
            "algorithm": kind,
            "value": indicator.value,
        }
    observable |= {"verdict": "malicious", "roles": ["contextual"]}
    return [
        observable,
        {"@odata.type": "#gateway.threatIntelligenceIndicator"} | _summary(indicator, None),
        subject,
    ]


def _raise(
    conn: Connection, tenant_id: int, matches: list, cause: str, batch_id: int | None, now: datetime
) -> None:
    """One ThreatIntelligenceMatch alert per (indicator, resource), through the ordinary alert merge: an
    event on a resource counts as that resource (its alert is raised, or updated to name the event);
    an event with no resource has an alert of its own."""
    from gateway.merge.alerts import AlertMerger

    indicators = _indicators(conn, tenant_id, [m.indicator_id for m in matches])
    event_ids = sorted({m.subject_id for m in matches if m.subject_type == "event"})
    events = (
        {
            row.id: row
            for row in conn.execute(
                select(
                    SE.c.id, SE.c.resource_id, SE.c.occurred_at, SE.c.kind, SE.c.event_id, SE.c.provider
                ).where(SE.c.tenant_id == tenant_id, in_values(conn, SE.c.id, event_ids))
            )
        }
        if event_ids
        else {}
    )
    records, keys, resources = [], [], []
    for match in matches:
        indicator = indicators[match.indicator_id]
        if match.subject_type == "event":
            event = events[match.subject_id]
            resource_id = event.resource_id
            subject = {
                "@odata.type": "#gateway.securityEvent",
                "eventId": str(event.id),
                "occurredDateTime": event.occurred_at.isoformat(),
                "kind": event.kind,
                "eventCode": event.event_id,
                "provider": event.provider,
                "resourceId": str(resource_id) if resource_id else None,
            }
            key = f"resource-{resource_id}" if resource_id else f"event-{event.id}"
        else:
            resource_id = match.subject_id
            subject = {
                "@odata.type": "#gateway.resource",
                "resourceId": str(resource_id),
                "identifier": {"kind": RESOURCE_KINDS[indicator.observable_type], "value": indicator.value},
            }
            key = f"resource-{resource_id}"
        resources.append(resource_id)
        records.append(
            AlertRecord(
                provider_id=f"indicator-{indicator.id}/{key}",
                title=f"Threat intelligence match: {indicator.observable_type} {indicator.value[:200]}",
                severity=severity(indicator.threat_type, indicator.confidence),
                category=ALERT_TYPE,
                description=(
                    f"The {match.subject_type} {match.subject_id} has the {indicator.observable_type} "
                    f"{indicator.value[:500]}, an indicator of {indicator.source}"
                    + (f" ({indicator.threat_type})" if indicator.threat_type else "")
                    + (f": {indicator.description[:1000]}" if indicator.description else "")
                ),
                created=now,
                last_modified=now,
                provider_timestamp=now,
                evidence=_evidence(indicator, subject),
                detection_source="threatIntelligence",
                extra={
                    "schema": "threatIntelligence",
                    "subjectType": match.subject_type,
                    "subjectId": str(match.subject_id),
                    "indicator": _summary(indicator, now),
                },
            )
        )
        keys.append(match)
    merger = AlertMerger(conn, tenant_id, PROVIDER, batch_id, cause)
    alert_ids = merger.merge_chunk(records)
    update_rows(
        conn,
        M,
        [{"id": match.id, "alert_id": alert_id} for match, alert_id in zip(keys, alert_ids, strict=True)],
    )
    resource_rows = {
        alert_id: resource_id
        for alert_id, resource_id in zip(alert_ids, resources, strict=True)
        if resource_id is not None
    }
    update_rows(
        conn,
        A,
        [
            {"id": alert_id, "resource_id": resource_id}
            for alert_id, resource_id in sorted(resource_rows.items())
        ],
    )


def sweep(conn: Connection, tenant_id: int, since: datetime, now: datetime | None = None) -> int:
    """Match again the tenant's indicators changed since ``since`` (closes the race of two merges
    committing together); the new matches."""
    ids = (
        conn.execute(select(IND.c.id).where(IND.c.tenant_id == tenant_id, IND.c.updated_at >= since))
        .scalars()
        .all()
    )
    return match_indicators(conn, tenant_id, ids, "threat intelligence sweep", None, now, events=True)


def recent_tenants(conn: Connection, since: datetime) -> list[int]:
    return conn.execute(select(IND.c.tenant_id).distinct().where(IND.c.updated_at >= since)).scalars().all()


def batch_merged(conn: Connection, tenant_id: int, batch_id: int, cause: str) -> int:
    """After a merge: match the resources the batch reported (its host records) against the tenant's
    indicators; the new matches."""
    if not _has_indicators(conn, tenant_id):
        return 0
    resource_ids = (
        conn.execute(
            select(RSRC.c.resource_id)
            .distinct()
            .where(RSRC.c.tenant_id == tenant_id, RSRC.c.batch_id == batch_id)
        )
        .scalars()
        .all()
    )
    return match_resources(conn, tenant_id, resource_ids, cause, batch_id)
