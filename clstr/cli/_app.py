"""The handler a node runs, named on the command line as ``--app module:attr``."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from ..handlers import Handler, KeyHandler, Router
from ._common import CliError

__all__ = ["load_app"]


async def load_app(spec: str, node_id: str) -> Handler:
    """Import ``module:attr`` and return the handler it names.

    ``attr`` (dotted paths allowed) is a handler (a :class:`~clstr.Router`,
    :class:`~clstr.KeyHandler` or any ``async (Envelope) -> bytes | None``
    callable) or a factory that returns one: a callable with no required
    argument, or one with a ``node_id`` parameter, which gets this node's id.
    A factory may be ``async``. Raises :class:`CliError` saying what is wrong.
    """
    obj = _resolve(spec)
    handler = obj
    if not isinstance(obj, Router | KeyHandler):
        factory_kwargs = _factory_kwargs(obj, node_id)
        if factory_kwargs is not None:
            try:
                handler = obj(**factory_kwargs)
                if inspect.isawaitable(handler):
                    handler = await handler
            except Exception as exc:
                raise CliError(
                    f"the --app factory {spec!r} raised {type(exc).__name__}: {exc}"
                ) from None
    if not callable(handler):
        raise CliError(
            f"--app {spec!r} is a {type(handler).__name__}, not a handler: name an async "
            "callable (Envelope) -> bytes, a Router, a KeyHandler, or a factory of one"
        )
    checked: Handler = handler
    return checked


def _resolve(spec: str) -> Any:
    """The object ``module:attr`` names (``attr`` may be dotted)."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise CliError(f"--app must be 'module:attr' (e.g. clstr.demo_app:app), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise CliError(
                f"cannot import {module_name!r} for --app: no such module; "
                "check the name and that it is on PYTHONPATH"
            ) from None
        raise CliError(f"importing {module_name!r} for --app failed: {exc}") from None
    except Exception as exc:
        raise CliError(
            f"importing {module_name!r} for --app failed: {type(exc).__name__}: {exc}"
        ) from None
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    return obj


def _factory_kwargs(obj: Any, node_id: str) -> dict[str, str] | None:
    """How to call ``obj`` as a factory, or ``None`` when it is a handler itself."""
    if isinstance(obj, type):
        return {}
    if not callable(obj):
        return None
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return None
    if "node_id" in params:
        return {"node_id": node_id}
    required = [
        p
        for p in params.values()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return {} if not required else None
