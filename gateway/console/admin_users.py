"""The admin Users page: the console users of a tenant; create, change role, disable, revoke.

An admin manages users through the tenants granted to the admin: the page lists the users who
have the URL's tenant; a new user gets that tenant; a user's role or state may be changed only
when all of the user's tenants are the admin's too (else only this tenant can be taken back);
and nobody demotes or disables themself (the last admin would lock everyone out).
"""

from __future__ import annotations

from flask import Blueprint, abort, current_app, redirect, render_template, request, url_for
from sqlalchemy import select

from gateway.console.auth import ROLES, current_tenant, current_user, login_required
from gateway.console.users import UserError, create_user, grant, set_disabled, set_role
from gateway.models import ConsoleUser, ConsoleUserTenant, utcnow

blueprint = Blueprint("console_users", __name__, url_prefix="/console/t/<tenant>/admin/users")
ACTIONS = ("role", "disable", "enable", "revoke")


def _db():
    return current_app.extensions["gateway.db"]


def _users_of_tenant(session, tenant_id: int) -> list[tuple[ConsoleUser, set[int]]]:
    users = list(
        session.scalars(
            select(ConsoleUser)
            .join(ConsoleUserTenant, ConsoleUserTenant.user_id == ConsoleUser.id)
            .where(ConsoleUserTenant.tenant_id == tenant_id)
            .order_by(ConsoleUser.email)
        )
    )
    grants: dict[int, set[int]] = {user.id: set() for user in users}
    if users:
        for user_id, tenant in session.execute(
            select(ConsoleUserTenant.user_id, ConsoleUserTenant.tenant_id).where(
                ConsoleUserTenant.user_id.in_(list(grants))
            )
        ):
            grants[user_id].add(tenant)
    return [(user, grants[user.id]) for user in users]


def _page(status: int = 200, error: str | None = None, notice: str | None = None, form: dict | None = None):
    admin = current_user()
    mine = {ref.id for ref in admin.tenants}
    with _db().read_sessions() as session:
        rows = [
            {
                "user": user,
                "manageable": tenants <= mine and user.id != admin.id,
                "other_tenants": len(tenants - mine),
            }
            for user, tenants in _users_of_tenant(session, current_tenant().id)
        ]
    return render_template(
        "console/admin_users.html",
        rows=rows,
        roles=ROLES,
        error=error,
        notice=notice,
        form=form or {},
        now=utcnow(),
    ), status


@blueprint.get("")
@login_required("admin")
def users(tenant: str):
    return _page()


@blueprint.post("")
@login_required("admin")
def create(tenant: str):
    email = (request.form.get("email") or "").strip()
    role = request.form.get("role") or ""
    password = request.form.get("password") or ""
    try:
        with _db().session() as session:
            create_user(session, email, role, [current_tenant().name], password=password)
    except UserError as exc:
        return _page(400, error=str(exc), form={"email": email, "role": role})
    return redirect(url_for("console_users.users", tenant=tenant, created=email.lower()), 303)


@blueprint.post("/<int:user_id>")
@login_required("admin")
def change(tenant: str, user_id: int):
    action = request.form.get("action")
    if action not in ACTIONS:
        return _page(400, error=f"unknown action; one of {', '.join(ACTIONS)}")
    admin = current_user()
    mine = {ref.id for ref in admin.tenants}
    with _db().session() as session:
        row = next(
            (
                (user, tenants)
                for user, tenants in _users_of_tenant(session, current_tenant().id)
                if user.id == user_id
            ),
            None,
        )
        if row is None:
            abort(404)  # not a user of this tenant: as if it did not exist
        user, tenants = row
        if action != "revoke" and (not tenants <= mine or user.id == admin.id):
            abort(403)
        try:
            if action == "role":
                set_role(session, user.email, request.form.get("role") or "")
            elif action in ("disable", "enable"):
                set_disabled(session, user.email, action == "disable")
            else:
                grant(session, user.email, [current_tenant().name], revoke=True)
        except UserError as exc:
            session.rollback()
            return _page(400, error=str(exc))
    return redirect(url_for("console_users.users", tenant=tenant), 303)
