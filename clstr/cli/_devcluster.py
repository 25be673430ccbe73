"""A local cluster of real processes: an embedded nats-server and N ``clstr node``
children (:class:`~clstr.testing.NodeProcess`). ``clstr dev up`` and
``clstr demo`` run on it.

Process hygiene, because a dev tool that leaves processes behind is worse
than none:

* Children run in sessions of their own, so a Ctrl-C in the terminal reaches
  only the parent, which then stops them in order: the nodes first (SIGTERM,
  they drain and leave while NATS is still up), the server last. The parent
  treats SIGHUP (its terminal closed) like SIGINT and SIGTERM.
* If the parent dies without cleaning up (SIGKILL, a crash), nothing stays
  behind either, and the order holds. Every node child watches its stdin, a
  pipe whose other end only the parent holds: the pipe closes and the node
  stops itself. The nats-server cannot watch a pipe, so it is started through
  a small wrapper script that moves it to a session of its own and, on Linux,
  asks the kernel to signal it when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``, set between fork and exec and kept across
  exec; the wrapper then checks that the parent did not die first, and execs
  the server under the same pid). The signal is SIGUSR2, nats-server's *lame
  duck mode*: it takes no new clients, serves the ones it has for a short
  grace period (the nodes leave meanwhile, as in a clean stop), then closes
  them and exits, within a few seconds. (The wrapper also hands the server a
  read end of its own log pipe, so that the pipe, whose reader was the dead
  parent, does not break under the server's last log lines: a Go program
  exits at once on a write to a broken stdout.) This was chosen over a watchdog
  process, which costs a process per cluster and must guard against pid
  reuse, and over a ``preexec_fn``, which runs Python in a forked child while
  other threads (the server's log reader) may hold locks. One caveat of the
  kernel's rule: "parent" is the *thread* that forked, so the server is
  started from asyncio's default executor, whose threads live until the
  event loop is closed, after :meth:`DevCluster.stop`. Elsewhere than Linux
  the wrapper only detaches the server, and a killed parent leaves it
  running. The temporary directories (the wrapper, the server's config and
  store) are removed by a clean stop only.
* Readiness is read from each child's structured log (``node ready``), never
  guessed with a sleep. Under KV membership the nodes take their shards after
  they are ready (the first one up holds them all for a moment), so the cluster
  is ready once every shard is held by the node HRW places it on, as the
  dashboard's watch of the membership buckets sees it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from ..testing import NatsServer, find_nats_server
from ..testing._processes import DEFAULT_READY_TIMEOUT, LogSink, NodeProcess, NodeProcessError
from ._common import DEV_MEMBERSHIPS

__all__ = ["DEFAULT_NATS_PORT", "DevCluster"]

#: The port ``clstr dev up`` takes for its server when it is free.
DEFAULT_NATS_PORT: Final = 4222
# Lame duck mode (the parent died): the nodes get this long to leave, then the
# server closes what is left and exits (30 s is the shortest duration it takes).
_LAME_DUCK_CONFIG: Final = 'lame_duck_grace_period: "1s"\nlame_duck_duration: "30s"'


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


# Runs nats-server (same pid, via exec) in a session of its own; on Linux the
# server enters lame duck mode (SIGUSR2) when its parent dies. See the module docstring.
_WRAPPER: Final = """\
#!{python} -I
# Written by clstr's dev cluster for its embedded nats-server.
import os, signal, sys
os.setsid()
if sys.platform.startswith("linux"):
    try:
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGUSR2)
    except (ImportError, OSError, AttributeError):
        pass  # no libc to call: the server runs without the safety net
    if os.getppid() != {parent}:
        sys.exit("clstr: the dev cluster's parent process is gone; not starting nats-server")
    try:
        # Keep a read end of our own log pipe: with the parent gone the pipe still
        # has a reader, so the lame duck's log lines do not kill the server (Go
        # exits on a write to a broken stdout) before the nodes have left.
        os.set_inheritable(os.open("/proc/self/fd/1", os.O_RDONLY | os.O_NONBLOCK), True)
    except OSError:
        pass
