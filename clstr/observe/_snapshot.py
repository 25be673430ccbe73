"""The dashboard's state between polls (:class:`Picture`) and the JSON it serves.

The snapshot is plain data (see docs/observability.md for its fields): the
page draws it, a test reads it, ``GET /api/state`` returns it.
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from ..errors import ClstrError
from ..hashing import assign_shards
from ..node import MemberInfo
from ._charts import sparkline
from ._settings import DashboardSettings
from ._status import shard_ranges
from ._tracks import NodeTrack

__all__ = ["Picture", "build_snapshot", "node_color"]

#: Shards when nothing says how many there are.
_FALLBACK_SHARDS: Final = 64
#: A shard map stable this long while shards stay off their HRW owner hints at
#: a seed that differs from the nodes'.
_SEED_HINT_AFTER: Final = 15.0
# Tableau 10: distinct, and readable with white text; then golden-angle hues.
_PALETTE: Final = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)


def node_color(index: int) -> str:
    """The colour of the ``index``-th node the dashboard has seen."""
    if index < len(_PALETTE):
        return _PALETTE[index]
    hue = (index * 137.508) % 360
    return f"hsl({hue:.0f}, 55%, 50%)"


def _natural(node_id: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", node_id)]


@dataclass(slots=True)
class Picture:
    """Everything the dashboard knows of the cluster (the collector fills it)."""

    nats_url: str
    prefix: str
    num_shards: int | None
    seed: str
    service_name: str
    settings: DashboardSettings
    events: deque[dict[str, Any]]
    series: deque[tuple[float | None, float | None]]
    #: "connecting", "connected", "reconnecting" or "unreachable", and why.
    reachable: str = "connecting"
    problem: str | None = None
    tracks: dict[str, NodeTrack] = field(default_factory=dict)
    colors: dict[str, int] = field(default_factory=dict)
    members: dict[str, MemberInfo] = field(default_factory=dict)
    holders: dict[int, str] = field(default_factory=dict)
    #: Which membership watchers have replayed their bucket ({} : no buckets).
    kv_ready: dict[str, bool] = field(default_factory=dict)
    kv_changed_at: float = 0.0
    other_prefixes: set[str] = field(default_factory=set)
    announced_counts: set[int] = field(default_factory=set)
    polled_at: float | None = None
    #: The nodes that answered discovery lately, as of the last poll (so that
    #: the map and the events change together, at polls).
    answering: set[str] = field(default_factory=set)
    _owners: tuple[bool, list[str | None]] | None = None
    _desired: tuple[Any, dict[int, str]] | None = None

    @property
    def kv(self) -> bool:
        """Whether the shard map comes from the membership buckets."""
        return bool(self.kv_ready) and all(self.kv_ready.values())

    def event(self, kind: str, text: str) -> None:
        """Record an event (newest first)."""
        self.events.appendleft({"t": time.time(), "kind": kind, "text": text})

    def color(self, node_id: str) -> str:
        index = self.colors.get(node_id)
        if index is None:
            taken = set(self.colors.values())
            index = next(i for i in range(len(taken) + 1) if i not in taken)
            self.colors[node_id] = index
        return node_color(index)

    def track(self, node_id: str, now: float) -> NodeTrack:
        track = self.tracks.get(node_id)
        if track is None:
            self.color(node_id)
            track = self.tracks[node_id] = NodeTrack(node_id, self.colors[node_id], first_seen=now)
        return track

    # -- membership bucket entries ------------------------------------------------

    def member_seen(self, info: MemberInfo, *, live: bool) -> None:
        old = self.members.get(info.node_id)
        self.members[info.node_id] = info
        self.color(info.node_id)
        if not live:
            return
        if old is None or old.incarnation != info.incarnation:
            where = f"{info.host}, pid {info.pid}" if info.host else f"pid {info.pid}"
            verb = "joined" if old is None else "rejoined"
            self.event("join", f"{info.node_id} {verb} ({where}, weight {info.weight:g})")
        elif old.cordoned != info.cordoned:
            what = "is cordoned: it hands its shards back" if info.cordoned else "is uncordoned"
            self.event("cordon", f"{info.node_id} {what}")

    def member_gone(self, node_id: str, *, graceful: bool, live: bool) -> None:
        if self.members.pop(node_id, None) is None or not live:
            return
        if graceful:
            self.event("leave", f"{node_id} left the cluster")
        else:
            self.event("expire", f"{node_id}'s heartbeat expired: it died or lost NATS")

    def on_shard_key(self, key: str, value: bytes | None) -> None:
        try:
            shard = int(key)
        except ValueError:
            return
        if value is None:
            self.holders.pop(shard, None)
        else:
            self.holders[shard] = value.decode(errors="replace")

    # -- after each poll ----------------------------------------------------------

    def polled(self, now: float) -> None:
        """Note who went silent, and forget nodes long gone."""
        self.polled_at = now
        settings = self.settings
        answering = {n for n, t in self.tracks.items() if t.answering(now, settings.silent_after)}
        for node_id in sorted(self.answering - answering):
            self.event("silent", f"{node_id} stopped answering discovery")
        self.answering = answering
        held = set(self.holders.values())
        for node_id, track in list(self.tracks.items()):
            gone = track.answered_at is None or now - track.answered_at > settings.forget_after
            if gone and node_id not in self.members and node_id not in held:
                del self.tracks[node_id]
        live = set(self.tracks) | set(self.members) | held
        for node_id in [n for n in self.colors if n not in live]:
            del self.colors[node_id]

    def sample_series(self, now: float) -> None:
        """One point of the cluster's request and error rates."""
        rates = [
            t.rates(now, self.settings.rate_window)
            for n, t in self.tracks.items()
            if n in self.answering
        ]
        known = [(r, e) for r, e in rates if r is not None and e is not None]
        if not known:
            self.series.append((None, None))
            return
        self.series.append((sum(r for r, _ in known), sum(e for _, e in known)))

    def shard_count(self) -> tuple[int, list[str]]:
        """How many shards to draw, and notes on disagreements."""
        notes: list[str] = []
        counts = self.announced_counts
        given = self.num_shards
        if len(counts) > 1:
            notes.append(f"the nodes disagree on the shard count: {sorted(counts)}")
        if len(counts) == 1:
            (count,) = counts
            if given is not None and given != count:
                notes.append(
                    f"the nodes use {count} shards, not {given} as given: showing {count}; "
                    f"pass --shards {count}"
                )
            return count, notes
        if given is not None:
            return given, notes
        if self.holders:
            return max(max(self.holders) + 1, _FALLBACK_SHARDS), notes
        return _FALLBACK_SHARDS, notes


