"""How a command connects to NATS: the connection settings of the command line
(credentials, TLS, deadline), and a connection that fails in one error line.

nats-py is imported only when a command connects, so that the commands that
never do (``shard``, ``--help``) start without it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ._common import CliError, quiet_logs

if TYPE_CHECKING:
    from ..transports.nats import NatsOptions, NatsTransport

__all__ = ["connect", "nats_options"]


@contextlib.asynccontextmanager
async def connect(args: argparse.Namespace) -> AsyncIterator[NatsTransport]:
    """A NATS connection made as the command line says, closed on exit.

    Raises :class:`CliError` when it cannot connect, saying where to find a cluster.
    """
    from ..errors import ConnectionFailedError
    from ..transports.nats import NatsTransport

    with contextlib.ExitStack() as stack:
        if args.log_level is None:
            # A command reports a connection that fails in its one error line; the
            # connection's own warnings (nats disconnected, ...) would only repeat it.
            stack.enter_context(quiet_logs())
        try:
            transport = await NatsTransport.connect(args.nats_url, nats_options(args, "clstr-cli"))
        except ConnectionFailedError as exc:
            raise CliError(
                f"{exc} (start a local cluster with 'clstr dev up', "
                "or set --nats-url / CLSTR_NATS_URL)"
            ) from None
        try:
            yield transport
        finally:
            await transport.close()


def nats_options(args: argparse.Namespace, name: str) -> NatsOptions:
    """The connection settings of the command line (credentials, TLS, deadline)."""
    from ..transports.nats import NatsOptions

    tls = None
    if args.tls_ca or args.tls_cert:
        import ssl

        try:
            tls = ssl.create_default_context(cafile=args.tls_ca)
            if args.tls_cert:
                tls.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise CliError(f"cannot load the TLS files: {exc}") from None
    for path, option in ((args.creds, "--creds"), (args.nkey_seed, "--nkey-seed")):
        if path and not os.path.isfile(path):
            raise CliError(f"{option} {path!r} is not a file")
    return NatsOptions(
        name=name,
        user=args.user,
        password=args.password,
        token=args.token,
        credentials=args.creds,
        nkeys_seed=args.nkey_seed,
        tls=tls,
        connect_deadline=args.connect_timeout,
    )
