"""The Secure Score collections as OData collections (Microsoft Graph's shapes):

* ``secureScores``: the tenant's score history (a row each time it changed), newest first;
* ``secureScoreControls``: the stored per-control rows (counts, score, percentage, weight);
* ``secureScoreControlProfiles``: the tenant's controls (built-in and custom) with their state.

Controls and profiles are keyed by the control id (a string).  Their edits and the scoped score
are in gateway/api/score.py.
"""

from __future__ import annotations

from sqlalchemy import Float, Integer, String, and_, case, cast, func, select, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from gateway.models import SecureScore, SecureScoreControl
from gateway.odata import Field, FilterContext, ListField
from gateway.posture import profiles
from gateway.query import Collection, OrderField
from gateway.schemas import SecureScoreControlOut, SecureScoreControlProfileOut, SecureScoreOut, fast_dumper

SS, SSC, CP = SecureScore.__table__, SecureScoreControl.__table__, profiles.CP


class _JsonMember(FunctionElement):
    """A member of a JSON object (as text): ``value ->> 'key'`` / ``json_extract(value, '$.key')``."""

    type = String()
    inherit_cache = True
    name = "json_member"

    def __init__(self, value, key: str) -> None:
        assert key.isalnum(), key  # the keys are this module's own constants
        self.key = key
        super().__init__(value)


@compiles(_JsonMember, "postgresql")
def _json_member_postgresql(element, compiler, **kw) -> str:
    (value,) = element.clauses.clauses
    return f"({compiler.process(value, **kw)} ->> '{element.key}')"


@compiles(_JsonMember)
def _json_member_default(element, compiler, **kw) -> str:
    (value,) = element.clauses.clauses
    return f"json_extract({compiler.process(value, **kw)}, '$.{element.key}')"


def _json_objects(column, members: dict[str, str]) -> ListField:
    """A JSON array column of objects as a list field: ``members`` names each member's type
    (``string``, ``number`` (a double) or ``integer``)."""

    def rows(context: FilterContext):
        function = func.jsonb_array_elements if context.dialect == "postgresql" else func.json_each
        return function(column).table_valued("value"), true()

    def fields(table) -> dict[str, Field]:
        out = {}
        for key, kind in members.items():
            member = _JsonMember(table.c.value, key)
            if kind == "number":
                out[key] = Field(cast(member, Float), "number", nullable=True)
            elif kind == "integer":
                out[key] = Field(cast(member, Integer), "number", nullable=True)
            else:
                out[key] = Field(member, nullable=True)
        return out

    return ListField(members=fields, rows=rows)


def _ensure(conn, tenant_id: int) -> None:
    profiles.ensure(conn, tenant_id)


# -- secureScores -----------------------------------------------------------------------------------

_DUMP_SCORES = fast_dumper(SecureScoreOut)

SECURE_SCORES = Collection(
    name="secureScores",
    base=lambda tenant_id: select(SS).where(SS.c.tenant_id == tenant_id),
    id_column=SS.c.id,
    fields={
        "id": Field(SS.c.id, "id"),
        "currentScore": Field(SS.c.current, "number"),
        "maxScore": Field(SS.c.max, "number"),
        "percentage": Field(SS.c.percentage, "number"),
        "createdDateTime": Field(SS.c.created_at, "datetime"),
        "controlScores": _json_objects(SS.c.control_scores, {
            "controlName": "string", "score": "number", "maxScore": "number",
            "healthyResourceCount": "integer", "unhealthyResourceCount": "integer"}),
    },
    order_fields={
        "id": OrderField(SS.c.id, "int"),
        "createdDateTime": OrderField(SS.c.created_at, "datetime"),
        "currentScore": OrderField(SS.c.current, "float"),
        "percentage": OrderField(SS.c.percentage, "float"),
    },
    default_order=(("id", True),),  # newest first
    selectable=tuple(SecureScoreOut().fields),
    serialize=lambda conn, tenant_id, rows, selected: _DUMP_SCORES([row._asdict() for row in rows]),
)

# -- secureScoreControls ----------------------------------------------------------------------------

_APPLIES = SSC.c.healthy + SSC.c.unhealthy > 0
_OTHERS = SSC.alias("ssc_applying")
_TOTAL_MAX = (select(func.sum(_OTHERS.c.max))
              .where(_OTHERS.c.tenant_id == SSC.c.tenant_id, _OTHERS.c.healthy + _OTHERS.c.unhealthy > 0)
              .scalar_subquery())
_PERCENTAGE = case((and_(_APPLIES, SSC.c.max > 0), SSC.c.current / SSC.c.max), else_=0.0)
# the control's share of the tenant's max score (the max of the controls that apply)
_WEIGHT = case((and_(_APPLIES, _TOTAL_MAX > 0), SSC.c.max / _TOTAL_MAX), else_=0.0)
_TITLE = func.coalesce(CP.c.title, SSC.c.control)
_STATE = func.coalesce(CP.c.state, "Default")
_DUMP_CONTROLS = fast_dumper(SecureScoreControlOut)


