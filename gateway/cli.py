"""The ``gateway`` command: migrate, tenants, clients, and running the service."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from gateway import clients
from gateway.auth import SCOPES
from gateway.config import (
    ConfigError,
    check_startup,
    describe_store,
    effective,
    load_config,
    mask_url,
    unknown_environment_names,
)
from gateway.db import Database
from gateway.errors import APIError, NotFound
from gateway.models import OAuthClient, Tenant, utcnow


@contextmanager
def _store() -> Iterator[Database]:
    """The configured store, its engine closed when the command is done."""
    db = Database(_config()["DATABASE_URL"])
    try:
        yield db
    finally:
        db.dispose()


def _config() -> dict[str, Any]:
    config = load_config()
    for name in unknown_environment_names():
        click.echo(f"warning: unknown setting {name} ignored", err=True)
    return config


def _one_line(exc: BaseException) -> str:
    """What went wrong, in one line, for errors a command does not handle itself."""
    if isinstance(exc, ConfigError):
        return f"configuration: {exc}"
    if isinstance(exc, DBAPIError):
        text = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        if re.search(r"no such table|relation .* does not exist", text) or "UndefinedTable" in type(
                exc.orig).__name__:
            return "the store has no schema (or an old one): run gateway migrate"
        if isinstance(exc, OperationalError):
            return f"the store does not answer: {text}"
        return f"the store refused the change: {text}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class Group(click.Group):
    """Errors end a command with one line on stderr and status 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except (ConfigError, DBAPIError) as exc:
            raise click.ClickException(_one_line(exc)) from None


@click.group(cls=Group)
def main() -> None:
    """Partner integration gateway."""


@main.command("migrate")
def migrate_command() -> None:
    """Apply the database migrations (creates the schema on a new database); say which."""
    from gateway.migrate import applied_upgrade

    url = _config()["DATABASE_URL"]
    before, applied = applied_upgrade(url)
    if applied:
        click.echo(f"applied {len(applied)} migration(s) to {describe_store(url)} "
                   f"(from {before or 'an empty store'}): {', '.join(applied)}")
    click.echo(f"database is up to date (revision {applied[-1].split()[0] if applied else before})")


@main.command("check")
def check_command() -> None:
    """Print the effective configuration (secrets masked) and test the store and the broker."""
    from gateway.api.health import check_broker, check_store

    config = _config()
    for name, value in effective(config).items():
        click.echo(f"{name}={value}")
    failed = False
    db = Database(config["DATABASE_URL"])
    try:
        state, revision = check_store(db.engine)
        if state == "up":
            click.echo(f"store: ok ({describe_store(config['DATABASE_URL'])}, revision {revision})")
        else:
            failed = True
            click.echo(f"store: not migrated (revision {revision or 'none'}): run gateway migrate")
    except Exception as exc:  # noqa: BLE001
        failed = True
        click.echo(f"store: FAILED ({describe_store(config['DATABASE_URL'])}): {_first_line(exc)}")
    finally:
        db.dispose()
    try:
        check_broker(config["BROKER_URL"], timeout=3)
        click.echo(f"broker: ok ({mask_url(config['BROKER_URL'])})")
    except Exception as exc:  # noqa: BLE001
        failed = True
        click.echo(f"broker: FAILED ({mask_url(config['BROKER_URL'])}): {_first_line(exc)}")
    try:
        check_startup(config, "api")
    except ConfigError as exc:
        failed = True
        click.echo(f"settings: FAILED: {exc}")
    if failed:
        raise SystemExit(1)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@main.group()
def tenant() -> None:
    """Tenants (customers)."""


@tenant.command("create")
@click.argument("name")
@click.option("--id", "external_id", help="the tenant id used in URLs (default: a new UUID)")
def tenant_create(name: str, external_id: str | None) -> None:
    """Create a tenant and print its id."""
    external_id = external_id or str(uuid.uuid4())
    try:
        with _store() as db, db.session() as session:
            session.add(Tenant(external_id=external_id, name=name))
    except IntegrityError:
        raise click.ClickException(f"a tenant with id {external_id} already exists") from None
    click.echo(external_id)


