"""``clstr status``: the cluster as its nodes describe it and as routing sees it.

Two sources, merged:

* NATS service discovery (``$SRV.STATS.<name>``): every node running
  :class:`~clstr.discovery.ServiceDiscovery` says who it is, which shards it
  serves and its counters.
* A probe of every shard with the built-in node-info request: who actually
  answers each shard's subject right now (also nodes without discovery), and
  which shards nobody serves.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import nats.errors

from ..client import Client
from ..errors import ConfigurationError, NoShardOwnerError, RequestError, TransportError
from ..transports.nats import NatsTransport
from ._discovery import control_subject, discover

__all__ = [
    "ClusterView",
    "NodeView",
    "announced_shards",
    "gather_view",
    "render_table",
    "shard_ranges",
]

#: What the shard map shows for a shard nobody serves, and one that did not answer.
NO_OWNER: Final = "."
NO_ANSWER: Final = "?"
_LABELS = "123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ROW = 16


@dataclass(slots=True)
class NodeView:
    """One node: its shards and, when it answers discovery, its counters."""

    node_id: str
    shards: list[int] = field(default_factory=list)
    discovered: bool = False
    version: str | None = None
    started: str | None = None
    state: str | None = None
    handled: int | None = None
    errors: int | None = None
    received: int | None = None
    queued: int | None = None
    running: int | None = None
    rejected: dict[str, int] = field(default_factory=dict)
    #: Live entity instances per type (nodes that host entities).
    entities: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "shards": self.shards,
            "num_owned": len(self.shards),
            "discovered": self.discovered,
            "version": self.version,
            "started": self.started,
            "state": self.state,
            "received": self.received,
            "handled": self.handled,
            "errors": self.errors,
            "queued": self.queued,
            "running": self.running,
            "rejected": self.rejected,
            "entities": self.entities,
        }


@dataclass(slots=True)
class ClusterView:
    """The whole cluster: nodes, and the owner of each shard (``None``: nobody,
    ``"?"``: no answer in time)."""

    prefix: str
    num_shards: int
    nodes: list[NodeView]
    owners: dict[int, str | None]
    notes: list[str] = field(default_factory=list)

    @property
    def unowned(self) -> list[int]:
        """Shards nobody serves."""
        return [s for s, owner in sorted(self.owners.items()) if owner is None]

    @property
    def unanswered(self) -> list[int]:
        """Shards whose probe timed out."""
        return [s for s, owner in sorted(self.owners.items()) if owner == NO_ANSWER]

    @property
    def complete(self) -> bool:
        """Every shard has an owner that answered."""
        return len(self.owners) == self.num_shards and all(
            owner not in (None, NO_ANSWER) for owner in self.owners.values()
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "num_shards": self.num_shards,
            "complete": self.complete,
            "nodes": [n.to_json() for n in self.nodes],
            "owners": {str(s): owner for s, owner in sorted(self.owners.items())},
            "unowned": self.unowned,
            "unanswered": self.unanswered,
            "notes": self.notes,
        }


def _natural(node_id: str) -> list[Any]:
    """Sort key putting node-2 before node-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", node_id)]


async def gather_view(
    transport: NatsTransport,
    *,
    num_shards: int,
    prefix: str,
    seed: str = "",
    service_name: str = "clstr",
    discovery_timeout: float = 1.0,
    probe_timeout: float = 2.0,
    shards_given: bool = True,
    expected_nodes: int | None = None,
) -> ClusterView:
    """Ask discovery and probe every shard; return the merged view.

    When the nodes announce a shard count and ``shards_given`` is false, the
    announced count is used; a mismatch is recorded in :attr:`ClusterView.notes`.
    Discovery waits for more answers until ``discovery_timeout``, or until
    ``expected_nodes`` answered when the caller knows how many nodes there are.
    """
    notes: list[str] = []
    replies = await discover(
        transport, "STATS", service_name, timeout=discovery_timeout, expected=expected_nodes
    )
    mine = [r for r in replies if _meta(r).get("clstr.prefix", prefix) == prefix]
    announced = {n for n in (_announced_shards(r) for r in mine) if n is not None}
    if len(announced) == 1:
        (count,) = announced
        if count != num_shards:
            if shards_given:
                notes.append(
                    f"the nodes use {count} shards but --shards is {num_shards}: "
                    "requests go to the wrong shards; pass the nodes' count"
                )
            else:
                num_shards = count
    elif len(announced) > 1:
        notes.append(f"nodes disagree on the shard count: {sorted(announced)}")

    nodes: dict[str, NodeView] = {}
    for reply in mine:
        view = _node_from_stats(reply)
        nodes[view.node_id] = view

    client = Client(transport, num_shards=num_shards, seed=seed, prefix=prefix)
    owners = await _probe(client, num_shards, probe_timeout)
    for owner in owners.values():
        if owner not in (None, NO_ANSWER) and owner not in nodes:
            nodes[owner] = NodeView(node_id=owner)
    for view in nodes.values():
        if not view.discovered:
            view.shards = sorted(s for s, owner in owners.items() if owner == view.node_id)
    for view in nodes.values():
        probed = {s for s, owner in owners.items() if owner == view.node_id}
        if view.discovered and probed != set(view.shards):
            notes.append(
                f"{view.node_id} announces {len(view.shards)} shards but answers "
                f"{len(probed)}: ownership is moving, or --shards/--prefix differ"
            )
    return ClusterView(
        prefix=prefix,
        num_shards=num_shards,
        nodes=sorted(nodes.values(), key=lambda n: _natural(n.node_id)),
        owners=owners,
        notes=notes,
    )


