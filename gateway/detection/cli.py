"""``gateway rules list|test``: a tenant's detection rules, and what a rule would raise, raising nothing."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import click
from sqlalchemy import select

from gateway.models import Tenant, utcnow

_AGO = re.compile(r"\A(\d+)([mhd])\Z")


def _since(text: str) -> datetime:
    """``--since``: an ISO 8601 time, or a duration back from now (``90m``, ``24h``, ``7d``)."""
    match = _AGO.match(text.strip())
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        return utcnow() - timedelta(**{{"m": "minutes", "h": "hours", "d": "days"}[unit]: amount})
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter("an ISO 8601 time or a duration such as 90m, 24h, 7d") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _tenant(conn, external_id: str) -> int:
    pk = conn.execute(select(Tenant.id).where(Tenant.external_id == external_id)).scalar()
    if pk is None:
        raise click.ClickException(f"no tenant {external_id}")
    return pk


@click.group("rules")
def rules() -> None:
    """Detection rules (gateway/detection/)."""


@rules.command("list")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
def rules_list(tenant_id: str) -> None:
    """Print the tenant's rules: id, enabled, source, window, threshold, severity, title."""
    from gateway.cli import _store
    from gateway.detection.rules import for_tenant

    with _store() as db, db.engine.connect() as conn:
        found = for_tenant(conn, _tenant(conn, tenant_id))
    click.echo(f"{'id':<34} {'on':<3} {'source':<9} {'window':>7} {'threshold':>9}  severity  title")
    for rule in found.values():
        click.echo(
            f"{rule.id:<34} {'yes' if rule.enabled else 'no':<3} {rule.source:<9} "
            f"{rule.window_minutes:>6}m {rule.threshold:>9}  {rule.severity:<8}  {rule.title}"
            + ("" if rule.builtin else "  (custom)")
        )


@rules.command("test")
@click.argument("rule_id")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
@click.option(
    "--since",
    "since",
    default="24h",
    show_default=True,
    help="rows from this time: ISO 8601, or a duration back from now (90m, 24h, 7d)",
)
def rules_test(rule_id: str, tenant_id: str, since: str) -> None:
    """Run a rule over the tenant's stored rows since a time and print what it would raise (one JSON
    line per hit), raising nothing and moving no watermark."""
    from gateway.cli import _store
    from gateway.detection.engine import find
    from gateway.detection.rules import for_tenant

    start = _since(since)
    with _store() as db, db.engine.connect() as conn:
        pk = _tenant(conn, tenant_id)
        rule = for_tenant(conn, pk).get(rule_id)
        if rule is None:
            raise click.ClickException(f"no detection rule {rule_id} for tenant {tenant_id}")
        hits = find(conn, rule, pk, 0, since=start)
        conn.rollback()
    for hit in hits:
        click.echo(json.dumps(hit.document(), default=str))
    click.echo(
        f"{rule.id}: {len(hits)} alert(s) would be raised from rows since {start.isoformat()}", err=True
    )