@tenant.command("list")
def tenant_list() -> None:
    """List tenants."""
    with _store() as db, db.sessions() as session:
        for row in session.scalars(select(Tenant).order_by(Tenant.id)):
            click.echo(f"{row.external_id}\t{row.name}")


@main.group()
def client() -> None:
    """OAuth clients (one per partner product and deployment)."""


def _tenants(session, external_ids: tuple[str, ...]) -> list[Tenant]:
    rows = list(session.scalars(select(Tenant).where(Tenant.external_id.in_(external_ids))))
    missing = set(external_ids) - {row.external_id for row in rows}
    if missing:
        raise click.UsageError(f"unknown tenant: {', '.join(sorted(missing))}")
    return rows


@client.command("create")
@click.option("--name", required=True, help="a label for the client")
@click.option("--provider", required=True, help="the product it pushes as, e.g. Qualys")
@click.option("--scope", "scopes", multiple=True, required=True, type=click.Choice(sorted(SCOPES)),
              help="a scope it may ask for (repeat)")
@click.option("--tenant", "tenants", multiple=True, required=True, help="a tenant id it may act on (repeat)")
def client_create(name: str, provider: str, scopes: tuple[str, ...], tenants: tuple[str, ...]) -> None:
    """Create a client; print its id and secret (the secret is shown this once)."""
    with _client_errors(), _store() as db, db.session() as session:
        rows = _tenants(session, tenants)
        client_id, secret = clients.create(session, [row.id for row in rows], name, provider, list(scopes))
    click.echo(f"client_id={client_id}")
    click.echo(f"client_secret={secret}")


@client.command("list")
def client_list() -> None:
    """List clients (never their secrets)."""
    with _store() as db, db.sessions() as session:
        for row in session.scalars(select(OAuthClient).order_by(OAuthClient.id)):
            state = "disabled" if row.disabled else "enabled"
            click.echo(f"{row.client_id}\t{row.name}\t{row.provider}\t{row.scope}\t{state}")


@contextmanager
def _client_errors(client_id: str = "") -> Iterator[None]:
    """gateway/clients.py's refusals (the console's 4xx answers) as a one-line usage error."""
    try:
        yield
    except NotFound:
        raise click.UsageError(f"unknown client: {client_id}") from None
    except APIError as exc:
        raise click.UsageError(exc.message) from None


@client.command("disable")
@click.argument("client_id")
def client_disable(client_id: str) -> None:
    """Disable a client and revoke its tokens (enabling it again does not revive them)."""
    with _client_errors(client_id), _store() as db, db.session() as session:
        revoked = clients.set_disabled(session, None, client_id, True)
    click.echo(f"disabled {client_id}")
    click.echo(f"revoked {revoked} access token(s)")


@client.command("enable")
@click.argument("client_id")
def client_enable(client_id: str) -> None:
    """Enable a disabled client again (its old tokens stay revoked: it asks for new ones)."""
    with _client_errors(client_id), _store() as db, db.session() as session:
        clients.set_disabled(session, None, client_id, False)
    click.echo(f"enabled {client_id}")


@client.command("rotate-secret")
@click.argument("client_id")
def client_rotate(client_id: str) -> None:
    """Give a client a new secret (printed once); the old one and every token issued stop working."""
    with _client_errors(client_id), _store() as db, db.session() as session:
        secret, revoked = clients.rotate_secret(session, None, client_id)
    click.echo(f"client_secret={secret}")
    click.echo(f"revoked {revoked} access token(s)")


@main.group()
def batch() -> None:
    """Inspect pushed batches."""


def _store_error(exc: Exception) -> click.ClickException:
    first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    detail = first[0][:300] if first else type(exc).__name__
    return click.ClickException(f"the store could not be read: {detail}")


