"""Governance: an owner and a due date on a recommendation, by hand or by governance rules.

A **rule** (``governance_rules``) has a priority (lower numbers first, unique in the tenant),
condition sets (any set matches when all its conditions do; no sets: every recommendation), an
owner source (``Manually``: the value is the owner; ``ByTag``: the value names a resource tag
``<name>:<owner>`` or ``<name>=<owner>``, and a resource without it gives no owner) and a
remediation timeframe (``7.00:00:00``: the due date is the assignment's creation plus 7 days).
Conditions, on the recommendation:

==================  ================  ===============================================================
property            operators         matches when
==================  ================  ===============================================================
severity            Equals, In        its (effective) severity is one of the values
recommendationType  Equals, In        its type's key is one of the values
provider            Equals, In        its type's provider, or a provider reporting one of its findings,
                                      is one of the values
resourceFilter      Matches           its resource matches the OData ``$filter`` on resources
==================  ================  ===============================================================

An **assignment** (``governance_assignments``) is open until it is completed.  The rules work on
the merge (``after_merge``, in the merge's transaction, set-based: the rules are read once, each
rule is one query over the candidates that no earlier rule took, one INSERT of the assignments
and one of their events):

* a recommendation the merge made Unhealthy (new, or from Healthy or NotApplicable) that has no
  open assignment gets one from the first enabled rule, in priority order, that matches it; a
  rule never assigns recommendations that were Unhealthy before it (``apply`` does, on request);
* an open assignment is completed (``completed_at``, a ``completed`` event) when the merge finds
  its recommendation's findings fixed: its *actual* status turned Healthy.  An exemption or a
  disabled policy does not complete it: the assignment stays open, and it is not overdue while
  the recommendation is NotApplicable (it is again when the recommendation returns to Unhealthy).

**Overdue** is computed when read: an open assignment whose due date has passed, on a
recommendation that is Unhealthy (``overdue``).  ``isGracePeriod`` is kept and shown (in ASC a
grace period keeps an overdue recommendation from lowering the score; here the score does not
look at governance).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import and_, exists, false, literal, or_, select, true, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import ColumnElement

from gateway.errors import BadRequest, Conflict
from gateway.merge.sql import in_values, insert_rows
from gateway.models import (
    Finding,
    FindingSource,
    GovernanceAssignment,
    GovernanceRule,
    LifecycleEvent,
    Recommendation,
    RecommendationType,
    Resource,
    UTCDateTime,
    utcnow,
)
from gateway.posture import status as posture_status
from gateway.posture.exemptions import resource_query

log = logging.getLogger(__name__)
GR, GA = GovernanceRule.__table__, GovernanceAssignment.__table__
R, RT, RS = Recommendation.__table__, RecommendationType.__table__, Resource.__table__
F, S, EV = Finding.__table__, FindingSource.__table__, LifecycleEvent.__table__

RULE_TYPES = ("Integrated",)
SOURCE_RESOURCE_TYPES = ("Assessments",)
OWNER_SOURCES = ("Manually", "ByTag")
OPERATORS = {
    "severity": ("Equals", "In"),
    "recommendationType": ("Equals", "In"),
    "provider": ("Equals", "In"),
    "resourceFilter": ("Matches",),
}
PROPERTIES = tuple(OPERATORS)
MAX_TIMEFRAME_DAYS = 3650
CHUNK = 5000
RULE_SUBJECT, ASSIGNMENT_SUBJECT = "governanceRule", "governanceAssignment"


# -- remediation timeframe ----------------------------------------------------------------------

_TIMEFRAME = re.compile(r"^(?:(\d{1,4})\.)?(\d{1,2}):(\d{2}):(\d{2})$")


def parse_timeframe(text: str) -> int:
    """Seconds of a .NET TimeSpan as ASC writes it (``7.00:00:00``, ``12:00:00``); ValueError else."""
    found = _TIMEFRAME.match(text or "")
    if not found:
        raise ValueError("a duration such as '7.00:00:00' (days.hours:minutes:seconds)")
    days, hours, minutes, seconds = (int(part or 0) for part in found.groups())
    if hours > 23 or minutes > 59 or seconds > 59:
        raise ValueError("hours are 0-23, minutes and seconds 0-59")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if not 0 < total <= MAX_TIMEFRAME_DAYS * 86400:
        raise ValueError(f"more than 0 and at most {MAX_TIMEFRAME_DAYS} days")
    return total


def format_timeframe(seconds: int) -> str:
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{days}.{hours:02d}:{minutes:02d}:{seconds:02d}"


# -- overdue: evaluated when read -----------------------------------------------------------------


class SqlNow(ColumnElement):
    """The database's current time, comparable with stored datetimes on both stores (SQLite keeps
    them as ``YYYY-MM-DD HH:MM:SS.ffffff`` text in UTC, which compares as text)."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(SqlNow, "postgresql")
