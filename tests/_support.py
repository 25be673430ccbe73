"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds, checking once per loop turn; fail after ``timeout``.

    For conditions that have no event to wait on (a node's queue length).
    """
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - these conditions have no event to await
            await asyncio.sleep(0.001)


class ScriptNode:
    """A node script in its own OS process (it prints ``ready`` once it serves);
    never left behind."""

    def __init__(self, script: Path, node_id: str) -> None:
        self.script = script
        self.node_id = node_id
        self.process: asyncio.subprocess.Process | None = None
        self.killed_at: float | None = None

    async def start(self, *args: str) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(self.script),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        async with asyncio.timeout(20):
            line = await self.process.stdout.readline()
        assert line.strip() == b"ready", f"{self.node_id} did not start: {line!r}"

    async def terminate(self) -> None:
        """Graceful stop (SIGTERM), waited for."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await self.process.wait() == 0

    async def kill(self) -> None:
        """SIGKILL: no goodbye, no handoff."""
        assert self.process is not None
        self.process.kill()
        self.killed_at = time.time()
        await self.process.wait()

    async def cleanup(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


def dashboard_snapshot(
    url: str, check: Callable[[dict[str, Any]], bool], timeout: float = 30.0
) -> dict[str, Any]:
    """The first snapshot the dashboard at ``url`` streams (``GET /events``) that
    passes ``check``; fails after ``timeout`` seconds. Blocking: from async code,
    call it in a thread."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    try:
        connection.request("GET", "/events")
        response = connection.getresponse()
        assert response.status == 200, response.status
        while time.monotonic() < deadline:
            line = response.readline()
            if not line:
                break  # the dashboard closed the stream
            if line.startswith(b"data: "):
                last = json.loads(line[len(b"data: ") :])
                if check(last):
                    return last
    finally:
        connection.close()
    raise AssertionError(f"no snapshot of {url} passed the check in {timeout} s; last: {last}")
