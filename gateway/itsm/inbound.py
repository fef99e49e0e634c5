"""Inbound sync: what people do in the ticket comes back as the items' customer-owned fields.

DESIGN rule 3: the ITSM never writes a provider field (state, severity, evidence).  It writes what a
customer could write with ``PATCH``, through the same path (``gateway.query.apply_edit``), so that
every change leaves an ``edited`` lifecycle event whose actor is ``itsm:<connection id>``:

* the ticket's assignee -> ``assignedTo`` (a change of assignee, not every read of it);
* closed or cancelled as "won't fix" / "risk accepted" (ServiceNow state 8, or 6/7 with a close
  code of :data:`SN_RISK_CODES`; Jira a ``done`` status whose resolution or name is in
  :data:`JIRA_RISK_NAMES`) -> ``statusOverride`` ``riskAccepted``; reopened afterwards -> the
  override the ITSM set is cleared (one a customer set since is left alone);
* comments (ServiceNow journal ``comments`` and ``work_notes``, Jira comments) -> ``comments`` with
  their author as ``by``.

A grouped ticket applies to all its items (alerts take the assignee and the comments).

Two paths feed :func:`take_in`: :func:`poll` (the beat tick, a per-connection watermark in
``itsm_connections.poll_state``) and the webhook receiver (gateway/api/itsm.py).  Both are
idempotent: the ticket's ``inbound`` column holds what the ticket last said (a change is applied
once, a stale snapshot older than the last one is ignored), and every remote comment and webhook
delivery is recorded in ``itsm_inbound_seen`` before it is applied, in the same transaction.

No echo: a comment the gateway wrote carries its operation tag (``[gw-op-N]``) or is written by the
connection's own user, and is never taken in; an edit whose actor is ``itsm:...`` is never sent back
(gateway/itsm/sync.py).
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from gateway.merge.sql import insert_for
from gateway.models import (
    ItsmConnection,
    ItsmInboundSeen,
    ItsmTicket,
    ItsmTicketItem,
    LifecycleEvent,
    utcnow,
)
from gateway.vault import SecretsUnavailable

from . import items as itsm_items
from .clients import SN_STATES, RemoteError, adf_text

log = logging.getLogger(__name__)
CN, TK, TI, SEEN, EV = (
    ItsmConnection.__table__,
    ItsmTicket.__table__,
    ItsmTicketItem.__table__,
    ItsmInboundSeen.__table__,
    LifecycleEvent.__table__,
)
OWN_TAG = re.compile(r"\[gw-op-\d+\]")
SN_RISK_CODES = {"risk accepted", "accepted risk", "won't fix", "wont fix", "not solved (too costly)"}
JIRA_RISK_NAMES = {"won't do", "won't fix", "wont fix", "risk accepted", "accepted risk", "declined"}
COLLECTION_OF = {"finding": "findings", "recommendation": "recommendations", "alert": "alerts"}
PAGE = 200


def actor(connection) -> str:
    return f"itsm:{connection.id}"


# -- snapshots: what a remote record says, in the gateway's terms ------------------------------------


def _display(value) -> str | None:
    if isinstance(value, dict):  # sysparm_display_value=all, or a Jira user
        value = (
            value.get("display_value")
            or value.get("emailAddress")
            or value.get("displayName")
            or value.get("accountId")
            or value.get("value")
        )
    value = str(value or "").strip()
    return value or None


def _value(value) -> str:
    """The stored value of a ServiceNow field (``sysparm_display_value=all`` answers both)."""
    if isinstance(value, dict):
        value = value.get("value")
    return str(value or "").strip()


def sn_snapshot(record: dict) -> dict:
    state = _value(record.get("state"))
    code = _value(record.get("close_code")).lower()
    risk = state == "8" or (state in ("6", "7") and code in SN_RISK_CODES)
    return {
        "remote_id": _value(record.get("sys_id")),
        "updated": _value(record.get("sys_updated_on")),
        "assignee": _display(record.get("assigned_to")),
        "assigneeId": _value(record.get("assigned_to")) or None,  # the sys_user sys_id
        "closure": "riskAccepted" if risk else None,
        "state": SN_STATES.get(state, state),
        "done": state in ("6", "7", "8"),
        "closeCode": _value(record.get("close_code")) or None,
    }


def jira_snapshot(issue: dict) -> dict:
    fields = issue.get("fields") or {}
    status = fields.get("status") or {}
    category = (status.get("statusCategory") or {}).get("key")
    names = {
        str(status.get("name") or "").lower(),
        str((fields.get("resolution") or {}).get("name") or "").lower(),
    }
    risk = category == "done" and bool(names & JIRA_RISK_NAMES)
    return {
        "remote_id": str(issue.get("id") or ""),
        "key": issue.get("key"),
        "updated": str(fields.get("updated") or ""),
        "assignee": _display(fields.get("assignee")),
        "assigneeId": (fields.get("assignee") or {}).get("accountId"),
        "closure": "riskAccepted" if risk else None,
        "state": status.get("name"),
        "done": category == "done",
        "closeCode": (fields.get("resolution") or {}).get("name")
        or (status.get("name") if category == "done" else None),
    }


def jira_comment(comment: dict) -> dict:
    return {
        "id": str(comment.get("id")),
        "author": _display(comment.get("author")) or "unknown",
        "text": adf_text(comment.get("body")).strip(),
    }


def sn_comment(entry: dict) -> dict:
    return {
        "id": _value(entry.get("sys_id")),
        "author": _value(entry.get("sys_created_by")) or "unknown",
        "text": _value(entry.get("value")),
    }


# -- taking a snapshot in ------------------------------------------------------------------------------


def seen(conn, connection_id: int, key: str) -> bool:
    """Record ``key`` as taken in; True when it already was."""
    inserted = conn.execute(
        insert_for(conn, SEEN)
        .values(connection_id=connection_id, key=key[:300], seen_at=utcnow())
        .on_conflict_do_nothing()
        .returning(SEEN.c.key)
    ).first()
    return inserted is None


def own(connection, comment: dict) -> bool:
    """A comment the gateway wrote: its operation tag, or the connection's own user."""
    if OWN_TAG.search(comment["text"]):
        return True
    return bool(connection.username) and comment["author"] == connection.username


