"""finding_severity_days: each tenant's open findings by severity, one row per day

Revision ID: 0033
Revises: 0032a
Create Date: 2026-12-03

The console's "findings by severity over time" chart (issue 15) reads this kept daily series:
the beat's snapshot (gateway/console/history.py) counts every tenant's open findings by severity
and upserts today's rows, so the newest count of a day wins and earlier days stay.
"""

import sqlalchemy as sa
from alembic import op

revision = "0033"
down_revision = "0032a"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "finding_severity_days",
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("severity", sa.String(20), primary_key=True),
        sa.Column("open_findings", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("finding_severity_days")
