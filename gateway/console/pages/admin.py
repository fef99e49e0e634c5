"""Admin: the tenant's partner clients (create, disable, enable, rotate the secret, shown once),
the providers enabled for the tenant, its ITSM connections and export destinations with their
health.  Admins only."""

from __future__ import annotations

from flask import Blueprint, redirect, render_template, request, url_for
from sqlalchemy import case, func, select

from gateway import clients
from gateway.api.itsm import COLLECTIONS as ITSM_COLLECTIONS
from gateway.auth import SCOPES
from gateway.console.auth import login_required
from gateway.console.pages import table
from gateway.console.pages.common import db, refused, tenant_id
from gateway.errors import APIError
from gateway.export import delivery
from gateway.models import ClientTenant, ExportDestination, OAuthClient, ProviderFindingCount, utcnow
from gateway.odata import Field
from gateway.query import Collection, OrderField

blueprint = Blueprint("console_admin", __name__, url_prefix="/console/t/<tenant>/admin")
C, CT, DEST = OAuthClient.__table__, ClientTenant.__table__, ExportDestination.__table__

CLIENTS = Collection(
    name="clients",
    base=lambda tenant: select(
        C.c.id,
        C.c.client_id,
        C.c.name,
        C.c.provider,
        C.c.scope,
        C.c.disabled,
        C.c.created_at,
        C.c.secret_rotated_at,
    ).join(CT, (CT.c.client_pk == C.c.id) & (CT.c.tenant_id == tenant)),
    id_column=C.c.id,
    fields={"provider": Field(C.c.provider), "disabled": Field(C.c.disabled, "bool")},
    order_fields={"id": OrderField(C.c.id, "int")},
    default_order=(("id", False),),
    selectable=("clientId", "name", "provider", "scope", "disabled", "createdAt", "secretRotatedAt"),
    serialize=lambda conn, tenant, rows, selected: [
        {
            "clientId": row.client_id,
            "name": row.name,
            "provider": row.provider,
            "scope": row.scope,
            "disabled": bool(row.disabled),
            "createdAt": row.created_at,
            "secretRotatedAt": row.secret_rotated_at,
        }
        for row in rows
    ],
)


def _serialize_destinations(conn, tenant, rows, selected) -> list[dict]:
    at = utcnow()
    return [
        {
            "id": row.id,
            "displayName": row.display_name,
            "kind": row.kind,
            "state": row.state,
            "lastError": row.last_error,
            "lastErrorAt": row.last_error_at,
            "lastDeliveredAt": row.last_delivered_at,
            "deliveredEvents": row.delivered_events,
            **delivery.lag(conn, row, at),
        }
        for row in rows
    ]


DESTINATIONS = Collection(
    name="exportDestinations",
    base=lambda tenant: select(DEST).where(DEST.c.tenant_id == tenant),
    id_column=DEST.c.id,
    fields={"state": Field(DEST.c.state)},
    order_fields={"id": OrderField(DEST.c.id, "int")},
    default_order=(("id", False),),
    selectable=("id", "displayName", "kind", "state"),
    serialize=_serialize_destinations,
)


def providers(tenant: int) -> list[dict]:
    """The providers enabled for the tenant (its clients' providers) with the findings they report (the
    counts kept on PostgreSQL, gateway/provider_counts.py; none on SQLite)."""
    with db().engine.connect() as conn:
        enabled = conn.execute(
            select(
                C.c.provider,
                func.count().label("clients"),
                func.sum(case((C.c.disabled.is_(False), 1), else_=0)).label("active"),
            )
            .join(CT, (CT.c.client_pk == C.c.id) & (CT.c.tenant_id == tenant))
            .group_by(C.c.provider)
            .order_by(C.c.provider)
            .limit(200)
        ).all()
        counts = (
            dict(
                conn.execute(
                    select(ProviderFindingCount.provider, func.sum(ProviderFindingCount.findings))
                    .where(ProviderFindingCount.tenant_id == tenant)
                    .group_by(ProviderFindingCount.provider)
                ).all()
            )
            if enabled
            else {}
        )
    return [
        {
            "provider": row.provider,
            "clients": row.clients,
            "active": int(row.active or 0),
            "findings": counts.get(row.provider),
        }
        for row in enabled
    ]


@blueprint.get("")
@login_required(role="admin")
def index(tenant: str):
    """Clients, providers, ITSM connections and export destinations of the tenant."""

    def here(**args) -> str:
        return url_for(".index", tenant=tenant, **args)

    try:
        shown = table.page(
            CLIENTS, tenant_id(), here, (), {"oldest": "id"}, sort_param=None, csv_endpoint_url=None
        )
        connections = table.page(
            ITSM_COLLECTIONS["connections"],
            tenant_id(),
            here,
            (),
            {"oldest": "id"},
            cursor_param="icursor",
            sort_param=None,
            top=20,
        )
        destinations = table.page(
            DESTINATIONS,
            tenant_id(),
            here,
            (),
            {"oldest": "id"},
            cursor_param="dcursor",
            sort_param=None,
            top=20,
        )
    except APIError as error:
        return refused(error)
    return render_template(
        "console/pages/admin.html",
        clients=shown,
        connections=connections,
        destinations=destinations,
        providers=providers(tenant_id()),
        scopes=sorted(SCOPES),
        tenant=tenant,
    )


def _secret_page(client_id: str, secret: str, what: str):
    response = render_template(
        "console/pages/client_secret.html",
        client_id=client_id,
        secret=secret,
        what=what,
        tenant=request.view_args["tenant"],
    )
    return response, 200, {"Cache-Control": "no-store"}


@blueprint.post("/clients")
@login_required(role="admin")
def create_client(tenant: str):
    """Create a client for the tenant; its secret is shown on the answer only."""
    try:
        with db().session() as session:
            client_id, secret = clients.create(
                session,
                tenant_id(),
                request.form.get("name", ""),
                request.form.get("provider", ""),
                request.form.getlist("scope"),
            )
    except APIError as error:
        return refused(error)
    return _secret_page(client_id, secret, "created")


@blueprint.post("/clients/<client_id>/rotate")
@login_required(role="admin")
def rotate(tenant: str, client_id: str):
    """A new secret for the client (shown once); its tokens are revoked."""
    try:
        with db().session() as session:
            secret, _ = clients.rotate_secret(session, tenant_id(), client_id)
    except APIError as error:
        return refused(error)
    return _secret_page(client_id, secret, "rotated")


@blueprint.post("/clients/<client_id>/disable")
@login_required(role="admin")
def disable(tenant: str, client_id: str):
    """Disable the client (its tokens are revoked) or, with ``enable=1``, enable it again."""
    try:
        with db().session() as session:
            clients.set_disabled(session, tenant_id(), client_id, not request.form.get("enable"))
    except APIError as error:
        return refused(error)
    return redirect(url_for(".index", tenant=tenant), code=303)
