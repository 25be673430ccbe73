"""How ``clstr dev up`` and friends show their children's log records."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, TextIO

import structlog

if TYPE_CHECKING:
    from ..testing._processes import LogRecord, NodeProcess

__all__ = ["LogRelay"]


class LogRelay:
    """Shows the children's log records in the parent's format.

    With ``--log-json`` a record is written back as one JSON line (it already
    names its node); otherwise it goes through structlog's console renderer,
    prefixed with the node id. Plain (non-JSON) output lines are prefixed too.
    """

    def __init__(
        self, *, json_lines: bool, level: str = "info", stream: TextIO | None = None
    ) -> None:
        self._json = json_lines
        self._min = _LEVELS.get(level, 20)
        self._stream = stream if stream is not None else sys.stderr
        colors = _isatty(self._stream)
        self._console = structlog.dev.ConsoleRenderer(colors=colors, pad_event_to=24)
        self._closed = False

    def __call__(self, process: NodeProcess, record: LogRecord) -> None:
        if isinstance(record, str):
            text = f"{process.node_id} | {record}"
        elif _LEVELS.get(str(record.get("level", "info")), 20) < self._min:
            return
        elif self._json:
            text = json.dumps(record, ensure_ascii=False)
        else:
            event = dict(record)
            event.pop("node_id", None)
            level = str(event.get("level", "info"))
            try:
                rendered = self._console(None, level, event)
            except Exception:  # a record the renderer cannot take: show it raw
                rendered = json.dumps(record)
            text = f"{process.node_id} | {rendered}"
        if self._closed:
            return
        try:
            print(text, file=self._stream, flush=True)
        except OSError:  # the terminal is gone (SIGHUP) or the pipe closed: stop relaying
            self._closed = True


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
