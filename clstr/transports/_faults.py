"""Faults on command for the memory transport: drops, delays, duplicates and
partitions between named transports (``MemoryNetwork.faults``).

Rules match on sender, receiver and subject (NATS wildcards); what they do to
one message is a :class:`_Decision` that :class:`~clstr.transports.memory.MemoryNetwork`
applies when it routes. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from ..errors import ConfigurationError

__all__ = ["FaultKind", "FaultRule", "Faults", "Partition", "subject_matches"]


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` matches the NATS-style ``pattern``.

    ``*`` matches one token, a final ``>`` one or more tokens.
    """
    if pattern == subject:
        return True
    want = pattern.split(".")
    have = subject.split(".")
    for i, token in enumerate(want):
        if token == ">" and i == len(want) - 1:
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


class FaultKind(enum.Enum):
    """What a :class:`FaultRule` does to the messages it matches."""

    DROP = "drop"
    DELAY = "delay"
    DUPLICATE = "duplicate"


@dataclass(eq=False, kw_only=True)
class FaultRule:
    """One fault applied to matching messages; made by :class:`Faults`' methods.

    A message matches when its sender is ``src`` (any when ``None``), its
    receiver is ``dst`` (any when ``None``; the receiver of a reply is the
    requester), and its subject matches ``subject`` (NATS wildcards; any
    when ``None``). A match applies with ``probability`` (drawn from the
    network's seeded random generator) and at most ``count`` times (``None``:
    no limit). ``matched`` counts the times it applied.
    """

    kind: FaultKind
    src: str | None = None
    dst: str | None = None
    subject: str | None = None
    probability: float = 1.0
    count: int | None = None
    delay: float = 0.0
    jitter: float = 0.0
    copies: int = 1
    matched: int = 0
    _faults: Faults | None = field(default=None, repr=False)

    def matches(self, src: str, dst: str, subject: str) -> bool:
        """Whether a message from ``src`` to ``dst`` on ``subject`` is concerned."""
        return (
            (self.src is None or self.src == src)
            and (self.dst is None or self.dst == dst)
            and (self.subject is None or subject_matches(self.subject, subject))
        )

    @property
    def exhausted(self) -> bool:
        """Whether the rule applied ``count`` times already."""
        return self.count is not None and self.matched >= self.count

    def remove(self) -> None:
        """Stop applying this rule."""
        if self._faults is not None:
            self._faults.remove(self)


