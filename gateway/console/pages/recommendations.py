"""Recommendations: grouped by type with their unhealthy resources and score impact (how much the
Secure Score rises when the type is fixed everywhere), a type's recommendations with drill-down
to resources, and the analyst's actions: exempt (category, reason, expiry) and assign an owner
and due date, through the posture and governance service functions the API calls."""

from __future__ import annotations

from flask import Blueprint, redirect, render_template, request, url_for
from marshmallow import ValidationError
from sqlalchemy import Float, and_, case, cast, func, literal_column, select

from connectors.model import SEVERITIES
from gateway.api.collections import COLLECTIONS
from gateway.api.governance import GovernanceAssignmentIn
from gateway.api.posture import ExemptionIn
from gateway.console.auth import login_required
from gateway.console.pages import table
from gateway.console.pages.common import actor, db, refused, tenant_id
from gateway.errors import APIError, BadRequest
from gateway.models import Recommendation, RecommendationType, SecureScoreControl, utcnow
from gateway.odata import Field
from gateway.posture import edits, governance
from gateway.posture.exemptions import CATEGORIES as EXEMPTION_CATEGORIES
from gateway.query import Collection, OrderField
from gateway.score import upkeep

blueprint = Blueprint("console_recommendations", __name__, url_prefix="/console/t/<tenant>/recommendations")
R, RT, SSC = Recommendation.__table__, RecommendationType.__table__, SecureScoreControl.__table__
STATUSES = ("Unhealthy", "Healthy", "NotApplicable")
NOTICES = {
    "exempted": "Exemption created: the recommendations it covers are Not applicable and the score "
    "is recounted.",
    "assigned": "Owner and due date assigned.",
}
GROUP_COLUMNS = (
    "recommendationType",
    "displayName",
    "severity",
    "control",
    "unhealthyResourceCount",
    "scoreImpact",
)


def _severity_rank(column):
    return case(
        *[
            (column == literal_column(f"'{name}'"), literal_column(str(rank)))
            for rank, name in enumerate(SEVERITIES)
        ],
        else_=literal_column("-1"),
    )


def groups(tenant: int) -> Collection:
    """The tenant's recommendation types that have Unhealthy recommendations, as a collection.

    A type's score impact is what fixing all of it adds to the score: in its control, each
    resource on which it is the only Unhealthy type turns healthy, worth ``max / (healthy +
    unhealthy)`` of the control (gateway/score/upkeep.py counts the same way).  Built per tenant,
    so each aggregate reads only that tenant's rows (the index on (tenant, type, resource, status)).
    """
    unhealthy = (
        select(R.c.type_id, func.count().label("unhealthy"))
        .where(R.c.tenant_id == tenant, R.c.status == "Unhealthy")
        .group_by(R.c.type_id)
        .subquery("u")
    )
    rt_inner = RT.alias("rt_inner")
    per_resource = (
        select(rt_inner.c.control, R.c.resource_id, func.count().label("n"))
        .join(rt_inner, and_(rt_inner.c.id == R.c.type_id, rt_inner.c.tenant_id == tenant))
        .where(R.c.tenant_id == tenant, R.c.status == "Unhealthy", rt_inner.c.control.is_not(None))
        .group_by(rt_inner.c.control, R.c.resource_id)
        .subquery("rc")
    )
    r_sole, rt_sole = R.alias("r_sole"), RT.alias("rt_sole")
    sole = (
        select(r_sole.c.type_id, func.count().label("sole"))
        .join(rt_sole, and_(rt_sole.c.id == r_sole.c.type_id, rt_sole.c.tenant_id == tenant))
        .join(
            per_resource,
            and_(
                per_resource.c.control == rt_sole.c.control,
                per_resource.c.resource_id == r_sole.c.resource_id,
                per_resource.c.n == 1,
            ),
        )
        .where(r_sole.c.tenant_id == tenant, r_sole.c.status == "Unhealthy")
        .group_by(r_sole.c.type_id)
        .subquery("s")
    )
    counted = SSC.c.healthy + SSC.c.unhealthy
    impact = func.coalesce(cast(SSC.c.max, Float) * sole.c.sole / func.nullif(counted, 0), 0.0)
    severity = func.coalesce(RT.c.severity_override, RT.c.severity)
    base = (
        select(
            RT.c.id,
            RT.c.key,
            RT.c.title,
            RT.c.control,
            RT.c.provider,
            severity.label("severity"),
            unhealthy.c.unhealthy,
            impact.label("impact"),
        )
        .select_from(
            RT.join(unhealthy, unhealthy.c.type_id == RT.c.id)
            .outerjoin(sole, sole.c.type_id == RT.c.id)
            .outerjoin(SSC, and_(SSC.c.tenant_id == tenant, SSC.c.control == RT.c.control))
        )
        .where(RT.c.tenant_id == tenant)
    )

    def serialize(conn, tenant_id, rows, selected) -> list[dict]:
        return [
            {
                "id": row.id,
                "recommendationType": row.key,
                "displayName": row.title,
                "severity": row.severity,
                "control": row.control,
                "provider": row.provider,
                "unhealthyResourceCount": int(row.unhealthy),
                "scoreImpact": round(float(row.impact or 0.0), 2),
            }
            for row in rows
        ]

    return Collection(
        name="recommendationGroups",
        base=lambda _tenant: base,
        id_column=RT.c.id,
        fields={
            "severity": Field(severity, "enum", values=SEVERITIES, rank=_severity_rank(severity)),
            "control": Field(RT.c.control, nullable=True),
            "provider": Field(RT.c.provider, nullable=True),
            "recommendationType": Field(RT.c.key),
        },
        order_fields={
            "scoreImpact": OrderField(impact, "float"),
            "unhealthyResourceCount": OrderField(unhealthy.c.unhealthy, "int"),
            "severity": OrderField(_severity_rank(severity), "int"),
            "recommendationType": OrderField(RT.c.key, "str"),
        },
        default_order=(("scoreImpact", True),),
        selectable=GROUP_COLUMNS,
        serialize=serialize,
    )


