"""recommendation types per tenant

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

A recommendation type's texts (title, description, remediation) come from the first record
that named its key; with one row per key across tenants, the first tenant to push a key
decided what every other tenant read (a cross-tenant leak).  Types are now per tenant:
``recommendation_types.tenant_id``, unique ``(tenant_id, key)``, and findings and
recommendations refer to their type by ``(tenant_id, type id)`` (a composite foreign key on
the unique ``(tenant_id, id)``), so a row can never point at another tenant's type.

Existing rows, upgrade:

* a type no finding or recommendation uses is deleted (no tenant can read it);
* a type used by one or more tenants stays (same id) with the tenant whose findings used it
  first (its earliest finding, else its earliest recommendation); every other tenant using it
  gets a copy, and its findings and recommendations are re-pointed to that copy;
* texts: the built-in types (no provider) are the gateway's own and are copied as they are.
  A partner type's texts were one tenant's record: a tenant keeps them only if one of its
  own sources of that type carries exactly those texts (same provider, title, description
  and remediation: it pushed them itself); otherwise its row's title, description,
  remediation, severity, kind and provider are rebuilt from its own earliest finding of the
  type (and that finding's first source), or, with no finding, the key as the title and no
  texts.  So no tenant's row holds a text another tenant pushed.

Downgrade merges the rows of one key back into the oldest one (findings and recommendations
re-pointed) and restores the global unique key: the pre-0005 behaviour, leak included.

SQLite: the tables are rebuilt (batch mode), which with ``PRAGMA foreign_keys=ON`` would run
an implicit ``DELETE`` on each dropped table (and cascade it: ``finding_sources`` of
``findings``).  The pragma cannot change inside a transaction, so this migration ends the
(empty) transaction alembic opened for it, turns foreign keys off on its connection, and
begins again; ``PRAGMA foreign_key_check`` must find nothing before it commits.  The
connection is left with foreign keys off (``gateway.migrate`` disposes of it).
"""

from collections import defaultdict

import sqlalchemy as sa
from alembic import op

revision = "0005"
# This branch (types) was cut before main's 0004 (batch leases, gateway/migrations/versions/
# 0004_batch_lease.py), which touches only ``batches``: merged with main, this must read "0004"
# (the two are independent; alembic refuses two heads, so tests/test_migrations.py says so).
down_revision = "0004"
branch_labels = None
depends_on = None

# SQLite's reflected constraints have no names: batch mode names them by this convention.
NAMING = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
          "uq": "uq_%(table_name)s_%(column_0_name)s"}
REFERRERS = (("findings", "recommendation_type_id"), ("recommendations", "type_id"))
CHUNK = 500

types_t = sa.table(
    "recommendation_types", sa.column("id", sa.Integer), sa.column("tenant_id", sa.Integer),
    sa.column("key", sa.String), sa.column("provider", sa.String), sa.column("kind", sa.String),
    sa.column("title", sa.String), sa.column("description", sa.Text), sa.column("remediation", sa.Text),
    sa.column("severity", sa.String), sa.column("categories", sa.JSON), sa.column("control", sa.String))
findings_t = sa.table(
    "findings", sa.column("id", sa.BigInteger), sa.column("tenant_id", sa.Integer),
    sa.column("recommendation_type_id", sa.Integer), sa.column("kind", sa.String),
    sa.column("title", sa.Text), sa.column("description", sa.Text), sa.column("remediation", sa.Text),
    sa.column("severity", sa.String))
recs_t = sa.table("recommendations", sa.column("id", sa.BigInteger), sa.column("tenant_id", sa.Integer),
                  sa.column("type_id", sa.Integer))
sources_t = sa.table(
    "finding_sources", sa.column("id", sa.BigInteger), sa.column("tenant_id", sa.Integer),
    sa.column("finding_id", sa.BigInteger), sa.column("provider", sa.String), sa.column("title", sa.Text),
    sa.column("description", sa.Text), sa.column("remediation", sa.Text))
