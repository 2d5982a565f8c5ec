"""``InstrumentedCache``: the seed's cache plus attribution, the pop-order checker, accounting
and sinks. Same return values and exception types as ``Cache`` for every call."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator

from ._cache import Cache
from ._checker import Violation, mismatch_hint, strict_error
from ._accounting import FamilyStats, Stats
from ._families import FamilyMap
from ._owners import AttribState, Attributor, _short_path
from ._records import OpRecord, StepInfo, _Queue
from ._values import EMPTY, Measure, _Tensor, format_summary, measure
from . import _hot as hotpath

__all__ = ["InstrumentedCache"]

log = logging.getLogger("cachescope")

_SINK_EVENTS = ("on_op", "on_violation", "on_step_start", "on_step_end",
                "on_generation_start", "on_generation_end")
_TIMELINE_PER_VIOLATION = 12
_CLEARED_MEMORY = 256
_STEP_MEMORY = 4096   # queue names remembered per step (a loop with no step boundaries stays bounded)

#: Called with every new ``InstrumentedCache`` at the end of its ``__init__`` (``cachescope.testing``
#: uses it to find the caches a test created, for the pytest plugin's strict mode).
_on_create: list[Callable[["InstrumentedCache"], None]] = []


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors or odd objects in state_ids
        return a is b


class InstrumentedCache(Cache):
    """A drop-in ``Cache`` that checks pop order and records every op for metrics and traces.

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
      speedups: use the C fast path for push/pop/get when it is built (default True; results
        are identical either way, see docs/DESIGN.md).
    """

    __slots__ = ("_hot",)   # a slot the C fast path reads at a fixed offset (instances keep a __dict__)

    def __init__(self, *, name: str | None = None, registry: Any = None, tracer_provider: Any = None,
                 strict: bool = False, family: Callable[[Any], str] | None = None,
                 attribution: str = "auto", timeline_size: int = 256, max_violations: int = 1000,
                 state_key: str = "state_ids", const_labels: dict[str, str] | None = None,
                 metrics: bool = True, tracing: bool = True, speedups: bool = True) -> None:
        self._hot: Any = hotpath.PyHot()   # until __init__ has the structures the fast path needs
        super().__init__()
        self.name = "default" if name is None else str(name)
        self.strict = strict
        self.state_key = state_key
        self.max_violations = max_violations
        self.stats = Stats()
        self.violations: list[Violation] = []
        self._families = FamilyMap(family)
        self._attributor = Attributor(attribution)
        # a ring of compact entries in C when the fast path can run, else a deque
        self._timeline: deque[OpRecord] = hotpath.new_timeline(max(1, timeline_size), speedups)
        self._new_queue: Callable[[], _Queue] = hotpath.queue_type(speedups)
        self._queues: dict[Any, _Queue] = {}
        self._fs_memo: dict[Any, FamilyStats] = {}
        self._lock = hotpath.new_lock(speedups)
        self._cleared: dict[Any, tuple[int, int, str | None, str | None]] = {}
        self._hot = hotpath.make(self, speedups)
        self._cleared_all: tuple[int, int, str | None, str | None] | None = None
        self._restarted_step: int | None = None   # index of the last step opened by a retry
        self._generation: dict[str, Any] | None = None
        self._loop_ends_steps = False   # set once the decode loop calls end_step()
        self._sinks: list[Any] = []
        self._dispatch: dict[str, tuple[tuple[Any, Callable[..., None]], ...]] = {
            ev: () for ev in _SINK_EVENTS}
        self._sink_failed: set[tuple[int, str]] = set()
        self._op_sinks: tuple[tuple[Any, Callable[..., None]], ...] = ()
        self._dynamic_op_sinks: tuple[Any, ...] = ()
        self._static_op_sinks = False
        self._dynamic_step_sinks: tuple[Any, ...] = ()
        self._static_step_sinks = False
        self._dynamic_end_sinks: tuple[Any, ...] = ()
        self._static_end_sinks = False
        self._dynamic_sinks = False
        self.metrics = None
        self.tracer = None
        if metrics:
            from .metrics import CacheNameTaken, MetricsSink
            for n in range(2, 10_000):
                try:
                    self.metrics = self._safe_attach(lambda: MetricsSink(
                        self, registry=registry, const_labels=const_labels))
                    break
                except CacheNameTaken:
                    if name is not None:
                        raise  # an explicit name that is taken is the caller's to fix
                    self.name = f"default-{n}"   # unnamed caches get the next free name
        if tracing:
            from .tracing import TracingSink
            self.tracer = self._safe_attach(lambda: TracingSink(self, tracer_provider=tracer_provider))
        for hook in _on_create:
            hook(self)

    # ------------------------------------------------------------------ state the fast path shares
    # Stored on self._hot (the C object when the extension is built), so that the Python methods
    # and the C fast path read and write the same values.
    @property
    def _cache(self) -> dict[Any, Any]:
        return self._hot.cache_dict

    @_cache.setter
    def _cache(self, value: dict[Any, Any]) -> None:   # Cache.__init__ and clear_all rebind it
        self._hot.cache_dict = value

    @property
    def stats(self) -> Stats:
        """Counters by queue family plus decode-loop totals (read by the exporters)."""
        return self._hot.stats

    @stats.setter
    def stats(self, value: Stats) -> None:
        self._hot.stats = value

    @property
    def state_key(self) -> Any:
        """The key whose ``set`` marks a step boundary (labml: 'state_ids')."""
        return self._hot.state_key

    @state_key.setter
    def state_key(self, value: Any) -> None:
        self._hot.state_key = value

    @property
    def _loop_ends_steps(self) -> bool:
        """Set once the decode loop calls ``end_step()`` (or enters ``generation()``)."""
        return bool(self._hot.loop_ends_steps)

    @_loop_ends_steps.setter
    def _loop_ends_steps(self, value: bool) -> None:
        self._hot.loop_ends_steps = 1 if value else 0

    @property
    def _seq(self) -> int:
        return self._hot.seq

    @_seq.setter
    def _seq(self, value: int) -> None:
        self._hot.seq = value

    @property
    def _step(self) -> StepInfo | None:
        return self._hot.step

    @_step.setter
    def _step(self, value: StepInfo | None) -> None:
        self._hot.step = value

    @property
    def _step_index(self) -> int:
        return self._hot.step_index

    @_step_index.setter
    def _step_index(self, value: int) -> None:
        self._hot.step_index = value

    @property
    def _step_pops(self) -> set[tuple[Any, str | None]]:
        return self._hot.step_pops

    @_step_pops.setter
    def _step_pops(self, value: set[tuple[Any, str | None]]) -> None:
        self._hot.step_pops = value

    @property
    def speedups_active(self) -> bool:
        """Whether push/pop/get take the C fast path (``cachescope._speedups``)."""
        return not isinstance(self._hot, hotpath.PyHot) and bool(self._hot.enabled)

    # ------------------------------------------------------------------ sinks
    def _safe_attach(self, make: Callable[[], Any]) -> Any:
        try:
            sink = make()
        except ValueError:
            raise  # bad arguments (e.g. invalid labels) are the caller's to fix
        except Exception:
            log.warning("cachescope: could not set up an exporter for cache %r; continuing "
                        "without it", self.name, exc_info=True)
            return None
        self.add_sink(sink)
        return sink

    def add_sink(self, sink: Any) -> Any:
        """Send this cache's ops, violations, steps and generations to ``sink`` (see docs/DESIGN.md)."""
        with self._lock:
            if sink not in self._sinks:
                self._sinks.append(sink)
                self._rebuild_dispatch()
        return sink

    def remove_sink(self, sink: Any) -> None:
        with self._lock:
            if sink in self._sinks:
                self._sinks.remove(sink)
                self._rebuild_dispatch()

    @property
    def sinks(self) -> tuple[Any, ...]:
        return tuple(self._sinks)

    def _rebuild_dispatch(self) -> None:
        self._dispatch = {ev: tuple((s, getattr(s, ev)) for s in self._sinks
                                    if callable(getattr(s, ev, None))) for ev in _SINK_EVENTS}
        self._op_sinks = self._dispatch["on_op"]
        self._sync_op_sinks()

    def _sync_op_sinks(self) -> None:
        """Tell the fast path whether any sink wants ``on_op`` now, and whether one needs full
        value summaries (``Measure.summary``; the fast path leaves it None otherwise)."""
        sinks = [s for s, _ in self._op_sinks]
        self._dynamic_op_sinks = tuple(s for s in sinks if hasattr(s, "wants_ops"))
        self._static_op_sinks = len(sinks) > len(self._dynamic_op_sinks)
        self._hot.full_measure = 1 if any(getattr(s, "needs_values", True) for s in sinks) else 0
        starts = [s for s, _ in self._dispatch["on_step_start"]]
        self._dynamic_step_sinks = tuple(s for s in starts if hasattr(s, "wants_steps"))
        self._static_step_sinks = len(starts) > len(self._dynamic_step_sinks)
        # A sink with a ``step_durations`` deque (the metrics sink) gets the durations of the
        # steps the fast path closes appended there, without an ``on_step_end`` call, unless
        # another sink wants that call now (then every sink gets it, as in the Python path).
        ends = [s for s, _ in self._dispatch["on_step_end"]]
        fed = [s for s in ends if getattr(s, "step_durations", None) is not None]
        feed = fed[0] if len(fed) == 1 else None
        self._hot.durations = feed.step_durations if feed is not None else None
        rest = [s for s in ends if s is not feed]
        self._dynamic_end_sinks = tuple(s for s in rest if hasattr(s, "wants_step_ends"))
        self._static_end_sinks = len(rest) > len(self._dynamic_end_sinks)
        self._dynamic_sinks = bool(self._dynamic_op_sinks or self._dynamic_step_sinks
                                   or self._dynamic_end_sinks)
        self._sync_wants()

    def _sync_wants(self) -> None:
        """Re-read the sinks that want ops, step starts or step ends only sometimes (after sink
        events)."""
        hot = self._hot
        wanted = self._static_op_sinks
        for sink in self._dynamic_op_sinks:
            wanted = wanted or sink.wants_ops
        hot.op_sinks = 1 if wanted else 0
        starts = self._static_step_sinks
        for sink in self._dynamic_step_sinks:
            starts = starts or sink.wants_steps
        ends = self._static_end_sinks
        for sink in self._dynamic_end_sinks:
            ends = ends or sink.wants_step_ends
        hot.step_sinks = (1 if starts else 0) | (2 if ends else 0)

    def _emit(self, event: str, *args: Any) -> None:
        for sink, fn in self._dispatch[event]:
            try:
                fn(self, *args)
            except Exception:
                self._sink_error(sink, event)
        if self._dynamic_sinks and event != "on_op":   # e.g. the tracer records only while a span does
            self._sync_wants()

    def _sink_error(self, sink: Any, event: str) -> None:
        name = type(sink).__name__
        with self._lock:
            errors = self.stats.telemetry_errors
            errors[name] = errors.get(name, 0) + 1
        key = (id(sink), event)
        if key not in self._sink_failed:
            self._sink_failed.add(key)
            log.warning("cachescope: sink %s failed in %s; the decode loop continues and further "
                        "failures of this sink are counted in cachescope_telemetry_errors_total",
                        name, event, exc_info=True)

    # ------------------------------------------------------------------ helpers
    def _record(self, op: str, queue: Any, family: str, owner: str | None, site: str | None,
                depth: int | None, logical: int = 0, storage: int = 0, value: Any = None,
                violation: str | None = None, producer: str | None = None) -> OpRecord:
        hot = self._hot
        hot.seq = seq = hot.seq + 1
        rec = _new_record(OpRecord, (seq, _time(), hot.step_index, op,
                          queue if type(queue) is str else _safe_str(queue), family, owner, site,
                          depth, logical, storage, value, violation, producer))
        self._timeline.append(rec)
        if self._step is not None:
            self._step.ops += 1
        return rec

    def _violation(self, v: Violation) -> Violation:
        """Count and keep a violation (call with the lock held)."""
        fs = self.stats.family(v.family)
        fs.violations[v.kind] = fs.violations.get(v.kind, 0) + 1
        if self._step is not None:
            self._step.violations += 1
        if len(self.violations) < self.max_violations:
            self.violations.append(v)
        else:
            self.stats.violations_dropped += 1
        return v

    def _timeline_for(self, queue: str, seq: int) -> tuple[OpRecord, ...]:
        recs = [r for r in self._timeline if r.queue == queue or r.seq == seq]
        return tuple(recs[-_TIMELINE_PER_VIOLATION:])

    def _after(self, rec: OpRecord, violations: list[Violation]) -> None:
        """Dispatch to sinks (outside the lock), then raise in strict mode."""
        if self._hot.op_sinks:
            self._emit("on_op", rec)
        for v in violations:
            if self._dispatch["on_violation"]:
                self._emit("on_violation", v)

    # ------------------------------------------------------------------ queue ops
    def _fstats(self, name: Any) -> FamilyStats:
        """The family stats for a queue name (memoised; names are hashable once the op succeeded)."""
        fs = self._fs_memo.get(name)
        if fs is None:
            fs = self.stats.family(self._families(name))
            if len(self._fs_memo) >= 4096:
                self._fs_memo.clear()
            self._fs_memo[name] = fs
        return fs

    def push(self, name: str, value: Any) -> None:
        owner, site = self._attributor.lookup(1)
        self._push(name, value, owner, site, measure(value))

    def _push(self, name: Any, value: Any, owner: str | None, site: str | None, m: Any) -> None:
        """``push`` with attribution and measurement done by the caller (also used by replay)."""
        with self._lock:
            cache = self._cache
            existed = name in cache
            if not existed:                      # the seed's push, inlined
                cache[name] = []
            queue = cache[name]
            queue.append(value)
            fs = self._fs_memo.get(name) or self._fstats(name)
            fs.push += 1
            depth = len(queue)
            if depth == 1:
                if existed:
                    fs.empty = max(0, fs.empty - 1)
                fs.live += 1
            storages = m.storages
            storage = storages[0][1] if len(storages) == 1 else m.storage
            self._seq = seq = self._seq + 1
            step = self._step
            rec = _new_record(OpRecord, (
                seq, _time(), self._step_index, "push", name if type(name) is str else _safe_str(name),
                fs.family, owner, site, depth, m.logical, storage, m, None, None))
            self._timeline.append(rec)
            q = self._queues.get(name)
            if q is None:
                q = self._queues[name] = self._new_queue()
            q.append(rec)                        # provenance: the push record itself
            fs.hold(m.logical, storages)
            if step is not None:
                step.ops += 1
                if len(step.pushed) < _STEP_MEMORY:
                    step.pushed.add(name)
        if self._hot.op_sinks:
            self._emit("on_op", rec)

    def pop(self, name: str) -> Any:
        owner, site = self._attributor.lookup(1)
        return self._pop(name, owner, site)

    def _pop(self, name: Any, owner: str | None, site: str | None) -> Any:
        """``pop`` with attribution done by the caller (also used by replay)."""
        with self._lock:
            try:
                queue = self._cache[name]
                value = queue.pop(0)             # the seed's pop
            except KeyError as exc:
                if name in self._cache:
                    raise  # a plain value that happens to be a dict: the seed's own error
                v = self._pop_failed("pop_missing", name, owner, site)
                self._after(self._timeline[-1], [v])
                self._raise(exc, v)
            except IndexError as exc:
                if type(self._cache.get(name)) is not list:
                    raise
                v = self._pop_failed("pop_empty", name, owner, site)
                self._after(self._timeline[-1], [v])
                self._raise(exc, v)
            fs = self._fs_memo.get(name) or self._fstats(name)
            fs.pop += 1
            # a plain value with its own pop() (a dict...) is not a queue and may have no len()
            depth = len(queue) if type(queue) is list else None
            if depth == 0:
                fs.live = max(0, fs.live - 1)
                fs.empty += 1
            q = self._queues.get(name)
            item = None
            position = None
            if q is not None:
                if len(q):
                    item = q.popleft()
                q.pops = position = q.pops + 1
                if not len(q):
                    del self._queues[name]       # drained: free the bookkeeping
            producer = kind = None
            m = EMPTY
            logical = storage = 0
            if item is not None:
                m = item.value
                logical, storage = item.logical_bytes, item.storage_bytes
                fs.release(logical, m.storages)
                producer = item.owner
                if (producer != owner and producer is not None and owner is not None
                        and not self._attributor.same_owner(owner, producer)):
                    kind = "owner_mismatch"
            self._seq = seq = self._seq + 1
            qname = name if type(name) is str else _safe_str(name)
            rec = _new_record(OpRecord, (
                seq, _time(), self._step_index, "pop", qname, fs.family, owner, site, depth,
                logical, storage, m, kind, producer))
            self._timeline.append(rec)
            key = (name, owner)
            step_pops = self._step_pops
            popped_before = key in step_pops
            if len(step_pops) >= _STEP_MEMORY:
                step_pops.clear()                # no step boundary for a long time
            step_pops.add(key)
            step = self._step
            if step is not None:
                step.ops += 1
                if len(step.popped) < _STEP_MEMORY:
                    step.popped.add(name)
            violation = None
            if kind is not None:
                assert item is not None
                violation = self._violation(Violation(
                    kind, qname, fs.family, self._step_index, owner, producer, seq, site,
                    item.site, item.step, item.seq,
                    format_summary(m if m.summary is not None else measure(value)), depth, position,
                    mismatch_hint(owner, item, q.items if q is not None else (), popped_before,
                                  self._step_index, taken_by=self._taken_by(qname, owner, seq),
                                  restarted=self._restarted_step == self._step_index),
                    timeline=self._timeline_for(qname, seq), cache=self.name))
        if self._hot.op_sinks:
            self._emit("on_op", rec)
        if violation is not None:
            if self._dispatch["on_violation"]:
                self._emit("on_violation", violation)
            if self.strict:
                raise strict_error(violation)
        return value

    def _pop_failed(self, kind: str, name: Any, owner: str | None, site: str | None) -> Violation:
        """Record a pop of a missing or empty queue (lock held)."""
        family = self._families(name)
        fs = self.stats.family(family)
        fs.pop += 1
        depth = 0 if kind == "pop_empty" else None
        rec = self._record("pop", name, family, owner, site, depth, violation=kind)
        popped_before = (name, owner) in self._step_pops
        if kind == "pop_empty":
            pushers = [r.owner for r in self._timeline if r.queue == rec.queue and r.op == "push"]
            if popped_before:
                hint = (f"{owner} already popped this queue in this step: the layer ran twice, or "
                        "the loop did not advance state_ids before running the layers again")
            elif pushers and owner not in pushers:
                hint = (f"{owner} never pushed to this queue (its pushes came from "
                        f"{', '.join(dict.fromkeys(p or '<no module>' for p in pushers))}): it was "
                        "skipped in the step that filled the queue, so the layers after it are off by one")
            else:
                hint = ("more pops than pushes: a layer ran twice, a layer before it was repeated, or "
                        "state_ids points at a state whose items were already consumed")
            detail = ""
        else:
            cleared = self._cleared.get(name)
            if cleared is not None:
                seq, step, by, at = cleared
                hint = (f"the queue was cleared by {by or '<no module>'} at op #{seq} ({at}), "
                        f"{'before the first step' if step < 0 else f'step {step}'}, while items "
                        "were still expected: do not clear KV queues mid-step")
            elif self._cleared_all is not None:
                seq, step, by, at = self._cleared_all
                hint = (f"clear_all() ran at op #{seq} ({at}) by {by or '<no module>'}; nothing was "
                        "pushed to this queue since")
            else:
                hint = ("nothing was ever pushed under this name: state_ids probably points at a "
                        "state that no step produced (check the (prev, next) the loop sets)")
            detail = f"state_ids is {_safe_repr(self.get_quiet(self.state_key))}"
        v = Violation(kind, rec.queue, family, self._step_index, owner, None, rec.seq, site,
                      depth=depth, hint=hint, detail=detail,
                      timeline=self._timeline_for(rec.queue, rec.seq), cache=self.name)
        return self._violation(v)

    def _raise(self, exc: BaseException, v: Violation) -> None:
        if self.strict:
            raise strict_error(v) from exc
        if hasattr(exc, "add_note"):
            exc.add_note(f"cachescope: {v.summary()} (see cache.violations for the report)")
        raise exc

    # ------------------------------------------------------------------ value ops
    def set(self, key: str, value: Any) -> None:
        found = self._hot.lookup(1)
        owner, site = found if found is not None else self._attributor.lookup(1)
        self._set(key, value, owner, site)

    def _set(self, key: Any, value: Any, owner: str | None, site: str | None) -> None:
        violations: list[Violation] = []
        with self._lock:
            cache = self._hot.cache_dict
            if type(key) is str:
                old = cache.get(key, _MISSING)
                cache[key] = value                       # the seed's set
                fs = self._fs_memo.get(key) or self._fstats(key)
                family = fs.family
            else:
                old = cache.get(key, _MISSING) if _hashable(key) else _MISSING
                super().set(key, value)
                family = self._families(key)
                fs = self.stats.family(family)
            fs.set += 1
            if type(old) is list:
                self._forget_queue(key, fs, len(old))
            if type(value) is list:
                fs.queue_added(len(value))
            rec = self._record("set", key, family, owner, site,
                               len(value) if type(value) is list else None)
            is_boundary = type(key) is str and key == self.state_key
            if is_boundary:
                violations = self._boundary(value, rec, explicit=False)
        self._after(rec, violations)
        if is_boundary:
            self._emit_step_start()
        if violations and self.strict:
            raise strict_error(violations[0])

    def get(self, key: str, default: Any = None) -> Any:
        try:
            fs = self._fs_memo.get(key)
        except TypeError:   # unhashable: counted, then the seed's get raises the same TypeError
            fs = False
        with self._lock:
            if fs is None:
                fs = self._fstats(key)
            elif fs is False:
                fs = self.stats.family(self._families(key))
            fs.get += 1
        return self._cache.get(key, default)

    def q_size(self, name: str) -> int | None:
        """The seed's ``q_size`` (not counted), reading the dict once instead of through the
        ``_cache`` property three times (a decode loop's cleanup calls it once per step)."""
        cache = self._hot.cache_dict
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

    def clear(self, key: str) -> None:
        found = self._hot.lookup(1)
        owner, site = found if found is not None else self._attributor.lookup(1)
        self._clear(key, owner, site)

    def _clear(self, key: Any, owner: str | None, site: str | None) -> None:
        with self._lock:
            cache = self._hot.cache_dict
            if type(key) is str:
                old = cache.get(key, _MISSING)
                del cache[key]                           # the seed's clear (KeyError if missing)
                fs = self._fs_memo.get(key) or self._fstats(key)
                family = fs.family
            else:
                old = cache.get(key, _MISSING) if _hashable(key) else _MISSING
                super().clear(key)
                family = self._families(key)
                fs = self.stats.family(family)
            fs.clear += 1
            if type(old) is list:
                self._forget_queue(key, fs, len(old))
            rec = self._record("clear", key, family, owner, site, None)
            if len(self._cleared) >= _CLEARED_MEMORY:
                self._cleared.pop(next(iter(self._cleared)))
            self._cleared[key] = (rec.seq, self._step_index, owner, site)
        self._after(rec, [])

    def clear_all(self) -> None:
        found = self._hot.lookup(1)
        owner, site = found if found is not None else self._attributor.lookup(1)
        self._clear_all(owner, site)

    def _clear_all(self, owner: str | None, site: str | None) -> None:
        with self._lock:
            super().clear_all()
            self._queues.clear()
            self._cleared.clear()
            for fs in self.stats.families.values():
                fs.drop_all()
            fs = self.stats.family("all")
            fs.clear_all += 1
            rec = self._record("clear_all", "*", "all", owner, site, None)
            self._cleared_all = (rec.seq, self._step_index, owner, site)
        self._after(rec, [])

    def _forget_queue(self, name: Any, fs: Any, length: int) -> None:
        """A queue vanished (clear/set over it): release what its items held."""
        fs.queue_removed(length)
        q = self._queues.pop(name, None)
        if q is not None:
            for item in q.items:
                fs.release(item.logical_bytes, item.value.storages)

    # ------------------------------------------------------------------ steps
    def mark_step(self, prev: Any = None, next: Any = None) -> None:  # noqa: A002 - labml's naming
        """Mark a step boundary explicitly (for loops that do not set ``state_ids``)."""
        with self._lock:
            rec = self._record("set", "<mark_step>", "mark_step", None, None, None)
            violations = self._boundary((prev, next), rec, explicit=True)
        for v in violations:
            self._emit("on_violation", v)
        self._emit_step_start()
        if violations and self.strict:
            raise strict_error(violations[0])

    def end_step(self, tokens: int = 0) -> None:
        """Close the current step (the decode loop calls this after its forward)."""
        with self._lock:
            self._loop_ends_steps = True
            step = self._step
            if step is None or step.end is not None:
                return
            self._close_step(step, tokens)
        self._emit("on_step_end", step)

    def _close_step(self, step: StepInfo, tokens: int) -> None:
        step.end = time.perf_counter()
        step.tokens = tokens
        self.stats.steps += 1
        self.stats.tokens += tokens

    def _boundary(self, value: Any, rec: OpRecord, explicit: bool) -> list[Violation]:
        """A new step begins (lock held): check the step that ended, then open the next."""
        violations: list[Violation] = []
        pair = value if isinstance(value, (tuple, list)) and len(value) == 2 else None
        cur = self._step
        ended: StepInfo | None = None
        if cur is not None:
            same = pair is not None and _same(cur.prev, pair[0]) and _same(cur.next, pair[1])
            if same:
                violations += self._restart_check(cur, rec)
            else:
                violations += self._leftover_check(cur, rec)
            if cur.end is None:
                self._close_step(cur, 0)
                ended = cur
        if pair is None:
            violations.append(self._violation(Violation(
                "bad_state_ids", rec.queue, rec.family, self._step_index + 1, rec.owner, None,
                rec.seq, rec.site,
                hint="set state_ids to a (prev_state, next_state) tuple, e.g. (None, 0) for the "
                     "prompt and (i, i + 1) for each later token",
                detail=f"state_ids was set to {_safe_repr(value)} (a {type(value).__name__})",
                timeline=self._timeline_for(rec.queue, rec.seq), cache=self.name)))
        self._step_index += 1
        prev, nxt = pair if pair is not None else (None, None)
        self._step = StepInfo(self._step_index, prev, nxt, time.perf_counter(), time.time())
        self._step_pops = set()
        self._pending_step_end = ended
        return violations

    def _emit_step_start(self) -> None:
        ended = getattr(self, "_pending_step_end", None)
        self._pending_step_end = None
        if ended is not None and self._dispatch["on_step_end"]:
            self._emit("on_step_end", ended)
        if self._dispatch["on_step_start"] and self._step is not None:
            self._emit("on_step_start", self._step)

    def _leftover_check(self, step: StepInfo, rec: OpRecord) -> list[Violation]:
        queues = self._queues
        held = [n for n in step.popped if n in queues]
        if not held:
            return []   # the usual case: every queue the step popped was drained
        out = []
        for name in sorted(held, key=_safe_str):
            q = self._queues.get(name)
            if q is None or not q.items:
                continue
            owners = [i.owner or "<no module>" for i in q.items]
            first = q.items[0]
            held = first.value
            if held.summary is None:   # measured by the fast path: shapes come from the value
                queue = self._cache.get(name)
                if type(queue) is list and len(queue) == len(q.items):
                    held = measure(queue[0])
            family = self._families(name)
            out.append(self._violation(Violation(
                "leftover", _safe_str(name), family, step.index, None, first.owner, rec.seq,
                producer_site=first.site, producer_step=first.step, producer_seq=first.seq,
                value=format_summary(held), depth=len(q.items),
                detail=f"pushed by {', '.join(owners)}",
                hint=(f"{len(owners)} item(s) pushed by {', '.join(owners)} were never popped in "
                      f"step {step.index}: a layer was skipped, or fewer layers ran than pushed"),
                timeline=self._timeline_for(_safe_str(name), rec.seq), cache=self.name)))
        return out

    def _taken_by(self, queue: str, owner: str | None, seq: int) -> str | None:
        """Who popped ``owner``'s item of ``queue`` earlier in this step (violation path only)."""
        for r in reversed(self._timeline):
            if r.step != self._step_index:
                break
            if (r.op == "pop" and r.queue == queue and r.seq != seq and r.producer == owner
                    and r.owner != owner):
                return r.owner
        return None

    def _restart_check(self, step: StepInfo, rec: OpRecord) -> list[Violation]:
        if not step.pushed and not step.popped:
            return []  # nothing ran under these state_ids: setting them again is harmless
        unconsumed = [n for n in step.popped if n in self._queues]
        pushed = [n for n in step.pushed if n in self._queues]
        state = f"({_safe_repr(step.prev)}, {_safe_repr(step.next)})"
        # A loop that closes its steps (end_step) tells us whether this one finished; otherwise
        # only unconsumed items in a queue the step popped show that it stopped half-way.
        unfinished = self._loop_ends_steps and step.end is None
        if unconsumed or (pushed and unfinished):
            held = ", ".join(f"{_safe_str(n)!r} holds {len(self._queues[n].items)}"
                             for n in sorted(pushed + unconsumed, key=_safe_str))
            kind = "step_restarted"
            self._restarted_step = step.index + 1
            detail = (f"state_ids {state} was set again before step {step.index} finished; {held} "
                      "item(s) from the failed attempt")
            hint = ("the retried step will pop the wrong items and queue its pushes behind stale "
                    "ones: restore the queues (or clear them and re-run the prompt) before retrying")
            queue = _safe_str(sorted(pushed + unconsumed, key=_safe_str)[0])
        else:
            kind = "state_not_advanced"
            detail = f"state_ids {state} was set again after step {step.index} completed"
            hint = ("advance state_ids every step: (i, i + 1), so each step pops what the "
                    "previous one pushed")
            queue = rec.queue
        family = self._families(queue) if kind == "step_restarted" else rec.family
        return [self._violation(Violation(
            kind, queue, family, step.index + 1, rec.owner, None, rec.seq, rec.site, detail=detail,
            hint=hint, timeline=self._timeline_for(queue, rec.seq), cache=self.name))]

    @contextlib.contextmanager
    def generation(self, **info: Any) -> Iterator["InstrumentedCache"]:
        """Wrap one generation: a ``generate`` span in traces; checks the last step on exit.

        Inside a generation the loop is expected to call ``end_step()`` after each step's
        forward, so a step that raised (never ended) and is set up again counts as a restart.
        """
        self._generation = dict(info)
        self._loop_ends_steps = True   # generation() loops close their steps with end_step()
        self._emit("on_generation_start", self._generation)
        error: BaseException | None = None
        try:
            yield self
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.finish_generation(error)

    def finish_generation(self, error: BaseException | None = None) -> None:
        violations: list[Violation] = []
        ended = None
        with self._lock:
            step = self._step
            if step is not None:
                if error is None:
                    rec = self._record("set", "<end>", "mark_step", None, None, None)
                    violations = self._leftover_check(step, rec)
                if step.end is None:
                    self._close_step(step, 0)
                    ended = step
            self._step = None
            info = dict(self._generation or {})
            self._generation = None
        for v in violations:
            self._emit("on_violation", v)
        if ended is not None:
            self._emit("on_step_end", ended)
        info["error"] = error
        self._emit("on_generation_end", info)

    # ------------------------------------------------------------------ reading
    @property
    def step(self) -> int:
        """Index of the current decode step (-1 before the first boundary)."""
        return self._step_index

    @property
    def current_step(self) -> StepInfo | None:
        return self._step

    def timeline(self) -> list[OpRecord]:
        """The most recent ops (bounded ring buffer), oldest first."""
        with self._lock:
            return list(self._timeline)

    def report(self) -> str:
        """Whole-run summary: ops, depth and byte peaks, violations."""
        from ._report import format_run
        with self._lock:
            return format_run(self)

    def reset(self) -> None:
        """Forget violations, counters and provenance (not the cached values)."""
        with self._lock:
            self.violations.clear()
            self.stats = Stats()
            self._fs_memo.clear()
            self._queues.clear()
            self._timeline.clear()
            for name, value in self._cache.items():
                if type(value) is list:
                    self.stats.family(self._families(name)).queue_added(len(value))

    def __repr__(self) -> str:
        return (f"InstrumentedCache(name={self.name!r}, queues={len(self._queues)}, "
                f"violations={len(self.violations)})")


