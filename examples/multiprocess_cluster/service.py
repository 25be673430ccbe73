"""The service of the multi-process example: what every node process runs.

Each node is a ``clstr node`` process started with ``--app service:app``: the
command imports this module and calls ``app`` with the node's id, as it would
for your own service in production.
"""

import os
from dataclasses import dataclass

from clstr import Router


@dataclass
class WhoServes:
    key: str


@dataclass
class Served:
    key: str
    node: str
    pid: int


def app(node_id: str) -> Router:
    """The handler of node ``node_id``: it answers with its node id and process id."""
    router = Router()

    @router.on(WhoServes)
    async def who(msg: WhoServes) -> Served:
        return Served(key=msg.key, node=node_id, pid=os.getpid())

    return router
