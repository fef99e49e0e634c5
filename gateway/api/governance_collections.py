"""Governance as OData collections: ``governanceRules`` and ``governanceAssignments`` (their edits
are in gateway/api/governance.py), and the ``governance`` of recommendations and findings.

A recommendation shows its current (``latest``) assignment: the open one, else the last one
completed; null when it never had one (or it was deleted).  Recommendations get it by an outer
join on the partial unique index of current assignments; findings, through their recommendation
(same resource and type), by one query per page, and filter on it with correlated subqueries.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

from sqlalchemy import and_, case, exists, literal, literal_column, select

from gateway.models import Finding, GovernanceAssignment, GovernanceRule, Recommendation, RecommendationType
from gateway.odata import Field
from gateway.posture import governance
from gateway.query import Collection, OrderField
from gateway.schemas import GovernanceAssignmentOut, GovernanceRuleOut, fast_dumper, recommendation_governance

GR, GA = GovernanceRule.__table__, GovernanceAssignment.__table__
R, RT, F = Recommendation.__table__, RecommendationType.__table__, Finding.__table__

# -- recommendations and findings -----------------------------------------------------------------

# the recommendations collection outer-joins this alias (its own, so that no other query's GA is it)
REC_GA = GA.alias("governance")
REC_JOIN = governance.latest_join(REC_GA, R)
REC_OVERDUE = governance.overdue(REC_GA, R.c.status)
REC_COLUMNS = (
    REC_GA.c.id.label("gov_id"),
    REC_GA.c.rule_id.label("gov_rule_id"),
    REC_GA.c.owner.label("gov_owner"),
    REC_GA.c.due_date.label("gov_due_date"),
    REC_GA.c.is_grace_period.label("gov_is_grace_period"),
    REC_OVERDUE.label("gov_overdue"),
    REC_GA.c.completed_at.label("gov_completed_at"),
)


def _fields(assignment, overdue) -> dict[str, Field]:
    return {
        "governance/assignmentId": Field(assignment.c.id, "id", nullable=True),
        "governance/ruleId": Field(assignment.c.rule_id, "id", nullable=True),
        "governance/owner": Field(assignment.c.owner, nullable=True),
        "governance/dueDate": Field(assignment.c.due_date, "datetime", nullable=True),
        "governance/isGracePeriod": Field(assignment.c.is_grace_period, "bool", nullable=True),
        # false without an assignment: "isOverdue eq false" is every recommendation not overdue
        "governance/isOverdue": Field(overdue, "bool"),
        "governance/completedDateTime": Field(assignment.c.completed_at, "datetime", nullable=True),
    }


RECOMMENDATION_FIELDS = _fields(REC_GA, REC_OVERDUE)


def _finding_subquery(column):
    """``column`` of the current assignment of the finding's recommendation (NULL when none)."""
    return (
        select(column)
        .select_from(R.join(GA, governance.latest_join(GA, R)))
        .where(
            R.c.tenant_id == F.c.tenant_id,
            R.c.resource_id == F.c.resource_id,
            R.c.type_id == F.c.recommendation_type_id,
        )
        .scalar_subquery()
    )


_FINDING_OVERDUE = exists(
    select(literal(1))
    .select_from(R.join(GA, governance.latest_join(GA, R)))
    .where(
        R.c.tenant_id == F.c.tenant_id,
        R.c.resource_id == F.c.resource_id,
        R.c.type_id == F.c.recommendation_type_id,
        governance.overdue(GA, R.c.status),
    )
)


# the assignment's columns as correlated subqueries from a finding, shaped like a table (``.c.<name>``)
_FINDING_GA = SimpleNamespace(
    c=SimpleNamespace(
        **{
            name: _finding_subquery(GA.c[name])
            for name in ("id", "rule_id", "owner", "due_date", "is_grace_period", "completed_at")
        }
    )
)
FINDING_FIELDS = _fields(_FINDING_GA, _FINDING_OVERDUE)


def add_to_findings(conn, tenant_id: int, findings: list[dict]) -> None:
    """Set ``governance`` on each finding (a page): its recommendation's current assignment, or
    None; one query for the page."""
    pairs = {(row["resource_id"], row["recommendation_type_id"]) for row in findings}
    found: dict[tuple[int, int], dict] = {}
    resource_ids = sorted({resource_id for resource_id, _ in pairs})
    if resource_ids:
        query = (
            select(R.c.resource_id, R.c.type_id, *_page_columns())
            .select_from(R.join(GA, governance.latest_join(GA, R)))
            .where(R.c.tenant_id == tenant_id, R.c.resource_id.in_(resource_ids))
        )
        wanted = defaultdict(set)
        for resource_id, type_id in pairs:
            wanted[resource_id].add(type_id)
        for row in conn.execute(query):
            if row.type_id in wanted[row.resource_id]:
                found[(row.resource_id, row.type_id)] = recommendation_governance(row._asdict())
    for row in findings:
        row["governance"] = found.get((row["resource_id"], row["recommendation_type_id"]))


