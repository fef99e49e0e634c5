"""Rule evaluation: set-based SQL over the rows since a rule's watermark; hits raise ordinary alerts.

Each logic is one SQL statement that returns the rule's **hits**, already grouped by (group,
window): the rows it reads are the tenant's, and only the new ones (id above the rule's
watermark) can start a hit, while the window reaches back over older rows.  Python touches only
the hits (a handful), never the rows.  A hit is raised as an alert of provider
``Gateway Detection`` through the alert merge (gateway/merge/alerts.py: same collection,
workflow, suppression rules, events and export) whose provider id is ``rule|group|window``:
a rule run twice over the same rows, or a hit found again, is the same alert, once.  The rows
behind a hit are linked to the alert (``detection_links``, at most ``MAX_LINKS`` per alert).

Windows: a hit's window is the ``windowMinutes`` ending at the row that completed it (the 4624
after the failures, the alert that made N resources); it is raised once per (rule, group,
window number), the window number being that row's time divided by the window length.

The watermark moves to the highest id read only when no batch of the tenant was open while the
rule ran: a merge commits its rows in one transaction, so a row with a lower id can become
visible after a higher one; holding the watermark back re-reads rows instead of missing them
(the alert key keeps the re-read from raising twice).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Integer, String, and_, cast, column, func, literal, or_, select, update, values
from sqlalchemy.engine import Connection

from connectors.model import AlertRecord
from gateway.detection.rules import Rule, for_tenant
from gateway.detection.sqlfn import bucket, minus_minutes
from gateway.merge.alerts import AlertMerger
from gateway.merge.sql import insert_for, insert_rows
from gateway.models import (
    Alert,
    Batch,
    DetectionLink,
    DetectionWatermark,
    Finding,
    FindingSource,
    KnownExploitedVulnerability,
    Resource,
    ResourceIdentifier,
    SecurityEvent,
    Tenant,
    UTCDateTime,
    utcnow,
)

log = logging.getLogger(__name__)

PROVIDER = "Gateway Detection"
MAX_LINKS = 100
MAX_HITS = 1000  # per rule run: a flood of hits is raised over the next runs
EV, A, F, S = SecurityEvent.__table__, Alert.__table__, Finding.__table__, FindingSource.__table__
R = Resource.__table__
KEV, RI, WM, LINKS, B = (
    KnownExploitedVulnerability.__table__,
    ResourceIdentifier.__table__,
    DetectionWatermark.__table__,
    DetectionLink.__table__,
    Batch.__table__,
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# free text compares without case; the gateway's own values (kind, outcome), addresses and ids exactly
CASELESS_FIELDS = ("user_name", "target", "domain", "process", "hash", "provider", "title", "name", "os",
                   "category", "cve", "detection_source", "service_source")


@dataclass
class Hit:
    """What a rule found: one (group, window), the row that completed it, and the rows behind it."""

    rule: Rule
    group: str
    window: int  # the window's number (time // window length); 0 for rules without a window
    at: datetime  # the time of the row that completed the hit
    count: int
    resource_id: int | None = None
    rows: list[tuple[str, int, datetime | None]] = field(default_factory=list)  # (kind, id, time)
    details: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.rule.id}|{self.group}|{self.window}"

    def document(self) -> dict:
        return {
            "rule": self.rule.id,
            "group": self.group,
            "window": self.window,
            "at": self.at.isoformat(),
            "count": self.count,
            "resourceId": self.resource_id,
            "title": self.rule.title,
            "severity": self.rule.severity,
            "rows": [[kind, row_id] for kind, row_id, _ in self.rows],
            **({"details": self.details} if self.details else {}),
        }


def _aware(value):
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value is not None and value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def _rows_of_hits(
    conn: Connection,
    tenant_id: int,
    spans: list[tuple[str, datetime, datetime]],
    table,
    time_column,
    group_column,
    conditions: list,
    order_by: list,
    limit: int,
    extra: tuple = (),
) -> list[list]:
    """The rows behind each hit, for all the hits of a rule evaluation in one statement.

    ``spans`` is each hit's (group, first time, last time); the answer is, per span in order,
    its rows (``id``, ``at`` and ``extra`` columns) of ``table`` matching ``conditions`` whose
    ``group_column`` is the group and whose time is in the span, the first ``limit`` by
    ``order_by``: the spans are a VALUES list joined to the table, numbered per span by a window
    function (PostgreSQL and SQLite alike; the VALUES list is a CTE, as SQLite names its columns only
    there), the table read once over the spans' whole range.
    """
    if not spans:
        return []
    hits = values(
        column("n", Integer), column("grp", String), column("low", UTCDateTime()),
        column("high", UTCDateTime()), name="hits",
    ).data([(n, grp, low, high) for n, (grp, low, high) in enumerate(spans)]).cte("hits")
    rank = func.row_number().over(partition_by=hits.c.n, order_by=order_by)
    ranked = (
        select(hits.c.n, table.c.id, time_column.label("at"), *extra, rank.label("rank"))
        .select_from(
            hits.join(
                table,
                and_(group_column == hits.c.grp, time_column >= hits.c.low, time_column <= hits.c.high),
            )
        )
        .where(
            table.c.tenant_id == tenant_id,
            *conditions,
            time_column >= min(low for _, low, _ in spans),
            time_column <= max(high for _, _, high in spans),
        )
        .subquery()
    )
    found: list[list] = [[] for _ in spans]
    query = select(ranked).where(ranked.c.rank <= limit).order_by(ranked.c.n, ranked.c.rank)
    for row in conn.execute(query):
        found[row.n].append(row)
    return found


# -- events ---------------------------------------------------------------------------------------


def _event_condition(table, condition: dict):
    column = table.c[condition["field"]]
    value, op = condition["value"], condition["op"]
    if condition["field"] in CASELESS_FIELDS:
        column = func.lower(column)
        value = [v.lower() for v in value] if op == "in" else value.lower()
    if op == "eq":
        return column == value
    if op == "ne":
        return or_(column != value, column.is_(None))
    if op == "in":
        return column.in_(value)
    return column.like(
        "%" + value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%", escape="\\"
    )


def _group_text(table, names) -> object:
    parts = [func.coalesce(cast(table.c[name], String), literal("")) for name in names]
    expression = parts[0]
    for part in parts[1:]:
        expression = expression + literal(":") + part
    return expression


def _window_counts(new, old, old_time, conditions_old, same_group, rule: Rule, tenant_id: int, keep: tuple):
    """Each new row with the number of ``old`` rows (``conditions_old``, ``same_group``) in the window
    ending at it, as a join, not a subquery per row: the old rows are read once, by the (tenant,
    kind, time) index over the span of the new rows' windows, and hash-joined to the new rows."""
    lowest = minus_minutes(select(func.min(new.c.occurred_at)).scalar_subquery(), rule.window_minutes)
    highest = select(func.max(new.c.occurred_at)).scalar_subquery()
    columns = [new.c[name] for name in keep]
    return (
        select(*columns, func.count(old.c.id).label("n"))
        .select_from(
            new.join(
                old,
                and_(
                    *same_group,
                    old_time >= minus_minutes(new.c.occurred_at, rule.window_minutes),
                    old_time <= new.c.occurred_at,
                ),
            )
        )
        .where(
            old.c.tenant_id == tenant_id,
            *conditions_old,
            old_time >= lowest,
            old_time <= highest,
        )
        .group_by(*columns)
        .having(func.count(old.c.id) >= rule.threshold)
        .subquery()
    )


