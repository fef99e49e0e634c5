"""Delivery: the outbox to each destination, in order, at least once, by Celery tasks.

**Dispatch** (the beat task ``workers.tasks.dispatch_exports``, every
``EXPORT_DISPATCH_INTERVAL`` seconds): sequence the newly committed events
(gateway/export/events.py), then enqueue one delivery task per destination that is due (active or
failing, past its backoff, nobody holding its lease) and has events after its cursor.

**A delivery task** (:func:`deliver`) takes the destination's *lease* (``lease_owner``,
``lease_expires_at``: one worker delivers a destination at a time, which keeps its events in
order, hence each subject's), then repeats until nothing is left, a delivery fails, or half the
lease has passed:

1. If the destination has no ``pending`` batch, read the events after its cursor in sequence
   order (a window of up to 1,000), keep those whose type matches and whose subject the filter
   matches (in SQL, for the window's subject ids), and take the first ``batchSize`` of them.  A
   batch of several is *frozen* as ``pending`` (their ids and the position the cursor moves to
   once they are delivered), committed before anything is sent; a single event needs no freezing
   (its message id is its own, and a retry picks it again; a failed one is kept as ``pending``
   too).  A window where nothing matches just moves the cursor.
2. Render the pending events (their subjects as the read API shows them now), and hand them to
   the destination's kind (gateway/export/kinds.py) with a message id derived from the event ids:
   a retry resends exactly the same events under the same id.
3. Delivered: the cursor moves past the batch and ``pending`` is cleared, in one transaction.
   Failed: ``pending`` stays, the attempt count grows, the next attempt waits
   ``min(EXPORT_RETRY_MAX_SECONDS, EXPORT_RETRY_BASE_SECONDS * 2^(n-1))`` with jitter (half of it
   fixed, half random), or what ``Retry-After`` asked (up to an hour); once the destination has
   been failing for ``EXPORT_FAILING_AFTER_SECONDS`` its state is ``failing`` (the last error,
   status code and time are shown), and the first delivery that succeeds makes it ``active``
   again, from where it stopped.  ``410 Gone`` pauses it.

At least once: a worker killed after sending and before recording leaves ``pending`` and its
lease, which expires (``EXPORT_LEASE_SECONDS``); the next task resends the batch with the same
message id.  A receiver sees a duplicate only under the same id.  Every record is conditional on
still holding the lease and on the cursor being what the task read, so a replay or another
worker that took over meanwhile is never overwritten.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import case, exists, func, null, select, update
from sqlalchemy.engine import Connection

from gateway.export import events as outbox
from gateway.export import kinds, lease, subjects
from gateway.export import metrics as export_metrics
from gateway.export.secrets import SecretUnreadable, unseal
from gateway.models import ExportDelivery, ExportDestination, LifecycleEvent, Tenant, utcnow

log = logging.getLogger(__name__)

DEST, DLV, EV, TEN = (
    ExportDestination.__table__,
    ExportDelivery.__table__,
    LifecycleEvent.__table__,
    Tenant.__table__,
)
WINDOW = 1000
RENDER_AHEAD = 100  # events rendered ahead of their delivery, in one go
DELIVERING = ("active", "failing")
Clock = Callable[[], datetime]


# -- rendering ------------------------------------------------------------------------------------


def present(row) -> dict:
    """An event as ``/events`` shows it."""
    details = row.details
    if row.subject_type == "recommendation" and row.event in outbox.STATUS_NAMES:
        details = dict(details or {}, to=outbox.STATUS_NAMES[row.event])
    return {
        "id": str(row.id),
        "sequence": row.seq,
        "type": outbox.event_type(row.subject_type, row.event),
        "timestamp": row.at.isoformat().replace("+00:00", "Z"),
        "subjectType": row.subject_type,
        "subjectId": str(row.subject_id),
        "event": row.event,
        "cause": row.cause,
        "actor": row.actor,
        "batchId": None if row.batch_id is None else str(row.batch_id),
        "details": details,
    }


def delivered_form(item: dict, tenant: str, data: dict | None) -> dict:
    """An event as a destination receives it: the ``/events`` item, its tenant and its subject."""
    out = {}
    for key, value in item.items():
        out[key] = value
        if key == "timestamp":
            out["tenant"] = tenant
    out["data"] = data
    return out


def render_events(conn: Connection, tenant_id: int, tenant: str, ids: list[int]) -> list[dict]:
    """The events ``ids`` (in that order) with their subjects, as a destination receives them."""
    rows = {
        row.id: row for row in conn.execute(select(EV).where(EV.c.tenant_id == tenant_id, EV.c.id.in_(ids)))
    }
    wanted: dict[str, set[int]] = defaultdict(set)
    for row in rows.values():
        wanted[row.subject_type].add(row.subject_id)
    shown = subjects.render(conn, tenant_id, wanted)
    return [
        delivered_form(present(rows[i]), tenant, shown.get((rows[i].subject_type, rows[i].subject_id)))
        for i in ids
        if i in rows
    ]


def sample_event(destination_id: int, tenant: str, actor: str | None, now: datetime) -> dict:
    """The event a test delivery sends (type ``export.test``; no subject, no position)."""
    return {
        "id": "0",
        "sequence": None,
        "type": "export.test",
        "timestamp": now.isoformat().replace("+00:00", "Z"),
        "tenant": tenant,
        "subjectType": "export",
        "subjectId": str(destination_id),
        "event": "test",
        "cause": "test delivery",
        "actor": actor,
        "batchId": None,
        "details": {"message": "A test event from the partner gateway: the destination is reachable."},
        "data": None,
    }


# -- dispatch ---------------------------------------------------------------------------------------


def due(conn: Connection, now: datetime, lease_seconds: int) -> list[int]:
    """Destinations to enqueue now: delivering, past their backoff, not held, with events to go."""
    waiting = exists().where(EV.c.tenant_id == DEST.c.tenant_id, EV.c.seq > DEST.c.cursor_seq)
    ready = lease.to_enqueue(DEST, now, lease_seconds)
    query = select(DEST.c.id).where(DEST.c.state.in_(DELIVERING), *ready, waiting)
    return conn.execute(query.order_by(DEST.c.id)).scalars().all()


def dispatch(db, config: dict, send: Callable[[int], None], now: datetime | None = None) -> list[int]:
    """Sequence new events, then enqueue (``send``) every due destination; returns their ids."""
    outbox.sequence_events(db)
    now = now or utcnow()
    with db.reader.connect() as conn:
        ids = due(conn, now, config["EXPORT_LEASE_SECONDS"])
    sent = []
    for destination_id in ids:
        try:
            send(destination_id)
        except Exception:  # noqa: BLE001 - the broker is down: the next run tries again
            log.exception("could not enqueue the delivery of export %s", destination_id)
            continue
        with db.engine.begin() as conn:
            conn.execute(update(DEST).where(DEST.c.id == destination_id).values(enqueued_at=now))
        sent.append(destination_id)
    return sent


# -- delivering -----------------------------------------------------------------------------------


def backoff(
    attempts: int,
    base: float,
    maximum: float,
    retry_after: float | None,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds before the next attempt after ``attempts`` failures in a row."""
    if retry_after is not None:
        return max(retry_after, 0.0)
    delay = min(maximum, base * 2 ** max(attempts - 1, 0))
    return delay / 2 + rng() * delay / 2


