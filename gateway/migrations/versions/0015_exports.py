"""Continuous export: events in commit order, destinations, deliveries

Revision ID: 0015
Revises: 0016
Create Date: 2026-12-10

* ``lifecycle_events.seq``: the event's position in commit order (gateway/export/events.py), NULL
  until the sequencer gives it one.  The events stored before this migration get ``seq = id``
  (they are all committed, so any order is commit order for a reader that starts now): one UPDATE
  of the table, once.  ``ix_lifecycle_events_unsequenced`` (partial: ``seq IS NULL``) is the
  sequencer's work list; ``ix_lifecycle_events_tenant_seq`` (partial: ``seq IS NOT NULL``) serves
  the destinations' cursors and ``/events`` paged by sequence.
* ``event_sequencer``: the last position given (one row).
* ``export_destinations``, ``export_deliveries``: new tables.
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0016"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def _json():
    return sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("lifecycle_events") as batch:
        batch.add_column(sa.Column("seq", BigId, nullable=True))
    op.execute("UPDATE lifecycle_events SET seq = id")
    op.create_index(
        "ix_lifecycle_events_unsequenced",
        "lifecycle_events",
        ["id"],
        postgresql_where=sa.text("seq IS NULL"),
        sqlite_where=sa.text("seq IS NULL"),
    )
    op.create_index(
        "ix_lifecycle_events_tenant_seq",
        "lifecycle_events",
        ["tenant_id", "seq"],
        postgresql_where=sa.text("seq IS NOT NULL"),
        sqlite_where=sa.text("seq IS NOT NULL"),
    )
    op.create_table(
        "event_sequencer",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
    )
    op.execute(
        "INSERT INTO event_sequencer (id, last_seq) SELECT 1, COALESCE(MAX(id), 0) FROM lifecycle_events"
    )
    op.create_table(
        "export_destinations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(30), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("event_types", _json(), nullable=False),
        sa.Column("filter", sa.Text, nullable=True),
        sa.Column("batch_size", sa.Integer, nullable=False),
        sa.Column("options", _json(), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("secret", sa.Text, nullable=True),
        sa.Column("secret_hint", sa.String(40), nullable=True),
        sa.Column("previous_secret", sa.Text, nullable=True),
        sa.Column("previous_secret_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("secret_rotated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("cursor_seq", sa.BigInteger, nullable=False),
        sa.Column("pending", _json(), nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("last_error_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status_code", sa.Integer, nullable=True),
        sa.Column("last_delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_events", sa.BigInteger, nullable=False),
        sa.Column("lease_owner", sa.String(100), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=True),
    )
    op.create_index("ix_export_destinations_tenant", "export_destinations", ["tenant_id", "id"])
    op.create_table(
        "export_deliveries",
        sa.Column("id", BigId, primary_key=True),
        sa.Column(
            "destination_id",
            sa.Integer,
            sa.ForeignKey("export_destinations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("message_id", sa.String(100), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("event_count", sa.Integer, nullable=False),
        sa.Column("first_event_id", BigId, nullable=True),
        sa.Column("last_event_id", BigId, nullable=True),
        sa.Column("first_seq", sa.BigInteger, nullable=True),
        sa.Column("last_seq", sa.BigInteger, nullable=True),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column("duration_ms", sa.Integer, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_index("ix_export_deliveries_destination", "export_deliveries", ["destination_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_export_deliveries_destination", table_name="export_deliveries")
    op.drop_table("export_deliveries")
    op.drop_index("ix_export_destinations_tenant", table_name="export_destinations")
    op.drop_table("export_destinations")
    op.drop_table("event_sequencer")
    op.drop_index("ix_lifecycle_events_tenant_seq", table_name="lifecycle_events")
    op.drop_index("ix_lifecycle_events_unsequenced", table_name="lifecycle_events")
    with op.batch_alter_table("lifecycle_events") as batch:
        batch.drop_column("seq")
