"""The authority of a counter: one entity per key, its state in the entity store.

Every counter key of a namespace is an entity of type ``counter-<namespace>``
(:mod:`clstr.entities`): it lives on its shard's owner, handles one operation
at a time in arrival order, and is write-through — its value is saved (in
JetStream KV with :class:`~clstr.entities.KvStateStore`), with a conditional
write, before the reply leaves. Both counters use it: a strict operation is
one request to it, a lax flush delivers its deltas to it as items of a batch
(:func:`~clstr.client.send_batch`), each item the same ``add`` message.

**Exactly once, per writer.** A writer (a :class:`StrictCounter` or
:class:`LaxCounter`) numbers its operations (``q``, growing) and sends with
each the lowest number it still waits for (``lo``). The record keeps, per
writer, that low mark and the replies of its operations at or above it
(``sessions``): an operation seen before gets its first reply and is not
applied again; one below the mark was answered already (the writer said so)
and is not applied either. Saved in the same write as the value, this holds
across retries, owner crashes and moves; unlike a window of the last n
replies of the key, it holds however many other writers write the key
meanwhile. A writer's session is dropped when it has not written the key for
:data:`WRITER_TTL` (writers retry for less than that), and the least recently
written one when the key holds more than :data:`MAX_WRITERS`: the record stays
small however many writers come and go.

**Forgetting safely.** A dropped session could let a late retry of one of its
operations be applied again. So the record keeps ``forgot``, the last write
of the newest session it dropped, and every operation carries ``t``, when
its writer first sent it (ms since the epoch; a writer's ``t`` grows with
its numbers). An operation of a writer without a session, or numbered below
every operation its session holds (it may predate the session), that was
first sent before ``forgot`` (plus :data:`CLOCK_SKEW` for the writer's
clock) may be such a retry: it is refused with
:class:`~clstr.CounterSessionLostError` (nothing applied). Every operation
applied since the drop was sent after it, or numbered above one that was, so
a retry of one applied before it always falls under the rule. New operations
pass: a writer's next ones are numbered above what its session holds, and a
new writer's are sent after ``forgot`` unless more than :data:`MAX_WRITERS`
writers wrote the key within ``CLOCK_SKEW``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cache
from typing import ClassVar, Final

from ..entities import DEFAULT_GROUP, Entity, EntityHost, Sharding, handles
from ..errors import CounterRangeError, CounterSessionLostError, InvalidCounterKeyError
from ._keys import TYPE_PREFIX, VALUE_MAX, VALUE_MIN, check_namespace

__all__ = [
    "CLOCK_SKEW",
    "MAX_WRITERS",
    "WRITER_TTL",
    "Add",
    "CounterEntity",
    "CounterState",
    "Put",
    "Read",
    "Take",
    "counter_entity",
    "serve_counters",
]

#: Seconds a writer's session is kept after its last write to the key.
WRITER_TTL: Final = 3600.0
#: Sessions a key keeps at most (about 27 bytes each, with one reply): past
#: that, the least recently written one is dropped.
MAX_WRITERS: Final = 1024
#: Seconds a writer's clock may run ahead of the owner's before an operation
#: sent after its key dropped a session may still be taken for a retry of one
#: before (the nodes' default ``clock_skew``).
CLOCK_SKEW: Final = 30.0


@dataclass
class CounterState:
    """A counter's record: its value, its writers' sessions
    (writer -> ``[low mark, last write in ms, q1, reply1, q2, reply2, ...]``)
    and ``forgot``, the last write (ms) of the newest session it dropped."""

    value: int = 0
    sessions: dict[str, list[int]] = field(default_factory=dict)
    forgot: int = 0


@dataclass
class Add:
    """Add ``n``; the reply is the new total. ``w``/``q``/``lo``: the writer's
    session (empty ``w``: none, no deduplication beyond the request id);
    ``t``: when the writer first sent it, ms since the epoch (0: not said)."""

    message_type: ClassVar[str] = "clstr.counter.add"
    n: int
    w: str = ""
    q: int = 0
    lo: int = 0
    t: int = 0


@dataclass
class Put:
    """Set the value; the reply is the value before."""

    message_type: ClassVar[str] = "clstr.counter.set"
    value: int
    w: str = ""
    q: int = 0
    lo: int = 0
    t: int = 0


@dataclass
class Take:
    """Delete (back to 0); the reply is the value before."""

    message_type: ClassVar[str] = "clstr.counter.del"
    w: str = ""
    q: int = 0
    lo: int = 0
    t: int = 0


@dataclass
class Read:
    """The value (read-only: nothing is written)."""

    message_type: ClassVar[str] = "clstr.counter.get"


class CounterEntity(Entity[CounterState]):
    """A counter key (see the module docstring); one subclass per namespace."""

    state_type = CounterState
    kept_replies = 0  # the sessions deduplicate, for any number of writers
    idle_timeout = 300.0
    max_instances = 100_000

    @handles
    async def add(self, msg: Add) -> int:
        return self._write(msg, self.state.value + msg.n, reply_new=True)

    @handles
    async def put(self, msg: Put) -> int:
        return self._write(msg, msg.value, reply_new=False)

    @handles
    async def take(self, msg: Take) -> int:
        return self._write(msg, 0, reply_new=False)

    @handles(readonly=True)
    async def read(self, msg: Read) -> int:
        return self.state.value

    def _write(self, msg: Add | Put | Take, new: int, *, reply_new: bool) -> int:
        """Make the value ``new``, once per (writer, q); the reply is the value
        after (add) or before (set, delete), or the first reply of a repeat."""
        state = self.state
        writer, q = msg.w, msg.q
        if writer:
            session = state.sessions.get(writer)
            if session is not None:
                if q < session[0]:
                    return state.value  # answered before: the writer is past it
                for i in range(2, len(session), 2):
                    if session[i] == q:
                        return session[i + 1]
            # Older than all the session holds: it may predate the session, and
            # have been applied under one of this writer's that was dropped.
            doubtful = session is None or q < min(session[2::2])
            if doubtful and msg.t and msg.t <= state.forgot + int(CLOCK_SKEW * 1000):
                raise CounterSessionLostError(
                    f"counter {self.id!r} may have applied this operation already: it was "
                    "first sent before the key dropped a writer session (idle for "
                    f"{WRITER_TTL:.0f}s, or past {MAX_WRITERS} writers), so its first "
                    "outcome is forgotten; it was not applied now. Read the counter to "
                    "decide; a new operation is taken"
                )
        if not VALUE_MIN <= new <= VALUE_MAX:
            raise CounterRangeError(
                f"counter {self.id!r} would go from {state.value} to {new}, outside the "
                "signed 64-bit range; nothing was applied"
            )
        old, state.value = state.value, new
        reply = new if reply_new else old
        if writer:
            _remember(state, writer, q, msg.lo, reply)
        return reply


def _remember(state: CounterState, writer: str, q: int, lo: int, reply: int) -> None:
    """Record (writer, q) -> reply; advance the writer's low mark to ``lo``,
    forgetting its replies below it; drop sessions idle past :data:`WRITER_TTL`,
    then the least recently written ones past :data:`MAX_WRITERS`."""
    now = int(time.time() * 1000)
    session = state.sessions.get(writer)
    if session is None:
        session = [lo, now]
    elif lo > session[0]:
        kept = [session[0], now]
        for i in range(2, len(session), 2):
            if session[i] >= lo:
                kept += session[i : i + 2]
        kept[0] = lo
        session = kept
    session[1] = now
    session += (q, reply)
    state.sessions[writer] = session
    horizon = now - int(WRITER_TTL * 1000)
    sessions = state.sessions
    for stale in [w for w, s in sessions.items() if s[1] < horizon]:
        state.forgot = max(state.forgot, sessions.pop(stale)[1])
    while len(sessions) > MAX_WRITERS:
        oldest = min((w for w in sessions if w != writer), key=lambda w: sessions[w][1])
        state.forgot = max(state.forgot, sessions.pop(oldest)[1])


@cache
def counter_entity(type_name: str) -> type[CounterEntity]:
    """The entity class of counter type ``counter-<namespace>`` (one per name).

    Raises :class:`InvalidCounterKeyError` for a name that is not one.
    """
    if not type_name.startswith(TYPE_PREFIX):
        raise InvalidCounterKeyError(f"{type_name!r} is not a counter type ({TYPE_PREFIX}<ns>)")
    namespace = check_namespace(type_name[len(TYPE_PREFIX) :])
    return type(
        f"Counter_{namespace.replace('-', '_')}",
        (CounterEntity,),
        {"type_name": type_name, "__module__": __name__},
    )


def serve_counters(target: Sharding | EntityHost, *, shard_group: str = DEFAULT_GROUP) -> None:
    """Serve the counters of every namespace on ``target`` (a runner, or a node's
    :class:`~clstr.entities.EntityHost`): the entity type of a namespace is made
    on its first message. Clients need nothing else."""
    if isinstance(target, Sharding):
        target.register_entity_family(TYPE_PREFIX, counter_entity, shard_group=shard_group)
    else:
        target.register_family(TYPE_PREFIX, counter_entity)
