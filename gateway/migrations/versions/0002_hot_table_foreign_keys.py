"""hot tables: drop the per-row tenant (and source resource) foreign keys

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

See the "Hot tables" note in gateway/models.py: these foreign keys cost a trigger
and a row lock per inserted finding, source and event.
"""

from itertools import groupby

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DROPPED = [  # (table, column, referred table)
    ("finding_sources", "resource_id", "resources"),
    ("finding_sources", "tenant_id", "tenants"),
    ("findings", "tenant_id", "tenants"),
    ("lifecycle_events", "tenant_id", "tenants"),
]
# SQLite's foreign keys have no names: batch mode names them by this convention to drop them.
NAMING = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, column, _ in DROPPED:
            op.drop_constraint(f"{table}_{column}_fkey", table, type_="foreignkey")
        return
    for table, group in groupby(DROPPED, key=lambda item: item[0]):
        with op.batch_alter_table(table, naming_convention=NAMING, recreate="always") as batch:
            for _, column, referred in group:
                batch.drop_constraint(f"fk_{table}_{column}_{referred}", type_="foreignkey")


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for table, group in groupby(DROPPED, key=lambda item: item[0]):
        if postgres:
            for _, column, referred in group:
                op.create_foreign_key(f"{table}_{column}_fkey", table, referred, [column], ["id"])
            continue
        with op.batch_alter_table(table, recreate="always") as batch:
            for _, column, referred in group:
                batch.create_foreign_key(f"fk_{table}_{column}_{referred}", referred, [column], ["id"])
