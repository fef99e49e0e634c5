"""The outbox: ``lifecycle_events``, the events every change writes in its own transaction.

**Event types.**  A stored event has a subject (``subject_type``: finding, recommendation, alert,
resource, policy, exemption, batch, secureScore) and a name (``event``: new, resolved, edited...).
Its *type*, what destinations and ``/events`` filter on, is ``<subject>.<name>`` with the names
of :data:`RENAMES` replaced (:func:`event_type`; :func:`type_expression` is the same mapping in
SQL).  So ``finding.created`` (a ``new`` finding), ``finding.resolved``, ``finding.reopened``,
``finding.updated`` (a provider changed it, or a customer edited it: ``actor`` and ``details``
tell which), ``recommendation.statusChanged`` (healthy, unhealthy, notapplicable: ``details``
says ``to``), ``alert.created``, ``alert.updated``, ``batch.finished`` (with the status and
counts) and ``secureScore.changed``; any other event keeps its own name (``finding.merged``,
``resource.split``, ``policy.created``, ``exemption.expired``...).

**Commit order: why events carry a ``seq``.**  Event ids come from a sequence when a row is
inserted, but transactions commit in another order: a merge that inserted event 100 may commit
after an edit that inserted event 101.  A reader that keeps "the last id I read" and asks for
``id > last`` reads 101, then never sees 100.  The gateway assigns each event a second number,
``seq``, *after* it is committed: the sequencer (:func:`sequence_events`, run by the export beat
task before it dispatches) takes the committed events that have none, in id order, and numbers
them after the last number it gave, in one transaction that no other sequencer runs beside (the
``event_sequencer`` row is locked; on SQLite there is one writer anyway).  A committed event
that was still in flight when the sequencer last ran gets a number after everything numbered
then, so ``seq`` only grows in the order events become visible, and a cursor ``seq > last``
(every destination's, and a client paging ``/events`` by ``sequence``) never skips one.  The
order is commit order, which is the right order per subject: two transactions that change one
finding take its row lock in turn, so the second writes its event after the first committed.

The cost is one UPDATE of each event row, set-based, off the merge's path (the merge only
inserts into a partial index on ``id WHERE seq IS NULL``).  The alternative, an ``xid8`` column
and the ``pg_snapshot_xmin`` horizon, costs no update but holds every tenant's deliveries behind
the oldest running transaction in the database (a long merge of another tenant), orders events
by transaction start rather than commit (a subject's events could overtake each other when the
older transaction wrote later), and does not exist on SQLite.  Events a running merge re-points
(gateway/merge/combine.py) are locked, and the sequencer skips them (``SKIP LOCKED``) rather
than wait for the merge; they get their number on a later run.

**Retention.**  Lifecycle events are the stored history of findings, alerts, recommendations,
resources and posture edits (DESIGN rule 5) and are never pruned.  The events that exist only
for export, ``batch.finished`` and ``secureScore.changed`` (the batch row and the score history
keep the same facts), are pruned after ``EVENT_RETENTION_DAYS`` by :func:`prune_events`, except
those a destination of the tenant has not passed yet: nothing is dropped that a destination still
needs (delete a destination you no longer use).  A destination that stays behind (paused, or
failing for weeks) would keep them forever, so ``EVENT_RETENTION_MAX_DAYS`` (90; 0: no cap) is a
hard cap: older export-only events go whatever the cursors, and each destination whose cursor had
not passed them shows the gap as its ``lastError`` (how many events, of which positions, pruned
when) rather than skipping them silently.  History events are never pruned, so a destination
behind the cap loses only ``batch.finished`` and ``secureScore.changed`` events.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import String, case, func, literal, literal_column, or_, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ColumnElement

from gateway.merge.sql import in_values, is_postgres
from gateway.models import EventSequencer, ExportDestination, LifecycleEvent, Tenant, utcnow

log = logging.getLogger(__name__)

EV, SEQ, DEST = LifecycleEvent.__table__, EventSequencer.__table__, ExportDestination.__table__

# (subject, stored event name) -> the type's name.  Everything else is ``<subject>.<event>``.
RENAMES: dict[tuple[str, str], str] = {
    ("finding", "new"): "created",
    ("finding", "edited"): "updated",
    ("finding", "active"): "activated",
    ("recommendation", "new"): "created",
    ("recommendation", "healthy"): "statusChanged",
    ("recommendation", "unhealthy"): "statusChanged",
    ("recommendation", "notapplicable"): "statusChanged",
    ("recommendation", "edited"): "updated",
    ("alert", "new"): "created",
    ("alert", "edited"): "updated",
    ("resource", "new"): "created",
}
# Subjects whose events are history (never pruned) vs. those that exist only for export.
EXPORT_ONLY_SUBJECTS = ("batch", "secureScore")
STATUS_NAMES = {"healthy": "Healthy", "unhealthy": "Unhealthy", "notapplicable": "NotApplicable"}
# The types this version writes (documentation, the spec's examples and validation hints).
KNOWN_TYPES = (
    "finding.created",
    "finding.updated",
    "finding.activated",
    "finding.resolved",
    "finding.reopened",
    "finding.opened",
    "finding.merged",
    "finding.rekeyed",
    "recommendation.created",
    "recommendation.statusChanged",
    "recommendation.updated",
    "alert.created",
    "alert.updated",
    "resource.created",
    "resource.merged",
    "resource.mergedInto",
    "resource.split",
    "policy.created",
    "policy.updated",
    "policy.deleted",
    "exemption.created",
    "exemption.updated",
    "exemption.expired",
    "exemption.deleted",
    "batch.finished",
    "secureScore.changed",
)
SEQUENCE_CHUNK = 10_000


def event_type(subject_type: str, event: str) -> str:
    """The type of a stored event (see the module's docstring)."""
    return f"{subject_type}.{RENAMES.get((subject_type, event), event)}"


def type_expression(table=EV) -> ColumnElement:
    """:func:`event_type` in SQL, over ``table``'s ``subject_type`` and ``event`` columns."""
    default = table.c.subject_type + literal(".", String) + table.c.event
    whens = [
        (
            (table.c.subject_type == literal_column(f"'{subject}'"))
            & (table.c.event == literal_column(f"'{name}'")),
            literal_column(f"'{subject}.{renamed}'"),
        )
        for (subject, name), renamed in RENAMES.items()
    ]
    return case(*whens, else_=default)


def matches_type(patterns: list[str], type_name: str) -> bool:
    """Whether ``type_name`` is one of ``patterns`` (``*``, ``finding.*``, ``*.created``, exact)."""
    subject, _, name = type_name.partition(".")
    for pattern in patterns:
        if pattern == "*":
            return True
        want_subject, _, want_name = pattern.partition(".")
        if want_subject in ("*", subject) and want_name in ("*", name):
            return True
    return False


# -- writers ------------------------------------------------------------------------------------


def batch_finished(
    conn: Connection,
    tenant_id: int,
    batch_id: int,
    status: str,
    counts: dict,
    provider: str | None,
    error: str | None = None,
) -> None:
    """The ``batch.finished`` event, in the transaction that ends the batch."""
    details = {"status": status, "counts": counts}
    if error:
        details["error"] = error[:500]
    conn.execute(
        EV.insert().values(
            tenant_id=tenant_id,
            subject_type="batch",
            subject_id=batch_id,
            event="finished",
            at=utcnow(),
            cause=f"batch {batch_id}",
            batch_id=batch_id,
            actor=provider,
            details=details,
        )
    )


def score_changed(
    conn: Connection,
    tenant_id: int,
    score_id: int,
    now: datetime,
    current: float,
    max_score: float,
    percentage: float,
    previous: tuple[float, float] | None,
) -> None:
    """The ``secureScore.changed`` event, beside the score history row it announces."""
    details = {"current": current, "max": max_score, "percentage": percentage}
    if previous is not None:
        details["previous"] = {"current": previous[0], "max": previous[1]}
    conn.execute(
        EV.insert().values(
            tenant_id=tenant_id,
            subject_type="secureScore",
            subject_id=score_id,
            event="changed",
            at=now,
            cause="secure score recount",
            details=details,
        )
    )


# -- the sequencer ------------------------------------------------------------------------------


def _last_seq(conn: Connection) -> int:
    """The last position given, with the sequencer's row locked (created when missing)."""
    query = select(SEQ.c.last_seq).where(SEQ.c.id == 1)
    if is_postgres(conn):
        query = query.with_for_update()
    last = conn.execute(query).scalar()
    if last is None:
        last = conn.execute(select(func.coalesce(func.max(EV.c.seq), 0))).scalar_one()
        if is_postgres(conn):
            conn.execute(
                text(
                    "INSERT INTO event_sequencer (id, last_seq) VALUES (1, :last) ON CONFLICT (id) DO NOTHING"
                ),
                {"last": last},
            )
            last = conn.execute(query).scalar_one()
        else:
            conn.execute(SEQ.insert().values(id=1, last_seq=last))
    return int(last)


def sequence_events(db, limit: int = SEQUENCE_CHUNK) -> int:
    """Give the committed events that have no ``seq`` theirs, in id order; return how many.

    Each chunk is one short transaction: lock the sequencer's row, take up to ``limit`` of the
    oldest unsequenced events (skipping rows a running transaction holds), number them
    ``last + 1 + (id - first id)`` (increasing with id, after every number given before), and
    record the highest number given.
    """
    with db.reader.connect() as conn:  # most runs find nothing: no write transaction for them
        if conn.execute(select(EV.c.id).where(EV.c.seq.is_(None)).limit(1)).first() is None:
            return 0
    total = 0
    while True:
        with db.engine.begin() as conn:
            last = _last_seq(conn)
            picked = select(EV.c.id).where(EV.c.seq.is_(None)).order_by(EV.c.id).limit(limit)
            if is_postgres(conn):
                picked = picked.with_for_update(skip_locked=True)
            ids = conn.execute(picked).scalars().all()
            if not ids:
                return total
            offset = last + 1 - ids[0]
            conn.execute(update(EV).where(in_values(conn, EV.c.id, ids)).values(seq=EV.c.id + offset))
            conn.execute(update(SEQ).where(SEQ.c.id == 1).values(last_seq=ids[-1] + offset))
        total += len(ids)
        if len(ids) < limit:
            return total


# -- retention ----------------------------------------------------------------------------------


def prune_events(
    db, retention_days: int, now: datetime | None = None, chunk: int = 5000, max_days: int = 0
) -> int:
    """Delete export-only events older than ``retention_days`` that every destination of their
    tenant has passed, and (``max_days``, the hard cap) those older than ``max_days`` whatever the
    destinations, showing the gap on each destination that had not passed them; set-based, in
    chunks of short transactions.  Returns how many."""
    if retention_days <= 0:
        return 0
    now = now or utcnow()
    cutoff = now - timedelta(days=retention_days)
    hard_cutoff = now - timedelta(days=max(max_days, retention_days)) if max_days > 0 else None
    with db.reader.connect() as conn:
        tenants = conn.execute(select(Tenant.id).order_by(Tenant.id)).scalars().all()
    total = 0
    for tenant_id in tenants:
        for subject in EXPORT_ONLY_SUBJECTS:
            while True:
                with db.engine.begin() as conn:
                    horizon = conn.execute(
                        select(func.min(DEST.c.cursor_seq)).where(DEST.c.tenant_id == tenant_id)
                    ).scalar()
                    doomed = (
                        select(EV.c.id)
                        .where(
                            EV.c.tenant_id == tenant_id,
                            EV.c.subject_type == subject,
                            EV.c.at < cutoff,
                            EV.c.seq.is_not(None),
                        )
                        .limit(chunk)
                    )
                    if horizon is not None:
                        passed = EV.c.seq <= horizon
                        doomed = doomed.where(
                            passed if hard_cutoff is None else or_(passed, EV.c.at < hard_cutoff)
                        )
                    ids = conn.execute(doomed).scalars().all()
                    if ids:
                        if hard_cutoff is not None and horizon is not None:
                            _show_gap(conn, tenant_id, ids, now)
                        conn.execute(EV.delete().where(in_values(conn, EV.c.id, ids)))
                total += len(ids)
                if len(ids) < chunk:
                    break
    if total:
        log.info("pruned %d export-only events older than %d days", total, retention_days)
    return total


def _show_gap(conn: Connection, tenant_id: int, ids: list[int], now: datetime) -> None:
    """The destinations whose cursor had not passed events about to be pruned past the hard cap."""
    low, high, count = conn.execute(
        select(func.min(EV.c.seq), func.max(EV.c.seq), func.count()).where(in_values(conn, EV.c.id, ids))
    ).one()
    behind = (
        conn.execute(select(DEST.c.id).where(DEST.c.tenant_id == tenant_id, DEST.c.cursor_seq < high))
        .scalars()
        .all()
    )
    if not behind:
        return
    message = (
        f"gap: {count} export-only events (batch.finished, secureScore.changed) at positions {low}-{high} "
        f"were pruned on {now:%Y-%m-%d} past EVENT_RETENTION_MAX_DAYS before this destination delivered them"
    )
    conn.execute(update(DEST).where(DEST.c.id.in_(behind)).values(last_error=message, last_error_at=now))
    log.warning("export destinations %s: %s", behind, message)
