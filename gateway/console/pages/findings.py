"""Findings: the filterable table (severity, state, provider, product, CVE, identifier, tag) and
one finding with its sources and history; CSV of the table through the API's bulk export."""

from __future__ import annotations

from flask import Blueprint, render_template, url_for

from connectors.model import SEVERITIES
from gateway.api.collections import COLLECTIONS, FINDING_STATES
from gateway.api.event_collection import EVENTS
from gateway.console.auth import login_required
from gateway.console.pages import table
from gateway.console.pages.common import refused, tenant_id
from gateway.errors import APIError

blueprint = Blueprint("console_findings", __name__, url_prefix="/console/t/<tenant>/findings")

FILTERS = (
    table.Filter("severity", "Severity", table.equals("severity"), SEVERITIES),
    table.Filter("state", "State", table.equals("state"), FINDING_STATES),
    table.Filter("provider", "Provider", table.any_of("sources", "provider")),
    table.Filter("product", "Product", table.any_of("sources", "product")),
    table.Filter("cve", "CVE", table.any_of("cves")),
    # the provider's own id of a record, its vendor id (QID, plugin) or the correlation key
    table.Filter(
        "identifier",
        "Identifier",
        table.one_of(
            table.any_of("sources", "providerId"),
            table.any_of("sources", "vendorId"),
            table.equals("correlationKey"),
        ),
    ),
    table.Filter("tag", "Tag", table.any_of("tags")),
    table.Filter("resource", "Resource id", table.equals("resourceId")),
)
ORDERS = {
    "newest": "id desc",
    "severity": "severity desc",
    "lastSeen": "lastSeen desc",
    "cvss": "cvssScore desc",
    "oldest": "id",
}


def history_page(
    subject_type: str, subject_id: int, endpoint_url, cursor_param: str = "hcursor"
) -> table.Table:
    """One page of a subject's lifecycle events, newest first (the events collection, keyset paged)."""
    return table.page(
        EVENTS,
        tenant_id(),
        endpoint_url,
        (),
        {"newest": "id desc"},
        extra_filter=f"subjectType eq {table.quoted(subject_type)} and subjectId eq '{subject_id}'",
        cursor_param=cursor_param,
        sort_param=None,
        top=25,
    )


@blueprint.get("")
@login_required(role="reader")
def index(tenant: str):
    """The tenant's findings, filtered and paged as the URL says."""
    try:
        shown = table.listing(COLLECTIONS["findings"], tenant, FILTERS, ORDERS)
    except APIError as error:
        return refused(error)
    return render_template(
        "console/pages/findings.html", table=shown, filters=FILTERS, orders=ORDERS, tenant=tenant
    )


@blueprint.get("/export.csv")
@login_required(role="reader")
def export(tenant: str):
    """Every finding the table's filter matches, in its order, as CSV."""
    try:
        return table.csv_download(COLLECTIONS["findings"], tenant_id(), FILTERS, ORDERS, "findings")
    except APIError as error:
        return refused(error)


@blueprint.get("/<int:finding_id>")
@login_required(role="reader")
def show(tenant: str, finding_id: int):
    """One finding: its fields, every source that reports it, its history."""
    try:
        found = table.page(
            COLLECTIONS["findings"],
            tenant_id(),
            lambda **a: "",
            (),
            {"id": "id"},
            extra_filter=f"id eq '{finding_id}'",
            top=1,
            cursor_param="_none",
            sort_param=None,
        )
        if not found.rows:
            return refused(f"finding '{finding_id}' not found", 404)
        history = history_page(
            "finding", finding_id, lambda **a: url_for(".show", tenant=tenant, finding_id=finding_id, **a)
        )
    except APIError as error:
        return refused(error)
    return render_template(
        "console/pages/finding.html", finding=found.rows[0], history=history, tenant=tenant
    )
