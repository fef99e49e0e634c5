"""Governance: rules and assignments (owner and due date on recommendations)

Revision ID: 0013
Revises: 0011
Create Date: 2026-12-03

* ``governance_rules``: priority-ordered conditions on new Unhealthy recommendations, with the
  owner source and the remediation timeframe (gateway/posture/governance.py).
* ``governance_assignments``: owner + due date on a recommendation; ``latest`` marks the one the
  recommendation shows (a partial unique index: one per recommendation, so at most one open).
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0011"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def _json():
    return sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "governance_rules",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("rule_priority", sa.Integer, nullable=False),
        sa.Column("rule_type", sa.String(20), nullable=False),
        sa.Column("source_resource_type", sa.String(30), nullable=False),
        sa.Column("condition_sets", _json(), nullable=False),
        sa.Column("owner_source_type", sa.String(20), nullable=False),
        sa.Column("owner_source_value", sa.String(320), nullable=False),
        sa.Column("remediation_seconds", sa.Integer, nullable=False),
        sa.Column("is_grace_period", sa.Boolean, nullable=False),
        sa.Column("email_notification", _json(), nullable=False),
        sa.Column("is_disabled", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=True),
        sa.UniqueConstraint("tenant_id", "rule_priority", name="uq_governance_rules_priority"),
    )
    op.create_table(
        "governance_assignments",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column(
            "recommendation_id",
            BigId,
            sa.ForeignKey("recommendations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("rule_id", BigId, nullable=True),
        sa.Column("owner", sa.String(320), nullable=True),
        sa.Column("due_date", sa.DateTime(timezone=True), nullable=False),
        sa.Column("is_grace_period", sa.Boolean, nullable=False),
        sa.Column("remediation_eta", sa.DateTime(timezone=True), nullable=True),
        sa.Column("eta_justification", sa.Text, nullable=True),
        sa.Column("additional_data", _json(), nullable=False),
        sa.Column("latest", sa.Boolean, nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=True),
    )
    op.create_index(
        "ux_governance_assignments_latest",
        "governance_assignments",
        ["tenant_id", "recommendation_id"],
        unique=True,
        postgresql_where=sa.text("latest"),
        sqlite_where=sa.text("latest = 1"),
    )
    op.create_index("ix_governance_assignments_tenant_id", "governance_assignments", ["tenant_id", "id"])
    op.create_index(
        "ix_governance_assignments_recommendation", "governance_assignments", ["recommendation_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_governance_assignments_recommendation", table_name="governance_assignments")
    op.drop_index("ix_governance_assignments_tenant_id", table_name="governance_assignments")
    op.drop_index("ux_governance_assignments_latest", table_name="governance_assignments")
    op.drop_table("governance_assignments")
    op.drop_table("governance_rules")
