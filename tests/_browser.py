"""A real browser for the tests: the system's Chromium, driven by Playwright.

Playwright's own browser download cannot work where CI runs (no network but
the package registries), so the tests use Debian's ``chromium`` package
(``apt-get install -y chromium``; .ci/run installs it) through
``executable_path``, headless, with a fresh profile each time.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.async_api import Page

CHROMIUM = os.environ.get("CLSTR_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@asynccontextmanager
async def chromium_page(width: int = 1280, height: int = 900) -> AsyncIterator[Page]:
    """A page in a fresh headless Chromium, closed (with its profile) afterwards."""
    if not os.access(CHROMIUM, os.X_OK):
        raise RuntimeError(
            f"no Chromium at {CHROMIUM}: install it with 'apt-get install -y chromium' "
            "(.ci/run does), or point CLSTR_CHROMIUM at one"
        )
    from playwright.async_api import async_playwright

    with tempfile.TemporaryDirectory(prefix="clstr-chromium-") as profile:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=FLAGS,
                viewport={"width": width, "height": height},
            )
            try:
                page = context.pages[0] if context.pages else await context.new_page()
                yield page
            finally:
                await context.close()
