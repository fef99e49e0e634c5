"""Items and their tickets: what an item shows of its tickets, and what an item's workflow does to them.

* **Items show their tickets.**  Findings, recommendations and alerts answer ``tickets[]`` (the
  ticket's id, connection, remote id/key/URL/state, sync state, last synced), read by one query
  per page (:func:`add_tickets`), and filter on them with ``tickets/any(t: t/remoteState eq
  'Resolved')``, ``tickets/any(t: t/connectionId eq '3')`` or ``tickets/any()`` (:func:`install`
  adds the field to those collections).
* **Alert closure** (:func:`closure_changes`): a ticket closed or resolved in the ITSM resolves
  its alerts, reopened reopens them, through the workflow edit path (``apply_edit``, with history,
  actor ``itsm:<connection>``); an alert resolved in the gateway resolves its ticket (the ticket's
  desired state follows its items: gateway/itsm/sync.py).
* **Risk acceptance** (:func:`accept_risk`, :func:`revoke_risk`): a connection that opts in
  (``riskAcceptance: {enabled, closeCodes, expiresInDays}``) turns a ticket closed with one of
  those codes into a ``waiver`` exemption of each of its items' recommendation on its resource
  (gateway/posture/edits.py), removed when the ticket reopens.
* **Customer fields to the ticket** (:func:`customer_fields`): ``assignedTo`` set in the gateway
  becomes the ticket's assignee when the connection's ``assigneeMap`` names the person in the
  ITSM, else a work note; ``statusOverride`` becomes a work note.  An edit the ITSM made (actor
  ``itsm:...``) is never sent back, and the assignee the gateway sets is recorded as what the
  ticket says, so the next poll or webhook does not take it back in (no echo).
* **Close codes and notes** (:func:`close_notes`): ServiceNow ``closeCode``, ``closeCodeExempt``
  (when every item of the ticket is exempt) and ``closeNotesTemplate``; Jira ``doneStatus``
  (gateway/itsm/clients.py).
"""

from __future__ import annotations

import dataclasses
import logging
import string
from collections import defaultdict
from datetime import timedelta
from urllib.parse import quote

from sqlalchemy import select, update

from gateway.models import (
    Alert,
    Finding,
    ItsmTicket,
    ItsmTicketItem,
    LifecycleEvent,
    Recommendation,
    RecommendationType,
)
from gateway.odata import Field, ListField
from gateway.schemas import ItemTicketOut, fast_dumper

log = logging.getLogger(__name__)
TK, TI, EV = ItsmTicket.__table__, ItsmTicketItem.__table__, LifecycleEvent.__table__
A, F, R, RT = Alert.__table__, Finding.__table__, Recommendation.__table__, RecommendationType.__table__
SUBJECT_OF = {"findings": "finding", "recommendations": "recommendation", "alerts": "alert"}
SYNC_STATES = ("pending", "synced", "parked")
_DUMP = fast_dumper(ItemTicketOut)


# -- tickets[] on items ------------------------------------------------------------------------------


def tickets_field(subject_type: str, id_column) -> ListField:
    """``tickets`` of a collection of items: the links of the item joined to their tickets."""

    def rows(context):
        links, tickets = TI.alias(), TK.alias()
        joined = links.join(
            tickets, (tickets.c.id == links.c.ticket_id) & (tickets.c.tenant_id == context.tenant_id)
        )
        return joined, (
            (links.c.tenant_id == context.tenant_id)
            & (links.c.subject_type == subject_type)
            & (links.c.subject_id == id_column)
        )

    def members(joined) -> dict[str, Field]:
        links, tickets = joined.left, joined.right
        return {
            "id": Field(tickets.c.id, "id"),
            "connectionId": Field(links.c.connection_id, "id"),
            "remoteId": Field(tickets.c.remote_id, nullable=True),
            "remoteKey": Field(tickets.c.remote_key, nullable=True),
            "remoteState": Field(tickets.c.remote_state, nullable=True),
            "syncState": Field(tickets.c.sync_state, "enum", values=SYNC_STATES),
            "lastSyncedDateTime": Field(tickets.c.last_synced_at, "datetime", nullable=True),
        }

    return ListField(members=members, rows=rows)


