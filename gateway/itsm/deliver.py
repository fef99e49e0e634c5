"""A connection's queue of operations, sent to its ITSM system in id order.

One worker at a time delivers a connection's queue: it holds the connection's *lease*
(``lease_owner``, ``lease_expires_at``), renewed before every operation, and stops when it loses it.
Order is kept per connection (so per item): a failure that a retry may fix stops the queue there.

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
import time
import uuid
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


class Delivery:
    def __init__(self, db, config, connection_id: int, owner: str | None = None) -> None:
        self.db = db
        self.config = config
        self.connection_id = connection_id
        self.owner = owner or uuid.uuid4().hex
        self.base = float(config.get("ITSM_RETRY_BASE_SECONDS") or 1.0)
        self.timeout = float(config.get("ITSM_TIMEOUT_SECONDS") or 20.0)
        self.conn = None
        self.healthy = False
        self.last_success = None

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

    def pending(self, conn, limit: int = 100) -> list:
        return conn.execute(
            select(OP)
            .join(TK, TK.c.id == OP.c.ticket_id)
            .where(
                OP.c.connection_id == self.connection_id,
                OP.c.status == "pending",
                TK.c.sync_state != "parked",
            )
            .order_by(OP.c.id)
            .limit(limit)
        ).all()

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
            client = client_for(connection_for(self.config, row), self.timeout)
        except vault.SecretsUnavailable as exc:
            self._failed(RemoteError(str(exc), connection_level=True, retryable=True))
            return "waiting", MAX_RETRY_DELAY
        self.healthy = row.health == "healthy" and not row.consecutive_failures
        # one database connection for the whole run: a transaction per step, no pool checkout each time
        self.conn = self.db.engine.connect()
        try:
            while time.monotonic() < deadline:
                with self.conn.begin():
                    ops = self.pending(self.conn)
                if not ops:
                    return "idle", None
                for op in ops:
                    failure = self._attempt(client, op)
                    if failure == "lost":
                        return "busy", None
                    if failure is not None:
                        return "waiting", failure
                    if time.monotonic() >= deadline:
                        break
            return "more", 0.0
        finally:
            client.close()
            self.conn.close()
            self.conn = None

    def _attempt(self, client, op):
        """Run one operation, retrying in place: None when done, parked or no longer pending; "lost"
        when the lease is lost; else the wait before the queue is tried again."""
        for attempt in range(INLINE_ATTEMPTS):
            conn = self.conn
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
                    self._park(op, ticket, exc)
                    return None
                wait = exc.retry_after if exc.retry_after is not None else backoff(self.base, attempt)
                if exc.connection_level or attempt == INLINE_ATTEMPTS - 1 or wait > INLINE_WAIT_MAX:
                    return self._failed(exc, exc.retry_after)
                log.info("ITSM connection %s: %s; retrying in %.2fs", self.connection_id, exc, wait)
                time.sleep(wait)
                continue
            self._done(op, ticket, result)
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

    def _done(self, op, ticket, result: dict) -> None:
        now, conn = utcnow(), self.conn
        with conn.begin():
            conn.execute(
                update(OP).where(OP.c.id == op.id).values(status="done", done_at=now, last_error=None)
            )
            conn.execute(
                update(TK)
                .where(TK.c.id == ticket.id)
                .values(sync_state="synced", last_error=None, last_synced_at=now, updated_at=now, **result)
            )
            if (
                not self.healthy
                or self.last_success is None
                or now - self.last_success > timedelta(seconds=5)
            ):
                conn.execute(
                    update(CN)
                    .where(CN.c.id == self.connection_id)
                    .values(health="healthy", consecutive_failures=0, last_success_at=now, retry_at=None)
                )
                self.healthy, self.last_success = True, now

    def _park(self, op, ticket, exc: RemoteError) -> None:
        now, conn = utcnow(), self.conn
        log.warning("ITSM connection %s: ticket %s parked: %s", self.connection_id, ticket.id, exc)
        with conn.begin():
            conn.execute(update(OP).where(OP.c.id == op.id).values(status="parked", last_error=str(exc)))
            conn.execute(
                update(TK)
                .where(TK.c.id == ticket.id)
                .values(sync_state="parked", last_error=str(exc), updated_at=now)
            )

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
