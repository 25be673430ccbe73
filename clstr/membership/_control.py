"""Operations on a node from outside (``clstr cordon/uncordon/drain``)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Final

__all__ = ["OPS", "control_subject", "parse_op", "run_op"]

#: The operations a node takes on its control subject.
OPS: Final = ("cordon", "uncordon", "drain")


def control_subject(prefix: str, node_id: str) -> str:
    """The subject on which a node with dynamic membership takes operations
    (cordon, uncordon, drain) as JSON ``{"op": "drain"}``; it replies with
    ``{"ok": true, ...}`` once done."""
    return f"{prefix}.control.{node_id}"


def parse_op(data: bytes) -> str:
    """The operation a control message asks for; ``ValueError`` saying why when
    it is not one of :data:`OPS` in JSON ``{"op": ...}``."""
    try:
        op = json.loads(data)["op"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f'bad control message: {exc!r}; send JSON {{"op": ...}}') from exc
    if op not in OPS:
        raise ValueError(f"bad control message: unknown op {op!r}; one of {', '.join(OPS)}")
    return str(op)


async def run_op(
    op: str,
    node_id: str,
    *,
    cordon: Callable[[bool], Awaitable[None]],
    drain: Callable[[], Awaitable[None]],
) -> dict[str, Any]:
    """Carry out ``op`` and return the reply's body."""
    if op == "drain":
        await drain()
    else:
        await cordon(op == "cordon")
    return {"ok": True, "node_id": node_id, "op": op}
