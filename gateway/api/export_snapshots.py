"""``POST .../exports/{id}/snapshot`` and ``GET .../exports/{id}/snapshots/{sid}`` (scope ``exports.manage``).

A snapshot delivers the current state of the destination's filtered collections as
``<subject>.snapshot`` events, by the workers (gateway/export/snapshot.py); the answer is ``202``
with the job, whose URL shows its progress.  One job per destination runs at a time (``409``).
"""

from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify, url_for
from sqlalchemy import select

from gateway.api import exports as export_api
from gateway.auth import require_scope
from gateway.automation.schemas import ExportSnapshotOut
from gateway.errors import Conflict, NotFound
from gateway.export import snapshot
from gateway.models import utcnow

blueprint = Blueprint("export_snapshots", __name__, url_prefix="/api/v1/tenants/<tenant>")


def _db():
    return current_app.extensions["gateway.db"]


def _job(conn, export_id: int, snapshot_id: str):
    if not (snapshot_id.isascii() and snapshot_id.isdigit()) or len(snapshot_id) > 9:
        raise NotFound(f"snapshot '{snapshot_id[:40]}' not found")
    row = conn.execute(
        select(snapshot.SNAP).where(
            snapshot.SNAP.c.destination_id == export_id, snapshot.SNAP.c.id == int(snapshot_id)
        )
    ).first()
    if row is None:
        raise NotFound(f"snapshot '{snapshot_id[:40]}' not found")
    return row


@require_scope("exports.manage")
def start_snapshot(tenant: str, export_id: str):
    """Deliver the current state of the destination's filtered collections (``<subject>.snapshot`` events)."""
    export_api._only()
    tenant_id = export_api._tenant(tenant).id
    with _db().engine.begin() as conn:
        dest = export_api._row(conn, tenant_id, export_id, for_update=True)
        job_id = snapshot.start(conn, dest, g.caller.client_id, utcnow())
        if job_id is None:
            raise Conflict("a snapshot of this destination is already running: wait for it (GET its URL)")
        job = _job(conn, dest.id, str(job_id))
    from workers.automation_tasks import send_snapshot  # the task layer, wired lazily (as ITSM does)

    send_snapshot(job_id)
    response = jsonify(ExportSnapshotOut().dump(job._asdict()))
    response.status_code = 202
    response.headers["Location"] = url_for(
        "export_snapshots.get_snapshot", tenant=tenant, export_id=dest.id, snapshot_id=job_id, _external=True
    )
    return response


@require_scope("exports.manage")
def get_snapshot(tenant: str, export_id: str, snapshot_id: str):
    """A snapshot job: its state and how many events it delivered of how many."""
    export_api._only()
    tenant_id = export_api._tenant(tenant).id
    with _db().engine.connect() as conn:
        dest = export_api._row(conn, tenant_id, export_id)
        job = _job(conn, dest.id, snapshot_id)
    return jsonify(ExportSnapshotOut().dump(job._asdict()))


blueprint.add_url_rule("/exports/<export_id>/snapshot", "start_snapshot", start_snapshot, methods=["POST"])
blueprint.add_url_rule(
    "/exports/<export_id>/snapshots/<snapshot_id>", "get_snapshot", get_snapshot, methods=["GET"]
)
