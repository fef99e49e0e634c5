"""Running rules: each rule follows the outbox with its own cursor, like a destination.

**Dispatch** (beat, ``workers.automation_tasks.dispatch_automations``): sequence the committed events
(gateway/export/events.py) and enqueue one task per enabled rule that has events after its cursor,
is past its backoff and is not held; and the snapshot jobs that are due (gateway/export/snapshot.py).

**A run** (:func:`run_rule`) takes the rule's lease (one worker runs a rule at a time, so its events
are handled in order and a second task for it returns at once), reads a window of the tenant's events
after the cursor, keeps those whose type the trigger names and whose subject its ``$filter`` matches
now (in SQL, for the window), and for each, in order, runs the actions in order:

* **Once per (rule, event, action).**  ``automation_actions_done`` holds a row per action done.  A
  ``setFields`` or ``createTicket`` action inserts its row in the transaction of its edit, so it
  happens exactly once.  A ``webhook`` is sent, then its row is written: a worker killed in between
  sends it again with the same ``webhook-id`` (at least once; the receiver drops the duplicate).
  Running the task twice, or replaying events, repeats nothing done.
* **Errors stay with the rule.**  An action that fails stops the rule at that event: its cursor stays
  before it, ``lastError`` says what failed, and the rule waits ``EXPORT_RETRY_*`` backoff, then
  takes the event up again (the actions done are not repeated).  A rule that has been failing for
  ``AUTOMATION_FAILING_AFTER_SECONDS`` (``failingSince``, no event acted on meanwhile) shows
  ``state: failing``; the first event it gets past makes it ``active`` again.  Other rules and the merge never
  wait for it: each rule is its own task, after the merge committed.
* **Chain limit.**  A rule's edits are recorded with actor ``automation:<rule ids>``, the chain of
  rules that led to them.  A rule ignores events its own edits caused (its id is in the chain) and
  events caused by a chain of ``AUTOMATION_MAX_CHAIN`` rules, so rules cannot trigger each other
  forever.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import exists, select, update
from sqlalchemy.engine import Connection

from gateway.export import delivery, lease, subjects
from gateway.export import events as outbox
from gateway.export import snapshot as snapshots
from gateway.export.secrets import SecretUnreadable, unseal
from gateway.merge.sql import insert_for
from gateway.models import AutomationActionDone, AutomationRule, LifecycleEvent, Tenant, utcnow

from . import actions

log = logging.getLogger(__name__)

RULE, DONE, EV, TEN = (
    AutomationRule.__table__,
    AutomationActionDone.__table__,
    LifecycleEvent.__table__,
    Tenant.__table__,
)
WINDOW = 200
ACTOR_PREFIX = "automation:"
RECOVERED = {"state": "active", "failing_since": None}  # an event acted on (or passed): not failing


def chain_of(actor: str | None) -> list[int]:
    """The rule ids whose edits led to an event (empty for anything else)."""
    if not actor or not actor.startswith(ACTOR_PREFIX):
        return []
    return [int(part) for part in actor[len(ACTOR_PREFIX) :].split(">") if part.isdigit()]


def actor_for(rule_id: int, event_actor: str | None) -> str:
    return ACTOR_PREFIX + ">".join(str(i) for i in [*chain_of(event_actor), rule_id])


def triggers(rule, event, max_chain: int) -> bool:
    """The trigger's event types, and the chain limit (not the filter: see :func:`matching`)."""
    if not outbox.matches_type(rule.event_types or [], outbox.event_type(event.subject_type, event.event)):
        return False
    chain = chain_of(event.actor)
    return rule.id not in chain and len(chain) < max_chain


def matching(conn: Connection, rule, events: list, max_chain: int) -> list:
    """Of ``events`` (in order), those that trigger the rule now."""
    wanted = [row for row in events if triggers(rule, row, max_chain)]
    if rule.filter and wanted:
        by_subject: dict[str, list[int]] = defaultdict(list)
        for row in wanted:
            by_subject[row.subject_type].append(row.subject_id)
        allowed = {
            (subject, found)
            for subject, ids in by_subject.items()
            for found in subjects.matching(conn, rule.tenant_id, subject, ids, rule.filter)
        }
        wanted = [row for row in wanted if (row.subject_type, row.subject_id) in allowed]
    return wanted


# -- dispatch -----------------------------------------------------------------------------------