def _now_postgresql(element, compiler, **kw) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(SqlNow)
def _now_default(element, compiler, **kw) -> str:
    return "strftime('%Y-%m-%d %H:%M:%f', 'now')"


def overdue(assignments, recommendation_status) -> ColumnElement[bool]:
    """True when the row is an open assignment past its due date on an Unhealthy recommendation
    (never NULL: false when there is no assignment, e.g. an outer join that found none)."""
    return and_(
        assignments.c.id.is_not(None),
        assignments.c.completed_at.is_(None),
        assignments.c.due_date < SqlNow(),
        recommendation_status == "Unhealthy",
    )


def latest_join(assignments, recommendations=R) -> ColumnElement[bool]:
    """Join condition of a recommendation and its latest (current) assignment."""
    return and_(
        assignments.c.tenant_id == recommendations.c.tenant_id,
        assignments.c.recommendation_id == recommendations.c.id,
        assignments.c.latest,
    )


# -- rule conditions ----------------------------------------------------------------------------


def _values(condition: dict) -> list[str]:
    value = condition.get("value")
    return list(value) if isinstance(value, list) else [value]


def condition_sql(conn: Connection, tenant_id: int, condition: dict) -> ColumnElement[bool]:
    """One condition as SQL on ``recommendations`` joined with its type."""
    prop, values = condition["property"], _values(condition)
    if prop == "severity":
        return R.c.severity.in_(values)
    if prop == "recommendationType":
        return RT.c.key.in_(values)
    if prop == "provider":
        reported = (
            select(literal(1))
            .select_from(F.join(S, S.c.finding_id == F.c.id))
            .where(
                F.c.tenant_id == R.c.tenant_id,
                F.c.resource_id == R.c.resource_id,
                F.c.recommendation_type_id == R.c.type_id,
                S.c.tenant_id == R.c.tenant_id,
                S.c.provider.in_(values),
            )
        )
        return or_(RT.c.provider.in_(values), exists(reported))
    if prop == "resourceFilter":
        return R.c.resource_id.in_(resource_query(conn, tenant_id, values[0]))
    raise ValueError(f"unknown condition property {prop!r}")


def rule_sql(conn: Connection, tenant_id: int, condition_sets: list) -> ColumnElement[bool]:
    """A rule's conditions: any set, each set all its conditions; no sets match everything."""
    if not condition_sets:
        return true()
    sets = [
        and_(*[condition_sql(conn, tenant_id, c) for c in s.get("conditions") or ()])
        if s.get("conditions")
        else false()
        for s in condition_sets
    ]
    return or_(*sets)


def _joined():
    return R.join(RT, and_(RT.c.tenant_id == R.c.tenant_id, RT.c.id == R.c.type_id))


def open_exists() -> ColumnElement[bool]:
    """The recommendation (``recommendations`` row) has an open assignment."""
    return exists(
        select(literal(1)).where(
            GA.c.tenant_id == R.c.tenant_id,
            GA.c.recommendation_id == R.c.id,
            GA.c.latest,
            GA.c.completed_at.is_(None),
        )
    )


def enabled_rules(conn: Connection, tenant_id: int) -> list:
    return conn.execute(
        select(GR)
        .where(GR.c.tenant_id == tenant_id, GR.c.is_disabled.is_(False))
        .order_by(GR.c.rule_priority, GR.c.id)
    ).all()


# -- owners -------------------------------------------------------------------------------------


