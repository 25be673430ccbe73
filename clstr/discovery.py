"""Old import path of :mod:`clstr.observe`'s service discovery, kept so that
``from clstr.discovery import ServiceDiscovery`` goes on working."""

from __future__ import annotations

from .observe._discovery import *  # noqa: F403 - the same names, re-exported
from .observe._discovery import __all__ as __all__