def _desired(picture: Picture, num_shards: int) -> dict[int, str]:
    """HRW over the live, uncordoned members (kept until they or the count change:
    thousands of shards take milliseconds to place)."""
    live = {n: m for n, m in picture.members.items() if not m.cordoned}
    if not picture.kv or not live:
        return {}
    weights = {n: m.weight for n, m in live.items()}
    key = (num_shards, tuple(sorted(weights.items())))
    if picture._desired is not None and picture._desired[0] == key:
        return picture._desired[1]
    try:
        desired = assign_shards(list(live), num_shards, picture.seed, weights=weights)
    except ClstrError:
        desired = {}  # a member announced a weight HRW refuses
    picture._desired = (key, desired)
    return desired


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def build_snapshot(picture: Picture, now: float, wall: float) -> dict[str, Any]:
    """The dashboard's JSON for ``picture`` as of ``now`` (loop time) and ``wall``
    (Unix time). Records the ownership changes since the last one as events."""
    settings = picture.settings
    num_shards, notes = picture.shard_count()
    answering = picture.answering
    # Who says it serves each shard: the answering nodes first, then the last
    # word of silent ones (all there is to go by without the buckets).
    announced: dict[int, str] = {}
    for node_id, track in sorted(picture.tracks.items(), key=lambda kv: kv[0] not in answering):
        for shard in track.shards:
            other = announced.setdefault(shard, node_id)
            if other != node_id and node_id in answering:
                notes.append(f"shard {shard} is served by both {other} and {node_id}")
    kv = picture.kv
    owners = [(picture.holders.get(s) if kv else announced.get(s)) for s in range(num_shards)]
    desired = _desired(picture, num_shards)
    discovered = set(picture.tracks)
    shards = []
    counts = {"owned": 0, "moving": 0, "unowned": 0, "silent": 0}
    for shard, owner in enumerate(owners):
        want = desired.get(shard)
        if owner is None:
            state = "moving" if want is not None else "unowned"
        elif want is not None and owner != want:
            state = "moving"
        elif owner in discovered and owner not in answering:
            state = "silent"
        else:
            state = "owned"
        counts[state] += 1
        shards.append({"owner": owner, "desired": want, "state": state})
    _note_moves(picture, owners)
    if kv and counts["moving"] and now - picture.kv_changed_at > _SEED_HINT_AFTER:
        notes.append(
            f"{counts['moving']} shards have stayed off their HRW owner for "
            f"{_SEED_HINT_AFTER:.0f} s: is the dashboard's seed the nodes' seed?"
        )
    if picture.other_prefixes:
        notes.append(
            f"nodes of service {picture.service_name!r} under other prefixes are not shown: "
            + ", ".join(sorted(picture.other_prefixes))
        )
    nodes = _node_rows(picture, now, wall, owners, answering)
    rates = [(n["rate"], n["error_rate"]) for n in nodes if n["answering"]]
    known = [(r, e) for r, e in rates if r is not None and e is not None]
    rate = sum(r for r, _ in known) if known else None
    errors = sum(e for _, e in known) if known else None
    state, message = _health(picture, counts, num_shards, nodes)
    series_rate = [r for r, _ in picture.series]
    series_errors = [e for _, e in picture.series]
    return {
        "state": state,
        "message": message,
        "notes": notes,
        "nats_url": picture.nats_url,
        "prefix": picture.prefix,
        "service_name": picture.service_name,
        "num_shards": num_shards,
        "membership": "kv" if kv else ("discovery" if picture.tracks else None),
        "updated": wall,
        "summary": {
            "nodes": len(nodes),
            "answering": len(answering),
            "members": len(picture.members) if kv else None,
            **counts,
            "rate": _round(rate),
            "error_rate": _round(errors),
        },
        "nodes": nodes,
        "shards": shards,
        "series": {
            "rate": [_round(v) for v in series_rate],
            "errors": [_round(v) for v in series_errors],
        },
        "charts": {
            "rate": sparkline(series_rate, label="requests per second", points=settings.history),
            "errors": sparkline(
                series_errors, label="errors per second", color="#dc2626", points=settings.history
            ),
        },
        "events": list(picture.events),
    }


