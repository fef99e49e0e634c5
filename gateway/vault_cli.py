"""``gateway secrets``: keys of the one vault (gateway/vault.py) and rotation of every stored secret."""

from __future__ import annotations

import click
from sqlalchemy import select, update

from gateway import vault
from gateway.models import AutomationRule, ExportDestination, IndicatorFeed, ItsmConnection

# every encrypted column: (table, its columns)
SEALED = (
    (ItsmConnection.__table__, ("secret", "webhook_secret")),
    (ExportDestination.__table__, ("secret", "previous_secret")),
    (AutomationRule.__table__, ("secret",)),
    (IndicatorFeed.__table__, ("secret",)),  # a TAXII feed's password (gateway/intel/taxii.py)
)


@click.group("secrets")
def secrets() -> None:
    """Secrets at rest (ITSM credentials, webhook and export secrets): keys and rotation."""


@secrets.command("new-key")
def new_key() -> None:
    """Print a new key for GATEWAY_SECRETS_KEYS (put it first, then run `gateway secrets rotate`)."""
    click.echo(vault.new_key())


@secrets.command("rotate")
def rotate() -> None:
    """Re-encrypt every stored secret with the first key of GATEWAY_SECRETS_KEYS."""
    from gateway.cli import _config, _store

    config = _config()
    if not vault.configured_keys(config):
        raise click.ClickException("GATEWAY_SECRETS_KEYS is not set: there is no first key to rotate to")
    counts = []
    with _store() as db, db.engine.begin() as conn:
        try:
            for table, columns in SEALED:
                rows = conn.execute(select(table.c.id, *(table.c[name] for name in columns))).all()
                for row in rows:
                    values = {name: vault.rotate(config, getattr(row, name)) for name in columns}
                    conn.execute(update(table).where(table.c.id == row.id).values(**values))
                counts.append(len(rows))
        except vault.SecretsUnavailable as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(
        f"re-encrypted the secrets of {counts[0]} ITSM connection(s) and {counts[1]} export "
        "destination(s) with the first key"
    )
