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

Hugging Face transformers models are checked by ``cachescope.hf``; ``probe.watch(model)`` of one
installs it for the probe (same registry, tracer provider and strict option) and the probe's
readers and assertions cover its views too::

    with capture() as probe:
        probe.watch(model)                # a PreTrainedModel: cachescope.hf until the block ends
        model.generate(input_ids, max_new_tokens=8)
    probe.assert_no_violations()

Multi-rank (TP/PP) code runs on real gloo ranks, each with its own probe and the cross-rank
checker, through ``run_ranks``::

    results = run_ranks(decode, nproc=3)      # decode(ctx): a module-level function
    results.assert_no_violations()
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib.util
import sys
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from . import _install, _instrumented
from ._instrumented import InstrumentedCache
from ._owners import WatchHandle, watch
from ._records import HF_KINDS, OPS, OpRecord
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
#: Probe options that cachescope.hf.install takes too, with the same meaning.
_HF_SHARED_OPTIONS = ("strict", "const_labels", "timeline_size", "max_violations", "attribution")


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
        tracker._tracked += [_Tracked(view) for view in _installed_hf_views()]
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


def _installed_hf_views() -> list[InstrumentedCache]:
    """The views of the installed ``cachescope.hf`` recorder, if one is installed. Views made
    later are found like any new cache (``_cache_created``); cachescope.hf (and transformers) is
    never imported here."""
    hf = sys.modules.get("cachescope.hf")
    recorder = hf.installed() if hf is not None else None
    return [] if recorder is None else list(recorder.views.values())


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


def _what(violations: Sequence[Any]) -> str:
    """'pop-order violation(s)' when only the queue rule was broken, else 'violation(s)'."""
    if any(v.kind in HF_KINDS for v in violations):
        return "violation(s)"
    return "pop-order violation(s)"


def _violation_meaning(violations: Sequence[Any]) -> str:
    """One sentence on what the violations mean, for a failure message."""
    if any(v.kind in HF_KINDS for v in violations):
        return ("Each means a layer of the KV cache was extended, skipped, resized or reused out "
                "of turn: the reports below name the step, the layer and the modules involved.")
    return ("Each means a layer read another layer's keys/values (or found nothing to read): "
            "the first report below names who pushed and who popped.")


def _names(caches: Iterable[Any]) -> str:
    """``'a', 'hf'``: cache names (or caches) quoted, without repeats."""
    return ", ".join(repr(getattr(c, "name", c)) for c in dict.fromkeys(caches))


def _is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face transformers ``PreTrainedModel``, by its classes'
    names: nothing is imported, and a transformers module loaded twice (pytester's in-process
    runs drop the modules a run imported) still counts."""
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__ == "transformers.modeling_utils"
               for cls in type(model).__mro__)


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


def _add_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Op counts (op -> n) of several caches, added up; every op of ``OPS`` present."""
    total = dict.fromkeys(OPS, 0)
    for one in counts:
        for op, n in one.items():
            total[op] = total.get(op, 0) + n
    return total


def _where(caches: Sequence[Any]) -> str:
    """``cache 'x'``, or ``caches 'x', 'hf'``."""
    return f"cache{'s' if len(caches) > 1 else ''} {_names(caches)}"


