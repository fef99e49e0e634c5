"""alert suppression rules

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-19

Additive (gateway/suppression.py has the rules):

* ``alert_suppression_rules``: a tenant's rules (ASC's alertsSuppressionRules): alert type or
  ``*``, all-of conditions on alert fields and entities, reason, comment, state
  Enabled/Disabled, optional expiry, who created and last changed it.  One name per tenant.
* ``alerts.suppressed_by``: the rule that resolved the alert (NULL for every existing alert:
  rules apply to existing alerts only when asked, ``POST .../alertSuppressionRules/{id}/apply``).
  No foreign key: the id of a deleted rule stays on the alerts it suppressed.
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def _json():
    return sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "alert_suppression_rules",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("name", sa.String(260), nullable=False),
        sa.Column("alert_type", sa.String(500), nullable=False),
        sa.Column("conditions", _json(), nullable=False),
        sa.Column("reason", sa.String(40), nullable=False),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("expiration_date_utc", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=True),
        sa.UniqueConstraint("tenant_id", "name", name="uq_alert_suppression_rules_name"),
    )
    with op.batch_alter_table("alerts") as batch:
        batch.add_column(sa.Column("suppressed_by", BigId, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("alerts") as batch:
        batch.drop_column("suppressed_by")
    op.drop_table("alert_suppression_rules")
