"""Prometheus export of what ``InstrumentedCache`` records (names: docs/metrics.md).

Depends on ``prometheus_client`` only. Nothing is registered at import time and nothing runs per
cache op: one custom collector per registry builds every counter and gauge from ``cache.stats``
when scraped. The step-duration histogram (a child bound when the cache is created) is observed
at the next scrape from durations the sink keeps per step (with the trace id of the step's span,
when it recorded one, for the exemplar).

``REGISTRY`` is cachescope's own ``CollectorRegistry`` (the default for ``InstrumentedCache``), not
``prometheus_client.REGISTRY``: serve it with ``start_metrics_server(port)``, or pass
``registry=prometheus_client.REGISTRY`` to the cache to join the application's global registry.

Multi-rank runs give each rank's cache ``const_labels=rank_labels(rank, tp_rank, pp_rank)``: the
bounded labels ``rank``, ``tp_rank``, ``pp_rank`` then sit on every series of that process.
"""

from __future__ import annotations

import errno
import gc
import inspect
import logging
import os
import re
import threading
import time
import weakref
from collections import deque
from typing import Any, Iterable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import (CounterMetricFamily, GaugeMetricFamily, Metric)
from prometheus_client.samples import Exemplar, Sample

from ._records import KINDS, OPS

__all__ = ["REGISTRY", "MetricsSink", "MetricsServerError", "export", "start_metrics_server",
           "STEP_BUCKETS", "RANK_LABELS", "rank_labels"]

log = logging.getLogger("cachescope")

#: cachescope's own registry: the default for caches created without ``registry=``.
REGISTRY = CollectorRegistry()

#: Buckets (seconds) of ``cachescope_decode_step_duration_seconds`` (docs/metrics.md).
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                float("inf"))
_PENDING_STEPS = 4096   # step durations kept between scrapes before they are observed at once

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
#: label names cachescope's metrics use themselves (a constant label may not reuse them)
_RESERVED = frozenset({"cache", "op", "family", "kind", "state", "sink", "le", "quantile"})
_MAX_LABEL_VALUE = 256
_KINDS = tuple(KINDS)

#: The constant labels of a multi-rank run's caches (docs/metrics.md), in this order.
RANK_LABELS = ("rank", "tp_rank", "pp_rank")


def rank_labels(rank: int, tp_rank: int = 0, pp_rank: int = 0) -> dict[str, str]:
    """``const_labels`` for the cache of one rank: ``{'rank': '3', 'tp_rank': '1', 'pp_rank':
    '1'}``. Bounded (at most the world size of values each), so fine as labels. The same dict
    labels the rank's target in the Prometheus file_sd file the launcher writes."""
    values = (rank, tp_rank, pp_rank)
    for name, value in zip(RANK_LABELS, values):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return {name: str(value) for name, value in zip(RANK_LABELS, values)}


class MetricsServerError(OSError):
    """The metrics HTTP server could not start (e.g. the port is in use)."""


def _check_const_labels(const_labels: dict[str, Any] | None) -> tuple[tuple[str, str], ...]:
    if not const_labels:
        return ()
    if not isinstance(const_labels, dict):
        raise ValueError(f"const_labels must be a dict of label name -> value, got "
                         f"{type(const_labels).__name__}")
    out = []
    for name, value in const_labels.items():
        if not isinstance(name, str) or not _LABEL_NAME.match(name):
            raise ValueError(f"invalid Prometheus label name {name!r} in const_labels: names match "
                             "[a-zA-Z_][a-zA-Z0-9_]*")
        if name.startswith("__"):
            raise ValueError(f"label name {name!r} in const_labels is reserved: names starting "
                             "with '__' are for Prometheus' internal use")
        if name in _RESERVED:
            raise ValueError(f"label name {name!r} in const_labels clashes with a label cachescope "
                             f"sets itself ({', '.join(sorted(_RESERVED))})")
        value = str(value)
        if len(value) > _MAX_LABEL_VALUE:
            raise ValueError(f"const_labels[{name!r}] is {len(value)} characters long; keep label "
                             f"values under {_MAX_LABEL_VALUE}")
        out.append((name, value))
    return tuple(sorted(out))