# --------------------------------------------------------------------------- Hugging Face views
class _HFLink:
    """What a probe follows of one ``cachescope.hf`` recorder (public API only).

    The probe covers the violations the recorder found since the probe attached (any model),
    and the views of the models it watched plus those that appeared after it attached: a view
    that existed before belongs to earlier code, and its counts include that code's ops.
    """

    def __init__(self, recorder: Any, owned: bool) -> None:
        self.recorder = recorder
        self.owned = owned                   # the probe installed it, so the probe uninstalls it
        self.start = len(recorder.violations)
        self._earlier: "weakref.WeakSet[Any]" = weakref.WeakSet(recorder.views.values())
        self._watched: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._logged: list[Any] = []         # views the probe's op log is a sink of

    def views(self) -> list[InstrumentedCache]:
        return [v for v in self.recorder.views.values()
                if v not in self._earlier or v in self._watched]

    def violations(self, since: int | None = None) -> list[Any]:
        """The recorder's violations from index ``since`` (default: from the probe's start)."""
        return list(self.recorder.violations[self.start if since is None else since:])

    def follow(self, view: InstrumentedCache, log: _OpLog) -> None:
        """Cover ``view`` (a watched model's) and log its ops from now on."""
        self._watched.add(view)
        if all(v is not view for v in self._logged):
            view.add_sink(log)
            self._logged.append(view)

    def release(self, log: _OpLog) -> None:
        """Stop logging ops; uninstall cachescope.hf if the probe installed it (and it is still
        the installed one). The recorder stays readable."""
        for view in self._logged:
            view.remove_sink(log)
        self._logged.clear()
        if self.owned:
            self.owned = False
            import cachescope.hf as hf
            if hf.installed() is self.recorder:
                hf.uninstall()


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

    Hugging Face transformers models: ``watch(model)`` (or ``install_hf()``) installs
    ``cachescope.hf`` with the probe's registry, tracer provider and strict option, or reuses the
    installed one; from then on the readers and assertions cover its views too. ``uninstall``
    uninstalls cachescope.hf again if the probe installed it.
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
        self._options = options

        #: The probe's ``InstrumentedCache``.
        self.cache = InstrumentedCache(**options)
        self._log = _OpLog(max_ops)
        self.cache.add_sink(self._log)
        self._watches: list[WatchHandle] = []
        self._expected: list[Any] = []
        self._installed = False
        self._previous: InstrumentedCache | None = None
        self._hf_links: list[_HFLink] = []

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
        """Restore the singleton that ``install`` replaced, and uninstall cachescope.hf if the
        probe installed it (idempotent). Probes nest: restore them in the reverse order of
        installing (``with`` blocks and fixtures do)."""
        for link in self._hf_links:
            link.release(self._log)
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
                f"{len(self.violations)} violations{', installed' if self._installed else ''}>")

    # ------------------------------------------------------------------ driving
    def watch(self, model: Any, *, prefix: str = "") -> Any:
        """Name owners after ``model``'s modules; the hooks are removed when the probe closes.

        A queue-cache model: ``cachescope.watch(model, probe.cache)`` (``layers.3.attention``).
        A Hugging Face ``PreTrainedModel``: ``install_hf()`` then ``cachescope.hf.watch(model)``
        (``gpt_neox.layers.3.attention``); the model's view joins the probe's op log, counts and
        violations. Returns the watch handle (``remove()``).
        """
        if _is_hf_model(model):
            return self._watch_hf(model, prefix)
        handle = watch(model, self.cache, prefix=prefix)
        self._watches.append(handle)
        return handle

    def install_hf(self) -> Any:
        """Check Hugging Face transformers' caches for this probe and return the ``HFRecorder``.

        Installs ``cachescope.hf`` with the probe's registry, tracer provider and cache options
        (``strict``, ``timeline_size``...) unless it is installed already; an installed recorder
        is reused and left installed (its metrics and spans go where it was told). From now on
        the probe's violations and assertions include what cachescope.hf finds in any model.
        ``watch(model)`` calls this for a transformers model; call it yourself to check models
        you do not watch (a pipeline's).
        """
        import cachescope.hf as hf
        current = hf.installed()
        if self._hf_links and self._hf_links[-1].recorder is current:
            return current
        owned = current is None
        recorder = hf.install(**self._hf_options()) if owned else current
        self._hf_links.append(_HFLink(recorder, owned))
        return recorder

    @property
    def hf_recorder(self) -> Any:
        """The ``cachescope.hf`` recorder the probe follows (None before ``install_hf``)."""
        return self._hf_links[-1].recorder if self._hf_links else None

    def _hf_options(self) -> dict[str, Any]:
        """``cachescope.hf.install`` options that make its views report like the probe's cache."""
        options = {k: self._options[k] for k in _HF_SHARED_OPTIONS if k in self._options}
        if self.registry is None:
            options["metrics"] = False
        else:
            options["registry"] = self.registry
        if self._options.get("tracing", True) and self.tracer_provider is not None:
            options["tracer_provider"] = self.tracer_provider
        else:
            options["tracing"] = False
        return options

    def _watch_hf(self, model: Any, prefix: str) -> Any:
        import cachescope.hf as hf
        recorder = self.install_hf()
        handle = hf.watch(model, prefix=prefix)
        self._watches.append(handle)
        self._hf_links[-1].follow(recorder.view(model), self._log)
        return handle

    def _hf_views(self) -> list[InstrumentedCache]:
        return [view for link in self._hf_links for view in link.views()]

    def _caches(self) -> list[InstrumentedCache]:
        """The probe's cache, then the cachescope.hf views it covers."""
        return [self.cache, *self._hf_views()]

    def decode(self, model: Any, prompt_ids: Any, max_new_tokens: int, **kwargs: Any) -> list[int]:
        """Run ``cachescope.neox.generate`` on the reference model with the probe's cache."""
        if _is_hf_model(model):
            raise TypeError(
                f"probe.decode() runs cachescope's reference NeoX loop, not a transformers model "
                f"({type(model).__name__}); call probe.watch(model) and then model.generate(...): "
                "cachescope.hf checks transformers' own cache")
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
        mark = self._mark()
        caught: list[Any] = []
        try:
            yield caught
        finally:
            found = self._violations_since(mark)
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
                f"expected {what} on {self._where()}, but {got}. The fault this block provokes "
                "did not reach the cache: check that the code in the block really ran through "
                "the probe's cache (probe.cache, or the installed singleton) or, for a "
                "transformers model, that probe.watch(model) ran before the block.")

    def _where(self) -> str:
        """``cache 'x'``, or ``caches 'x', 'hf'`` when the probe covers cachescope.hf views."""
        return _where(self._caches())

    def _mark(self) -> tuple[int, dict[int, int]]:
        """Where the violation lists stand now, for ``_violations_since``."""
        return (len(self.cache.violations),
                {id(link): len(link.recorder.violations) for link in self._hf_links})

    def _violations_since(self, mark: tuple[int, dict[int, int]]) -> list[Any]:
        own, hf = mark
        found = list(self.cache.violations[own:])
        for link in self._hf_links:
            found += link.violations(hf.get(id(link)))
        return found

    # ------------------------------------------------------------------ reading
    @property
    def violations(self) -> list[Any]:
        """Every violation kept, expected or not: the probe's cache's, then those cachescope.hf
        found since the probe attached to it (``install_hf``)."""
        return self._violations_since((0, {}))

    @property
    def unexpected_violations(self) -> list[Any]:
        """Violations not declared with ``expect_violations``."""
        expected = {id(v) for v in self._expected}
        return [v for v in self.violations if id(v) not in expected]

    @property
    def ops(self) -> list[Op]:
        """Every op so far (push, pop, set, clear, clear_all), oldest first, up to ``max_ops``:
        the probe's cache's and those of the transformers models it watched."""
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
        """``registry.get_sample_value(name, labels)``, the cache's ``const_labels`` filled in.
        Without a ``cache`` label: the sum over the probe's cache and the cachescope.hf views it
        covers (a counter of all of them; a gauge's peaks add up too). None when no cache has
        such a sample."""
        if self.registry is None:
            raise RuntimeError(f"metrics are off for probe {self.name!r}: {self.metrics_off_reason}")
        base = {k: str(v) for k, v in self._const_labels.items()}
        base.update(labels or {})
        if "cache" in base:
            return self.registry.get_sample_value(name, base)
        caches = dict.fromkeys(cache.name for cache in self._caches())
        values = [self.registry.get_sample_value(name, {"cache": cache, **base})
                  for cache in caches]
        found = [v for v in values if v is not None]
        return sum(found) if found else None

    def report(self) -> str:
        """The cache's run summary (``cache.report()``), then that of each cachescope.hf
        recorder the probe followed (every view, and the caches measured only). The probe's own
        cache is left out when it saw no op and a recorder is there to report."""
        parts = [link.recorder.report() for link in self._hf_links]
        if not parts or any(self.cache.stats.ops_by_op().values()):
            parts.insert(0, self.cache.report())
        return "\n".join(parts)

    # ------------------------------------------------------------------ assertions
    def assert_no_violations(self, *, max_reports: int = _FULL_REPORTS) -> None:
        """No violation happened (other than those declared with ``expect_violations``), on the
        probe's cache nor in the transformers caches cachescope.hf checked for it."""
        found = self.unexpected_violations
        dropped = sum(cache.stats.violations_dropped for cache in self._caches())
        if not found and not dropped:
            return
        where = f"cache {_names(v.cache for v in found)}" if found else self._where()
        head = (f"{where} recorded {len(found)} {_what(found)} ({_kinds(found)})" if found
                else f"{where} recorded violations")
        if dropped:
            head += f", and {dropped} more not kept (max_violations)"
        raise AssertionError(f"{head}; expected none. {_violation_meaning(found)}\n\n"
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

    def _family_stats(self, family: str) -> list[tuple[InstrumentedCache, Any]]:
        """``(cache, stats of the family)`` for each covered cache that saw ``family``."""
        found = [(c, c.stats.families[family]) for c in self._caches()
                 if family in c.stats.families]
        if not found:
            seen = sorted({f for c in self._caches() for f in c.stats.families if f != "all"})
            raise AssertionError(
                f"{self._where()} never saw queue family {family!r} (families seen: "
                f"{', '.join(seen) or 'none'}). Check the name: families drop trailing ids "
                "(attn_kv_17 -> attn_kv; transformers' layer_3 -> layer); a transformers model "
                "is covered once probe.watch(model) ran.")
        return found

    def assert_max_depth(self, family: str, n: int) -> None:
        """At most ``n`` items were ever held at once across the family's queues (peak depth),
        in each cache that has the family."""
        for cache, fs in self._family_stats(family):
            if fs.peak_depth > n:
                raise AssertionError(
                    f"queue family {family!r} of cache {cache.name!r} peaked at {fs.peak_depth} "
                    f"item(s) held at once, above the limit of {n} (depth now: {fs.depth}). "
                    "Something pushes more than is popped: an extra or repeated layer, or queues "
                    "of finished steps that are never popped or cleared.")

    def assert_max_bytes(self, family: str, n: int, kind: str = "storage") -> None:
        """At most ``n`` tensor bytes were ever held at once by the family's queued items (peak),
        in each cache that has the family. ``kind``: 'storage' (distinct storages: real memory)
        or 'logical' (sum of nbytes)."""
        if kind not in ("storage", "logical"):
            raise ValueError(f"kind must be 'storage' or 'logical', got {kind!r}")
        for cache, fs in self._family_stats(family):
            peak = fs.peak_storage if kind == "storage" else fs.peak_logical
            if peak > n:
                other = fs.peak_logical if kind == "storage" else fs.peak_storage
                raise AssertionError(
                    f"queue family {family!r} of cache {cache.name!r} peaked at "
                    f"{format_bytes(peak)} ({peak} bytes, {kind}) held at once, above the limit "
                    f"of {format_bytes(n)} ({n} bytes); "
                    f"{'logical' if kind == 'storage' else 'storage'} peak: {other} bytes. "
                    "Cached tensors are larger than planned (dtype, shape, or views keeping a "
                    "bigger storage alive), or more of them are held at once.")

    def assert_op_counts(self, *, family: str | None = None, **expected: int) -> None:
        """Exact op counts, e.g. ``assert_op_counts(push=8, pop=6)``; ops: push, pop, set, get,
        clear, clear_all. ``family`` limits the count to one queue family. Counts add up over
        the probe's cache and the cachescope.hf views it covers."""
        unknown = [op for op in expected if op not in OPS]
        if unknown or not expected:
            raise TypeError(f"assert_op_counts() takes counts for {', '.join(OPS)}; got "
                            f"{', '.join(unknown) or 'none'}")
        if family is None:
            actual = _add_counts(c.stats.ops_by_op() for c in self._caches())
            where = self._where()
        else:
            found = self._family_stats(family)
            actual = _add_counts(fs.ops() for _, fs in found)
            where = f"queue family {family!r} of {_where([c for c, _ in found])}"
        wrong = {op: n for op, n in expected.items() if actual[op] != n}
        if not wrong:
            return
        rows = [f"  {op}: expected {n}, got {actual[op]}" + ("" if op in wrong else "  (ok)")
                for op, n in expected.items()]
        raise AssertionError(
            f"op counts of {where} differ:\n" + "\n".join(rows) +
            "\nA decode loop does one push per layer per step and one pop per layer per step "
            "after the first (transformers: after the forward that created the cache): a "
            "difference means layers were skipped, repeated or added.")

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
                f"{self._where()} logged no pop of a queue or family named {queue_or_family!r} "
                f"(expected {len(expected)}). Queues seen: "
                f"{', '.join(sorted({o.queue for o in self._log.ops if o.op in ('push', 'pop')})[:20]) or 'none'}")
        lines = [f"pops of {queue_or_family!r} on {self._where()} differ from the expected "
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