def _claim(db, destination_id: int, owner: str, now: datetime, seconds: int) -> bool:
    workable = (DEST.c.state.in_(DELIVERING), lease.due(DEST, now))
    return lease.claim(db, DEST, destination_id, owner, now, seconds, *workable, enqueued_at=None)


def _release(db, destination_id: int, owner: str) -> None:
    lease.release(db, DEST, destination_id, owner)


def _held(destination_id: int, owner: str, cursor: int):
    """The record conditions: still this worker's lease, and the cursor it read."""
    return (DEST.c.id == destination_id, DEST.c.lease_owner == owner, DEST.c.cursor_seq == cursor)


class _Run:
    """One delivery task's view: the window of wanted events after the cursor, the events rendered
    ahead (a batch of queries for the next deliveries, not one per delivery), the tenant's id."""

    def __init__(self) -> None:
        self.matched: list = []
        self.through: int | None = None  # the last position the window read
        self.rendered: dict[int, dict] = {}
        self.tenant: str | None = None

    def fill(self, conn: Connection, dest) -> bool:
        rows = conn.execute(
            select(EV.c.id, EV.c.seq, EV.c.subject_type, EV.c.subject_id, EV.c.event)
            .where(EV.c.tenant_id == dest.tenant_id, EV.c.seq > dest.cursor_seq)
            .order_by(EV.c.seq)
            .limit(WINDOW)
        ).all()
        if not rows:
            return False
        patterns = dest.event_types or []
        wanted = [
            row
            for row in rows
            if outbox.matches_type(patterns, outbox.event_type(row.subject_type, row.event))
        ]
        if dest.filter and wanted:
            by_subject: dict[str, list[int]] = defaultdict(list)
            for row in wanted:
                by_subject[row.subject_type].append(row.subject_id)
            allowed = {
                (subject, found)
                for subject, ids in by_subject.items()
                for found in subjects.matching(conn, dest.tenant_id, subject, ids, dest.filter)
            }
            wanted = [row for row in wanted if (row.subject_type, row.subject_id) in allowed]
        self.matched, self.through = wanted, rows[-1].seq
        return True

    def take(self, size: int) -> tuple[list, int]:
        chosen, self.matched = self.matched[:size], self.matched[size:]
        through = self.through if not self.matched else chosen[-1].seq
        return chosen, through

    def render(self, conn: Connection, dest, ids: list[int]) -> list[dict]:
        if any(i not in self.rendered for i in ids):
            ahead = list(ids) + [row.id for row in self.matched[:RENDER_AHEAD] if row.id not in ids]
            for event in render_events(conn, dest.tenant_id, self.tenant, ahead):
                self.rendered[int(event["id"])] = event
        return [self.rendered.pop(i) for i in ids if i in self.rendered]


