"""Helpers for console tests: users, sign-in through the real form, and the CSRF token of a page."""

from __future__ import annotations

import re

from gateway.console.users import create_user
from gateway.db import Database

TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"|name="csrf-token" content="([^"]+)"')
PASSWORD = "correct horse battery staple"


def _db(db_or_app) -> Database:
    return db_or_app if isinstance(db_or_app, Database) else db_or_app.extensions["gateway.db"]


def make_user(
    db_or_app,
    email: str,
    password: str | None = PASSWORD,
    role: str = "reader",
    tenants: list[str] | tuple[str, ...] = (),
) -> int:
    """A local console user with these tenant ids granted; returns its id."""
    with _db(db_or_app).session() as session:
        return create_user(session, email, role, list(tenants), password=password).id


def csrf_token(client, path: str = "/console/login") -> str:
    """The CSRF token that ``path`` renders for this client's session."""
    response = client.get(path)
    assert response.status_code == 200, (path, response.status_code)
    match = TOKEN.search(response.get_data(as_text=True))
    assert match, f"no CSRF token on {path}"
    return match.group(1) or match.group(2)


def login(client, email: str, password: str = PASSWORD, expect: int = 302):
    """Sign in through the sign-in form; the client keeps the session cookie.

    ``client.csrf()`` then gives the session's CSRF token (for forms: field ``csrf_token``; for
    fetch-style calls: header ``X-CSRFToken``)."""
    token = csrf_token(client)
    response = client.post("/console/login", data={"email": email, "password": password, "csrf_token": token})
    assert response.status_code == expect, (response.status_code, response.get_data(as_text=True)[:500])
    client.csrf = lambda path="/console/": csrf_token(client, _page_of(client, path))
    return client


def _page_of(client, path: str) -> str:
    """A page of the session that renders a token (``/console/`` redirects to the first tenant)."""
    response = client.get(path)
    if response.status_code in (301, 302, 303) and response.location:
        return response.location
    return path


def session_cookie(client) -> str | None:
    cookie = client.get_cookie("gateway_console", path="/console")
    return cookie.value if cookie else None
