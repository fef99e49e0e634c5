"""Alerts: the work queue (filter, assign, change status, set feedback, comment, tag; one or many
at once) and one alert with its evidence and history.  Every edit is the API's PATCH edit
(``gateway.query.apply_edit`` with the alerts collection's workflow), so the history names the
signed-in user as the actor of an ``edited`` event."""

from __future__ import annotations

from flask import Blueprint, redirect, render_template, request, url_for
from marshmallow import ValidationError
from sqlalchemy import select

from gateway.api.collections import ALERT_SEVERITIES, COLLECTIONS
from gateway.console.auth import login_required
from gateway.console.pages import table
from gateway.console.pages.common import actor, db, refused, tenant_id
from gateway.console.pages.findings import history_page
from gateway.errors import APIError, BadRequest
from gateway.models import Alert, LifecycleEvent, utcnow
from gateway.query import apply_edit

blueprint = Blueprint("console_alerts", __name__, url_prefix="/console/t/<tenant>/alerts")
A, EV = Alert.__table__, LifecycleEvent.__table__
STATUSES = ("newAlert", "inProgress", "resolved")
FEEDBACK = ("truePositive", "falsePositive", "benignPositive")
MAX_SELECTED = 100  # alerts one bulk edit names (a page holds 50)

FILTERS = (
    table.Filter("severity", "Severity", table.equals("severity"), ALERT_SEVERITIES),
    table.Filter("status", "Status", table.equals("status"), STATUSES),
    table.Filter("assignedTo", "Assigned to", table.equals("assignedTo")),
    table.Filter("feedback", "Feedback", table.equals("feedback"), FEEDBACK),
    table.Filter("provider", "Provider", table.equals("vendorInformation/provider")),
    table.Filter("tag", "Tag", table.any_of("tags")),
)
ORDERS = {
    "newest": "id desc",
    "severity": "severity desc",
    "created": "createdDateTime desc",
    "modified": "lastModifiedDateTime desc",
    "oldest": "id",
}


@blueprint.get("")
@login_required(role="reader")
def index(tenant: str):
    """The tenant's alerts, filtered and paged as the URL says, with bulk actions."""
    try:
        shown = table.listing(COLLECTIONS["alerts"], tenant, FILTERS, ORDERS)
    except APIError as error:
        return refused(error)
    return render_template(
        "console/pages/alerts.html",
        table=shown,
        filters=FILTERS,
        orders=ORDERS,
        statuses=STATUSES,
        feedback=FEEDBACK,
        tenant=tenant,
        edited=request.args.get("edited"),
    )


@blueprint.get("/export.csv")
@login_required(role="reader")
def export(tenant: str):
    """Every alert the table's filter matches, in its order, as CSV."""
    try:
        return table.csv_download(COLLECTIONS["alerts"], tenant_id(), FILTERS, ORDERS, "alerts")
    except APIError as error:
        return refused(error)


@blueprint.get("/<int:alert_id>")
@login_required(role="reader")
def show(tenant: str, alert_id: int):
    """One alert: its fields, comments, the partner's evidence and its history."""

    def here(**args) -> str:
        return url_for(".show", tenant=tenant, alert_id=alert_id, **args)

    try:
        found = table.page(
            COLLECTIONS["alerts"],
            tenant_id(),
            here,
            (),
            {"id": "id"},
            extra_filter=f"id eq '{alert_id}'",
            top=1,
            cursor_param="_none",
            sort_param=None,
        )
        if not found.rows:
            return refused(f"alert '{alert_id}' not found", 404)
        v2 = table.page(
            COLLECTIONS["alerts_v2"],
            tenant_id(),
            here,
            (),
            {"id": "id"},
            extra_filter=f"id eq '{alert_id}'",
            top=1,
            cursor_param="_none",
            sort_param=None,
        )
        history = history_page("alert", alert_id, here)
    except APIError as error:
        return refused(error)
    return render_template(
        "console/pages/alert.html",
        alert=found.rows[0],
        evidence=v2.rows[0].get("evidence") or [],
        history=history,
        statuses=STATUSES,
        feedback=FEEDBACK,
        tenant=tenant,
        edited=request.args.get("edited"),
    )


def _ids() -> list[int]:
    texts = request.form.getlist("alert_id")
    if not texts:
        raise BadRequest("choose at least one alert", code="invalidBody")
    if len(texts) > MAX_SELECTED:
        raise BadRequest(f"choose at most {MAX_SELECTED} alerts at once", code="invalidBody")
    if not all(text.isascii() and text.isdigit() and len(text) <= 18 for text in texts):
        raise BadRequest("'alert_id' is an alert id such as 42", code="invalidBody")
    return sorted({int(text) for text in texts})


def _tags(text: str) -> list[str]:
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def changes_from_form(form) -> tuple[dict, list[str]]:
    """The API's PATCH body the form means (checked by the same schema), and the tags to add."""
    body: dict = {}
    if form.get("assignedTo", "").strip():
        body["assignedTo"] = form["assignedTo"].strip()
    if form.get("unassign"):
        body["assignedTo"] = None
    if form.get("status"):
        body["status"] = form["status"]
    if form.get("feedback"):
        body["feedback"] = form["feedback"]
    if form.get("comment", "").strip():
        body["comments"] = [{"text": form["comment"].strip()}]
    if "tags" in form:  # the one alert's whole tag list
        body["tags"] = _tags(form["tags"])
    add = _tags(form.get("addTags", ""))
    patch_schema = COLLECTIONS["alerts"].workflow.patch_schema
    try:
        changes = patch_schema().load(body)
        patch_schema().load({"tags": add})
    except ValidationError as exc:
        raise BadRequest(
            "invalid fields: " + "; ".join(f"{k}: {v}" for k, v in exc.messages.items()), code="invalidBody"
        ) from None
    if not changes and not add:
        raise BadRequest(
            "nothing to change: choose an owner, a status, feedback, a comment or a tag", code="invalidBody"
        )
    return changes, add


def edit_alerts(tenant: int, ids: list[int], changes: dict, add_tags: list[str], who: str) -> int:
    """Apply the edit to the tenant's alerts ``ids``: one ``apply_edit`` for the fields, and one per
    alert whose tags grow (tags are a list the edit replaces).  Returns how many alerts it found."""
    collection = COLLECTIONS["alerts"]
    now = utcnow()
    with db().engine.begin() as conn:
        found = conn.execute(select(A.c.id, A.c.tags).where(A.c.tenant_id == tenant, A.c.id.in_(ids))).all()
        if not found:
            return 0
        if changes:
            apply_edit(
                conn, collection, tenant, [A.c.id.in_([row.id for row in found])], changes, who, now, EV
            )
        for row in found if add_tags else ():
            tags = list(row.tags or [])
            grown = tags + [tag for tag in add_tags if tag not in tags]
            if grown != tags:
                apply_edit(conn, collection, tenant, [A.c.id == row.id], {"tags": grown[:50]}, who, now, EV)
    return len(found)


@blueprint.post("/edit")
@login_required(role="analyst")
def edit(tenant: str):
    """Edit the chosen alerts (one from its page, or many from the queue)."""
    try:
        ids = _ids()
        changes, add_tags = changes_from_form(request.form)
        if not edit_alerts(tenant_id(), ids, changes, add_tags, actor()):
            return refused("none of the chosen alerts exists", 404)
    except APIError as error:
        return refused(error)
    if request.form.get("back") == "alert" and len(ids) == 1:
        return redirect(url_for(".show", tenant=tenant, alert_id=ids[0], edited=1), code=303)
    return redirect(url_for(".index", tenant=tenant, edited=len(ids)), code=303)
