"""Multipart uploads: an upload, its parts and their bytes in 1 MiB pieces

Revision ID: 0023
Revises: 0012
Create Date: 2026-12-03

A large file sent over a flaky link in numbered parts (each retryable, with a checksum),
completed into one batch (gateway/uploads.py); an unfinished upload expires.
"""

import sqlalchemy as sa
from alembic import op

revision = "0023"
down_revision = "0019"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("client_pk", sa.Integer, sa.ForeignKey("oauth_clients.id"), nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("format", sa.String(50), nullable=False),
        sa.Column("content_type", sa.String(100), nullable=False),
        sa.Column("content_encoding", sa.String(20), nullable=False),
        sa.Column("scan_type", sa.String(20), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("batch_id", BigId, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("tenant_id", "client_pk", "idempotency_key", name="uq_uploads_idempotency"),
    )
    op.create_index("ix_uploads_expires", "uploads", ["expires_at"])
    op.create_table(
        "upload_parts",
        sa.Column(
            "upload_id", sa.String(32), sa.ForeignKey("uploads.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("part_number", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("attempt", sa.String(32), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("md5", sa.String(32), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "upload_pieces",
        sa.Column(
            "upload_id", sa.String(32), sa.ForeignKey("uploads.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("part_number", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("attempt", sa.String(32), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("upload_pieces")
    op.drop_table("upload_parts")
    op.drop_index("ix_uploads_expires", table_name="uploads")
    op.drop_table("uploads")
