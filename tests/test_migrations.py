"""The migrations build the schema the models describe, on PostgreSQL and SQLite, and undo it."""

from __future__ import annotations

from datetime import UTC, datetime

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, inspect, text

from gateway.db import make_engine
from gateway.migrate import alembic_config, downgrade, upgrade
from gateway.models import Base
from tests.conftest import scratch_postgres


def _modelled(obj, name, type_, reflected, compare_to) -> bool:
    """PostgreSQL-only expression indexes (migration 0003, ``ixpg_*``) are not in the models."""
    return not (type_ == "index" and (name or "").startswith("ixpg_"))


def _check(url: str) -> None:
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"include_object": _modelled})
            diff = compare_metadata(context, Base.metadata)
            assert diff == [], diff
        downgrade(url, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(url)
        assert {"findings", "finding_sources", "batches", "lifecycle_events"} <= set(inspect(engine).get_table_names())
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                names = set(conn.exec_driver_sql(
                    "SELECT indexname FROM pg_indexes WHERE tablename = 'findings'").scalars())
            assert {"ixpg_findings_last_seen", "ixpg_findings_severity"} <= names
    finally:
        engine.dispose()


def test_migrations_on_sqlite(tmp_path):
    _check(f"sqlite:///{tmp_path / 'm.sqlite3'}")


def test_migrations_on_postgresql():
    with scratch_postgres("gw_mig") as url:
        _check(url)


# -- migration 0005: recommendation types per tenant, on existing data ---------------------------

TYPES_REVISION = "0005"


def _revision_before_types(url: str) -> str:
    """The revision migration 0005 follows (0003 on the types branch, 0004 once merged with main)."""
    return ScriptDirectory.from_config(alembic_config(url)).get_revision(TYPES_REVISION).down_revision

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _seed(engine) -> dict[str, int]:
    """A store just before migration 0005 whose recommendation types are shared by key across two tenants."""
    meta = MetaData()
    meta.reflect(engine)
    t = meta.tables
    common = {"created_at": T0, "updated_at": T0}
    with engine.begin() as conn:
        def insert(table: str, **values) -> int:
            return conn.execute(t[table].insert().values(**values).returning(t[table].c[
                "id" if "id" in t[table].c else "tenant_id"])).scalar_one()

        a = insert("tenants", external_id="a", name="a", created_at=T0)
        b = insert("tenants", external_id="b", name="b", created_at=T0)

        def type_(key, provider, title, description=None, remediation=None, kind="compliance"):
            return insert("recommendation_types", key=key, provider=provider, kind=kind, title=title,
                          description=description, remediation=remediation, severity="high", categories=[],
                          control=None)

        builtin = type_("vulnerability-assessment", None, "Vulnerabilities in your machines", "Built in.",
                        "Apply the fixes.", kind="vulnerability")
        guid = type_("8bb8be0a-guid", "Contoso", "B secret title", "B secret description", "B secret fix")
        unused = type_("nobody-uses-me", "Contoso", "Orphan", "orphan text")
        b_only_texts = type_("Contoso:V-1", "Contoso", "B vendor title", "B vendor text", "B vendor fix")
        rec_only = type_("only-a-recommendation", "Contoso", "B rec-only title", "B rec-only text")
        resources = {tenant: insert("resources", tenant_id=tenant, tags=[], **common) for tenant in (a, b)}

        def finding(tenant, type_id, key, title, description, remediation, provider="Contoso",
                    source_texts=None):
            finding_id = insert("findings", tenant_id=tenant, resource_id=resources[tenant],
                                recommendation_type_id=type_id, correlation_key=key, kind="compliance",
                                title=title, description=description, remediation=remediation,
                                severity="low", state="new", state_changed_at=T0, comments=[], tags=[],
                                **common)
            title_s, description_s, remediation_s = source_texts or (title, description, remediation)
            insert("finding_sources", tenant_id=tenant, finding_id=finding_id, resource_id=resources[tenant],
                   provider=provider, provider_id=f"{key}-{tenant}", correlation_key=key, state="open",
                   title=title_s, severity="low", description=description_s, remediation=remediation_s,
                   references=[], provider_timestamp=T0, content_hash="x", **common)
            return finding_id

        def recommendation(tenant, type_id):
            return insert("recommendations", tenant_id=tenant, resource_id=resources[tenant], type_id=type_id,
                          status="Unhealthy", severity="high", first_evaluated=T0, status_changed_at=T0,
                          updated_at=T0, comments=[], tags=[])

        # B pushed first: B's records created the shared rows
        finding(b, builtin, "CVE-2024-1", "xz", "d", "r")
        finding(b, guid, "Contoso/8bb8be0a-guid", "B secret title", "B secret description", "B secret fix")
        finding(a, builtin, "CVE-2024-1", "xz", "d", "r")
        finding(a, guid, "Contoso/8bb8be0a-guid", "A own title", "A own description", "A own fix",
                provider="Fabrikam")
        # B's record created this type, but B's finding of it went to another type (a later re-key)
        finding(a, b_only_texts, "Contoso/V-1", "A vendor title", None, "A vendor fix")
        recs = {(tenant, type_id): recommendation(tenant, type_id)
                for tenant, type_id in ((a, builtin), (b, builtin), (a, guid), (b, guid), (a, b_only_texts),
                                        (a, rec_only))}
    return {"a": a, "b": b, "builtin": builtin, "guid": guid, "unused": unused, "b_only_texts": b_only_texts,
            "rec_only": rec_only, "recs": recs}


def _types(conn) -> dict[tuple[int, str], dict]:
    return {(row.tenant_id, row.key): row._asdict() for row in conn.execute(text(
        "SELECT id, tenant_id, key, provider, title, description, remediation FROM recommendation_types"))}


def _check_types_migration_on_data(url: str) -> None:
    before = _revision_before_types(url)
    upgrade(url, before)
    engine = make_engine(url)
    try:
        ids = _seed(engine)
        a, b = ids["a"], ids["b"]
        with engine.connect() as conn:
            sources_before = conn.execute(text("SELECT count(*) FROM finding_sources")).scalar_one()
        upgrade(url, TYPES_REVISION)
        with engine.connect() as conn:
            types = _types(conn)
            assert set(types) == {(a, "vulnerability-assessment"), (b, "vulnerability-assessment"),
                                  (a, "8bb8be0a-guid"), (b, "8bb8be0a-guid"), (a, "Contoso:V-1"),
                                  (a, "only-a-recommendation")}  # the unused one is gone
            # the tenant whose records created a row keeps it, same id, same texts
            assert types[(b, "8bb8be0a-guid")]["id"] == ids["guid"]
            assert types[(b, "8bb8be0a-guid")]["title"] == "B secret title"
            assert types[(b, "vulnerability-assessment")]["id"] == ids["builtin"]
            # the built-in texts are copied; a partner's are rebuilt from the tenant's own data
            assert types[(a, "vulnerability-assessment")]["title"] == "Vulnerabilities in your machines"
            assert types[(a, "vulnerability-assessment")]["id"] != ids["builtin"]
            texts = ("provider", "title", "description", "remediation")
            assert {k: types[(a, "8bb8be0a-guid")][k] for k in texts} == {
                "provider": "Fabrikam", "title": "A own title", "description": "A own description",
                "remediation": "A own fix"}
            assert {k: types[(a, "Contoso:V-1")][k] for k in ("title", "description", "remediation")} == \
                {"title": "A vendor title", "description": None, "remediation": "A vendor fix"}
            assert {k: types[(a, "only-a-recommendation")][k] for k in texts} == {
                "provider": None, "title": "only-a-recommendation", "description": None, "remediation": None}
            a_texts = " ".join(str(row[k]) for (tenant, _), row in types.items() if tenant == a
                               for k in ("title", "description", "remediation"))
            assert "B " not in a_texts and "Orphan" not in a_texts
            # every finding and recommendation refers to its own tenant's type of the same key
            for table, column in (("findings", "recommendation_type_id"), ("recommendations", "type_id")):
                rows = conn.execute(text(
                    f"SELECT x.tenant_id, t.tenant_id, t.key FROM {table} x "
                    f"JOIN recommendation_types t ON t.id = x.{column}")).all()
                assert rows and all(mine == theirs for mine, theirs, _ in rows), (table, rows)
            assert conn.execute(text("SELECT count(*) FROM finding_sources")).scalar_one() == sources_before
            recs = dict(conn.execute(text("SELECT id, type_id FROM recommendations")).all())
            assert recs[ids["recs"][(a, ids["guid"])]] == types[(a, "8bb8be0a-guid")]["id"]
            assert recs[ids["recs"][(b, ids["guid"])]] == ids["guid"]

        downgrade(url, before)
        with engine.connect() as conn:
            keys = conn.execute(text("SELECT key, id FROM recommendation_types ORDER BY key")).all()
            assert [key for key, _ in keys] == sorted({key for _, key in types})  # one row per key again
            oldest = dict(keys)
            for table, column in (("findings", "recommendation_type_id"), ("recommendations", "type_id")):
                rows = conn.execute(text(f"SELECT x.{column} FROM {table} x")).scalars().all()
                assert set(rows) <= set(oldest.values())
            assert oldest["8bb8be0a-guid"] == ids["guid"]
            assert conn.execute(text("SELECT count(*) FROM finding_sources")).scalar_one() == sources_before
        upgrade(url)
        with engine.connect() as conn:
            assert len(_types(conn)) == 6
    finally:
        engine.dispose()


def test_migration_0005_on_existing_data_on_sqlite(tmp_path):
    _check_types_migration_on_data(f"sqlite:///{tmp_path / 'd.sqlite3'}")


def test_migration_0005_on_existing_data_on_postgresql():
    with scratch_postgres("gw_mig") as url:
        _check_types_migration_on_data(url)
