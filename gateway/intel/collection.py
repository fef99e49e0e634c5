"""``.../security/indicators``: the tenant's threat-intelligence indicators as an OData collection
(``$filter``, ``$orderby``, ``$top``, keyset paging, ``$count``, ``$select``, CSV).

``matchCount`` is how many alerts and resources the indicator matched (gateway/intel/matching.py).
"""

from __future__ import annotations

from sqlalchemy import func, select

from gateway.models import Indicator, IndicatorMatch
from gateway.odata import Field, ListField, json_element, json_elements
from gateway.query import Collection, OrderField
from gateway.schemas import IndicatorOut, fast_dumper

IND, M = Indicator.__table__, IndicatorMatch.__table__
OBSERVABLE_TYPES = ("ipv4", "ipv6", "domain", "url", "email", "md5", "sha1", "sha256", "sha512")
TLP_LEVELS = ("unknown", "white", "green", "amber", "red")
_MATCHES = select(func.count()).where(M.c.indicator_id == IND.c.id).correlate(IND).scalar_subquery()
_DUMP = fast_dumper(IndicatorOut)


def _text(column, nullable: bool = True) -> Field:
    return Field(column, nullable=nullable)


def _tags(column) -> ListField:
    return ListField(element=json_element, rows=json_elements(column))


INDICATORS = Collection(
    name="indicators",
    base=lambda tenant_id: select(IND, _MATCHES.label("match_count")).where(IND.c.tenant_id == tenant_id),
    id_column=IND.c.id,
    fields={
        "id": Field(IND.c.id, "id"),
        "source": _text(IND.c.source, nullable=False),
        "format": _text(IND.c.format, nullable=False),
        "externalId": _text(IND.c.external_id),
        "observableType": Field(IND.c.observable_type, "enum", values=OBSERVABLE_TYPES),
        "value": _text(IND.c.value, nullable=False),
        "description": _text(IND.c.description),
        "threatType": _text(IND.c.threat_type),
        "tlpLevel": Field(IND.c.tlp_level, "enum", values=TLP_LEVELS, nullable=True),
        "confidence": Field(IND.c.confidence, "number", nullable=True),
        "action": _text(IND.c.action),
        "targetProduct": _text(IND.c.target_product),
        "tags": _tags(IND.c.tags),
        "validFrom": Field(IND.c.valid_from, "datetime", nullable=True),
        "expirationDateTime": Field(IND.c.expires_at, "datetime", nullable=True),
        "lastReportedDateTime": Field(IND.c.provider_timestamp, "datetime"),
        "createdDateTime": Field(IND.c.created_at, "datetime"),
        "lastModifiedDateTime": Field(IND.c.updated_at, "datetime"),
    },
    order_fields={
        "id": OrderField(IND.c.id, "int"),
        "expirationDateTime": OrderField(func.coalesce(IND.c.expires_at, IND.c.created_at), "datetime"),
        "lastModifiedDateTime": OrderField(IND.c.updated_at, "datetime"),
        "createdDateTime": OrderField(IND.c.created_at, "datetime"),
        "confidence": OrderField(func.coalesce(IND.c.confidence, -1), "int"),
        "value": OrderField(IND.c.value, "str"),
    },
    default_order=(("id", False),),
    selectable=tuple(IndicatorOut().fields),
    serialize=lambda conn, tenant_id, rows, selected: _DUMP([row._asdict() for row in rows]),
)
