"""The posture collections as OData collections: ``policies`` (the tenant's security policy
entries) and ``exemptions``.  Their edits are in gateway/api/posture.py."""

from __future__ import annotations

from sqlalchemy import case, func, literal_column, select

from gateway.models import Epoch, Exemption, PolicySetting, RecommendationType
from gateway.odata import Field
from gateway.query import Collection, OrderField
from gateway.schemas import ExemptionOut, PolicyOut, fast_dumper

PS, EX, RT = PolicySetting.__table__, Exemption.__table__, RecommendationType.__table__
SEVERITIES = ("informational", "low", "medium", "high", "critical")
POLICY_SCOPES = ("recommendationType", "control", "provider")


# -- policies ---------------------------------------------------------------------------------------

_DUMP_POLICIES = fast_dumper(PolicyOut)
_DUMP_EXEMPTIONS = fast_dumper(ExemptionOut)


POLICIES = Collection(
    name="policies",
    base=lambda tenant_id: select(PS).where(PS.c.tenant_id == tenant_id),
    id_column=PS.c.id,
    fields={
        "id": Field(PS.c.id, "id"),
        "scope": Field(PS.c.scope, "enum", values=POLICY_SCOPES),
        "target": Field(PS.c.target),
        "enabled": Field(PS.c.enabled, "bool", nullable=True),
        "severity": Field(PS.c.severity, "enum", nullable=True, values=SEVERITIES),
        "control": Field(PS.c.control, nullable=True),
        "createdDateTime": Field(PS.c.created_at, "datetime"),
        "lastModifiedDateTime": Field(PS.c.updated_at, "datetime"),
        "lastModifiedBy": Field(PS.c.updated_by, nullable=True),
    },
    order_fields={
        "id": OrderField(PS.c.id, "int"),
        "target": OrderField(PS.c.target, "str"),
        "lastModifiedDateTime": OrderField(PS.c.updated_at, "datetime"),
    },
    default_order=(("id", False),),
    selectable=tuple(PolicyOut().fields),
    serialize=lambda conn, tenant_id, rows, selected: _DUMP_POLICIES([row._asdict() for row in rows]),
)

# -- exemptions -------------------------------------------------------------------------------------

_STATE = case((EX.c.expired_at.is_not(None), literal_column("'expired'")), else_=literal_column("'active'"))
_TYPE_KEY = (select(RT.c.key).where(RT.c.tenant_id == EX.c.tenant_id, RT.c.id == EX.c.type_id)
             .scalar_subquery())


EXEMPTIONS = Collection(
    name="exemptions",
    base=lambda tenant_id: select(EX, _TYPE_KEY.label("type_key")).where(EX.c.tenant_id == tenant_id),
    id_column=EX.c.id,
    fields={
        "id": Field(EX.c.id, "id"),
        "displayName": Field(EX.c.display_name),
        "description": Field(EX.c.description, nullable=True),
        "category": Field(EX.c.category, "enum", values=("mitigated", "waiver")),
        "recommendationType": Field(_TYPE_KEY, nullable=True),
        "resourceId": Field(EX.c.resource_id, "id", nullable=True),
        "resourceFilter": Field(EX.c.resource_filter, nullable=True),
        "expiresOn": Field(EX.c.expires_on, "datetime", nullable=True),
        "state": Field(_STATE, "enum", values=("active", "expired")),
        "createdDateTime": Field(EX.c.created_at, "datetime"),
        "createdBy": Field(EX.c.created_by, nullable=True),
    },
    order_fields={
        "id": OrderField(EX.c.id, "int"),
        "createdDateTime": OrderField(EX.c.created_at, "datetime"),
        "expiresOn": OrderField(func.coalesce(EX.c.expires_on, Epoch()), "datetime"),
    },
    default_order=(("id", False),),
    selectable=tuple(ExemptionOut().fields),
    serialize=lambda conn, tenant_id, rows, selected: _DUMP_EXEMPTIONS([row._asdict() for row in rows]),
)
