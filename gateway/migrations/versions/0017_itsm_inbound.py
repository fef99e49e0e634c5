"""ITSM inbound sync: each ticket's last state, remote comments and webhooks already taken in

Revision ID: 0017
Revises: 0015
Create Date: 2026-12-02

What each ticket last said (assignee, closure), and the remote comments and webhook deliveries
already taken in: polling and webhooks are idempotent.
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0015"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def _json():
    return sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("itsm_tickets", sa.Column("inbound", _json(), nullable=True))
    op.create_table(
        "itsm_inbound_seen",
        sa.Column(
            "connection_id",
            BigId,
            sa.ForeignKey("itsm_connections.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("key", sa.String(300), primary_key=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("itsm_inbound_seen")
    with op.batch_alter_table("itsm_tickets") as batch:
        batch.drop_column("inbound")
