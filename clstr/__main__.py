"""``python -m clstr``: the ``clstr`` command (how ``clstr dev up`` starts its nodes)."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
