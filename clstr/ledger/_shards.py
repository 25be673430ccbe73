"""Each shard's part of ``get_balances``, and the scatter-gather over all shards.

A ``LedgerShard`` entity lives in every shard (its id is chosen for that, see
:func:`~clstr.ledger._runtime.shard_index_ids`), so a request to it reaches the
shard's owner like any entity message. It lists the bucket's accounts from the
journal's subjects, keeps those of its shard, and reads each one's last event:
that event carries the balance and held amount right after it, which is the
account's balance (the sum of its events). An account with reservations is
asked itself, since a reservation past its expiry holds nothing even before
its release is appended.
"""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar, Protocol

from ..client import ScopedClient
from ..entities import Entity, handles
from ..errors import ClstrError
from ._fold import decode_event
from ._model import AccountBalance, AccountView, Balances, ShardBalances, Summary, check_bucket
from ._runtime import (
    ACCOUNT_TYPE,
    SHARD_INDEX_TYPE,
    LedgerRuntime,
    account_entity_id,
    shard_index_ids,
)

__all__ = ["ShardIndexEntity", "gather_balances"]


class ShardIndexEntity(Entity[None]):
    """A shard's index of accounts (see the module docstring)."""

    type_name = SHARD_INDEX_TYPE
    idle_timeout = 60.0
    runtime: ClassVar[LedgerRuntime]

    @handles
    async def balances(self, msg: ShardBalances) -> list[AccountBalance]:
        """The balances of ``msg.bucket``'s accounts in this shard."""
        runtime = self.runtime
        bucket = check_bucket(msg.bucket)
        shard = self.context.shard
        mine = [
            a
            for a in await runtime.journal.accounts(bucket)
            if runtime.shard_of(bucket, a) == shard
        ]
        limit = asyncio.Semaphore(runtime.settings.balances_concurrency)

        async def row(account: str) -> AccountBalance | None:
            async with limit:
                last = await runtime.journal.last(bucket, account)
                if last is None:
                    return None
                event = decode_event(bucket, account, *last)
                if event.held == 0:
                    return AccountBalance(
                        account, event.balance, 0, event.balance, event.sequence, event.position
                    )
                entity = runtime.client.entity(ACCOUNT_TYPE, account_entity_id(bucket, account))
                view = await entity.call(Summary(), AccountView)
                return AccountBalance(
                    account, view.balance, view.held, view.available, view.events, view.position
                )

        rows = await asyncio.gather(*(row(account) for account in mine))
        return sorted((r for r in rows if r is not None), key=lambda r: r.account)


class _Sender(Protocol):
    """What :func:`gather_balances` needs of a client (a Client or an EdgeClient)."""

    num_shards: int
    seed: str

    def entity(self, entity_type: type | str, entity_id: str) -> ScopedClient: ...


async def gather_balances(sender: _Sender, bucket: str, timeout: float) -> Balances:
    """Ask every shard for its accounts of ``bucket`` at once; whatever has not
    answered within ``timeout`` seconds (or failed) is left out and named."""
    ids = shard_index_ids(sender.num_shards, sender.seed)
    deadline = time.monotonic() + timeout

    async def ask(shard_id: str) -> list[AccountBalance]:
        left = max(deadline - time.monotonic(), 0.001)
        return await sender.entity(SHARD_INDEX_TYPE, shard_id).call(
            ShardBalances(bucket), list[AccountBalance], timeout=left
        )

    answers = await asyncio.gather(*(ask(i) for i in ids), return_exceptions=True)
    rows: list[AccountBalance] = []
    errors: dict[str, str] = {}
    for shard, answer in enumerate(answers):
        if isinstance(answer, BaseException):
            if not isinstance(answer, ClstrError | TimeoutError):
                raise answer
            errors[str(shard)] = f"{type(answer).__name__}: {answer}"
        else:
            rows.extend(answer)
    rows.sort(key=lambda r: r.account)
    missing = sorted(int(s) for s in errors)
    return Balances(bucket, rows, bool(missing), len(ids), missing, errors)