FILTERS = (
    table.Filter("severity", "Severity", table.equals("severity"), SEVERITIES),
    table.Filter("control", "Control", table.equals("control")),
    table.Filter("provider", "Provider", table.equals("provider")),
)
ORDERS = {
    "impact": "scoreImpact desc",
    "unhealthy": "unhealthyResourceCount desc",
    "severity": "severity desc",
    "type": "recommendationType",
}
TYPE_FILTERS = (table.Filter("status", "Status", table.equals("status"), STATUSES),)
TYPE_ORDERS = {"oldest": "id", "newest": "id desc", "severity": "severity desc"}


def score() -> dict:
    with db().engine.connect() as conn:
        return upkeep.tenant_score(conn, tenant_id())


@blueprint.get("")
@login_required(role="reader")
def index(tenant: str):
    """The tenant's Unhealthy recommendations grouped by type, by score impact first."""
    try:
        shown = table.page(
            groups(tenant_id()),
            tenant_id(),
            lambda **a: url_for(".index", tenant=tenant, **a),
            FILTERS,
            ORDERS,
            csv_endpoint_url=lambda **a: url_for(".export", tenant=tenant, **a),
        )
    except APIError as error:
        return refused(error)
    return render_template(
        "console/pages/recommendations.html",
        table=shown,
        filters=FILTERS,
        orders=ORDERS,
        score=score(),
        tenant=tenant,
        notice=NOTICES.get(request.args.get("notice", "")),
    )


@blueprint.get("/export.csv")
@login_required(role="reader")
def export(tenant: str):
    """The groups the table's filter matches, in its order, as CSV."""
    try:
        return table.csv_download(groups(tenant_id()), tenant_id(), FILTERS, ORDERS, "recommendation-types")
    except APIError as error:
        return refused(error)


def _type_row(type_id: int):
    with db().engine.connect() as conn:
        return conn.execute(select(RT).where(RT.c.tenant_id == tenant_id(), RT.c.id == type_id)).first()


@blueprint.get("/types/<int:type_id>")
@login_required(role="reader")
def show_type(tenant: str, type_id: int):
    """One type: its texts and its recommendations (Unhealthy first), each with its resource."""
    row = _type_row(type_id)
    if row is None:
        return refused(f"recommendation type '{type_id}' not found", 404)

    def here(**args) -> str:
        return url_for(".show_type", tenant=tenant, type_id=type_id, **args)

    try:
        shown = table.page(
            COLLECTIONS["recommendations"],
            tenant_id(),
            here,
            TYPE_FILTERS,
            TYPE_ORDERS,
            extra_filter=f"recommendationType eq {table.quoted(row.key)}",
            csv_endpoint_url=lambda **a: url_for(".export_type", tenant=tenant, type_id=type_id, **a),
        )
    except APIError as error:
        return refused(error)
    return render_template(
        "console/pages/recommendation_type.html",
        type=row,
        table=shown,
        filters=TYPE_FILTERS,
        orders=TYPE_ORDERS,
        score=score(),
        tenant=tenant,
        categories=EXEMPTION_CATEGORIES,
        notice=NOTICES.get(request.args.get("notice", "")),
    )