TEXTS = ("provider", "kind", "title", "description", "remediation", "severity", "categories", "control")


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _sqlite_foreign_keys_off() -> None:
    """End alembic's transaction for this step (nothing in it yet), turn foreign keys off, begin again."""
    raw = op.get_bind().connection.dbapi_connection
    if raw.in_transaction:
        raw.execute("COMMIT")
    raw.execute("PRAGMA foreign_keys=OFF")
    raw.execute("BEGIN IMMEDIATE")


def _sqlite_check_foreign_keys() -> None:
    problems = op.get_bind().exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if problems:
        raise RuntimeError(f"foreign key violations after migration 0005: {problems[:10]}")


def _chunks(values: list) -> list[list]:
    return [values[start : start + CHUNK] for start in range(0, len(values), CHUNK)]


def _move(bind, moves: list[dict], by_tenant: bool) -> None:
    """Re-point findings and recommendations from ``old_id`` (of ``tenant_id``) to ``new_id``."""
    if not moves:
        return
    key = [sa.Column("old_id", sa.Integer, primary_key=True)]
    if by_tenant:
        key.append(sa.Column("tenant_id", sa.Integer, primary_key=True))
    helper = op.create_table("tmp_type_moves_0005", *key, sa.Column("new_id", sa.Integer, nullable=False))
    op.bulk_insert(helper, moves)
    for table, column in ((findings_t, "recommendation_type_id"), (recs_t, "type_id")):
        match = helper.c.old_id == table.c[column]
        if by_tenant:
            match = match & (helper.c.tenant_id == table.c.tenant_id)
        new_id = sa.select(helper.c.new_id).where(match).scalar_subquery()
        bind.execute(sa.update(table).values({column: new_id}).where(sa.exists().where(match)))
    op.drop_table("tmp_type_moves_0005")


# -- upgrade ------------------------------------------------------------------------------------


def upgrade() -> None:
    postgres = _postgres()
    if not postgres:
        _sqlite_foreign_keys_off()
    if postgres:
        op.add_column("recommendation_types", sa.Column("tenant_id", sa.Integer(), nullable=True))
        op.drop_constraint("recommendation_types_key_key", "recommendation_types", type_="unique")
    else:
        with op.batch_alter_table("recommendation_types", naming_convention=NAMING,
                                  recreate="always") as batch:
            batch.add_column(sa.Column("tenant_id", sa.Integer(), nullable=True))
            batch.drop_constraint("uq_recommendation_types_key", type_="unique")

    _types_per_tenant(op.get_bind())

    if postgres:
        op.alter_column("recommendation_types", "tenant_id", nullable=False)
        op.create_foreign_key("recommendation_types_tenant_id_fkey", "recommendation_types", "tenants",
                              ["tenant_id"], ["id"])
        op.create_unique_constraint("uq_recommendation_types_tenant_key", "recommendation_types",
                                    ["tenant_id", "key"])
        op.create_unique_constraint("uq_recommendation_types_tenant_id", "recommendation_types",
                                    ["tenant_id", "id"])
        for table, column in REFERRERS:
            op.drop_constraint(f"{table}_{column}_fkey", table, type_="foreignkey")
            op.create_foreign_key(f"fk_{table}_tenant_type", table, "recommendation_types",
                                  ["tenant_id", column], ["tenant_id", "id"])
        return
    with op.batch_alter_table("recommendation_types", recreate="always") as batch:
        batch.alter_column("tenant_id", existing_type=sa.Integer(), nullable=False)
        batch.create_foreign_key("fk_recommendation_types_tenant_id_tenants", "tenants", ["tenant_id"],
                                 ["id"])
        batch.create_unique_constraint("uq_recommendation_types_tenant_key", ["tenant_id", "key"])
        batch.create_unique_constraint("uq_recommendation_types_tenant_id", ["tenant_id", "id"])
    for table, column in REFERRERS:
        with op.batch_alter_table(table, naming_convention=NAMING, recreate="always") as batch:
            batch.drop_constraint(f"fk_{table}_{column}_recommendation_types", type_="foreignkey")
            batch.create_foreign_key(f"fk_{table}_tenant_type", "recommendation_types",
                                     ["tenant_id", column], ["tenant_id", "id"])
    _sqlite_check_foreign_keys()