def tickets_of(conn, tenant_id: int, subject_type: str, ids) -> dict[int, list[dict]]:
    """item id -> its tickets (dumped), one query for all the ids."""
    found: dict[int, list[dict]] = defaultdict(list)
    ids = sorted(set(ids))
    if not ids:
        return found
    rows = conn.execute(
        select(TI.c.subject_id, TK)
        .join(TK, TK.c.id == TI.c.ticket_id)
        .where(
            TI.c.tenant_id == tenant_id,
            TK.c.tenant_id == tenant_id,
            TI.c.subject_type == subject_type,
            TI.c.subject_id.in_(ids),
        )
        .order_by(TK.c.connection_id, TK.c.id)
    ).all()
    for row, dumped in zip(rows, _DUMP([row._asdict() for row in rows]), strict=True):
        found[row.subject_id].append(dumped)
    return found


def add_tickets(conn, tenant_id: int, subject_type: str, items: list[dict], selected) -> list[dict]:
    """Set ``tickets`` on each dumped item of a page (one query; none when ``$select`` leaves it out)."""
    if selected is not None and "tickets" not in selected:
        return items
    found = tickets_of(conn, tenant_id, subject_type, [int(item["id"]) for item in items])
    for item in items:
        item["tickets"] = found.get(int(item["id"]), [])
    return items


def _with_tickets(serialize, subject_type: str):
    def serialize_with_tickets(conn, tenant_id, rows, selected):
        return add_tickets(
            conn, tenant_id, subject_type, serialize(conn, tenant_id, rows, selected), selected
        )

    return serialize_with_tickets


def install(collections: dict) -> None:
    """Give the findings, recommendations and alerts collections their ``tickets``: the filter
    field and the answer's list (``tickets`` is declared last in their ``...Out`` schemas)."""
    for name, subject_type in SUBJECT_OF.items():
        collection = collections[name]
        if "tickets" in collection.fields:
            continue
        collections[name] = dataclasses.replace(
            collection,
            fields={**collection.fields, "tickets": tickets_field(subject_type, collection.id_column)},
            serialize=_with_tickets(collection.serialize, subject_type),
        )


# -- close notes -------------------------------------------------------------------------------------


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def close_notes(settings: dict, content: dict | None, default: str) -> str:
    """The close notes of a resolve: the connection's ``closeNotesTemplate`` with ``{kind}``,
    ``{ids}``, ``{count}``, ``{titles}``, ``{title}``, ``{severity}``, ``{reason}`` and
    ``{notes}`` (the gateway's own text) filled in, else the gateway's own text.  An unknown
    placeholder is left as written."""
    template = (settings or {}).get("closeNotesTemplate")
    if not template:
        return default
    content = content or {}
    ids = [str(i) for i in content.get("ids") or []]
    titles = list(content.get("titles") or [])
    values = _Blank(
        kind=content.get("kind") or "item",
        ids=", ".join(ids),
        count=str(len(ids)),
        titles="; ".join(titles),
        title=content.get("title") or "",
        severity=content.get("severity") or "",
        reason="exempt" if content.get("exempt") else "fixed",
        notes=default,
    )
    try:
        return string.Formatter().vformat(template, (), values)
    except (ValueError, IndexError, AttributeError):  # braces that are no placeholder: the text as written
        return template


def all_exempt(conn, tenant_id: int, kind: str, ids) -> bool:
    """Whether every item of a ticket is covered by an exemption (a recommendation's own; a finding
    resolves by its scanners, never by an exemption, so a finding ticket is never "exempt")."""
    if kind != "recommendation" or not ids:
        return False
    uncovered = conn.execute(
        select(R.c.id)
        .where(R.c.tenant_id == tenant_id, R.c.id.in_(sorted(ids)), R.c.exemption_id.is_(None))
        .limit(1)
    ).first()
    return uncovered is None


# -- inbound: alert closure and risk acceptance ------------------------------------------------------


def classify(connection, snap: dict) -> dict:
    """The snapshot with its closure as the connection reads it: a close code (ServiceNow) or a
    resolution or status name (Jira) of ``riskAcceptance.closeCodes`` is a risk acceptance, besides
    the built-in ones (gateway/itsm/inbound.py)."""
    codes = {str(c).casefold() for c in _risk_settings(connection).get("closeCodes") or []}
    if codes and snap.get("done") and str(snap.get("closeCode") or "").casefold() in codes:
        return {**snap, "closure": "riskAccepted"}
    return snap


def _risk_settings(connection) -> dict:
    return dict((connection.settings or {}).get("riskAcceptance") or {})


def exempting(connection, snap: dict) -> bool:
    """Whether the record's closure makes exemptions: the connection opted in, and the record is
    closed with one of its ``closeCodes`` (without a list: any risk-accepted closure)."""
    risk = _risk_settings(connection)
    if not risk.get("enabled") or snap.get("closure") != "riskAccepted":
        return False
    codes = {str(c).casefold() for c in risk.get("closeCodes") or []}
    return not codes or str(snap.get("closeCode") or "").casefold() in codes


