"""From item changes to tickets and queued operations (no remote call here: gateway/itsm/deliver.py).

A scan of one connection reads its feed (gateway/itsm/feed.py) and, in the same transaction:

* for each changed item already in one of the connection's tickets: recomputes the ticket's desired
  state (open while any of its items is open; a group resolves when all its items have), its
  severity (the worst of its open items) and queues ``resolve`` / ``reopen`` / ``severity``
  operations when they change, and a ``comment`` for new evidence (one per event);
* for each new, opened, reopened or newly unhealthy item that is in none of the connection's
  tickets: the first automatic rule whose collection and ``$filter`` match it makes a ticket (one per
  item, or one per resource with its findings), with a ``create`` operation.

Everything written is keyed so that processing an event twice changes nothing: a ticket is unique
per (connection, subject), an item belongs to at most one ticket per connection, an operation is
unique per (ticket, dedupe key), and the desired state and severity are compared with the ticket's.
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import func, select, true, update

from gateway.merge.sql import insert_for
from gateway.models import (
    Alert,
    Finding,
    FindingSource,
    ItsmConnection,
    ItsmOp,
    ItsmRule,
    ItsmTicket,
    ItsmTicketItem,
    Recommendation,
    RecommendationType,
    Resource,
    utcnow,
)
from gateway.odata import FilterContext, parse_filter

from . import feed
from . import items as itsm_items
from .clients import SEVERITY_RANK

CN, RU, TK, TI, OP = (
    ItsmConnection.__table__,
    ItsmRule.__table__,
    ItsmTicket.__table__,
    ItsmTicketItem.__table__,
    ItsmOp.__table__,
)
F, S, R, RT, A, RS = (
    Finding.__table__,
    FindingSource.__table__,
    Recommendation.__table__,
    RecommendationType.__table__,
    Alert.__table__,
    Resource.__table__,
)
SUBJECT_OF = {"findings": "finding", "recommendations": "recommendation", "alerts": "alert"}
COLLECTION_OF = {subject: collection for collection, subject in SUBJECT_OF.items()}
OPENING_EVENTS = {"new", "opened", "reopened", "unhealthy"}
GROUPINGS = ("item", "resource")


def rule_condition(conn, tenant_id: int, collection: str, text: str | None):
    """The rule's ``$filter`` as a condition on the collection (400 invalidFilter when it is not one)."""
    from gateway.api.collections import COLLECTIONS

    if not text:
        return true()
    return parse_filter(
        text, COLLECTIONS[collection].fields, FilterContext(tenant_id=tenant_id, dialect=conn.dialect.name)
    ).condition


def matching(conn, tenant_id: int, collection: str, text: str | None, ids) -> set[int]:
    from gateway.api.collections import COLLECTIONS

    if not ids:
        return set()
    spec = COLLECTIONS[collection]
    query = spec.base(tenant_id).where(
        rule_condition(conn, tenant_id, collection, text), spec.id_column.in_(sorted(ids))
    )
    return {row.id for row in conn.execute(query)}


# -- the items' own state --------------------------------------------------------------------------


def item_states(conn, tenant_id: int, subject_type: str, ids) -> dict[int, dict]:
    """id -> {open, severity, resource_id} of items of one kind."""
    if not ids:
        return {}
    ids = sorted(ids)
    if subject_type == "finding":
        rows = conn.execute(
            select(F.c.id, F.c.state, F.c.severity, F.c.resource_id).where(
                F.c.tenant_id == tenant_id, F.c.id.in_(ids)
            )
        )
        return {
            r.id: {"open": r.state != "resolved", "severity": r.severity, "resource_id": r.resource_id}
            for r in rows
        }
    if subject_type == "recommendation":
        rows = conn.execute(
            select(R.c.id, R.c.status, R.c.severity, R.c.resource_id).where(
                R.c.tenant_id == tenant_id, R.c.id.in_(ids)
            )
        )
        return {
            r.id: {"open": r.status == "Unhealthy", "severity": r.severity, "resource_id": r.resource_id}
            for r in rows
        }
    rows = conn.execute(
        select(A.c.id, A.c.status, A.c.severity, A.c.resource_id).where(
            A.c.tenant_id == tenant_id, A.c.id.in_(ids)
        )
    )
    return {
        r.id: {"open": r.status != "resolved", "severity": r.severity, "resource_id": r.resource_id}
        for r in rows
    }


def worst(severities) -> str | None:
    known = [s for s in severities if s in SEVERITY_RANK]
    return max(known, key=SEVERITY_RANK.__getitem__) if known else None


