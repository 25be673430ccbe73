"""Old import path of the demo service (now :mod:`clstr.cli.demo_app`), kept so
that ``clstr node --app clstr.demo_app:app`` goes on working."""

from __future__ import annotations

from .cli.demo_app import *  # noqa: F403 - the same names, re-exported
from .cli.demo_app import __all__ as __all__