def owner_from_tags(tags, name: str) -> str | None:
    """The owner a resource's tags name under ``name`` (``name:owner`` or ``name=owner``; the name
    compares without case), else None."""
    wanted = name.casefold()
    for tag in tags or ():
        if not isinstance(tag, str):
            continue
        for separator in (":", "="):
            key, found, value = tag.partition(separator)
            if found and key.strip().casefold() == wanted and value.strip():
                return value.strip()[:320]
    return None


def _owners(conn: Connection, tenant_id: int, rule, matched: list[tuple[int, int]]) -> dict[int, str | None]:
    """recommendation id -> owner, for the rule's matches (recommendation id, resource id)."""
    if rule.owner_source_type != "ByTag":
        return {rid: rule.owner_source_value for rid, _ in matched}
    resource_ids = sorted({resource_id for _, resource_id in matched})
    tags: dict[int, list] = {}
    for start in range(0, len(resource_ids), CHUNK):
        part = resource_ids[start : start + CHUNK]
        tags.update(
            conn.execute(
                select(RS.c.id, RS.c.tags).where(RS.c.tenant_id == tenant_id, in_values(conn, RS.c.id, part))
            ).all()
        )
    return {
        rid: owner_from_tags(tags.get(resource_id), rule.owner_source_value) for rid, resource_id in matched
    }


# -- assigning and completing ---------------------------------------------------------------------


def _matches(conn: Connection, tenant_id: int, rule, where: list[ColumnElement]) -> list[tuple[int, int]]:
    try:
        condition = rule_sql(conn, tenant_id, rule.condition_sets or [])
    except BadRequest as exc:  # a stored resource filter the resources collection no longer accepts
        log.warning("governance rule %s of tenant %s skipped: %s", rule.id, tenant_id, exc.message)
        return []
    query = (
        select(R.c.id, R.c.resource_id)
        .select_from(_joined())
        .where(R.c.tenant_id == tenant_id, *where, condition)
        .order_by(R.c.id)
    )
    return [(row.id, row.resource_id) for row in conn.execute(query)]


def _event(
    tenant_id: int,
    assignment_id: int,
    event: str,
    now: datetime,
    cause: str,
    actor: str | None,
    details: dict,
    batch_id: int | None = None,
) -> dict:
    return {
        "tenant_id": tenant_id,
        "subject_type": ASSIGNMENT_SUBJECT,
        "subject_id": assignment_id,
        "event": event,
        "at": now,
        "cause": cause[:200],
        "actor": actor,
        "batch_id": batch_id,
        "details": details,
    }


def insert_assignments(
    conn: Connection,
    tenant_id: int,
    rows: list[dict],
    *,
    now: datetime,
    cause: str,
    actor: str | None,
    batch_id: int | None = None,
) -> list[int]:
    """Make ``rows`` (recommendation_id, rule_id, owner, due_date, is_grace_period, ...) the open,
    latest assignments of their recommendations (which have no open one), with a ``created`` event
    each; one UPDATE (per 5,000) of the previous latest ones, one INSERT, one INSERT of events."""
    if not rows:
        return []
    ids = sorted(row["recommendation_id"] for row in rows)
    for start in range(0, len(ids), CHUNK):
        conn.execute(
            update(GA)
            .where(
                GA.c.tenant_id == tenant_id,
                GA.c.latest,
                in_values(conn, GA.c.recommendation_id, ids[start : start + CHUNK]),
            )
            .values(latest=False)
        )
    full = [
        {
            "tenant_id": tenant_id,
            "rule_id": None,
            "owner": None,
            "is_grace_period": False,
            "remediation_eta": None,
            "eta_justification": None,
            "additional_data": {},
            "latest": True,
            "completed_at": None,
            "created_at": now,
            "created_by": actor,
            "updated_at": now,
            "updated_by": actor,
            **row,
        }
        for row in rows
    ]
    made = insert_rows(conn, GA, full, returning=("id", "recommendation_id"))
    by_rec = {row["recommendation_id"]: row for row in full}
    insert_rows(
        conn,
        EV,
        [
            _event(
                tenant_id,
                assignment_id,
                "created",
                now,
                cause,
                actor,
                {
                    "recommendationId": str(rid),
                    "ruleId": None if by_rec[rid]["rule_id"] is None else str(by_rec[rid]["rule_id"]),
                    "owner": by_rec[rid]["owner"],
                    "remediationDueDate": by_rec[rid]["due_date"].isoformat(),
                    "isGracePeriod": bool(by_rec[rid]["is_grace_period"]),
                },
                batch_id,
            )
            for assignment_id, rid in made
        ],
    )
    return sorted(assignment_id for assignment_id, _ in made)


