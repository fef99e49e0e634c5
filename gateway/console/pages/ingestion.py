"""Ingestion: the tenant's batches with status, counts and rejected records with their reasons,
and a live view of a merging batch (its progress in records, polled from a small JSON endpoint).

The batches table and a batch's rejections are collections of the query layer (keyset paged,
tenant first), declared here: the API's batch listing pages them by hand (gateway/api/batches.py).
"""

from __future__ import annotations

from flask import Blueprint, jsonify, render_template, url_for
from sqlalchemy import select

from gateway.api.batches import BATCH_STATUSES
from gateway.console.auth import login_required
from gateway.console.pages import table
from gateway.console.pages.common import db, refused, tenant_id
from gateway.errors import APIError, NotFound
from gateway.models import Batch, BatchRejection
from gateway.odata import Field
from gateway.query import Collection, OrderField
from gateway.schemas import BatchOut

blueprint = Blueprint("console_ingestion", __name__, url_prefix="/console/t/<tenant>/ingestion")
B, BR = Batch.__table__, BatchRejection.__table__
_DUMP = BatchOut(
    many=True,
    only=(
        "id",
        "status",
        "format",
        "provider",
        "scanType",
        "bodySize",
        "counts",
        "progress",
        "error",
        "receivedAt",
        "startedAt",
        "finishedAt",
    ),
).dump
BATCH_COLUMNS = (
    "id",
    "status",
    "format",
    "provider",
    "scanType",
    "bodySize",
    "counts",
    "progress",
    "error",
    "receivedAt",
    "startedAt",
    "finishedAt",
)

BATCHES = Collection(
    name="batches",
    base=lambda tenant: select(
        *[column for column in B.c if column.name not in ("rejections", "stale_details")]
    ).where(B.c.tenant_id == tenant),
    id_column=B.c.id,
    fields={
        "status": Field(B.c.status, "enum", values=BATCH_STATUSES),
        "format": Field(B.c.format),
        "provider": Field(B.c.provider),
        "receivedAt": Field(B.c.received_at, "datetime"),
    },
    order_fields={"id": OrderField(B.c.id, "int"), "receivedAt": OrderField(B.c.received_at, "datetime")},
    default_order=(("receivedAt", True),),
    selectable=BATCH_COLUMNS,
    serialize=lambda conn, tenant, rows, selected: [
        {name: item.get(name) for name in BATCH_COLUMNS} for item in _DUMP([row._asdict() for row in rows])
    ],
)


def rejections(batch_id: int) -> Collection:
    """A batch's rejected records in order (the tenant's condition first, then the batch)."""
    return Collection(
        name=f"batchRejections:{batch_id}",
        base=lambda tenant: select(BR.c.seq.label("id"), BR.c.position, BR.c.reason, BR.c.provider_id).where(
            BR.c.tenant_id == tenant, BR.c.batch_id == batch_id
        ),
        id_column=BR.c.seq,
        fields={"reason": Field(BR.c.reason)},
        order_fields={"seq": OrderField(BR.c.seq, "int")},
        default_order=(("seq", False),),
        selectable=("seq", "position", "reason", "providerId"),
        serialize=lambda conn, tenant, rows, selected: [
            {"seq": row.id, "position": row.position, "reason": row.reason, "providerId": row.provider_id}
            for row in rows
        ],
    )


FILTERS = (
    table.Filter("status", "Status", table.equals("status"), BATCH_STATUSES),
    table.Filter("format", "Format", table.equals("format")),
    table.Filter("provider", "Provider", table.equals("provider")),
)
ORDERS = {"newest": "receivedAt desc", "oldest": "receivedAt"}


@blueprint.get("")
@login_required(role="reader")
def index(tenant: str):
    """The tenant's batches, newest first."""
    try:
        shown = table.page(
            BATCHES,
            tenant_id(),
            lambda **a: url_for(".index", tenant=tenant, **a),
            FILTERS,
            ORDERS,
            csv_endpoint_url=lambda **a: url_for(".export", tenant=tenant, **a),
        )
    except APIError as error:
        return refused(error)
    return render_template(
        "console/pages/ingestion.html", table=shown, filters=FILTERS, orders=ORDERS, tenant=tenant
    )


@blueprint.get("/export.csv")
@login_required(role="reader")
def export(tenant: str):
    """The batches the table's filter matches, as CSV."""
    try:
        return table.csv_download(BATCHES, tenant_id(), FILTERS, ORDERS, "batches")
    except APIError as error:
        return refused(error)


def batch_state(tenant: int, batch_id: int) -> dict:
    """A batch's status, counts and merge progress (404 when the tenant has no such batch)."""
    with db().engine.connect() as conn:
        rows = conn.execute(BATCHES.base(tenant).where(B.c.id == batch_id)).all()
        if not rows:
            raise NotFound(f"batch '{batch_id}' not found")
        return BATCHES.serialize(conn, tenant, rows, None)[0]


@blueprint.get("/batches/<int:batch_id>")
@login_required(role="reader")
def show(tenant: str, batch_id: int):
    """One batch: status, counts, live progress while it merges, and its rejected records."""
    try:
        batch = batch_state(tenant_id(), batch_id)
        rejected = table.page(
            rejections(batch_id),
            tenant_id(),
            lambda **a: url_for(".show", tenant=tenant, batch_id=batch_id, **a),
            (),
            {"seq": "seq"},
            sort_param=None,
            csv_endpoint_url=lambda **a: url_for(".export_rejections", tenant=tenant, batch_id=batch_id, **a),
        )
    except APIError as error:
        return refused(error)
    return render_template(
        "console/pages/batch.html",
        batch=batch,
        rejected=rejected,
        tenant=tenant,
        progress_url=url_for(".progress", tenant=tenant, batch_id=batch_id),
    )


@blueprint.get("/batches/<int:batch_id>/rejections.csv")
@login_required(role="reader")
def export_rejections(tenant: str, batch_id: int):
    """The batch's rejected records and their reasons, all of them, as CSV (404 for another tenant's)."""
    try:
        batch_state(tenant_id(), batch_id)
        return table.csv_download(
            rejections(batch_id), tenant_id(), (), {"seq": "seq"}, f"batch-{batch_id}-rejections"
        )
    except APIError as error:
        return refused(error)


@blueprint.get("/batches/<int:batch_id>/progress.json")
@login_required(role="reader")
def progress(tenant: str, batch_id: int):
    """The batch's status, counts and progress as JSON, for the page's live view to poll."""
    batch = batch_state(tenant_id(), batch_id)
    return jsonify(
        {name: batch[name] for name in ("id", "status", "counts", "progress", "error", "finishedAt")}
    )
