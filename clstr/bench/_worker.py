"""A worker process of ``clstr bench``: ``python -P _worker.py ROLE CONFIG``.

The orchestrator runs no measured code: it spawns this file once per worker
process, as a *script* rather than with ``-m clstr.bench``, so that a raw
nats-py worker never imports clstr (its memory and start-up are nats-py's
alone). So this script imports only the standard library, and loads the
other modules of its directory as a package of their own (``_clstr_bench``),
which lets their relative imports work without ``clstr/__init__.py``
running. Every module of clstr/bench/ but ``__init__`` and ``__main__``
therefore imports only the standard library and its siblings at its top;
clstr, nats-py and the optional packages (uvloop, pyinstrument) are imported
where they are used (tests/test_bench.py checks it).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Final

#: The name this directory's modules are loaded under in a worker.
PACKAGE: Final = "_clstr_bench"


def load(module: str) -> ModuleType:
    """The module ``module`` (``_nats``, ...) of this directory, as ``_clstr_bench.<module>``."""
    if PACKAGE not in sys.modules:
        spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [os.path.dirname(os.path.abspath(__file__))]
        sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"{PACKAGE}.{module}")


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    # The orchestrator has checked that uvloop is there before it spawned us.
    if not use_uvloop:
        return None
    uvloop = importlib.import_module("uvloop")
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_worker(role: str, cfg: dict[str, Any], *, use_uvloop: bool, profile: str | None) -> int:
    """Run the role ``role`` (a ``module:function`` reference) until its stdin closes.

    With ``profile`` (a file stem), the worker profiles itself with pyinstrument
    and writes ``<stem>.txt`` (call tree), ``<stem>.collapsed`` (stacks, in
    microseconds) and ``<stem>.top.txt`` (a summary by layer and function).
    """
    main_coroutine = load("_protocol").resolve(role)
    profiler: Any = None
    if profile:
        pyinstrument = importlib.import_module("pyinstrument")
        # async_mode="disabled": sample whatever the main thread runs, loop included.
        profiler = pyinstrument.Profiler(interval=0.001, async_mode="disabled")
        profiler.start()
    try:
        with asyncio.Runner(loop_factory=_loop_factory(use_uvloop)) as runner:
            runner.run(main_coroutine(cfg))
    finally:
        if profiler is not None:
            profiler.stop()
            profiles = load("_profile")
            stem = Path(profile or role)
            stem.with_suffix(".txt").write_text(
                profiler.output_text(unicode=True, show_all=False), encoding="utf-8"
            )
            collapsed = profiles.collapse(profiler.last_session.root_frame(trim_stem=False))
            stem.with_suffix(".collapsed").write_text(collapsed, encoding="utf-8")
            stem.with_suffix(".top.txt").write_text(profiles.summarise_profile(collapsed), "utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse a worker's command line (see the orchestrator's ``Child``) and run it."""
    parser = argparse.ArgumentParser(prog="clstr bench worker")
    parser.add_argument("role", help="the worker's role, as module:function")
    parser.add_argument("config", help="the role's configuration, as JSON")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--profile", metavar="STEM")
    args = parser.parse_args(argv)
    config = json.loads(args.config)
    return run_worker(args.role, config, use_uvloop=args.uvloop, profile=args.profile)


if __name__ == "__main__":
    raise SystemExit(main())
