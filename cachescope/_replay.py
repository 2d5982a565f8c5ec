"""``ReplayCache``: the pop-order checker driven by a recorded log instead of a live dict.

The live ``InstrumentedCache`` does each op on the seed's dict and tells the checker who did what;
this front end does the same from recorded, already attributed ops, keeping only the length of
each queue (the values were never recorded). Same checker, so the same violations, reports (op
numbers included) and run summary as the live run; sinks get the same events.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from ._checker import PopOrderChecker
from ._frontend import CheckerFront
from ._owners import Attributor
from ._records import Violation
from ._sinks import SinkSet
from ._values import Measure

__all__ = ["ReplayCache"]

_PLAIN = None   # the length of a key that holds a plain value


class ReplayCache(CheckerFront):
    """Replays attributed ops through a ``PopOrderChecker``; reads like an ``InstrumentedCache``
    (the read API, ``mark_step``, ``end_step`` and ``finish_generation`` are ``CheckerFront``'s)."""

    def __init__(self, *, name: str = "default", family: Callable[[Any], str] | None = None,
                 timeline_size: int = 256, max_violations: int = 1000,
                 state_key: Any = "state_ids") -> None:
        self.name = name
        self.attributor = Attributor("off")
        self._lengths: dict[Any, int | None] = {}
        self._checker = PopOrderChecker(
            name=name, family=family, timeline_size=timeline_size, max_violations=max_violations,
            state_key=state_key, same_owner=self.attributor.same_owner)
        self._sinks = SinkSet(self._count_error)
        self._lock = threading.RLock()

    def _count_error(self, sink_name: str) -> None:
        errors = self.stats.telemetry_errors
        errors[sink_name] = errors.get(sink_name, 0) + 1

    # ------------------------------------------------------------------ position in the log
    def start_at(self, seq: int, step: int) -> None:
        """The recording began at op ``seq + 1`` in step ``step`` of the live cache."""
        self._checker.seq = seq
        self._checker.step_index = step

    def sync(self, seq: int) -> None:
        """The next op the checker records gets number ``seq + 1`` (gaps in a log)."""
        self._checker.seq = seq

    # ------------------------------------------------------------------ ops
    def _op_done(self, violations: list[Violation]) -> None:
        if self._sinks.op:
            rec = self._checker.timeline.last()
            if rec is not None:
                self._sinks.emit(self, "on_op", rec)
        self._emit_violations(violations)

    def push(self, name: Any, owner: str | None, site: str | None, value: Measure) -> None:
        existed = name in self._lengths
        depth = (self._lengths.get(name) or 0) + 1
        self._lengths[name] = depth
        self._checker.push(name, owner, site, existed, depth, value.logical, value.storage,
                           value.storages, value)
        self._op_done([])

    def pop(self, name: Any, owner: str | None, site: str | None) -> Violation | None:
        """Replay a pop; returns its violation (also for a pop of a missing or empty queue)."""
        if name not in self._lengths:
            v: Violation | None = self._checker.pop_failed("pop_missing", name, owner, site)
        else:
            depth = self._lengths[name]
            if depth is _PLAIN:
                return None   # the live cache raised the value's own error and recorded nothing
            if depth == 0:
                v = self._checker.pop_failed("pop_empty", name, owner, site)
            else:
                self._lengths[name] = depth - 1
                v = self._checker.pop(name, owner, site, depth - 1)
        self._op_done([v] if v is not None else [])
        return v

    def set(self, key: Any, value: Any, owner: str | None, site: str | None) -> None:
        """Replay a set: ``value`` is the recorded state value, a list for a queue (its length
        is what counts), or anything else for a plain value."""
        old = self._lengths.get(key)
        new = len(value) if type(value) is list else _PLAIN
        self._lengths[key] = new
        violations = self._checker.set(key, owner, site, old, new, value)
        self._op_done(violations)
        if type(key) is str and key == self._checker.state_key:
            self._emit_step_start()

    def clear(self, key: Any, owner: str | None, site: str | None) -> bool:
        """Replay a clear; False when the key is unknown (an inconsistent log)."""
        if key not in self._lengths:
            return False
        old = self._lengths.pop(key)
        self._checker.clear(key, owner, site, old)
        self._op_done([])
        return True

    def clear_all(self, owner: str | None, site: str | None) -> None:
        self._lengths = {}
        self._checker.clear_all(owner, site)
        self._op_done([])