@blueprint.get("/types/<int:type_id>/export.csv")
@login_required(role="reader")
def export_type(tenant: str, type_id: int):
    """The type's recommendations the table shows, as CSV (the API's bulk export)."""
    row = _type_row(type_id)
    if row is None:
        return refused(f"recommendation type '{type_id}' not found", 404)
    try:
        return table.csv_download(
            COLLECTIONS["recommendations"],
            tenant_id(),
            TYPE_FILTERS,
            TYPE_ORDERS,
            "recommendations",
            extra_filter=f"recommendationType eq {table.quoted(row.key)}",
        )
    except APIError as error:
        return refused(error)


def _day(name: str, required: bool) -> str | None:
    """A form's date (``YYYY-MM-DD``) as the API's date-time text (midnight UTC)."""
    value = (request.form.get(name) or "").strip()
    if not value:
        if required:
            raise BadRequest(f"'{name}' is required", code="invalidBody")
        return None
    return value if "T" in value else f"{value}T00:00:00Z"


def _loaded(schema, data: dict) -> dict:
    try:
        return schema.load({name: value for name, value in data.items() if value is not None})
    except ValidationError as exc:
        raise BadRequest(
            "invalid fields: " + "; ".join(f"{k}: {v}" for k, v in exc.messages.items()), code="invalidBody"
        ) from None


def _back(tenant: str, type_id: int, notice: str):
    return redirect(url_for(".show_type", tenant=tenant, type_id=type_id, notice=notice), code=303)


@blueprint.post("/types/<int:type_id>/exempt")
@login_required(role="analyst")
def exempt(tenant: str, type_id: int):
    """Exempt the type everywhere, or on one resource (``resource_id``): the API's exemption, by this user."""
    row = _type_row(type_id)
    if row is None:
        return refused(f"recommendation type '{type_id}' not found", 404)
    try:
        reason = (request.form.get("reason") or "").strip()
        data = _loaded(
            ExemptionIn(),
            {
                "displayName": (request.form.get("name") or "").strip() or f"{row.title}"[:200],
                "description": reason or None,
                "category": request.form.get("category") or "",
                "recommendationType": row.key,
                "resourceId": (request.form.get("resource_id") or "").strip() or None,
                "expiresOn": _day("expires", required=False),
            },
        )
        if not reason:
            raise BadRequest(
                "'reason' is required: say why the risk is accepted or mitigated", code="invalidBody"
            )
        with db().engine.begin() as conn:
            edits.create_exemption(conn, tenant_id(), data, actor=actor())
    except APIError as error:
        return refused(error)
    return _back(tenant, type_id, "exempted")


@blueprint.post("/types/<int:type_id>/assign")
@login_required(role="analyst")
def assign(tenant: str, type_id: int):
    """Give one of the type's Unhealthy recommendations an owner and a due date (the API's assignment)."""
    row = _type_row(type_id)
    if row is None:
        return refused(f"recommendation type '{type_id}' not found", 404)
    try:
        data = _loaded(
            GovernanceAssignmentIn(),
            {
                "recommendationId": (request.form.get("recommendation_id") or "").strip(),
                "owner": (request.form.get("owner") or "").strip(),
                "remediationDueDate": _day("due", required=True),
            },
        )
        recommendation_id = int(data["recommendationId"])
        with db().engine.begin() as conn:
            known = conn.execute(
                select(R.c.id).where(
                    R.c.tenant_id == tenant_id(), R.c.id == recommendation_id, R.c.type_id == type_id
                )
            ).first()
            if known is None:
                raise BadRequest(f"the type has no recommendation '{recommendation_id}'", code="invalidBody")
            governance.assign(
                conn,
                tenant_id(),
                recommendation_id,
                {"owner": data["owner"], "due_date": data["remediationDueDate"]},
                actor=actor(),
                now=utcnow(),
            )
    except APIError as error:
        return refused(error)
    return _back(tenant, type_id, "assigned")
