"""The producer's identity: a stable id and an epoch that grows with every start.

Frame message ids are ``<id>.<epoch>.<shard>.<first>``. Within one run the
shard and event numbers make them unique, and JetStream's dedupe drops a
retried frame; across runs the epoch does: it is read from
``producer_nonce_path``, incremented and written back (atomically: a
temporary file, fsync, rename, fsync of the directory) *before* the bus
takes an event, so a restarted producer, whose event numbers start at 0
again, never repeats an id (which dedupe would silently drop). A running bus
holds an exclusive lock on ``<path>.lock``, so two live producers can never
share an id. A file that cannot be read is replaced by a new id (a new id
is as safe as a new epoch), with a warning.

Without a path the id is 16 random bytes per run (epoch 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import structlog

from ..errors import ConfigurationError

__all__ = ["ProducerIdentity"]

_log = structlog.get_logger("clstr.eventbus")


@dataclass(slots=True)
class ProducerIdentity:
    """A producer's id and epoch, and the lock that keeps them its own."""

    id: str
    epoch: int
    _lock_fd: int | None = None

    @property
    def prefix(self) -> str:
        """The prefix of every message id this producer writes: ``<id>.<epoch>``."""
        return f"{self.id}.{self.epoch}"

    @classmethod
    def ephemeral(cls) -> ProducerIdentity:
        """A random identity for one run."""
        return cls(secrets.token_hex(16), 0)

    @classmethod
    async def load(cls, path: str | os.PathLike[str]) -> ProducerIdentity:
        """Lock ``path``, read it (or start it), bump and persist the epoch.

        Raises :class:`~clstr.ConfigurationError` when another running bus holds
        the lock, or the file cannot be written.
        """
        return await asyncio.to_thread(cls._load, Path(path))

    @classmethod
    def _load(cls, path: Path) -> ProducerIdentity:
        import fcntl

        lock_path = path.with_name(path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigurationError(f"cannot open the producer lock {lock_path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigurationError(
                f"producer_nonce_path {path} is in use by another running bus; "
                "give each producer its own file"
            ) from None
        try:
            producer, epoch = cls._read(path)
            epoch += 1
            cls._write(path, producer, epoch)
        except BaseException:
            os.close(fd)
            raise
        _log.info("producer identity", path=str(path), producer=producer, epoch=epoch)
        return cls(producer, epoch, fd)

    @staticmethod
    def _read(path: Path) -> tuple[str, int]:
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            producer, epoch = state["producer"], state["epoch"]
            if not isinstance(producer, str) or not producer.isalnum():
                raise ValueError(f"bad producer id {producer!r}")
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"bad epoch {epoch!r}")
            return producer, epoch
        except FileNotFoundError:
            return secrets.token_hex(16), 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _log.warning(
                "unreadable producer nonce file: starting a new producer id",
                path=str(path),
                error=str(exc),
            )
            return secrets.token_hex(16), 0

    @staticmethod
    def _write(path: Path, producer: str, epoch: int) -> None:
        tmp = path.with_name(path.name + ".tmp")
        body = json.dumps({"producer": producer, "epoch": epoch}).encode()
        try:
            with open(tmp, "wb") as out:
                out.write(body)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            raise ConfigurationError(f"cannot persist the producer nonce at {path}: {exc}") from exc

    def release(self) -> None:
        """Give the lock back (the bus stopped)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
