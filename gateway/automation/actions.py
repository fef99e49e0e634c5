"""The action kinds of automation rules: checked when a rule is saved, run on an event, described
for a dry run.

* ``{"type": "webhook", "url": "https://..."}``: POST the event (as a destination receives it) signed
  per Standard Webhooks with the rule's secret (gateway/export/webhook.py; the SSRF guard of
  gateway/export/kinds.py applies), ``webhook-id`` ``auto_<rule>_<event>_<action index>``, the same
  on a retry.  A non-2xx answer or no answer is an error (the rule retries it with backoff).
* ``{"type": "setFields", "fields": {...}}``: the customer-owned fields ``PATCH`` takes for the
  subject (alerts: status, assignedTo, feedback, comments, tags, closedDateTime; findings and
  recommendations: statusOverride, assignedTo, comments, tags), written by ``gateway.query.apply_edit``
  with history (cause ``automation rule <id>``, actor ``automation:<chain of rule ids>``).  Fields
  the subject's collection does not take are left out (a finding has no alert status).
* ``{"type": "createTicket", "connectionId": "3"}``: a ticket in the tenant's ITSM connection for
  the subject (a finding, recommendation or alert) through ``gateway.itsm.sync.open_tickets``:
  exactly one ticket per item and connection, grouped as the connection's rule for that collection
  says; the ITSM workers create the remote record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from marshmallow import ValidationError
from sqlalchemy import select
from sqlalchemy.engine import Connection

from gateway.errors import BadRequest
from gateway.export import kinds
from gateway.export import webhook as signed_webhook
from gateway.models import ItsmConnection, ItsmRule, LifecycleEvent
from gateway.query import apply_edit

TYPES = ("webhook", "setFields", "createTicket")
# subject type -> the collection whose workflow (PATCH) fields setFields writes and tickets follow
WORKFLOW_COLLECTION = {"finding": "findings", "recommendation": "recommendations", "alert": "alerts"}
CN, RU, EV = ItsmConnection.__table__, ItsmRule.__table__, LifecycleEvent.__table__
WEBHOOK = signed_webhook.WebhookKind()


class ActionFailed(Exception):
    """An action could not be done now (its message is the rule's ``lastError``); it is retried."""


@dataclass
class Done:
    """What an action did: its outcome (``done`` or ``skipped``), a line saying what, and work to
    start once the transaction that recorded it has committed."""

    outcome: str
    detail: str
    after_commit: list[Callable[[], None]] = field(default_factory=list)


def _collections():
    from gateway.api.collections import COLLECTIONS

    return COLLECTIONS


def _schema(subject_type: str):
    return _collections()[WORKFLOW_COLLECTION[subject_type]].workflow.patch_schema


def applicable(subject_type: str, fields_: dict) -> dict:
    """The part of ``fields_`` the subject's collection takes, loaded (ValidationError when invalid)."""
    if subject_type not in WORKFLOW_COLLECTION:
        return {}
    schema = _schema(subject_type)
    names = [name for name in fields_ if name in schema().fields]
    if not names:
        return {}
    return schema(only=names).load({name: fields_[name] for name in names})


def _invalid(index: int, message: str) -> BadRequest:
    return BadRequest(
        f"actions[{index}]: {message}", code="invalidBody", details={"actions": {str(index): [message]}}
    )


def check(
    conn: Connection, tenant_id: int, actions: list[dict], subject_types: list[str], allow_private: bool
):
    """Each action's settings against the trigger's subject types and the tenant; 400 naming the first
    problem."""
    workflow_subjects = [s for s in subject_types if s in WORKFLOW_COLLECTION]
    for index, action in enumerate(actions):
        kind = action["type"]
        extra = sorted(
            set(action) - {"type", {"webhook": "url", "setFields": "fields"}.get(kind, "connectionId")}
        )
        if extra:
            raise _invalid(index, f"a {kind} action takes no '{extra[0]}'")
        if kind == "webhook":
            if not action.get("url"):
                raise _invalid(index, "a webhook action needs 'url'")
            try:
                kinds.check_url(action["url"], WEBHOOK.schemes, allow_private)
            except ValueError as exc:
                raise _invalid(index, f"the URL {exc}") from None
        elif kind == "setFields":
            wanted = action.get("fields") or {}
            if not wanted:
                raise _invalid(index, "a setFields action needs 'fields' (the fields to set)")
            if not workflow_subjects:
                raise _invalid(
                    index, "setFields acts on findings, recommendations and alerts: the trigger names none"
                )
            taken: set[str] = set()
            for subject_type in workflow_subjects:
                try:
                    taken |= set(applicable(subject_type, wanted))
                except ValidationError as exc:
                    raise _invalid(index, f"fields of a {subject_type}: {exc.messages}") from None
            unknown = sorted(set(wanted) - taken)
            if unknown:
                raise _invalid(index, f"no subject of the trigger has a field '{unknown[0][:40]}'")
        else:
            if not workflow_subjects:
                raise _invalid(
                    index, "createTicket acts on findings, recommendations and alerts: the trigger names none"
                )
            text = str(action.get("connectionId") or "")
            if (
                not (text.isascii() and text.isdigit() and len(text) <= 9)
                or connection(conn, tenant_id, int(text)) is None
            ):
                raise _invalid(index, f"the tenant has no ITSM connection '{text[:40]}'")


def connection(conn: Connection, tenant_id: int, connection_id: int):
    return conn.execute(select(CN).where(CN.c.tenant_id == tenant_id, CN.c.id == connection_id)).first()


def webhook_id(rule_id: int, event_id: int, index: int) -> str:
    return f"auto_{rule_id}_{event_id}_{index}"


def send_webhook(config: dict, rule, secret: str | None, event_id: int, index: int, url: str, rendered: dict):
    """POST one event, signed; raises ActionFailed with what went wrong."""
    if not secret:
        raise ActionFailed("the rule has no signing secret")
    target = kinds.Target(
        destination_id=rule.id,
        url=url,
        options={},
        secrets=[secret],
        batched=False,
        timeout=config["EXPORT_TIMEOUT_SECONDS"],
        allow_private=bool(config["EXPORT_ALLOW_PRIVATE_TARGETS"]),
    )
    outcome = WEBHOOK.deliver(target, webhook_id(rule.id, event_id, index), [rendered])
    if not outcome.ok:
        raise ActionFailed(f"action {index} (webhook): {outcome.error}")
    return Done("done", f"delivered ({outcome.status_code})")


def set_fields(conn: Connection, rule, event, index: int, wanted: dict, actor: str, now) -> Done:
    """The subject's workflow fields, with history; in the caller's transaction."""
    changes = applicable(event.subject_type, wanted)
    if not changes:
        return Done("skipped", f"a {event.subject_type} has none of these fields")
    collection = _collections()[WORKFLOW_COLLECTION[event.subject_type]]
    written = apply_edit(
        conn,
        collection,
        rule.tenant_id,
        [collection.id_column == event.subject_id],
        changes,
        actor,
        now,
        EV,
        cause=f"automation rule {rule.id}",
    )
    return Done("done" if written else "skipped", f"set {', '.join(sorted(changes))}" if written else "gone")


def create_ticket(conn: Connection, rule, event, index: int, connection_id: int, actor: str) -> Done:
    """A ticket for the subject (found when it has one); in the caller's transaction."""
    from gateway.itsm import sync

    collection = WORKFLOW_COLLECTION.get(event.subject_type)
    if collection is None:
        return Done("skipped", f"a {event.subject_type} gets no ticket")
    if connection(conn, rule.tenant_id, connection_id) is None:
        raise ActionFailed(
            f"action {index} (createTicket): the ITSM connection {connection_id} no longer exists"
        )
    if not sync.item_states(conn, rule.tenant_id, event.subject_type, [event.subject_id]):
        return Done("skipped", "gone")
    itsm_rule = conn.execute(
        select(RU.c.grouping)
        .where(RU.c.connection_id == connection_id, RU.c.collection == collection, RU.c.enabled.is_(True))
        .order_by(RU.c.id)
    ).first()
    tickets, made = sync.open_tickets(
        conn,
        rule.tenant_id,
        connection_id,
        collection,
        [event.subject_id],
        itsm_rule.grouping if itsm_rule is not None else "item",
        None,
        actor,
    )
    return Done(
        "done",
        f"ticket {tickets[0]} {'opened' if made else 'found'}",
        [lambda: _deliver_tickets(connection_id)],
    )


def _deliver_tickets(connection_id: int) -> None:
    from gateway.itsm.tasks import send_deliver

    send_deliver(connection_id)


def describe(conn: Connection, rule, event, index: int, action: dict) -> dict:
    """What the action would do for the event (a dry run: nothing is sent or written)."""
    kind = action["type"]
    if kind == "webhook":
        return {"url": action["url"], "webhookId": webhook_id(rule.id, event.id, index)}
    if kind == "setFields":
        try:
            changes = applicable(event.subject_type, action.get("fields") or {})
        except ValidationError as exc:
            return {"error": str(exc.messages)}
        return {"subjectType": event.subject_type, "changes": _jsonable(changes)}
    found = connection(conn, rule.tenant_id, int(action["connectionId"]))
    return {
        "connectionId": str(action["connectionId"]),
        "connection": None if found is None else found.name,
        "applies": event.subject_type in WORKFLOW_COLLECTION,
    }


def _jsonable(changes: dict) -> dict:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in changes.items()}
