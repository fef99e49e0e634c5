"""identity from evidence: merged resources, provenance, observations

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

* ``resources.merged_into``: a resource proven to be another one keeps its row and id,
  which answers with the surviving id.
* ``resource_identifiers`` lose their unique index (the rules in gateway/merge/resources.py
  decide, not the schema: two machines may share a short name, a MAC or even an FQDN) and
  get a lookup index.  Existing rows are brought to the new normal form: ``ip_only`` rows go
  (the IPs are kept as ``ipv4``/``ipv6``), agent ids carry their vendor (the provider of the
  resource's sources: ``tenable:<uuid>``), and every short name (hostname, first label of an
  FQDN, NetBIOS name) gets a ``name`` row.
* ``finding_sources`` get provenance columns (product, format, scan, host_key).
* New tables: ``resource_sources`` (the provider host records merged into a resource),
  ``resource_separations`` (pairs an admin split, never merged again automatically),
  ``observations`` (informational facts).
* Findings that are informational items (every source of them of severity
  ``informational`` and kind ``vulnerability``) become observations of their resource; the
  findings go, their history stays in ``lifecycle_events``, and the recommendations they
  were under are re-evaluated (removed when nothing is left under them).
"""

import ipaddress

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")
CHUNK = 500
SEVERITIES = ("informational", "low", "medium", "high", "critical")

idents = sa.table(
    "resource_identifiers",
    sa.column("tenant_id", sa.Integer),
    sa.column("kind", sa.String),
    sa.column("value", sa.String),
    sa.column("resource_id", sa.BigInteger),
)


def _json():
    return sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")