def _meta(reply: dict[str, Any]) -> dict[str, Any]:
    meta = reply.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _announced_shards(reply: dict[str, Any]) -> int | None:
    value = _meta(reply).get("clstr.num_shards")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


async def announced_shards(
    transport: NatsTransport, service_name: str, node_id: str, *, timeout: float = 0.5
) -> int | None:
    """The shard count node ``node_id`` announces in service discovery (one PING to
    that node alone); ``None`` when it runs no discovery under ``service_name``
    or does not answer within ``timeout``."""
    try:
        subject = control_subject("PING", service_name, node_id)
        msg = await transport.nc.request(subject, b"", timeout=timeout)
        reply = json.loads(msg.data)
    except (ConfigurationError, nats.errors.Error, ValueError):
        return None
    return _announced_shards(reply) if isinstance(reply, dict) else None


def _node_from_stats(reply: dict[str, Any]) -> NodeView:
    data = reply.get("data") if isinstance(reply.get("data"), dict) else {}
    assert isinstance(data, dict)
    node_id = str(data.get("node_id") or _meta(reply).get("clstr.node_id") or reply.get("id"))
    shards = data.get("shards")
    if not isinstance(shards, list):
        shards = [
            e["data"]["shard"]
            for e in reply.get("endpoints") or []
            if isinstance(e.get("data"), dict) and isinstance(e["data"].get("shard"), int)
        ]

    def count(name: str) -> int | None:
        value = data.get(name)
        return value if isinstance(value, int) else None

    rejected = data.get("rejected")
    entities = data.get("entities")
    return NodeView(
        node_id=node_id,
        shards=sorted(s for s in shards if isinstance(s, int)),
        discovered=True,
        version=reply.get("version"),
        started=reply.get("started"),
        state=data.get("state"),
        handled=count("handled"),
        errors=count("errors"),
        received=count("received"),
        queued=count("queued"),
        running=count("running"),
        rejected=dict(rejected) if isinstance(rejected, dict) else {},
        entities=dict(entities) if isinstance(entities, dict) else None,
    )


async def _probe(client: Client, num_shards: int, timeout: float) -> dict[int, str | None]:
    async def owner(shard: int) -> tuple[int, str | None]:
        try:
            info = await client.shard(shard).node_info(timeout=timeout)
        except NoShardOwnerError:
            return shard, None
        except (RequestError, TransportError):
            return shard, NO_ANSWER
        return shard, info.node_id

    results = await asyncio.gather(*(owner(s) for s in range(num_shards)))
    return dict(results)


# -- rendering ---------------------------------------------------------------------


def shard_ranges(shards: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` as ``"0-2,5,7-8"``."""
    ordered = sorted(set(shards))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts) or "-"


def _uptime(started: str | None, now: float) -> str:
    if not started:
        return "-"
    try:
        moment = datetime.fromisoformat(started.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    seconds = max(0, int(now - moment.timestamp()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(widths[i]) if i in numeric and row is not header else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def render_table(view: ClusterView, *, now: float | None = None) -> str:
    """The view as text: a summary line, a node table, and the shard map."""
    now = time.time() if now is None else now
    owned = view.num_shards - len(view.unowned) - len(view.unanswered)
    health = (
        "all shards owned"
        if view.complete
        else f"{owned}/{view.num_shards} shards owned"
        + (f", {len(view.unowned)} without owner" if view.unowned else "")
        + (f", {len(view.unanswered)} not answering" if view.unanswered else "")
    )
    lines = [
        f"cluster: prefix {view.prefix!r}, {view.num_shards} shards, "
        f"{len(view.nodes)} node{'s' if len(view.nodes) != 1 else ''}, {health}",
        "",
    ]

    def num(value: int | None) -> str:
        return "-" if value is None else str(value)

    labels = {n.node_id: _LABELS[i] if i < len(_LABELS) else "+" for i, n in enumerate(view.nodes)}
    rows = [
        [
            labels[n.node_id],
            n.node_id,
            str(len(n.shards)),
            num(n.handled),
            num(n.errors),
            num(n.queued),
            num(n.running),
            _uptime(n.started, now),
            n.version or "-",
        ]
        for n in view.nodes
    ]
    header = ["", "NODE", "SHARDS", "HANDLED", "ERRORS", "QUEUED", "RUNNING", "UP", "VERSION"]
    if any(n.entities is not None for n in view.nodes):
        # Only for clusters that host entities: live instances per node.
        header.append("ENTITIES")
        for row, n in zip(rows, view.nodes, strict=True):
            row.append("-" if n.entities is None else str(sum(n.entities.values())))
    if rows:
        lines += _table(header, rows, numeric={2, 3, 4, 5, 6, 9})
    else:
        lines.append("no node answered: start some (clstr dev up) or check --nats-url/--prefix")
    lines += ["", f"shard map ({NO_OWNER} no owner, {NO_ANSWER} no answer):"]
    width = len(str(max(view.num_shards - 1, 0)))
    for start in range(0, view.num_shards, _ROW):
        cells = []
        for shard in range(start, min(start + _ROW, view.num_shards)):
            owner = view.owners.get(shard)
            if owner is None:
                cells.append(NO_OWNER)
            else:
                cells.append(NO_ANSWER if owner == NO_ANSWER else labels.get(owner, "+"))
        lines.append(f"  {str(start).rjust(width)}  {' '.join(cells)}")
    if view.nodes:
        lines.append("")
        pad = max(len(n.node_id) for n in view.nodes)
        for n in view.nodes:
            lines.append(f"  {labels[n.node_id]} {n.node_id.ljust(pad)}  {shard_ranges(n.shards)}")
    if view.unowned:
        lines.append(f"  no owner: {shard_ranges(view.unowned)}")
    for note in view.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
