"""Test helpers: run code against an isolated, installed ``InstrumentedCache`` and assert on it.

    from cachescope.testing import capture

    with capture() as probe:              # installed as the singleton until the block ends
        probe.watch(model)                # name owners after the model's modules
        probe.decode(model, [1, 2, 3], 8)
    probe.assert_no_violations()
    probe.assert_pop_order("attn_kv_1", ["layers.0.attention", "layers.1.attention"])

Each probe owns its cache, a private Prometheus ``CollectorRegistry`` (never the global one) and,
when ``opentelemetry-sdk`` is installed, a private ``TracerProvider`` with an in-memory exporter.
The pytest plugin (``cachescope.pytest_plugin``) wraps the same probe in fixtures.

Multi-rank (TP/PP) code runs on real gloo ranks, each with its own probe and the cross-rank
checker, through ``run_ranks``::

    results = run_ranks(decode, nproc=3)      # decode(ctx): a module-level function
    results.assert_no_violations()
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from . import _install, _instrumented
from ._instrumented import InstrumentedCache
from ._owners import WatchHandle, watch
from ._records import OPS, OpRecord
from ._testing_dist import (RankContext, RankFailed, RankResults, RanksTimedOut, RankViolation,
                            run_ranks)
from ._values import format_bytes

__all__ = ["CacheProbe", "Op", "capture", "format_violations", "DEFAULT_MAX_OPS", "run_ranks",
           "RankContext", "RankResults", "RankViolation", "RankFailed", "RanksTimedOut"]

#: Ops a probe keeps in ``probe.ops`` (the cache's own timeline is a short ring buffer).
DEFAULT_MAX_OPS = 200_000
_FULL_REPORTS = 5      # full violation reports in a failure message; the rest get one line each
_SUMMARY_LINES = 20
_NO_MODULE = "<no module>"


class Op(NamedTuple):
    """One cache op as a probe logged it (``get`` is counted in stats, not logged)."""

    seq: int                  # op number within the cache
    step: int                 # decode step (-1 before the first state_ids)
    op: str                   # push, pop, set, clear or clear_all
    queue: str                # queue name or key
    family: str               # queue family (attn_kv_3 -> attn_kv)
    owner: str | None         # module that made the op
    producer: str | None      # pops: module that pushed the popped item
    violation: str | None     # violation kind this op raised, if any


class _OpLog:
    """Sink that appends every op to a list, up to ``limit`` entries."""

    needs_values = False   # on_op reads no Measure summaries

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.ops: list[Op] = []
        self.dropped = 0

    def on_op(self, cache: Any, rec: OpRecord) -> None:
        if len(self.ops) < self.limit:
            self.ops.append(Op(rec.seq, rec.step, rec.op, rec.queue, rec.family, rec.owner,
                               rec.producer, rec.violation))
        else:
            self.dropped += 1


# --------------------------------------------------------------------------- caches a test creates
class _Tracked:
    """A cache (or the ``RankResults`` of ``run_ranks``) seen by a tracker. Holds its violation
    list, never the cache itself (a test's caches must stay collectable: exporters and tests rely
    on weak references)."""

    __slots__ = ("ref", "violations", "checked")

    def __init__(self, source: Any, checked: int | None = None) -> None:
        self.ref = weakref.ref(source)
        self.violations = source.violations
        # violations before this index were seen already
        self.checked = len(source.violations) if checked is None else checked


class _CacheTracker:
    """Collects the ``InstrumentedCache``s created while it is the innermost active tracker (plus
    the singleton installed when it started), and the violations declared expected meanwhile.
    Used by the pytest plugin, one per test."""

    def __init__(self) -> None:
        self._tracked: list[_Tracked] = []
        self._prune_at = 1024
        self._expected: dict[int, Any] = {}   # id(violation) -> violation (kept alive for the id)

    @classmethod
    def start(cls) -> "_CacheTracker":
        tracker = cls()
        current = _install.installed()
        if current is not None:
            tracker._tracked.append(_Tracked(current))
        _trackers.append(tracker)
        return tracker

    def stop(self) -> None:
        if self in _trackers:
            _trackers.remove(self)
        self._tracked.clear()
        self._expected.clear()

    def add(self, cache: InstrumentedCache) -> None:
        tracked = self._tracked
        if len(tracked) >= self._prune_at:   # a test that makes many caches: forget dead, quiet ones
            tracked[:] = [t for t in tracked if t.ref() is not None or len(t.violations) > t.checked]
            self._prune_at = max(1024, 2 * len(tracked))
        tracked.append(_Tracked(cache))

    def add_results(self, results: Any) -> None:
        """The ``RankResults`` of a ``run_ranks`` call: every violation its ranks recorded is new."""
        self._tracked.append(_Tracked(results, checked=0))

    def expect(self, violations: Iterable[Any]) -> None:
        for v in violations:
            self._expected[id(v)] = v

    def take_unexpected(self) -> list[Any]:
        """Violations recorded since the last call that nobody declared expected."""
        out = []
        for t in self._tracked:
            found = t.violations
            if len(found) < t.checked:   # cache.reset() emptied the list
                t.checked = 0
            out += [v for v in found[t.checked:] if id(v) not in self._expected]
            t.checked = len(found)
        return out


_trackers: list[_CacheTracker] = []


def _cache_created(cache: InstrumentedCache) -> None:
    if _trackers:
        _trackers[-1].add(cache)


_instrumented.on_create(_cache_created)


def _results_created(results: Any) -> None:
    """``run_ranks`` returned: the innermost tracker (the pytest plugin's, per test) sees the
    ranks' violations like those of a cache the test created."""
    if _trackers:
        _trackers[-1].add_results(results)


# --------------------------------------------------------------------------- formatting
def _owner(name: str | None) -> str:
    return _NO_MODULE if name is None else name


def _kinds(violations: Sequence[Any]) -> str:
    counts: dict[str, int] = {}
    for v in violations:
        counts[v.kind] = counts.get(v.kind, 0) + 1
    return ", ".join(f"{kind} x{n}" for kind, n in sorted(counts.items()))


def format_violations(violations: Sequence[Any], full: int = _FULL_REPORTS) -> str:
    """The first ``full`` violations as full reports, then one line for each of the next ones."""
    parts = [v.report() for v in violations[:full]]
    rest = violations[full:]
    if rest:
        lines = [f"... and {len(rest)} more:"]
        lines += [f"  - {v.summary()}" for v in rest[:_SUMMARY_LINES]]
        if len(rest) > _SUMMARY_LINES:
            lines.append(f"  ... ({len(rest) - _SUMMARY_LINES} not shown; see probe.violations)")
        parts.append("\n".join(lines))
    return "\n".join(parts)


# --------------------------------------------------------------------------- the probe
class CacheProbe:
    """An isolated ``InstrumentedCache`` with its own metrics registry, tracer and op log, plus
    assertions about what happened to it.

    ``cache_options`` are ``InstrumentedCache`` keyword options. Unless given, ``registry`` is a new
    ``prometheus_client.CollectorRegistry`` and ``tracer_provider`` a new SDK ``TracerProvider``
    exporting to memory (tracing is off when ``opentelemetry-sdk`` is not installed).
    ``max_ops`` bounds ``probe.ops``.

    ``with probe:`` (or ``install()`` / ``close()``) makes the cache the process singleton for the
    block and restores the previous one afterwards; ``capture(...)`` does both in one step.
    """

    def __init__(self, *, max_ops: int = DEFAULT_MAX_OPS, **cache_options: Any) -> None:
        options = dict(cache_options)
        options.setdefault("name", "probe")
        self._exporter: Any = None
        self.tracing_off_reason: str | None = None
        self.metrics_off_reason: str | None = None

        if options.get("metrics", True):
            if importlib.util.find_spec("cachescope.metrics") is None and "metrics" not in options:
                options["metrics"] = False
                self.metrics_off_reason = "cachescope.metrics is not available"
            elif options.get("registry") is None:
                from prometheus_client import CollectorRegistry
                options["registry"] = CollectorRegistry()
        else:
            self.metrics_off_reason = "the probe was created with metrics=False"
        #: The Prometheus registry the cache exports to (None when metrics are off).
        self.registry: Any = options.get("registry") if options.get("metrics", True) else None

        if options.get("tracing", True):
            if options.get("tracer_provider") is None:
                provider, self._exporter, reason = _memory_tracer()
                if provider is not None:
                    options["tracer_provider"] = provider
                elif "tracing" not in options:
                    options["tracing"] = False
                    self.tracing_off_reason = reason
                else:
                    raise RuntimeError(f"tracing=True needs an in-memory tracer: {reason}")
            else:
                self.tracing_off_reason = ("the probe was given its own tracer_provider; read spans "
                                           "from that provider's exporter")
        else:
            self.tracing_off_reason = "the probe was created with tracing=False"
        self.tracer_provider: Any = options.get("tracer_provider")
        self._const_labels = dict(options.get("const_labels") or {})

        #: The probe's ``InstrumentedCache``.
        self.cache = InstrumentedCache(**options)
        self._log = _OpLog(max_ops)
        self.cache.add_sink(self._log)
        self._watches: list[WatchHandle] = []
        self._expected: list[Any] = []
        self._installed = False
        self._previous: InstrumentedCache | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def name(self) -> str:
        return self.cache.name

    def install(self) -> "CacheProbe":
        """Make the probe's cache the singleton (for cachescope and labml_nn) until ``uninstall``.
        A cache installed before is set aside and reinstalled by ``uninstall``."""
        if self._installed:
            return self
        previous = _install.installed()
        if previous is self.cache:
            previous = None
        if previous is not None:
            _install.uninstall()
        try:
            _install.install(self.cache)
        except BaseException:
            if previous is not None:
                _install.install(previous)
            raise
        self._previous = previous
        self._installed = True
        return self

    def uninstall(self) -> None:
        """Restore the singleton that ``install`` replaced (idempotent). Probes nest: restore
        them in the reverse order of installing (``with`` blocks and fixtures do)."""
        if not self._installed:
            return
        self._installed = False
        previous, self._previous = self._previous, None
        _install.uninstall()   # ours, or whatever the block installed after uninstalling ours
        if previous is not None:
            _install.install(previous)

    def close(self) -> None:
        """Uninstall, remove the hooks of ``watch``, end open spans. What the probe recorded stays
        readable (ops, violations, metrics, spans)."""
        try:
            self.uninstall()
        finally:
            for handle in self._watches:
                handle.remove()
            self._watches.clear()
            tracer = self.cache.tracer
            if tracer is not None and hasattr(tracer, "close"):
                tracer.close()

    def __enter__(self) -> "CacheProbe":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<CacheProbe {self.name!r}: {len(self._log.ops)} ops, "
                f"{len(self.cache.violations)} violations{', installed' if self._installed else ''}>")

    # ------------------------------------------------------------------ driving
    def watch(self, model: Any, *, prefix: str = "") -> WatchHandle:
        """``cachescope.watch(model, probe.cache)``: owners are named after ``model``'s modules
        (``layers.3.attention``). The hooks are removed when the probe closes."""
        handle = watch(model, self.cache, prefix=prefix)
        self._watches.append(handle)
        return handle

    def decode(self, model: Any, prompt_ids: Any, max_new_tokens: int, **kwargs: Any) -> list[int]:
        """Run ``cachescope.neox.generate`` on the reference model with the probe's cache."""
        from .neox import generate
        kwargs.setdefault("cache", self.cache)
        return generate(model, prompt_ids, max_new_tokens, **kwargs)

    @contextlib.contextmanager
    def expect_violations(self, *kinds: str) -> Iterator[list[Any]]:
        """Declare violations expected in a block; yields the list of those that occurred.

        Fails unless at least one violation (with ``kinds``: one of each kind) occurred. Expected
        violations are ignored by ``assert_no_violations`` and by the plugin's strict mode. With
        ``kinds``, violations of other kinds stay unexpected.
        """
        from ._records import KINDS
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown violation kind(s) {unknown}; kinds are {', '.join(KINDS)}")
        start = len(self.cache.violations)
        caught: list[Any] = []
        try:
            yield caught
        finally:
            found = self.cache.violations[start:]
            matched = [v for v in found if not kinds or v.kind in kinds]
            caught.extend(matched)
            self._expected.extend(matched)
            for tracker in _trackers:
                tracker.expect(matched)
        missing = [k for k in kinds if all(v.kind != k for v in found)]
        if not found or missing:
            what = f"violations of kind {', '.join(missing or kinds)}" if kinds else "a violation"
            got = (f"the block recorded {len(found)}: {_kinds(found)}" if found
                   else "the block recorded none")
            raise AssertionError(
                f"expected {what} on cache {self.name!r}, but {got}. The fault this block provokes "
                "did not reach the cache: check that the code in the block really ran through "
                "the probe's cache (probe.cache, or the installed singleton).")

    # ------------------------------------------------------------------ reading
    @property
    def violations(self) -> list[Any]:
        """Every violation the cache kept, expected or not."""
        return list(self.cache.violations)

    @property
    def unexpected_violations(self) -> list[Any]:
        """Violations not declared with ``expect_violations``."""
        expected = {id(v) for v in self._expected}
        return [v for v in self.cache.violations if id(v) not in expected]

    @property
    def ops(self) -> list[Op]:
        """Every op so far (push, pop, set, clear, clear_all), oldest first, up to ``max_ops``."""
        return list(self._log.ops)

    def pops(self, queue_or_family: str) -> list[Op]:
        """The pops of a queue (exact name) or, when no queue has that name, of a family."""
        ops = self._log.ops
        if any(o.queue == queue_or_family for o in ops):
            return [o for o in ops if o.op == "pop" and o.queue == queue_or_family]
        return [o for o in ops if o.op == "pop" and o.family == queue_or_family]

    def spans(self, name: str | None = None) -> list[Any]:
        """Finished OpenTelemetry spans (``ReadableSpan``), oldest first; only ``name`` if given."""
        if self._exporter is None:
            raise RuntimeError(f"tracing is off for probe {self.name!r}: {self.tracing_off_reason} "
                               "(install opentelemetry-sdk for in-memory spans)")
        spans = list(self._exporter.get_finished_spans())
        return spans if name is None else [s for s in spans if s.name == name]

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """``registry.get_sample_value(name, labels)``; the ``cache`` label (and the cache's
        ``const_labels``) are filled in unless given. None when there is no such sample."""
        if self.registry is None:
            raise RuntimeError(f"metrics are off for probe {self.name!r}: {self.metrics_off_reason}")
        full = {"cache": self.name}
        full.update({k: str(v) for k, v in self._const_labels.items()})
        full.update(labels or {})
        return self.registry.get_sample_value(name, full)

    def report(self) -> str:
        """The cache's run summary (``cache.report()``)."""
        return self.cache.report()

    # ------------------------------------------------------------------ assertions
    def assert_no_violations(self, *, max_reports: int = _FULL_REPORTS) -> None:
        """No violation happened (other than those declared with ``expect_violations``)."""
        found = self.unexpected_violations
        dropped = self.cache.stats.violations_dropped
        if not found and not dropped:
            return
        head = (f"cache {self.name!r} recorded {len(found)} pop-order violation(s) ({_kinds(found)})"
                if found else f"cache {self.name!r} recorded violations")
        if dropped:
            head += f", and {dropped} more not kept (max_violations)"
        raise AssertionError(
            f"{head}; expected none. Each means a layer read another layer's keys/values (or "
            "found nothing to read): the first report below names who pushed and who popped.\n\n"
            + format_violations(found, max_reports))

    def assert_drained(self, ignore: str | Iterable[str] = ()) -> None:
        """Every queue is empty now. ``ignore``: queue names, families or glob patterns left out
        (e.g. the last step's queue, which a labml loop leaves filled)."""
        patterns = [ignore] if isinstance(ignore, str) else list(ignore)
        cache = self.cache
        left = []
        for name, depth in cache.queues().items():
            family = cache.family(name)
            label = name if type(name) is str else repr(name)
            if any(p == label or p == family or fnmatch.fnmatchcase(label, p) for p in patterns):
                continue
            items = cache.pending(name)
            owners = [_owner(i.owner) for i in items]
            steps = sorted({i.step for i in items})
            left.append((label, depth, owners, steps))
        if not left:
            return
        lines = [f"cache {self.name!r} is not drained: {len(left)} queue(s) still hold items "
                 "(every pushed item should be popped, or its queue cleared, by the end):"]
        for label, depth, owners, steps in sorted(left):
            who = ", ".join(dict.fromkeys(owners)) or "unknown (pushed before the probe saw it)"
            at = f" at step {', '.join(map(str, steps))}" if steps else ""
            lines.append(f"  {label!r}: depth {depth}, pushed by {who}{at}")
        lines.append("A layer pushed without a later pop (a skipped or extra layer, or a step that "
                     "never ran), or the loop does not clean up. Pass ignore=[...] for queues "
                     "that are meant to stay filled.")
        raise AssertionError("\n".join(lines))

    def _family_stats(self, family: str) -> Any:
        fs = self.cache.stats.families.get(family)
        if fs is None:
            seen = sorted(f for f in self.cache.stats.families if f != "all")
            raise AssertionError(
                f"cache {self.name!r} never saw queue family {family!r} (families seen: "
                f"{', '.join(seen) or 'none'}). Check the name: families drop trailing ids "
                "(attn_kv_17 -> attn_kv).")
        return fs

    def assert_max_depth(self, family: str, n: int) -> None:
        """At most ``n`` items were ever held at once across the family's queues (peak depth)."""
        fs = self._family_stats(family)
        if fs.peak_depth > n:
            raise AssertionError(
                f"queue family {family!r} of cache {self.name!r} peaked at {fs.peak_depth} item(s) "
                f"held at once, above the limit of {n} (depth now: {fs.depth}). Something pushes "
                "more than is popped: an extra or repeated layer, or queues of finished steps "
                "that are never popped or cleared.")

    def assert_max_bytes(self, family: str, n: int, kind: str = "storage") -> None:
        """At most ``n`` tensor bytes were ever held at once by the family's queued items (peak).
        ``kind``: 'storage' (distinct storages: real memory) or 'logical' (sum of nbytes)."""
        if kind not in ("storage", "logical"):
            raise ValueError(f"kind must be 'storage' or 'logical', got {kind!r}")
        fs = self._family_stats(family)
        peak = fs.peak_storage if kind == "storage" else fs.peak_logical
        if peak > n:
            other = fs.peak_logical if kind == "storage" else fs.peak_storage
            raise AssertionError(
                f"queue family {family!r} of cache {self.name!r} peaked at {format_bytes(peak)} "
                f"({peak} bytes, {kind}) held at once, above the limit of "
                f"{format_bytes(n)} ({n} bytes); {'logical' if kind == 'storage' else 'storage'} "
                f"peak: {other} bytes. Cached tensors are larger than planned (dtype, shape, or "
                "views keeping a bigger storage alive), or more of them are held at once.")

    def assert_op_counts(self, *, family: str | None = None, **expected: int) -> None:
        """Exact op counts, e.g. ``assert_op_counts(push=8, pop=6)``; ops: push, pop, set, get,
        clear, clear_all. ``family`` limits the count to one queue family."""
        unknown = [op for op in expected if op not in OPS]
        if unknown or not expected:
            raise TypeError(f"assert_op_counts() takes counts for {', '.join(OPS)}; got "
                            f"{', '.join(unknown) or 'none'}")
        if family is None:
            actual = self.cache.stats.ops_by_op()
            where = f"cache {self.name!r}"
        else:
            actual = self._family_stats(family).ops()
            where = f"queue family {family!r} of cache {self.name!r}"
        wrong = {op: n for op, n in expected.items() if actual[op] != n}
        if not wrong:
            return
        rows = [f"  {op}: expected {n}, got {actual[op]}" + ("" if op in wrong else "  (ok)")
                for op, n in expected.items()]
        raise AssertionError(
            f"op counts of {where} differ:\n" + "\n".join(rows) +
            "\nA labml decode loop does one push per layer per step and one pop per layer per "
            "step after the first: a difference means layers were skipped, repeated or added.")

    def assert_pop_order(self, queue_or_family: str, owners: Sequence[str | None]) -> None:
        """The pops of a queue (or, when no queue has that name, of a family) were made by exactly
        ``owners``, in this order (owner names as ``watch`` gives them)."""
        pops = self.pops(queue_or_family)
        same = self.cache.same_owner
        expected = list(owners)
        actual = [o.owner for o in pops]

        def match(a: str | None, b: str | None) -> bool:
            if a is None or b is None:
                return _owner(a) == _owner(b)
            return same(a, b)

        first = next((i for i, (a, b) in enumerate(zip(actual, expected)) if not match(a, b)),
                     None)
        if first is None and len(actual) == len(expected):
            return
        if first is None:
            first = min(len(actual), len(expected))
        if not pops:
            raise AssertionError(
                f"cache {self.name!r} logged no pop of a queue or family named {queue_or_family!r} "
                f"(expected {len(expected)}). Queues seen: "
                f"{', '.join(sorted({o.queue for o in self._log.ops if o.op in ('push', 'pop')})[:20]) or 'none'}")
        lines = [f"pops of {queue_or_family!r} on cache {self.name!r} differ from the expected "
                 f"owners at pop #{first + 1} ({len(actual)} pop(s), {len(expected)} expected):",
                 f"  expected: {[_owner(o) for o in expected]}",
                 f"  actual:   {[_owner(o) for o in actual]}",
                 "  pops around the difference (step, queue, popped by <- pushed by):"]
        lo = max(0, first - 5)
        for i, o in enumerate(pops[lo:first + 6], start=lo):
            mark = "  >" if i == first else "   "
            flag = f"  <-- {o.violation}" if o.violation else ""
            lines.append(f"{mark} #{i + 1:<4} step {o.step:<4} {o.queue:<16} {_owner(o.owner)} <- "
                         f"{_owner(o.producer)}{flag}")
        if self._log.dropped:
            lines.append(f"  (the op log is full: {self._log.dropped} later op(s) were not logged; "
                         "raise max_ops)")
        lines.append("Layers ran in a different order, or were skipped or repeated, compared with "
                     "the order that pushed the items.")
        raise AssertionError("\n".join(lines))


def _memory_tracer() -> tuple[Any, Any, str | None]:
    """(TracerProvider, InMemorySpanExporter, None), or (None, None, reason) without the SDK."""
    if importlib.util.find_spec("cachescope.tracing") is None:
        return None, None, "cachescope.tracing is not available"
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError as exc:
        return None, None, f"opentelemetry-sdk is not installed ({exc})"
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter, None


@contextlib.contextmanager
def capture(*, max_ops: int = DEFAULT_MAX_OPS, **cache_options: Any) -> Iterator[CacheProbe]:
    """Install a fresh, isolated ``InstrumentedCache`` as the singleton for the block and yield its
    ``CacheProbe``. The previous singleton comes back afterwards, also on errors. The probe stays
    readable after the block (ops, violations, metrics, spans, assertions)."""
    cache_options.setdefault("name", "capture")
    probe = CacheProbe(max_ops=max_ops, **cache_options)
    with probe:
        yield probe