def _short_name(kind: str, value: str) -> str | None:
    value = value.strip().rstrip(".").lower()
    if not value:
        return None
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    label = value.split(".", 1)[0] if kind in ("fqdn", "hostname") else value
    return label[:500] or None


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table("resources") as batch:
        batch.add_column(sa.Column("merged_into", BigId, nullable=True))
    with op.batch_alter_table("finding_sources") as batch:
        batch.add_column(sa.Column("product", sa.String(100), nullable=True))
        batch.add_column(sa.Column("format", sa.String(50), nullable=True))
        batch.add_column(sa.Column("scan", sa.String(500), nullable=True))
        batch.add_column(sa.Column("host_key", sa.String(500), nullable=True))

    op.drop_index("uq_resource_identifiers_unique_kinds", table_name="resource_identifiers")
    op.create_index("ix_resource_identifiers_value", "resource_identifiers", ["tenant_id", "kind", "value"])

    op.create_table(
        "resource_sources",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("resource_id", BigId, sa.ForeignKey("resources.id", ondelete="CASCADE"), nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("product", sa.String(100)),
        sa.Column("record_key", sa.String(500), nullable=False),
        sa.Column("host_key", sa.String(500)),
        sa.Column("identifiers", _json(), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True)),
        sa.Column("last_seen", sa.DateTime(timezone=True)),
        sa.Column("batch_id", BigId),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("tenant_id", "provider", "record_key", name="uq_resource_sources_record"),
    )
    op.create_index("ix_resource_sources_resource", "resource_sources", ["tenant_id", "resource_id"])
    op.create_table(
        "resource_separations",
        sa.Column("tenant_id", sa.Integer, primary_key=True),
        sa.Column("resource_a", BigId, primary_key=True),
        sa.Column("resource_b", BigId, primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(200)),
    )
    op.create_table(
        "observations",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("resource_id", BigId, sa.ForeignKey("resources.id", ondelete="CASCADE"), nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("product", sa.String(100)),
        sa.Column("provider_id", sa.String(512), nullable=False),
        sa.Column("vendor_id", sa.String(100)),
        sa.Column("category", sa.String(30), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("value", sa.Text),
        sa.Column("port", sa.Integer),
        sa.Column("protocol", sa.String(20)),
        sa.Column("service", sa.String(100)),
        sa.Column("evidence", sa.Text),
        sa.Column("scan", sa.String(500)),
        sa.Column("host_key", sa.String(500)),
        sa.Column("first_seen", sa.DateTime(timezone=True)),
        sa.Column("last_seen", sa.DateTime(timezone=True)),
        sa.Column("provider_timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("batch_id", BigId),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("tenant_id", "provider", "provider_id", name="uq_observations_record"),
    )
    op.create_index("ix_observations_resource", "observations", ["tenant_id", "resource_id", "id"])

    _normalize_identifiers(bind)
    _informational_to_observations(bind)


def _normalize_identifiers(bind) -> None:
    bind.execute(sa.delete(idents).where(idents.c.kind == "ip_only"))
    # agent ids carry their vendor: the provider of the resource's sources
    rows = bind.execute(
        sa.text(
            "SELECT i.tenant_id, i.value, i.resource_id, "
            "(SELECT min(s.provider) FROM finding_sources s WHERE s.tenant_id = i.tenant_id "
            " AND s.resource_id = i.resource_id) FROM resource_identifiers i WHERE i.kind = 'agent_id'"
        )
    ).all()
    for tenant_id, value, resource_id, provider in rows:
        if provider and ":" not in value:
            bind.execute(
                sa.update(idents)
                .where(
                    idents.c.tenant_id == tenant_id,
                    idents.c.kind == "agent_id",
                    idents.c.value == value,
                    idents.c.resource_id == resource_id,
                )
                .values(value=f"{provider.strip().lower()}:{value}"[:500])
            )
    names: set[tuple[int, str, int]] = set()
    for tenant_id, kind, value, resource_id in bind.execute(
        sa.select(idents.c.tenant_id, idents.c.kind, idents.c.value, idents.c.resource_id).where(
            idents.c.kind.in_(("fqdn", "hostname", "netbios"))
        )
    ):
        name = _short_name(kind, value)
        if name:
            names.add((tenant_id, name, resource_id))
    rows = [{"tenant_id": t, "kind": "name", "value": n, "resource_id": r} for t, n, r in sorted(names)]
    for start in range(0, len(rows), CHUNK):
        op.bulk_insert(idents, rows[start : start + CHUNK])


def _informational_to_observations(bind) -> None:
    # a finding is an informational item when every one of its sources is informational; a
    # record with several CVEs had a source per CVE: it becomes one observation (its first source)
    info = (
        "f.kind = 'vulnerability' AND NOT EXISTS (SELECT 1 FROM finding_sources o "
        "WHERE o.finding_id = f.id AND o.severity <> 'informational')"
    )
    rows = bind.execute(
        sa.text(
            "SELECT s.tenant_id, s.finding_id, f.resource_id, f.recommendation_type_id FROM findings f "
            f"JOIN finding_sources s ON s.finding_id = f.id AND s.tenant_id = f.tenant_id WHERE {info}"
        )
    ).all()
    if not rows:
        return
    bind.execute(
        sa.text(
            "INSERT INTO observations (tenant_id, resource_id, provider, product, provider_id, vendor_id, category, "
            "name, value, port, protocol, service, evidence, scan, host_key, first_seen, last_seen, "
            "provider_timestamp, batch_id, created_at, updated_at) "
            "SELECT s.tenant_id, f.resource_id, s.provider, NULL, s.provider_id, s.vendor_id, 'other', s.title, "
            "NULL, NULL, NULL, NULL, s.evidence, NULL, NULL, s.first_seen, s.last_seen, s.provider_timestamp, "
            "s.batch_id, s.created_at, s.updated_at "
            "FROM finding_sources s JOIN findings f ON f.id = s.finding_id AND f.tenant_id = s.tenant_id "
            "WHERE s.id IN (SELECT min(s.id) FROM findings f JOIN finding_sources s ON s.finding_id = f.id "
            f"AND s.tenant_id = f.tenant_id WHERE {info} GROUP BY s.tenant_id, s.provider, s.provider_id)"
        )
    )
    finding_ids = sorted({row.finding_id for row in rows})
    pairs = sorted({(row.tenant_id, row.resource_id, row.recommendation_type_id) for row in rows})
    for start in range(0, len(finding_ids), CHUNK):
        part = finding_ids[start : start + CHUNK]
        bind.execute(
            sa.text("DELETE FROM finding_sources WHERE finding_id IN :ids").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"ids": part},
        )
        bind.execute(
            sa.text("DELETE FROM findings WHERE id IN :ids").bindparams(sa.bindparam("ids", expanding=True)),
            {"ids": part},
        )
    rank = " ".join(f"WHEN '{name}' THEN {index}" for index, name in enumerate(SEVERITIES))
    for tenant_id, resource_id, type_id in pairs:
        open_count, worst = bind.execute(
            sa.text(
                f"SELECT count(*), max(CASE severity {rank} ELSE 0 END) FROM findings "
                "WHERE tenant_id = :t AND resource_id = :r AND recommendation_type_id = :y "
                "AND state <> 'resolved'"
            ),
            {"t": tenant_id, "r": resource_id, "y": type_id},
        ).one()
        remaining = bind.execute(
            sa.text(
                "SELECT count(*) FROM findings WHERE tenant_id = :t AND resource_id = :r "
                "AND recommendation_type_id = :y"
            ),
            {"t": tenant_id, "r": resource_id, "y": type_id},
        ).scalar()
        if not remaining:
            bind.execute(
                sa.text(
                    "DELETE FROM recommendations WHERE tenant_id = :t AND resource_id = :r AND type_id = :y"
                ),
                {"t": tenant_id, "r": resource_id, "y": type_id},
            )
            continue
        status = "Unhealthy" if open_count else "Healthy"
        values = {"t": tenant_id, "r": resource_id, "y": type_id, "status": status}
        if open_count:
            values["severity"] = SEVERITIES[int(worst or 0)]
            bind.execute(
                sa.text(
                    "UPDATE recommendations SET status = :status, severity = :severity "
                    "WHERE tenant_id = :t AND resource_id = :r AND type_id = :y"
                ),
                values,
            )
        else:
            bind.execute(
                sa.text(
                    "UPDATE recommendations SET status = :status WHERE tenant_id = :t "
                    "AND resource_id = :r AND type_id = :y"
                ),
                values,
            )


def downgrade() -> None:
    op.drop_index("ix_observations_resource", table_name="observations")
    op.drop_table("observations")
    op.drop_table("resource_separations")
    op.drop_index("ix_resource_sources_resource", table_name="resource_sources")
    op.drop_table("resource_sources")
    bind = op.get_bind()
    bind.execute(sa.delete(idents).where(idents.c.kind.in_(("name", "instance_id", "cloud_name"))))
    op.drop_index("ix_resource_identifiers_value", table_name="resource_identifiers")
    op.create_index(
        "uq_resource_identifiers_unique_kinds",
        "resource_identifiers",
        ["tenant_id", "kind", "value"],
        unique=True,
        sqlite_where=sa.text("kind NOT IN ('ipv4', 'ipv6')"),
        postgresql_where=sa.text("kind NOT IN ('ipv4', 'ipv6')"),
    )
    with op.batch_alter_table("finding_sources") as batch:
        for column in ("host_key", "scan", "format", "product"):
            batch.drop_column(column)
    with op.batch_alter_table("resources") as batch:
        batch.drop_column("merged_into")
