"""Server-side console sessions in the store (``console_sessions``; SQLite and PostgreSQL alike).

The cookie carries a random id (256 bits); the store keeps only its SHA-256, the session's data
(user id, CSRF secret, OIDC state) and its expiry.  The cookie is HttpOnly, SameSite=Lax, scoped
to ``/console`` and Secure unless ``CONSOLE_COOKIE_SECURE`` is off (plain-http development).
:func:`rotate` gives the session a new id (sign-in: no session fixation) and :func:`end` deletes it.

Flask-Session would do this with Flask-SQLAlchemy, which the gateway does not use (it has its own
engine, and tables belong to Alembic migrations): this small interface writes one row with the
gateway's own :class:`gateway.db.Database` instead.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from flask import Flask, Request, Response
from flask.sessions import SessionInterface, SessionMixin
from sqlalchemy import delete, select
from werkzeug.datastructures import CallbackDict

from gateway.models import ConsoleSession, utcnow

COOKIE_NAME = "gateway_console"
COOKIE_PATH = "/console"
TOUCH_AFTER = timedelta(minutes=5)  # an unchanged session's expiry is pushed back at most this often


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class ConsoleSessionData(CallbackDict, SessionMixin):
    """The session of one request: its data, its id (None: new) and what to do when saving."""

    def __init__(self, data: dict | None = None, session_id: str | None = None, expires_at=None) -> None:
        def on_update(self) -> None:
            self.modified = True

        super().__init__(data or {}, on_update)
        self.session_id = session_id
        self.expires_at = expires_at
        self.modified = False
        self.rotated_from: str | None = None
        self.ended = False

    def rotate(self) -> None:
        """Give the session a new id when it is saved; the old id signs nothing in any more."""
        if self.session_id and not self.rotated_from:
            self.rotated_from = self.session_id
        self.session_id = None
        self.modified = True


class StoreSessionInterface(SessionInterface):
    """Sessions for ``/console`` requests only: the API never reads or sets the cookie."""

    def _db(self, app: Flask):
        return app.extensions["gateway.db"]

    def open_session(self, app: Flask, request: Request) -> ConsoleSessionData | None:
        if not request.path.startswith(COOKIE_PATH):
            return None  # a null session: nothing under /api, /oauth... uses one
        session_id = request.cookies.get(COOKIE_NAME)
        if session_id and 20 <= len(session_id) <= 100:
            with self._db(app).read_sessions() as db_session:
                row = db_session.scalar(
                    select(ConsoleSession).where(ConsoleSession.id_hash == _hash(session_id))
                )
            if row is not None and row.expires_at > utcnow():
                return ConsoleSessionData(dict(row.data), session_id, row.expires_at)
        return ConsoleSessionData()

    def save_session(self, app: Flask, session: ConsoleSessionData, response: Response) -> None:
        if session is None or not isinstance(session, ConsoleSessionData):
            return
        db = self._db(app)
        now = utcnow()
        lifetime = timedelta(hours=float(app.config.get("CONSOLE_SESSION_HOURS", 12)))
        secure = bool(app.config.get("CONSOLE_COOKIE_SECURE", True))
        if session.ended or (not session and session.session_id and session.modified):
            with db.session() as db_session:
                for old in filter(None, (session.session_id, session.rotated_from)):
                    db_session.execute(delete(ConsoleSession).where(ConsoleSession.id_hash == _hash(old)))
            response.delete_cookie(
                COOKIE_NAME, path=COOKIE_PATH, secure=secure, httponly=True, samesite="Lax"
            )
            return
        if not session:
            return  # nothing to keep: no row, no cookie (an anonymous GET of the sign-in page)
        touch = session.expires_at is None or session.expires_at - lifetime + TOUCH_AFTER < now
        if not (session.modified or touch):
            return
        expires_at = now + lifetime
        with db.session() as db_session:
            if session.rotated_from:
                db_session.execute(
                    delete(ConsoleSession).where(ConsoleSession.id_hash == _hash(session.rotated_from))
                )
            if session.session_id is None:
                session.session_id = secrets.token_urlsafe(32)
                db_session.add(
                    ConsoleSession(
                        id_hash=_hash(session.session_id),
                        user_id=session.get("user_id"),
                        data=dict(session),
                        created_at=now,
                        expires_at=expires_at,
                    )
                )
            else:
                row = db_session.get(ConsoleSession, _hash(session.session_id))
                if row is None:  # deleted meanwhile (signed out in another tab): start afresh
                    session.session_id = secrets.token_urlsafe(32)
                    row = ConsoleSession(id_hash=_hash(session.session_id), created_at=now)
                    db_session.add(row)
                row.data = dict(session)
                row.user_id = session.get("user_id")
                row.expires_at = expires_at
        response.set_cookie(
            COOKIE_NAME,
            session.session_id,
            max_age=int(lifetime.total_seconds()),
            path=COOKIE_PATH,
            secure=secure,
            httponly=True,
            samesite="Lax",
        )
        response.vary.add("Cookie")


def rotate(session: ConsoleSessionData) -> None:
    """A new session id at sign-in (the anonymous one is deleted): no session fixation."""
    session.rotate()


def end(session: ConsoleSessionData) -> None:
    """Sign out: the row is deleted and the cookie cleared."""
    session.clear()
    session.ended = True
    session.modified = True


def prune(db, limit: int = 1000) -> int:
    """Delete expired sessions (called now and then at sign-in; a beat task may call it too)."""
    with db.session() as db_session:
        ids = list(
            db_session.scalars(
                select(ConsoleSession.id_hash).where(ConsoleSession.expires_at < utcnow()).limit(limit)
            )
        )
        if ids:
            db_session.execute(delete(ConsoleSession).where(ConsoleSession.id_hash.in_(ids)))
    return len(ids)