def deliver(
    db,
    config: dict,
    destination_id: int,
    owner: str | None = None,
    clock: Clock = utcnow,
    budget_seconds: float | None = None,
) -> dict:
    """Deliver what the destination is owed (see the module's docstring); returns a summary
    ``{"status": idle|failed|paused|busy|lost|budget, "delivered": events}``."""
    owner = owner or uuid.uuid4().hex
    lease = config["EXPORT_LEASE_SECONDS"]
    if not _claim(db, destination_id, owner, clock(), lease):
        return {"status": "busy", "delivered": 0}
    budget = lease / 2 if budget_seconds is None else budget_seconds
    started = time.monotonic()
    run, delivered = _Run(), 0
    try:
        with db.engine.connect() as conn:  # one connection for the run; a short transaction per step
            while True:
                status, count = _step(conn, config, destination_id, owner, clock(), run)
                delivered += count
                if status != "continue":
                    return {"status": status, "delivered": delivered}
                if time.monotonic() - started > budget:
                    return {"status": "budget", "delivered": delivered}
    finally:
        _release(db, destination_id, owner)


def _step(conn: Connection, config: dict, destination_id: int, owner: str, now: datetime, run: _Run):
    """Choose (or take up again) the next batch, send it, record the outcome: (status, events delivered)."""
    lease_until = now + timedelta(seconds=config["EXPORT_LEASE_SECONDS"])
    with conn.begin():  # committed before anything is sent
        dest = conn.execute(select(DEST).where(DEST.c.id == destination_id)).first()
        if dest is None or dest.lease_owner != owner:
            return "lost", 0
        if dest.state not in DELIVERING:
            return "paused", 0
        if run.tenant is None:
            run.tenant = conn.execute(
                select(TEN.c.external_id).where(TEN.c.id == dest.tenant_id)
            ).scalar_one()
        held = _held(destination_id, owner, dest.cursor_seq)
        pending = dest.pending
        if not pending:
            if not run.matched and not run.fill(conn, dest):
                return "idle", 0
            chosen, through = run.take(max(1, dest.batch_size))
            if not chosen:  # nothing in the window is wanted: pass it
                moved = conn.execute(
                    update(DEST).where(*held).values(cursor_seq=through, lease_expires_at=lease_until)
                ).rowcount
                return ("continue" if moved else "lost"), 0
            pending = {
                "ids": [row.id for row in chosen],
                "through": through,
                "seqs": [chosen[0].seq, chosen[-1].seq],
            }
            # A batch of several is frozen before it is sent: a retry, even by another worker after this
            # one died, sends exactly it under the same message id.  One event needs no freezing: its id
            # is the event's own, and a retry picks the same event again.
            if (
                dest.batch_size > 1
                and not conn.execute(
                    update(DEST).where(*held).values(pending=pending, lease_expires_at=lease_until)
                ).rowcount
            ):
                return "lost", 0
        rendered = run.render(conn, dest, pending["ids"])
    message_id = kinds.message_id(pending["ids"], dest.batch_size > 1)
    if not rendered:  # its events are gone (nothing to send): the batch counts as delivered
        outcome = kinds.Outcome(True)
    else:
        outcome = _send(config, dest, now, config["EXPORT_TIMEOUT_SECONDS"], message_id, rendered)
    status = _record(conn, config, dest, owner, pending, message_id, outcome, now)
    export_metrics.observe(dest.kind, dest.id, outcome.ok, rendered, utcnow())
    return status, (len(rendered) if outcome.ok else 0)


