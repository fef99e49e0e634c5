"""``securityEvents`` as an OData collection (gateway/query.py): typed columns, newest first."""

from __future__ import annotations

from sqlalchemy import select

from connectors.model import EVENT_KINDS
from gateway.models import SecurityEvent
from gateway.odata import Field
from gateway.query import Collection, OrderField

EV = SecurityEvent.__table__
OUTPUT = (
    "id",
    "occurredDateTime",
    "kind",
    "eventId",
    "outcome",
    "user",
    "target",
    "sourceIp",
    "remoteIp",
    "domain",
    "process",
    "hash",
    "resourceId",
    "provider",
    "batchId",
    "ingestedDateTime",
    "raw",
)


def _iso(value):
    return value.isoformat() if value is not None else None


def _serialize(conn, tenant_id: int, rows, selected) -> list[dict]:
    return [
        {
            "id": str(r.id),
            "occurredDateTime": _iso(r.occurred_at),
            "kind": r.kind,
            "eventId": r.event_id,
            "outcome": r.outcome,
            "user": r.user_name,
            "target": r.target,
            "sourceIp": r.source_ip,
            "remoteIp": r.remote_ip,
            "domain": r.domain,
            "process": r.process,
            "hash": r.hash,
            "resourceId": str(r.resource_id) if r.resource_id is not None else None,
            "provider": r.provider,
            "batchId": str(r.batch_id) if r.batch_id is not None else None,
            "ingestedDateTime": _iso(r.ingested_at),
            "raw": r.raw,
        }
        for r in rows
    ]


SECURITY_EVENTS = Collection(
    name="securityEvents",
    base=lambda tenant_id: select(EV).where(EV.c.tenant_id == tenant_id),
    id_column=EV.c.id,
    fields={
        "id": Field(EV.c.id, "id"),
        "occurredDateTime": Field(EV.c.occurred_at, "datetime"),
        "kind": Field(EV.c.kind, "enum", values=EVENT_KINDS),
        "eventId": Field(EV.c.event_id, "number", nullable=True),
        "outcome": Field(EV.c.outcome, nullable=True),
        "user": Field(EV.c.user_name, nullable=True),
        "target": Field(EV.c.target, nullable=True),
        "sourceIp": Field(EV.c.source_ip, nullable=True),
        "remoteIp": Field(EV.c.remote_ip, nullable=True),
        "domain": Field(EV.c.domain, nullable=True),
        "process": Field(EV.c.process, nullable=True),
        "hash": Field(EV.c.hash, nullable=True),
        "resourceId": Field(EV.c.resource_id, "id", nullable=True),
        "provider": Field(EV.c.provider),
        "batchId": Field(EV.c.batch_id, "id", nullable=True),
    },
    order_fields={
        "occurredDateTime": OrderField(EV.c.occurred_at, "datetime"),
        "id": OrderField(EV.c.id, "int"),
    },
    default_order=(("occurredDateTime", True),),
    selectable=OUTPUT,
    serialize=_serialize,
)
