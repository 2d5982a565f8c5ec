"""``ReplayCache``: the pop-order checker driven by a recorded log instead of a live dict.

The live ``InstrumentedCache`` does each op on the seed's dict and tells the checker who did what;
this front end does the same from recorded, already attributed ops, keeping only the length of
each queue (the values were never recorded). Same checker, so the same violations, reports (op
numbers included) and run summary as the live run; sinks get the same events.
"""

from __future__ import annotations

from typing import Any, Callable

from ._accounting import Stats
from ._checker import PopOrderChecker
from ._owners import Attributor
from ._records import OpRecord, StepInfo, Violation
from ._report import format_run
from ._sinks import SinkSet
from ._values import Measure

__all__ = ["ReplayCache"]

_PLAIN = None   # the length of a key that holds a plain value


class ReplayCache:
    """Replays attributed ops through a ``PopOrderChecker``; reads like an ``InstrumentedCache``."""

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

    # ------------------------------------------------------------------ reading (as the live cache)
    @property
    def stats(self) -> Stats:
        return self._checker.stats

    @property
    def violations(self) -> list[Violation]:
        return self._checker.violations

    @property
    def state_key(self) -> Any:
        return self._checker.state_key

    @property
    def seq(self) -> int:
        return self._checker.seq

    @property
    def step(self) -> int:
        return self._checker.step_index

    @property
    def current_step(self) -> StepInfo | None:
        return self._checker.step

    def timeline(self) -> list[OpRecord]:
        return self._checker.timeline.records()

    def pending(self, name: Any) -> list[OpRecord]:
        return self._checker.pending(name)

    def family(self, name: Any) -> str:
        return self._checker.families(name)

    def report(self) -> str:
        return format_run(self)

    def add_sink(self, sink: Any) -> Any:
        self._sinks.add(sink)
        return sink

    @property
    def sinks(self) -> tuple[Any, ...]:
        return tuple(self._sinks.sinks)

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
        for v in violations:
            self._sinks.emit(self, "on_violation", v)

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
            self._step_started()

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

    # ------------------------------------------------------------------ steps
    def _step_started(self) -> None:
        checker = self._checker
        ended, checker.pending_step_end = checker.pending_step_end, None
        if ended is not None:
            self._sinks.emit(self, "on_step_end", ended)
        if checker.step is not None:
            self._sinks.emit(self, "on_step_start", checker.step)

    def mark_step(self, prev: Any = None, next: Any = None) -> None:  # noqa: A002
        for v in self._checker.mark_step(prev, next):
            self._sinks.emit(self, "on_violation", v)
        self._step_started()

    def end_step(self, tokens: int = 0) -> None:
        step = self._checker.end_step(tokens)
        if step is not None:
            self._sinks.emit(self, "on_step_end", step)

    def finish_generation(self, error: BaseException | None = None) -> None:
        violations, ended = self._checker.finish(error)
        for v in violations:
            self._sinks.emit(self, "on_violation", v)
        if ended is not None:
            self._sinks.emit(self, "on_step_end", ended)
        self._sinks.emit(self, "on_generation_end", {"error": error})
