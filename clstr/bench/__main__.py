"""``python -m clstr.bench``: the same as ``clstr bench``."""

from __future__ import annotations

from . import main

raise SystemExit(main())