def follow(conn, connection, ticket, previous: dict, snap: dict, who: str, now) -> tuple[int, dict, dict]:
    """What a full snapshot of the record does beyond the customer fields: (item edits written,
    keys to keep in the ticket's ``inbound``, ticket column values).

    * closed or resolved (``done``) where it was not: the ticket's open alerts are resolved;
      reopened: its resolved alerts are set in progress (with the ticket's desired state, so that
      nothing is sent back);
    * closed as an accepted risk on a connection that opted in: a ``waiver`` exemption per
      recommendation (type on resource) of its items; reopened (or closed otherwise): they are
      deleted."""
    written, keep, values = 0, {"done": bool(snap.get("done"))}, {}
    was_done, done = bool(previous.get("done")), bool(snap.get("done"))
    if done != was_done and ticket.collection == "alerts":
        written += _alerts_follow(conn, ticket, done, who, now)
        values["desired_state"] = "resolved" if done else "open"
    exemptions = list(previous.get("exemptions") or [])
    if exempting(connection, snap):
        if not exemptions:
            keep["exemptions"] = accept_risk(conn, connection, ticket, snap, who, now)
    elif exemptions:
        revoke_risk(conn, ticket.tenant_id, exemptions, who, now)
        keep["exemptions"] = []
    return written, keep, values


def _items(conn, ticket) -> list:
    return conn.execute(
        select(TI.c.subject_type, TI.c.subject_id)
        .where(TI.c.ticket_id == ticket.id)
        .order_by(TI.c.subject_id)
    ).all()


def _alerts_follow(conn, ticket, done: bool, who: str, now) -> int:
    from gateway.api.collections import COLLECTIONS
    from gateway.query import apply_edit

    ids = [i.subject_id for i in _items(conn, ticket) if i.subject_type == "alert"]
    if not ids:
        return 0
    collection = COLLECTIONS["alerts"]
    if done:
        conditions, status = [A.c.id.in_(ids), A.c.status != "resolved"], "resolved"
    else:
        conditions, status = [A.c.id.in_(ids), A.c.status == "resolved"], "inProgress"
    return apply_edit(conn, collection, ticket.tenant_id, conditions, {"status": status}, who, now, EV)


def _recommendation_scopes(conn, ticket) -> list[tuple[int, str]]:
    """(resource id, type key) of the recommendations of the ticket's findings and recommendations."""
    pairs: set[tuple[int, str]] = set()
    by_type = defaultdict(list)
    for item in _items(conn, ticket):
        by_type[item.subject_type].append(item.subject_id)
    tenant_id = ticket.tenant_id
    for table, type_column in ((F, F.c.recommendation_type_id), (R, R.c.type_id)):
        wanted = by_type.get("finding" if table is F else "recommendation")
        if wanted:
            pairs.update(
                conn.execute(
                    select(table.c.resource_id, RT.c.key)
                    .join(RT, (RT.c.id == type_column) & (RT.c.tenant_id == tenant_id))
                    .where(table.c.tenant_id == tenant_id, table.c.id.in_(wanted))
                ).all()
            )
    return sorted(pairs)


def accept_risk(conn, connection, ticket, snap: dict, who: str, now) -> list[int]:
    """``waiver`` exemptions for the record's accepted risk (gateway/posture/edits.py, so the
    recommendations leave the score and the change is in their history): their ids."""
    from gateway.errors import APIError
    from gateway.posture import edits

    days = _risk_settings(connection).get("expiresInDays")
    name = ticket.remote_key or ticket.remote_id or f"ticket {ticket.id}"
    made = []
    for resource_id, type_key in _recommendation_scopes(conn, ticket):
        data = {
            "displayName": f"Risk accepted in {name}"[:200],
            "category": "waiver",
            "description": (
                f"Closed as '{snap.get('closeCode') or snap.get('state')}' in {name} "
                f"({connection.kind} connection {connection.id}); removed when the ticket reopens."
            ),
            "recommendationType": type_key,
            "resourceId": resource_id,
            "expiresOn": now + timedelta(days=int(days)) if days else None,
        }
        try:
            exemption_id, _ = edits.create_exemption(conn, ticket.tenant_id, data, actor=who, now=now)
        except APIError as exc:  # a resource merged away meanwhile: the others still apply
            log.warning("ITSM ticket %s: no exemption for resource %s: %s", ticket.id, resource_id, exc)
            continue
        made.append(exemption_id)
    return made