class _Entry:
    """One attached cache: a weak reference to it, its label values and its metrics sink."""

    __slots__ = ("ref", "name", "label_values", "sink")

    def __init__(self, ref: weakref.ref, name: str, label_values: tuple[str, ...],
                 sink: "MetricsSink") -> None:
        self.ref = ref
        self.name = name
        self.label_values = label_values
        self.sink = sink


class _CacheCollector:
    """The registry's cachescope collector: reads each attached cache's stats at scrape time."""

    def __init__(self, registry: CollectorRegistry, const_names: tuple[str, ...]) -> None:
        self.const_names = const_names
        self._registry = weakref.ref(registry)
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self.histogram = self._new_histogram(const_names)
        registry.register(self)
        try:
            registry.register(self.histogram)
        except Exception:
            registry.unregister(self)
            raise

    @staticmethod
    def _new_histogram(const_names: tuple[str, ...]) -> Histogram:
        return Histogram(
            "cachescope_decode_step_duration_seconds",
            "Wall time per decode step; exemplars carry the step span's trace_id.",
            labelnames=("cache",) + const_names, buckets=STEP_BUCKETS, registry=None)

    def _live(self, name: str) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry.ref() is not None

    def _relabel(self, const_names: tuple[str, ...]) -> None:
        """No live cache left: switch to other constant label names (lock held)."""
        registry = self._registry()
        hist = self._new_histogram(const_names)
        if registry is not None:
            registry.unregister(self.histogram)
            registry.register(hist)
        self._entries.clear()
        self.histogram = hist
        self.const_names = const_names

    # -------------------------------------------------------------- attach / detach
    def attach(self, cache: Any, sink: "MetricsSink", const: tuple[tuple[str, str], ...]) -> Any:
        names = tuple(n for n, _ in const)
        name = str(cache.name)
        label_values = (name,) + tuple(v for _, v in const)
        with self._lock:
            self._purge()
            suspect = self._live(name) or (names != self.const_names and any(
                e.ref() is not None for e in self._entries.values()))
        if suspect:
            gc.collect()  # the other cache may be garbage held only by a reference cycle
        with self._lock:
            self._purge()
            if self._live(name):
                raise CacheNameTaken(
                    f"a cache named {name!r} is already exported to this Prometheus registry: give "
                    f"each InstrumentedCache a distinct name= (it becomes the 'cache' label), pass "
                    f"another registry=, or metrics=False")
            if names != self.const_names:
                if any(e.ref() is not None for e in self._entries.values()):
                    raise ValueError(
                        f"cache {name!r}: every cache in one registry must use the same const_labels "
                        f"names (this registry's caches use {list(self.const_names) or 'none'}, got "
                        f"{list(names) or 'none'}); use a separate registry for differently "
                        "labelled caches")
                self._relabel(names)
            old = self._entries.get(name)
            if old is not None:
                self._forget(old)
            entry = _Entry(weakref.ref(cache), name, label_values, sink)
            self._entries[name] = entry
            return self.histogram.labels(*label_values)

    def _purge(self) -> None:
        """Forget caches that were garbage-collected (lock held).

        Done here, at attach/scrape time, rather than in a weakref callback: a callback runs inside
        whatever allocation triggered the collection, possibly while this lock (or the histogram's)
        is held by the same thread, and would deadlock.
        """
        for entry in [e for e in self._entries.values() if e.ref() is None]:
            self._forget(entry)

    def _forget(self, entry: _Entry) -> None:
        """Drop an entry and its histogram child (lock held)."""
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]
        try:
            self.histogram.remove(*entry.label_values)
        except (KeyError, ValueError):
            pass

    def detach(self, sink: "MetricsSink") -> None:
        with self._lock:
            for entry in list(self._entries.values()):
                if entry.sink is sink:
                    self._forget(entry)

    # -------------------------------------------------------------- collection
    def _families(self) -> dict[str, Metric]:
        base = ("cache",) + self.const_names
        return {
            "ops": CounterMetricFamily(
                "cachescope_ops", "Cache operations by op and queue family.",
                labels=base + ("op", "family")),
            "depth": GaugeMetricFamily(
                "cachescope_queue_depth", "Items currently held in the family's queues.",
                labels=base + ("family",)),
            "peak_depth": GaugeMetricFamily(
                "cachescope_queue_depth_peak", "Highest queue depth seen since the cache was created.",
                labels=base + ("family",)),
            "bytes": GaugeMetricFamily(
                "cachescope_tensor_bytes",
                "Tensor bytes held by queued items (kind=logical: sum of nbytes; "
                "kind=storage: distinct storages).", labels=base + ("family", "kind")),
            "peak_bytes": GaugeMetricFamily(
                "cachescope_tensor_bytes_peak", "Highest value of cachescope_tensor_bytes seen.",
                labels=base + ("family", "kind")),
            "queues": GaugeMetricFamily(
                "cachescope_queues", "Number of queues by state (live: holds items; empty).",
                labels=base + ("family", "state")),
            "violations": CounterMetricFamily(
                "cachescope_violations",
                "Violations by kind (pop order, and rank_* found by comparing ranks).",
                labels=base + ("family", "kind")),
            "steps": CounterMetricFamily(
                "cachescope_decode_steps", "Decode steps completed.", labels=base),
            "tokens": CounterMetricFamily(
                "cachescope_decode_tokens", "Tokens produced by the decode loop.", labels=base),
            "errors": CounterMetricFamily(
                "cachescope_telemetry_errors",
                "Exporter/sink failures swallowed to protect the decode loop.",
                labels=base + ("sink",)),
        }

    def describe(self) -> Iterable[Metric]:
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        fam = self._families()
        with self._lock:
            self._purge()  # also drops dead caches' histogram children before they are collected
            entries = list(self._entries.values())
        for entry in sorted(entries, key=lambda e: e.name):
            entry.sink.flush()   # step durations kept since the last scrape (this collector is
            cache = entry.ref()  # registered before the histogram, so it runs first)
            if cache is None:
                continue
            snap = _snapshot(cache)
            del cache
            if snap is None:
                continue
            families, steps, tokens, errors = snap
            lv = list(entry.label_values)
            exemplars = entry.sink._violation_exemplars
            for f in families:
                (name, ops, depth, peak_depth, logical, storage, peak_logical, peak_storage,
                 live, empty, violations) = f
                for op, n in zip(OPS, ops):
                    if n:
                        fam["ops"].add_metric(lv + [op, name], n)
                counts = dict(violations)
                if ops[0] or ops[1] or live or empty or peak_depth:
                    # A queue family: gauges, and every violation kind from 0 so that the first
                    # violation is an increase() that alerts can see.
                    fam["depth"].add_metric(lv + [name], depth)
                    fam["peak_depth"].add_metric(lv + [name], peak_depth)
                    fam["bytes"].add_metric(lv + [name, "logical"], logical)
                    fam["bytes"].add_metric(lv + [name, "storage"], storage)
                    fam["peak_bytes"].add_metric(lv + [name, "logical"], peak_logical)
                    fam["peak_bytes"].add_metric(lv + [name, "storage"], peak_storage)
                    fam["queues"].add_metric(lv + [name, "live"], live)
                    fam["queues"].add_metric(lv + [name, "empty"], empty)
                    for kind in _KINDS:
                        counts.setdefault(kind, 0)
                for kind, n in sorted(counts.items()):
                    ex = exemplars.get((name, kind))
                    _add_counter(fam["violations"], lv + [name, kind], n,
                                 Exemplar({"trace_id": ex[0]}, 1.0, ex[1]) if ex and n else None)
            fam["steps"].add_metric(lv, steps)
            fam["tokens"].add_metric(lv, tokens)
            for sink_name, n in sorted(errors.items()):
                fam["errors"].add_metric(lv + [sink_name], n)
        yield from fam.values()


