"""What the ``clstr`` subcommands share: the error they exit with, logging setup,
the check of a routing key, and the JSON <-> msgpack conversions of the
shell-facing commands."""

from __future__ import annotations

import base64
import contextlib
import contextvars
import io
import json
import logging
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any, Final, TextIO, cast

import msgpack
import structlog

__all__ = [
    "DEFAULT_APP",
    "DEV_MEMBERSHIPS",
    "DEFAULT_NATS_URL",
    "DEFAULT_SERVICE_NAME",
    "DEFAULT_SHARDS",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "CliError",
    "check_key",
    "configure_logging",
    "json_to_msgpack",
    "msgpack_to_json",
    "quiet_logs",
]

#: Where commands connect when neither ``--nats-url`` nor ``CLSTR_NATS_URL`` says.
DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
DEFAULT_SHARDS: Final = 64
DEFAULT_APP: Final = "clstr.demo_app:app"
DEFAULT_SERVICE_NAME: Final = "clstr"
#: How the nodes of a dev cluster place their shards (``clstr dev up --membership``).
DEV_MEMBERSHIPS: Final = ("static", "kv")

EXIT_OK = 0
#: The command ran, and what it did failed (a handler error, a timeout).
EXIT_FAILED = 1
#: The command could not run as given: fix the input or the environment.
EXIT_USAGE = 2


class CliError(Exception):
    """An error the command reports as one line on stderr, with an exit code.

    The message says what went wrong and what to do about it; no traceback.
    """

    def __init__(self, message: str, *, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def configure_logging(
    level: str = "warning", *, json_lines: bool = False, stream: TextIO | None = None
) -> None:
    """Configure structlog for the command line: a console renderer (coloured on a
    terminal), or one JSON object per line when ``json_lines``. Logs go to stderr.

    The library never configures logging; only the command does. A stream that
    can no longer be written (the terminal closed, the reading parent died)
    silences the logs instead of raising in the code that logs.
    """
    out = stream if stream is not None else sys.stderr
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=_isatty(out))
    )
    processors: list[structlog.typing.Processor] = [
        _drop_when_quiet,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json_lines:
        processors.append(structlog.processors.format_exc_info)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_level_number(level)),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _Unbreakable(out))),
        cache_logger_on_first_use=False,
    )


class _Unbreakable(io.TextIOBase):
    """A text stream whose write errors end the writing instead of reaching the
    caller: a node whose parent died must still stop cleanly, logging into the void."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream
        self._broken = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not self._broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):  # a closed pipe or terminal, a closed file
                self._broken = True
        return len(text)

    def flush(self) -> None:
        if not self._broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._broken = True


_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("clstr_cli_quiet", default=False)


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Drop the log records below error level logged in this context, and in the tasks
    started in it (which copy the context): e.g. those of a connection the command
    reports on itself."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def _drop_when_quiet(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if _QUIET.get() and logging.getLevelNamesMapping().get(method_name.upper(), 0) < logging.ERROR:
        raise structlog.DropEvent
    return event_dict


def _level_number(level: str) -> int:
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise CliError(f"unknown log level {level!r}; use debug, info, warning or error")
    return number


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def check_key(key: str) -> None:
    """Refuse a key no request could carry: empty, or over the key size limit."""
    from ..codec import DEFAULT_LIMITS, check_limits
    from ..envelope import Envelope
    from ..errors import LimitExceededError

    if not key:
        raise CliError("the key is empty: every request is routed by its key; pass a non-empty KEY")
    try:
        check_limits(Envelope(type="", key=key), DEFAULT_LIMITS)
    except LimitExceededError as exc:
        raise CliError(str(exc)) from None


def json_to_msgpack(text: str | None) -> bytes:
    """The msgpack encoding of the JSON document ``text`` (empty bytes for ``None``).

    Raises :class:`CliError` naming the position of a JSON syntax error, for
    ``NaN`` and ``Infinity`` (which Python's parser takes but JSON does not
    allow), and for a number msgpack cannot carry.
    """
    if text is None:
        return b""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise CliError(
            f"the payload is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            """quote it for the shell, e.g. '{"name": "ann"}'"""
        ) from None
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True)
    except OverflowError:
        raise CliError(
            "the payload holds an integer msgpack cannot carry: "
            "integers must fit in 64 bits (-2**63 to 2**64-1); send a big number as a string"
        ) from None
    return packed


def _refuse_constant(name: str) -> Any:
    raise CliError(
        f"the payload is not valid JSON: {name} is not a JSON number; send null or a string instead"
    )


def msgpack_to_json(data: bytes) -> str:
    """Render a reply payload for a terminal: its msgpack value as JSON.

    An empty payload is ``null``. Binary values inside it become text when
    they are UTF-8, else ``{"$base64": ...}``; a payload that is not msgpack
    at all is shown the same way.
    """
    if not data:
        return "null"
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # not msgpack: show the bytes themselves
        value = data
    return json.dumps(value, default=_json_default, ensure_ascii=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return {"$base64": base64.b64encode(raw).decode("ascii")}
    if isinstance(value, msgpack.ExtType):
        return {"$ext": value.code, "$base64": base64.b64encode(value.data).decode("ascii")}
    return repr(value)