def assign_by_rules(
    conn: Connection,
    tenant_id: int,
    rules: Sequence,
    *,
    candidates: Iterable[int] | None,
    now: datetime,
    cause: str,
    actor: str | None,
    batch_id: int | None = None,
    dry_run: bool = False,
) -> int:
    """Give the Unhealthy recommendations without an open assignment (among ``candidates``; all the
    tenant's when None) an assignment from the first of ``rules`` (in their order) that matches.
    Returns how many were (``dry_run``: would be) assigned."""
    eligible = [R.c.status == "Unhealthy", ~open_exists()]
    if candidates is None:
        pools: list[list[ColumnElement]] = [eligible]
    else:
        pending = sorted(set(candidates))
        pools = [
            eligible + [in_values(conn, R.c.id, pending[start : start + CHUNK])]
            for start in range(0, len(pending), CHUNK)
        ]
    rows: list[dict] = []
    for where in pools:
        taken: set[int] = set()
        for rule in rules:
            matched = [pair for pair in _matches(conn, tenant_id, rule, where) if pair[0] not in taken]
            if not matched:
                continue
            taken.update(rid for rid, _ in matched)
            if dry_run:
                rows.extend({"recommendation_id": rid} for rid, _ in matched)
                continue
            owners = _owners(conn, tenant_id, rule, matched)
            due = now + timedelta(seconds=rule.remediation_seconds)
            rows.extend(
                {
                    "recommendation_id": rid,
                    "rule_id": rule.id,
                    "owner": owners[rid],
                    "due_date": due,
                    "is_grace_period": bool(rule.is_grace_period),
                }
                for rid, _ in matched
            )
    if not dry_run:
        insert_assignments(conn, tenant_id, rows, now=now, cause=cause, actor=actor, batch_id=batch_id)
    return len(rows)


def complete(
    conn: Connection,
    tenant_id: int,
    recommendation_ids: Iterable[int],
    *,
    now: datetime,
    cause: str,
    actor: str | None,
    batch_id: int | None = None,
) -> int:
    """Complete the open assignments of these recommendations (their findings were fixed), with a
    ``completed`` event each: one UPDATE per 5,000 recommendations, one INSERT of events."""
    ids = sorted(set(recommendation_ids))
    done: list[tuple[int, int]] = []
    for start in range(0, len(ids), CHUNK):
        done.extend(
            conn.execute(
                update(GA)
                .where(
                    GA.c.tenant_id == tenant_id,
                    GA.c.latest,
                    GA.c.completed_at.is_(None),
                    in_values(conn, GA.c.recommendation_id, ids[start : start + CHUNK]),
                )
                .values(completed_at=now, updated_at=now)
                .returning(GA.c.id, GA.c.recommendation_id)
            ).all()
        )
    insert_rows(
        conn,
        EV,
        [
            _event(
                tenant_id,
                assignment_id,
                "completed",
                now,
                cause,
                actor,
                {"recommendationId": str(rid)},
                batch_id,
            )
            for assignment_id, rid in done
        ],
    )
    return len(done)


def after_merge(
    conn: Connection,
    tenant_id: int,
    transitions: Sequence[tuple[int, str | None, str]],
    actual_transitions: Sequence[tuple[int, str | None, str]],
    now: datetime,
    *,
    cause: str,
    actor: str | None,
    batch_id: int | None = None,
) -> None:
    """Governance after a merge recomputed recommendations: complete the open assignments of the
    recommendations whose findings were fixed (``actual_transitions`` to Healthy), then assign the
    recommendations that became Unhealthy (``transitions``) by the tenant's enabled rules."""
    healed = [rid for rid, before, after in actual_transitions if after == "Healthy" and before != "Healthy"]
    if healed:
        complete(conn, tenant_id, healed, now=now, cause=cause, actor=actor, batch_id=batch_id)
    became = [rid for rid, before, after in transitions if after == "Unhealthy" and before != "Unhealthy"]
    if not became:
        return
    rules = enabled_rules(conn, tenant_id)
    if rules:
        assign_by_rules(
            conn, tenant_id, rules, candidates=became, now=now, cause=cause, actor=actor, batch_id=batch_id
        )