def revoke_risk(conn, tenant_id: int, exemption_ids, who: str, now) -> int:
    """Delete the exemptions a risk acceptance made (those deleted meanwhile are skipped)."""
    from gateway.errors import NotFound
    from gateway.posture import edits

    released = 0
    for exemption_id in exemption_ids:
        try:
            released += edits.delete_exemption(conn, tenant_id, int(exemption_id), actor=who, now=now)
        except NotFound:
            continue
    return released


# -- outbound: the customer's assignee and status override ------------------------------------------

OPERATIONS = ("assign",)


def customer_fields(conn, connection, ticket_id: int, event) -> int:
    """Queue what a customer's edit of an item's ``assignedTo`` / ``statusOverride`` says to its
    ticket: the ticket's assignee when the connection's ``assigneeMap`` names the person in the
    ITSM, else a work note; a status override as a work note.  An edit by an ITSM (``itsm:...``)
    is never sent back."""
    from .sync import _queue

    if (event.actor or "").startswith("itsm:"):
        return 0
    details = event.details or {}
    if "assignedTo" not in details and "statusOverride" not in details:
        return 0
    ticket = conn.execute(select(TK).where(TK.c.id == ticket_id)).first()
    item = [event.subject_type, event.subject_id]
    # field -> (the operation, its payload), one operation per field and edit
    wanted: dict[str, tuple[str, dict]] = {}
    if "assignedTo" in details:
        person = details["assignedTo"]
        remote = ((connection.settings or {}).get("assigneeMap") or {}).get(person) if person else None
        if remote != (ticket.inbound or {}).get("sentAssignee"):
            # recorded before the call: the record then naming that person is the gateway's doing
            inbound = {**(ticket.inbound or {}), "sentAssignee": remote}
            conn.execute(update(TK).where(TK.c.id == ticket.id).values(inbound=inbound))
        if remote:
            wanted["assignedTo"] = ("assign", {"assignee": remote, "person": person, "item": item})
        else:
            said = f"Assigned to {person}" if person else "Unassigned"
            wanted["assignedTo"] = ("comment", {"text": said + " in the partner gateway", "item": item})
    if "statusOverride" in details:
        value = details["statusOverride"]
        said = f"Status override set to {value}" if value else "Status override cleared"
        wanted["statusOverride"] = ("comment", {"text": said + " in the partner gateway", "item": item})
    queued = 0
    for name, (kind, payload) in wanted.items():
        if kind == "comment":
            payload["text"] += f" ({event.subject_type} {event.subject_id}, by {event.actor})."
        queued += _queue(conn, ticket, kind, f"edit:{event.id}:{name}", payload)
    return queued


def assigned_by_gateway(previous: dict, snap: dict) -> bool:
    """Whether the record's assignee is the one the gateway last sent (ServiceNow sys_id, Jira
    account id): not taken back in, even when a webhook of that change comes before its answer."""
    sent = previous.get("sentAssignee")
    return bool(sent) and snap.get("assigneeId") == sent


def execute(client, op, ticket, ref: str) -> dict:
    """Run an operation of :data:`OPERATIONS` (gateway/itsm/deliver.py): the ticket's assignee.
    The record is read back and what it now says of its assignee is kept as the ticket's inbound
    state, so that neither the next poll nor a webhook takes the gateway's own change back in."""
    from .inbound import jira_snapshot, sn_snapshot

    assignee = str((op.payload or {}).get("assignee") or "")
    if client.connection.kind == "servicenow":
        client.update(ref, {"assigned_to": assignee})
        answer = client.request(
            "GET",
            client._path(),
            params={
                "sysparm_query": f"sys_id={ref}",
                "sysparm_fields": "sys_id,state,close_code,assigned_to,sys_updated_on",
                "sysparm_display_value": "all",
                "sysparm_limit": "1",
            },
        )
        found = (answer or {}).get("result") or []
        snap = sn_snapshot(found[0]) if found else None
    else:
        client.request("PUT", f"/rest/api/3/issue/{quote(ref)}/assignee", body={"accountId": assignee})
        issue = client.request(
            "GET", f"/rest/api/3/issue/{quote(ref)}", params={"fields": "assignee,updated"}
        )
        snap = jira_snapshot(issue) if issue else None
    if snap is None:
        return {}
    return {"inbound": {**(ticket.inbound or {}), "assignee": snap["assignee"]}}
