"""The Overview page's panels, read with the same service functions as the API."""

from __future__ import annotations

from sqlalchemy import select

from gateway.console.charts import line_chart
from gateway.models import SecureScore
from gateway.score.upkeep import tenant_score

HISTORY_POINTS = 90  # the newest score changes the chart shows


def overview(db, tenant_id: int) -> dict:
    """Everything the Overview shows for one tenant, read in one read-only transaction."""
    with db.reader.connect() as conn:
        score = tenant_score(conn, tenant_id)
        history = conn.execute(
            select(SecureScore.current, SecureScore.max, SecureScore.percentage, SecureScore.created_at)
            .where(SecureScore.tenant_id == tenant_id).order_by(SecureScore.id.desc()).limit(HISTORY_POINTS)
        ).all()
    history = list(reversed(history))
    chart = line_chart([(row.created_at.strftime("%Y-%m-%d %H:%M UTC"), round(row.current, 2)) for row in history],
                       title="Secure Score history", max_value=max((row.max for row in history), default=None))
    return {"score": score, "history": history, "history_chart": chart}