def _queue(conn, ticket, kind: str, dedupe_key: str, payload: dict | None = None) -> bool:
    inserted = conn.execute(
        insert_for(conn, OP)
        .values(
            tenant_id=ticket.tenant_id,
            connection_id=ticket.connection_id,
            ticket_id=ticket.id,
            kind=kind,
            payload=payload or {},
            dedupe_key=dedupe_key,
            status="pending",
            attempts=0,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing()
        .returning(OP.c.id)
    ).first()
    return inserted is not None


def refresh_tickets(conn, tenant_id: int, ticket_ids, cause: str) -> int:
    """Bring the tickets' desired state and severity in line with their items; queue what changed."""
    queued = 0
    if not ticket_ids:
        return 0
    tickets = conn.execute(
        select(TK).where(TK.c.tenant_id == tenant_id, TK.c.id.in_(sorted(ticket_ids)))
    ).all()
    items = defaultdict(list)
    for row in conn.execute(
        select(TI.c.ticket_id, TI.c.subject_type, TI.c.subject_id).where(
            TI.c.ticket_id.in_([t.id for t in tickets])
        )
    ):
        items[row.ticket_id].append((row.subject_type, row.subject_id))
    by_type = defaultdict(set)
    for pairs in items.values():
        for subject_type, subject_id in pairs:
            by_type[subject_type].add(subject_id)
    states = {
        (kind, i): state
        for kind, ids in by_type.items()
        for i, state in item_states(conn, tenant_id, kind, ids).items()
    }
    for ticket in tickets:
        mine = [states[pair] for pair in items[ticket.id] if pair in states]
        if not mine:
            continue
        open_items = [s for s in mine if s["open"]]
        desired = "open" if open_items else "resolved"
        severity = worst(s["severity"] for s in (open_items or mine))
        values = {}
        if desired != ticket.desired_state:
            values["desired_state"] = desired
            # a transition per change: resolve after reopen after resolve are three operations
            changes = conn.execute(
                select(func.count())
                .select_from(OP)
                .where(OP.c.ticket_id == ticket.id, OP.c.kind.in_(("resolve", "reopen")))
            ).scalar()
            queued += _queue(
                conn,
                ticket,
                "resolve" if desired == "resolved" else "reopen",
                f"state:{changes + 1}",
                {"cause": cause},
            )
        if severity and severity != ticket.severity:
            values["severity"] = severity
            if ticket.severity is not None:
                queued += _queue(
                    conn, ticket, "severity", f"severity:{utcnow().isoformat()}", {"severity": severity}
                )
        if values:
            conn.execute(update(TK).where(TK.c.id == ticket.id).values(updated_at=utcnow(), **values))
    return queued


# -- making tickets --------------------------------------------------------------------------------


def open_tickets(
    conn,
    tenant_id: int,
    connection_id: int,
    collection: str,
    ids,
    grouping: str,
    rule_id: int | None,
    actor: str,
) -> tuple[list[int], int]:
    """Tickets for the items (``ids`` of ``collection``), made or found: (their ids, how many are new).

    The ticket row, its items and its ``create`` operation are written in the caller's transaction,
    which commits before any remote call is made."""
    subject_type = SUBJECT_OF[collection]
    states = item_states(conn, tenant_id, subject_type, ids)
    now, made, found = utcnow(), 0, []
    for item_id in sorted(states):
        state = states[item_id]
        if grouping == "resource" and state["resource_id"] is not None:
            subject = ("resource", state["resource_id"])
        else:
            subject = (subject_type, item_id)
        existing = conn.execute(
            select(TI.c.ticket_id).where(
                TI.c.connection_id == connection_id,
                TI.c.subject_type == subject_type,
                TI.c.subject_id == item_id,
            )
        ).scalar()
        if existing is not None:
            found.append(existing)
            continue
        created = conn.execute(
            insert_for(conn, TK)
            .values(
                tenant_id=tenant_id,
                connection_id=connection_id,
                rule_id=rule_id,
                subject_type=subject[0],
                subject_id=subject[1],
                collection=collection,
                sync_state="pending",
                desired_state="open",
                severity=state["severity"],
                create_attempts=0,
                created_at=now,
                updated_at=now,
                created_by=actor,
            )
            .on_conflict_do_nothing()
            .returning(TK.c.id)
        ).scalar()
        ticket_id = (
            created
            if created is not None
            else conn.execute(
                select(TK.c.id).where(
                    TK.c.connection_id == connection_id,
                    TK.c.subject_type == subject[0],
                    TK.c.subject_id == subject[1],
                )
            ).scalar_one()
        )
        added = conn.execute(
            insert_for(conn, TI)
            .values(
                ticket_id=ticket_id,
                subject_type=subject_type,
                subject_id=item_id,
                tenant_id=tenant_id,
                connection_id=connection_id,
                added_at=now,
            )
            .on_conflict_do_nothing()
            .returning(TI.c.ticket_id)
        ).first()
        ticket = conn.execute(select(TK).where(TK.c.id == ticket_id)).first()
        if created is not None:
            made += 1
            _queue(conn, ticket, "create", "create")
        elif added is not None:  # a new item of a group ticket
            _queue(
                conn,
                ticket,
                "comment",
                f"item:{subject_type}:{item_id}",
                {
                    "text": f"{subject_type.title()} {item_id} joined this ticket.",
                    "item": [subject_type, item_id],
                },
            )
        found.append(ticket_id)
    if found:
        refresh_tickets(conn, tenant_id, set(found), "items changed")
    return sorted(set(found)), made


# -- a scan ----------------------------------------------------------------------------------------


def _evidence_comment(conn, tenant_id: int, event) -> dict | None:
    details = event.details or {}
    if not details.get("providerId"):
        return None
    source = conn.execute(
        select(S.c.evidence, S.c.severity, S.c.state).where(
            S.c.tenant_id == tenant_id,
            S.c.finding_id == event.subject_id,
            S.c.provider == details.get("provider"),
            S.c.provider_id == details["providerId"],
        )
    ).first()
    evidence = (source.evidence or "") if source else ""
    text = (
        f"New evidence from {details.get('provider')} ({details['providerId']}): state "
        f"{details.get('state')}, severity {details.get('severity')}."
    )
    if evidence:
        text += "\n" + evidence[:2000]
    return {"text": text}


def _customer_comments(conn, ticket_id: int, event) -> int:
    """Comments a customer added to an item (PATCH) go to its ticket, one operation per comment.
    An edit the ITSM itself made (actor ``itsm:...``, gateway/itsm/inbound.py) is never sent back."""
    if (event.actor or "").startswith("itsm:"):
        return 0
    comments = (event.details or {}).get("comments") or []
    if not comments:
        return 0
    ticket = conn.execute(select(TK).where(TK.c.id == ticket_id)).first()
    queued = 0
    for n, comment in enumerate(comments):
        text = f"Comment by {comment.get('by') or event.actor} on {event.subject_type} {event.subject_id}:\n"
        queued += _queue(
            conn,
            ticket,
            "comment",
            f"edit:{event.id}:{n}",
            {"text": text + str(comment.get("text") or ""), "item": [event.subject_type, event.subject_id]},
        )
    return queued


def scan(conn, connection, limit: int = 5000) -> tuple[int, bool]:
    """Process the connection's feed once (in the caller's transaction): (operations queued, more)."""
    tenant_id = connection.tenant_id
    events, state, more = feed.read(conn, tenant_id, connection.feed_state, limit)
    queued = 0
    if events:
        queued += process_events(conn, connection, events)
    conn.execute(update(CN).where(CN.c.id == connection.id).values(feed_state=state))
    return queued, more


def process_events(conn, connection, events) -> int:
    tenant_id, queued = connection.tenant_id, 0
    changed = defaultdict(set)
    opening = defaultdict(set)
    for event in events:
        changed[event.subject_type].add(event.subject_id)
        if event.event in OPENING_EVENTS:
            opening[event.subject_type].add(event.subject_id)
    # items already in a ticket of this connection
    ticketed = {}
    for subject_type, ids in changed.items():
        for row in conn.execute(
            select(TI.c.subject_id, TI.c.ticket_id).where(
                TI.c.connection_id == connection.id,
                TI.c.subject_type == subject_type,
                TI.c.subject_id.in_(sorted(ids)),
            )
        ):
            ticketed[(subject_type, row.subject_id)] = row.ticket_id
    for event in events:
        ticket_id = ticketed.get((event.subject_type, event.subject_id))
        if ticket_id is not None and event.event == "edited":
            queued += _customer_comments(conn, ticket_id, event)
            queued += itsm_items.customer_fields(conn, connection, ticket_id, event)  # assignee, override
            continue
        if ticket_id is not None and event.subject_type == "finding" and event.event == "updated":
            comment = _evidence_comment(conn, tenant_id, event)
            if comment:
                ticket = conn.execute(select(TK).where(TK.c.id == ticket_id)).first()
                queued += _queue(conn, ticket, "comment", f"event:{event.id}", comment)
    queued += refresh_tickets(conn, tenant_id, set(ticketed.values()), "items changed")
    # automatic rules for opening items in no ticket yet
    rules = conn.execute(
        select(RU)
        .where(RU.c.connection_id == connection.id, RU.c.enabled.is_(True), RU.c.mode == "automatic")
        .order_by(RU.c.id)
    ).all()
    for rule in rules:
        subject_type = SUBJECT_OF[rule.collection]
        candidates = {i for i in opening.get(subject_type, ()) if (subject_type, i) not in ticketed}
        if not candidates:
            continue
        open_now = {i for i, s in item_states(conn, tenant_id, subject_type, candidates).items() if s["open"]}
        matched = matching(conn, tenant_id, rule.collection, rule.filter, open_now)
        if matched:
            tickets, made = open_tickets(
                conn,
                tenant_id,
                connection.id,
                rule.collection,
                matched,
                rule.grouping,
                rule.id,
                f"rule:{rule.id}",
            )
            queued += made
            ticketed.update({(subject_type, i): None for i in matched})
    return queued


# -- what a ticket says ----------------------------------------------------------------------------


def describe(conn, ticket) -> dict:
    """Title, description and severity of a ticket from its items now."""
    items = conn.execute(
        select(TI.c.subject_type, TI.c.subject_id)
        .where(TI.c.ticket_id == ticket.id)
        .order_by(TI.c.subject_id)
    ).all()
    ids = [i.subject_id for i in items]
    kind = items[0].subject_type if items else SUBJECT_OF.get(ticket.collection, "finding")
    lines, severities, titles, resource_name = [], [], [], None
    if kind == "finding" and ids:
        rows = conn.execute(
            select(
                F.c.id,
                F.c.title,
                F.c.severity,
                F.c.state,
                F.c.cve,
                F.c.description,
                F.c.remediation,
                RS.c.name,
            )
            .join(RS, RS.c.id == F.c.resource_id)
            .where(F.c.tenant_id == ticket.tenant_id, F.c.id.in_(ids))
            .order_by(F.c.id)
        ).all()
        for r in rows:
            resource_name = r.name
            severities.append(r.severity)
            titles.append(r.title)
            lines.append(f"- finding {r.id}: {r.title} ({r.cve or 'no CVE'}, {r.severity}, {r.state})")
        if len(rows) == 1:
            r = rows[0]
            lines += ["", r.description or "", "", "Remediation: " + (r.remediation or "none given")]
    elif kind == "recommendation" and ids:
        rows = conn.execute(
            select(R.c.id, R.c.status, R.c.severity, RT.c.title, RT.c.remediation, RS.c.name)
            .join(RT, (RT.c.id == R.c.type_id) & (RT.c.tenant_id == R.c.tenant_id))
            .join(RS, RS.c.id == R.c.resource_id)
            .where(R.c.tenant_id == ticket.tenant_id, R.c.id.in_(ids))
        ).all()
        for r in rows:
            resource_name = r.name
            severities.append(r.severity)
            titles.append(r.title)
            lines.append(f"- recommendation {r.id}: {r.title} ({r.severity}, {r.status})")
    elif ids:
        rows = conn.execute(
            select(A.c.id, A.c.title, A.c.severity, A.c.status, A.c.description).where(
                A.c.tenant_id == ticket.tenant_id, A.c.id.in_(ids)
            )
        ).all()
        for r in rows:
            severities.append(r.severity)
            titles.append(r.title)
            lines.append(f"- alert {r.id}: {r.title} ({r.severity}, {r.status})")
    severity = worst(severities) or "medium"
    where = f" on {resource_name}" if resource_name else ""
    if len(titles) == 1:
        title = f"[{severity}] {titles[0]}{where}"
    else:
        title = f"[{severity}] {len(titles)} {kind}s{where}"
    description = "\n".join(
        [f"Opened by the partner gateway for {kind} {', '.join(map(str, ids))}.", ""] + lines
    )
    return {"title": title, "description": description, "severity": severity, "kind": kind, "ids": ids,
            "titles": titles, "exempt": itsm_items.all_exempt(conn, ticket.tenant_id, kind, ids)}


def marker(ticket) -> str:
    """The gateway's id of the ticket's subject, carried by the remote record (correlation id, label)."""
    return f"gw-{ticket.connection_id}-{ticket.subject_type}-{ticket.subject_id}"