def ticket_for(conn, connection, snap: dict):
    query = select(TK).where(TK.c.connection_id == connection.id)
    if snap.get("key"):
        query = query.where((TK.c.remote_id == snap["remote_id"]) | (TK.c.remote_key == snap["key"]))
    else:
        query = query.where(TK.c.remote_id == snap["remote_id"])
    return conn.execute(query.order_by(TK.c.id)).first()


def take_in(conn, connection, snap: dict | None, comments=(), ticket=None) -> int:
    """Apply one remote record's state and comments to its ticket's items (in the caller's
    transaction): how many item edits were written."""
    from gateway.api.collections import COLLECTIONS
    from gateway.query import apply_edit

    if ticket is None:
        if not snap or not snap.get("remote_id"):
            return 0
        ticket = ticket_for(conn, connection, snap)
    if ticket is None:
        return 0
    previous = dict(ticket.inbound or {})
    changes: dict = {}
    clear_override = False
    followed = 0  # alerts closed or reopened with the record (gateway/itsm/items.py)
    full = snap is not None and "closure" in snap
    if full:
        snap = itsm_items.classify(connection, snap)
    stale = full and bool(
        previous.get("updated") and snap["updated"] and snap["updated"] < previous["updated"]
    )
    if full and not stale:
        if (
            snap["assignee"] != previous.get("assignee")
            and (not snap["assignee"] or snap["assignee"] != connection.username)
            and not itsm_items.assigned_by_gateway(previous, snap)
        ):
            changes["assignedTo"] = snap["assignee"]
        if snap["closure"] != previous.get("closure"):
            if snap["closure"] == "riskAccepted":
                changes["statusOverride"] = "riskAccepted"
            elif previous.get("closure") == "riskAccepted":
                clear_override = True
        followed, keep, values = itsm_items.follow(
            conn, connection, ticket, previous, snap, actor(connection), utcnow()
        )
        inbound = {
            **previous,
            "assignee": snap["assignee"],
            "closure": snap["closure"],
            "updated": snap["updated"] or previous.get("updated"),
            **keep,
        }
        values.update(inbound=inbound, updated_at=utcnow())
        if snap.get("state"):
            values["remote_state"] = snap["state"]
        conn.execute(update(TK).where(TK.c.id == ticket.id).values(**values))
    new_comments = []
    for comment in comments:
        if not comment["text"] or seen(conn, connection.id, f"comment:{ticket.id}:{comment['id']}"):
            continue
        if own(connection, comment):
            continue
        new_comments.append({"text": comment["text"][:4000], "by": comment["author"][:200]})
    if new_comments:
        changes["comments"] = new_comments
    if not changes and not clear_override:
        return followed
    linked = conn.execute(
        select(TI.c.subject_type, TI.c.subject_id)
        .where(TI.c.ticket_id == ticket.id)
        .order_by(TI.c.subject_id)
    ).all()
    now, who, written = utcnow(), actor(connection), followed
    for item in linked:
        collection = COLLECTIONS.get(COLLECTION_OF.get(item.subject_type, ""))
        if collection is None or collection.workflow is None:
            continue
        allowed = {k: v for k, v in changes.items() if k in collection.workflow.columns}
        condition = collection.id_column == item.subject_id
        if allowed:
            written += apply_edit(conn, collection, ticket.tenant_id, [condition], allowed, who, now, EV)
        if clear_override and "statusOverride" in collection.workflow.columns:
            column = collection.workflow.table.c[collection.workflow.columns["statusOverride"]]
            written += apply_edit(
                conn,
                collection,
                ticket.tenant_id,
                [condition, column == "riskAccepted"],
                {"statusOverride": None},
                who,
                now,
                EV,
            )
    return written


