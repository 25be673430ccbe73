"""The orchestrator's side of a worker process: spawning it, talking to it over
the line protocol (see ``_protocol.py``), and stopping and reaping it.

A worker runs ``_worker.py`` as a script (see there for why); with
``--profile`` it profiles itself (pyinstrument), or py-spy records it from
outside.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from ._profile import summarise_profile
from ._protocol import JSON, MARK, Role, ref
from ._specs import BenchError

_WORKER_SCRIPT: Final = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker.py")


@dataclass(frozen=True, slots=True)
class ChildOptions:
    """How every worker of a benchmark run is started."""

    uvloop: bool
    #: Seconds any one answer may take.
    timeout: float
    #: Where profiles go (None: no profiling).
    profile_dir: Path | None = None
    #: "pyinstrument" (in the worker) or "py-spy" (from outside).
    profiler: str = "pyinstrument"


def find_py_spy() -> str | None:
    """The py-spy executable next to this Python, else on PATH, else None."""
    import shutil
    import sysconfig

    bundled = Path(sysconfig.get_path("scripts")) / "py-spy"
    return str(bundled) if bundled.is_file() else shutil.which("py-spy")


class Child:
    """A worker process running ``role``, spoken to over its stdin and stdout.

    ``label`` names it in messages and its profile files.
    """

    def __init__(self, role: Role, cfg: JSON, options: ChildOptions, *, label: str) -> None:
        self.role = ref(role)
        self.label = label
        self._cfg = cfg
        self._options = options
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr: IO[bytes] | None = None
        self._collapsed: Path | None = None

    async def start(self) -> JSON:
        """Spawn the worker and return its ``ready`` message."""
        command = [
            sys.executable,
            "-P",  # no script directory on sys.path: _worker.py loads its siblings itself
            _WORKER_SCRIPT,
            self.role,
            json.dumps(self._cfg),
        ]
        options = self._options
        if options.uvloop:
            command.append("--uvloop")
        if options.profile_dir is not None:
            stem = options.profile_dir / (self.label + ("-uvloop" if options.uvloop else ""))
            if options.profiler == "pyinstrument":
                command += ["--profile", str(stem)]
            else:
                py_spy = find_py_spy()
                if py_spy is None:
                    raise BenchError("py-spy not found: pip install 'clstr[bench]'")
                self._collapsed = stem.with_suffix(".collapsed")
                # Idle samples (the loop waiting in epoll) are left out, so the
                # percentages are of the time the worker spent on the CPU.
                command = [
                    py_spy,
                    "record",
                    "--format",
                    "raw",
                    "--nolineno",
                    "--nonblocking",
                    "--rate",
                    "1000",
                    "--output",
                    str(self._collapsed),
                    "--",
                    *command,
                ]
        # Closed by close(): the file outlives this call, as the process does.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._stderr,
        )
        message = await self._read()
        if not message.get("ready"):
            raise BenchError(f"worker {self.label} sent {message!r} instead of ready")
        return message

    async def call(self, command: JSON) -> JSON:
        """Send one command and return the worker's answer; raise on a failure."""
        proc = self._running()
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(command) + "\n").encode())
        await proc.stdin.drain()
        answer = await self._read()
        if not answer.get("ok"):
            raise BenchError(f"worker {self.label}: {command['op']} failed: {answer.get('error')}")
        return answer

    def _running(self) -> asyncio.subprocess.Process:
        if self._proc is None:
            raise BenchError(f"worker {self.label} is not started")
        return self._proc

    async def _read(self) -> JSON:
        proc = self._running()
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(self._options.timeout):
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        await proc.wait()
                        raise BenchError(
                            f"worker {self.label} exited with code {proc.returncode}"
                            + self._stderr_tail()
                        )
                    text = line.decode("utf-8", "replace")
                    if text.startswith(MARK):
                        message: JSON = json.loads(text[len(MARK) :])
                        return message
        except TimeoutError:
            raise BenchError(
                f"worker {self.label} did not answer within {self._options.timeout:g}s"
                + self._stderr_tail()
            ) from None

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        tail = self._stderr.read().decode("utf-8", "replace").strip().splitlines()[-15:]
        return ("; its stderr ends with:\n  " + "\n  ".join(tail)) if tail else ""

    async def close(self, grace: float = 15.0) -> None:
        """Ask the worker to stop (close its stdin), kill it past ``grace``, reap it."""
        proc = self._proc
        if proc is not None:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
            try:
                async with asyncio.timeout(grace):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
            finally:
                if proc.returncode is None:  # cancelled while waiting
                    proc.kill()
                    await proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._collapsed is not None and self._collapsed.exists():
            summary = summarise_profile(self._collapsed.read_text(encoding="utf-8"))
            self._collapsed.with_suffix(".top.txt").write_text(summary, encoding="utf-8")
            self._collapsed = None
