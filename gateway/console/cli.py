"""``gateway user``: the console's local users (create, list, grant, role, disable, enable, password)."""

from __future__ import annotations

import sys

import click

from gateway.console.auth import ROLES
from gateway.console.users import UserError


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


@click.group("user")
def user() -> None:
    """People who sign in to the web console (local users; OIDC users appear at their first sign-in)."""


@user.command("create")
@click.option("--email", required=True)
@click.option("--role", required=True, type=click.Choice(ROLES), help="reader, analyst or admin")
@click.option("--tenant", "tenants", multiple=True, required=True, help="a tenant id the user sees (repeat)")
@click.option(
    "--password-stdin", is_flag=True, help="read the password from the first line of standard input"
)
def user_create(email: str, role: str, tenants: tuple[str, ...], password_stdin: bool) -> None:
    """Create a local user (the password is asked for, or read from stdin)."""
    from gateway.cli import _store
    from gateway.console.users import create_user

    password = _read_password(password_stdin)
    try:
        with _store() as db, db.session() as session:
            create_user(session, email, role, tenants, password=password)
    except UserError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"created {email.strip().lower()} ({role}) on {', '.join(tenants)}")


@user.command("list")
def user_list() -> None:
    """List users: email, role, state, tenants."""
    from gateway.cli import _store
    from gateway.console.users import list_users

    with _store() as db, db.sessions() as session:
        for row, tenants in list_users(session):
            state = "disabled" if row.disabled else ("oidc" if row.password_hash is None else "local")
            click.echo(f"{row.email}\t{row.role}\t{state}\t{','.join(tenants)}")


def _change(action, email: str, *args) -> None:
    from gateway.cli import _store

    try:
        with _store() as db, db.session() as session:
            action(session, email, *args)
    except UserError as exc:
        raise click.ClickException(str(exc)) from None


@user.command("grant")
@click.option("--email", required=True)
@click.option("--tenant", "tenants", multiple=True, required=True, help="a tenant id (repeat)")
@click.option("--revoke", is_flag=True, help="take the tenants back instead")
def user_grant(email: str, tenants: tuple[str, ...], revoke: bool) -> None:
    """Grant tenants to a user (or take them back with --revoke)."""
    from gateway.console.users import grant

    _change(grant, email, tenants, revoke)
    click.echo(
        f"{'revoked' if revoke else 'granted'} {', '.join(tenants)} {'from' if revoke else 'to'} {email}"
    )


@user.command("role")
@click.option("--email", required=True)
@click.option("--role", required=True, type=click.Choice(ROLES))
def user_role(email: str, role: str) -> None:
    """Change a user's role."""
    from gateway.console.users import set_role

    _change(set_role, email, role)
    click.echo(f"{email} is now {role}")


@user.command("disable")
@click.option("--email", required=True)
def user_disable(email: str) -> None:
    """Disable a user and end their sessions."""
    from gateway.console.users import set_disabled

    _change(set_disabled, email, True)
    click.echo(f"disabled {email}")


@user.command("enable")
@click.option("--email", required=True)
def user_enable(email: str) -> None:
    """Enable a user again (and lift a lockout)."""
    from gateway.console.users import set_disabled

    _change(set_disabled, email, False)
    click.echo(f"enabled {email}")


@user.command("password")
@click.option("--email", required=True)
@click.option(
    "--password-stdin", is_flag=True, help="read the password from the first line of standard input"
)
def user_password(email: str, password_stdin: bool) -> None:
    """Set a local user's password (ends their sessions, lifts a lockout)."""
    from gateway.console.users import set_password

    _change(set_password, email, _read_password(password_stdin))
    click.echo(f"password of {email} changed")


@user.command("time-zone")
@click.option("--email", required=True)
@click.option("--zone", default="", help="an IANA name such as Europe/Paris; empty: the browser's")
def user_time_zone(email: str, zone: str) -> None:
    """Show the user's dates in this time zone (by default the console uses the browser's)."""
    from gateway.console.users import set_time_zone

    _change(set_time_zone, email, zone or None)
    click.echo(f"{email}: dates in {zone or 'the browser time zone'}")