# -- polling -------------------------------------------------------------------------------------------


def _sn_since(state: dict, start: datetime) -> str:
    return state.get("since") or start.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def poll_servicenow(client, connection, state: dict, start: datetime):
    """[(snapshot, comments)] of the connection's records changed since the watermark, and the new
    watermark.  ``>=`` on the second-resolution ``sys_updated_on``: a change later in the same second
    as the last one read is not missed; what is read twice is applied once."""
    since = _sn_since(state, start)
    query = f"correlation_idSTARTSWITHgw-{connection.id}-^sys_updated_on>={since}^ORDERBYsys_updated_on"
    records, offset = [], 0
    while True:
        answer = client.request(
            "GET",
            client._path(),
            params={
                "sysparm_query": query,
                "sysparm_fields": "sys_id,number,state,close_code,assigned_to,sys_updated_on",
                # the assignee's name (a reference's value is a sys_id), the rest as stored
                "sysparm_display_value": "all",
                "sysparm_limit": str(PAGE),
                "sysparm_offset": str(offset),
            },
        )
        page = (answer or {}).get("result") or []
        records += page
        if len(page) < PAGE:
            break
        offset += PAGE
    journal: dict[str, list] = {}
    ids = [_value(r.get("sys_id")) for r in records if r.get("sys_id")]
    for n in range(0, len(ids), 50):
        chunk, offset = ids[n : n + 50], 0
        while True:
            answer = client.request(
                "GET",
                "/api/now/table/sys_journal_field",
                params={
                    "sysparm_query": f"element_idIN{','.join(chunk)}^elementINcomments,work_notes"
                    f"^sys_created_on>={since}^ORDERBYsys_created_on",
                    "sysparm_fields": "sys_id,element_id,element,value,sys_created_on,sys_created_by",
                    "sysparm_limit": str(PAGE),
                    "sysparm_offset": str(offset),
                },
            )
            page = (answer or {}).get("result") or []
            for entry in page:
                journal.setdefault(entry.get("element_id"), []).append(sn_comment(entry))
            if len(page) < PAGE:
                break
            offset += PAGE
    newest = max([since] + [_value(r.get("sys_updated_on")) for r in records])
    snapshots = [sn_snapshot(r) for r in records]
    return [(snap, journal.get(snap["remote_id"], [])) for snap in snapshots], {**state, "since": newest}


