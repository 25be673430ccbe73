"""The version of clstr (one place: the package and what nodes announce read it)."""

from __future__ import annotations

from typing import Final

__version__: Final = "0.1.0"
