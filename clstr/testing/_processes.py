"""Run ``clstr node`` processes, the way production runs nodes, and watch their logs.

:class:`NodeProcess` starts one ``python -m clstr node`` child logging JSON,
parses every line it writes, and reports readiness from its own
``node ready`` record, never from a sleep. ``clstr dev up``, ``clstr demo``,
the examples and the tests all start nodes with it.

Process hygiene, because a test or a tool that leaves processes behind is
worse than none:

* A child runs in a session of its own, so a terminal's Ctrl-C reaches only
  the parent, which then stops it in order (SIGTERM: the node stops taking
  messages, finishes what it holds, leaves).
* A child watches its stdin, a pipe whose other end only the parent holds:
  if the parent dies without cleaning up (even by SIGKILL), the pipe closes
  and the child stops by itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Self

import structlog

__all__ = ["LogRecord", "NodeProcess", "NodeProcessError", "node_command"]

#: Seconds a node process gets to log ``node ready``.
DEFAULT_READY_TIMEOUT: Final = 30.0
#: Seconds :meth:`NodeProcess.stop` waits after SIGTERM before SIGKILL.
DEFAULT_STOP_TIMEOUT: Final = 15.0
_TAIL_LINES = 30

_log = structlog.get_logger("clstr.testing.processes")

#: A child's log record: a parsed JSON log line, or a plain line of its output.
LogRecord = dict[str, Any] | str
LogSink = Callable[["NodeProcess", LogRecord], None]


class NodeProcessError(RuntimeError):
    """A node process failed to start or died; the message ends with its last output."""


def node_command(
    node_id: str,
    servers: str | Sequence[str],
    *,
    num_shards: int,
    seed: str = "",
    prefix: str = "clstr",
    static_nodes: Sequence[str] = (),
    app: str = "clstr.demo_app:app",
    app_dir: str | os.PathLike[str] | None = None,
    metrics_port: int | None = None,
    service_name: str = "clstr",
    log_level: str = "info",
    stop_timeout: float | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The argv of a ``clstr node`` child logging JSON and watching its stdin."""
    urls = servers if isinstance(servers, str) else ",".join(servers)
    argv = [
        sys.executable,
        "-m",
        "clstr",
        "--log-json",
        "--log-level",
        log_level,
        "--nats-url",
        urls,
        "--shards",
        str(num_shards),
        "--seed",
        seed,
        "--prefix",
        prefix,
        "node",
        "--id",
        node_id,
        "--app",
        app,
        "--service-name",
        service_name,
        "--watch-stdin",
    ]
    if app_dir is not None:
        argv += ["--app-dir", os.fspath(app_dir)]
    if static_nodes:
        argv += ["--static-nodes", ",".join(static_nodes)]
    if metrics_port is not None:
        argv += ["--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"]
    if stop_timeout is not None:
        argv += ["--stop-timeout", str(stop_timeout)]
    return [*argv, *extra_args]


