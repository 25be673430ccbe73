"""The ``clstr`` command (see docs/cli.md)."""

from __future__ import annotations

from ._main import ENV_VARS, build_parser, main

__all__ = ["ENV_VARS", "build_parser", "main"]
