"""``gateway itsm``: connections and their health, resync a ticket, keys of the secrets."""

from __future__ import annotations

import click
from sqlalchemy import func, select, update

from gateway.models import ItsmConnection, ItsmOp, ItsmTicket, ItsmTicketItem, Tenant, utcnow

from . import sync

CN, OP, TK, TI = ItsmConnection.__table__, ItsmOp.__table__, ItsmTicket.__table__, ItsmTicketItem.__table__


@click.group("itsm")
def itsm() -> None:
    """ITSM ticket sync (ServiceNow, Jira)."""


@itsm.command("list")
@click.option("--tenant", "tenant_id", help="only this tenant's connections (its id in URLs)")
def itsm_list(tenant_id: str | None) -> None:
    """Connections with their health, queue and last error (never their secrets)."""
    from gateway.cli import _store

    with _store() as db, db.engine.connect() as conn:
        query = select(CN, Tenant.external_id).join(Tenant, Tenant.id == CN.c.tenant_id).order_by(CN.c.id)
        if tenant_id:
            query = query.where(Tenant.external_id == tenant_id)
        rows = conn.execute(query).all()
        pending = dict(
            conn.execute(
                select(OP.c.connection_id, func.count())
                .where(OP.c.status == "pending")
                .group_by(OP.c.connection_id)
            ).all()
        )
        parked = dict(
            conn.execute(
                select(TK.c.connection_id, func.count())
                .where(TK.c.sync_state == "parked")
                .group_by(TK.c.connection_id)
            ).all()
        )
    header = f"{'id':>5}  {'tenant':<16}{'name':<20}{'kind':<12}{'health':<10}{'pending':>8}{'parked':>8}"
    click.echo(header + "  last error")
    for row in rows:
        click.echo(
            f"{row.id:>5}  {row.external_id:<16}{row.name[:19]:<20}{row.kind:<12}{row.health:<10}"
            f"{pending.get(row.id, 0):>8}{parked.get(row.id, 0):>8}  {(row.last_error or '')[:80]}"
        )


@itsm.command("resync")
@click.option("--ticket", "ticket_id", type=int, help="the ticket's id")
@click.option("--tenant", "tenant_id", help="with --item: the tenant (its id in URLs)")
@click.option("--item", help="with --tenant: finding:ID, recommendation:ID or alert:ID (each of its tickets)")
def itsm_resync(ticket_id: int | None, tenant_id: str | None, item: str | None) -> None:
    """Queue a ticket's parked operations again and bring it in line with its items; the workers deliver
    them at their next tick (GATEWAY_ITSM_INTERVAL)."""
    from gateway.cli import _store

    if (ticket_id is None) == (item is None) or (item is not None and not tenant_id):
        raise click.UsageError("give --ticket ID, or --tenant T --item KIND:ID")
    with _store() as db, db.engine.begin() as conn:
        if ticket_id is not None:
            rows = conn.execute(
                select(TK.c.id, TK.c.tenant_id, TK.c.remote_id).where(TK.c.id == ticket_id)
            ).all()
        else:
            kind, _, number = item.partition(":")
            if kind not in sync.COLLECTION_OF or not number.isdigit():
                raise click.UsageError("--item is finding:ID, recommendation:ID or alert:ID")
            tenant = conn.execute(select(Tenant.id).where(Tenant.external_id == tenant_id)).scalar()
            rows = conn.execute(
                select(TK.c.id, TK.c.tenant_id, TK.c.remote_id)
                .join(TI, TI.c.ticket_id == TK.c.id)
                .where(TI.c.tenant_id == tenant, TI.c.subject_type == kind, TI.c.subject_id == int(number))
            ).all()
        if not rows:
            raise click.ClickException("no such ticket")
        for row in rows:
            conn.execute(
                update(OP)
                .where(OP.c.ticket_id == row.id, OP.c.status == "parked")
                .values(status="pending", attempts=0)
            )
            conn.execute(
                update(TK)
                .where(TK.c.id == row.id)
                .values(
                    sync_state="synced" if row.remote_id else "pending", last_error=None, updated_at=utcnow()
                )
            )
            sync.refresh_tickets(conn, row.tenant_id, {row.id}, "resync")
    click.echo(f"queued {len(rows)} ticket(s) again: {', '.join(str(r.id) for r in rows)}")


@itsm.command("new-key")
def itsm_new_key() -> None:
    """The same as `gateway secrets new-key` (kept as an alias)."""
    from gateway.vault_cli import new_key

    new_key.callback()


@itsm.command("rotate-secrets")
def itsm_rotate() -> None:
    """The same as `gateway secrets rotate` (kept as an alias): every stored secret, ITSM and export."""
    from gateway.vault_cli import rotate

    rotate.callback()
