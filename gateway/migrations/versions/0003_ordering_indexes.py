"""ordering indexes for the collections (PostgreSQL)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

``$orderby`` on findings (lastSeen, firstSeen, severity, updatedAt), alerts (severity,
createdDateTime, lastModifiedDateTime), recommendations (severity, updatedAt) and resources
(lastSeen) sorts on expressions
(NULL times as 1970-01-01, severities by rank): without an index on the same expression
PostgreSQL sorts every matching row for every page (0.2-0.5 s at 1,000,000 findings,
bench/query_bench.py).  These indexes, with the keyset condition written as a row
comparison (gateway/query.py ``_after``), let a page start at its cursor.  They are
expression indexes, which SQLAlchemy cannot reflect on SQLite, so they exist on
PostgreSQL only and are not declared in gateway/models.py (their names start with
``ixpg_``; tests/test_migrations.py leaves them out of the model comparison).  The
expressions must stay identical to gateway/api/collections.py's ``_coalesce_time`` and
``_rank``.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

EPOCH = "'1970-01-01 00:00:00+00'::timestamptz"


def _rank(values: tuple[str, ...]) -> str:
    """gateway/api/collections.py's ``_rank``: the position of ``severity`` in ``values``."""
    whens = " ".join(f"WHEN (severity = '{name}') THEN {rank}" for rank, name in enumerate(values))
    return f"(CASE {whens} ELSE -1 END)"


SEVERITIES = ("informational", "low", "medium", "high", "critical")
ALERT_SEVERITIES = ("unknown",) + SEVERITIES
INDEXES = {
    "ixpg_findings_last_seen": f"findings (tenant_id, coalesce(last_seen, {EPOCH}), id)",
    "ixpg_findings_first_seen": f"findings (tenant_id, coalesce(first_seen, {EPOCH}), id)",
    "ixpg_findings_severity": f"findings (tenant_id, {_rank(SEVERITIES)}, id)",
    "ixpg_findings_updated_at": "findings (tenant_id, updated_at, id)",
    "ixpg_alerts_severity": f"alerts (tenant_id, {_rank(ALERT_SEVERITIES)}, id)",
    "ixpg_alerts_created": f"alerts (tenant_id, coalesce(created_date_time, {EPOCH}), id)",
    "ixpg_alerts_modified": f"alerts (tenant_id, coalesce(last_modified_date_time, {EPOCH}), id)",
    "ixpg_recommendations_severity": f"recommendations (tenant_id, {_rank(SEVERITIES)}, id)",
    "ixpg_recommendations_updated_at": "recommendations (tenant_id, updated_at, id)",
    "ixpg_resources_last_seen": f"resources (tenant_id, coalesce(last_seen, {EPOCH}), id)",
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, definition in INDEXES.items():
        op.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {definition}")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name in INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {name}")