def _types_per_tenant(bind) -> None:
    """Give every type row one tenant: keep, copy (re-pointing the tenant's rows) or delete."""
    types = {row.id: row._asdict() for row in bind.execute(sa.select(types_t))}
    if not types:
        return
    # who uses each type: (earliest finding id, earliest recommendation id) per tenant
    users: dict[int, dict[int, list]] = defaultdict(dict)
    for type_id, tenant_id, first in bind.execute(
            sa.select(findings_t.c.recommendation_type_id, findings_t.c.tenant_id,
                      sa.func.min(findings_t.c.id))
            .group_by(findings_t.c.recommendation_type_id, findings_t.c.tenant_id)):
        users[type_id][tenant_id] = [first, None]
    for type_id, tenant_id, first in bind.execute(
            sa.select(recs_t.c.type_id, recs_t.c.tenant_id, sa.func.min(recs_t.c.id))
            .group_by(recs_t.c.type_id, recs_t.c.tenant_id)):
        users[type_id].setdefault(tenant_id, [None, None])[1] = first
    proven = _tenants_who_pushed_the_texts(bind)
    derived = _own_texts(bind, {(type_id, tenant_id): use[0] for type_id, by_tenant in users.items()
                                for tenant_id, use in by_tenant.items()
                                if types[type_id]["provider"] is not None
                                and (type_id, tenant_id) not in proven})

    unused = sorted(set(types) - set(users))
    for part in _chunks(unused):
        bind.execute(sa.delete(types_t).where(types_t.c.id.in_(part)))
    keep, copies = [], []
    for type_id, by_tenant in sorted(users.items()):
        row = types[type_id]
        order = sorted(by_tenant, key=lambda t: (by_tenant[t][0] is None, by_tenant[t][0] or 0,
                                                 by_tenant[t][1] or 0, t))
        for index, tenant_id in enumerate(order):
            texts = {name: row[name] for name in TEXTS}
            if row["provider"] is not None and (type_id, tenant_id) not in proven:
                texts.update(derived.get((type_id, tenant_id)) or {
                    "title": row["key"][:500], "description": None, "remediation": None, "provider": None})
            if index == 0:
                keep.append({"_id": type_id, "tenant_id": tenant_id, **texts})
            else:
                copies.append({"_old": type_id, "tenant_id": tenant_id, "key": row["key"], **texts})
    if keep:
        bind.execute(sa.update(types_t).where(types_t.c.id == sa.bindparam("_id"))
                     .values({name: sa.bindparam(name) for name in ("tenant_id",) + TEXTS}), keep)
    if copies:
        bind.execute(sa.insert(types_t), [{k: v for k, v in copy.items() if k != "_old"} for copy in copies])
        new_ids = {(tenant_id, key): type_id for type_id, tenant_id, key in bind.execute(
            sa.select(types_t.c.id, types_t.c.tenant_id, types_t.c.key))}
        _move(bind, [{"old_id": copy["_old"], "tenant_id": copy["tenant_id"],
                      "new_id": new_ids[(copy["tenant_id"], copy["key"])]} for copy in copies],
              by_tenant=True)


def _tenants_who_pushed_the_texts(bind) -> set[tuple[int, int]]:
    """(type, tenant) pairs where one of the tenant's sources of that type carries the type's very texts."""
    f, s, t = findings_t.alias("f"), sources_t.alias("s"), types_t.alias("t")
    query = (
        sa.select(f.c.recommendation_type_id, f.c.tenant_id).distinct()
        .select_from(s.join(f, f.c.id == s.c.finding_id).join(t, t.c.id == f.c.recommendation_type_id))
        .where(t.c.provider.is_not(None), s.c.tenant_id == f.c.tenant_id, s.c.provider == t.c.provider,
               sa.func.substr(s.c.title, 1, 500) == t.c.title,
               s.c.description.is_not_distinct_from(t.c.description),
               s.c.remediation.is_not_distinct_from(t.c.remediation))
    )
    return {(type_id, tenant_id) for type_id, tenant_id in bind.execute(query)}


