"""The Overview page's panels: Secure Score and its history, controls, recommendation and alert
counts, open findings by severity over the last 30 days (the daily series kept by
:mod:`gateway.console.history`), ingestion per provider.  Each panel is one tenant-scoped query
(grouped, index-backed); the score comes from the same stored rows and function as the API's secureScores
(:func:`gateway.score.upkeep.tenant_score`)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection

from gateway.console import history as finding_history
from gateway.console.charts import bar_chart, line_chart, multi_line_chart
from gateway.models import Alert, Batch, Recommendation, SecureScore, utcnow
from gateway.score.upkeep import tenant_score

HISTORY_POINTS = 90  # the newest score changes the chart shows
SEVERITIES = ("critical", "high", "medium", "low")
CLOSED_ALERTS = ("resolved", "dismissed")  # Graph's closed statuses: everything else is open work
# Literal conditions, the very predicates of the partial indexes these counts read (migration 0029),
# so that the planner can use them whatever it knows of bound parameters.
UNHEALTHY = text("recommendations.status = 'Unhealthy'")
OPEN_ALERTS = text("alerts.status NOT IN ('resolved', 'dismissed')")
RANGES = (("24 hours", timedelta(hours=24)), ("30 days", timedelta(days=30)))


def score_history(conn: Connection, tenant_id: int, points: int = HISTORY_POINTS) -> list:
    """The newest ``points`` score changes, oldest first."""
    rows = conn.execute(
        select(SecureScore.current, SecureScore.max, SecureScore.percentage, SecureScore.created_at)
        .where(SecureScore.tenant_id == tenant_id)
        .order_by(SecureScore.id.desc())
        .limit(points)
    ).all()
    return list(reversed(rows))


def recommendation_counts(conn: Connection, tenant_id: int) -> dict[str, int]:
    """Unhealthy recommendations by (effective) severity."""
    rows = conn.execute(
        select(Recommendation.severity, func.count())
        .where(Recommendation.tenant_id == tenant_id, UNHEALTHY)
        .group_by(Recommendation.severity)
    ).all()
    counts = {severity: 0 for severity in SEVERITIES}
    for severity, number in rows:
        counts[str(severity).lower()] = counts.get(str(severity).lower(), 0) + int(number)
    return counts


def open_alert_counts(conn: Connection, tenant_id: int) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Open alerts by severity and status: (the statuses present, {severity: {status: count}})."""
    rows = conn.execute(
        select(Alert.severity, Alert.status, func.count())
        .where(Alert.tenant_id == tenant_id, OPEN_ALERTS)
        .group_by(Alert.severity, Alert.status)
    ).all()
    table: dict[str, dict[str, int]] = {severity: {} for severity in SEVERITIES}
    statuses: list[str] = []
    for severity, status, number in rows:
        table.setdefault(str(severity).lower(), {})[status] = int(number)
        if status not in statuses:
            statuses.append(status)
    order = {"newAlert": 0, "new": 0, "inProgress": 1}
    return sorted(statuses, key=lambda s: (order.get(s, 9), s)), table


def ingestion(conn: Connection, tenant_id: int, since) -> list[dict]:
    """Per provider since ``since``: batches, records received, records rejected, the last push."""
    received = func.coalesce(func.sum(Batch.counts["received"].as_integer()), 0)
    rejected = func.coalesce(func.sum(Batch.counts["rejected"].as_integer()), 0)
    rows = conn.execute(
        select(
            Batch.provider,
            func.count().label("batches"),
            received.label("records"),
            rejected.label("rejected"),
            func.max(Batch.received_at).label("last_push"),
        )
        .where(Batch.tenant_id == tenant_id, Batch.received_at >= since)
        .group_by(Batch.provider)
        .order_by(Batch.provider)
    ).all()
    return [
        {
            "provider": row.provider,
            "batches": int(row.batches),
            "records": int(row.records or 0),
            "rejected": int(row.rejected or 0),
            "last_push": _aware(row.last_push),
        }
        for row in rows
    ]


def _aware(value):
    from datetime import UTC

    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def overview(db, tenant_id: int) -> dict:
    """Everything the Overview shows for one tenant, read in one read-only transaction."""
    now = utcnow()
    with db.reader.connect() as conn:
        score = tenant_score(conn, tenant_id)
        history = score_history(conn, tenant_id)
        recommendations = recommendation_counts(conn, tenant_id)
        alert_statuses, alerts = open_alert_counts(conn, tenant_id)
        pushes = {label: ingestion(conn, tenant_id, now - span) for label, span in RANGES}
        finding_days, by_severity = finding_history.series(conn, tenant_id, today=now.date())
    controls = [row._mapping for row in score["controls"]]
    return {
        "score": score,
        "history": history,
        "history_chart": line_chart(
            [(row.created_at.strftime("%Y-%m-%d %H:%M UTC"), round(row.current, 2)) for row in history],
            title="Secure Score history",
            max_value=max((row.max for row in history), default=None),
        ),
        "controls": controls,
        "controls_chart": bar_chart(
            [
                (row["control"], round(row["current"], 2))
                for row in controls
                if row["healthy"] + row["unhealthy"]
            ],
            title="Score per control",
            css_class="chart-controls",
        ),
        "recommendations": recommendations,
        "recommendations_chart": bar_chart(
            [(severity.capitalize(), recommendations[severity]) for severity in SEVERITIES],
            title="Unhealthy recommendations by severity",
            classes=[f"sev-{severity}" for severity in SEVERITIES],
            css_class="chart-recommendations",
        )
        if any(recommendations.values())
        else None,
        "finding_days": finding_days,
        "finding_series": by_severity,
        "findings_chart": multi_line_chart(
            [day.isoformat() for day in finding_days],
            by_severity,
            title=f"Open findings by severity, last {finding_history.DAYS} days",
            css_class="chart-findings",
        ),
        "alert_statuses": alert_statuses,
        "alerts": alerts,
        "ingestion": pushes,
        "ingestion_chart": bar_chart(
            [(row["provider"], row["records"]) for row in pushes["30 days"]],
            title="Records pushed per provider, last 30 days",
            css_class="chart-ingestion",
        ),
    }
