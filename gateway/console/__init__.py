"""The web console: people (not partner clients) sign in and see their tenants' posture.

Server-rendered Flask/Jinja pages under ``/console``, progressively enhanced by a little
JavaScript.  Sessions are server-side (:mod:`gateway.console.sessions`), every state-changing
request carries a CSRF token (Flask-WTF's ``CSRFProtect``, checked for ``/console`` only: the API
authenticates with bearer tokens, not cookies), and every view is guarded by
:func:`gateway.console.auth.login_required`.  Views call the same service functions as the API.
"""

from __future__ import annotations

from flask import Flask, render_template, request
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException

from gateway.console.sessions import COOKIE_PATH, StoreSessionInterface

csrf = CSRFProtect()
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def is_console_request() -> bool:
    return request.path == COOKIE_PATH or request.path.startswith(COOKIE_PATH + "/")


def init_app(app: Flask) -> None:
    """Register the console blueprints, its sessions, CSRF protection and HTML error pages."""
    from gateway.console import admin_users, oidc, views
    from gateway.console.pages import BLUEPRINTS

    app.session_interface = StoreSessionInterface()
    app.config.setdefault("WTF_CSRF_CHECK_DEFAULT", False)  # checked below, for console requests only
    app.config.setdefault("WTF_CSRF_TIME_LIMIT", None)  # a token lives as long as its session
    app.config.setdefault("WTF_CSRF_HEADERS", ["X-CSRFToken"])
    csrf.init_app(app)

    @app.before_request
    def _console_csrf():
        if request.method not in SAFE_METHODS and is_console_request():
            csrf.protect()

    app.register_blueprint(views.blueprint)
    app.register_blueprint(admin_users.blueprint)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    oidc.init_app(app)
    _html_errors(app)


def _html_errors(app: Flask) -> None:
    """Console requests get an HTML error page; the API keeps its JSON errors."""
    json_handler = app.error_handler_spec[None][None].get(HTTPException)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if not is_console_request() and json_handler is not None:
            return json_handler(exc)
        status = exc.code or 500
        message = {
            400: "The request was not valid.",
            401: "Please sign in again.",
            403: "Your role does not allow this.",
            404: "There is no such page.",
            405: "This page does not take that method.",
        }.get(status, exc.name)
        if isinstance(exc, CSRFError):
            message = (
                "The form was out of date or not sent from the console (CSRF check failed). Reload and retry."
            )
        return render_template("console/error.html", status=status, message=message), status