@dataclass(eq=False)
class Partition:
    """A split of the network into groups of transport names that cannot
    reach each other; made by :meth:`Faults.partition`."""

    groups: list[frozenset[str]]
    _faults: Faults | None = field(default=None, repr=False)

    def separates(self, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` are in different groups."""
        ga = next((i for i, g in enumerate(self.groups) if a in g), None)
        gb = next((i for i, g in enumerate(self.groups) if b in g), None)
        return ga is not None and gb is not None and ga != gb

    def heal(self) -> None:
        """Remove this partition."""
        if self._faults is not None:
            self._faults.heal(self)


@dataclass(frozen=True, slots=True)
class _Decision:
    drop: bool = False
    delay: float = 0.0
    copies: int = 0


_DELIVER: Final = _Decision()


class Faults:
    """Faults on command for one :class:`MemoryNetwork` (``network.faults``).

    Rules are matched in the order they were added; a drop wins over
    everything, delays add up, duplicates add up. A partition hides the
    subscribers on the other side: a queue group picks only among members the
    sender can reach, and a request nobody reachable listens to fails at once
    with :class:`~clstr.NoShardOwnerError`, as it would for a node cut off
    from its NATS server. Everything is deterministic for a given ``seed``.
    """

    def __init__(self, *, seed: int = 0) -> None:
        self._rules: list[FaultRule] = []
        self._partitions: list[Partition] = []
        self._random = random.Random(seed)
        self.dropped = 0
        self.delayed = 0
        self.duplicated = 0

    @property
    def active(self) -> bool:
        """Whether any rule or partition is in force."""
        return bool(self._rules or self._partitions)

    @property
    def rules(self) -> list[FaultRule]:
        """The rules in force, in the order they apply."""
        return list(self._rules)

    def seed(self, seed: int) -> None:
        """Restart the random generator that draws rule probabilities."""
        self._random.seed(seed)

    def _add(self, rule: FaultRule) -> FaultRule:
        if not 0.0 <= rule.probability <= 1.0:
            raise ConfigurationError(f"probability must be in [0, 1], got {rule.probability!r}")
        if rule.count is not None and rule.count < 0:
            raise ConfigurationError(f"count must be >= 0 or None, got {rule.count!r}")
        rule._faults = self
        self._rules.append(rule)
        return rule

    def drop(
        self,
        *,
        src: str | None = None,
        dst: str | None = None,
        subject: str | None = None,
        probability: float = 1.0,
        count: int | None = None,
    ) -> FaultRule:
        """Lose matching messages (a lost request or a lost reply: the requester
        times out)."""
        return self._add(
            FaultRule(
                kind=FaultKind.DROP,
                src=src,
                dst=dst,
                subject=subject,
                probability=probability,
                count=count,
            )
        )

    def delay(
        self,
        seconds: float,
        *,
        jitter: float = 0.0,
        src: str | None = None,
        dst: str | None = None,
        subject: str | None = None,
        probability: float = 1.0,
        count: int | None = None,
    ) -> FaultRule:
        """Deliver matching messages ``seconds`` later (plus a uniform random
        ``0..jitter``), on the loop's clock; messages may overtake each other."""
        if seconds < 0 or jitter < 0:
            raise ConfigurationError("delay seconds and jitter must be >= 0")
        return self._add(
            FaultRule(
                kind=FaultKind.DELAY,
                src=src,
                dst=dst,
                subject=subject,
                probability=probability,
                count=count,
                delay=seconds,
                jitter=jitter,
            )
        )

    def duplicate(
        self,
        *,
        copies: int = 1,
        src: str | None = None,
        dst: str | None = None,
        subject: str | None = None,
        probability: float = 1.0,
        count: int | None = None,
    ) -> FaultRule:
        """Deliver matching messages ``1 + copies`` times to the same receiver
        (a redelivery): handlers must tolerate it, e.g. with request ids."""
        if copies < 1:
            raise ConfigurationError(f"copies must be >= 1, got {copies!r}")
        return self._add(
            FaultRule(
                kind=FaultKind.DUPLICATE,
                src=src,
                dst=dst,
                subject=subject,
                probability=probability,
                count=count,
                copies=copies,
            )
        )

    def partition(self, *groups: Iterable[str]) -> Partition:
        """Split the network: transports named in different ``groups`` cannot reach
        each other (both ways) until :meth:`heal`. Names in no group are not concerned."""
        frozen = [frozenset(g) for g in groups]
        if len(frozen) < 2:
            raise ConfigurationError("a partition needs at least two groups of names")
        seen: set[str] = set()
        for group in frozen:
            if group & seen:
                raise ConfigurationError(f"names in several groups: {sorted(group & seen)}")
            seen |= group
        part = Partition(frozen, self)
        self._partitions.append(part)
        return part

    def isolate(self, name: str, *, others: Iterable[str]) -> Partition:
        """Cut ``name`` off from every transport in ``others``."""
        return self.partition([name], [o for o in others if o != name])

    def heal(self, partition: Partition | None = None) -> None:
        """Remove ``partition``, or every partition."""
        if partition is None:
            self._partitions.clear()
        elif partition in self._partitions:
            self._partitions.remove(partition)

    def remove(self, rule: FaultRule) -> None:
        """Stop applying ``rule``."""
        if rule in self._rules:
            self._rules.remove(rule)

    def clear(self) -> None:
        """Remove every rule and partition (counters are kept)."""
        self._rules.clear()
        self._partitions.clear()

    def reachable(self, src: str, dst: str) -> bool:
        """Whether no partition separates ``src`` from ``dst``."""
        return not any(p.separates(src, dst) for p in self._partitions)

    def decide(self, src: str, dst: str, subject: str) -> _Decision:
        """What happens to one message from ``src`` to ``dst`` on ``subject``."""
        if not self._rules:
            return _DELIVER
        drop = False
        delay = 0.0
        copies = 0
        for rule in list(self._rules):
            if rule.exhausted or not rule.matches(src, dst, subject):
                continue
            if rule.probability < 1.0 and self._random.random() >= rule.probability:
                continue
            rule.matched += 1
            if rule.kind is FaultKind.DROP:
                drop = True
            elif rule.kind is FaultKind.DELAY:
                extra = self._random.uniform(0.0, rule.jitter) if rule.jitter else 0.0
                delay += rule.delay + extra
            else:
                copies += rule.copies
        if drop:
            self.dropped += 1
            return _Decision(drop=True)
        if delay:
            self.delayed += 1
        if copies:
            self.duplicated += 1
        return _Decision(delay=delay, copies=copies)
