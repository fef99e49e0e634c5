"""What every console page needs: the signed-in user as an actor, the URL's tenant, refusals."""

from __future__ import annotations

from flask import current_app, render_template

from gateway.console.auth import current_tenant, current_user
from gateway.errors import APIError


def db():
    return current_app.extensions["gateway.db"]


def actor() -> str:
    """The signed-in person as the history names them (the API names a client by its id)."""
    return f"user:{current_user().email}"


def tenant_id() -> int:
    return current_tenant().id


def refused(error: APIError | str, status: int = 400):
    """A page naming what was wrong with the request (never internals), with the error's status."""
    if isinstance(error, APIError):
        message, status = error.message, error.status
    else:
        message = error
    return render_template("console/pages/refused.html", message=message, status=status), status


def may(role: str) -> bool:
    """Whether the signed-in user's role is at least ``role`` (templates hide what they may not do;
    the views refuse it anyway)."""
    user = current_user()
    return user is not None and user.at_least(role)


def install(blueprint) -> None:
    """The helpers every page template uses."""
    blueprint.context_processor(lambda: {"may": may})