def _grouped(counted, rule: Rule, extra: tuple = ()):
    win = bucket(counted.c.occurred_at, rule.window_minutes)
    return (
        select(
            counted.c.grp,
            win.label("win"),
            func.min(counted.c.occurred_at).label("at"),
            func.max(counted.c.n).label("n"),
            func.min(counted.c.resource_id).label("resource_id"),
            *extra,
        )
        .group_by(counted.c.grp, win)
        .order_by(win, counted.c.grp)
        .limit(MAX_HITS)
    )


# what a threshold rule counts per source: the row kind its links name, the time a row happened
# (an event's own time; the time a finding, resource or alert reached the gateway), and the rows
# that are never counted (merged-away resources; the alerts the rule raised itself)
ROW_KINDS = {"events": "event", "findings": "finding", "resources": "resource", "alerts": "alert"}
TIME_COLUMNS = {
    "events": "occurred_at", "findings": "created_at", "resources": "created_at", "alerts": "created_at",
}


def _countable(table, rule: Rule) -> list:
    if rule.source == "resources":
        return [table.c.merged_into.is_(None)]
    if rule.source == "alerts":
        return [or_(table.c.detection_rule.is_(None), table.c.detection_rule != rule.id)]
    return []


def _threshold(
    conn: Connection, rule: Rule, tenant_id: int, watermark: int, since: datetime | None
) -> list[Hit]:
    """Rows matching ``where``: a new row whose group has >= threshold of them in the window ending at it.

    Over events, findings, resources or alerts (``rule.source``); the fields were checked against
    the source's whitelist when the rule was parsed (gateway/detection/rules.py)."""
    table = SOURCE_TABLES[rule.source]
    old = table.alias("old")
    time, old_time = table.c[TIME_COLUMNS[rule.source]], old.c[TIME_COLUMNS[rule.source]]
    resource = table.c.id if rule.source == "resources" else table.c.resource_id
    new = (
        select(
            table.c.id,
            time.label("occurred_at"),
            resource.label("resource_id"),
            _group_text(table, rule.group_by).label("grp"),
        )
        .where(
            table.c.tenant_id == tenant_id,
            table.c.id > watermark,
            *[_event_condition(table, c) for c in rule.where],
            *_countable(table, rule),
            *([time >= since] if since else []),
        )
        .cte("new_rows")
    )
    conditions_old = [_event_condition(old, c) for c in rule.where] + _countable(old, rule)
    counted = _window_counts(
        new,
        old,
        old_time,
        conditions_old,
        [_group_text(old, rule.group_by) == new.c.grp],
        rule,
        tenant_id,
        ("id", "occurred_at", "resource_id", "grp"),
    )
    found = [(row, _aware(row.at)) for row in conn.execute(_grouped(counted, rule))]
    window = timedelta(minutes=rule.window_minutes)
    linked = _rows_of_hits(
        conn,
        tenant_id,
        [(row.grp, at - window, at) for row, at in found],
        old,
        old_time,
        _group_text(old, rule.group_by),
        conditions_old,
        [old_time, old.c.id],
        MAX_LINKS,
    )
    kind = ROW_KINDS[rule.source]
    return [
        Hit(
            rule,
            row.grp,
            int(row.win),
            at,
            int(row.n),
            row.resource_id,
            [(kind, r.id, _aware(r.at)) for r in rows],
        )
        for (row, at), rows in zip(found, linked, strict=True)
    ]


