"""Regenerate docs/img/dashboard.png: the dashboard of a live cluster, mid-incident.

    ./run.sh lint   # once: makes .venv with the dev extra (Playwright)
    .venv/bin/python docs/tools/dashboard_screenshot.py [--out docs/img/dashboard.png]

Needs the system's Chromium (``apt-get install -y chromium``). It starts a
nats-server and four ``clstr node --membership kv`` processes of the demo
app, sends requests at a varying rate (one in thirty of a type nobody
handles, to have errors to show), SIGKILLs node-4 and waits until the page
shows its shards moved, then SIGKILLs node-3 and takes the screenshot while
node-3 is silent and its heartbeat has not expired yet: the map shows its
shards faded, the events tell the story so far. About 45 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import tempfile
import time
from pathlib import Path

from playwright.async_api import Playwright, async_playwright

from clstr import Client, RequestError, RetryPolicy
from clstr.observe import Dashboard, DashboardSettings
from clstr.testing import NatsServer, NodeProcess

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
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
NUM_SHARDS = 64
SETTINGS = DashboardSettings(poll_interval=0.5, discovery_timeout=0.3, silent_after=1.2, history=80)


async def traffic(client: Client, stop: asyncio.Event) -> None:
    """Requests at a rate that swells and ebbs (about 40 to 160 a second)."""
    started = time.monotonic()
    i = 0
    while not stop.is_set():
        elapsed = time.monotonic() - started
        rate = 100 + 60 * math.sin(elapsed / 3)
        i += 1
        kind = "Nope" if i % 30 == 0 else "echo"
        with contextlib.suppress(RequestError):
            await client.request_key(f"user-{i % 500}", kind, b"hello", timeout=5)
        await asyncio.sleep(1 / rate)


async def capture(playwright: Playwright, url: str, procs: list[NodeProcess], out: Path) -> None:
    """Open the dashboard at ``url``, kill node-4, then node-3, and take the screenshot."""
    with tempfile.TemporaryDirectory(prefix="clstr-chromium-") as profile:
        browser = await playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 1000},
            device_scale_factor=1,
        )
        # Closed before its profile directory goes, whatever happens: removing the
        # directory of a running Chromium fails and hides the error that got us here
        # (as tests/_browser.py does).
        try:
            page = browser.pages[0] if browser.pages else await browser.new_page()
            await page.goto(url)
            await page.wait_for_selector('#state[data-state="ok"]', timeout=20_000)
            await asyncio.sleep(15)  # history for the sparklines
            await procs[3].kill()
            await page.wait_for_function(
                """() => !document.querySelector('.shard[data-owner="node-4"]')
                    && document.querySelector('#state').dataset.state === 'ok'""",
                timeout=15_000,
            )
            await asyncio.sleep(10)
            await procs[2].kill()
            await page.wait_for_selector('.shard[data-state="silent"]', timeout=10_000)
            await asyncio.sleep(0.6)  # the cells' colour transition (0.4 s)
            await page.screenshot(path=str(out), full_page=True)
        finally:
            await browser.close()


async def main(out: Path) -> None:
    async with NatsServer() as server:
        procs = [
            NodeProcess(
                f"node-{i}", server.url, num_shards=NUM_SHARDS, extra_args=["--membership", "kv"]
            )
            for i in (1, 2, 3, 4)
        ]
        stop = asyncio.Event()
        try:
            for proc in procs:
                await proc.start()
            await asyncio.gather(*(proc.wait_ready(30) for proc in procs))
            client = await Client.connect(
                server.url, num_shards=NUM_SHARDS, retry=RetryPolicy(attempt_timeout=1.0)
            )
            async with (
                client,
                Dashboard(server.url, port=0, settings=SETTINGS) as dashboard,
                async_playwright() as playwright,
            ):
                senders = [asyncio.create_task(traffic(client, stop)) for _ in range(2)]
                try:
                    await capture(playwright, dashboard.url, procs, out)
                finally:
                    stop.set()
                    await asyncio.gather(*senders)
        finally:
            stop.set()
            for proc in procs:
                if proc.returncode is None:
                    await proc.stop()
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png")
    asyncio.run(main(parser.parse_args().out.resolve()))