@batch.command("list")
@click.option("--tenant", "tenant_id", help="only this tenant's batches (its id in URLs)")
@click.option("--status", type=click.Choice(["accepted", "processing", "succeeded", "partiallySucceeded",
                                             "failed"]))
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10000))
def batch_list(tenant_id: str | None, status: str | None, limit: int) -> None:
    """The newest batches: id, tenant, provider, format, status, received, counts."""
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.models import Batch

    try:
        with _store() as db, db.sessions() as session:
            query = select(Batch, Tenant.external_id).join(Tenant, Tenant.id == Batch.tenant_id)
            if tenant_id is not None:
                found = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant_id))
                if found is None:
                    raise click.UsageError(f"unknown tenant: {tenant_id}")
                query = query.where(Batch.tenant_id == found)
            if status is not None:
                query = query.where(Batch.status == status)
            query = query.order_by(Batch.received_at.desc(), Batch.id.desc()).limit(limit)
            rows = session.execute(query).all()
            for row, external_id in rows:
                counts = row.counts or {}
                keys = ("received", "created", "updated", "stale", "rejected")
                summary = " ".join(f"{key}={counts[key]}" for key in keys if key in counts)
                click.echo(f"{row.id}\t{external_id}\t{row.provider}\t{row.format}\t{row.status}\t"
                           f"{row.received_at.isoformat()}\t{summary}")
    except SQLAlchemyError as exc:
        raise _store_error(exc) from None


@batch.command("show")
@click.argument("batch_id")
def batch_show(batch_id: str) -> None:
    """One batch as the API answers it (JSON), with its tenant."""
    import json

    from sqlalchemy.exc import SQLAlchemyError

    from gateway.models import Batch
    from gateway.schemas import BatchOut

    if not (batch_id.isascii() and batch_id.isdigit() and len(batch_id) < 19):
        raise click.UsageError(f"not a batch id: {batch_id}")
    try:
        with _store() as db, db.sessions() as session:
            row = session.get(Batch, int(batch_id))
            if row is None:
                raise click.UsageError(f"unknown batch: {batch_id}")
            body = BatchOut().dump(row)
            body["tenant"] = session.get(Tenant, row.tenant_id).external_id
    except SQLAlchemyError as exc:
        raise _store_error(exc) from None
    click.echo(json.dumps(body, indent=2))


@main.command("worker")
@click.option("--concurrency", "-c", default=2, show_default=True)
@click.option("--beat/--no-beat", default=False, help="also run the periodic sweep in this process")
def worker(concurrency: int, beat: bool) -> None:
    """Run a Celery worker for this configuration."""
    args = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--loglevel=INFO",
            f"--concurrency={concurrency}"]
    if beat:
        args.append("--beat")
    os.execv(sys.executable, args)


@main.command("run")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True)
@click.option("--workers", "worker_count", default=1, show_default=True, help="Celery worker processes")
def run(host: str, port: int, worker_count: int) -> None:
    """Embedded default: migrate, then run the API and a Celery worker (with the sweep) together."""
    from werkzeug.serving import run_simple

    from gateway import create_app
    from gateway.migrate import upgrade

    config = load_config()
    overrides = embedded_overrides(host, port, config["ISSUER"])
    if "GATEWAY_CONSOLE_COOKIE_SECURE" not in os.environ:
        # this server speaks plain http: a Secure console cookie would never be sent back to it
        overrides["CONSOLE_COOKIE_SECURE"] = False
    upgrade(config["DATABASE_URL"])
    env = dict(os.environ)
    env.setdefault("GATEWAY_HOME", os.environ.get("GATEWAY_HOME", os.path.join(os.getcwd(), "instance")))
    worker_process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--beat", "--loglevel=INFO",
         f"--concurrency={worker_count}",
         "--schedule", os.path.join(env["GATEWAY_HOME"], "celerybeat-schedule")],
        env=env, start_new_session=True,  # its own group: stopped (with its children) by us, not by a tty
    )
    click.echo(f"gateway on http://{host}:{port} (store: {describe_store(config['DATABASE_URL'])}); "
               f"worker pid {worker_process.pid}")

    def _stop(signum, frame):  # SIGTERM (and SIGINT) end the server; the worker is stopped below
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        run_simple(host, port, create_app(overrides), threaded=True, use_reloader=False)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if sig == signal.SIGINT else handler)
        _stop_worker(worker_process)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        click.echo("gateway stopped")