def due(conn: Connection, now: datetime, lease_seconds: int) -> list[int]:
    """Enabled rules with events after their cursor, past their backoff, not held or recently sent."""
    waiting = exists().where(EV.c.tenant_id == RULE.c.tenant_id, EV.c.seq > RULE.c.cursor_seq)
    ready = lease.to_enqueue(RULE, now, lease_seconds)
    query = select(RULE.c.id).where(RULE.c.enabled.is_(True), *ready, waiting)
    return conn.execute(query.order_by(RULE.c.id)).scalars().all()


def dispatch(
    db, config: dict, send_rule: Callable[[int], None], send_snapshot: Callable[[int], None]
) -> tuple[list[int], list[int]]:
    """Sequence new events; enqueue every due rule and snapshot job.  Returns their ids."""
    outbox.sequence_events(db)
    now = utcnow()
    lease_seconds = int(config["EXPORT_LEASE_SECONDS"])
    with db.reader.connect() as conn:
        rule_ids = due(conn, now, lease_seconds)
        job_ids = snapshots.due(conn, now)
    sent_rules, sent_jobs = [], []
    for rule_id in rule_ids:
        try:
            send_rule(rule_id)
        except Exception:  # noqa: BLE001 - the broker is down: the next run tries again
            log.exception("could not enqueue automation rule %s", rule_id)
            continue
        with db.engine.begin() as conn:
            conn.execute(update(RULE).where(RULE.c.id == rule_id).values(enqueued_at=now))
        sent_rules.append(rule_id)
    for job_id in job_ids:
        try:
            send_snapshot(job_id)
            sent_jobs.append(job_id)
        except Exception:  # noqa: BLE001
            log.exception("could not enqueue snapshot %s", job_id)
    return sent_rules, sent_jobs


# -- a run ----------------------------------------------------------------------------------------


def _claim(db, rule_id: int, owner: str, now: datetime, seconds: int) -> bool:
    due_now = lease.due(RULE, now)
    return lease.claim(
        db, RULE, rule_id, owner, now, seconds, RULE.c.enabled.is_(True), due_now, enqueued_at=None
    )


def is_done(conn: Connection, rule_id: int, event_id: int, index: int) -> bool:
    return (
        conn.execute(
            select(DONE.c.outcome).where(
                DONE.c.rule_id == rule_id, DONE.c.event_id == event_id, DONE.c.action_index == index
            )
        ).first()
        is not None
    )


def _mark(conn: Connection, rule, event_id: int, index: int, done: actions.Done, now: datetime) -> bool:
    """Record the action as done; False when it already was (another run did it)."""
    return (
        conn.execute(
            insert_for(conn, DONE)
            .values(
                rule_id=rule.id,
                event_id=event_id,
                action_index=index,
                tenant_id=rule.tenant_id,
                outcome=done.outcome,
                detail=done.detail[:500],
                done_at=now,
            )
            .on_conflict_do_nothing()
            .returning(DONE.c.rule_id)
        ).first()
        is not None
    )


def run_rule(db, config: dict, rule_id: int, owner: str | None = None, clock=utcnow) -> dict:
    """Run the rule over the events after its cursor (see the module's docstring):
    ``{"status": idle|failed|busy|budget|gone, "fired": events acted on}``."""
    owner = owner or uuid.uuid4().hex
    lease_seconds = int(config["EXPORT_LEASE_SECONDS"])
    if not _claim(db, rule_id, owner, clock(), lease_seconds):
        return {"status": "busy", "fired": 0}
    started, fired = time.monotonic(), 0
    try:
        with db.engine.connect() as conn:
            while True:
                status, count = _window(conn, config, rule_id, owner, clock, lease_seconds)
                fired += count
                if status != "continue":
                    return {"status": status, "fired": fired}
                if time.monotonic() - started > lease_seconds / 2:
                    return {"status": "budget", "fired": fired}
    finally:
        lease.release(db, RULE, rule_id, owner)