_COUNTER_EXEMPLARS = "exemplar" in inspect.signature(CounterMetricFamily.add_metric).parameters


def _add_counter(fam: CounterMetricFamily, values: list[str], n: float,
                 exemplar: Exemplar | None) -> None:
    """``fam.add_metric`` with an exemplar (prometheus_client < 0.22 lacks the argument)."""
    if exemplar is None:
        fam.add_metric(values, n)
    elif _COUNTER_EXEMPLARS:
        fam.add_metric(values, n, exemplar=exemplar)
    else:
        fam.samples.append(Sample(fam.name + "_total", dict(zip(fam._labelnames, values)), n,
                                  None, exemplar))


def _snapshot(cache: Any) -> tuple[list[tuple[Any, ...]], int, int, dict[str, int]] | None:
    """The numbers of ``cache``'s counters, copied under its lock (no metric objects inside)."""
    snapshot = getattr(cache, "stats_snapshot", None)
    if snapshot is None:
        return None
    stats = snapshot()
    families = [
        (fs.family, tuple(getattr(fs, op) for op in OPS), fs.depth, fs.peak_depth, fs.logical,
         fs.storage, fs.peak_logical, fs.peak_storage, fs.live, fs.empty,
         tuple(fs.violations.items()))
        for fs in stats.families.values()]
    errors = dict.fromkeys((type(s).__name__ for s in cache.sinks), 0)
    errors.update(stats.telemetry_errors)
    return families, stats.steps, stats.tokens, errors


