"""batch leases: a live merge is visible as live

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

The worker merging a batch holds a lease on it (``lease_owner``, ``lease_expires_at``) and
renews it while the merge runs.  The periodic sweep re-enqueues only batches whose lease
has expired, and a second delivery of the task does not claim a batch under a live lease,
so a merge longer than the sweep interval is never merged twice.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(length=100), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_owner")
