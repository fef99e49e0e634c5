"""automation_rules.state and failing_since (a failing rule shows it); export_destinations.client_key (mTLS)

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-03

Like an export destination, an automation rule whose actions have failed for
``AUTOMATION_FAILING_AFTER_SECONDS`` (with no event acted on meanwhile) is ``failing``, its
``lastError`` visible; the first event it acts on makes it ``active`` again.

A destination reached over TLS may present a client certificate (option ``clientCertificate``,
public); its private key is ``client_key``, encrypted by gateway/vault.py, never shown.
"""

import sqlalchemy as sa
from alembic import op

revision = "0027"
down_revision = "0026"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("automation_rules") as batch:
        batch.add_column(sa.Column("state", sa.String(20), nullable=False, server_default="active"))
        batch.add_column(sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("export_destinations") as batch:
        batch.add_column(sa.Column("client_key", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("export_destinations") as batch:
        batch.drop_column("client_key")
    with op.batch_alter_table("automation_rules") as batch:
        batch.drop_column("failing_since")
        batch.drop_column("state")