hotpath.install(InstrumentedCache)   # push/pop/get take the C fast path when it is built

_MISSING = object()
_new_record = tuple.__new__   # builds an OpRecord without the NamedTuple's Python-level __new__
_time = time.time


def _hashable(key: Any) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


def _safe_str(x: Any) -> str:
    try:
        s = x if type(x) is str else str(x)
    except Exception:
        s = f"<{type(x).__name__}>"
    return s if len(s) <= 200 else s[:197] + "..."


def _safe_repr(x: Any) -> str:
    try:
        s = _repr_no_data(x, 0)
    except Exception:
        s = f"<{type(x).__name__}>"
    return s if len(s) <= 120 else s[:117] + "..."


_PLAIN = (int, float, complex, str, bytes, bool, type(None))


def _repr_no_data(x: Any, depth: int) -> str:
    """repr() for reports that never prints data: tensors (state ids may be token-id tensors) show
    as shape and dtype, other objects by type; plain scalars and their tuples/lists/dicts as is."""
    if isinstance(x, _Tensor):
        return f"<Tensor {list(x.shape)} {str(x.dtype).replace('torch.', '')}>"
    if type(x) in _PLAIN:
        return repr(x)
    if type(x) in (tuple, list, dict) and depth < 3:
        items = list(x.items())[:8] if type(x) is dict else list(x[:8])
        more = ", ..." if len(x) > 8 else ""
        if type(x) is dict:
            return "{" + ", ".join(f"{_repr_no_data(k, depth + 1)}: {_repr_no_data(v, depth + 1)}"
                                   for k, v in items) + more + "}"
        inner = ", ".join(_repr_no_data(i, depth + 1) for i in items) + more
        return f"({inner},)" if type(x) is tuple and len(x) == 1 else (
            f"({inner})" if type(x) is tuple else f"[{inner}]")
    return f"<{type(x).__name__}>"