def _send(
    config: dict, dest, now: datetime, timeout: float, message_id: str, rendered: list[dict]
) -> kinds.Outcome:
    try:
        target = _target(config, dest, now, timeout)
    except SecretUnreadable as exc:  # shown as the destination's error, retried like any failure
        return kinds.Outcome(False, error=str(exc))
    return kinds.get(dest.kind).deliver(target, message_id, rendered)


def _target(config: dict, dest, now: datetime, timeout: float) -> kinds.Target:
    found = []
    if dest.secret:
        found.append(unseal(config, dest.secret))
    if dest.previous_secret and dest.previous_secret_expires_at and dest.previous_secret_expires_at > now:
        found.append(unseal(config, dest.previous_secret))
    return kinds.Target(
        destination_id=dest.id,
        url=dest.url,
        options=dest.options or {},
        secrets=found,
        batched=dest.batch_size > 1,
        timeout=timeout,
        allow_private=bool(config["EXPORT_ALLOW_PRIVATE_TARGETS"]),
    )


def _log(
    conn: Connection,
    dest,
    now: datetime,
    message_id: str,
    outcome: kinds.Outcome,
    attempt: int,
    pending: dict | None,
    keep: int,
    kind: str,
) -> None:
    ids = (pending or {}).get("ids") or []
    seqs = (pending or {}).get("seqs") or [None, None]
    logged = conn.execute(
        DLV.insert()
        .values(
            destination_id=dest.id,
            tenant_id=dest.tenant_id,
            at=now,
            message_id=message_id,
            outcome=kind,
            attempt=attempt,
            event_count=len(ids),
            first_event_id=ids[0] if ids else None,
            last_event_id=ids[-1] if ids else None,
            first_seq=seqs[0],
            last_seq=seqs[-1],
            status_code=outcome.status_code,
            duration_ms=outcome.duration_ms,
            error=None if outcome.ok else (outcome.error or "")[:2000],
        )
        .returning(DLV.c.id)
    ).scalar_one()
    if logged % 10 == 0 or not outcome.ok or kind == "test":  # the log is trimmed now and then, not each time
        oldest_kept = conn.execute(
            select(DLV.c.id)
            .where(DLV.c.destination_id == dest.id)
            .order_by(DLV.c.id.desc())
            .offset(keep - 1)
            .limit(1)
        ).scalar()
        if oldest_kept is not None:
            conn.execute(DLV.delete().where(DLV.c.destination_id == dest.id, DLV.c.id < oldest_kept))


def _record(
    conn: Connection,
    config: dict,
    dest,
    owner: str,
    pending: dict,
    message_id: str,
    outcome: kinds.Outcome,
    now: datetime,
) -> str:
    keep = max(1, config["EXPORT_DELIVERY_LOG_SIZE"])
    with conn.begin():
        held = _held(dest.id, owner, dest.cursor_seq)
        if outcome.ok:
            done = conn.execute(
                update(DEST)
                .where(*held)
                .values(
                    cursor_seq=pending["through"],
                    pending=null(),
                    attempts=0,
                    failing_since=None,
                    next_attempt_at=None,
                    state=case((DEST.c.state == "failing", "active"), else_=DEST.c.state),
                    last_delivered_at=now,
                    last_status_code=outcome.status_code,
                    delivered_events=DEST.c.delivered_events + len(pending["ids"]),
                    lease_expires_at=now + timedelta(seconds=config["EXPORT_LEASE_SECONDS"]),
                )
            ).rowcount
            _log(conn, dest, now, message_id, outcome, dest.attempts + 1, pending, keep, "delivered")
            return "continue" if done else "lost"
        attempts = dest.attempts + 1
        failing_since = dest.failing_since or now
        long_enough = (now - failing_since).total_seconds() >= config["EXPORT_FAILING_AFTER_SECONDS"]
        delay = backoff(
            attempts,
            config["EXPORT_RETRY_BASE_SECONDS"],
            config["EXPORT_RETRY_MAX_SECONDS"],
            outcome.retry_after,
        )
        state = (
            "paused"
            if outcome.pause
            else case((DEST.c.state == "active", "failing" if long_enough else "active"), else_=DEST.c.state)
        )
        conn.execute(
            update(DEST)
            .where(*held)
            .values(
                attempts=attempts,
                failing_since=failing_since,
                state=state,
                next_attempt_at=now + timedelta(seconds=delay),
                pending=pending,  # the retry sends this batch again
                last_error=(outcome.error or "")[:2000],
                last_error_at=now,
                last_status_code=outcome.status_code,
            )
        )
        _log(conn, dest, now, message_id, outcome, attempts, pending, keep, "failed")
    log.info(
        "export %s: delivery %s failed (%s); next attempt in %.1fs", dest.id, message_id, outcome.error, delay
    )
    return "paused" if outcome.pause else "failed"