def _own_texts(bind, earliest: dict[tuple[int, int], int | None]) -> dict[tuple[int, int], dict]:
    """A partner type's texts rebuilt from the tenant's earliest finding of it and its first source."""
    wanted = {finding_id: pair for pair, finding_id in earliest.items() if finding_id is not None}
    result: dict[tuple[int, int], dict] = {}
    for part in _chunks(sorted(wanted)):
        for row in bind.execute(sa.select(findings_t).where(findings_t.c.id.in_(part))):
            result[wanted[row.id]] = {"title": row.title[:500], "description": row.description,
                                      "remediation": row.remediation, "severity": row.severity,
                                      "kind": row.kind, "provider": None}
        first_source = {}
        for finding_id, provider in bind.execute(
                sa.select(sources_t.c.finding_id, sources_t.c.provider)
                .where(sources_t.c.finding_id.in_(part)).order_by(sources_t.c.id)):
            first_source.setdefault(finding_id, provider)
        for finding_id, provider in first_source.items():
            result[wanted[finding_id]]["provider"] = provider
    return result


# -- downgrade ----------------------------------------------------------------------------------


def downgrade() -> None:
    postgres = _postgres()
    if not postgres:
        _sqlite_foreign_keys_off()
    if postgres:
        for table, _ in REFERRERS:
            op.drop_constraint(f"fk_{table}_tenant_type", table, type_="foreignkey")
        op.drop_constraint("uq_recommendation_types_tenant_id", "recommendation_types", type_="unique")
        op.drop_constraint("uq_recommendation_types_tenant_key", "recommendation_types", type_="unique")
        op.drop_constraint("recommendation_types_tenant_id_fkey", "recommendation_types", type_="foreignkey")
    _one_type_per_key(op.get_bind())
    if postgres:
        op.drop_column("recommendation_types", "tenant_id")
        op.create_unique_constraint("recommendation_types_key_key", "recommendation_types", ["key"])
        for table, column in REFERRERS:
            op.create_foreign_key(f"{table}_{column}_fkey", table, "recommendation_types", [column], ["id"])
        return
    with op.batch_alter_table("recommendation_types", recreate="always") as batch:
        batch.drop_constraint("uq_recommendation_types_tenant_id", type_="unique")
        batch.drop_constraint("uq_recommendation_types_tenant_key", type_="unique")
        batch.drop_constraint("fk_recommendation_types_tenant_id_tenants", type_="foreignkey")
        batch.drop_column("tenant_id")
        batch.create_unique_constraint("uq_recommendation_types_key", ["key"])
    for table, column in REFERRERS:
        with op.batch_alter_table(table, recreate="always") as batch:
            batch.drop_constraint(f"fk_{table}_tenant_type", type_="foreignkey")
            batch.create_foreign_key(f"fk_{table}_{column}_recommendation_types", "recommendation_types",
                                     [column], ["id"])
    _sqlite_check_foreign_keys()


def _one_type_per_key(bind) -> None:
    """Fold the tenants' rows of each key into the oldest one, re-pointing what used the others."""
    oldest: dict[str, int] = {}
    moves = []
    for type_id, key in bind.execute(sa.select(types_t.c.id, types_t.c.key).order_by(types_t.c.id)):
        if key in oldest:
            moves.append({"old_id": type_id, "new_id": oldest[key]})
        else:
            oldest[key] = type_id
    _move(bind, moves, by_tenant=False)
    for part in _chunks([move["old_id"] for move in moves]):
        bind.execute(sa.delete(types_t).where(types_t.c.id.in_(part)))