def _stop_worker(process: subprocess.Popen) -> None:
    """Warm shutdown of the worker and its beat and pool (SIGTERM), then SIGKILL of its group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever of its group is left (pool children)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def embedded_overrides(host: str, port: int, configured_issuer: str | None) -> dict[str, Any]:
    """The settings ``gateway run`` adds: without ``GATEWAY_ISSUER``, the issuer is its own address,
    or, on every interface (where no one address is the right one), the host each request names."""
    if configured_issuer:
        return {}
    if host in ("", "0.0.0.0", "::"):
        return {"ISSUER_FROM_REQUEST": True}
    return {"ISSUER": f"http://{f'[{host}]' if ':' in host else host}:{port}"}


@main.group()
def suppression() -> None:
    """Alert suppression rules (gateway/suppression.py; the API: .../security/alertSuppressionRules)."""


def _tenant_pk(conn, tenant_id: str) -> int:
    pk = conn.execute(select(Tenant.id).where(Tenant.external_id == tenant_id)).scalar()
    if pk is None:
        raise click.ClickException(f"no tenant {tenant_id}")
    return pk


@suppression.command("list")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
def suppression_list(tenant_id: str) -> None:
    """The tenant's rules: id, name, state, alert type, reason, expiry, conditions."""
    import json

    from gateway import suppression as rules
    from gateway.models import AlertSuppressionRule as Rule

    with _store() as db, db.engine.connect() as conn:
        pk, now = _tenant_pk(conn, tenant_id), rules.clock()
        for row in conn.execute(select(Rule.__table__).where(Rule.tenant_id == pk).order_by(Rule.id)):
            state = "Expired" if row.state == "Enabled" and not rules.is_active(row, now) else row.state
            expiry = row.expiration_date_utc.isoformat() if row.expiration_date_utc else "-"
            click.echo(f"{row.id}\t{row.name}\t{state}\t{row.alert_type}\t{row.reason}\t{expiry}\t"
                       f"{json.dumps(row.conditions)}")


@suppression.command("create")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
@click.option("--name", required=True)
@click.option("--alert-type", required=True,
              help="the alert's category, v2 detectorId or title; * for every type")
@click.option("--reason", required=True, type=click.Choice(
    ["FalsePositive", "BenignPositive", "ValidActivity", "RiskAccepted", "Other"]))
@click.option("--condition", "conditions", multiple=True, nargs=3, metavar="FIELD OPERATOR VALUE",
              help="e.g. entities.ip.address in 10.0.0.4,10.0.0.5 (all must hold; repeatable)")
@click.option("--comment")
@click.option("--expires", help="expirationDateUtc, ISO 8601 with an offset")
@click.option("--apply-to-existing", is_flag=True, help="also suppress the open alerts it matches now")
@click.option("--dry-run", is_flag=True, help="create nothing; print how many open alerts it would suppress")
def suppression_create(tenant_id: str, name: str, alert_type: str, reason: str, conditions: tuple,
                       comment: str | None, expires: str | None, apply_to_existing: bool,
                       dry_run: bool) -> None:
    """Create a rule (as POST .../alertSuppressionRules does) and print its id."""
    from gateway import suppression as rules
    from gateway.models import AlertSuppressionRule as Rule

    scope = [{"field": field, operator: value.split(",") if operator == "in" else value}
             for field, operator, value in conditions]
    body: dict[str, Any] = {"name": name, "alertType": alert_type, "reason": reason,
                            "suppressionAlertsScope": {"allOf": scope}}
    if comment is not None:
        body["comment"] = comment
    if expires is not None:
        body["expirationDateUtc"] = expires
    now = rules.clock()
    try:
        values = rules.validate_rule(body, now=now)
    except rules.RuleError as exc:
        raise click.ClickException(str(exc)) from None
    with _store() as db, db.engine.begin() as conn:
        pk = _tenant_pk(conn, tenant_id)
        if dry_run:
            count = rules.apply_rule(conn, pk, rules.Rule.from_row(values | {"id": 0}), actor="cli", now=now,
                                     dry_run=True)
            click.echo(f"would suppress {count} open alerts")
            return
        if conn.execute(select(Rule.id).where(Rule.tenant_id == pk, Rule.name == name)).first():
            raise click.ClickException(f"the tenant already has a rule named {name}")
        rule_id = conn.execute(Rule.__table__.insert().values(
            tenant_id=pk, created_at=now, created_by="cli", updated_at=now, updated_by="cli", **values)
            .returning(Rule.id)).scalar_one()
        applied = rules.apply_rule(conn, pk, rules.Rule.from_row(values | {"id": rule_id}), actor="cli",
                                   now=now) if apply_to_existing else 0
    click.echo(rule_id)
    if apply_to_existing:
        click.echo(f"suppressed {applied} open alerts", err=True)


