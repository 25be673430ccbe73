"""The dashboard in a real browser (headless Chromium) against a live cluster of
node processes on KV membership: it shows every shard owned, and after a node
is SIGKILLed it shows the node's shards move to the others in time.
"""

from __future__ import annotations

import asyncio
import socket
import uuid

from clstr import Client
from clstr.observe import Dashboard, DashboardSettings
from clstr.testing import NatsServer, NodeProcess

from _browser import chromium_page

NUM_SHARDS = 32
# `clstr node --membership kv` runs the default KvSettings: a dead node's
# heartbeat expires after heartbeat_ttl (3 s); the server then places its
# expiry marker and the survivors take the keys on their next reconcile
# (about 1 s more, measured 3.2-4 s from the kill on an idle machine). The
# page shows it with the next update. The bound leaves room for a loaded CI.
FAILOVER_BOUND = 10.0
SETTINGS = DashboardSettings(poll_interval=0.5, discovery_timeout=0.3, silent_after=1.2)

ALL_OWNED = """n => document.querySelector('#state').dataset.state === 'ok'
    && document.querySelectorAll('.shard[data-state="owned"]').length === n"""
MOVED_AWAY = """([victim, n]) =>
    document.querySelectorAll(`.shard[data-owner="${victim}"]`).length === 0
    && document.querySelectorAll('.shard[data-state="owned"]').length === n"""


async def test_the_page_shows_a_killed_nodes_shards_move() -> None:
    """Chromium loads the dashboard, sees all shards owned by three node processes
    with their rows and latency, then sees a SIGKILLed node's shards move to the
    other two within FAILOVER_BOUND, its heartbeat expiry among the events."""
    prefix = f"b{uuid.uuid4().hex[:8]}"
    loop = asyncio.get_running_loop()
    async with NatsServer() as server:
        procs = [
            NodeProcess(
                f"node-{i}",
                server.url,
                num_shards=NUM_SHARDS,
                prefix=prefix,
                extra_args=["--membership", "kv"],
            )
            for i in (1, 2, 3)
        ]
        try:
            for proc in procs:
                await proc.start()
            await asyncio.gather(*(proc.wait_ready(30) for proc in procs))
            async with (
                Dashboard(server.url, prefix=prefix, port=0, settings=SETTINGS) as dashboard,
                chromium_page() as page,
            ):
                await page.goto(dashboard.url)
                await page.wait_for_function(ALL_OWNED, arg=NUM_SHARDS, timeout=20_000)
                rows = await page.eval_on_selector_all(
                    "#nodes tbody tr", "rows => rows.map(r => r.dataset.node)"
                )
                assert rows == ["node-1", "node-2", "node-3"]
                client = await Client.connect(server.url, num_shards=NUM_SHARDS, prefix=prefix)
                async with client:
                    for i in range(30):
                        await client.request_key(f"user-{i}", "echo", b"hi")
                # p50 shows in some row once the requests are in a poll's window.
                await page.wait_for_function(
                    """() => [...document.querySelectorAll('#nodes tbody tr td:nth-child(10)')]
                        .some(td => td.textContent.endsWith(' ms'))""",
                    timeout=10_000,
                )
                victim = procs[1]
                held = await page.locator('.shard[data-owner="node-2"]').count()
                assert held > 0
                killed_at = loop.time()
                await victim.kill()
                await page.wait_for_function(
                    MOVED_AWAY, arg=["node-2", NUM_SHARDS], timeout=FAILOVER_BOUND * 1000
                )
                took = loop.time() - killed_at
                assert took < FAILOVER_BOUND
                await page.wait_for_selector("#events li.kind-expire", timeout=5_000)
                events = await page.locator("#events").inner_text()
                assert "node-2's heartbeat expired" in events
                assert "moved from node-2 to node-" in events
                status = await page.get_attribute('#nodes tr[data-node="node-2"]', "data-status")
                assert status in ("gone", None)  # marked gone, or already forgotten
                print(f"node-2 held {held} shards; moved on the page {took:.2f} s after the kill")
        finally:
            for proc in procs:
                if proc.returncode is None:
                    await proc.stop()


async def test_the_page_says_when_nats_or_the_dashboard_is_unreachable() -> None:
    """With nothing listening at the NATS URL, the page shows the unreachable
    state and why; when the dashboard server itself stops, the page says that
    instead of going blank."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"nats://127.0.0.1:{port}"
    async with chromium_page() as page:
        dashboard = Dashboard(url, port=0, settings=SETTINGS)
        await dashboard.start()
        try:
            await page.goto(dashboard.url)
            await page.wait_for_selector('#state[data-state="unreachable"]', timeout=15_000)
            banner = await page.locator("#banner").inner_text()
            assert f"cannot reach NATS at {url}" in banner
            assert await page.locator("#state-label").inner_text() == "NATS unreachable"
        finally:
            await dashboard.stop()
        await page.wait_for_selector('#state[data-state="offline"]', timeout=10_000)
        assert "Lost the dashboard server" in await page.locator("#banner").inner_text()
