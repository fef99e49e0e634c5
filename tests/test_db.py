"""The engine's session settings on PostgreSQL (gateway/db.py)."""

from __future__ import annotations

from sqlalchemy import text

from gateway.db import Database


def test_the_gateways_sessions_run_without_jit_compilation(pg_url):
    """The server's default is ``jit = on``; the gateway's connections turn it off (the merge's
    chunk statements were compiled for hundreds of milliseconds in a store of millions)."""
    db = Database(pg_url)
    try:
        with db.engine.connect() as conn:
            assert conn.execute(text("SHOW jit")).scalar_one() == "off"
            # a statement may still ask for it
            conn.execute(text("SET LOCAL jit = on"))
            assert conn.execute(text("SHOW jit")).scalar_one() == "on"
    finally:
        db.engine.dispose()


def test_options_given_in_the_url_are_kept_beside_it(pg_url):
    db = Database(pg_url + "?options=-c%20statement_timeout%3D12345")
    try:
        with db.engine.connect() as conn:
            assert conn.execute(text("SHOW jit")).scalar_one() == "off"
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "12345ms"
    finally:
        db.engine.dispose()