@suppression.command("disable")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
@click.argument("rule")
def suppression_disable(tenant_id: str, rule: str) -> None:
    """Disable a rule (by id or name); the alerts it suppressed stay as they are."""
    from gateway import suppression as rules
    from gateway.models import AlertSuppressionRule as Rule

    with _store() as db, db.engine.begin() as conn:
        pk = _tenant_pk(conn, tenant_id)
        by_id = rule.isascii() and rule.isdigit() and len(rule) < 19
        which = Rule.id == int(rule) if by_id else Rule.name == rule
        done = conn.execute(Rule.__table__.update().where(Rule.tenant_id == pk, which).values(
            state="Disabled", updated_at=rules.clock(), updated_by="cli")).rowcount
    if not done:
        raise click.ClickException(f"the tenant has no rule {rule}")
    click.echo(f"disabled {rule}")


@main.group()
def score() -> None:
    """Secure Score."""


@score.command("show")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
@click.option("--recount", is_flag=True, help="recount every control of the tenant first (a store migrated "
              "from before Secure Score)")
def score_show(tenant_id: str, recount: bool) -> None:
    """Print the tenant's Secure Score and its per-control table."""
    from gateway.models import ControlProfile
    from gateway.score.controls import BY_ID
    from gateway.score.upkeep import recount as recount_controls
    from gateway.score.upkeep import tenant_score

    with _store() as db, db.engine.begin() as conn:
        pk = conn.execute(select(Tenant.id).where(Tenant.external_id == tenant_id)).scalar()
        if pk is None:
            raise click.ClickException(f"no tenant {tenant_id}")
        if recount:
            recount_controls(conn, pk)
        result = tenant_score(conn, pk)
        # custom controls have their title only in the tenant's control profiles
        titles = {control.id: control.title for control in BY_ID.values()}
        titles.update(conn.execute(select(ControlProfile.control, ControlProfile.title).where(
            ControlProfile.tenant_id == pk, ControlProfile.builtin.is_(False))).all())
    percent = result["percentage"] * 100
    click.echo(f"Secure Score: {result['current']:g} of {result['max']:g} ({percent:.2f}%)")
    click.echo(f"{'control':<45}{'score':>8}{'max':>6}{'healthy':>9}{'unhealthy':>11}{'n/a':>6}")
    for row in result["controls"]:
        title = titles.get(row.control) or row.control
        click.echo(f"{title:<45}{row.current:>8.2f}{row.max:>6g}{row.healthy:>9}{row.unhealthy:>11}"
                   f"{row.not_applicable:>6}")


@main.group("export")
def export_group() -> None:
    """Continuous export: a tenant's event destinations."""


def _tenant_pk(conn, tenant_id: str) -> int:
    pk = conn.execute(select(Tenant.id).where(Tenant.external_id == tenant_id)).scalar()
    if pk is None:
        raise click.ClickException(f"no tenant {tenant_id}")
    return pk


@export_group.command("list")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
def export_list(tenant_id: str) -> None:
    """Print the tenant's destinations: state, position, lag and last error."""
    from gateway.export.delivery import lag
    from gateway.models import ExportDestination

    destinations = ExportDestination.__table__
    with _store() as db, db.engine.connect() as conn:
        pk = _tenant_pk(conn, tenant_id)
        rows = conn.execute(select(destinations).where(destinations.c.tenant_id == pk)
                            .order_by(destinations.c.id)).all()
        now = utcnow()
        click.echo(f"{'id':>5}  {'kind':<8} {'state':<8} {'cursor':>8} {'pending':>8} {'lag s':>8}  "
                   "name / url / last error")
        for row in rows:
            behind = lag(conn, row, now)
            click.echo(f"{row.id:>5}  {row.kind:<8} {row.state:<8} {row.cursor_seq:>8} "
                       f"{behind['pending_events']:>8} {behind['lag_seconds']:>8.1f}  {row.display_name}")
            click.echo(f"{'':>7}{row.url}")
            if row.last_error:
                at = row.last_error_at.isoformat() if row.last_error_at else ""
                click.echo(f"{'':>7}last error {at}: {row.last_error}")


