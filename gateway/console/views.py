"""The console's own views: sign-in and sign-out, the start page, the Overview and the Users page."""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, g, redirect, render_template, request, session, url_for

from gateway import ratelimit
from gateway.console import oidc, sessions
from gateway.console.auth import current_tenant, current_user, login_required, safe_next
from gateway.console.users import check_password
from gateway.errors import TooManyRequests

log = logging.getLogger(__name__)
blueprint = Blueprint(
    "console",
    __name__,
    url_prefix="/console",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)


@blueprint.app_context_processor
def _console_globals():
    if not request.path.startswith("/console"):
        return {}
    return {
        "console_user": current_user(),
        "console_tenant": current_tenant(),
        "oidc_enabled": oidc.enabled(),
    }


@blueprint.get("/login")
def login():
    if current_user() is not None:
        return redirect(safe_next(request.args.get("next")) or url_for("console.index"))
    return render_template("console/login.html", next=safe_next(request.args.get("next")))


def _too_many_attempts(email: str, next_url: str | None):
    """The address's sign-in attempts are spent: 429 with a page a person can read (nothing checked)."""
    limits = ratelimit.current()
    try:
        limits.consume([(limits.console_login, "console-login.address", request.remote_addr or "-")])
    except TooManyRequests as exc:
        wait = exc.headers.get("Retry-After", "60")
        log.info("console sign-in from %s refused: too many attempts", request.remote_addr)
        page = render_template(
            "console/login.html",
            email=email,
            next=next_url,
            error=f"Too many sign-in attempts from your network address. Try again in {wait} seconds.",
        )
        return page, 429, {"Retry-After": wait}
    return None


@blueprint.post("/login")
def login_post():
    email = (request.form.get("email") or "").strip()
    password = request.form.get("password") or ""
    next_url = safe_next(request.form.get("next"))
    refused = _too_many_attempts(email, next_url)
    if refused is not None:
        return refused
    if not email or not password:
        return render_template(
            "console/login.html", error="Enter your email and password.", email=email, next=next_url
        ), 400
    config = current_app.config
    db = current_app.extensions["gateway.db"]
    with db.session() as db_session:
        outcome = check_password(
            db_session,
            email,
            password,
            max_failures=int(config["CONSOLE_LOCKOUT_FAILURES"]),
            lockout_seconds=int(config["CONSOLE_LOCKOUT_SECONDS"]),
        )
    if outcome.user_id is None:
        log.info("console sign-in of %s refused: %s", email, outcome.reason)
        # one message for every reason: the page never tells whether an email exists or is locked
        return render_template(
            "console/login.html",
            email=email,
            next=next_url,
            error="Sign-in failed: wrong email or password, or the account is locked.",
        ), 401
    sessions.rotate(session)
    session.clear()
    session["user_id"] = outcome.user_id
    session["via"] = "password"
    g.pop("console_user", None)
    sessions.prune(db, limit=100)
    return redirect(next_url or url_for("console.index"))


@blueprint.post("/logout")
def logout():
    sessions.end(session)
    g.pop("console_user", None)
    return redirect(url_for("console.login"))


@blueprint.get("/")
@login_required("reader")
def index():
    user = current_user()
    if not user.tenants:
        return render_template("console/no_tenants.html"), 200
    return redirect(url_for("console.overview", tenant=user.tenants[0].name))


@blueprint.get("/t/<tenant>/overview")
@login_required("reader")
def overview(tenant: str):
    from gateway.console import overview as panels

    db = current_app.extensions["gateway.db"]
    data = panels.overview(db, current_tenant().id)
    return render_template("console/overview.html", data=data)


@blueprint.get("/t/<tenant>/")
@login_required("reader")
def tenant_home(tenant: str):
    return redirect(url_for("console.overview", tenant=tenant))


@blueprint.get("/switch")
@login_required("reader")
def switch_tenant():
    """The tenant switcher: the same page of another granted tenant (else its overview)."""
    user = current_user()
    target = user.tenant(request.args.get("tenant", ""))
    if target is None:
        return redirect(url_for("console.index"))
    page = request.args.get("page") or ""
    parts = page.split("/", 5)  # "", "console", "t", old, section, rest
    if len(parts) >= 5 and parts[:3] == ["", "console", "t"] and parts[4]:
        return redirect(f"/console/t/{target.name}/{parts[4]}")
    return redirect(url_for("console.overview", tenant=target.name))
