"""Connection settings of the NATS transport, and what its connect errors mean.

:class:`NatsOptions` is what :meth:`~clstr.transports.nats.NatsTransport.connect`
takes; the helpers below tell, while connecting, an error that retrying cannot
mend (refused credentials, a failed TLS handshake) from one it can.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

import nats.errors

__all__ = ["NatsOptions"]


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsOptions:
    """Connection settings for :meth:`NatsTransport.connect`.

    ``connect_deadline`` bounds the initial connection over all servers:
    past it (or at once on refused credentials or a TLS certificate that
    does not verify) ``connect`` raises :class:`~clstr.ConnectionFailedError`
    instead of retrying for minutes. Once connected, nats-py reconnects by
    itself: a lost server is detected when its socket closes (or after
    ``max_outstanding_pings`` unanswered pings ``ping_interval`` apart), and
    the next server in the list is tried, each one at most once per
    ``reconnect_time_wait`` seconds; meanwhile up to ``pending_size`` bytes of
    outgoing messages are buffered. See docs/reliability.md.

    Authentication: ``user``/``password``, ``token``, ``nkeys_seed`` (an
    nkey seed, ``SU...``, or the path of a file holding one) or
    ``credentials`` (the path of a ``.creds`` file: user JWT and seed). TLS:
    ``tls`` (an :class:`ssl.SSLContext`; use ``tls://`` URLs or a server that
    requires TLS). ``inbox_prefix`` sets the subjects replies come back on
    (``_INBOX`` by default); give each client user its own to restrict its
    permissions further (docs/security.md). With ``randomize_servers`` off,
    the servers are tried in the order given (a preferred server first).
    """

    name: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    credentials: str | None = None
    nkeys_seed: str | None = None
    tls: ssl.SSLContext | None = None
    tls_hostname: str | None = None
    connect_timeout: float = 2.0
    connect_deadline: float = 10.0
    allow_reconnect: bool = True
    reconnect_time_wait: float = 0.5
    max_reconnect_attempts: int = -1
    ping_interval: float = 20.0
    max_outstanding_pings: int = 2
    drain_timeout: float = 10.0
    pending_size: int = 2 * 1024 * 1024
    inbox_prefix: str = "_INBOX"
    randomize_servers: bool = True


def _is_auth_error(exc: BaseException) -> bool:
    """Whether the server refused the credentials (nats-py 2.16 reports the
    server's ``-ERR 'Authorization Violation'`` as a plain ``nats.errors.Error``)."""
    text = str(exc).lower()
    return (
        isinstance(exc, nats.errors.AuthorizationError)
        or "authorization violation" in text
        or "authentication" in text  # "Authentication Timeout", "... Authentication Expired"
    )


def _is_tls_error(exc: BaseException) -> bool:
    """Whether the TLS handshake failed for good (a certificate that does not
    verify, or TLS required by one side only): retrying cannot help."""
    return isinstance(exc, ssl.SSLCertVerificationError | ssl.SSLError) or (
        "tls" in str(exc).lower() and "required" in str(exc).lower()
    )


def _seed_options(seed: str) -> dict[str, str]:
    """nats-py takes an nkey seed as a file path or as the seed itself."""
    if os.path.isfile(seed):
        return {"nkeys_seed": seed}
    return {"nkeys_seed_str": seed}
