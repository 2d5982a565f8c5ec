"""``InstrumentedCache``: the seed's cache, plus who made each op, the pop-order checker, counters
and a bounded op ring. Same return values and exception types as ``Cache`` for every call.

Each op does the seed's work on the seed's dict, then tells the checker (``_checker``) who did
what; exporters (``metrics.export``, ``tracing.trace``, ``record.Recorder``) attach from outside
as sinks (``_sinks``) and read counters at scrape time and ops at step time.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from typing import Any, Callable, Iterator

from ._cache import Cache
from ._checker import PopOrderChecker
from ._frontend import CheckerFront
from ._accounting import Stats
from ._owners import Attributor
from ._records import Violation, strict_error
from ._sinks import SinkSet
from ._values import measure, measure_bytes

__all__ = ["InstrumentedCache"]

#: Called with every new ``InstrumentedCache`` at the end of its ``__init__`` (``cachescope.testing``
#: uses it to find the caches a test created, for the pytest plugin's strict mode).
_on_create: list[Callable[["InstrumentedCache"], None]] = []

def on_create(hook: Callable[["InstrumentedCache"], None]) -> None:
    """Call ``hook(cache)`` with every ``InstrumentedCache`` created from now on (idempotent per
    hook; ``cachescope.testing`` finds the caches a test made this way)."""
    if hook not in _on_create:
        _on_create.append(hook)


_MISSING = object()
_live: "weakref.WeakSet[InstrumentedCache]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child gets fresh locks: one held by another thread at fork() is never released
    in the child (that thread does not exist there)."""
    for cache in list(_live):
        cache._lock = threading.RLock()
        cache.attributor.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class InstrumentedCache(Cache, CheckerFront):
    """A drop-in ``Cache`` that checks pop order and counts every op for metrics and traces.

    Keyword options:
      name: label of this cache in metrics, traces and reports (default: 'default', or
        'default-2', 'default-3', ... while an earlier unnamed cache is still exported to the
        same registry; an explicit name that is taken raises ValueError).
      registry: Prometheus ``CollectorRegistry`` to export to (default: cachescope's own
        registry, ``cachescope.metrics.REGISTRY``; never the global one). ``metrics=False`` disables.
      tracer_provider: OpenTelemetry ``TracerProvider`` (default: the global one from the API,
        a no-op unless the application configured the SDK). ``tracing=False`` disables.
      strict: raise ``PopOrderError`` at the first violation instead of recording it.
      family: callable mapping a queue name to its family label (default strips numeric ids).
      attribution: 'auto' (watch() hooks, else a short stack walk), 'stack', or 'off'.
      timeline_size: ops kept in the ring buffer for reports.
      max_violations: violations kept in ``cache.violations`` (all are counted).
      state_key: the key whose ``set`` marks a step boundary (labml: 'state_ids').
      const_labels: constant Prometheus labels, e.g. ``{'rank': '0'}``.
    """

    def __init__(self, *, name: str | None = None, registry: Any = None, tracer_provider: Any = None,
                 strict: bool = False, family: Callable[[Any], str] | None = None,
                 attribution: str = "auto", timeline_size: int = 256, max_violations: int = 1000,
                 state_key: str = "state_ids", const_labels: dict[str, str] | None = None,
                 metrics: bool = True, tracing: bool = True, speedups: Any = None) -> None:
        if speedups is not None:
            warnings.warn("InstrumentedCache(speedups=...) has no effect: cachescope no longer has "
                          "a C fast path (one pure-Python core on every CPython); drop the argument",
                          DeprecationWarning, stacklevel=2)
        super().__init__()
        self.name = "default" if name is None else str(name)
        self.strict = strict
        self.attributor = Attributor(attribution)
        self._lookup = self.attributor.lookup
        self._lock = threading.RLock()
        # The checker and the sinks reach back to this cache through a weak reference: no
        # reference cycle, so a dropped cache is freed at once, without the cyclic GC.
        ref = weakref.ref(self)
        self._checker = PopOrderChecker(
            name=self.name, family=family, timeline_size=timeline_size,
            max_violations=max_violations, state_key=state_key, peek=_peeker(ref),
            same_owner=self.attributor.same_owner)
        self._sinks = SinkSet(_error_counter(ref))
        self._generation: dict[str, Any] | None = None
        self.metrics: Any = None
        self.tracer: Any = None
        _live.add(self)
        if metrics:
            from . import metrics as _metrics
            for n in range(2, 10_000):
                try:
                    self.metrics = _metrics.export(self, registry=registry,
                                                   const_labels=const_labels, on_error="log")
                    break
                except _metrics.CacheNameTaken:
                    if name is not None:
                        raise  # an explicit name that is taken is the caller's to fix
                    self.name = self._checker.name = f"default-{n}"
        if tracing:
            from . import tracing as _tracing
            self.tracer = _tracing.trace(self, tracer_provider=tracer_provider, on_error="log")
        for hook in _on_create:
            hook(self)

    @property
    def speedups_active(self) -> bool:
        """Always False: there is no C fast path any more (kept for code that asks)."""
        return False

    # ------------------------------------------------------------------ what the checker holds
    @property
    def stats(self) -> Stats:
        """Counters by queue family plus decode-loop totals (read by the exporters). Reading
        them re-measures the items queued now (a storage may have been resized in place)."""
        with self._lock:
            self._checker.refresh_held(self._cache.get)
            return self._checker.stats

    def queues(self) -> dict[Any, int]:
        """The length of every queue that holds items now, by name."""
        with self._lock:
            return {name: len(v) for name, v in self._cache.items() if type(v) is list and v}

    def bookkeeping(self) -> dict[str, int]:
        """Sizes of the structures the instrumentation keeps (queue provenance, the op ring,
        memos, per-step sets, module labels): each is bounded, whatever the run's length."""
        with self._lock:
            sizes = self._checker.sizes()
        sizes["labels"] = self.attributor.size()
        return sizes

    def same_owner(self, a: str, b: str) -> bool:
        """Whether two owner labels name the same module (a label may predate ``watch()``)."""
        return self.attributor.same_owner(a, b)

    def stats_snapshot(self) -> Stats:
        """A copy of ``stats`` taken under the lock (for exporters on other threads)."""
        with self._lock:
            self._checker.refresh_held(self._cache.get)
            return self._checker.stats.copy()

    @contextlib.contextmanager
    def owner(self, name: str) -> Iterator[None]:
        """Attribute the ops made in the ``with`` block (on this thread) to ``name``: for code
        whose owners are not ``nn.Module``s, or to name one explicitly."""
        with self.attributor.acting_as(name):
            yield

    # ------------------------------------------------------------------ sinks
    def _emit_op(self) -> None:
        """Give the last op to the sinks that want every op."""
        with self._lock:
            rec = self._checker.timeline.last()
        if rec is not None:
            self._sinks.emit(self, "on_op", rec)

    # ------------------------------------------------------------------ queue ops
    def push(self, name: str, value: Any, by: tuple[str | None, str | None] | None = None) -> None:
        """The seed's ``push``; ``by``: as for ``pop_push``."""
        if by is not None:
            owner, site = by
        else:
            try:
                owner, site = self._lookup(1)
            except Exception:
                owner = site = None
        sinks = self._sinks
        if sinks.needs_values:
            m = measure(value)
            logical, storage, storages = m.logical, m.storage, m.storages
        else:
            m = None
            logical, storage, storages = measure_bytes(value)
        with self._lock:
            cache = self._cache
            queue = cache.get(name, _MISSING)
            if queue is _MISSING:                 # the seed's push
                queue = cache[name] = []
                existed = False
            else:
                existed = True
            queue.append(value)
            self._checker.push(name, owner, site, existed,
                               len(queue) if type(queue) is list else None, logical, storage,
                               storages, m)
        if sinks.op:
            self._emit_op()

    def pop(self, name: str) -> Any:
        try:
            owner, site = self._lookup(1)
        except Exception:
            owner = site = None
        with self._lock:
            cache = self._cache
            try:
                queue = cache[name]
                value = queue.pop(0)              # the seed's pop
            except KeyError as exc:
                if name in cache:
                    raise  # a plain value that happens to be a dict: the seed's own error
                failed, error = self._checker.pop_failed("pop_missing", name, owner, site), exc
            except IndexError as exc:
                if type(cache.get(name)) is not list:
                    raise
                failed, error = self._checker.pop_failed("pop_empty", name, owner, site), exc
            else:
                # a plain value with its own pop() (a dict...) is not a queue and may have no len()
                violation = self._checker.pop(name, owner, site,
                                              len(queue) if type(queue) is list else None, value)
                failed = None
        if failed is not None:
            self._after_failed_pop(failed, error)   # raises the seed's error
        if self._sinks.op:
            self._emit_op()
        if violation is not None:
            self._sinks.emit(self, "on_violation", violation)
            if self.strict:
                raise strict_error(violation)
        return value

    def pop_push(self, pop_name: str, push_name: str, value: Any,
                 by: tuple[str | None, str | None] | None = None) -> Any:
        """``pop(pop_name)`` then ``push(push_name, value)`` as one call: the same two ops, checks,
        counters and records (the popped item is returned, a failed pop raises as ``pop`` does and
        pushes nothing), with one owner lookup and one lock for both. For front ends where one
        call of the model's cache stands for both ops (``cachescope.hf``: a layer's ``update``).
        ``by``: the ``(owner, site)`` that ``attributor.lookup`` gave where the model made the
        call, for a front end that applies the ops later (default: looked up here)."""
        if by is not None:
            owner, site = by
        else:
            try:
                owner, site = self._lookup(1)
            except Exception:
                owner = site = None
        sinks = self._sinks
        if sinks.needs_values:
            m = measure(value)
            logical, storage, storages = m.logical, m.storage, m.storages
        else:
            m = None
            logical, storage, storages = measure_bytes(value)
        with self._lock:
            popped, violation, failed, popped_rec = self._pop_push_locked(
                pop_name, push_name, value, owner, site, logical, storage, storages, m,
                bool(sinks.op))
        if failed is not None:
            self._after_failed_pop(*failed)       # raises the seed's error
        if sinks.op:
            if popped_rec is not None:
                sinks.emit(self, "on_op", popped_rec)
            self._emit_op()
        if violation is not None:
            sinks.emit(self, "on_violation", violation)
            if self.strict:
                raise strict_error(violation)
        return popped

    def _pop_push_locked(self, pop_name: str, push_name: str, value: Any, owner: str | None,
                         site: str | None, logical: int, storage: int, storages: Any, m: Any,
                         pop_record: bool) -> tuple[Any, Any, Any, Any]:
        """``pop_push``'s two ops on the seed's dict and the checker, under the cache's lock:
        ``(popped, violation, failed, popped_record)``; ``failed`` is ``(the pop's violation, the
        seed's error)`` when the pop failed (then nothing was pushed); ``popped_record`` (with
        ``pop_record``) is the pop's ``OpRecord``, for sinks that see every op."""
        cache, checker = self._cache, self._checker
        try:
            queue = cache[pop_name]
            popped = queue.pop(0)                 # the seed's pop
        except KeyError as exc:
            if pop_name in cache:
                raise
            return None, None, (checker.pop_failed("pop_missing", pop_name, owner, site), exc), None
        except IndexError as exc:
            if type(cache.get(pop_name)) is not list:
                raise
            return None, None, (checker.pop_failed("pop_empty", pop_name, owner, site), exc), None
        violation = checker.pop(pop_name, owner, site, len(queue) if type(queue) is list else None,
                                popped)
        popped_rec = checker.timeline.last() if pop_record else None
        target = cache.get(push_name, _MISSING)
        if target is _MISSING:                    # the seed's push
            target = cache[push_name] = []
            existed = False
        else:
            existed = True
        target.append(value)
        checker.push(push_name, owner, site, existed, len(target) if type(target) is list else None,
                     logical, storage, storages, m)
        return popped, violation, None, popped_rec

    def pop_push_many(self, ops: Any) -> None:
        """``pop_push(pop_name, push_name, value, by)`` for each ``(pop_name, push_name, value,
        by)`` of ``ops``, in order: the same ops, checks, counters, records and violations as
        those calls, under one lock acquisition (``by`` as for ``pop_push``; None: the caller of
        this method). For a front end that applies a forward's worth of ops at once
        (``cachescope.hf``). A failed pop raises as ``pop_push`` does, after the ops before it
        took effect; in strict mode the first violation raises and the ops after it are not made.
        Returns nothing (the popped items are dropped)."""
        sinks = self._sinks
        if sinks.op or sinks.needs_values:        # sinks that see each op: one call per op
            for pop_name, push_name, value, by in ops:
                self.pop_push(pop_name, push_name, value, by)
            return
        locked = self._pop_push_locked
        found: list[Violation] = []
        failed = None
        default_by = None
        with self._lock:
            for pop_name, push_name, value, by in ops:
                if by is None:
                    if default_by is None:
                        try:
                            default_by = self._lookup(1)
                        except Exception:
                            default_by = (None, None)
                    by = default_by
                logical, storage, storages = measure_bytes(value)
                _, violation, failed, _ = locked(pop_name, push_name, value, by[0], by[1],
                                                 logical, storage, storages, None, False)
                if failed is not None:
                    break
                if violation is not None:
                    found.append(violation)
                    if self.strict:
                        break
        for v in found:
            sinks.emit(self, "on_violation", v)
        if failed is not None:
            self._after_failed_pop(*failed)       # raises the seed's error
        if found and self.strict:
            raise strict_error(found[0])

    def _after_failed_pop(self, v: Violation, exc: BaseException) -> None:
        if self._sinks.op:
            self._emit_op()
        self._sinks.emit(self, "on_violation", v)
        if self.strict:
            raise strict_error(v) from exc
        if hasattr(exc, "add_note"):
            exc.add_note(f"cachescope: {v.summary()} (see cache.violations for the report)")
        raise exc

    # ------------------------------------------------------------------ value ops
    def set(self, key: str, value: Any) -> None:
        try:
            owner, site = self._lookup(1)
        except Exception:
            owner = site = None
        with self._lock:
            cache = self._cache
            old = cache.get(key, _MISSING)
            cache[key] = value                    # the seed's set
            violations = self._checker.set(
                key, owner, site, len(old) if type(old) is list else None,
                len(value) if type(value) is list else None, value)
            boundary = type(key) is str and key == self._checker.state_key
        if self._sinks.op:
            self._emit_op()
        if violations:
            self._emit_violations(violations)
        if boundary:
            self._emit_step_start()
        if violations and self.strict:
            raise strict_error(violations[0])

    def get(self, key: str, default: Any = None) -> Any:
        if type(key) is str:
            if self._checker.note_get(key):   # counted later, without the lock
                with self._lock:
                    self._checker.fold()
        else:
            with self._lock:
                self._checker.count_get(key)
        return self._cache.get(key, default)

    def q_size(self, name: str) -> int | None:
        """The seed's ``q_size`` (not counted)."""
        cache = self._cache
        if name not in cache:
            return None
        queue = cache[name]
        if type(queue) != list:  # noqa: E721 - the seed's exact check
            return None
        return len(queue)

    def get_quiet(self, key: str, default: Any = None) -> Any:
        """``get`` without counting it (for reports and exporters)."""
        try:
            return self._cache.get(key, default)
        except TypeError:
            return default

    def clear(self, key: str, by: tuple[str | None, str | None] | None = None) -> None:
        """The seed's ``clear``; ``by``: as for ``pop_push``."""
        if by is not None:
            owner, site = by
        else:
            try:
                owner, site = self._lookup(1)
            except Exception:
                owner = site = None
        with self._lock:
            cache = self._cache
            old = cache.get(key, _MISSING) if _hashable(key) else _MISSING
            del cache[key]                        # the seed's clear (KeyError if missing)
            self._checker.clear(key, owner, site, len(old) if type(old) is list else None)
        if self._sinks.op:
            self._emit_op()

    def clear_all(self) -> None:
        try:
            owner, site = self._lookup(1)
        except Exception:
            owner = site = None
        with self._lock:
            self._cache = {}                      # the seed's clear_all
            self._checker.clear_all(owner, site)
        if self._sinks.op:
            self._emit_op()

    # ------------------------------------------------------------------ steps
    @contextlib.contextmanager
    def generation(self, **info: Any) -> Iterator["InstrumentedCache"]:
        """Wrap one generation: a ``generate`` span in traces; checks the last step on exit.

        Inside a generation the loop is expected to call ``end_step()`` after each step's
        forward, so a step that raised (never ended) and is set up again counts as a restart.
        """
        self._generation = dict(info)
        self._checker.loop_ends_steps = True   # generation() loops close their steps with end_step()
        self._sinks.emit(self, "on_generation_start", self._generation)
        error: BaseException | None = None
        try:
            yield self
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.finish_generation(error)

    def reset(self) -> None:
        """Forget violations, counters and provenance (not the cached values)."""
        with self._lock:
            self._checker.reset((name, len(value)) for name, value in self._cache.items()
                                if type(value) is list)

    def __repr__(self) -> str:
        return (f"InstrumentedCache(name={self.name!r}, queues={len(self._checker.live_queues())}, "
                f"violations={len(self.violations)})")


def _peeker(ref: "weakref.ref[InstrumentedCache]") -> Callable[[Any], Any]:
    def peek(name: Any) -> Any:
        """The oldest value queued under ``name`` (for the checker's leftover reports)."""
        cache = ref()
        queue = cache._cache.get(name, _MISSING) if cache is not None else _MISSING
        return queue[0] if type(queue) is list and queue else _MISSING
    return peek


def _error_counter(ref: "weakref.ref[InstrumentedCache]") -> Callable[[str], None]:
    def count(sink_name: str) -> None:
        """Count a sink failure in ``stats.telemetry_errors``."""
        cache = ref()
        if cache is not None:
            with cache._lock:   # the checker's counters as they are: nothing to re-measure
                errors = cache._checker.stats.telemetry_errors
                errors[sink_name] = errors.get(sink_name, 0) + 1
    return count


def _hashable(key: Any) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True