def _note_moves(picture: Picture, owners: list[str | None]) -> None:
    """Events for the shards that changed hands since the last snapshot, grouped.
    The first map of a source (discovery, then the buckets once read) is no move."""
    known = picture.reachable == "connected" and picture.polled_at is not None
    previous = picture._owners
    picture._owners = (picture.kv, list(owners)) if known else None
    if previous is None or not known:
        return
    was_kv, before = previous
    if was_kv != picture.kv or len(before) != len(owners):
        return
    moves: dict[tuple[str | None, str | None], list[int]] = {}
    for shard, (old, new) in enumerate(zip(before, owners, strict=True)):
        if old != new:
            moves.setdefault((old, new), []).append(shard)
    for (old, new), shards in sorted(moves.items(), key=lambda m: m[1][0]):
        what = f"shard{'s' if len(shards) > 1 else ''} {shard_ranges(shards)}"
        if new is None:
            picture.event("move", f"{what} of {old}: no owner now")
        elif old is None:
            picture.event("move", f"{new} took {what}")
        else:
            picture.event("move", f"{what} moved from {old} to {new}")


def _uptime(
    track: NodeTrack | None, member: MemberInfo | None, now: float, wall: float
) -> float | None:
    """Seconds since the node started: its own word (no clock skew), else its
    STATS start time or its membership record, against our clock."""
    if track is not None and track.reply is not None and track.answered_at is not None:
        uptime = track.data.get("uptime")
        if isinstance(uptime, int | float) and not isinstance(uptime, bool):
            return float(uptime) + (now - track.answered_at)
        started = track.reply.get("started")
        if isinstance(started, str):
            try:
                moment = datetime.fromisoformat(started.replace("Z", "+00:00"))
            except ValueError:
                return None
            return max(0.0, wall - moment.timestamp())
    if member is not None and member.started_at:
        return max(0.0, wall - member.started_at)
    return None


