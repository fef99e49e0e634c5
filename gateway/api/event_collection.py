"""``.../security/events``: the tenant's outbox as a read-only OData collection (a client can pull
instead of, or besides, having events pushed to a destination).

Each item is an event as a destination receives it, without ``tenant`` and ``data`` (fetch the
subject from its collection).  To follow the outbox without missing an event, page in commit
order: ``$filter=sequence gt N&$orderby=sequence`` with ``N`` the last ``sequence`` seen (ids are
given at insert, not at commit: ``id gt N`` can miss an event committed later with a smaller id;
gateway/export/events.py).  Events get their ``sequence`` a few seconds after they are committed
(until then it is ``null``).
"""

from __future__ import annotations

from sqlalchemy import func, select

from gateway.export.delivery import present
from gateway.export.events import type_expression
from gateway.models import LifecycleEvent
from gateway.odata import Field
from gateway.query import Collection, OrderField
from gateway.schemas import StoreEventOut

EV = LifecycleEvent.__table__
TYPE = type_expression(EV)

EVENTS = Collection(
    name="events",
    base=lambda tenant_id: select(EV).where(EV.c.tenant_id == tenant_id),
    id_column=EV.c.id,
    fields={
        "id": Field(EV.c.id, "id"),
        "sequence": Field(EV.c.seq, "number", nullable=True),
        "type": Field(TYPE),
        "timestamp": Field(EV.c.at, "datetime"),
        "subjectType": Field(EV.c.subject_type),
        "subjectId": Field(EV.c.subject_id, "id"),
        "event": Field(EV.c.event),
        "cause": Field(EV.c.cause),
        "actor": Field(EV.c.actor, nullable=True),
        "batchId": Field(EV.c.batch_id, "id", nullable=True),
    },
    order_fields={
        "id": OrderField(EV.c.id, "int"),
        "sequence": OrderField(func.coalesce(EV.c.seq, 0), "int"),
        "timestamp": OrderField(EV.c.at, "datetime"),
    },
    default_order=(("id", False),),
    selectable=tuple(StoreEventOut().fields),
    serialize=lambda conn, tenant_id, rows, selected: [present(row) for row in rows],
)
