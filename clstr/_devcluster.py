"""A local cluster of real processes: an embedded nats-server and N ``clstr node``
children. ``clstr dev up`` and ``clstr demo`` run on it; tests use
:class:`NodeProcess` to run a node the way production does.

Process hygiene, because a dev tool that leaves processes behind is worse
than none:

* Children run in sessions of their own, so a Ctrl-C in the terminal reaches
  only the parent, which then stops them in order: the nodes first (SIGTERM,
  they drain and leave while NATS is still up), the server last.
* Every node child watches its stdin, a pipe whose other end only the parent
  holds: if the parent dies without cleaning up (SIGKILL), the pipe closes
  and the children stop themselves.
* Readiness is read from each child's structured log (``node ready``), never
  guessed with a sleep.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import structlog

from .testing import NatsServer, find_nats_server

__all__ = [
    "DEFAULT_NATS_PORT",
    "DevCluster",
    "DevClusterError",
    "LogRecord",
    "NodeProcess",
    "node_command",
]

#: The port ``clstr dev up`` takes for its server when it is free.
DEFAULT_NATS_PORT: Final = 4222
#: Seconds a node process gets to log ``node ready``.
DEFAULT_READY_TIMEOUT: Final = 30.0
_TAIL_LINES = 30

_log = structlog.get_logger("clstr.dev")

#: A child's log record: a parsed JSON log line, or a plain line of its output.
LogRecord = dict[str, Any] | str
LogSink = Callable[["NodeProcess", LogRecord], None]


class DevClusterError(RuntimeError):
    """A child process failed to start or died; the message ends with its last output."""


def node_command(
    node_id: str,
    servers: str | Sequence[str],
    *,
    num_shards: int,
    seed: str = "",
    prefix: str = "clstr",
    static_nodes: Sequence[str] = (),
    app: str = "clstr.demo_app:app",
    metrics_port: int | None = None,
    service_name: str = "clstr",
    log_level: str = "info",
    stop_timeout: float | None = None,
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
    if static_nodes:
        argv += ["--static-nodes", ",".join(static_nodes)]
    if metrics_port is not None:
        argv += ["--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"]
    if stop_timeout is not None:
        argv += ["--stop-timeout", str(stop_timeout)]
    return argv


class NodeProcess:
    """One ``clstr node`` child process with its log stream parsed.

    :meth:`start` spawns it (in a session of its own, stdin a pipe it
    watches); :meth:`wait_ready` returns the ``node ready`` record (which
    holds ``pid``, ``shards`` and ``metrics_port``); :meth:`stop` sends
    SIGTERM and waits, then SIGKILLs past ``timeout``. Every record goes to
    ``on_log`` and to :attr:`records`.
    """

    def __init__(
        self,
        node_id: str,
        argv: Sequence[str],
        *,
        on_log: LogSink | None = None,
        env: Mapping[str, str] | None = None,
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

    @property
    def pid(self) -> int | None:
        """The child's process id once started."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit code once the child ended, else ``None``."""
        return self._process.returncode if self._process is not None else None

    async def start(self) -> None:
        """Spawn the child; its output is read from now on."""
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

        Raises :class:`DevClusterError` when the child exits first or is not
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
            raise DevClusterError(
                self.describe_failure(f"exited with code {process.returncode} before ready")
            )
        raise DevClusterError(self.describe_failure(f"not ready within {timeout:g}s"))

    async def wait(self) -> int:
        """Wait for the child to exit (and its output to be read); return its code."""
        code = await self._require().wait()
        await self._join_readers()
        return code

    async def stop(self, timeout: float = 15.0) -> int:
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
        await self.stop(timeout=0)

    async def _join_readers(self) -> None:
        # The pipes end with the process (the child passes them to nobody).
        if self._readers:
            await asyncio.gather(*self._readers, return_exceptions=True)

    def _require(self) -> asyncio.subprocess.Process:
        if self._process is None:
            raise RuntimeError(f"{self.node_id} is not started")
        return self._process


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _detaching_wrapper(directory: Path, executable: str) -> str | None:
    """An executable that runs ``executable`` in a new session (same pid, via exec).

    NatsServer starts the server in our process group, where a terminal's
    Ctrl-C would kill it before the nodes have left; this wrapper moves it
    out. ``None`` where that cannot be done (no POSIX, or an interpreter path
    a ``#!`` line cannot hold): the server then shares our group.
    """
    if os.name != "posix" or any(c.isspace() for c in sys.executable):
        return None
    wrapper = directory / "nats-server"
    wrapper.write_text(
        f"#!{sys.executable} -I\n"
        "import os, sys\n"
        "os.setsid()\n"
        f"os.execv({executable!r}, [{executable!r}, *sys.argv[1:]])\n",
        encoding="utf-8",
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper)