def _page_columns():
    return (
        GA.c.id.label("gov_id"),
        GA.c.rule_id.label("gov_rule_id"),
        GA.c.owner.label("gov_owner"),
        GA.c.due_date.label("gov_due_date"),
        GA.c.is_grace_period.label("gov_is_grace_period"),
        governance.overdue(GA, R.c.status).label("gov_overdue"),
        GA.c.completed_at.label("gov_completed_at"),
    )


# -- governanceRules ------------------------------------------------------------------------------

_DUMP_RULES = fast_dumper(GovernanceRuleOut)
_DUMP_ASSIGNMENTS = fast_dumper(GovernanceAssignmentOut)

RULES = Collection(
    name="governanceRules",
    base=lambda tenant_id: select(GR).where(GR.c.tenant_id == tenant_id),
    id_column=GR.c.id,
    fields={
        "id": Field(GR.c.id, "id"),
        "displayName": Field(GR.c.display_name),
        "description": Field(GR.c.description, nullable=True),
        "rulePriority": Field(GR.c.rule_priority, "number"),
        "ruleType": Field(GR.c.rule_type, "enum", values=governance.RULE_TYPES),
        "sourceResourceType": Field(
            GR.c.source_resource_type, "enum", values=governance.SOURCE_RESOURCE_TYPES
        ),
        "ownerSource/type": Field(GR.c.owner_source_type, "enum", values=governance.OWNER_SOURCES),
        "ownerSource/value": Field(GR.c.owner_source_value),
        "isGracePeriod": Field(GR.c.is_grace_period, "bool"),
        "isDisabled": Field(GR.c.is_disabled, "bool"),
        "createdDateTime": Field(GR.c.created_at, "datetime"),
        "lastModifiedDateTime": Field(GR.c.updated_at, "datetime"),
        "lastModifiedBy": Field(GR.c.updated_by, nullable=True),
    },
    order_fields={
        "id": OrderField(GR.c.id, "int"),
        "rulePriority": OrderField(GR.c.rule_priority, "int"),
        "lastModifiedDateTime": OrderField(GR.c.updated_at, "datetime"),
    },
    default_order=(("rulePriority", False),),
    selectable=tuple(GovernanceRuleOut().fields),
    serialize=lambda conn, tenant_id, rows, selected: _DUMP_RULES([row._asdict() for row in rows]),
)

# -- governanceAssignments ------------------------------------------------------------------------

_OVERDUE = governance.overdue(GA, R.c.status)
_STATE = case((GA.c.completed_at.is_(None), literal_column("'open'")), else_=literal_column("'completed'"))


def _assignment_base(tenant_id: int):
    return (
        select(
            GA, R.c.resource_id.label("resource_id"), RT.c.key.label("type_key"), _OVERDUE.label("overdue")
        )
        .join(R, and_(R.c.tenant_id == GA.c.tenant_id, R.c.id == GA.c.recommendation_id))
        .join(RT, and_(RT.c.tenant_id == R.c.tenant_id, RT.c.id == R.c.type_id))
        .where(GA.c.tenant_id == tenant_id)
    )


ASSIGNMENTS = Collection(
    name="governanceAssignments",
    base=_assignment_base,
    id_column=GA.c.id,
    fields={
        "id": Field(GA.c.id, "id"),
        "recommendationId": Field(GA.c.recommendation_id, "id"),
        "resourceId": Field(R.c.resource_id, "id"),
        "recommendationType": Field(RT.c.key),
        "ruleId": Field(GA.c.rule_id, "id", nullable=True),
        "owner": Field(GA.c.owner, nullable=True),
        "remediationDueDate": Field(GA.c.due_date, "datetime"),
        "isGracePeriod": Field(GA.c.is_grace_period, "bool"),
        "isOverdue": Field(_OVERDUE, "bool"),
        "remediationEta/eta": Field(GA.c.remediation_eta, "datetime", nullable=True),
        "state": Field(_STATE, "enum", values=("open", "completed")),
        "completedDateTime": Field(GA.c.completed_at, "datetime", nullable=True),
        "createdDateTime": Field(GA.c.created_at, "datetime"),
        "createdBy": Field(GA.c.created_by, nullable=True),
    },
    order_fields={
        "id": OrderField(GA.c.id, "int"),
        "remediationDueDate": OrderField(GA.c.due_date, "datetime"),
        "createdDateTime": OrderField(GA.c.created_at, "datetime"),
    },
    default_order=(("id", False),),
    selectable=tuple(GovernanceAssignmentOut().fields),
    serialize=lambda conn, tenant_id, rows, selected: _DUMP_ASSIGNMENTS([row._asdict() for row in rows]),
)

__all__ = [
    "ASSIGNMENTS",
    "FINDING_FIELDS",
    "RECOMMENDATION_FIELDS",
    "REC_COLUMNS",
    "REC_GA",
    "REC_JOIN",
    "RULES",
    "add_to_findings",
]