def fold(conn: Connection, tenant_id: int, gone: int, kept: int, now: datetime | None = None) -> None:
    """Recommendation ``gone`` became ``kept`` (resources merged): its assignments move to ``kept``,
    which keeps one current assignment: an open one (its own first), else its own latest.  An open
    assignment of ``gone`` that does not become current is completed, with an event."""
    now = now or utcnow()

    def current(recommendation_id: int):
        return conn.execute(
            select(GA.c.id, GA.c.completed_at).where(
                GA.c.tenant_id == tenant_id, GA.c.recommendation_id == recommendation_id, GA.c.latest
            )
        ).first()

    theirs, ours = current(kept), current(gone)
    values: dict = {"recommendation_id": kept}
    if theirs is not None and ours is not None:
        if theirs.completed_at is not None and ours.completed_at is None:
            conn.execute(update(GA).where(GA.c.id == theirs.id).values(latest=False))  # the open one wins
        else:
            values["latest"] = False
            if ours.completed_at is None:
                conn.execute(update(GA).where(GA.c.id == ours.id).values(completed_at=now, updated_at=now))
                insert_rows(
                    conn,
                    EV,
                    [
                        _event(
                            tenant_id,
                            ours.id,
                            "completed",
                            now,
                            f"recommendation {gone} merged into {kept}",
                            None,
                            {"recommendationId": str(kept), "mergedInto": str(theirs.id)},
                        )
                    ],
                )
    conn.execute(
        update(GA).where(GA.c.tenant_id == tenant_id, GA.c.recommendation_id == gone).values(**values)
    )


def assign(conn: Connection, tenant_id: int, recommendation_id: int, values: dict, *, actor: str,
           now: datetime) -> int:
    """Give one Unhealthy recommendation of the tenant an open assignment by hand (``values``: owner,
    due_date and the other assignment columns); the API and the console both call it.  400 when
    the tenant has no such recommendation or it is not Unhealthy, 409 when it has an open one."""

    def invalid(message: str) -> BadRequest:
        return BadRequest(f"recommendationId: {message}", code="invalidBody",
                          details={"recommendationId": message})

    posture_status.lock_tenant(conn, tenant_id)
    rec = conn.execute(select(R.c.id, R.c.actual_status).where(
        R.c.tenant_id == tenant_id, R.c.id == recommendation_id)).first()
    if rec is None:
        raise invalid(f"the tenant has no recommendation '{recommendation_id}'")
    if rec.actual_status != "Unhealthy":
        raise invalid(f"recommendation '{recommendation_id}' is {rec.actual_status}: nothing to remediate")
    if conn.execute(select(GA.c.id).where(GA.c.tenant_id == tenant_id, GA.c.recommendation_id == rec.id,
                                          GA.c.latest, GA.c.completed_at.is_(None))).first():
        raise Conflict(f"recommendation '{recommendation_id}' already has an open governance assignment: "
                       "change it with PATCH")
    (assignment_id,) = insert_assignments(conn, tenant_id, [{"recommendation_id": rec.id, **values}], now=now,
                                          cause=f"assigned by {actor}", actor=actor)
    return assignment_id


__all__ = [
    "ASSIGNMENT_SUBJECT",
    "assign",
    "OPERATORS",
    "OWNER_SOURCES",
    "PROPERTIES",
    "RULE_SUBJECT",
    "RULE_TYPES",
    "SOURCE_RESOURCE_TYPES",
    "SqlNow",
    "after_merge",
    "assign_by_rules",
    "complete",
    "condition_sql",
    "enabled_rules",
    "fold",
    "format_timeframe",
    "insert_assignments",
    "latest_join",
    "open_exists",
    "overdue",
    "owner_from_tags",
    "parse_timeframe",
    "rule_sql",
]
