"""cachescope: find out which layer got whose keys/values in a NeoX-style KV-cache decode loop."""

from ._cache import Cache, get_cache
from ._checker import KINDS, PopOrderError, Violation
from ._install import install, installed, uninstall
from ._instrumented import InstrumentedCache
from ._owners import WatchHandle, watch
from ._records import OpRecord, StepInfo

__version__ = "0.1.0"

__all__ = [
    "Cache",
    "InstrumentedCache",
    "KINDS",
    "OpRecord",
    "PopOrderError",
    "StepInfo",
    "Violation",
    "WatchHandle",
    "__version__",
    "get_cache",
    "install",
    "installed",
    "uninstall",
    "watch",
]
