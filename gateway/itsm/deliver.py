"""A connection's queue of operations, sent to its ITSM system in id order.

One worker at a time delivers a connection's queue: it holds the connection's *lease*
(``lease_owner``, ``lease_expires_at``), renewed before every operation, and stops when it loses it.

**Lanes.**  The lease holder sends ``ITSM_DELIVERY_LANES`` (4) operations at a time: one thread per
lane, each with its own database connection and HTTP session, lane ``n`` taking the operations of
the tickets whose id is ``n`` modulo the number of lanes, in id order.  A ticket's operations (so an
item's: an item is in one ticket per connection) stay in one lane, in order.  A ``Retry-After``
(429, 503) pauses every lane of the connection until it has passed; a failure that ends the run
(retries spent, a connection-level error) stops every lane after its current call, and a lost lease
too.  A failure that a retry may fix stops the queue there.

**Exactly one remote record per ticket.**  The ticket row is committed before any remote call (by
the scan or the API); ``create_attempts`` is incremented and committed before each create, and a
create whose earlier attempt may have reached the system (any attempt after the first: a timeout,
a connection dropped after the server committed, a worker killed mid-call) first looks the record up
by the gateway's marker (ServiceNow ``correlation_id``; a Jira label, with the item also in an issue
property) and adopts what it finds.  Comments carry the marker of their operation and are looked up
the same way before a repeated attempt.

**Failures.**  A call that may succeed later (timeout, lost connection, 429, 5xx) is retried in
place with exponential backoff and full jitter, honouring ``Retry-After`` up to ``INLINE_WAIT_MAX``;
then the connection records the failure (``consecutive_failures``, ``last_error``; ``degraded`` from
``DEGRADED_AFTER`` failures on, or at once on a 401) and its queue waits until ``retry_at``, the
pending operations kept.  A 4xx about one record (bad field, missing project, a data policy) parks
that ticket (``sync_state`` ``parked``, ``last_error`` the system's message) and the rest continue.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from sqlalchemy import or_, select, update

from gateway.models import ItsmConnection, ItsmOp, ItsmTicket, utcnow

from . import items as itsm_items
from . import sync, vault
from .clients import Connection, RemoteError, client_for

log = logging.getLogger(__name__)
CN, TK, OP = ItsmConnection.__table__, ItsmTicket.__table__, ItsmOp.__table__
LEASE_SECONDS = 120
INLINE_ATTEMPTS = 4
INLINE_WAIT_MAX = 30.0
DEGRADED_AFTER = 3
MAX_RETRY_DELAY = 600.0


def backoff(base: float, attempt: int, cap: float = MAX_RETRY_DELAY) -> float:
    """Exponential backoff with full jitter: uniform in [base * 2^attempt / 2, base * 2^attempt]."""
    ceiling = min(cap, base * (2 ** min(attempt, 20)))
    return random.uniform(ceiling / 2, ceiling)


def connection_for(config, row) -> Connection:
    return Connection(
        id=row.id,
        kind=row.kind,
        base_url=row.base_url,
        auth=row.auth,
        username=row.username,
        secret=vault.decrypt(config, row.secret),
        settings=dict(row.settings or {}),
    )


class Lanes:
    """What the lanes of one run share: the pause a ``Retry-After`` asked for, and the stop."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pause_until = 0.0  # time.monotonic()
        self.outcome: tuple[str, float | None] | None = None  # ("waiting", s) or ("busy", None)
        self.stopped = threading.Event()

    def pause(self, seconds: float) -> None:
        with self.lock:
            self.pause_until = max(self.pause_until, time.monotonic() + seconds)

    def wait(self) -> bool:
        """Sleep out the shared pause: False when the run stopped meanwhile."""
        while not self.stopped.is_set():
            remaining = self.pause_until - time.monotonic()
            if remaining <= 0:
                return True
            self.stopped.wait(min(remaining, 0.5))
        return False

    def sleep(self, seconds: float) -> bool:
        return not self.stopped.wait(seconds)

    def stop(self, outcome: tuple[str, float | None]) -> None:
        with self.lock:
            if self.outcome is None or outcome[0] == "busy":
                self.outcome = outcome
        self.stopped.set()


