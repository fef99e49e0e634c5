"""Posture: security policy, exemptions, control profiles; effective and actual recommendation status

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02

* ``recommendation_types.enabled`` / ``severity_override``: the tenant's policy as it applies to
  the type (all enabled, no override, for existing types: no policy existed).
* ``recommendations.actual_status`` / ``actual_severity``: what the findings say (copied from
  ``status`` / ``severity``, which from now on hold the effective values); ``status_cause`` and
  ``exemption_id`` say why a recommendation is NotApplicable.
* ``policy_settings``, ``control_profiles``, ``exemptions``: new tables.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def _json():
    return sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    # plain ADD COLUMN (no batch rebuild on SQLite: findings and recommendations refer to the
    # types, and dropping the table to rebuild it would break those foreign keys)
    op.add_column("recommendation_types",
                  sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.text("true")))
    op.add_column("recommendation_types", sa.Column("severity_override", sa.String(20), nullable=True))
    with op.batch_alter_table("recommendations") as batch:
        batch.add_column(sa.Column("actual_status", sa.String(20), nullable=True))
        batch.add_column(sa.Column("actual_severity", sa.String(20), nullable=True))
        batch.add_column(sa.Column("status_cause", sa.String(40), nullable=True))
        batch.add_column(sa.Column("exemption_id", BigId, nullable=True))
    op.execute("UPDATE recommendations SET actual_status = status, actual_severity = severity")
    with op.batch_alter_table("recommendations") as batch:
        batch.alter_column("actual_status", existing_type=sa.String(20), nullable=False)
        batch.alter_column("actual_severity", existing_type=sa.String(20), nullable=False)
    op.create_index("ix_recommendations_tenant_exemption", "recommendations", ["tenant_id", "exemption_id"],
                    postgresql_where=sa.text("exemption_id IS NOT NULL"),
                    sqlite_where=sa.text("exemption_id IS NOT NULL"))
    op.create_table(
        "policy_settings",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("scope", sa.String(30), nullable=False),
        sa.Column("target", sa.String(300), nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=True),
        sa.Column("severity", sa.String(20), nullable=True),
        sa.Column("control", sa.String(100), nullable=True),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=True),
        sa.UniqueConstraint("tenant_id", "scope", "target", name="uq_policy_settings_target"),
    )
    op.create_table(
        "control_profiles",
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
        sa.Column("control", sa.String(100), primary_key=True),
        sa.Column("builtin", sa.Boolean, nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("category", sa.String(50), nullable=True),
        sa.Column("max_score", sa.Float, nullable=False),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("state_updates", _json(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "exemptions",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("category", sa.String(20), nullable=False),
        sa.Column("type_id", sa.Integer, nullable=True),
        sa.Column("resource_id", BigId, nullable=True),
        sa.Column("resource_filter", sa.Text, nullable=True),
        sa.Column("expires_on", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=True),
    )
    op.create_index("ix_exemptions_tenant_expiry", "exemptions", ["tenant_id", "expired_at", "expires_on"])


def downgrade() -> None:
    op.drop_index("ix_exemptions_tenant_expiry", table_name="exemptions")
    op.drop_table("exemptions")
    op.drop_table("control_profiles")
    op.drop_table("policy_settings")
    op.drop_index("ix_recommendations_tenant_exemption", table_name="recommendations")
    with op.batch_alter_table("recommendations") as batch:
        batch.drop_column("exemption_id")
        batch.drop_column("status_cause")
        batch.drop_column("actual_severity")
        batch.drop_column("actual_status")
    with op.batch_alter_table("recommendation_types") as batch:
        batch.drop_column("severity_override")
        batch.drop_column("enabled")
