"""ITSM ticket sync: connections, sync rules, tickets, the items they cover, the delivery queue

Revision ID: 0016
Revises: 0013
Create Date: 2026-12-10

(Chained after 0010 on the itsm branch; re-chained after the last migration at merge.)
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0013"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def _json():
    return sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")


def _time(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "itsm_connections",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("base_url", sa.String(2000), nullable=False),
        sa.Column("auth", sa.String(20), nullable=False),
        sa.Column("username", sa.String(300), nullable=True),
        sa.Column("secret", sa.Text, nullable=True),
        sa.Column("secret_hint", sa.String(20), nullable=True),
        sa.Column("webhook_secret", sa.Text, nullable=True),
        sa.Column("settings", _json(), nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("health", sa.String(20), nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("consecutive_failures", sa.Integer, nullable=False),
        _time("last_success_at"),
        _time("last_failure_at"),
        _time("retry_at"),
        sa.Column("feed_state", _json(), nullable=True),
        sa.Column("poll_state", _json(), nullable=True),
        sa.Column("lease_owner", sa.String(100), nullable=True),
        _time("lease_expires_at"),
        _time("created_at", False),
        _time("updated_at", False),
        sa.Column("created_by", sa.String(200), nullable=True),
        sa.Column("updated_by", sa.String(200), nullable=True),
        sa.UniqueConstraint("tenant_id", "name", name="uq_itsm_connections_name"),
    )
    op.create_table(
        "itsm_rules",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column(
            "connection_id", BigId, sa.ForeignKey("itsm_connections.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("collection", sa.String(30), nullable=False),
        sa.Column("filter", sa.Text, nullable=True),
        sa.Column("grouping", sa.String(20), nullable=False),
        sa.Column("mode", sa.String(20), nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        _time("created_at", False),
        _time("updated_at", False),
        sa.Column("created_by", sa.String(200), nullable=True),
        sa.Column("updated_by", sa.String(200), nullable=True),
    )
    op.create_index("ix_itsm_rules_connection", "itsm_rules", ["connection_id"])
    op.create_table(
        "itsm_tickets",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column(
            "connection_id", BigId, sa.ForeignKey("itsm_connections.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("rule_id", BigId, nullable=True),
        sa.Column("subject_type", sa.String(20), nullable=False),
        sa.Column("subject_id", BigId, nullable=False),
        sa.Column("collection", sa.String(30), nullable=False),
        sa.Column("sync_state", sa.String(20), nullable=False),
        sa.Column("remote_id", sa.String(100), nullable=True),
        sa.Column("remote_key", sa.String(100), nullable=True),
        sa.Column("remote_url", sa.String(2000), nullable=True),
        sa.Column("remote_state", sa.String(100), nullable=True),
        sa.Column("desired_state", sa.String(20), nullable=False),
        sa.Column("severity", sa.String(20), nullable=True),
        sa.Column("create_attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        _time("last_synced_at"),
        _time("created_at", False),
        _time("updated_at", False),
        sa.Column("created_by", sa.String(200), nullable=True),
        sa.UniqueConstraint("connection_id", "subject_type", "subject_id", name="uq_itsm_tickets_subject"),
    )
    op.create_index("ix_itsm_tickets_tenant_id", "itsm_tickets", ["tenant_id", "id"])
    op.create_table(
        "itsm_ticket_items",
        sa.Column("ticket_id", BigId, sa.ForeignKey("itsm_tickets.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("subject_type", sa.String(20), primary_key=True),
        sa.Column("subject_id", BigId, primary_key=True),
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("connection_id", BigId, nullable=False),
        _time("added_at", False),
        sa.UniqueConstraint(
            "connection_id", "subject_type", "subject_id", name="uq_itsm_ticket_items_subject"
        ),
    )
    op.create_index(
        "ix_itsm_ticket_items_subject", "itsm_ticket_items", ["tenant_id", "subject_type", "subject_id"]
    )
    op.create_table(
        "itsm_ops",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column(
            "connection_id", BigId, sa.ForeignKey("itsm_connections.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("ticket_id", BigId, sa.ForeignKey("itsm_tickets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("payload", _json(), nullable=False),
        sa.Column("dedupe_key", sa.String(200), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        _time("created_at", False),
        _time("done_at"),
        sa.UniqueConstraint("ticket_id", "dedupe_key", name="uq_itsm_ops_dedupe"),
    )
    op.create_index("ix_itsm_ops_queue", "itsm_ops", ["connection_id", "status", "id"])


def downgrade() -> None:
    op.drop_index("ix_itsm_ops_queue", table_name="itsm_ops")
    op.drop_table("itsm_ops")
    op.drop_index("ix_itsm_ticket_items_subject", table_name="itsm_ticket_items")
    op.drop_table("itsm_ticket_items")
    op.drop_index("ix_itsm_tickets_tenant_id", table_name="itsm_tickets")
    op.drop_table("itsm_tickets")
    op.drop_index("ix_itsm_rules_connection", table_name="itsm_rules")
    op.drop_table("itsm_rules")
    op.drop_table("itsm_connections")
