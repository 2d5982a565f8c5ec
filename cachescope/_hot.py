"""The state ``InstrumentedCache`` shares with its C fast path (``_speedups.c``).

``InstrumentedCache`` keeps the values every op updates (op number, current step, the step's
pops, the seed's dict) on one object, ``cache._hot``: the C ``Hot`` when the extension is built
(CPython 3.11), else ``PyHot`` with the same attributes. With the extension, the class's ``push``,
``pop`` and ``get`` are C method descriptors (``install``): for an instance whose ``_hot`` is a
``Hot`` the common case of each op runs in C with no Python frame; every other case, and every
instance with a ``PyHot``, calls the Python method, which does all the work.

Set ``CACHESCOPE_PURE_PYTHON=1`` (or pass ``speedups=False``) to run without it.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Any

import torch

__all__ = ["AVAILABLE", "PyHot", "install", "make", "new_lock", "new_timeline", "queue_type"]

try:
    from . import _speedups
except ImportError:   # not built (no compiler at install time, another interpreter)
    _speedups = None  # type: ignore[assignment]

#: Whether the C fast path is built for this interpreter.
AVAILABLE = bool(getattr(_speedups, "AVAILABLE", 0))
_configured = False
_FAST_OPS = ("push", "pop", "get", "set", "end_step", "clear")   # FastOp kinds 0..5


class PyHot:
    """The pure-Python stand-in for ``_speedups.Hot``: the same attributes, no fast path."""

    __slots__ = ("cache_dict", "seq", "step", "step_index", "step_pops", "op_sinks", "step_sinks",
                 "full_measure", "enabled", "durations", "stats", "loop_ends_steps", "state_key")

    def __init__(self, cache_dict: dict[Any, Any] | None = None) -> None:
        self.cache_dict: dict[Any, Any] = {} if cache_dict is None else cache_dict
        self.seq = 0
        self.step: Any = None
        self.step_index = -1
        self.step_pops: set[Any] = set()
        self.op_sinks = 0
        self.step_sinks = 0
        self.full_measure = 1
        self.enabled = 0
        self.durations: Any = None   # the C path appends step durations here (unused in Python)
        self.stats: Any = None
        self.loop_ends_steps = 0
        self.state_key: Any = None

    def lookup(self, skip: int) -> None:
        """No fast attribution: the caller asks the ``Attributor``."""
        return None


def _disabled_by_env() -> bool:
    return os.environ.get("CACHESCOPE_PURE_PYTHON", "").strip().lower() not in ("", "0", "false", "no")


def _configure() -> None:
    global _configured
    if not _configured:
        from ._accounting import FamilyStats
        from ._owners import AttribState
        from ._records import OpRecord, StepInfo
        from ._values import Measure
        _speedups.configure(FamilyStats, StepInfo, AttribState, OpRecord, Measure,
                            torch.Tensor, torch.nn.Module)
        from ._layout import enable
        enable(_speedups)   # the raw tensor size reader, when its probe is certain
        _configured = True


def new_lock(speedups: bool = True) -> Any:
    """The cache's reentrant lock: one the C fast path takes without a Python call, when built."""
    if speedups and AVAILABLE and not _disabled_by_env():
        return _speedups.RLock()
    return threading.RLock()


def _c_structures(speedups: bool) -> bool:
    return speedups and AVAILABLE and not _disabled_by_env()


def new_timeline(maxlen: int, speedups: bool = True) -> Any:
    """The cache's timeline of recent ops: a ``_speedups.Timeline`` (a ring of compact entries,
    read as OpRecords) when the fast path may run, else a ``deque``. Both take the Python path's
    records through ``append``."""
    if _c_structures(speedups):
        _configure()
        return _speedups.Timeline(maxlen)
    return deque(maxlen=maxlen)


def queue_type(speedups: bool = True) -> Any:
    """The class of a live queue's provenance: ``_speedups.Queue`` or ``_records._Queue``."""
    if _c_structures(speedups):
        return _speedups.Queue
    from ._records import _Queue
    return _Queue


def make(cache: Any, speedups: bool = True) -> Any:
    """The shared-state object for ``cache`` (its structures must exist already): a ``Hot`` when
    the C path can serve this instance, else a ``PyHot``."""
    placeholder = cache._hot
    if not (speedups and AVAILABLE) or _disabled_by_env():
        return _carry(placeholder, PyHot(placeholder.cache_dict))
    from ._instrumented import InstrumentedCache
    from ._owners import _short_path
    from ._values import measure
    cls = type(cache)
    # A subclass that overrides an op, or the methods that implement one (the fast path does
    # their work without calling them), keeps its override and the Python path for every op.
    if any(getattr(cls, op) is not getattr(InstrumentedCache, op)
           for op in ("push", "pop", "get", "set", "end_step", "clear", "_push", "_pop", "_set",
                      "_clear", "_boundary", "_close_step", "_emit_step_start", "_record")):
        return _carry(placeholder, PyHot(placeholder.cache_dict))
    _configure()
    attributor = cache._attributor
    hot = _speedups.Hot(
        cache_dict=placeholder.cache_dict, queues=cache._queues,
        fs_memo=cache._fs_memo, timeline=cache._timeline, labels=attributor._labels,
        local=attributor._local, astate=attributor.state, lock=cache._lock,
        slow_push=_python_op(InstrumentedCache, "push"), slow_pop=_python_op(InstrumentedCache, "pop"),
        slow_get=_python_op(InstrumentedCache, "get"), slow_set=_python_op(InstrumentedCache, "set"),
        slow_end_step=_python_op(InstrumentedCache, "end_step"), fstats="_fstats", emit=cls._emit,
        measure=measure, short_path=_short_path)
    from ._families import MAX_LABEL_LEN, default_family
    families = cache._families
    hot.families_seen = families._families
    hot.default_families = int(families._fn is default_family and MAX_LABEL_LEN == 64
                                and getattr(families, "max_families", 0) > 0)
    hot.slow_clear = _python_op(InstrumentedCache, "clear")
    hot.cleared = cache._cleared
    return _carry(placeholder, hot)


def _carry(old: Any, new: Any) -> Any:
    """The values ``__init__`` stored on the placeholder before the real state object existed."""
    new.stats = old.stats
    new.loop_ends_steps = old.loop_ends_steps
    new.state_key = old.state_key
    return new


def _python_op(cls: type, name: str) -> Any:
    """The Python method behind ``cls.name`` (unwrapping the C descriptor)."""
    op = cls.__dict__[name]
    return op.__wrapped__ if _speedups is not None and type(op) is getattr(_speedups, "FastOp", None) else op


def install(cls: type) -> None:
    """Make ``cls.push/pop/get`` C method descriptors that run the fast path for instances whose
    ``_hot`` is a ``Hot`` and the Python methods otherwise (idempotent; no-op when unbuilt)."""
    if not AVAILABLE:
        return
    _speedups.set_hot_slot(cls, cls.__dict__["_hot"])   # where instances keep their _hot
    for kind, name in enumerate(_FAST_OPS):
        if type(cls.__dict__[name]) is not _speedups.FastOp:
            setattr(cls, name, _speedups.FastOp(kind, cls.__dict__[name]))