class DevCluster:
    """An embedded nats-server (unless ``nats_url`` is given) and ``nodes`` node processes.

    The nodes share a static member list (``node-1`` ... ``node-N``), so each
    owns its HRW share of the shards. ``port`` is the server's client port:
    ``None`` takes :data:`DEFAULT_NATS_PORT` when free and any free port
    otherwise, ``0`` any free port. ``metrics_port_base`` gives node ``i``
    (from 1) the metrics port ``base + i``.
    """

    def __init__(
        self,
        *,
        nodes: int = 3,
        num_shards: int = 64,
        seed: str = "",
        prefix: str = "clstr",
        app: str = "clstr.demo_app:app",
        nats_url: str | None = None,
        port: int | None = None,
        metrics_port_base: int | None = None,
        service_name: str = "clstr",
        log_level: str = "info",
        stop_timeout: float = 10.0,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        on_log: LogSink | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"a dev cluster needs at least one node, got {nodes}")
        self.node_ids = [f"node-{i + 1}" for i in range(nodes)]
        self.num_shards = num_shards
        self.seed = seed
        self.prefix = prefix
        self.app = app
        self._nats_url = nats_url
        self._port = port
        self.metrics_port_base = metrics_port_base
        self.service_name = service_name
        self.log_level = log_level
        self.stop_timeout = stop_timeout
        self.ready_timeout = ready_timeout
        self._on_log = on_log
        self.server: NatsServer | None = None
        self.processes: list[NodeProcess] = []
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """The NATS URL the nodes use (and clients should)."""
        if self._nats_url is not None:
            return self._nats_url
        if self.server is None:
            raise RuntimeError("the dev cluster is not started")
        return self.server.url

    @property
    def embedded(self) -> bool:
        """Whether the cluster runs its own nats-server."""
        return self._nats_url is None

    async def start(self) -> None:
        """Start the server and the nodes; return once every node logged ``node ready``.

        Raises :class:`DevClusterError` (everything started is stopped again)
        when a node fails, and :class:`~clstr.testing.NatsServerError` when
        the server does.
        """
        try:
            if self._nats_url is None:
                await self._start_server()
            for index, node_id in enumerate(self.node_ids, start=1):
                metrics_port = (
                    self.metrics_port_base + index if self.metrics_port_base is not None else None
                )
                argv = node_command(
                    node_id,
                    self.url,
                    num_shards=self.num_shards,
                    seed=self.seed,
                    prefix=self.prefix,
                    static_nodes=self.node_ids,
                    app=self.app,
                    metrics_port=metrics_port,
                    service_name=self.service_name,
                    log_level=self.log_level,
                    stop_timeout=self.stop_timeout,
                )
                process = NodeProcess(node_id, argv, on_log=self._on_log)
                self.processes.append(process)
                await process.start()
            await asyncio.gather(*(p.wait_ready(self.ready_timeout) for p in self.processes))
        except BaseException:
            await self.stop()
            raise

    async def _start_server(self) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="clstr-dev-")
        executable = find_nats_server()
        wrapper = _detaching_wrapper(Path(self._workdir.name), executable)
        port = self._port
        if port is None:
            port = DEFAULT_NATS_PORT if _port_is_free("127.0.0.1", DEFAULT_NATS_PORT) else 0
        self.server = NatsServer(port=port or None, executable=wrapper or executable)
        await asyncio.to_thread(self.server.start)

    async def stop(self) -> None:
        """Stop the nodes (gracefully, in parallel), then the server. Idempotent.

        The processes stay in :attr:`processes`, ended, for their exit codes
        and records.
        """
        started = [p for p in self.processes if p.pid is not None]
        if started:
            await asyncio.gather(
                *(p.stop(timeout=self.stop_timeout + 5.0) for p in started),
                return_exceptions=True,
            )
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