@export_group.command("replay")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
@click.option("--id", "export_id", required=True, type=int, help="the destination's id")
@click.option("--since", required=True, help="an event id (that event and later ones) or an ISO 8601 time")
def export_replay(tenant_id: str, export_id: int, since: str) -> None:
    """Deliver again from an event id or a time (the destination's cursor moves back there)."""
    from datetime import UTC, datetime

    from gateway.export.delivery import replay
    from gateway.models import ExportDestination

    destinations = ExportDestination.__table__
    if since.isascii() and since.isdigit():
        point: int | datetime = int(since)
    else:
        try:
            point = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError:
            raise click.ClickException("--since is an event id or an ISO 8601 time") from None
        point = point.replace(tzinfo=point.tzinfo or UTC).astimezone(UTC)
    with _store() as db, db.engine.begin() as conn:
        pk = _tenant_pk(conn, tenant_id)
        row = conn.execute(select(destinations).where(destinations.c.tenant_id == pk,
                                                      destinations.c.id == export_id)).first()
        if row is None:
            raise click.ClickException(f"no export {export_id} for tenant {tenant_id}")
        moved = replay(conn, row, point, "cli", utcnow())
    if moved["fromEventId"] is None:
        click.echo(f"export {export_id}: nothing to replay since {since}")
    else:
        click.echo(f"export {export_id}: delivering again from event {moved['fromEventId']} "
                   f"(cursor {moved['cursorSequence']})")


# -- security policy and exemptions ------------------------------------------------------------------
# The same edits as the API (gateway/posture/edits.py): one transaction each, under the tenant's score
# lock, with the recommendations, the Secure Score and the events brought up to date; the actor of
# the events is ``cli:<user>``.


def _actor() -> str:
    import getpass

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (a container): still say it was the command line
        user = "unknown"
    return f"cli:{user}"


@contextmanager
def _posture_edit(tenant_id: str) -> Iterator[tuple[Any, int]]:
    """A transaction on the store and the tenant's pk; an edit the API would refuse (400, 404,
    409) ends the command with the API's message."""
    from gateway.errors import APIError

    try:
        with _store() as db, db.engine.begin() as conn:
            yield conn, _tenant_pk(conn, tenant_id)
    except APIError as exc:
        raise click.ClickException(exc.message) from None


def _score_line(tenant_id: str) -> None:
    from gateway.score.upkeep import tenant_score

    with _store() as db, db.engine.connect() as conn:
        result = tenant_score(conn, _tenant_pk(conn, tenant_id))
    percent = result["percentage"] * 100
    click.echo(f"Secure Score: {result['current']:g} of {result['max']:g} ({percent:.2f}%)")


def _policy_target(type_key: str | None, control: str | None, provider: str | None) -> tuple[str, str]:
    given = [(scope, value) for scope, value in (("recommendationType", type_key), ("control", control),
                                                 ("provider", provider)) if value is not None]
    if len(given) != 1:
        raise click.UsageError("name one target: --type KEY, --control ID or --provider NAME")
    return given[0]


_SEVERITIES = ("informational", "low", "medium", "high", "critical")
_TARGET_OPTIONS = (
    click.option("--type", "type_key", metavar="KEY", help="a recommendation type (its key)"),
    click.option("--control", metavar="ID", help="a Secure Score control (its id)"),
    click.option("--provider", metavar="NAME", help="a provider (every type it created)"),
)


def _targets(command):
    for option in reversed(_TARGET_OPTIONS):
        command = option(command)
    return command


@main.group()
def policy() -> None:
    """The tenant's security policy: entries for a recommendation type, a control or a provider."""


