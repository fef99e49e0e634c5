"""Resources: the filterable table and one resource with its identifiers, the scanner records it
was built from, observations, findings and history."""

from __future__ import annotations

from flask import Blueprint, redirect, render_template, url_for
from sqlalchemy import select

from gateway.api.collections import COLLECTIONS, IDENTIFIER_NAMES
from gateway.console.auth import login_required
from gateway.console.pages import table
from gateway.console.pages.common import db, refused, tenant_id
from gateway.console.pages.findings import ORDERS as FINDING_ORDERS
from gateway.console.pages.findings import history_page
from gateway.errors import APIError
from gateway.models import Resource

blueprint = Blueprint("console_resources", __name__, url_prefix="/console/t/<tenant>/resources")
RS = Resource.__table__

# an identifier of any kind (cloud id, FQDN, hostname, IP, MAC, agent id...)
_ANY_IDENTIFIER = table.one_of(*[table.any_of(f"identifiers/{name}") for name in IDENTIFIER_NAMES.values()])
FILTERS = (
    table.Filter("identifier", "Identifier", _ANY_IDENTIFIER),
    table.Filter("provider", "Provider", table.any_of("sources", "provider")),
    table.Filter("product", "Product", table.any_of("sources", "product")),
    table.Filter("kind", "Kind", table.equals("kind")),
    table.Filter("tag", "Tag", table.any_of("tags")),
)
ORDERS = {"newest": "id desc", "lastSeen": "lastSeen desc", "oldest": "id"}


@blueprint.get("")
@login_required(role="reader")
def index(tenant: str):
    """The tenant's live resources, filtered and paged as the URL says."""
    try:
        shown = table.listing(COLLECTIONS["resources"], tenant, FILTERS, ORDERS)
    except APIError as error:
        return refused(error)
    return render_template(
        "console/pages/resources.html", table=shown, filters=FILTERS, orders=ORDERS, tenant=tenant
    )


@blueprint.get("/export.csv")
@login_required(role="reader")
def export(tenant: str):
    """Every resource the table's filter matches, in its order, as CSV."""
    try:
        return table.csv_download(COLLECTIONS["resources"], tenant_id(), FILTERS, ORDERS, "resources")
    except APIError as error:
        return refused(error)


@blueprint.get("/<int:resource_id>")
@login_required(role="reader")
def show(tenant: str, resource_id: int):
    """One resource with a page each of its findings, observations and history."""
    with db().engine.connect() as conn:
        state = conn.execute(
            select(RS.c.id, RS.c.merged_into).where(RS.c.tenant_id == tenant_id(), RS.c.id == resource_id)
        ).first()
    if state is None:
        return refused(f"resource '{resource_id}' not found", 404)
    if state.merged_into is not None:  # merged into another: show the survivor
        return redirect(url_for(".show", tenant=tenant, resource_id=state.merged_into))

    def here(**args) -> str:
        return url_for(".show", tenant=tenant, resource_id=resource_id, **args)

    try:
        found = table.page(
            COLLECTIONS["resources"],
            tenant_id(),
            here,
            (),
            {"id": "id"},
            extra_filter=f"id eq '{resource_id}'",
            top=1,
            cursor_param="_none",
            sort_param=None,
        )
        findings = table.page(
            COLLECTIONS["findings"],
            tenant_id(),
            here,
            (),
            FINDING_ORDERS,
            extra_filter=f"resourceId eq '{resource_id}'",
            cursor_param="fcursor",
            sort_param=None,
            top=25,
        )
        observations = table.page(
            COLLECTIONS["observations"],
            tenant_id(),
            here,
            (),
            {"oldest": "id"},
            extra_filter=f"resourceId eq '{resource_id}'",
            cursor_param="ocursor",
            sort_param=None,
            top=25,
        )
        history = history_page("resource", resource_id, here)
    except APIError as error:
        return refused(error)
    return render_template(
        "console/pages/resource.html",
        resource=found.rows[0],
        findings=findings,
        observations=observations,
        history=history,
        tenant=tenant,
        findings_url=url_for("console_findings.index", tenant=tenant, resource=resource_id),
    )
