"""Run a routed cluster of real nats-servers for tests, JetStream on.

Formation is read from the servers' monitoring endpoints (routes to every
other server, then JetStream's health check), polled against a deadline.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Self

from ._server import NatsServer
from ._server_common import (
    _LOG_TAIL_LINES,
    DEFAULT_CLUSTER_NAME,
    DEFAULT_STOP_TIMEOUT,
    NatsServerError,
    _free_port,
    _Managed,
    _url_host,
    find_nats_server,
)

__all__ = ["NatsCluster"]

#: Seconds :meth:`NatsCluster.start` waits for servers, routes and JetStream.
DEFAULT_CLUSTER_START_TIMEOUT = 20.0
_POLL_INTERVAL = 0.05
# Attempts at starting a cluster when a pre-allocated route port was taken
# by someone else between allocation and bind.
_CLUSTER_PORT_ATTEMPTS = 3


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
