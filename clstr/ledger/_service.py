"""A ledger node: the sharding runner with the account and shard-index entities
and the reservation expiry sweeper, over a routing connection and a store.

Two connections, because the clusters that serve one ledger may be separate
NATS systems (regions) that share one durable store: ``transport`` carries the
cluster's requests and its membership (its subjects and KV buckets), ``store``
reaches the JetStream that holds the journals, the account snapshots, the node
epochs and the reservation index. In a single cluster they are one connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping
from types import TracebackType
from typing import Any, Self, cast

import structlog

from ..client import RetryPolicy
from ..entities import KvStateStore, Record, Sharding, StaleStateError
from ..errors import ClstrError
from ..hashing import ShardMapper
from ..metrics import NOOP_METRICS, Metrics
from ..node import Membership, ShardContext
from ..protocol import DEFAULT_PREFIX
from ..transports.base import Transport
from ._account import AccountEntity
from ._client import LedgerClient
from ._journal import Journal, is_unavailable
from ._model import ExpireHolds
from ._runtime import ACCOUNT_TYPE, LedgerRuntime, account_entity_id, now_ms
from ._settings import LedgerSettings
from ._shards import ShardIndexEntity

__all__ = ["EXPIRY_SINGLETON", "LedgerService"]

#: The name of the singleton that releases reservations past their expiry.
EXPIRY_SINGLETON = "ledger-expiry"

_log = structlog.get_logger("clstr.ledger")


class LedgerService:
    """One ledger node (docs/ledger.md).

    The keywords are those of :class:`~clstr.entities.Sharding` (``num_shards``,
    ``node_id``, ``prefix``, ``seed``, ``membership`` or ``nodes``, ``timeout``,
    ``retry``, ``metrics``, ``node_options``), plus ``store`` (the NATS transport
    of the durable store; default: ``transport``) and ``settings``. Node ids must
    be unique across every cluster that shares the store: they name the origin
    of the events a node appends. ``async with`` starts and stops it.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        num_shards: int,
        store: Transport | None = None,
        node_id: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        seed: str = "",
        membership: Callable[[str], Membership] | None = None,
        nodes: Collection[str] | None = None,
        settings: LedgerSettings | None = None,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        metrics: Metrics = NOOP_METRICS,
        node_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings or LedgerSettings()
        self.store = store or transport
        self.journal = Journal(self.store, self.settings)
        self.sharding = Sharding(
            transport,
            num_shards=num_shards,
            node_id=node_id,
            prefix=prefix,
            seed=seed,
            membership=membership,
            nodes=nodes,
            store=_Snapshots(
                KvStateStore(
                    self.store, prefix=self.settings.store_prefix, replicas=self.settings.replicas
                )
            ),
            timeout=timeout,
            retry=retry,
            metrics=metrics,
            node_options=node_options,
        )
        client = self.sharding.clients["default"]
        self.runtime = LedgerRuntime(
            self.journal,
            self.settings,
            self.sharding.node_id,
            client,
            ShardMapper(num_shards, seed),
        )
        # Entities are built by the host from (context, state): a subclass per
        # service binds them to this node's runtime.
        account = type(
            "LedgerAccount",
            (AccountEntity,),
            {
                "runtime": self.runtime,
                "idle_timeout": self.settings.idle_timeout,
                "save_every": self.settings.snapshot_every,
                "__module__": AccountEntity.__module__,  # where its annotations resolve
            },
        )
        index = type(
            "LedgerShard",
            (ShardIndexEntity,),
            {"runtime": self.runtime, "__module__": ShardIndexEntity.__module__},
        )
        self.sharding.register_entity(cast(type[AccountEntity], account))
        self.sharding.register_entity(cast(type[ShardIndexEntity], index))
        self.sharding.register_singleton(EXPIRY_SINGLETON, self._sweep, grace=1.0)

    @property
    def node_id(self) -> str:
        """This node's id: the origin of the events it appends."""
        return self.sharding.node_id

    @property
    def epoch(self) -> int:
        """This run's epoch (0 before :meth:`start`)."""
        return self.runtime.epoch

    async def start(self) -> None:
        """Take this run's epoch from the store, then serve."""
        self.runtime.epoch = await self.journal.next_epoch(self.node_id)
        await self.sharding.start()

    async def shutdown(self) -> None:
        """Stop serving (accounts passivate, their snapshots saved). Idempotent."""
        await self.sharding.shutdown()

    def client(self, *, timeout: float | None = None) -> LedgerClient:
        """A :class:`LedgerClient` over this node's own cluster client."""
        return LedgerClient(self.sharding.clients["default"], timeout=timeout)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    async def _sweep(self, ctx: ShardContext) -> None:
        """The expiry sweeper (a singleton): every ``sweep_interval``, ask each
        account with a reservation past its expiry to release it, then drop the
        index entry (the account has released it, or had closed it already)."""
        client = self.sharding.clients["default"]
        interval = self.settings.sweep_interval
        _log.info("reservation sweeper started", node_id=ctx.node_id)
        while not ctx.stopping.is_set():
            try:
                for hold in await self.journal.due_holds(now_ms()):
                    if ctx.stopping.is_set():
                        break
                    account = client.entity(
                        ACCOUNT_TYPE, account_entity_id(hold.bucket, hold.account)
                    )
                    await account.call(ExpireHolds(), int, timeout=max(interval, 2.0))
                    await self.journal.forget_hold_key(hold.key)
            except ClstrError as exc:
                _log.warning("reservation sweep failed; trying again", error=str(exc))
            except Exception as exc:  # the store away, say: the next round tries again
                _log.warning("reservation sweep failed; trying again", error=repr(exc))
            try:
                async with asyncio.timeout(interval):
                    await ctx.stopping.wait()
            except TimeoutError:
                pass
        _log.info("reservation sweeper stopped", node_id=ctx.node_id)


class _Snapshots:
    """The account snapshots in KV, where a write the store did not answer counts
    as stale: the entity host then reloads and answers ``not_owner`` (retryable,
    not kept), and the retry of the nonce finds its event in the journal, instead
    of an error kept for the nonce although the event landed."""

    def __init__(self, inner: KvStateStore) -> None:
        self._inner = inner

    async def load(self, entity_type: str, entity_id: str) -> tuple[Record, int] | None:
        return await self._inner.load(entity_type, entity_id)

    async def save(self, entity_type: str, entity_id: str, record: Record, revision: int) -> int:
        try:
            return await self._inner.save(entity_type, entity_id, record, revision)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            raise StaleStateError(
                f"the snapshot of {entity_id} was not written ({type(exc).__name__}); "
                "its event is in the journal"
            ) from exc

    async def ids(self, entity_type: str) -> list[str]:
        return await self._inner.ids(entity_type)
