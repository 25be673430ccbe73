"""`clstr ledger`: the ledger's dev cluster runs from the CLI, the client commands
work against it, and Ctrl-C stops every process it started."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys

import pytest

from clstr.cli import main


async def clstr(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run one `clstr` command in this process; its exit code and its output."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.timeout(90)
async def test_ledger_up_serves_the_client_commands(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`clstr ledger up --nodes 2` starts a server and two `ledger serve` nodes; event,
    a repeated nonce, a refused overdraft, reserve/settle (twice: refused), balance,
    account and edges answer as documented; SIGINT stops it all with exit 0."""
    for name in list(os.environ):
        if name.startswith("CLSTR_"):
            monkeypatch.delenv(name)
    up = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clstr",
        "--shards",
        "16",
        "ledger",
        "up",
        "--nodes",
        "2",
        "--port",
        "0",
        "--heartbeat-ttl",
        "1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    assert up.stdout is not None
    banner = []
    try:
        async with asyncio.timeout(60):
            while (line := (await up.stdout.readline()).decode()) and "cluster ready" not in line:
                banner.append(line)
        url = re.search(r"nats://127\.0\.0\.1:\d+", "".join(banner))
        assert url is not None, banner
        monkeypatch.setenv("CLSTR_NATS_URL", url.group(0))
        monkeypatch.setenv("CLSTR_SHARDS", "16")

        code, out = await clstr(capsys, "ledger", "event", "credits", "ann", "100", "--nonce", "t1")
        assert code == 0, out
        assert out.startswith("#1 +100: balance 100, available 100 [event credits:ledger-")
        assert await clstr(capsys, "ledger", "event", "credits", "ann", "100", "--nonce", "t1") == (
            0,
            out,
        )
        code, out = await clstr(
            capsys, "ledger", "event", "credits", "ann", "-250", "--min-balance", "0"
        )
        assert code == 1
        assert "refused: InsufficientFundsError" in out
        code, out = await clstr(
            capsys, "ledger", "reserve", "credits", "ann", "20", "--ttl", "60", "--json"
        )
        assert code == 0, out
        reservation = json.loads(out)["id"]
        code, out = await clstr(capsys, "ledger", "settle", "credits", "ann", reservation)
        assert code == 0, out
        assert "balance 80, available 80" in out
        code, out = await clstr(capsys, "ledger", "settle", "credits", "ann", reservation)
        assert (code, "refused: ReservationClosedError" in out) == (1, True)
        code, out = await clstr(capsys, "ledger", "balance", "credits")
        assert code == 0, out
        assert re.search(r"ann\s+80\s+0\s+80", out), out
        assert "1 accounts, total 80" in out
        code, out = await clstr(capsys, "ledger", "account", "credits", "ann", "--json")
        view = json.loads(out)
        assert (view["balance"], view["events"], view["debits"]) == (80, 3, 20)
        code, out = await clstr(capsys, "ledger", "edges")
        assert code == 0, out
        assert "healthy" in out
    finally:
        if up.returncode is None:
            up.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(30):
                rest = (await up.stdout.read()).decode()
                code = await up.wait()
        finally:
            if up.returncode is None:  # it did not stop: leave nothing behind
                os.killpg(up.pid, signal.SIGKILL)
                await up.wait()
    assert code == 0
    assert "stopped: ledger-1 (exit 0), ledger-2 (exit 0), nats-server" in rest
