"""Headless Chromium for the browser tests: Debian's package driven by Playwright's Python
package (never ``playwright install``). One launch helper and one browser per test module:

    from tests.browser import chromium_fixture  # noqa: F401  (the ``chromium`` fixture)
    pytestmark = [requires_chromium, pytest.mark.asyncio(loop_scope="module")]

The flags grant screen capture and camera without a prompt (Chromium's fake capture
devices: a moving test pattern), so ``getDisplayMedia`` works headless.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--auto-select-desktop-capture-source=Entire screen",
    "--autoplay-policy=no-user-gesture-required",
]
WAIT_MS = 15_000
PHONE = {"width": 390, "height": 844}

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
SCREENSHOTS = BUILD / "screenshots"  # build/ is ignored by git
TIMINGS = BUILD / "negotiation-times.jsonl"

requires_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None and not Path(CHROMIUM).exists(),
    reason="chromium is not installed (make test installs it)")


async def launch(p: Any, *extra: str) -> Any:
    """Chromium with ``ARGS`` and the ``extra`` flags."""
    return await p.chromium.launch(executable_path=CHROMIUM, args=[*ARGS, *extra],
                                   timeout=WAIT_MS)


def chromium_with(*extra: str) -> Any:
    """The module-scoped ``chromium`` fixture, launched with ``extra`` flags too (a module
    that needs them binds it: ``chromium_fixture = chromium_with("--flag")``)."""

    @pytest_asyncio.fixture(scope="module", loop_scope="module", name="chromium")
    async def chromium() -> AsyncIterator[Any]:
        """One headless Chromium for every test of the module (each test opens its own
        contexts, closed with the test)."""
        async with playwright_api.async_playwright() as p:
            browser = await launch(p, *extra)
            try:
                yield browser
            finally:
                await browser.close()

    return chromium


chromium_fixture = chromium_with()


class Pages:
    """Pages of one test, each in its own browser context (own storage, own connection);
    page errors are collected in ``errors`` and every context is closed at the end."""

    def __init__(self, browser: Any) -> None:
        self.browser = browser
        self.contexts: list[Any] = []
        self.errors: list[str] = []

    async def new(self, url: str, *, viewport: dict[str, int] | None = None,
                  content: str | None = None) -> Any:
        """A page at ``url``; with ``content``, that HTML is put into the page at ``url``
        (so it runs on the server's origin: Chromium refuses a page from another origin
        talking to a loopback address)."""
        context = await self.browser.new_context(viewport=viewport or {"width": 1100, "height": 800})
        self.contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(f"{page.url}: {exc}"))
        await page.goto(url, timeout=WAIT_MS)
        if content is not None:
            await page.set_content(content, timeout=WAIT_MS)
        return page

    async def close(self) -> None:
        for context in self.contexts:
            with contextlib.suppress(Exception):  # a context of a crashed page
                await context.close()
        self.contexts.clear()


@pytest_asyncio.fixture(loop_scope="module", name="pages")
async def pages_fixture(chromium: Any) -> AsyncIterator[Pages]:
    pages = Pages(chromium)
    try:
        yield pages
    finally:
        await pages.close()


async def wait_js(page: Any, expression: str, arg: Any = None, timeout: int = WAIT_MS) -> Any:
    """``page.wait_for_function`` returning the truthy value the expression reached."""
    handle = await page.wait_for_function(expression, arg=arg, timeout=timeout)
    return await handle.json_value()


def record_timing(test: str, what: str, ms: float, **extra: Any) -> None:
    """Append one measurement to build/negotiation-times.jsonl (reported, not asserted)."""
    BUILD.mkdir(exist_ok=True)
    entry = {"test": test, "what": what, "ms": round(ms, 1), "at": time.time(), **extra}
    with TIMINGS.open("a") as f:
        f.write(json.dumps(entry) + "\n")


async def screenshot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    await page.screenshot(path=str(path), full_page=True)
    return path
