"""The line protocol between the orchestrator and its workers, and what every
worker role shares.

A worker reads JSON commands, one a line, on its stdin and answers each with
one ``@clstr-bench``-marked JSON line on its stdout (other output there is
ignored). It says ``ready`` first, once it is set up; closing its stdin asks
it to stop. Roles and ops cross the process boundary as ``module:function``
references (:func:`ref`); the worker imports what they name from this
directory (:func:`resolve`).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

#: Marks the protocol's lines on a worker's stdout.
MARK: Final = "@clstr-bench "

JSON = dict[str, Any]
#: What a worker does on a command: the command in, the answer's fields out.
Op = Callable[[JSON], Awaitable[JSON]]
#: A worker process's whole life, given its configuration.
Role = Callable[[JSON], Coroutine[Any, Any, None]]


def ref(fn: Callable[..., Any]) -> str:
    """``fn`` as ``module:qualname``, for a worker to :func:`resolve`.

    Raises :class:`ValueError` unless ``fn`` is defined at the top of a module
    of this package (a worker imports it; it cannot receive a closure).
    """
    package, _, module = fn.__module__.rpartition(".")
    if package != __package__ or "<locals>" in fn.__qualname__:
        raise ValueError(
            f"{fn.__module__}.{fn.__qualname__} cannot run in a worker: "
            f"define it at the top of a module of {__package__}"
        )
    return f"{module}:{fn.__qualname__}"


def resolve(reference: str) -> Any:
    """The function that :func:`ref` named, imported from this package."""
    module, _, qualname = reference.partition(":")
    target: Any = importlib.import_module(f"{__package__}.{module}")
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def emit(message: JSON) -> None:
    """Send ``message`` to the orchestrator."""
    sys.stdout.write(MARK + json.dumps(message) + "\n")
    sys.stdout.flush()


async def _read_command() -> str:
    """The next line from the orchestrator ("" once it closed our stdin)."""
    return await asyncio.to_thread(sys.stdin.readline)


async def cpu(_cmd: JSON) -> JSON:
    """This process's CPU time so far, in seconds."""
    return {"cpu": time.process_time()}


async def serve(ops: dict[str, Op], ready: JSON | None = None) -> None:
    """Say ready, then answer commands until stdin closes. A failing op is reported."""
    emit({"ready": True, **(ready or {})})
    while line := await _read_command():
        command: JSON = json.loads(line)
        try:
            result = await ops[command["op"]](command)
        except Exception as exc:
            emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        else:
            emit({"ok": True, **result})


def quiet_logs() -> None:
    """Send clstr's logs to stderr, warnings and up: a worker's stdout is the protocol."""
    import logging

    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