def _window(
    conn: Connection, config: dict, rule_id: int, owner: str, clock, lease_seconds: int
) -> tuple[str, int]:
    now = clock()
    with conn.begin():
        rule = conn.execute(select(RULE).where(RULE.c.id == rule_id)).first()
        if rule is None or rule.lease_owner != owner or not rule.enabled:
            return "gone", 0
        rows = conn.execute(
            select(EV)
            .where(EV.c.tenant_id == rule.tenant_id, EV.c.seq > rule.cursor_seq)
            .order_by(EV.c.seq)
            .limit(WINDOW)
        ).all()
        if not rows:
            return "idle", 0
        wanted = matching(conn, rule, rows, int(config["AUTOMATION_MAX_CHAIN"]))
        tenant = conn.execute(select(TEN.c.external_id).where(TEN.c.id == rule.tenant_id)).scalar_one()
        conn.execute(
            update(RULE)
            .where(RULE.c.id == rule.id, RULE.c.lease_owner == owner)
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds), last_run_at=now)
        )
    fired = 0
    for event in wanted:
        try:
            _act(conn, config, rule, tenant, event, clock())
        except actions.ActionFailed as exc:
            _failed(conn, config, rule, owner, event, str(exc), clock())
            return "failed", fired
        fired += 1
        with conn.begin():
            conn.execute(
                update(RULE)
                .where(RULE.c.id == rule.id, RULE.c.lease_owner == owner)
                .values(
                    cursor_seq=event.seq,
                    fired_events=RULE.c.fired_events + 1,
                    attempts=0,
                    **RECOVERED,
                )
            )
    with conn.begin():  # past the window (the events after the last one acted on triggered nothing)
        conn.execute(
            update(RULE)
            .where(RULE.c.id == rule.id, RULE.c.lease_owner == owner)
            .values(cursor_seq=rows[-1].seq, attempts=0, next_attempt_at=None, **RECOVERED)
        )
    return "continue", fired


def _secret(config: dict, rule) -> str | None:
    if not rule.secret:
        return None
    try:
        return unseal(config, rule.secret)
    except SecretUnreadable as exc:
        raise actions.ActionFailed(str(exc)) from None


def _act(conn: Connection, config: dict, rule, tenant: str, event, now: datetime) -> None:
    """Every action of the rule not yet done for the event, in order."""
    rendered = None
    actor = actor_for(rule.id, event.actor)
    for index, action in enumerate(rule.actions or []):
        kind = action["type"]
        if kind == "webhook":
            with conn.begin():
                if is_done(conn, rule.id, event.id, index):
                    continue
                if rendered is None:
                    found = delivery.render_events(conn, rule.tenant_id, tenant, [event.id])
                    rendered = (
                        found[0] if found else delivery.delivered_form(delivery.present(event), tenant, None)
                    )
            done = actions.send_webhook(
                config, rule, _secret(config, rule), event.id, index, action["url"], rendered
            )
            with conn.begin():
                _mark(conn, rule, event.id, index, done, now)
            continue
        with conn.begin():  # the row first: the edit is written only by the run that inserted it
            if not _mark(conn, rule, event.id, index, actions.Done("done", ""), now):
                continue
            if kind == "setFields":
                done = actions.set_fields(conn, rule, event, index, action.get("fields") or {}, actor, now)
            else:
                done = actions.create_ticket(conn, rule, event, index, int(action["connectionId"]), actor)
            conn.execute(
                update(DONE)
                .where(DONE.c.rule_id == rule.id, DONE.c.event_id == event.id, DONE.c.action_index == index)
                .values(outcome=done.outcome, detail=done.detail[:500])
            )
        for start in done.after_commit:
            start()


def _failed(conn: Connection, config: dict, rule, owner: str, event, error: str, now: datetime) -> None:
    with conn.begin():
        attempts, failing_since = conn.execute(
            select(RULE.c.attempts, RULE.c.failing_since).where(RULE.c.id == rule.id)
        ).one()
        attempts += 1
        failing_since = failing_since or now
        long_enough = (now - failing_since).total_seconds() >= config["AUTOMATION_FAILING_AFTER_SECONDS"]
        delay = delivery.backoff(
            attempts, config["EXPORT_RETRY_BASE_SECONDS"], config["EXPORT_RETRY_MAX_SECONDS"], None
        )
        conn.execute(
            update(RULE)
            .where(RULE.c.id == rule.id, RULE.c.lease_owner == owner)
            .values(
                cursor_seq=event.seq - 1 if event.seq - 1 > rule.cursor_seq else RULE.c.cursor_seq,
                attempts=attempts,
                failing_since=failing_since,
                state="failing" if long_enough else RULE.c.state,
                next_attempt_at=now + timedelta(seconds=delay),
                last_error=f"event {event.id}: {error}"[:2000],
                last_error_at=now,
            )
        )
    log.info(
        "automation rule %s: event %s failed (%s); next attempt in %.1fs", rule.id, event.id, error, delay
    )
