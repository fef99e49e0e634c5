"""Export snapshots and workflow automation rules

Revision ID: 0019
Revises: 0012
Create Date: 2026-12-03

* ``export_snapshots``: a job delivering the current state of a destination's filtered collections
  as ``<subject>.snapshot`` events (gateway/export/snapshot.py): its progress (the subject being
  walked, the last id delivered) and a lease.
* ``automation_rules``: a tenant's rules (gateway/automation/): trigger, ordered actions, a signing
  secret (encrypted), an ETag version, a cursor over the outbox, the last error and a lease.
* ``automation_actions_done``: one row per (rule, event, action) done, so that each runs once.
"""

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0012"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def _json():
    return sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")


def _at(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "export_snapshots",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column(
            "destination_id",
            sa.Integer,
            sa.ForeignKey("export_destinations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("subjects", _json(), nullable=False),
        sa.Column("subject_index", sa.Integer, nullable=False),
        sa.Column("after_id", BigId, nullable=False),
        sa.Column("delivered", sa.BigInteger, nullable=False),
        sa.Column("total", sa.BigInteger, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        _at("last_error_at"),
        _at("next_attempt_at"),
        sa.Column("lease_owner", sa.String(100), nullable=True),
        _at("lease_expires_at"),
        _at("created_at", False),
        sa.Column("created_by", sa.String(200), nullable=True),
        _at("started_at"),
        _at("finished_at"),
        _at("updated_at", False),
    )
    op.create_index("ix_export_snapshots_destination", "export_snapshots", ["destination_id", "id"])
    op.create_table(
        "automation_rules",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("event_types", _json(), nullable=False),
        sa.Column("filter", sa.Text, nullable=True),
        sa.Column("actions", _json(), nullable=False),
        sa.Column("secret", sa.Text, nullable=True),
        sa.Column("secret_hint", sa.String(40), nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("cursor_seq", sa.BigInteger, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        _at("next_attempt_at"),
        sa.Column("last_error", sa.Text, nullable=True),
        _at("last_error_at"),
        _at("last_run_at"),
        sa.Column("fired_events", sa.BigInteger, nullable=False),
        sa.Column("lease_owner", sa.String(100), nullable=True),
        _at("lease_expires_at"),
        _at("enqueued_at"),
        _at("created_at", False),
        sa.Column("created_by", sa.String(200), nullable=True),
        _at("updated_at", False),
        sa.Column("updated_by", sa.String(200), nullable=True),
    )
    op.create_index("ix_automation_rules_tenant", "automation_rules", ["tenant_id", "id"])
    op.create_table(
        "automation_actions_done",
        sa.Column(
            "rule_id",
            sa.Integer,
            sa.ForeignKey("automation_rules.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("event_id", BigId, primary_key=True, autoincrement=False),
        sa.Column("action_index", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("detail", sa.Text, nullable=True),
        _at("done_at", False),
    )


def downgrade() -> None:
    op.drop_table("automation_actions_done")
    op.drop_index("ix_automation_rules_tenant", table_name="automation_rules")
    op.drop_table("automation_rules")
    op.drop_index("ix_export_snapshots_destination", table_name="export_snapshots")
    op.drop_table("export_snapshots")
