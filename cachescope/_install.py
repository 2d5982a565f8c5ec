"""Make an ``InstrumentedCache`` the process singleton, for cachescope and for labml_nn."""

from __future__ import annotations

import importlib
import importlib.util
import threading
from typing import Any

from . import _cache
from ._instrumented import InstrumentedCache

__all__ = ["install", "uninstall", "installed"]

_LABML_MODULE = "labml_nn.neox.utils.cache"
_lock = threading.Lock()
_state: dict[str, Any] | None = None   # what install() replaced, for uninstall()


def _labml_cache_module() -> Any:
    try:
        if importlib.util.find_spec("labml_nn") is None:
            return None
        return importlib.import_module(_LABML_MODULE)
    except Exception:  # labml_nn present but broken: instrument cachescope's singleton only
        return None


def install(cache: InstrumentedCache | None = None, **options: Any) -> InstrumentedCache:
    """Make ``cache`` (or a new ``InstrumentedCache(**options)``) the singleton that
    ``cachescope.get_cache()`` and, when importable, ``labml_nn.neox.utils.cache.get_cache()``
    return. Idempotent: while installed, returns the installed cache (and refuses a different one).
    """
    global _state
    with _lock:
        if _state is not None:
            current = _state["cache"]
            if cache is not None and cache is not current:
                raise RuntimeError(
                    f"cachescope is already installed with cache {current.name!r}; call "
                    "cachescope.uninstall() before installing another one")
            return current
        if cache is None:
            cache = InstrumentedCache(**options)
        elif options:
            raise TypeError("pass either a cache or options for a new one, not both")
        if not isinstance(cache, InstrumentedCache):
            raise TypeError(f"install() needs an InstrumentedCache, got {type(cache).__name__}")
        state: dict[str, Any] = {"cache": cache, "own": _cache.set_cache(cache)}
        labml = _labml_cache_module()
        if labml is not None:
            state["labml"] = labml
            state["labml_prev"] = getattr(labml, "_INSTANCE", None)
            labml._INSTANCE = cache
        _state = state
        return cache


def uninstall() -> None:
    """Restore the singletons ``install`` replaced. Idempotent."""
    global _state
    with _lock:
        if _state is None:
            return
        _cache.set_cache(_state["own"])
        labml = _state.get("labml")
        if labml is not None and getattr(labml, "_INSTANCE", None) is _state["cache"]:
            labml._INSTANCE = _state["labml_prev"]
        _state = None


def installed() -> InstrumentedCache | None:
    """The installed cache, or None."""
    return None if _state is None else _state["cache"]
