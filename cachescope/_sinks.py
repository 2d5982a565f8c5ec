"""Sinks: the small interface through which exporters attach to a cache from outside.

A sink is any object with some of these methods, each called with the cache first:

    on_step_start(cache, step)         a step boundary opened ``step`` (a ``StepInfo``)
    on_step_end(cache, step)           ``step`` closed (``end_step``, the next boundary, or the
                                       end of a generation)
    on_violation(cache, violation)     after the op that broke the rule
    on_generation_start(cache, info)   ``cache.generation(**info)`` began
    on_generation_end(cache, info)     ... ended (``info['error']``: the exception, or None)
    on_op(cache, record)               every op as an ``OpRecord`` (opt-in and costly: only a
                                       recorder needs it; readers that can wait use
                                       ``cache.ops_since(seq)`` at step time instead)

A sink that sets ``needs_values = True`` gets value summaries (shapes, dtypes, devices) in the
records it reads. Sinks are called outside the cache's lock; a sink that raises is logged once
and counted (``cachescope_telemetry_errors_total``), never raised into the decode loop.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

__all__ = ["EVENTS", "SinkSet"]

log = logging.getLogger("cachescope")

EVENTS = ("on_op", "on_violation", "on_step_start", "on_step_end", "on_generation_start",
          "on_generation_end")


class SinkSet:
    """The sinks of one cache, with a tuple of bound methods per event (rebuilt on change)."""

    __slots__ = ("sinks", "by_event", "op", "needs_values", "_count_error", "_failed")

    def __init__(self, count_error: Callable[[str], None]) -> None:
        self.sinks: list[Any] = []
        self.by_event: dict[str, tuple[tuple[Any, Callable[..., None]], ...]] = {
            ev: () for ev in EVENTS}
        self.op: tuple[tuple[Any, Callable[..., None]], ...] = ()   # by_event['on_op'], hot
        self.needs_values = False
        self._count_error = count_error
        self._failed: set[tuple[int, str]] = set()

    def add(self, sink: Any) -> bool:
        if any(s is sink for s in self.sinks):
            return False
        self.sinks.append(sink)
        self._rebuild()
        return True

    def remove(self, sink: Any) -> bool:
        for i, s in enumerate(self.sinks):
            if s is sink:
                del self.sinks[i]
                self._rebuild()
                return True
        return False

    def _rebuild(self) -> None:
        by_event = {}
        for ev in EVENTS:
            pairs = []
            for s in self.sinks:
                try:
                    fn = getattr(s, ev, None)
                except Exception:   # a property that raises: the sink does not get this event
                    self.failed(s, ev)
                    fn = None
                if callable(fn):
                    pairs.append((s, fn))
            by_event[ev] = tuple(pairs)
        self.by_event = by_event
        self.op = by_event["on_op"]
        needs = False
        for s, _ in self.op:
            try:
                needs = needs or bool(getattr(s, "needs_values", False))
            except Exception:
                self.failed(s, "needs_values")
        self.needs_values = needs

    def emit(self, cache: Any, event: str, *args: Any) -> None:
        for sink, fn in self.by_event[event]:
            try:
                fn(cache, *args)
            except Exception:
                self.failed(sink, event)

    def failed(self, sink: Any, event: str) -> None:
        """Count a sink's failure; log it the first time (per sink and event)."""
        name = type(sink).__name__
        try:
            self._count_error(name)
        except Exception:  # pragma: no cover - counting is a dict update
            pass
        key = (id(sink), event)
        if key not in self._failed:
            self._failed.add(key)
            log.warning("cachescope: sink %s failed in %s; the decode loop continues and further "
                        "failures of this sink are counted in cachescope_telemetry_errors_total",
                        name, event, exc_info=True)