class Delivery:
    def __init__(self, db, config, connection_id: int, owner: str | None = None) -> None:
        self.db = db
        self.config = config
        self.connection_id = connection_id
        self.owner = owner or uuid.uuid4().hex
        self.base = float(config.get("ITSM_RETRY_BASE_SECONDS") or 1.0)
        self.timeout = float(config.get("ITSM_TIMEOUT_SECONDS") or 20.0)
        self.lanes = max(1, int(config.get("ITSM_DELIVERY_LANES") or 4))
        self.healthy = False
        self.last_success = None
        self.health_lock = threading.Lock()
        self.failed_wait: float | None = None  # a run records its connection's failure once

    # -- lease --------------------------------------------------------------------------------

    def _claim(self) -> bool:
        now = utcnow()
        with self.db.engine.begin() as conn:
            claimed = conn.execute(
                update(CN)
                .where(
                    CN.c.id == self.connection_id,
                    CN.c.enabled.is_(True),
                    or_(
                        CN.c.lease_owner.is_(None),
                        CN.c.lease_expires_at < now,
                        CN.c.lease_owner == self.owner,
                    ),
                )
                .values(lease_owner=self.owner, lease_expires_at=now + timedelta(seconds=LEASE_SECONDS))
            ).rowcount
        return bool(claimed)

    def _release(self) -> None:
        with self.db.engine.begin() as conn:
            conn.execute(
                update(CN)
                .where(CN.c.id == self.connection_id, CN.c.lease_owner == self.owner)
                .values(lease_owner=None, lease_expires_at=None)
            )

    def _renew(self, conn) -> bool:
        now = utcnow()
        return bool(
            conn.execute(
                update(CN)
                .where(CN.c.id == self.connection_id, CN.c.lease_owner == self.owner)
                .values(lease_expires_at=now + timedelta(seconds=LEASE_SECONDS))
            ).rowcount
        )

    # -- the queue ----------------------------------------------------------------------------

    def pending(self, conn, limit: int = 100, lane: int = 0, lanes: int = 1) -> list:
        query = (
            select(OP)
            .join(TK, TK.c.id == OP.c.ticket_id)
            .where(
                OP.c.connection_id == self.connection_id,
                OP.c.status == "pending",
                TK.c.sync_state != "parked",
            )
            .order_by(OP.c.id)
            .limit(limit)
        )
        if lanes > 1:
            query = query.where(OP.c.ticket_id % lanes == lane)
        return conn.execute(query).all()

    def run(self, budget_seconds: float = 300.0) -> tuple[str, float | None]:
        """Deliver until the queue is empty, the budget is spent or the system fails:
        ("idle" | "busy" | "more" | "waiting" | "disabled", seconds to wait before the next run)."""
        deadline = time.monotonic() + budget_seconds
        while True:
            with self.db.engine.connect() as conn:
                row = conn.execute(select(CN).where(CN.c.id == self.connection_id)).first()
            if row is None or not row.enabled:
                return "disabled", None
            now = utcnow()
            if row.retry_at is not None and row.retry_at > now:
                return "waiting", (row.retry_at - now).total_seconds()
            if not self._claim():
                return "busy", None
            try:
                outcome = self._deliver(row, deadline)
            finally:
                self._release()
            if outcome[0] != "idle":
                return outcome
            # work queued while we held the lease (another task saw "busy" and left it to us)
            with self.db.engine.connect() as conn:
                if not self.pending(conn, 1):
                    return "idle", None

    def _deliver(self, row, deadline: float) -> tuple[str, float | None]:
        try:
            connection = connection_for(self.config, row)
        except vault.SecretsUnavailable as exc:
            self._failed(RemoteError(str(exc), connection_level=True, retryable=True))
            return "waiting", MAX_RETRY_DELAY
        self.healthy = row.health == "healthy" and not row.consecutive_failures
        self.failed_wait = None
        shared = Lanes()
        if self.lanes == 1:
            ends = [self._lane(connection, 0, 1, deadline, shared)]
        else:
            with ThreadPoolExecutor(self.lanes, thread_name_prefix=f"itsm-{self.connection_id}") as pool:
                futures = [
                    pool.submit(self._lane, connection, lane, self.lanes, deadline, shared)
                    for lane in range(self.lanes)
                ]
                ends = [future.result() for future in futures]
        if shared.outcome is not None:
            return shared.outcome
        return ("more", 0.0) if "more" in ends else ("idle", None)

    def _lane(self, connection: Connection, lane: int, lanes: int, deadline: float, shared: Lanes) -> str:
        """Deliver one lane's operations: "idle" (none left), "more" (budget spent) or "stopped"."""
        client = client_for(connection, self.timeout)
        # one database connection per lane for the whole run: a transaction per step
        conn = self.db.engine.connect()
        try:
            while not shared.stopped.is_set():
                with conn.begin():
                    ops = self.pending(conn, lane=lane, lanes=lanes)
                if not ops:
                    return "idle"
                for op in ops:
                    if not shared.wait():
                        return "stopped"
                    failure = self._attempt(conn, client, op, shared)
                    if failure == "lost":
                        shared.stop(("busy", None))
                    elif failure is not None:
                        shared.stop(("waiting", failure))
                    if shared.stopped.is_set():
                        return "stopped"
                    if time.monotonic() >= deadline:
                        return "more"
            return "stopped"
        except BaseException:
            shared.stop(("waiting", self.base))
            raise
        finally:
            client.close()
            conn.close()

    def _attempt(self, conn, client, op, shared: Lanes):
        """Run one operation, retrying in place: None when done, parked or no longer pending; "lost"
        when the lease is lost; else the wait before the queue is tried again."""
        for attempt in range(INLINE_ATTEMPTS):
            if attempt and not shared.wait():
                return None  # the run stopped: the operation stays pending
            with conn.begin():  # committed before the call: a retry looks up first
                if not self._renew(conn):
                    return "lost"
                attempts = conn.execute(
                    update(OP)
                    .where(OP.c.id == op.id, OP.c.status == "pending")
                    .values(attempts=OP.c.attempts + 1)
                    .returning(OP.c.attempts)
                ).scalar()
                if attempts is None:
                    return None
                if op.kind == "create":
                    conn.execute(
                        update(TK)
                        .where(TK.c.id == op.ticket_id)
                        .values(create_attempts=TK.c.create_attempts + 1)
                    )
                ticket = conn.execute(select(TK).where(TK.c.id == op.ticket_id)).first()
                if ticket.sync_state == "parked":
                    return None
                content = sync.describe(conn, ticket) if op.kind in ("create", "resolve", "reopen") else None
            try:
                result = self._execute(client, op, ticket, attempts, content)
            except RemoteError as exc:
                if not exc.retryable:
                    self._park(conn, op, ticket, exc)
                    return None
                wait = exc.retry_after if exc.retry_after is not None else backoff(self.base, attempt)
                if exc.connection_level or attempt == INLINE_ATTEMPTS - 1 or wait > INLINE_WAIT_MAX:
                    return self._failed_once(exc, exc.retry_after)
                log.info("ITSM connection %s: %s; retrying in %.2fs", self.connection_id, exc, wait)
                if exc.retry_after is not None:
                    shared.pause(wait)  # the system asked the connection to wait: every lane does
                elif not shared.sleep(wait):
                    return None
                continue
            self._done(conn, op, ticket, result)
            return None
        return None  # not reached

    # -- one operation ------------------------------------------------------------------------

    def _execute(self, client, op, ticket, attempts: int, content: dict | None) -> dict:
        mark = sync.marker(ticket)
        kind = op.kind
        if kind == "create":
            record = None
            if ticket.create_attempts > 1 or ticket.remote_id:
                record = client.find(mark)
            if record is None:
                if client.connection.kind == "servicenow":
                    record = client.create(mark, content)
                else:
                    record = client.create(
                        mark,
                        content,
                        {
                            "connection": ticket.connection_id,
                            "subjectType": ticket.subject_type,
                            "subjectId": ticket.subject_id,
                            "items": content["ids"],
                        },
                    )
            return self._remote(client, record)
        if not ticket.remote_id:
            raise RemoteError("the ticket has no remote record (its creation is parked)")
        ref = (
            ticket.remote_id
            if client.connection.kind == "servicenow"
            else (ticket.remote_key or ticket.remote_id)
        )
        tag = f"[gw-op-{op.id}]"  # inbound sync never takes back what carries it (gateway/itsm/inbound.py)
        if kind == "resolve":  # the connection's close code and notes template: gateway/itsm/items.py
            notes = itsm_items.close_notes(client.settings, content, self._notes(content, "resolved"))
            notes += "\n" + tag
            exempt = bool((content or {}).get("exempt"))
            return self._remote(client, client.resolve(ref, notes, exempt=exempt), keep=ticket)
        if kind == "reopen":
            notes = self._notes(content, "reopened") + "\n" + tag
            return self._remote(client, client.reopen(ref, notes), keep=ticket)
        if kind == "severity":
            client.set_severity(ref, op.payload.get("severity") or "medium")
            return {}
        if kind in itsm_items.OPERATIONS:  # the assignee the customer set (gateway/itsm/items.py)
            return itsm_items.execute(client, op, ticket, ref)
        if kind == "comment":
            if attempts > 1 and client.has_note(ref, tag):
                return {}
            client.note(ref, f"{op.payload.get('text', '')}\n{tag}")
            return {}
        raise RemoteError(f"unknown operation {kind}")

    @staticmethod
    def _notes(content: dict | None, what: str) -> str:
        ids = ", ".join(map(str, (content or {}).get("ids") or []))
        kind = (content or {}).get("kind") or "item"
        if what == "resolved":
            return (
                f"Resolved by the partner gateway: every {kind} of this ticket ({ids}) is resolved "
                "(its scanners report it fixed, or a full scan no longer reports it)."
            )
        return f"Reopened by the partner gateway: {kind} {ids} is open again (a scanner reports it)."

    @staticmethod
    def _remote(client, record: dict, keep=None) -> dict:
        if not record:
            return {}
        out = {}
        if client.connection.kind == "servicenow":
            if record.get("sys_id"):
                out.update(remote_id=record["sys_id"], remote_url=client.url(record))
            if record.get("number"):
                out["remote_key"] = record["number"]
            if "state" in record:
                out["remote_state"] = client.state_name(record)
        else:
            if record.get("id"):
                out["remote_id"] = str(record["id"])
            if record.get("key"):
                out.update(remote_key=record["key"], remote_url=client.url(record))
            if (record.get("fields") or {}).get("status"):
                out["remote_state"] = client.state_name(record)
        return out

    # -- outcomes -----------------------------------------------------------------------------

    def _done(self, conn, op, ticket, result: dict) -> None:
        now = utcnow()
        with conn.begin():
            conn.execute(
                update(OP).where(OP.c.id == op.id).values(status="done", done_at=now, last_error=None)
            )
            conn.execute(
                update(TK)
                .where(TK.c.id == ticket.id)
                .values(sync_state="synced", last_error=None, last_synced_at=now, updated_at=now, **result)
            )
            with self.health_lock:  # one lane records the connection's health now and then
                stale = (
                    not self.healthy
                    or self.last_success is None
                    or now - self.last_success > timedelta(seconds=5)
                )
                if stale:
                    self.healthy, self.last_success = True, now
            if stale:
                conn.execute(
                    update(CN)
                    .where(CN.c.id == self.connection_id)
                    .values(health="healthy", consecutive_failures=0, last_success_at=now, retry_at=None)
                )

    def _park(self, conn, op, ticket, exc: RemoteError) -> None:
        now = utcnow()
        log.warning("ITSM connection %s: ticket %s parked: %s", self.connection_id, ticket.id, exc)
        with conn.begin():
            conn.execute(update(OP).where(OP.c.id == op.id).values(status="parked", last_error=str(exc)))
            conn.execute(
                update(TK)
                .where(TK.c.id == ticket.id)
                .values(sync_state="parked", last_error=str(exc), updated_at=now)
            )

    def _failed_once(self, exc: RemoteError, retry_after: float | None = None) -> float:
        """Record the connection's failure once per run, however many lanes meet it."""
        with self.health_lock:
            if self.failed_wait is None:
                self.failed_wait = self._failed(exc, retry_after)
            return self.failed_wait

    def _failed(self, exc: RemoteError, retry_after: float | None = None) -> float:
        now = utcnow()
        self.healthy = False
        with self.db.engine.begin() as conn:
            failures = (
                conn.execute(select(CN.c.consecutive_failures).where(CN.c.id == self.connection_id)).scalar()
                or 0
            ) + 1
            wait = retry_after if retry_after is not None else backoff(self.base, failures)
            wait = min(MAX_RETRY_DELAY, wait)
            degraded = failures >= DEGRADED_AFTER or exc.connection_level
            conn.execute(
                update(CN)
                .where(CN.c.id == self.connection_id)
                .values(
                    consecutive_failures=failures,
                    last_error=str(exc),
                    last_failure_at=now,
                    retry_at=now + timedelta(seconds=wait),
                    **({"health": "degraded"} if degraded else {}),
                )
            )
        log.warning(
            "ITSM connection %s failed (%d in a row), next try in %.1fs: %s",
            self.connection_id,
            failures,
            wait,
            exc,
        )
        return wait


def queue_counts(conn, connection_id: int) -> dict:
    from sqlalchemy import func

    rows = conn.execute(
        select(OP.c.status, func.count()).where(OP.c.connection_id == connection_id).group_by(OP.c.status)
    ).all()
    return {status: count for status, count in rows}