def _node_rows(
    picture: Picture, now: float, wall: float, owners: list[str | None], answering: set[str]
) -> list[dict[str, Any]]:
    settings = picture.settings
    held: dict[str, int] = {}
    for owner in owners:
        if owner is not None:
            held[owner] = held.get(owner, 0) + 1
    ids = set(picture.tracks) | set(picture.members) | set(held)
    rows = []
    for node_id in sorted(ids, key=_natural):
        track = picture.tracks.get(node_id)
        member = picture.members.get(node_id)
        data = track.data if track is not None else {}
        reply = track.reply if track is not None and track.reply is not None else {}
        # A silent node's last figures would be stale: only its totals stay.
        live = node_id in answering
        rate = error_rate = p50 = p99 = None
        if track is not None and live:
            rate, error_rate = track.rates(now, settings.rate_window)
            p50, p99 = track.latency(now, settings.latency_window)
        if track is None:
            status = "no discovery"
        elif node_id not in answering:
            status = "gone" if picture.kv and member is None else "silent"
        elif member is not None and member.cordoned:
            status = "cordoned"
        else:
            status = str(data.get("state") or "running")
        uptime = _uptime(track, member, now, wall) if live or track is None else None
        rejected = data.get("rejected") if isinstance(data.get("rejected"), dict) else {}
        assert isinstance(rejected, dict)
        errors = data.get("errors")
        rows.append(
            {
                "node_id": node_id,
                "color": picture.color(node_id),
                "status": status,
                "answering": node_id in answering,
                "member": None if not picture.kv else member is not None,
                "shards": len(track.shards)
                if track is not None and (node_id in answering or not picture.kv)
                else held.get(node_id, 0),
                "held": held.get(node_id, 0),
                "rate": _round(rate),
                "error_rate": _round(error_rate),
                "errors": (errors + sum(v for v in rejected.values() if isinstance(v, int)))
                if isinstance(errors, int)
                else None,
                "queued": data.get("queued") if live else None,
                "running": data.get("running") if live else None,
                "p50_ms": _round(p50, 3),
                "p99_ms": _round(p99, 3),
                "uptime": _round(uptime, 1),
                "version": reply.get("version"),
                "weight": member.weight if member is not None else None,
                "host": member.host if member is not None else None,
            }
        )
    return rows


def _health(
    picture: Picture, counts: dict[str, int], num_shards: int, nodes: list[dict[str, Any]]
) -> tuple[str, str]:
    """The headline state of the page, and a sentence that says what to do."""
    if picture.reachable == "connecting":
        return "connecting", f"connecting to NATS at {picture.nats_url}"
    if picture.reachable == "unreachable":
        return "unreachable", (
            f"cannot reach NATS at {picture.nats_url}: {picture.problem}; retrying every "
            f"{picture.settings.retry_interval:g} s (is the cluster running? check the URL)"
        )
    if picture.reachable == "reconnecting":
        return "reconnecting", f"lost the NATS connection to {picture.nats_url}; reconnecting"
    if not nodes:
        if picture.polled_at is None:
            return "connecting", "asking the nodes (service discovery)"
        return "empty", (
            f"no node answers service discovery as {picture.service_name!r} under prefix "
            f"{picture.prefix!r}, and no member is in the membership bucket: start nodes "
            "('clstr dev up'), or check the prefix and service name"
        )
    if counts["owned"] == num_shards:
        return "ok", f"all {num_shards} shards owned"
    parts = [
        f"{counts[k]} {label}"
        for k, label in (
            ("moving", "moving"),
            ("silent", "held by a silent node"),
            ("unowned", "without owner"),
        )
        if counts[k]
    ]
    return "degraded", f"{counts['owned']}/{num_shards} shards owned; " + ", ".join(parts)
