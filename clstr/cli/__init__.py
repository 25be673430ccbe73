"""The ``clstr`` command (see docs/cli.md): a local cluster, requests from the
shell, the shard map, the live dashboard, production node processes, the
protocol's conformance cases.

::

    clstr dev up [--nodes 3]          nats-server + N node processes, until Ctrl-C
                                      (--dashboard: and the live dashboard)
    clstr demo [--once]               the same, sends requests, prints who answered and
                                      the shard map, serves until Ctrl-C with the
                                      dashboard (--once: exits)
    clstr request KEY TYPE [JSON]     send a request; print the reply and the node
    clstr notify KEY TYPE [JSON]      fire and forget
    clstr status [--json]             nodes, shard counts and the shard map
    clstr dashboard [--port 8470]     the live web dashboard of a cluster, until Ctrl-C
    clstr shard KEY                   the shard of a key (offline)
    clstr node --id ID --app M:ATTR   run one node process (production)
    clstr cordon|uncordon|drain ID    operations on a node with dynamic membership
    clstr conformance                 docs/protocol.md's cases against a live cluster
    clstr bench ...                   benchmarks (clstr.bench)
    clstr ledger serve|up|event|...   the credit ledger (docs/ledger.md)

Options shared by every command may come before or after it; each has an
environment variable (see :data:`ENV_VARS`) so containers configure it
without flags. Options may also come between the positional arguments of
``request`` and ``notify``. The CLI is the one place that configures logging
(the library never does). Exit codes: 0 success, 1 the operation failed (a
handler error, a timeout, shards without owner), 2 a usage or environment
error, told in one line on stderr; 141 (as if killed by SIGPIPE) when the
reader of its output went away, as in ``clstr status | head -1``.

How it is built: one module per command group, each with ``add_parser(sub,
env)`` (its commands and their arguments, made with ``_parser.add_command``,
which adds the cluster options and sets the command's ``run``) and
``run(args)`` (returns the exit code):

- ``_parser``: the top-level parser, the cluster options and their
  environment variables (:data:`ENV_VARS`), argument types, the lazily
  filled and intermixed ``Parser``;
- ``_main``: the registry ``COMMANDS``, :func:`build_parser` and
  :func:`main`, which runs the chosen command and reports its failure;
- ``_dev`` (dev up, demo; the cluster itself in ``_devcluster``),
  ``_request`` (request, notify), ``_status``, ``_dashboard`` (dashboard,
  and the one dev up and demo serve), ``_shard``, ``_node`` (with
  ``_app``, which loads ``--app``), ``_control`` (cordon, uncordon, drain),
  ``_conformance`` (imports :mod:`clstr.testing.conformance` only when
  used), ``_bench`` (imports :mod:`clstr.bench` only when used),
  ``_counter`` (the counters' commands), ``_ledger`` (the ledger's commands;
  its nodes and dev cluster in ``_ledger_serve``);
- shared: ``_common`` (CliError, exit codes, logging, JSON <-> msgpack),
  ``_connection`` (the NATS connection of the command line).

A new command group (``clstr counter ...``) is one new module with
``add_parser`` and ``run``, plus one line in ``_main.COMMANDS``. Its module
imports heavy things (nats-py, :mod:`clstr.testing`, ...) inside ``run``, so
that building the parser stays cheap for every command; an environment
variable it reads is listed in :data:`ENV_VARS` too.
"""

from __future__ import annotations

from ._main import build_parser, main
from ._parser import ENV_VARS

__all__ = ["ENV_VARS", "build_parser", "main"]
