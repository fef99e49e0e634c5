"""Delivery: the outbox to each destination, in order, at least once, by Celery tasks.

**Dispatch** (the beat task ``workers.tasks.dispatch_exports``, every
``EXPORT_DISPATCH_INTERVAL`` seconds): sequence the newly committed events
(gateway/export/events.py), then enqueue one delivery task per destination that is due (active or
failing, past its backoff, nobody holding its lease) and has events after its cursor.

**A delivery task** (:func:`deliver`) takes the destination's *lease* (``lease_owner``,
``lease_expires_at``: one worker delivers a destination at a time, which keeps its events in
order, hence each subject's), then works slice after slice until nothing is left, a delivery
fails, or half the lease has passed.  A slice costs a few statements whatever its size:

1. *Plan* (one transaction): read the window of up to ``WINDOW`` events after the cursor, keep
   those whose type matches and whose subject the filter matches (in SQL, for the window's subject
   ids), and cut them into messages of up to ``batchSize`` events (at most ``MAX_MESSAGES``).
   Each subject has a *lane* (a hash of it, ``EXPORT_PIPELINE_DEPTH`` lanes for the HTTP kinds,
   one for syslog and NATS, whose connection is the order); a message holds the events of one
   lane.  The plan (message ids, lanes, the position the cursor moves to) is frozen as ``pending``
   before anything is sent, and the slice's subjects are rendered at once (one query per subject
   type: as the read API shows them now).  A window where nothing matches just moves the cursor.
2. *Send*: the lanes side by side (a thread and an HTTP session each, kept for the whole task so
   connections stay open), each lane's messages in order; a lane stops at its first failure and
   the others after their current message.  The kind (gateway/export/kinds.py) gets a message id
   derived from the event ids: a retry resends exactly the same events under the same id.  A
   destination that is failing sends one message first and opens the lanes only if it succeeds.
3. *Record* (one transaction): the cursor moves past every message delivered before the first one
   that was not (to the plan's end when all were); the messages not delivered stay frozen, in
   order, and are what the next attempt sends (the delivered ones are not sent again); the
   attempts are logged.  A failure counts one attempt: the next waits
   ``min(EXPORT_RETRY_MAX_SECONDS, EXPORT_RETRY_BASE_SECONDS * 2^(n-1))`` with jitter (half of it
   fixed, half random), or what ``Retry-After`` asked (up to an hour); once the destination has
   been failing for ``EXPORT_FAILING_AFTER_SECONDS`` (with no delivery meanwhile) its state is
   ``failing`` (the last error, status code and time are shown), and the first delivery that
   succeeds makes it ``active`` again, from where it stopped.  ``410 Gone`` pauses it.

Order: a subject's events are all in one lane, and a lane sends in order and stops at a failure,
so a subject's events never overtake each other; events of different subjects may arrive in
another order than their positions (set ``EXPORT_PIPELINE_DEPTH`` to 1 for one delivery at a time).

At least once: a worker killed after sending and before recording leaves ``pending`` and its
lease, which expires (``EXPORT_LEASE_SECONDS``); the next task resends the batch with the same
message id.  A receiver sees a duplicate only under the same id.  Every record is conditional on
still holding the lease and on the cursor being what the task read, so a replay or another
worker that took over meanwhile is never overwritten.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
import zlib
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timedelta

import requests
from sqlalchemy import case, exists, func, null, select, update
from sqlalchemy.engine import Connection

from gateway.export import events as outbox
from gateway.export import kinds, lease, subjects, webhook
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
WINDOW = 1000  # events read after the cursor for one slice
MAX_MESSAGES = 200  # deliveries planned in one slice
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


def lane_of(subject_type: str, subject_id: int, lanes: int) -> int:
    """The lane a subject's events travel in: always the same one, so they never overtake each other."""
    if lanes <= 1:
        return 0
    return zlib.crc32(f"{subject_type}:{subject_id}".encode()) % lanes


