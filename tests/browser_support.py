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


@pytest.fixture(scope="session")
def chromium():
    """One Chromium for the session (Playwright's sync API)."""
    _need_chromium()
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    yield browser
    browser.close()
    playwright.stop()


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
