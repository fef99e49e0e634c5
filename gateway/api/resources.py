"""Resource identity under ``/api/v1/tenants/<tenant>/security/resources/<id>``: the resource's
observations and history, and the admin's hand on identity (merge, split).

The merge side lives in ``gateway/merge/combine.py``; these views check the request against the
tenant's resources, take the tenant's resolver lock (PostgreSQL: no batch resolves identities
meanwhile) and run the merge or split in one transaction, which writes the ``merged`` /
``mergedInto`` / ``split`` lifecycle events.
"""

from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify, request, url_for
from marshmallow import ValidationError
from sqlalchemy import select, text

from gateway.api.collections import (
    _DUMP_EVENTS,
    _get_one,
    _item_id,
    _list,
    _only,
    _tenant_id,
    moved_permanently,
    resource_state,
)
from gateway.auth import require_scope
from gateway.errors import BadRequest, Conflict, NotFound
from gateway.merge.combine import merge_resources, split_resource
from gateway.merge.findings import FindingMerger
from gateway.merge.resources import RESOLVER_LOCK
from gateway.models import LifecycleEvent, Observation, Resource, ResourceSource, utcnow
from gateway.schemas import ResourceMergeIn, ResourceSplitIn

PREFIX = "/api/v1/tenants/<tenant>/security/resources/<item_id>"
blueprint = Blueprint("resources", __name__, url_prefix=PREFIX)

RS, RSRC, OBS, EV = (Resource.__table__, ResourceSource.__table__, Observation.__table__,
                     LifecycleEvent.__table__)
ADMIN_PROVIDER = "admin"  # the provider a manual merge or split acts as (events' actor is the client)


def _db():
    return current_app.extensions["gateway.db"]


@blueprint.get("/observations", endpoint="list_observations")
@require_scope("security.read")
def list_resource_observations(tenant: str, item_id: str):
    """The resource's observations (OData options; JSON or CSV); a merged-away id answers 301."""
    tenant_id = _tenant_id(tenant)
    resource_id = _item_id("resources", item_id)
    with _db().engine.connect() as conn:
        survivor = resource_state(conn, tenant_id, resource_id)
    if survivor is not None:
        args = request.args.to_dict()
        args.pop("$skiptoken", None)  # bound to the old id's listing
        location = url_for("resources.list_observations", tenant=tenant, item_id=survivor, _external=True,
                           **args)
        return moved_permanently(resource_id, survivor, location)
    return _list(tenant, "observations", tenant_id=tenant_id, within=(OBS.c.resource_id == resource_id,),
                 bound=f"resource:{resource_id}", endpoint="resources.list_observations",
                 url_args={"item_id": item_id})


@blueprint.get("/history", endpoint="history")
@require_scope("security.read")
def resource_history(tenant: str, item_id: str):
    """The resource's lifecycle events (merged, mergedInto, split, new), oldest first.

    Served for a merged-away id too: its own events end with ``mergedInto``."""
    tenant_id = _tenant_id(tenant)
    resource_id = _item_id("resources", item_id)
    with _db().engine.connect() as conn:
        resource_state(conn, tenant_id, resource_id)
        rows = conn.execute(select(EV).where(EV.c.tenant_id == tenant_id, EV.c.subject_type == "resource",
                                             EV.c.subject_id == resource_id).order_by(EV.c.id)).all()
    return jsonify({"value": _DUMP_EVENTS([row._asdict() for row in rows])})


def _body(schema_class) -> dict:
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object", code="invalidBody")
    try:
        return schema_class().load(payload)
    except ValidationError as exc:
        raise BadRequest("invalid fields: " + "; ".join(f"{k}: {v}" for k, v in exc.messages.items()),
                         code="invalidBody", details=exc.messages) from None


def _merger(conn, tenant_id: int) -> FindingMerger:
    actor = g.caller.client_id
    merger = FindingMerger(conn, tenant_id, ADMIN_PROVIDER, None, utcnow(), f"merged by admin {actor}")
    if conn.dialect.name == "postgresql":
        # the resolver's lock: no batch of the tenant resolves identities while the admin changes them
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": RESOLVER_LOCK + tenant_id})
        merger.resolve_on_main = True
    return merger


def _live(conn, tenant_id: int, ids: list[int]) -> None:
    """404 naming the ids the tenant has no resource of; 409 naming those merged away."""
    query = select(RS.c.id, RS.c.merged_into).where(RS.c.tenant_id == tenant_id, RS.c.id.in_(ids))
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    found = {row.id: row.merged_into for row in conn.execute(query)}
    missing = [str(i) for i in ids if i not in found]
    if missing:
        raise NotFound(f"resource {', '.join(missing[:20])} not found")
    merged = [(i, found[i]) for i in ids if found[i] is not None]
    if merged:
        raise Conflict("resource " + ", ".join(f"{i} was merged into {into}" for i, into in merged[:20])
                       + "; name the surviving resource", code="resourceMerged")


@blueprint.post("/merge", endpoint="merge")
@require_scope("admin")
def merge(tenant: str, item_id: str):
    """Merge the resources of ``resourceIds`` into this one (their findings, recommendations,
    observations, host records, identifiers and alerts move; their ids answer 301 after)."""
    _only(())
    tenant_id = _tenant_id(tenant)
    survivor = _item_id("resources", item_id)
    losers = list(dict.fromkeys(_body(ResourceMergeIn)["resourceIds"]))
    if survivor in losers:
        raise BadRequest(f"resource {survivor} cannot be merged into itself: 'resourceIds' names the others",
                         code="invalidBody")
    with _db().engine.begin() as conn:
        merger = _merger(conn, tenant_id)
        _live(conn, tenant_id, [survivor])
        _live(conn, tenant_id, losers)
        for loser in sorted(losers):
            merge_resources(merger, loser, survivor, evidence="merged by hand", actor=g.caller.client_id)
        merger.update_recommendations()
    return jsonify(_get_one(tenant, "resources", item_id))


@blueprint.post("/split", endpoint="split")
@require_scope("admin")
def split(tenant: str, item_id: str):
    """Move the host records ``sourceIds`` (with what only they contributed: identifiers, findings'
    sources, observations) to a new resource, never merged with this one again automatically."""
    _only(())
    tenant_id = _tenant_id(tenant)
    resource_id = _item_id("resources", item_id)
    record_ids = list(dict.fromkeys(_body(ResourceSplitIn)["sourceIds"]))
    with _db().engine.begin() as conn:
        merger = _merger(conn, tenant_id)
        _live(conn, tenant_id, [resource_id])
        held = set(conn.execute(select(RSRC.c.id).where(RSRC.c.tenant_id == tenant_id,
                                                        RSRC.c.resource_id == resource_id)).scalars())
        foreign = [str(i) for i in record_ids if i not in held]
        if foreign:
            raise BadRequest(f"'sourceIds' names {', '.join(foreign[:20])}, not host records of resource "
                             f"{resource_id} (see its sources[].id)", code="invalidBody")
        if held <= set(record_ids):
            raise BadRequest(f"a split leaves at least one host record on resource {resource_id}; "
                             f"it has {len(held)}", code="invalidBody")
        new_id = split_resource(merger, resource_id, record_ids, g.caller.client_id)
    response = jsonify(_get_one(tenant, "resources", str(new_id)))
    response.status_code = 201
    response.headers["Location"] = url_for("collections.get_resources", tenant=tenant, item_id=new_id,
                                           _external=True)
    return response
