"""Who is signed in to the console, what their role allows, and which tenants they see.

``@login_required(role=...)`` guards every console view: not signed in → the sign-in page;
role too low → 403; a tenant in the URL that is not granted to the user → 404 (whether it exists
or not: the answer never reveals another tenant).  Roles map onto the API's scopes, so that a
console action is allowed exactly when a client with those scopes could do it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import abort, current_app, g, redirect, request, session, url_for
from sqlalchemy import select

from gateway.models import ConsoleUser, ConsoleUserTenant, Tenant

ROLES = ("reader", "analyst", "admin")  # each includes what the one before allows
ROLE_SCOPES: dict[str, frozenset[str]] = {
    "reader": frozenset({"security.read"}),
    "analyst": frozenset({"security.read", "alerts.manage", "posture.manage"}),
    "admin": frozenset(
        {"security.read", "alerts.manage", "posture.manage", "itsm.manage", "exports.manage", "admin"}
    ),
}


@dataclass(frozen=True)
class TenantRef:
    """A tenant granted to the user: its row id (for queries) and its id in URLs (``name``)."""

    id: int
    name: str
    display_name: str


@dataclass(frozen=True)
class ConsoleIdentity:
    """The signed-in user, as views and templates see them."""

    id: int
    email: str
    role: str
    tenants: tuple[TenantRef, ...] = field(default_factory=tuple)
    time_zone: str | None = None

    @property
    def scopes(self) -> frozenset[str]:
        return ROLE_SCOPES[self.role]

    @property
    def actor(self) -> str:
        """How the user's edits are recorded (the same events as the API's, with this actor)."""
        return f"user:{self.email}"

    def at_least(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def tenant(self, name: str) -> TenantRef | None:
        return next((ref for ref in self.tenants if ref.name == name), None)


def _load(user_id: int) -> ConsoleIdentity | None:
    db = current_app.extensions["gateway.db"]
    with db.read_sessions() as db_session:
        user = db_session.get(ConsoleUser, user_id)
        if user is None or user.disabled:
            return None
        rows = db_session.execute(
            select(Tenant.id, Tenant.external_id, Tenant.name)
            .join(ConsoleUserTenant, ConsoleUserTenant.tenant_id == Tenant.id)
            .where(ConsoleUserTenant.user_id == user.id)
            .order_by(Tenant.name, Tenant.external_id)
        ).all()
    return ConsoleIdentity(
        user.id, user.email, user.role, tuple(TenantRef(*row) for row in rows), user.time_zone
    )


def safe_next(target: str | None) -> str | None:
    """The page to go to after sign-in, if it is a console path of this site; else None.

    Never another host: no scheme or absolute URL, no scheme-relative ``//host``, no backslash
    (browsers read ``/\\host`` as ``//host``), no control character or space."""
    if (
        not target
        or len(target) > 2000
        or not target.startswith("/console/")
        or "//" in target.split("?", 1)[0]
        or "\\" in target
        or any(ord(char) <= 0x20 or ord(char) == 0x7F for char in target)
    ):
        return None
    return target


def current_user() -> ConsoleIdentity | None:
    """The signed-in user of this request (read once per request), or None."""
    if "console_user" not in g:
        user_id = session.get("user_id") if session is not None else None
        g.console_user = _load(int(user_id)) if user_id else None
    return g.console_user


def current_tenant() -> TenantRef | None:
    """The tenant named by the URL, once ``login_required`` has checked it is granted."""
    return g.get("console_tenant")


def login_required(role: str | Callable = "reader") -> Callable:
    """Guard a console view: sign-in, then the URL's tenant grant (404), then the role (403).

    ``@login_required(role="analyst")``; a bare ``@login_required`` means ``role="reader"``."""
    if callable(role):
        return login_required("reader")(role)
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")

    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any):
            user = current_user()
            if user is None:
                if request.method in ("GET", "HEAD"):
                    return redirect(url_for("console.login", next=request.full_path.rstrip("?")))
                abort(401)
            tenant_name = kwargs.get("tenant")
            if tenant_name is not None:
                granted = user.tenant(tenant_name)
                if granted is None:
                    abort(404)
                g.console_tenant = granted
            if not user.at_least(role):
                abort(403)
            return view(*args, **kwargs)

        wrapper.console_role = role
        return wrapper

    return decorate