@policy.command("list")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
def policy_list(tenant_id: str) -> None:
    """List the policy entries: id, scope, target, enabled, severity, control, last changed by."""
    from gateway.models import PolicySetting

    ps = PolicySetting.__table__
    with _store() as db, db.engine.connect() as conn:
        rows = conn.execute(select(ps).where(ps.c.tenant_id == _tenant_pk(conn, tenant_id))
                            .order_by(ps.c.id)).all()
    for row in rows:
        enabled = "-" if row.enabled is None else ("enabled" if row.enabled else "disabled")
        click.echo(f"{row.id}\t{row.scope}\t{row.target}\t{enabled}\t{row.severity or '-'}\t"
                   f"{row.control or '-'}\t{row.updated_by or '-'}\t{row.updated_at.isoformat()}")


@policy.command("set")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
@_targets
@click.option("--enable/--disable", "enabled", default=None,
              help="count the target's recommendations, or not")
@click.option("--severity", type=click.Choice((*_SEVERITIES, "default")),
              help="a type's severity override ('default': no override)")
@click.option("--control-map", "control_map", metavar="ID",
              help="the control a type counts in ('default': the one it resolves to)")
@click.option("--description", help="why the entry exists")
def policy_set(tenant_id: str, type_key: str | None, control: str | None, provider: str | None,
               enabled: bool | None, severity: str | None, control_map: str | None,
               description: str | None) -> None:
    """Create or change the entry of one target; its recommendations and the score change now."""
    from gateway.posture import edits

    scope, target = _policy_target(type_key, control, provider)
    data: dict[str, Any] = {}
    if enabled is not None:
        data["enabled"] = enabled
    if severity is not None:
        data["severity"] = None if severity == "default" else severity
    if control_map is not None:
        data["control"] = None if control_map == "default" else control_map
    if description is not None:
        data["description"] = description
    if not data:
        raise click.UsageError("nothing to set: give --enable/--disable, --severity, --control-map or "
                               "--description")
    with _posture_edit(tenant_id) as (conn, pk):
        from gateway.posture import status as posture_status

        posture_status.lock_tenant(conn, pk)  # the entry read and its change, one turn of the lock
        existing = edits.find_policy(conn, pk, scope, target)
        if existing is None:
            policy_id, changed = edits.create_policy(conn, pk, {"scope": scope, "target": target, **data},
                                                     actor=_actor())
            done = "created"
        else:
            policy_id = existing.id
            changed = edits.update_policy(conn, pk, policy_id, data, actor=_actor())
            done = "updated"
    click.echo(f"{done} policy entry {policy_id} ({scope} {target}): "
               f"{changed} recommendation type(s) changed")
    _score_line(tenant_id)


@policy.command("delete")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
@click.argument("entry_id", required=False, type=int)
@_targets
def policy_delete(tenant_id: str, entry_id: int | None, type_key: str | None, control: str | None,
                  provider: str | None) -> None:
    """Delete an entry (by its id, or by its target): what it concerned returns to the defaults."""
    from gateway.posture import edits

    if entry_id is not None and (type_key, control, provider) != (None, None, None):
        raise click.UsageError("give the entry's id or its target, not both")
    target = None if entry_id is not None else _policy_target(type_key, control, provider)
    with _posture_edit(tenant_id) as (conn, pk):
        if target is not None:
            from gateway.posture import status as posture_status

            posture_status.lock_tenant(conn, pk)
            found = edits.find_policy(conn, pk, *target)
            if found is None:
                raise click.ClickException(f"the policy has no entry for {target[0]} '{target[1]}'")
            entry_id = found.id
        changed = edits.delete_policy(conn, pk, entry_id, actor=_actor())
    click.echo(f"deleted policy entry {entry_id}: {changed} recommendation type(s) changed")
    _score_line(tenant_id)


@main.group()
def exemption() -> None:
    """Exemptions: recommendations waived (risk accepted) or mitigated, on a scope, until they expire."""