_collectors: "weakref.WeakKeyDictionary[CollectorRegistry, _CacheCollector]" = \
    weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """Fresh locks in a forked child (a scrape thread may have held one at fork())."""
    global _collectors_lock
    _collectors_lock = threading.Lock()
    for coll in list(_collectors.values()):
        coll._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _collector_for(registry: CollectorRegistry, const_names: tuple[str, ...]) -> _CacheCollector:
    with _collectors_lock:
        coll = _collectors.get(registry)
        if coll is None:
            coll = _collectors[registry] = _CacheCollector(registry, const_names)
        return coll


def export(cache: Any, registry: CollectorRegistry | None = None,
           const_labels: dict[str, str] | None = None, *, on_error: str = "raise") -> "MetricsSink | None":
    """Export ``cache``'s counters to ``registry`` (default: cachescope's ``REGISTRY``) from now
    on; returns the handle (``close()`` stops it). Read at scrape time: nothing runs per op.

    Bad arguments (invalid ``const_labels``, a name already exported there) raise ``ValueError``;
    with ``on_error='log'`` any other failure is logged once and None returned, so that a broken
    metrics set-up never stops the decode loop it would observe.
    """
    try:
        sink = MetricsSink(cache, registry=registry, const_labels=const_labels)
    except ValueError:
        raise
    except Exception:
        if on_error != "log":
            raise
        log.warning("cachescope: could not export cache %r to Prometheus; continuing without "
                    "metrics", getattr(cache, "name", "?"), exc_info=True)
        return None
    cache.add_sink(sink)
    return sink


def _tracer_of(cache: Any) -> Any:
    """The tracing sink of ``cache`` (the one its constructor made, else one attached with
    ``tracing.trace``): whatever sink answers ``trace_id``; None without one."""
    tracer = getattr(cache, "tracer", None)
    if tracer is not None:
        return tracer
    for sink in cache.sinks:
        if callable(getattr(type(sink), "trace_id", None)):
            return sink
    return None


class CacheNameTaken(ValueError):
    """Another live cache already exports under this name to the registry."""