def _failed_then_success(
    conn: Connection, rule: Rule, tenant_id: int, watermark: int, since: datetime | None
) -> list[Hit]:
    """A new logon success whose source has >= threshold failed logons in the window before it."""
    failure = EV.alias("failure")
    new = (
        select(EV.c.id, EV.c.occurred_at, EV.c.resource_id, EV.c.user_name, EV.c.source_ip.label("grp"))
        .where(
            EV.c.tenant_id == tenant_id,
            EV.c.id > watermark,
            EV.c.kind == "logon_success",
            EV.c.source_ip.is_not(None),
            *([EV.c.occurred_at >= since] if since else []),
        )
        .cte("successes")
    )
    counted = _window_counts(
        new,
        failure,
        failure.c.occurred_at,
        [failure.c.kind == "logon_failure"],
        [failure.c.source_ip == new.c.grp],
        rule,
        tenant_id,
        ("id", "occurred_at", "resource_id", "user_name", "grp"),
    )
    query = _grouped(
        counted,
        rule,
        (func.min(counted.c.id).label("success_id"), func.min(counted.c.user_name).label("user")),
    )
    found = [(row, _aware(row.at)) for row in conn.execute(query)]
    window = timedelta(minutes=rule.window_minutes)
    linked = _rows_of_hits(
        conn,
        tenant_id,
        [(row.grp, at - window, at) for row, at in found],
        failure,
        failure.c.occurred_at,
        failure.c.source_ip,
        [failure.c.kind == "logon_failure"],
        [failure.c.occurred_at, failure.c.id],
        MAX_LINKS - 1,
    )
    return [
        Hit(
            rule,
            row.grp,
            int(row.win),
            at,
            int(row.n),
            row.resource_id,
            [("event", row.success_id, at)] + [("event", r.id, _aware(r.at)) for r in rows],
            {"sourceIp": row.grp, "user": row.user, "failedLogons": int(row.n)},
        )
        for (row, at), rows in zip(found, linked, strict=True)
    ]


