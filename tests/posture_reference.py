"""A plain-Python Secure Score, computed from the raw rows, for the reference and upkeep tests.

It reads what the merge and the edits store as *inputs* (findings and their state, the
recommendation rows that exist, the types' own fields, the policy entries, the exemptions with
their scopes and expiry) and derives everything else itself, the way the README says it must be:

* a recommendation's actual status: Unhealthy while any of its findings is not resolved, else
  Healthy; its actual severity: the worst of its open findings', else its type's;
* its type's policy: the type's own entry, else its control's, else its provider's, else enabled;
  its control: the entry's re-mapping, else ``gateway.score.controls.resolve`` of the type;
* exempt when an exemption that has not expired at ``clock`` holds it in its scope (type, resource,
  resource filter: a Python predicate on the resource row for each filter text the test uses); the
  oldest such exemption is the one it names;
* effective status: NotApplicable (DisabledByPolicy) when disabled, NotApplicable (Exempt) when
  exempt, else the actual one; severity: the override, else the actual one;
* per control, a resource counts once: unhealthy if any of its recommendations of the control is
  Unhealthy, healthy if some is Healthy and none Unhealthy, else neither; ``current = max * h / (h + u)``.

Nothing of the stored effective status, the types' policy columns or ``secure_score_controls`` is
read: a bug in any of them makes the stored rows differ from this.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.engine import Connection

from gateway.models import (
    Exemption,
    Finding,
    PolicySetting,
    Recommendation,
    RecommendationType,
    Resource,
    SecureScore,
    SecureScoreControl,
    Tenant,
)
from gateway.score import controls
from gateway.score.upkeep import recount

SEVERITIES = ("informational", "low", "medium", "high", "critical")
F, R, RT, RS = Finding.__table__, Recommendation.__table__, RecommendationType.__table__, Resource.__table__
PS, EX, SSC, SS = (
    PolicySetting.__table__,
    Exemption.__table__,
    SecureScoreControl.__table__,
    SecureScore.__table__,
)


@dataclass
class Score:
    recs: dict[int, tuple]  # recommendation id -> (status, cause, severity, exemption id)
    controls: dict[str, tuple]  # control -> (healthy, unhealthy, not applicable, current, max)
    total: tuple | None  # (current, max, percentage) of the tenant, None when nothing applies


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def tenant_pk(conn: Connection, external_id: str) -> int:
    return conn.execute(select(Tenant.id).where(Tenant.external_id == external_id)).scalar_one()


def reference(
    conn: Connection, tenant_id: int, clock: datetime, filters: dict[str, Callable] | None = None
) -> Score:
    filters = filters or {}
    resources = {row.id: row for row in conn.execute(select(RS).where(RS.c.tenant_id == tenant_id))}
    types = {row.id: row for row in conn.execute(select(RT).where(RT.c.tenant_id == tenant_id))}
    entries = {
        (row.scope, row.target): row for row in conn.execute(select(PS).where(PS.c.tenant_id == tenant_id))
    }
    exemptions = [
        row
        for row in conn.execute(select(EX).where(EX.c.tenant_id == tenant_id).order_by(EX.c.id))
        if row.expires_on is None or _aware(row.expires_on) > clock
    ]
    open_findings: dict[tuple[int, int], list[str]] = defaultdict(list)
    for resource_id, type_id, state, severity in conn.execute(
        select(F.c.resource_id, F.c.recommendation_type_id, F.c.state, F.c.severity).where(
            F.c.tenant_id == tenant_id
        )
    ):
        if state != "resolved":
            open_findings[(resource_id, type_id)].append(severity)

    def policy_of(kind) -> tuple[bool, str | None, str]:
        own = entries.get(("recommendationType", kind.key))
        control = (
            own.control
            if own is not None and own.control
            else controls.resolve(
                {
                    "key": kind.key,
                    "title": kind.title,
                    "kind": kind.kind,
                    "categories": kind.categories,
                    "provider": kind.provider,
                }
            )
        )
        enabled = None
        for entry in (own, entries.get(("control", control)), entries.get(("provider", kind.provider or ""))):
            if entry is not None and entry.enabled is not None:
                enabled = entry.enabled
                break
        return enabled is not False, (own.severity if own is not None else None), control

    policies = {type_id: policy_of(kind) for type_id, kind in types.items()}

    def holds(exemption, rec) -> bool:
        if exemption.type_id is not None and exemption.type_id != rec.type_id:
            return False
        if exemption.resource_id is not None and exemption.resource_id != rec.resource_id:
            return False
        if exemption.resource_filter is not None:
            resource = resources[rec.resource_id]
            return resource.merged_into is None and filters[exemption.resource_filter](resource)
        return True

    recs, by_control = {}, defaultdict(lambda: defaultdict(set))
    for rec in conn.execute(select(R.c.id, R.c.resource_id, R.c.type_id).where(R.c.tenant_id == tenant_id)):
        found = open_findings.get((rec.resource_id, rec.type_id), [])
        actual = "Unhealthy" if found else "Healthy"
        actual_severity = max(found, key=SEVERITIES.index) if found else types[rec.type_id].severity
        enabled, override, control = policies[rec.type_id]
        holder = next((e.id for e in exemptions if holds(e, rec)), None)
        if not enabled:
            status, cause = "NotApplicable", "DisabledByPolicy"
        elif holder is not None:
            status, cause = "NotApplicable", "Exempt"
        else:
            status, cause = actual, None
        recs[rec.id] = (status, cause, override or actual_severity, holder)
        by_control[control][rec.resource_id].add(status)

    rows = {}
    for control, by_resource in by_control.items():
        bad = sum(1 for s in by_resource.values() if "Unhealthy" in s)
        good = sum(1 for s in by_resource.values() if "Unhealthy" not in s and "Healthy" in s)
        top = float(controls.BY_ID[control].max_score)
        current = round(top * good / (good + bad), 4) if good + bad else 0.0
        rows[control] = (good, bad, len(by_resource) - good - bad, current, top)
    applying = [row for row in rows.values() if row[0] + row[1]]
    total = None
    if applying:
        current, top = round(sum(r[3] for r in applying), 4), sum(r[4] for r in applying)
        total = (current, top, round(current / top, 4) if top else 0.0)
    return Score(recs, rows, total)


def stored(conn: Connection, tenant_id: int) -> Score:
    recs = {
        row.id: (row.status, row.status_cause, row.severity, row.exemption_id)
        for row in conn.execute(
            select(R.c.id, R.c.status, R.c.status_cause, R.c.severity, R.c.exemption_id).where(
                R.c.tenant_id == tenant_id
            )
        )
    }
    rows = {
        row.control: (row.healthy, row.unhealthy, row.not_applicable, row.current, row.max)
        for row in conn.execute(select(SSC).where(SSC.c.tenant_id == tenant_id))
    }
    last = conn.execute(
        select(SS.c.current, SS.c.max, SS.c.percentage)
        .where(SS.c.tenant_id == tenant_id)
        .order_by(SS.c.id.desc())
        .limit(1)
    ).first()
    return Score(recs, rows, None if last is None else tuple(last))


def _counted(rows: dict[str, tuple]) -> dict[str, tuple]:
    """The controls that have resources (a stored control left empty, e.g. after a re-mapping,
    reads as zeros)."""
    return {control: row for control, row in rows.items() if row[0] + row[1] + row[2]}


def assert_matches(
    conn: Connection, tenant_id: int, clock: datetime, filters: dict | None = None, context: object = ""
) -> None:
    """The stored recommendations, control rows and newest score history row equal the reference."""
    want, have = reference(conn, tenant_id, clock, filters), stored(conn, tenant_id)
    wrong = {
        rid: (have.recs.get(rid), want.recs[rid]) for rid in want.recs if have.recs.get(rid) != want.recs[rid]
    }
    assert not wrong, f"{context}: recommendations (stored, reference): {wrong}"
    assert _counted(have.controls) == _counted(want.controls), (context, have.controls, want.controls)
    assert all(row[:4] == (0, 0, 0, 0.0) for c, row in have.controls.items() if c not in want.controls), (
        context,
        have.controls,
    )
    if want.total is None:  # nothing applies: no history yet, or a last row of nothing
        assert have.total is None or have.total[1] == 0, (context, have.total)
    else:
        assert have.total == want.total, (context, have.total, want.total)


def assert_recount_agrees(conn: Connection, tenant_id: int, context: object = "") -> None:
    """``recount`` of every control, in a transaction rolled back, changes no stored control row."""

    def rows():
        return {
            row.control: (row.healthy, row.unhealthy, row.not_applicable, row.current, row.max)
            for row in conn.execute(select(SSC).where(SSC.c.tenant_id == tenant_id))
        }

    with conn.begin() as transaction:
        before = rows()
        recount(conn, tenant_id)
        after = rows()
        transaction.rollback()
    assert _counted(before) == _counted(after), (context, before, after)
    assert set(after) <= set(before) | set(_counted(after)), (context, before, after)


def check(
    db, tenant: str, clock: datetime | None = None, filters: dict | None = None, context: object = ""
) -> None:
    """Both checks, on a connection of their own."""
    with db.engine.connect() as conn:
        tenant_id = tenant_pk(conn, tenant)
        conn.rollback()
        assert_recount_agrees(conn, tenant_id, context)
        assert_matches(conn, tenant_id, clock or datetime.now(UTC), filters, context)