os.execv({executable!r}, [{executable!r}, *sys.argv[1:]])
"""


def _server_wrapper(directory: Path, executable: str) -> str | None:
    """An executable that runs ``executable`` detached and bound to this process's life.

    NatsServer starts the server in our process group, where a terminal's
    Ctrl-C would kill it before the nodes have left; the wrapper moves it out,
    and makes it die with this process on Linux. ``None`` where that cannot be
    done (no POSIX, or an interpreter path a ``#!`` line cannot hold): the
    server then shares our group.
    """
    if os.name != "posix" or any(c.isspace() for c in sys.executable):
        return None
    wrapper = directory / "nats-server"
    wrapper.write_text(
        _WRAPPER.format(python=sys.executable, parent=os.getpid(), executable=executable),
        encoding="utf-8",
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper)


class DevCluster:
    """An embedded nats-server (unless ``nats_url`` is given) and ``nodes`` node processes.

    With ``membership="static"`` the nodes share a static member list
    (``node-1`` ... ``node-N``), so each owns its HRW share of the shards, and a
    dead node's shards stay without owner. With ``"kv"`` they join the dynamic
    membership on the server's JetStream KV: they own the same HRW shares once
    settled, a dead node's shards move to the others after its heartbeat
    expires, and more nodes may join. ``port`` is the server's client port:
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
        membership: str = "static",
        log_level: str = "info",
        stop_timeout: float = 10.0,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        on_log: LogSink | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"a dev cluster needs at least one node, got {nodes}")
        if membership not in DEV_MEMBERSHIPS:
            raise ValueError(f"membership must be one of {DEV_MEMBERSHIPS}, got {membership!r}")
        self.node_ids = [f"node-{i + 1}" for i in range(nodes)]
        self.num_shards = num_shards
        self.seed = seed
        self.prefix = prefix
        self.app = app
        self._nats_url = nats_url
        self._port = port
        self.metrics_port_base = metrics_port_base
        self.service_name = service_name
        self.membership = membership
        #: Shards each node serves, once started: under KV membership as settled.
        self.shards: dict[str, int] = {}
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
        """Start the server and the nodes; return once every node logged ``node ready``
        (under KV membership: and every shard is held by its HRW owner).

        Raises :class:`NodeProcessError` (everything started is stopped again)
        when a node fails or, under KV membership, the shards do not settle
        within ``ready_timeout``, and :class:`~clstr.testing.NatsServerError`
        when the server does.
        """
        try:
            if self._nats_url is None:
                await self._start_server()
            for index, node_id in enumerate(self.node_ids, start=1):
                metrics_port = (
                    self.metrics_port_base + index if self.metrics_port_base is not None else None
                )
                process = NodeProcess(
                    node_id,
                    self.url,
                    num_shards=self.num_shards,
                    seed=self.seed,
                    prefix=self.prefix,
                    static_nodes=self.node_ids if self.membership == "static" else (),
                    app=self.app,
                    metrics_port=metrics_port,
                    service_name=self.service_name,
                    log_level=self.log_level,
                    stop_timeout=self.stop_timeout,
                    # Said even when static: CLSTR_MEMBERSHIP in our environment
                    # must not reach the children.
                    extra_args=("--membership", self.membership),
                    on_log=self._on_log,
                )
                self.processes.append(process)
                await process.start()
            await asyncio.gather(*(p.wait_ready(self.ready_timeout) for p in self.processes))
            if self.membership == "kv":
                self.shards = await self._settled()
            else:
                self.shards = {
                    p.node_id: int(p.ready_record["shards"])
                    for p in self.processes
                    if p.ready_record is not None and "shards" in p.ready_record
                }
        except BaseException:
            await self.stop()
            raise

    async def _settled(self) -> dict[str, int]:
        """Wait until every node is a member and every shard is held by its HRW
        owner (the dashboard's watch: woken by the membership buckets, no polling);
        return the shards each node holds."""
        from ..observe import ClusterWatch, DashboardSettings
        from ..transports.nats import NatsTransport

        url = self.url
        watch = ClusterWatch(
            lambda: NatsTransport.connect(url),
            nats_url=url,
            prefix=self.prefix,
            num_shards=self.num_shards,
            seed=self.seed,
            service_name=self.service_name,
            settings=DashboardSettings(poll_interval=0.5, discovery_timeout=0.25),
        )

        def settled(snapshot: dict[str, Any]) -> bool:
            members = snapshot["summary"]["members"]
            return bool(snapshot["state"] == "ok" and members == len(self.node_ids))

        await watch.start()
        try:
            async with asyncio.timeout(self.ready_timeout):
                while not settled(snapshot := watch.snapshot):
                    await watch.changed(watch.version)
        except TimeoutError:
            raise NodeProcessError(
                f"the nodes are up but their shards did not settle on their HRW owners "
                f"within {self.ready_timeout:g} s under KV membership (is JetStream on at "
                f"{url}? 'clstr status' shows who holds what)"
            ) from None
        finally:
            await watch.stop()
        held: dict[str, int] = {}
        for shard in snapshot["shards"]:
            held[shard["owner"]] = held.get(shard["owner"], 0) + 1
        return held

    async def _start_server(self) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="clstr-dev-")
        executable = find_nats_server()
        wrapper = _server_wrapper(Path(self._workdir.name), executable)
        port = self._port
        if port is None:
            port = DEFAULT_NATS_PORT if _port_is_free("127.0.0.1", DEFAULT_NATS_PORT) else 0
        self.server = NatsServer(
            port=port or None, executable=wrapper or executable, config=_LAME_DUCK_CONFIG
        )
        # From the default executor, whose threads outlive the server: the
        # kernel sends the death signal when the forking *thread* ends.
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
