"""What every front end over a ``PopOrderChecker`` shares: the read API, the sink set, and the
events of steps and generations.

Two front ends feed the checker: ``InstrumentedCache`` (the seed's dict, live) and
``ReplayCache`` (a recorded log). Each sets ``_checker``, ``_sinks`` and ``_lock`` (an RLock) in
its ``__init__``; what differs between them (the ops themselves, how counters are read) they
define themselves.
"""

from __future__ import annotations

from typing import Any

from ._accounting import Stats
from ._checker import PopOrderChecker
from ._records import OpRecord, StepInfo, Violation, strict_error
from ._report import format_run
from ._sinks import SinkSet

__all__ = ["CheckerFront"]


class CheckerFront:
    """The read API and step/generation events of a front end over a ``PopOrderChecker``."""

    _checker: PopOrderChecker
    _sinks: SinkSet
    _lock: Any
    _generation: dict[str, Any] | None = None
    strict = False

    # ------------------------------------------------------------------ what the checker holds
    @property
    def stats(self) -> Stats:
        """Counters by queue family plus decode-loop totals (read by the exporters)."""
        with self._lock:
            return self._checker.stats

    @property
    def violations(self) -> list[Violation]:
        """The violations kept so far (at most ``max_violations``; all are counted)."""
        return self._checker.violations

    @property
    def state_key(self) -> Any:
        """The key whose ``set`` marks a step boundary (labml: 'state_ids')."""
        return self._checker.state_key

    @state_key.setter
    def state_key(self, value: Any) -> None:
        self._checker.state_key = value

    @property
    def max_violations(self) -> int:
        return self._checker.max_violations

    @max_violations.setter
    def max_violations(self, value: int) -> None:
        self._checker.max_violations = value

    @property
    def seq(self) -> int:
        """Number of the last op recorded (ops are numbered from 1; ``get`` is counted, not numbered)."""
        return self._checker.seq

    @property
    def step(self) -> int:
        """Index of the current decode step (-1 before the first boundary)."""
        return self._checker.step_index

    @property
    def current_step(self) -> StepInfo | None:
        return self._checker.step

    @property
    def timeline_size(self) -> int:
        return self._checker.timeline.maxlen

    def timeline(self) -> list[OpRecord]:
        """The most recent ops (bounded ring buffer), oldest first."""
        with self._lock:
            return self._checker.timeline.records()

    def ops_since(self, seq: int) -> tuple[int, list[OpRecord]]:
        """``(first, records)``: the ops numbered above ``seq`` that the ring still holds, oldest
        first; ``first`` is the number of the oldest of them (``first > seq + 1``: the ring wrapped
        and ``first - seq - 1`` ops are gone)."""
        with self._lock:
            return self._checker.timeline.since(seq)

    def pending(self, name: Any) -> list[OpRecord]:
        """Push records of the items still queued under ``name`` (who pushed them, when)."""
        with self._lock:
            return self._checker.pending(name)

    def family(self, name: Any) -> str:
        """The bounded family label of a queue name (``attn_kv_17`` -> ``attn_kv``)."""
        return self._checker.families(name)

    def report(self) -> str:
        """Whole-run summary: ops, depth and byte peaks, violations."""
        with self._lock:
            return format_run(self)

    # ------------------------------------------------------------------ sinks
    def add_sink(self, sink: Any) -> Any:
        """Send this cache's steps, violations and generations (and ops, to a sink with
        ``on_op``) to ``sink``; see ``cachescope._sinks`` for the interface."""
        with self._lock:
            self._sinks.add(sink)
        return sink

    def remove_sink(self, sink: Any) -> None:
        with self._lock:
            self._sinks.remove(sink)

    @property
    def sinks(self) -> tuple[Any, ...]:
        return tuple(self._sinks.sinks)

    def add_violation(self, violation: Violation) -> Violation:
        """Record a violation found outside this cache's own checks (``cachescope.distributed``
        compares ranks on a watcher thread): counted, kept, and sent to the sinks like the
        cache's own. Never raises into the caller, also in strict mode (the decode loop that
        broke the rule may be another process)."""
        with self._lock:
            self._checker.keep(violation)
        self._sinks.emit(self, "on_violation", violation)
        return violation

    def _emit_violations(self, violations: list[Violation]) -> None:
        for v in violations:
            self._sinks.emit(self, "on_violation", v)

    def _emit_step_start(self) -> None:
        """A boundary opened a step: the step it closed ends, the new one starts."""
        checker = self._checker
        ended, checker.pending_step_end = checker.pending_step_end, None
        if ended is not None:
            self._sinks.emit(self, "on_step_end", ended)
        step = checker.step
        if step is not None:
            self._sinks.emit(self, "on_step_start", step)

    # ------------------------------------------------------------------ steps
    def mark_step(self, prev: Any = None, next: Any = None) -> None:  # noqa: A002 - labml's naming
        """Mark a step boundary explicitly (for loops that do not set ``state_ids``)."""
        with self._lock:
            violations = self._checker.mark_step(prev, next)
        self._emit_violations(violations)
        self._emit_step_start()
        if violations and self.strict:
            raise strict_error(violations[0])

    def end_step(self, tokens: int = 0) -> None:
        """Close the current step (the decode loop calls this after its forward)."""
        with self._lock:
            step = self._checker.end_step(tokens)
        if step is not None:
            self._sinks.emit(self, "on_step_end", step)

    def finish_generation(self, error: BaseException | None = None) -> None:
        """The end of a generation: a clean end checks the last step for leftovers."""
        with self._lock:
            violations, ended = self._checker.finish(error)
            info = dict(self._generation or {})
            self._generation = None
        self._emit_violations(violations)
        if ended is not None:
            self._sinks.emit(self, "on_step_end", ended)
        info["error"] = error
        self._sinks.emit(self, "on_generation_end", info)