@exemption.command("list")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
@click.option("--state", type=click.Choice(["active", "expired"]), help="only active or expired ones")
def exemption_list(tenant_id: str, state: str | None) -> None:
    """List exemptions: id, state, category, scope, expiry, name."""
    from gateway.models import Exemption, RecommendationType

    ex, rt = Exemption.__table__, RecommendationType.__table__
    with _store() as db, db.engine.connect() as conn:
        query = (select(ex, rt.c.key.label("type_key"))
                 .outerjoin(rt, (rt.c.tenant_id == ex.c.tenant_id) & (rt.c.id == ex.c.type_id))
                 .where(ex.c.tenant_id == _tenant_pk(conn, tenant_id)).order_by(ex.c.id))
        if state == "active":
            query = query.where(ex.c.expired_at.is_(None))
        elif state == "expired":
            query = query.where(ex.c.expired_at.is_not(None))
        rows = conn.execute(query).all()
    for row in rows:
        scope = " ".join(part for part in (
            row.type_key and f"type={row.type_key}", row.resource_id and f"resource={row.resource_id}",
            row.resource_filter and f"filter={row.resource_filter}") if part)
        expires = row.expires_on.isoformat() if row.expires_on else "never"
        click.echo(f"{row.id}\t{'expired' if row.expired_at else 'active'}\t{row.category}\t{scope}\t"
                   f"{expires}\t{row.display_name}")


def _expiry(value: str | None):
    from datetime import UTC, datetime

    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 date and time: {value}", param_hint="--expires") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@exemption.command("create")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
@click.option("--name", required=True, help="its display name")
@click.option("--category", required=True, type=click.Choice(["mitigated", "waiver"]),
              help="waiver: risk accepted; mitigated: handled otherwise")
@click.option("--type", "type_key", metavar="KEY", help="scope: a recommendation type (its key)")
@click.option("--resource", "resource_id", metavar="ID", help="scope: one resource (its id)")
@click.option("--filter", "resource_filter", metavar="ODATA",
              help="scope: resources matching an OData $filter")
@click.option("--expires", help="when it ends (ISO 8601; UTC when no offset is given)")
@click.option("--description", help="why")
def exemption_create(tenant_id: str, name: str, category: str, type_key: str | None, resource_id: str | None,
                     resource_filter: str | None, expires: str | None, description: str | None) -> None:
    """Exempt the recommendations in a scope (a type, a resource or a filter, or a type with one of
    the others): they are NotApplicable now, and so is every later one in the scope."""
    from gateway.posture import edits

    if resource_id is not None and not (resource_id.isascii() and resource_id.isdigit()
                                        and len(resource_id) < 19):
        raise click.BadParameter(f"not a resource id: {resource_id}", param_hint="--resource")
    data = {"displayName": name, "category": category, "description": description,
            "recommendationType": type_key, "resourceId": resource_id, "resourceFilter": resource_filter,
            "expiresOn": _expiry(expires)}
    with _posture_edit(tenant_id) as (conn, pk):
        exemption_id, matched = edits.create_exemption(conn, pk, data, actor=_actor())
    click.echo(f"created exemption {exemption_id}: its scope holds {matched} recommendation(s)")
    if not matched:
        click.echo("warning: the exemption covers no recommendation yet (it will cover later ones in "
                   "its scope)", err=True)
    _score_line(tenant_id)


@exemption.command("delete")
@click.option("--tenant", "tenant_id", required=True, help="the tenant (its id in URLs)")
@click.argument("exemption_id", type=int)
def exemption_delete(tenant_id: str, exemption_id: int) -> None:
    """Delete an exemption: what it covered returns to its real status at once."""
    from gateway.posture import edits

    with _posture_edit(tenant_id) as (conn, pk):
        released = edits.delete_exemption(conn, pk, exemption_id, actor=_actor())
    click.echo(f"deleted exemption {exemption_id}: {released} recommendation(s) released")
    _score_line(tenant_id)


from gateway.itsm.cli import itsm as _itsm  # noqa: E402 - the `gateway itsm` commands

main.add_command(_itsm)


from gateway.vault_cli import secrets as _secrets  # noqa: E402 - the `gateway secrets` commands

main.add_command(_secrets)

from gateway.automation.cli import automation as _automation  # noqa: E402 - `gateway automation`

main.add_command(_automation)

from gateway.console.cli import user as _user  # noqa: E402 - `gateway user` (console users)

main.add_command(_user)
from gateway.intel.cli import intel as _intel  # noqa: E402 - `gateway intel feed add|list|pull`

main.add_command(_intel)
from gateway.detection.cli import rules as _rules  # noqa: E402 - `gateway rules list|test`

main.add_command(_rules)


if __name__ == "__main__":
    main()