def poll_jira(client, connection, state: dict, start: datetime):
    """The same for Jira: JQL ``updated >= "yyyy-MM-dd HH:mm"`` (minute resolution, so the last
    minute is read again), pages by ``nextPageToken``, and each changed issue's comments."""
    since = state.get("since") or start.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    project = (connection.settings or {}).get("projectKey") or ""
    jql = f'project = "{project}" AND updated >= "{since}" ORDER BY updated ASC'
    issues, token = [], None
    while True:
        body = {
            "jql": jql,
            "fields": ["status", "assignee", "resolution", "updated", "labels"],
            "maxResults": 100,
        }
        if token:
            body["nextPageToken"] = token
        answer = client.request("POST", "/rest/api/3/search/jql", body=body) or {}
        issues += answer.get("issues") or []
        token = answer.get("nextPageToken")
        if not token or answer.get("isLast"):
            break
    marker = f"gw-{connection.id}-"
    out, newest = [], since
    for issue in issues:
        labels = (issue.get("fields") or {}).get("labels")
        if labels is not None and not any(str(label).startswith(marker) for label in labels):
            continue
        comments = (
            client.request(
                "GET",
                f"/rest/api/3/issue/{issue['key']}/comment",
                params={"maxResults": "100", "orderBy": "created"},
            )
            or {}
        )
        out.append((jira_snapshot(issue), [jira_comment(c) for c in comments.get("comments") or []]))
        updated = str((issue.get("fields") or {}).get("updated") or "")[:16].replace("T", " ")
        newest = max(newest, updated)
    return out, {**state, "since": newest}


def _stamp() -> str:
    return utcnow().isoformat().replace("+00:00", "Z")


def poll(db, config, connection_id: int) -> int:
    """One poll of a connection: its records changed since the watermark taken in, the watermark
    moved in the same transaction.  Returns how many item edits were written."""
    from .clients import client_for
    from .deliver import connection_for

    with db.engine.connect() as conn:
        row = conn.execute(select(CN).where(CN.c.id == connection_id)).first()
        if row is None or not row.enabled:
            return 0
        has_tickets = conn.execute(
            select(TK.c.id).where(TK.c.connection_id == row.id, TK.c.remote_id.is_not(None)).limit(1)
        ).first()
    if not has_tickets:
        return 0
    timeout = float(config.get("ITSM_TIMEOUT_SECONDS") or 20.0)
    start = row.created_at - timedelta(minutes=1)
    client = None
    try:
        client = client_for(connection_for(config, row), timeout)
        if row.kind == "servicenow":
            changed, state = poll_servicenow(client, row, dict(row.poll_state or {}), start)
        else:
            changed, state = poll_jira(client, row, dict(row.poll_state or {}), start)
    except (RemoteError, SecretsUnavailable) as exc:  # the watermark stays: the next tick reads again
        log.warning("ITSM connection %s: poll failed: %s", connection_id, exc)
        # shown as the connection's ``inbound`` (kept after a later success, with its time)
        failed = {**(row.poll_state or {}), "lastError": str(exc)[:500], "lastErrorAt": _stamp()}
        with db.engine.begin() as conn:
            conn.execute(update(CN).where(CN.c.id == row.id).values(poll_state=failed))
        return 0
    finally:
        if client is not None:
            client.close()
    written = 0
    with db.engine.begin() as conn:
        for snap, comments in changed:
            written += take_in(conn, row, snap, comments)
        state["lastPolledAt"] = _stamp()
        conn.execute(update(CN).where(CN.c.id == row.id).values(poll_state=state))
    return written


def parse_webhook(kind: str, payload: dict) -> tuple[dict | None, list[dict], str | None]:
    """(snapshot, comments, delivery id) of a webhook body.

    Jira: the ``jira:issue_*`` and ``comment_*`` events (``issue`` with its fields, ``comment``).
    ServiceNow: the outbound REST message of a business rule on the table, the record's fields
    (``sys_id``, ``state``, ``close_code``, ``assigned_to``, ``sys_updated_on``) and its new
    ``journal`` entries (``sys_id``, ``element``, ``value``, ``sys_created_by``)."""
    if kind == "jira":
        issue = payload.get("issue") if isinstance(payload.get("issue"), dict) else None
        snap = jira_snapshot(issue) if issue and issue.get("fields") else None
        if snap is None and issue:
            snap = {"remote_id": str(issue.get("id") or ""), "key": issue.get("key")}
        comment = payload.get("comment")
        comments = [jira_comment(comment)] if isinstance(comment, dict) and comment.get("id") else []
        delivery = None
        if payload.get("timestamp") and payload.get("webhookEvent"):
            delivery = f"{payload['webhookEvent']}:{(issue or {}).get('id')}:{payload['timestamp']}"
        return snap, comments, delivery
    record = payload.get("record") if isinstance(payload.get("record"), dict) else payload
    snap = sn_snapshot(record) if record.get("sys_id") else None
    journal = payload.get("journal") or []
    comments = [sn_comment(e) for e in journal if isinstance(e, dict) and e.get("sys_id")]
    return snap, comments, None