class NodeProcess:
    """One ``clstr node`` child process with its log stream parsed.

    The keywords are the ``clstr node`` options of the same names
    (``extra_args`` adds others, e.g. ``["--membership", "kv"]``);
    :meth:`from_argv` takes a command line of your own instead. :meth:`start` spawns
    the child (in a session of its own, its stdin a pipe it watches);
    :meth:`wait_ready` returns its ``node ready`` record (which holds
    ``pid``, ``shards`` and ``metrics_port``); :meth:`stop` sends SIGTERM and
    waits, then SIGKILLs past a timeout. ``async with`` does start and
    wait_ready, then stop. Every record goes to ``on_log`` and to
    :attr:`records`.

    ``app`` is ``module:attr``, imported by the child from ``app_dir`` (its
    working directory by default): a handler or a factory of one, as for
    ``clstr node --app``.
    """

    def __init__(
        self,
        node_id: str,
        servers: str | Sequence[str],
        *,
        num_shards: int = 64,
        seed: str = "",
        prefix: str = "clstr",
        static_nodes: Sequence[str] = (),
        app: str = "clstr.demo_app:app",
        app_dir: str | os.PathLike[str] | None = None,
        metrics_port: int | None = None,
        service_name: str = "clstr",
        log_level: str = "info",
        stop_timeout: float | None = None,
        extra_args: Sequence[str] = (),
        on_log: LogSink | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        argv = node_command(
            node_id,
            servers,
            num_shards=num_shards,
            seed=seed,
            prefix=prefix,
            static_nodes=static_nodes,
            app=app,
            app_dir=app_dir,
            metrics_port=metrics_port,
            service_name=service_name,
            log_level=log_level,
            stop_timeout=stop_timeout,
            extra_args=extra_args,
        )
        self._init(node_id, argv, on_log=on_log, env=env)

    @classmethod
    def from_argv(
        cls,
        node_id: str,
        argv: Sequence[str],
        *,
        on_log: LogSink | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Self:
        """A process that runs ``argv``, which should start a node logging JSON."""
        process = cls.__new__(cls)
        process._init(node_id, argv, on_log=on_log, env=env)
        return process

    def _init(
        self,
        node_id: str,
        argv: Sequence[str],
        *,
        on_log: LogSink | None,
        env: Mapping[str, str] | None,
    ) -> None:
        self.node_id = node_id
        self.argv = list(argv)
        self._on_log = on_log
        self._env = dict(os.environ if env is None else env)
        self._env.setdefault("PYTHONUNBUFFERED", "1")
        self._process: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self.ready_record: dict[str, Any] | None = None
        self.records: collections.deque[LogRecord] = collections.deque(maxlen=1000)
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)

    def __repr__(self) -> str:
        return f"<NodeProcess {self.node_id} pid={self.pid} returncode={self.returncode}>"

    @property
    def pid(self) -> int | None:
        """The child's process id once started."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit code once the child ended, else ``None``."""
        return self._process.returncode if self._process is not None else None

    def record(self, event: str) -> dict[str, Any] | None:
        """The last JSON record of ``event`` the child logged (``"node exit"``...), or ``None``."""
        for record in reversed(self.records):
            if isinstance(record, dict) and record.get("event") == event:
                return record
        return None

    async def start(self) -> None:
        """Spawn the child; its output is read from now on.

        Raises :class:`RuntimeError` when it was started already.
        """
        if self._process is not None:
            raise RuntimeError(f"{self.node_id} is already started")
        self._process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env,
            start_new_session=os.name == "posix",
        )
        assert self._process.stdout is not None
        assert self._process.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(self._process.stderr), name=f"{self.node_id}-stderr"),
            asyncio.create_task(self._read(self._process.stdout), name=f"{self.node_id}-stdout"),
        ]

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the stream's limit: skip what is buffered
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line:
                continue
            self._tail.append(line)
            record: LogRecord = line
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    parsed = json.loads(line)
                    if isinstance(parsed, dict):
                        record = parsed
            if isinstance(record, dict) and record.get("event") == "node ready":
                self.ready_record = record
                self._ready.set()
            self.records.append(record)
            if self._on_log is not None:
                self._on_log(self, record)

    def describe_failure(self, problem: str) -> str:
        """``problem``, followed by the child's last lines of output."""
        tail = "\n".join(f"  | {line}" for line in self._tail) or "  | (no output)"
        return f"{self.node_id}: {problem}\nlast output:\n{tail}"

    async def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT) -> dict[str, Any]:
        """Wait for ``node ready``; return its record.

        Raises :class:`NodeProcessError` when the child exits first or is not
        ready within ``timeout`` seconds (the child is then left running:
        :meth:`stop` it).
        """
        process = self._require()
        ready = asyncio.ensure_future(self._ready.wait())
        exited = asyncio.ensure_future(process.wait())
        try:
            await asyncio.wait({ready, exited}, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            for waiter in (ready, exited):
                waiter.cancel()
            await asyncio.gather(ready, exited, return_exceptions=True)
        if self.ready_record is not None:
            return self.ready_record
        if process.returncode is not None:
            await self._join_readers()
            raise NodeProcessError(
                self.describe_failure(f"exited with code {process.returncode} before ready")
            )
        raise NodeProcessError(self.describe_failure(f"not ready within {timeout:g}s"))

    async def wait(self) -> int:
        """Wait for the child to exit (and its output to be read); return its code."""
        code = await self._require().wait()
        await self._join_readers()
        return code

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int:
        """SIGTERM the child, wait up to ``timeout`` seconds, then SIGKILL it.

        Returns the exit code. Stopping an ended child just collects it.
        """
        process = self._require()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await process.wait()
            except TimeoutError:
                _log.warning("node did not stop in time: killing it", node=self.node_id)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        code = await process.wait()
        if process.stdin is not None:
            process.stdin.close()
        await self._join_readers()
        return code

    def close_stdin(self) -> None:
        """Close the child's stdin, as the parent's death would: the child stops itself."""
        process = self._require()
        if process.stdin is not None:
            process.stdin.close()

    async def kill(self) -> None:
        """SIGKILL the child at once and collect it."""
        process = self._require()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()  # reaped: stop() then only collects it, no SIGTERM, no warning
        await self.stop(timeout=0)

    async def _join_readers(self) -> None:
        # The pipes end with the process (the child passes them to nobody).
        if self._readers:
            await asyncio.gather(*self._readers, return_exceptions=True)

    def _require(self) -> asyncio.subprocess.Process:
        if self._process is None:
            raise RuntimeError(f"{self.node_id} is not started")
        return self._process

    async def __aenter__(self) -> Self:
        await self.start()
        try:
            await self.wait_ready()
        except BaseException:
            await self.kill()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is not None:
            await self.stop()