def wanted_events(conn: Connection, dest) -> tuple[list, int] | None:
    """The window after the cursor: (its events the destination wants, in order; its last position),
    or None when nothing is after the cursor."""
    rows = conn.execute(
        select(EV.c.id, EV.c.seq, EV.c.subject_type, EV.c.subject_id, EV.c.event)
        .where(EV.c.tenant_id == dest.tenant_id, EV.c.seq > dest.cursor_seq)
        .order_by(EV.c.seq)
        .limit(WINDOW)
    ).all()
    if not rows:
        return None
    patterns = dest.event_types or []
    wanted = [
        row for row in rows if outbox.matches_type(patterns, outbox.event_type(row.subject_type, row.event))
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
    return wanted, rows[-1].seq


def make_plan(wanted: list, window_end: int, batch_size: int, lanes: int, max_messages: int) -> dict:
    """A slice's deliveries: ``wanted`` (in order) cut into messages of up to ``batch_size`` events, each
    message holding the events of one lane only, listed in the order of their first event.  The
    plan is frozen (``pending``) before anything is sent, so that a retry sends the same messages
    under the same ids.  ``through`` is where the cursor goes once every message is delivered."""
    batch_size = max(1, batch_size)
    taken = wanted[: max_messages * batch_size]
    through = window_end if len(taken) == len(wanted) else taken[-1].seq
    lanes = min(lanes, -(-len(taken) // batch_size))  # no lane for batches the slice cannot fill
    open_: dict[int, int] = {}  # lane -> index of its message still filling
    messages: list[list[int]] = []
    firsts: list[int] = []
    lasts: list[int] = []
    lane_list: list[int] = []
    for row in taken:
        lane = lane_of(row.subject_type, row.subject_id, lanes)
        index = open_.get(lane)
        if index is None or len(messages[index]) >= batch_size:
            index = len(messages)
            open_[lane] = index
            messages.append([])
            firsts.append(row.seq)
            lasts.append(row.seq)
            lane_list.append(lane)
        messages[index].append(row.id)
        lasts[index] = row.seq
    return {"through": through, "messages": messages, "firsts": firsts, "lasts": lasts, "lanes": lane_list}


def _plan_of(pending: dict | None) -> dict | None:
    """The frozen plan; a batch frozen by an earlier version (``ids``, ``seqs``) is one message."""
    if not pending:
        return None
    if "messages" in pending:
        return pending
    seqs = pending.get("seqs") or [None, None]
    return {
        "through": pending["through"],
        "messages": [pending["ids"]],
        "firsts": [seqs[0]],
        "lasts": [seqs[-1]],
        "lanes": [0],
    }


class _Run:
    """One delivery task: the tenant's name, and the lanes' HTTP sessions and threads, kept for the
    whole task so that connections to the receiver stay open from one delivery to the next."""

    def __init__(self, depth: int) -> None:
        self.tenant: str | None = None
        self.depth = max(1, depth)
        self.sessions: dict[int, requests.Session] = {}
        self.pool: ThreadPoolExecutor | None = None

    def lanes(self, kind_name: str) -> int:
        return self.depth if getattr(kinds.get(kind_name), "pipelined", False) else 1

    def session(self, lane: int) -> requests.Session:
        if lane not in self.sessions:
            self.sessions[lane] = webhook.new_session()
        return self.sessions[lane]

    def send(self, config: dict, dest, now: datetime, plan: dict, rendered: dict[int, dict]) -> list:
        """Send the plan's messages, each lane's in order, the lanes side by side; a lane stops at its
        first failure, and the others after their current message.  One outcome per message
        (None: not sent)."""
        messages = plan["messages"]
        outcomes: list[kinds.Outcome | None] = [None] * len(messages)
        try:
            target = _target(config, dest, now, config["EXPORT_TIMEOUT_SECONDS"])
        except SecretUnreadable as exc:  # shown as the destination's error, retried like any failure
            outcomes[0] = kinds.Outcome(False, error=str(exc))
            return outcomes
        kind = kinds.get(dest.kind)
        batched = dest.batch_size > 1
        stop = threading.Event()
        by_lane: dict[int, list[int]] = defaultdict(list)
        for index, lane in enumerate(plan["lanes"]):
            by_lane[lane].append(index)

        def work(lane: int, indexes: list[int]) -> None:
            pipelined = getattr(kind, "pipelined", False)
            lane_target = replace(target, session=self.session(lane)) if pipelined else target
            for index in indexes:
                if stop.is_set():
                    return
                events = [rendered[i] for i in messages[index] if i in rendered]
                if not events:  # its events are gone (nothing to send): counts as delivered
                    outcomes[index] = kinds.Outcome(True)
                    continue
                outcome = kind.deliver(lane_target, kinds.message_id(messages[index], batched), events)
                outcomes[index] = outcome
                export_metrics.observe(dest.kind, dest.id, outcome.ok, events, utcnow())
                if not outcome.ok:
                    stop.set()
                    return

        if dest.attempts and len(messages) > 1:  # failing: one delivery probes before the lanes open
            first_lane = plan["lanes"][0]
            work(first_lane, [0])
            by_lane[first_lane].remove(0)
            if not outcomes[0].ok:
                return outcomes
        by_lane = {lane: indexes for lane, indexes in by_lane.items() if indexes}
        if len(by_lane) == 1:
            ((lane, indexes),) = by_lane.items()
            work(lane, indexes)
        elif by_lane:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(max_workers=self.depth, thread_name_prefix="export-lane")
            for future in [self.pool.submit(work, lane, indexes) for lane, indexes in by_lane.items()]:
                future.result()
        return outcomes

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        for session in self.sessions.values():
            session.close()


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
    lease_seconds = config["EXPORT_LEASE_SECONDS"]
    if not _claim(db, destination_id, owner, clock(), lease_seconds):
        return {"status": "busy", "delivered": 0}
    budget = lease_seconds / 2 if budget_seconds is None else budget_seconds
    started = time.monotonic()
    run, delivered = _Run(int(config.get("EXPORT_PIPELINE_DEPTH") or 1)), 0
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
        run.close()
        _release(db, destination_id, owner)


def _step(conn: Connection, config: dict, destination_id: int, owner: str, now: datetime, run: _Run):
    """Plan (or take up again) the next slice, send it, record the outcome: (status, events delivered)."""
    lease_until = now + timedelta(seconds=config["EXPORT_LEASE_SECONDS"])
    with conn.begin():  # the plan is committed before anything is sent
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
        plan = _plan_of(dest.pending)
        if plan is None:
            window = wanted_events(conn, dest)
            if window is None:
                return "idle", 0
            plan = make_plan(*window, dest.batch_size, run.lanes(dest.kind), MAX_MESSAGES)
            values = {"lease_expires_at": lease_until}
            if plan["messages"]:
                values["pending"] = plan
            else:  # nothing in the window is wanted: pass it
                values["cursor_seq"] = plan["through"]
            if not conn.execute(update(DEST).where(*held).values(**values)).rowcount:
                return "lost", 0
            if not plan["messages"]:
                return "continue", 0
        ids = [event_id for message in plan["messages"] for event_id in message]
        rendered = {int(e["id"]): e for e in render_events(conn, dest.tenant_id, run.tenant, ids)}
    outcomes = run.send(config, dest, now, plan, rendered)
    return _record(conn, config, dest, owner, plan, outcomes, now)


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
        client_key=unseal(config, dest.client_key) if dest.client_key else None,
    )


def _log_row(
    dest, now: datetime, message_id: str, outcome: kinds.Outcome, attempt: int, ids, seqs, kind: str
):
    return {
        "destination_id": dest.id,
        "tenant_id": dest.tenant_id,
        "at": now,
        "message_id": message_id,
        "outcome": kind,
        "attempt": attempt,
        "event_count": len(ids),
        "first_event_id": ids[0] if ids else None,
        "last_event_id": ids[-1] if ids else None,
        "first_seq": seqs[0],
        "last_seq": seqs[-1],
        "status_code": outcome.status_code,
        "duration_ms": outcome.duration_ms,
        "error": None if outcome.ok else (outcome.error or "")[:2000],
    }


def _trim_log(conn: Connection, dest, keep: int) -> None:
    oldest_kept = conn.execute(
        select(DLV.c.id)
        .where(DLV.c.destination_id == dest.id)
        .order_by(DLV.c.id.desc())
        .offset(keep - 1)
        .limit(1)
    ).scalar()
    if oldest_kept is not None:
        conn.execute(DLV.delete().where(DLV.c.destination_id == dest.id, DLV.c.id < oldest_kept))


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
    """Log one attempt (the test delivery) and trim the log."""
    ids = (pending or {}).get("ids") or []
    seqs = (pending or {}).get("seqs") or [None, None]
    conn.execute(DLV.insert().values(**_log_row(dest, now, message_id, outcome, attempt, ids, seqs, kind)))
    _trim_log(conn, dest, keep)


def _record(
    conn: Connection,
    config: dict,
    dest,
    owner: str,
    plan: dict,
    outcomes: list,
    now: datetime,
) -> tuple[str, int]:
    """One transaction per slice: the cursor moves past every message delivered before the first one
    that was not; the messages not delivered stay frozen for the retry; the attempts are logged."""
    keep = max(1, config["EXPORT_DELIVERY_LOG_SIZE"])
    messages = plan["messages"]
    batched = dest.batch_size > 1
    ok = [o is not None and o.ok for o in outcomes]
    first_open = next((i for i, done in enumerate(ok) if not done), len(messages))
    remaining = [i for i in range(first_open, len(messages)) if not ok[i]]
    delivered = sum(len(messages[i]) for i, done in enumerate(ok) if done)
    failures = [o for o in outcomes if o is not None and not o.ok]
    attempt = dest.attempts + 1
    sent = [i for i, o in enumerate(outcomes) if o is not None]
    logged = [i for i in sent if not ok[i]] + [i for i in sent if ok[i]][-keep:]
    rows = [
        _log_row(
            dest,
            now,
            kinds.message_id(messages[i], batched),
            outcomes[i],
            attempt,
            messages[i],
            [plan["firsts"][i], plan["lasts"][i]],
            "delivered" if ok[i] else "failed",
        )
        for i in sorted(logged)
    ]
    with conn.begin():
        held = _held(dest.id, owner, dest.cursor_seq)
        if rows:
            conn.execute(DLV.insert(), rows)
            _trim_log(conn, dest, keep)
        last_ok = next((outcomes[i] for i in reversed(sent) if ok[i]), None)
        if not remaining:
            done = conn.execute(
                update(DEST)
                .where(*held)
                .values(
                    cursor_seq=plan["through"],
                    pending=null(),
                    attempts=0,
                    failing_since=None,
                    next_attempt_at=None,
                    state=case((DEST.c.state == "failing", "active"), else_=DEST.c.state),
                    last_delivered_at=now,
                    last_status_code=last_ok.status_code if last_ok else None,
                    delivered_events=DEST.c.delivered_events + delivered,
                    lease_expires_at=now + timedelta(seconds=config["EXPORT_LEASE_SECONDS"]),
                )
            ).rowcount
            return ("continue" if done else "lost"), delivered
        # Some messages were not delivered: the cursor moves up to the first of them; they (and only
        # they) stay frozen, in order, with their lanes; the delivered ones are not sent again.
        first_failure = next(outcomes[i] for i in sent if not ok[i]) if failures else kinds.Outcome(False)
        progressed = delivered > 0
        attempts = 1 if progressed else attempt
        failing_since = now if progressed else (dest.failing_since or now)
        long_enough = (now - failing_since).total_seconds() >= config["EXPORT_FAILING_AFTER_SECONDS"]
        waits = [o.retry_after for o in failures if o.retry_after is not None]
        delay = backoff(
            attempts,
            config["EXPORT_RETRY_BASE_SECONDS"],
            config["EXPORT_RETRY_MAX_SECONDS"],
            max(waits) if waits else None,
        )
        pause = any(o.pause for o in failures)
        if pause:
            state = "paused"
        elif progressed:
            state = case((DEST.c.state == "failing", "active"), else_=DEST.c.state)
        else:
            state = case(
                (DEST.c.state == "active", "failing" if long_enough else "active"), else_=DEST.c.state
            )
        left = {key: [plan[key][i] for i in remaining] for key in ("messages", "firsts", "lasts", "lanes")}
        left["through"] = plan["through"]
        cursor = max(dest.cursor_seq, plan["firsts"][first_open] - 1)
        values = dict(
            cursor_seq=cursor,
            attempts=attempts,
            failing_since=failing_since,
            state=state,
            next_attempt_at=now + timedelta(seconds=delay),
            pending=left,  # the retry sends these again, under the same ids
            last_error=(first_failure.error or "")[:2000],
            last_error_at=now,
            last_status_code=first_failure.status_code,
            delivered_events=DEST.c.delivered_events + delivered,
        )
        if progressed:
            values["last_delivered_at"] = now
        conn.execute(update(DEST).where(*held).values(**values))
    log.info(
        "export %s: %d of %d deliveries failed (%s); next attempt in %.1fs",
        dest.id,
        len(failures),
        len(messages),
        first_failure.error,
        delay,
    )
    return ("paused" if pause else "failed"), delivered


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
