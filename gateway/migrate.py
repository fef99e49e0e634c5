"""Apply the Alembic migrations shipped with the package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from gateway.db import normalize_url

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(database_url: str) -> Config:
    """An Alembic configuration for the package's migrations and this database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", normalize_url(database_url).replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database schema to ``revision``."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Take the database schema back to ``revision``."""
    command.downgrade(alembic_config(database_url), revision)


def current_revision(database_url: str) -> str | None:
    """The store's revision (None for an empty store)."""
    from alembic.runtime.migration import MigrationContext

    from gateway.db import Database

    db = Database(database_url)
    try:
        with db.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        db.dispose()


def applied_upgrade(database_url: str) -> tuple[str | None, list[str]]:
    """Upgrade to head; return (the revision before, the revisions applied, oldest first)."""
    from alembic.script import ScriptDirectory

    before = current_revision(database_url)
    config = alembic_config(database_url)
    script = ScriptDirectory.from_config(config)
    pending = [f"{rev.revision} ({(rev.doc or '').strip().rstrip('.')})" if rev.doc else rev.revision
               for rev in script.iterate_revisions("head", before)]
    pending.reverse()
    command.upgrade(config, "head")
    return before, pending
