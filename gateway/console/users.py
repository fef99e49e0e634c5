"""Console users: create, grant tenants, disable, check a password (argon2id, with lockout).

Passwords are hashed with argon2id (argon2-cffi's PasswordHasher, its RFC 9106 low-memory
profile); a hash made with older parameters is replaced at the next good sign-in.  After
``CONSOLE_LOCKOUT_FAILURES`` failed sign-ins in a row a user is locked for
``CONSOLE_LOCKOUT_SECONDS``; while locked even the right password is refused, and the answer is
the same as for a wrong password or an unknown email (nothing tells which).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from gateway.console.auth import ROLES
from gateway.models import ConsoleUser, ConsoleUserTenant, Tenant, utcnow

_hasher = PasswordHasher()
# Checked against when the email is unknown, so that the answer takes as long as for a real user.
_DUMMY_HASH = _hasher.hash("not a password anyone has")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
MIN_PASSWORD = 12


class UserError(ValueError):
    """A user could not be created or changed; the message names the problem."""


@dataclass(frozen=True)
class SignIn:
    """The outcome of a password check: the user id, or why not (for logs, never for the page)."""

    user_id: int | None
    reason: str  # "ok", "unknown", "wrong", "locked", "disabled"


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password_rules(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password must have at least {MIN_PASSWORD} characters")


def tenants_by_name(session: Session, names: Iterable[str]) -> list[Tenant]:
    names = list(dict.fromkeys(names))
    rows = list(session.scalars(select(Tenant).where(Tenant.external_id.in_(names))))
    missing = set(names) - {row.external_id for row in rows}
    if missing:
        raise UserError(f"unknown tenant: {', '.join(sorted(missing))}")
    return rows


def create_user(
    session: Session,
    email: str,
    role: str,
    tenants: Iterable[str],
    password: str | None = None,
    oidc_subject: str | None = None,
) -> ConsoleUser:
    """Add a user with its tenant grants (in the caller's transaction)."""
    email = email.strip().lower()
    if not EMAIL.match(email):
        raise UserError(f"not an email address: {email!r}")
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    if password is not None:
        check_password_rules(password)
    if session.scalar(select(ConsoleUser.id).where(ConsoleUser.email == email)) is not None:
        raise UserError(f"a user {email} already exists")
    rows = tenants_by_name(session, tenants)
    user = ConsoleUser(
        email=email,
        role=role,
        password_hash=hash_password(password) if password else None,
        oidc_subject=oidc_subject,
        disabled=False,
        failed_logins=0,
    )
    session.add(user)
    session.flush()
    for tenant in rows:
        session.add(ConsoleUserTenant(user_id=user.id, tenant_id=tenant.id))
    return user


def find(session: Session, email: str) -> ConsoleUser:
    user = session.scalar(select(ConsoleUser).where(ConsoleUser.email == email.strip().lower()))
    if user is None:
        raise UserError(f"no user {email}")
    return user


def grant(session: Session, email: str, tenants: Iterable[str], revoke: bool = False) -> ConsoleUser:
    """Grant (or with ``revoke`` take back) tenants."""
    user = find(session, email)
    rows = tenants_by_name(session, tenants)
    have = set(
        session.scalars(select(ConsoleUserTenant.tenant_id).where(ConsoleUserTenant.user_id == user.id))
    )
    for tenant in rows:
        if revoke and tenant.id in have:
            session.execute(
                delete(ConsoleUserTenant).where(
                    ConsoleUserTenant.user_id == user.id, ConsoleUserTenant.tenant_id == tenant.id
                )
            )
        elif not revoke and tenant.id not in have:
            session.add(ConsoleUserTenant(user_id=user.id, tenant_id=tenant.id))
    return user


def set_role(session: Session, email: str, role: str) -> ConsoleUser:
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    user = find(session, email)
    user.role = role
    return user


def set_disabled(session: Session, email: str, disabled: bool = True) -> ConsoleUser:
    """Disable (or enable) a user; disabling also ends their sessions."""
    from gateway.models import ConsoleSession

    user = find(session, email)
    user.disabled = disabled
    if disabled:
        session.execute(delete(ConsoleSession).where(ConsoleSession.user_id == user.id))
    else:
        user.failed_logins = 0
        user.locked_until = None
    return user


def list_users(session: Session) -> list[tuple[ConsoleUser, list[str]]]:
    """Every user with the ids of their tenants, by email."""
    users = list(session.scalars(select(ConsoleUser).order_by(ConsoleUser.email)))
    grants: dict[int, list[str]] = {}
    for user_id, name in session.execute(
        select(ConsoleUserTenant.user_id, Tenant.external_id)
        .join(Tenant, Tenant.id == ConsoleUserTenant.tenant_id)
        .order_by(Tenant.external_id)
    ):
        grants.setdefault(user_id, []).append(name)
    return [(user, grants.get(user.id, [])) for user in users]


def check_password(
    session: Session,
    email: str,
    password: str,
    *,
    max_failures: int,
    lockout_seconds: int,
    now: datetime | None = None,
) -> SignIn:
    """Check a local user's password, counting failures; commit is the caller's."""
    now = now or utcnow()
    user = session.scalar(
        select(ConsoleUser).where(ConsoleUser.email == email.strip().lower()).with_for_update()
    )
    if user is None or user.password_hash is None:
        _verify(_DUMMY_HASH, password)
        return SignIn(None, "unknown")
    if user.disabled:
        _verify(_DUMMY_HASH, password)
        return SignIn(None, "disabled")
    if user.locked_until is not None and user.locked_until > now:
        _verify(_DUMMY_HASH, password)
        return SignIn(None, "locked")
    if not _verify(user.password_hash, password):
        failures = (user.failed_logins or 0) + 1
        values: dict = {"failed_logins": failures}
        if failures >= max_failures:
            values = {"failed_logins": 0, "locked_until": now + timedelta(seconds=lockout_seconds)}
        session.execute(update(ConsoleUser).where(ConsoleUser.id == user.id).values(**values))
        return SignIn(None, "locked" if "locked_until" in values else "wrong")
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    user.failed_logins = 0
    user.locked_until = None
    user.last_login_at = now
    return SignIn(user.id, "ok")


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def set_password(session: Session, email: str, password: str) -> ConsoleUser:
    """A new password: the user's sessions end and a lockout is lifted."""
    from gateway.models import ConsoleSession

    check_password_rules(password)
    user = find(session, email)
    user.password_hash = hash_password(password)
    user.failed_logins = 0
    user.locked_until = None
    session.execute(delete(ConsoleSession).where(ConsoleSession.user_id == user.id))
    return user


def set_time_zone(session: Session, email: str, zone: str | None) -> ConsoleUser:
    """The IANA time zone the console shows the user's dates in (None: the browser's)."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if zone:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise UserError(f"unknown time zone {zone!r} (an IANA name such as Europe/Paris)") from None
    user = find(session, email)
    user.time_zone = zone or None
    return user