# -- findings ---------------------------------------------------------------------------------------

_PRIVATE_V4 = (
    ["10.%", "127.%", "169.254.%", "192.168.%", "0.%"]
    + [f"172.{n}.%" for n in range(16, 32)]
    + [f"100.{n}.%" for n in range(64, 128)]
)
_PRIVATE_V6 = ["fc%", "fd%", "fe8%", "fe9%", "fea%", "feb%", "::%"]


def public_address(identifiers=RI):
    """An identifier row that is a public IP address: unscoped (``%`` marks a private scope) and not
    in a private, loopback, link-local or shared range."""
    value = identifiers.c.value
    return and_(
        identifiers.c.kind.in_(("ipv4", "ipv6")),
        ~value.contains("%", autoescape=True),
        *[~value.like(p) for p in _PRIVATE_V4 + _PRIVATE_V6],
    )


def _kev_exposure(
    conn: Connection, rule: Rule, tenant_id: int, watermark: int, since: datetime | None
) -> list[Hit]:
    """Open findings whose CVE is in the KEV catalogue, on a resource with a public IP, not raised yet.

    No watermark: a catalogue update makes old findings match.  The open KEV findings are read by
    the (tenant, cve) index each run; those already raised are skipped by their alert key.
    """
    group = cast(F.c.resource_id, String) + literal(":") + F.c.cve
    key = literal(f"{rule.id}|") + group + literal("|0")
    query = (
        select(
            F.c.id,
            F.c.resource_id,
            F.c.cve,
            F.c.first_seen,
            F.c.created_at,
            group.label("grp"),
            KEV.c.vulnerability_name,
            KEV.c.date_added,
        )
        .join(KEV, KEV.c.cve_id == F.c.cve)
        .where(
            F.c.tenant_id == tenant_id,
            F.c.state != "resolved",
            F.c.cve.is_not(None),
            select(RI.c.resource_id)
            .where(RI.c.tenant_id == tenant_id, RI.c.resource_id == F.c.resource_id, public_address())
            .exists(),
            ~select(A.c.id)
            .where(A.c.tenant_id == tenant_id, A.c.provider == PROVIDER, A.c.provider_id == key)
            .exists(),
            *([F.c.updated_at >= since] if since else []),
        )
        .order_by(F.c.id)
        .limit(MAX_HITS)
    )
    hits = []
    for row in conn.execute(query):
        at = _aware(row.first_seen or row.created_at)
        hits.append(
            Hit(
                rule,
                row.grp,
                0,
                at,
                1,
                row.resource_id,
                [("finding", row.id, at)],
                {"cve": row.cve, "kevName": row.vulnerability_name, "kevDateAdded": row.date_added},
            )
        )
    return hits


