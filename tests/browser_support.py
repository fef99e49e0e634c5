"""Browser test fixtures: the app on PostgreSQL behind a real HTTP server, and Debian's Chromium.

Import the fixtures in a test module with ``from tests.browser_support import *  # noqa: F403``
(``__all__`` names them).  Chromium is Debian's (``/usr/bin/chromium``, installed by ``.ci/run``
when missing), launched by Playwright with ``executable_path``: no browser is ever downloaded.
Without it the browser tests are skipped, except under CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import LiveServer, make_app, wipe

__all__ = ["console_app", "console_live", "chromium", "page", "screenshot"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _need_chromium() -> None:
    if Path(CHROMIUM).exists():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{CHROMIUM} is missing (CI must install Debian's chromium: .ci/run does)")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")


@pytest.fixture
def console_app(pg_url):
    """An app on PostgreSQL that merges pushes inline, its cookies not Secure (plain-http test server)."""
    app = make_app(pg_url, eager=True, CONSOLE_COOKIE_SECURE=False)
    wipe(app.extensions["gateway.db"])
    yield app
    app.extensions["gateway.db"].dispose()


@pytest.fixture
def console_live(console_app):
    """``console_app`` served by a real HTTP server on a free loopback port (``.url``, ``.app``)."""
    server = LiveServer(console_app)
    server.app = console_app
    yield server
    server.stop()


class _Shared:
    """One Playwright and one Chromium per test process, however many modules take the fixture.

    Each module that imports the fixtures gets its own ``chromium`` fixture, and Playwright's sync
    API refuses a second start while the first runs: the instances share this one and the last
    to finish closes it.  Module scope, not session: while Playwright runs, its event loop is the
    running loop of the main thread and ``asyncio.run`` (the NATS export code) refuses to start,
    so the browser must be gone before the suite's other modules run."""

    playwright = None
    browser = None
    users = 0


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium, launched by Playwright's sync API (one per test process)."""
    _need_chromium()
    if _Shared.browser is None:
        from playwright.sync_api import sync_playwright

        _Shared.playwright = sync_playwright().start()
        _Shared.browser = _Shared.playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
    _Shared.users += 1
    yield _Shared.browser
    _Shared.users -= 1
    if _Shared.users == 0:
        _Shared.browser.close()
        _Shared.playwright.stop()
        _Shared.browser = _Shared.playwright = None


@pytest.fixture
def page(chromium):
    """A fresh browser context (no cookies) and page, 1280 px wide."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900}, timezone_id="Europe/Paris")
    context.set_default_timeout(20_000)
    tab = context.new_page()
    yield tab
    context.close()


@pytest.fixture
def screenshot(page, tmp_path):
    """``screenshot(name)`` saves the page as ``<test tmp folder>/screenshots/<name>.png`` (its path)."""
    folder = tmp_path / "screenshots"
    folder.mkdir(exist_ok=True)

    def take(name: str, target=None) -> Path:
        path = folder / f"{name}.png"
        (target or page).screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 0
        return path

    return take


def sign_in(page, base_url: str, email: str, password: str) -> None:
    """Sign in through the form, as a person would."""
    page.goto(f"{base_url}/console/login")
    page.fill("#email", email)
    page.fill("#password", password)
    page.click("button[type=submit]")
    page.wait_for_load_state()