def _controls_base(tenant_id: int):
    return (select(SSC, SSC.c.control.label("id"), _TITLE.label("display_name"), CP.c.category,
                   _STATE.label("state"), _PERCENTAGE.label("percentage"), _WEIGHT.label("weight"))
            .select_from(SSC.outerjoin(CP, and_(CP.c.tenant_id == SSC.c.tenant_id,
                                                CP.c.control == SSC.c.control)))
            .where(SSC.c.tenant_id == tenant_id))


def _serialize_controls(conn, tenant_id, rows, selected) -> list[dict]:
    out = []
    for row in rows:
        data = row._asdict()
        data["percentage"] = round(data["percentage"] or 0.0, 4)
        data["weight"] = round(data["weight"] or 0.0, 4)
        out.append(data)
    return _DUMP_CONTROLS(out)


SECURE_SCORE_CONTROLS = Collection(
    name="secureScoreControls",
    base=_controls_base,
    id_column=SSC.c.control,
    fields={
        "id": Field(SSC.c.control),
        "displayName": Field(_TITLE),
        "controlCategory": Field(CP.c.category, nullable=True),
        "currentScore": Field(SSC.c.current, "number"),
        "maxScore": Field(SSC.c.max, "number"),
        "percentage": Field(_PERCENTAGE, "number"),
        "healthyResourceCount": Field(SSC.c.healthy, "number"),
        "unhealthyResourceCount": Field(SSC.c.unhealthy, "number"),
        "notApplicableResourceCount": Field(SSC.c.not_applicable, "number"),
        "weight": Field(_WEIGHT, "number"),
        "state": Field(_STATE, "enum", values=profiles.STATES),
        "updatedDateTime": Field(SSC.c.updated_at, "datetime"),
    },
    order_fields={
        "id": OrderField(SSC.c.control, "str"),
        "currentScore": OrderField(SSC.c.current, "float"),
        "maxScore": OrderField(SSC.c.max, "float"),
        "percentage": OrderField(_PERCENTAGE, "float"),
        "unhealthyResourceCount": OrderField(SSC.c.unhealthy, "int"),
        "updatedDateTime": OrderField(SSC.c.updated_at, "datetime"),
    },
    default_order=(("id", False),),
    selectable=tuple(SecureScoreControlOut().fields),
    serialize=_serialize_controls,
    prepare=_ensure,  # the built-in controls' titles
)

# -- secureScoreControlProfiles ---------------------------------------------------------------------

_DUMP_PROFILES = fast_dumper(SecureScoreControlProfileOut)


def _serialize_profiles(conn, tenant_id, rows, selected) -> list[dict]:
    """Graph's fields: ``remediation`` (the description), ``tier``, ``service`` and
    ``vendorInformation`` say whether the control is built in or the tenant's own."""
    out = []
    for row in rows:
        data = row._asdict()
        builtin = bool(data["builtin"])
        data.update(remediation=data["description"], deprecated=False, tier="Core" if builtin else "Custom",
                    service="SecureScore" if builtin else "Custom",
                    vendor_information={"provider": "SecureScore", "providerVersion": None,
                                        "subProvider": "builtIn" if builtin else "custom",
                                        "vendor": "partner-gateway"})
        out.append(data)
    return _DUMP_PROFILES(out)

SECURE_SCORE_CONTROL_PROFILES = Collection(
    name="secureScoreControlProfiles",
    base=lambda tenant_id: select(CP, CP.c.control.label("id")).where(CP.c.tenant_id == tenant_id),
    id_column=CP.c.control,
    fields={
        "id": Field(CP.c.control),
        "controlName": Field(CP.c.control),
        "title": Field(CP.c.title),
        "description": Field(CP.c.description, nullable=True),
        "controlCategory": Field(CP.c.category, nullable=True),
        "maxScore": Field(CP.c.max_score, "number"),
        "rank": Field(CP.c.rank, "number"),
        "builtIn": Field(CP.c.builtin, "bool"),
        "state": Field(CP.c.state, "enum", values=profiles.STATES),
        "lastModifiedDateTime": Field(CP.c.updated_at, "datetime"),
        "controlStateUpdates": _json_objects(CP.c.state_updates, {
            "state": "string", "comment": "string", "assignedTo": "string", "updatedBy": "string"}),
    },
    order_fields={
        "id": OrderField(CP.c.control, "str"),
        "rank": OrderField(CP.c.rank, "int"),
        "title": OrderField(CP.c.title, "str"),
        "maxScore": OrderField(CP.c.max_score, "float"),
        "lastModifiedDateTime": OrderField(CP.c.updated_at, "datetime"),
    },
    default_order=(("rank", False),),
    selectable=tuple(SecureScoreControlProfileOut().fields),
    serialize=_serialize_profiles,
    prepare=_ensure,  # the tenant's rows of the built-in controls
)

__all__ = ["SECURE_SCORES", "SECURE_SCORE_CONTROLS", "SECURE_SCORE_CONTROL_PROFILES"]