def _baseline_rise(
    conn: Connection, rule: Rule, tenant_id: int, watermark: int, since: datetime | None, now: datetime
) -> list[Hit]:
    """Per provider: new critical findings (sources it created) today vs the 14 previous days.

    Fires when today's count >= threshold and > mean + 3 x standard deviation of the 14 daily
    counts (population deviation; a day without any counts as 0).  SQL counts per (provider,
    day); Python compares the per-provider aggregates.
    """
    today = datetime.combine(now.date(), datetime.min.time(), tzinfo=UTC)
    start = today - timedelta(days=14)
    day = bucket(S.c.created_at, 1440)
    counts = conn.execute(
        select(S.c.provider, day.label("day"), func.count().label("n"))
        .where(
            S.c.tenant_id == tenant_id,
            S.c.severity == "critical",
            S.c.created_at >= start,
            S.c.created_at < now,
        )
        .group_by(S.c.provider, day)
    ).all()
    today_number = int((today - EPOCH).total_seconds() // 86400)
    history: dict[str, list[int]] = defaultdict(lambda: [0] * 15)
    for row in counts:
        index = today_number - int(row.day)
        if 0 <= index <= 14:
            history[row.provider][index] += int(row.n)
    risen = []
    for provider, days in sorted(history.items()):
        current, past = days[0], days[1:]
        mean = sum(past) / 14
        deviation = math.sqrt(max(0.0, sum(n * n for n in past) / 14 - mean * mean))
        if current >= rule.threshold and current > mean + 3 * deviation:
            risen.append((provider, current, mean, deviation))
    latest = now - timedelta(microseconds=1)  # created before now, as counted
    linked = _rows_of_hits(
        conn,
        tenant_id,
        [(provider, today, latest) for provider, *_ in risen],
        S,
        S.c.created_at,
        S.c.provider,
        [S.c.severity == "critical"],
        [S.c.id],
        MAX_LINKS,
        (S.c.finding_id,),
    )
    hits = []
    for (provider, current, mean, deviation), rows in zip(risen, linked, strict=True):
        hits.append(
            Hit(
                rule,
                provider,
                today_number,
                now,
                current,
                None,
                [("finding", r.finding_id, _aware(r.at)) for r in rows],
                {
                    "provider": provider,
                    "today": current,
                    "baselineMean": round(mean, 2),
                    "baselineStdDev": round(deviation, 2),
                    "limit": round(mean + 3 * deviation, 2),
                },
            )
        )
    return hits


# -- alerts -----------------------------------------------------------------------------------------


def _correlated_alerts(
    conn: Connection, rule: Rule, tenant_id: int, watermark: int, since: datetime | None
) -> list[Hit]:
    """A new alert whose type (category) is on >= threshold distinct resources in the window ending at it."""
    new, other = A.alias("new"), A.alias("other")
    new_time = func.coalesce(new.c.created_date_time, new.c.created_at)
    other_time = func.coalesce(other.c.created_date_time, other.c.created_at)
    not_ours = [or_(new.c.detection_rule.is_(None), new.c.detection_rule != rule.id)]
    resources = (
        select(func.count(func.distinct(other.c.resource_id)))
        .where(
            other.c.tenant_id == tenant_id,
            func.lower(other.c.category) == func.lower(new.c.category),
            other.c.resource_id.is_not(None),
            or_(other.c.detection_rule.is_(None), other.c.detection_rule != rule.id),
            other_time >= minus_minutes(new_time, rule.window_minutes),
            other_time <= new_time,
        )
        .scalar_subquery()
    )
    triggers = (
        select(
            new.c.id,
            new_time.label("at"),
            func.lower(new.c.category).label("grp"),
            bucket(new_time, rule.window_minutes).label("win"),
            resources.label("n"),
        )
        .where(
            new.c.tenant_id == tenant_id,
            new.c.id > watermark,
            new.c.category.is_not(None),
            new.c.resource_id.is_not(None),
            *not_ours,
            *([new.c.created_at >= since] if since else []),
        )
        .subquery()
    )
    grouped = (
        select(
            triggers.c.grp,
            triggers.c.win,
            func.min(triggers.c.at).label("at"),
            func.max(triggers.c.n).label("n"),
        )
        .where(triggers.c.n >= rule.threshold)
        .group_by(triggers.c.grp, triggers.c.win)
        .order_by(triggers.c.win, triggers.c.grp)
        .limit(MAX_HITS)
    )
    found = [(row, _aware(row.at)) for row in conn.execute(grouped)]
    window = timedelta(minutes=rule.window_minutes)
    linked = _rows_of_hits(
        conn,
        tenant_id,
        [(row.grp, at - window, at) for row, at in found],
        other,
        other_time,
        func.lower(other.c.category),
        [
            other.c.resource_id.is_not(None),
            or_(other.c.detection_rule.is_(None), other.c.detection_rule != rule.id),
        ],
        [other.c.id],
        MAX_LINKS,
        (other.c.resource_id,),
    )
    hits = []
    for (row, at), rows in zip(found, linked, strict=True):
        resource_ids = sorted({r.resource_id for r in rows})
        hits.append(
            Hit(
                rule,
                row.grp,
                int(row.win),
                at,
                int(row.n),
                None,
                [("alert", r.id, _aware(r.at)) for r in rows]
                + [("resource", rid, None) for rid in resource_ids],
                {"alertType": row.grp, "resources": resource_ids},
            )
        )
    return hits


LOGICS = {
    "threshold": _threshold,
    "failed_then_success": _failed_then_success,
    "kev_exposure": _kev_exposure,
    "correlated_alerts": _correlated_alerts,
}
SOURCE_TABLES = {"events": EV, "alerts": A, "findings": F, "resources": R}


def find(
    conn: Connection,
    rule: Rule,
    tenant_id: int,
    watermark: int = 0,
    *,
    now: datetime | None = None,
    since: datetime | None = None,
) -> list[Hit]:
    """The hits of ``rule`` over the tenant's rows after ``watermark`` (and from ``since``); raises none."""
    now = now or utcnow()
    if conn.dialect.name == "postgresql":
        # The plans of the window subqueries over 35 day partitions cost enough to be JIT-compiled,
        # which took 25 s of a 0.1 s query (bench/events_bench.py): no JIT for this transaction.
        conn.exec_driver_sql("SET LOCAL jit = off")
    if rule.logic == "baseline_rise":
        return _baseline_rise(conn, rule, tenant_id, watermark, since, now)
    return LOGICS[rule.logic](conn, rule, tenant_id, watermark, since)


def raise_alerts(conn: Connection, tenant_id: int, hits: list[Hit]) -> list[int]:
    """Raise each hit as an alert through the alert merge (once per key); link its rows; the alert ids."""
    if not hits:
        return []
    merger = AlertMerger(conn, tenant_id, PROVIDER, None, f"detection rule {hits[0].rule.id}")
    records = [
        AlertRecord(
            provider_id=hit.key,
            title=hit.rule.title,
            severity=hit.rule.severity,
            category=hit.rule.category,
            description=hit.rule.description or None,
            created=hit.at,
            last_modified=hit.at,
            provider_timestamp=hit.at,
            mitre_techniques=list(hit.rule.techniques),
            detection_source="customDetection",
            first_activity=min((t for _, _, t in hit.rows if t), default=hit.at),
            last_activity=hit.at,
            recommended_actions=[],
            extra={
                "detectionRule": hit.rule.id,
                "tactics": list(hit.rule.tactics),
                "group": hit.group,
                "count": hit.count,
                **hit.details,
            },
        )
        for hit in hits
    ]
    ids = merger.merge_chunk(records, [hit.resource_id for hit in hits])
    by_rule: dict[str, list[int]] = defaultdict(list)
    for hit, alert_id in zip(hits, ids, strict=True):
        by_rule[hit.rule.id].append(alert_id)
    for rule_id, alert_ids in by_rule.items():  # one statement per rule (a run raises one rule's hits)
        conn.execute(
            update(A)
            .where(A.c.id.in_(alert_ids), A.c.tenant_id == tenant_id, A.c.detection_rule.is_(None))
            .values(detection_rule=rule_id)
        )
    links = [
        {"alert_id": alert_id, "row_kind": kind, "row_id": row_id, "row_time": when}
        for hit, alert_id in zip(hits, ids, strict=True)
        for kind, row_id, when in hit.rows
    ]
    unique = list({(r["alert_id"], r["row_kind"], r["row_id"]): r for r in links}.values())
    if unique:
        insert_rows(
            conn,
            LINKS,
            unique,
            conflict=["alert_id", "row_kind", "row_id"],
            constants={"tenant_id": tenant_id},
        )
    return ids


def _watermark(conn: Connection, tenant_id: int, rule_id: str) -> int:
    statement = insert_for(conn, WM).values(tenant_id=tenant_id, rule_id=rule_id, watermark=0)
    conn.execute(statement.on_conflict_do_nothing(index_elements=["tenant_id", "rule_id"]))
    query = select(WM.c.watermark).where(WM.c.tenant_id == tenant_id, WM.c.rule_id == rule_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()  # one evaluation of a (tenant, rule) at a time
    return int(conn.execute(query).scalar_one())


def run_rule(conn: Connection, rule: Rule, tenant_id: int, now: datetime | None = None) -> int:
    """Evaluate one rule for one tenant in the caller's transaction: raise its hits, move its watermark."""
    now = now or utcnow()
    started = utcnow()
    watermark = _watermark(conn, tenant_id, rule.id)
    table = SOURCE_TABLES.get(rule.source)
    top = watermark
    if table is not None:
        top = (
            conn.execute(select(func.max(table.c.id)).where(table.c.tenant_id == tenant_id)).scalar()
            or watermark
        )
    hits = find(conn, rule, tenant_id, watermark, now=now)
    raise_alerts(conn, tenant_id, hits)
    open_batches = conn.execute(
        select(func.count())
        .select_from(B)
        .where(
            B.c.tenant_id == tenant_id,
            or_(B.c.status.in_(("processing", "receiving")), B.c.finished_at >= started),
        )
    ).scalar()
    new_mark = watermark if open_batches else max(top, watermark)
    conn.execute(
        update(WM)
        .where(WM.c.tenant_id == tenant_id, WM.c.rule_id == rule.id)
        .values(watermark=new_mark, last_run_at=now)
    )
    return len(hits)


def evaluate_tenant(engine, tenant_id: int, now: datetime | None = None) -> dict[str, int]:
    """Every enabled rule of a tenant, each in a transaction of its own; hits per rule."""
    with engine.connect() as conn:
        rules = for_tenant(conn, tenant_id)
    found = {}
    for rule in rules.values():
        if not rule.enabled:
            continue
        with engine.begin() as conn:
            found[rule.id] = run_rule(conn, rule, tenant_id, now)
    return found


def evaluate_all(engine, now: datetime | None = None) -> dict[int, dict[str, int]]:
    """The beat's run: every tenant's enabled rules."""
    T = Tenant.__table__
    with engine.connect() as conn:
        tenant_ids = conn.execute(select(T.c.id).order_by(T.c.id)).scalars().all()
    results = {}
    for tenant_id in tenant_ids:
        try:
            results[tenant_id] = evaluate_tenant(engine, tenant_id, now)
        except Exception:  # noqa: BLE001 - one tenant's failure never stops the others'
            log.exception("detection rules of tenant %s failed", tenant_id)
    raised = sum(sum(v.values()) for v in results.values())
    if raised:
        log.info("detection rules raised %d hits", raised)
    return results


__all__ = ["Hit", "PROVIDER", "evaluate_all", "evaluate_tenant", "find", "raise_alerts", "run_rule"]