# -- on request: test, replay, status -------------------------------------------------------------------


def send_test(db, config: dict, dest, tenant: str, actor: str | None) -> tuple[str, kinds.Outcome]:
    """Send one sample event now (in the request, with the short test timeout) and log it."""
    now = utcnow()
    message_id = f"test_{uuid.uuid4().hex[:20]}"
    outcome = _send(
        config,
        dest,
        now,
        config["EXPORT_TEST_TIMEOUT_SECONDS"],
        message_id,
        [sample_event(dest.id, tenant, actor, now)],
    )
    with db.engine.begin() as conn:
        _log(
            conn, dest, now, message_id, outcome, 1, None, max(1, config["EXPORT_DELIVERY_LOG_SIZE"]), "test"
        )
    return message_id, outcome


def replay_position(conn: Connection, tenant_id: int, since: int | datetime) -> tuple[int | None, int | None]:
    """(the position to move the cursor to, the first event's id) for a replay from an event id
    (that event and every later one) or a time (every event at or after it); (None, None) when
    nothing qualifies (yet)."""
    if isinstance(since, int):
        found = conn.execute(
            select(EV.c.seq, EV.c.id).where(EV.c.tenant_id == tenant_id, EV.c.id == since)
        ).first()
    else:
        found = conn.execute(
            select(EV.c.seq, EV.c.id)
            .where(EV.c.tenant_id == tenant_id, EV.c.seq.is_not(None), EV.c.at >= since)
            .order_by(EV.c.seq)
            .limit(1)
        ).first()
    if found is None or found.seq is None:
        return None, found.id if found is not None else None
    return found.seq - 1, found.id


def replay(conn: Connection, dest, since: int | datetime, actor: str | None, now: datetime) -> dict:
    """Move the cursor back so that delivery resumes from ``since``; clears the pending batch and the
    backoff.  Never moves the cursor forward: an event after the cursor, or not yet sequenced, is
    still to be delivered anyway."""
    position, first_id = replay_position(conn, dest.tenant_id, since)
    cursor = dest.cursor_seq
    if position is not None and position < cursor:
        conn.execute(
            update(DEST)
            .where(DEST.c.id == dest.id)
            .values(
                cursor_seq=position,
                pending=null(),
                attempts=0,
                next_attempt_at=None,
                updated_at=now,
                updated_by=actor,
            )
        )
        log.info("export %s replays from position %s (event %s)", dest.id, position + 1, first_id)
        cursor = position
    return {"fromEventId": None if first_id is None else str(first_id), "cursorSequence": cursor}


def lag(conn: Connection, dest, now: datetime) -> dict:
    """How far behind the destination is: the tenant's latest position, the events after the cursor
    (before the filter, counted up to 10,000), and the age of the oldest of them."""
    latest = conn.execute(select(func.max(EV.c.seq)).where(EV.c.tenant_id == dest.tenant_id)).scalar()
    waiting = (
        select(EV.c.id).where(EV.c.tenant_id == dest.tenant_id, EV.c.seq > dest.cursor_seq).limit(10_001)
    )
    pending = conn.execute(select(func.count()).select_from(waiting.subquery())).scalar_one()
    oldest = conn.execute(
        select(EV.c.at)
        .where(EV.c.tenant_id == dest.tenant_id, EV.c.seq > dest.cursor_seq)
        .order_by(EV.c.seq)
        .limit(1)
    ).scalar()
    return {
        "latest_sequence": latest or 0,
        "pending_events": pending,
        "lag_seconds": round(max(0.0, (now - oldest).total_seconds()), 3) if oldest else 0.0,
    }


__all__ = [
    "backoff",
    "deliver",
    "dispatch",
    "due",
    "lag",
    "present",
    "render_events",
    "replay",
    "send_test",
]