class MetricsSink:
    """Exports one cache to a Prometheus registry (see the module docstring).

    Construction attaches the cache to the registry's collector (so its stats show up at the next
    scrape) and binds its histogram child; ``on_step_end`` observes the step's duration with the
    step span's trace id as exemplar; ``on_violation`` remembers the trace id of the last violation
    per (family, kind) for the violations counter's exemplar. Holds no strong reference to the
    cache: a dropped cache disappears from the exposition.
    """

    def __init__(self, cache: Any, registry: CollectorRegistry | None = None,
                 const_labels: dict[str, str] | None = None) -> None:
        const = _check_const_labels(const_labels)
        self.registry = REGISTRY if registry is None else registry
        self.const_labels = dict(const)
        self.cache_name = str(cache.name)
        self._violation_exemplars: dict[tuple[str, str], tuple[str, float]] = {}
        self._cache_ref = weakref.ref(cache)
        self._collector = _collector_for(self.registry, tuple(n for n, _ in const))
        self._pending: deque[Any] = deque()
        #: The durations of the steps closed since the last scrape (a tuple with the step span's
        #: trace id for a traced step); the scrape observes them.
        self.step_durations = self._pending
        self._hist = self._collector.attach(cache, self, const)

    def on_step_end(self, cache: Any, step: Any) -> None:
        duration = step.duration
        if duration is None:
            return
        tracer = _tracer_of(cache)
        tid = tracer.trace_id(step) if tracer is not None else None
        # Observed at the next scrape (work that can wait for a scrape happens then), with the
        # step span's trace id as exemplar when it has one; the deque is bounded by folding it
        # in when it fills.
        pending = self._pending
        pending.append(duration if tid is None else (duration, tid))
        if len(pending) >= _PENDING_STEPS:
            self.flush()

    def flush(self) -> None:
        """Observe the step durations kept since the last scrape (thread-safe: popleft only)."""
        hist = getattr(self, "_hist", None)
        if hist is None:   # a scrape while this sink is being attached
            return
        pending, observe = self._pending, hist.observe
        try:
            while True:
                item = pending.popleft()
                if type(item) is tuple:   # (duration, trace id of the step's span)
                    observe(item[0], {"trace_id": item[1]})
                else:
                    observe(item)
        except IndexError:
            pass

    def on_violation(self, cache: Any, v: Any) -> None:
        tracer = _tracer_of(cache)
        tid = tracer.trace_id() if tracer is not None else None
        if tid is not None:
            self._violation_exemplars[(v.family, v.kind)] = (tid, time.time())

    def close(self) -> None:
        """Stop exporting this cache (it leaves the exposition at the next scrape). Idempotent."""
        self._collector.detach(self)
        cache = self._cache_ref()
        if cache is not None:
            cache.remove_sink(self)

    def __repr__(self) -> str:
        return f"MetricsSink(cache={self.cache_name!r})"


def start_metrics_server(port: int, addr: str = "127.0.0.1",
                         registry: CollectorRegistry | None = None) -> tuple[Any, threading.Thread, int]:
    """Serve ``registry`` (default: cachescope's ``REGISTRY``) on ``http://addr:port/metrics``
    with ``prometheus_client.start_http_server`` (loopback by default, not its ``0.0.0.0``).

    Returns ``(server, thread, actual_port)``; ``port=0`` picks a free port. prometheus_client
    negotiates the format: OpenMetrics (with exemplars) when the scraper's ``Accept`` asks for it,
    the classic text format otherwise. Stop it with ``server.shutdown(); server.server_close()``.
    A port in use raises ``MetricsServerError``.
    """
    from prometheus_client import start_http_server

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in 0..65535, got {port!r}")
    try:
        server, thread = start_http_server(port, addr=addr,
                                           registry=REGISTRY if registry is None else registry)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            what = "is in use" if exc.errno == errno.EADDRINUSE else "needs privileges"
            err = MetricsServerError(
                f"port {port} on {addr} {what}: pick another with --metrics-port or use 0 for a "
                "free port")
        else:
            err = MetricsServerError(f"cannot serve metrics on {addr}:{port}: {exc}")
        err.errno = exc.errno
        raise err from exc
    return server, thread, server.server_port
