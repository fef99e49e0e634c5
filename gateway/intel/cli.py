"""``gateway intel feed add|list|pull``: a tenant's TAXII 2.1 feeds (gateway/intel/taxii.py)."""

from __future__ import annotations

import json
import os

import click
from sqlalchemy import select

from gateway.models import IndicatorFeed, Tenant

FEEDS = IndicatorFeed.__table__


@click.group("intel")
def intel() -> None:
    """Threat intelligence: TAXII 2.1 feeds of indicators."""


@intel.group("feed")
def feed() -> None:
    """TAXII 2.1 collections pulled on a schedule, each with its own watermark."""


def _tenant_pk(conn, tenant_id: str) -> int:
    pk = conn.execute(select(Tenant.id).where(Tenant.external_id == tenant_id)).scalar()
    if pk is None:
        raise click.ClickException(f"no tenant {tenant_id}")
    return pk


@feed.command("add")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
@click.option("--name", required=True, help="the feed's name (indicators' source is taxii:<name>)")
@click.option(
    "--url", "collection_url", required=True, help="the collection: https://host/<root>/collections/<id>/"
)
@click.option("--username", default=None)
@click.option("--password-env", default=None, help="the environment variable holding the password")
@click.option("--page-size", default=500, show_default=True, type=int)
@click.option("--interval", "interval_seconds", default=3600, show_default=True, type=int, help="seconds")
def feed_add(
    tenant_id: str,
    name: str,
    collection_url: str,
    username: str | None,
    password_env: str | None,
    page_size: int,
    interval_seconds: int,
) -> None:
    """Configure a feed (the password is read from an environment variable and stored encrypted)."""
    from gateway.cli import _config, _store
    from gateway.intel import taxii

    password = os.environ.get(password_env) if password_env else None
    if password_env and password is None:
        raise click.ClickException(f"{password_env} is not set")
    config = _config()
    with _store() as db:
        with db.engine.connect() as conn:
            pk = _tenant_pk(conn, tenant_id)
        try:
            feed_id = taxii.add_feed(
                db, config, pk, name, collection_url, username, password, page_size, interval_seconds
            )
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"feed {feed_id} added: {name} -> {collection_url}")


@feed.command("list")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
def feed_list(tenant_id: str) -> None:
    """Print the tenant's feeds: watermark, last pull, its counts and last error."""
    from gateway.cli import _store

    with _store() as db, db.engine.connect() as conn:
        rows = conn.execute(
            select(FEEDS).where(FEEDS.c.tenant_id == _tenant_pk(conn, tenant_id)).order_by(FEEDS.c.id)
        ).all()
    for row in rows:
        click.echo(
            f"{row.id:>4} {row.name} {'on' if row.enabled else 'off'} {row.collection_url} "
            f"watermark={row.added_after or '-'} last={row.last_pulled_at or '-'} "
            f"counts={json.dumps({k: v for k, v in (row.last_counts or {}).items() if k != 'rejections'})}"
            + (f" error={row.last_error[:120]}" if row.last_error else "")
        )


@feed.command("pull")
@click.argument("feed_id", type=int)
def feed_pull(feed_id: int) -> None:
    """Pull one feed now, from its watermark; print the counts."""
    from gateway.cli import _config, _store
    from gateway.intel import taxii

    config = _config()
    with _store() as db:
        try:
            counts = taxii.pull(db, feed_id, config)
        except LookupError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(counts))
