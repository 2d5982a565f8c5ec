"""cachescope: find out which layer got whose keys/values in a NeoX-style KV-cache decode loop.

The public names below are imported on first use (PEP 562), so ``import cachescope`` (and the
pytest plugin that loads with it) does not import torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Cache": "._cache",
    "get_cache": "._cache",
    "KINDS": "._records",
    "PopOrderError": "._records",
    "Violation": "._records",
    "install": "._install",
    "installed": "._install",
    "uninstall": "._install",
    "InstrumentedCache": "._instrumented",
    "WatchHandle": "._owners",
    "watch": "._owners",
    "OpRecord": "._records",
    "StepInfo": "._records",
    "TensorPair": "._values",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from ._cache import Cache, get_cache
    from ._records import KINDS, PopOrderError, Violation
    from ._install import install, installed, uninstall
    from ._instrumented import InstrumentedCache
    from ._owners import WatchHandle, watch
    from ._records import OpRecord, StepInfo
    from ._values import TensorPair


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cachescope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
