"""``gateway automation list``: a tenant's workflow automation rules, their progress and last error."""

from __future__ import annotations

import click
from sqlalchemy import select

from gateway.models import AutomationRule, Tenant

RULE = AutomationRule.__table__


@click.group("automation")
def automation() -> None:
    """Workflow automation rules."""


@automation.command("list")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
def automation_list(tenant_id: str) -> None:
    """Print the tenant's rules: enabled, trigger, actions, events acted on, last error."""
    from gateway.cli import _store

    with _store() as db, db.engine.connect() as conn:
        pk = conn.execute(select(Tenant.id).where(Tenant.external_id == tenant_id)).scalar()
        if pk is None:
            raise click.ClickException(f"no tenant {tenant_id}")
        rows = conn.execute(select(RULE).where(RULE.c.tenant_id == pk).order_by(RULE.c.id)).all()
    click.echo(f"{'id':>5}  {'on':<3} {'cursor':>8} {'fired':>7}  name / trigger / actions / last error")
    for row in rows:
        trigger = ",".join(row.event_types or []) + (f" [{row.filter}]" if row.filter else "")
        kinds = ",".join(action["type"] for action in row.actions or [])
        click.echo(
            f"{row.id:>5}  {'yes' if row.enabled else 'no':<3} {row.cursor_seq:>8} {row.fired_events:>7}  "
            f"{row.display_name[:40]} / {trigger[:60]} / {kinds}"
            + (f" / {row.last_error[:80]}" if row.last_error else "")
        )
