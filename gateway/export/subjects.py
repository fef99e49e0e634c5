"""An event's subject as the read API shows it, and a destination's ``$filter`` on subjects.

Rendering happens at delivery time, for a batch of events at once: one query per subject type
(``id IN`` the batch's subjects, scoped to the tenant) through the collection's own query and
serializer (gateway/api/collections.py, alerts_v2 for alerts), so ``data`` is exactly what
``GET .../security/<collection>/{id}`` answers at that moment.  A subject that no longer exists
(a finding merged into another, a deleted policy) renders as ``null``.  Batches render as
``GET .../batches/{id}`` and Secure Score changes as an item of ``.../secureScores``.

A destination's ``$filter`` is OData on the subject, parsed with the subject collection's field
allow-list (gateway/odata.py), evaluated in SQL for the batch's candidate subject ids.  Only
events whose subject has a collection in which the filter is valid can match it: a destination
with ``severity ge 'high'`` gets findings, alerts and recommendations of those severities, and no
``batch.finished`` or ``secureScore.changed`` event (give those a destination without a filter).
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.engine import Connection

from gateway.errors import BadRequest
from gateway.models import Batch
from gateway.odata import FilterContext, parse_filter

# subject type -> the collection (gateway.api.collections.COLLECTIONS) that shows it
COLLECTION_OF = {
    "finding": "findings",
    "recommendation": "recommendations",
    "alert": "alerts_v2",
    "resource": "resources",
    "policy": "policies",
    "exemption": "exemptions",
}
B = Batch.__table__


def _collections():
    from gateway.api.collections import COLLECTIONS

    return COLLECTIONS


def subjects_for(patterns: Iterable[str]) -> list[str]:
    """The subject types with a collection that event-type patterns (``*``, ``finding.*``, ``*.created``,
    ``alert.updated``) can match."""
    patterns = list(patterns)
    return [
        subject
        for subject in COLLECTION_OF
        if any(pattern == "*" or pattern.partition(".")[0] in ("*", subject) for pattern in patterns)
    ]


def check_filter(text: str, patterns: list[str], dialect: str) -> list[str]:
    """The subject types ``text`` applies to; 400 when it is valid for none of them."""
    first_error: BadRequest | None = None
    valid = []
    for subject in subjects_for(patterns):
        try:
            parse_filter(
                text,
                _collections()[COLLECTION_OF[subject]].fields,
                FilterContext(tenant_id=0, dialect=dialect),
            )
        except BadRequest as exc:
            first_error = first_error or exc
            continue
        valid.append(subject)
    if not valid:
        if first_error is not None:
            raise BadRequest(
                f"'filter' fits no subject of the event types: {first_error.message}", code="invalidFilter"
            )
        raise BadRequest(
            "'filter' applies to subjects with a collection (findings, alerts, recommendations, "
            "resources, policies, exemptions), and the event types name none",
            code="invalidFilter",
        )
    return valid


def matching(conn: Connection, tenant_id: int, subject_type: str, ids: list[int], text: str) -> set[int]:
    """Of ``ids`` (subjects of one type), those the filter matches now; none when it cannot apply."""
    name = COLLECTION_OF.get(subject_type)
    if name is None or not ids:
        return set()
    collection = _collections()[name]
    try:
        condition = parse_filter(
            text, collection.fields, FilterContext(tenant_id=tenant_id, dialect=conn.dialect.name)
        ).condition
    except BadRequest:
        return set()
    query = (
        collection.base(tenant_id)
        .with_only_columns(collection.id_column)
        .where(collection.id_column.in_(sorted(set(ids))), condition)
    )
    return set(conn.execute(query).scalars())


def render(conn: Connection, tenant_id: int, wanted: dict[str, set[int]]) -> dict[tuple[str, int], dict]:
    """(subject type, id) -> the subject as the read API shows it, for every one that exists."""
    out: dict[tuple[str, int], dict] = {}
    for subject_type, ids in wanted.items():
        ids = sorted(ids)
        if not ids:
            continue
        if subject_type in COLLECTION_OF:
            collection = _collections()[COLLECTION_OF[subject_type]]
            rows = conn.execute(collection.base(tenant_id).where(collection.id_column.in_(ids))).all()
            for item in collection.serialize(conn, tenant_id, rows, None):
                out[(subject_type, int(item["id"]))] = item
        elif subject_type == "batch":
            from gateway.schemas import BatchOut

            for row in conn.execute(select(B).where(B.c.tenant_id == tenant_id, B.c.id.in_(ids))):
                out[("batch", row.id)] = BatchOut().dump(row._asdict())
        elif subject_type == "secureScore":  # as an item of .../secureScores shows it (same serializer)
            collection = _collections()["secureScores"]
            rows = conn.execute(collection.base(tenant_id).where(collection.id_column.in_(ids))).all()
            for item in collection.serialize(conn, tenant_id, rows, None):
                out[("secureScore", int(item["id"]))] = item
    return out
