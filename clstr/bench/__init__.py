"""Benchmarks: clstr against raw nats-py and bare asyncio, in the same run (``clstr bench``).

Every figure is a *ratio* to a baseline measured in the same run, on the same
nats-server, with the same process layout: on a small, shared machine the
absolute numbers drift from run to run, the ratios much less. Each run
measures both sides back to back (alternating which goes first), and a
row's ratio is the median of the per-run ratios. A benchmark is never a
timed unit test: ``--quick`` runs everything with tiny counts only to prove
that it works (see tests/test_bench.py).

The orchestrator runs no measured code: it starts a nats-server and worker
processes, and talks to each over a line protocol. Workers run
``_worker.py`` as a script, so that a raw nats-py worker never imports clstr;
hence every module here imports only the standard library and its siblings
at its top (see ``_worker.py``).

Modules:

- ``_command``: the options and a run, from options to report;
  ``_runner``: the orchestrator (stages, runs, the nats-server);
  ``_report``: rows, table, Markdown, plot, metadata.
- ``_group``: what a group and a stage are, and what they measure with;
  ``_registry``: every group, in table order; ``_specs``: rows and sizes.
- ``_children``, ``_protocol``, ``_worker``: worker processes, both ends;
  ``_timing``: how workers time; ``_profile``: profile summaries;
  ``_pairs``: stages of a node and a client process per side.
- The groups: ``_nats``, ``_entity_call``, ``_streams``, ``_counters``,
  ``_ledger`` and ``_senders`` (the edge client, tracing) (each a stage of
  node and client processes, ``_pairs``), ``_startup`` (its own processes);
  in the in-process stage (``_local.IN_PROCESS``): ``_memory_rr``,
  ``_hashing``, ``_keyhandler``, ``_eventbus`` (ingest), ``_ids``; in the
  in-process stage beside the nats-server (``_local.NEAR_NATS``):
  ``_interrupts``, ``_persisted``, ``_eventbus`` (into JetStream).

Adding a group: write one module holding its ``Spec`` s and how one run
measures them (worker-side code at the module's top level, importing clstr,
nats-py or anything optional inside its functions), and add the group to
``_registry.REGISTERED``. Measured in-process, it is an ``InProcessGroup``
(an ``op`` the shared worker runs, and a ``measure`` that sends it
commands; ``stage=NEAR_NATS`` when it talks to the nats-server, which runs
JetStream); with workers of its own, a ``Group`` in ``own_processes(...)``
(see ``_startup``), or in a stage of its own (``_pairs.pair_stage``: a node
and a client process per side, see ``_entity_call``). New counts go in
``Sizes`` (full and ``--quick``); ``--quick`` must run every group, with
counts small enough to prove only that it works.
"""

from __future__ import annotations

from ._command import add_arguments, main, run
from ._hashing import measure_hrw, measure_shard_for_key
from ._profile import summarise_profile
from ._registry import GROUPS, SPECS
from ._report import update_markdown
from ._timing import best_time

__all__ = [
    "add_arguments",
    "run",
    "main",
    "GROUPS",
    "SPECS",
    "best_time",
    "measure_shard_for_key",
    "measure_hrw",
    "summarise_profile",
    "update_markdown",
]
