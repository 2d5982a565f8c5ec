"""Tests for the Prometheus export (cachescope.metrics): names per docs/metrics.md."""

from __future__ import annotations

import gc
import re
import socket
import subprocess
import sys
import urllib.request

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from cachescope import InstrumentedCache, KINDS
from cachescope._cache import Cache
from cachescope import metrics as cmetrics
from cachescope.metrics import MetricsServerError, MetricsSink, start_metrics_server

from _loop import NEW_TOKENS, PROMPT, otel_memory, run_decode, run_decode_swapped
from _prom import PROMTOOL, require_binary

LAYERS = 4


def _cache(reg: CollectorRegistry, name: str = "t", **kw):
    return InstrumentedCache(name=name, registry=reg, tracing=kw.pop("tracing", False), **kw)


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def _samples(reg: CollectorRegistry) -> list:
    return [s for fam in reg.collect() for s in fam.samples]


def test_exact_counts_after_a_decode_loop() -> None:
    """Op, step and token counters match what a 4-layer, 4-token decode does, exactly."""
    reg = CollectorRegistry()
    cache = _cache(reg)
    tokens = run_decode(cache)
    assert tokens == run_decode(Cache())
    assert _value(reg, "cachescope_ops_total", cache="t", op="push", family="attn_kv") == LAYERS * NEW_TOKENS
    assert _value(reg, "cachescope_ops_total", cache="t", op="pop", family="attn_kv") == LAYERS * (NEW_TOKENS - 1)
    assert _value(reg, "cachescope_ops_total", cache="t", op="clear", family="attn_kv") == NEW_TOKENS
    assert _value(reg, "cachescope_ops_total", cache="t", op="set", family="state_ids") == NEW_TOKENS
    assert _value(reg, "cachescope_decode_steps_total", cache="t") == NEW_TOKENS
    assert _value(reg, "cachescope_decode_tokens_total", cache="t") == NEW_TOKENS
    assert _value(reg, "cachescope_decode_step_duration_seconds_count", cache="t") == NEW_TOKENS
    assert _value(reg, "cachescope_decode_step_duration_seconds_sum", cache="t") > 0
    for kind in KINDS:  # every kind starts at 0 so that the first violation is an increase()
        assert _value(reg, "cachescope_violations_total", cache="t", family="attn_kv", kind=kind) == 0


def test_gauges_track_depth_bytes_and_queue_states() -> None:
    """Depth, tensor bytes (logical and storage) and live/empty queue gauges follow the cache."""
    reg = CollectorRegistry()
    cache = _cache(reg)
    run_decode(cache, cleanup=False)  # leaves attn_kv_3 (4 items) and attn_kv_0..2 (empty)
    items = cache._cache[f"attn_kv_{NEW_TOKENS - 1}"]
    logical = sum(t.nbytes for kv in items for t in kv)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for kv in items for t in kv}
    lab = dict(cache="t", family="attn_kv")
    assert _value(reg, "cachescope_queue_depth", **lab) == LAYERS
    assert _value(reg, "cachescope_queue_depth_peak", **lab) == LAYERS
    assert _value(reg, "cachescope_tensor_bytes", kind="logical", **lab) == logical
    assert _value(reg, "cachescope_tensor_bytes", kind="storage", **lab) == sum(storages.values())
    assert _value(reg, "cachescope_tensor_bytes_peak", kind="logical", **lab) == logical
    assert _value(reg, "cachescope_queues", state="live", **lab) == 1
    assert _value(reg, "cachescope_queues", state="empty", **lab) == NEW_TOKENS - 1
    cache.clear_all()
    assert _value(reg, "cachescope_queue_depth", **lab) == 0
    assert _value(reg, "cachescope_tensor_bytes", kind="logical", **lab) == 0
    assert _value(reg, "cachescope_tensor_bytes", kind="storage", **lab) == 0
    assert _value(reg, "cachescope_queues", state="live", **lab) == 0
    assert _value(reg, "cachescope_tensor_bytes_peak", kind="logical", **lab) == logical
    assert _value(reg, "cachescope_ops_total", cache="t", op="clear_all", family="all") == 1
    # plain values (use_cache, state_ids) are not queues: no depth gauge for them
    assert _value(reg, "cachescope_queue_depth", cache="t", family="use_cache") is None


def test_violations_counter_after_injected_swap_has_trace_exemplar() -> None:
    """Swapping two layers mid-decode counts owner_mismatch violations, with the step's trace id as exemplar."""
    reg = CollectorRegistry()
    provider, exporter = otel_memory()
    cache = _cache(reg, tracing=True, tracer_provider=provider)
    run_decode_swapped(cache, step=1)
    n = sum(1 for v in cache.violations if v.kind == "owner_mismatch")
    assert n > 0
    assert _value(reg, "cachescope_violations_total", cache="t", family="attn_kv", kind="owner_mismatch") == n
    text = generate_openmetrics(reg).decode()
    line = next(ln for ln in text.splitlines()
                if ln.startswith("cachescope_violations_total") and 'kind="owner_mismatch"' in ln)
    m = re.search(r'# \{trace_id="([0-9a-f]{32})"\} 1\.0', line)
    assert m, line
    error_steps = [s for s in exporter.get_finished_spans()
                   if s.name == "decode_step" and not s.status.is_ok]
    assert {format(s.context.trace_id, "032x") for s in error_steps} == {m.group(1)}


def test_cache_label_separates_two_caches_and_rejects_duplicate_names() -> None:
    """Two caches in one registry get their own `cache` label; a second live cache with the same name is refused."""
    reg = CollectorRegistry()
    a = _cache(reg, "a")
    b = _cache(reg, "b")
    run_decode(a, new_tokens=2)
    run_decode(b, new_tokens=5)
    assert _value(reg, "cachescope_decode_steps_total", cache="a") == 2
    assert _value(reg, "cachescope_decode_steps_total", cache="b") == 5
    assert _value(reg, "cachescope_decode_step_duration_seconds_count", cache="a") == 2
    assert _value(reg, "cachescope_decode_step_duration_seconds_count", cache="b") == 5
    with pytest.raises(ValueError, match="already exported"):
        _cache(reg, "a")
    other = CollectorRegistry()
    _cache(other, "a")  # the same name in another registry is fine


def test_dropped_cache_leaves_the_exposition() -> None:
    """A cache that is garbage-collected disappears from the scrape, histogram child included, and its name is free again."""
    reg = CollectorRegistry()
    cache = _cache(reg, "gone", tracing=True)
    run_decode(cache, new_tokens=2)
    assert _value(reg, "cachescope_decode_steps_total", cache="gone") == 2
    del cache
    gc.collect()
    assert not [s for s in _samples(reg) if s.labels.get("cache") == "gone"]
    again = _cache(reg, "gone")
    assert _value(reg, "cachescope_decode_steps_total", cache="gone") == 0
    assert again.metrics is not None


def test_const_labels_on_every_sample_and_validated() -> None:
    """Constant labels appear on every sample; invalid or clashing label names raise ValueError."""
    reg = CollectorRegistry()
    cache = _cache(reg, const_labels={"rank": "3", "host": "n1"})
    run_decode(cache, new_tokens=2)
    samples = _samples(reg)
    assert samples
    assert all(s.labels.get("rank") == "3" and s.labels.get("host") == "n1" for s in samples)
    for bad in ({"0rank": "1"}, {"cache": "x"}, {"__x": "1"}, {"a-b": "1"}, {"le": "1"}):
        with pytest.raises(ValueError):
            _cache(CollectorRegistry(), const_labels=bad)
    with pytest.raises(ValueError, match="same const_labels names"):
        _cache(reg, "other", const_labels={"node": "4"})
    _cache(reg, "other", const_labels={"rank": "4", "host": "n2"})  # same names: fine
    del cache
    gc.collect()
    # once no cache with the old label names is alive, the registry takes new ones
    fresh = _cache(reg, "fresh", const_labels={"zone": "z"})
    run_decode(fresh, new_tokens=1)
    assert _value(reg, "cachescope_decode_step_duration_seconds_count", cache="fresh", zone="z") == 1


def test_nothing_in_the_global_registry() -> None:
    """Caches never register anything in prometheus_client.REGISTRY unless asked to, nor does importing."""
    def names() -> set[str]:
        return {fam.name for fam in prometheus_client.REGISTRY.collect() if fam.name.startswith("cachescope")}

    assert cmetrics.REGISTRY is not prometheus_client.REGISTRY
    assert names() == set()
    cache = InstrumentedCache(name="test_metrics_default_registry", tracing=False)
    run_decode(cache, new_tokens=1)
    assert names() == set()
    assert cmetrics.REGISTRY.get_sample_value(
        "cachescope_decode_steps_total", {"cache": "test_metrics_default_registry"}) == 1
    assert cache.metrics is not None and cache.metrics.registry is cmetrics.REGISTRY
    # Run in a fresh interpreter: importing registers nothing anywhere.
    code = ("import prometheus_client, cachescope, cachescope.metrics as m;"
            "assert not list(m.REGISTRY.collect()), 'own registry not empty';"
            "assert not [f for f in prometheus_client.REGISTRY.collect() if 'cachescope' in f.name]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_step_histogram_exemplar_in_openmetrics() -> None:
    """Histogram buckets carry the trace_id of the decode_step span as exemplar in OpenMetrics output."""
    reg = CollectorRegistry()
    provider, exporter = otel_memory()
    cache = _cache(reg, tracing=True, tracer_provider=provider)
    run_decode(cache)
    # traced steps wait for the scrape too, each with its span's trace id
    pending = list(cache.metrics.step_durations)
    assert pending and all(type(p) is tuple and len(p[1]) == 32 for p in pending)
    text = generate_openmetrics(reg).decode()
    assert not cache.metrics.step_durations
    ids = set(re.findall(r'cachescope_decode_step_duration_seconds_bucket\{[^}]*\} \d+\.\d+ '
                         r'# \{trace_id="([0-9a-f]{32})"\}', text))
    steps = {format(s.context.trace_id, "032x") for s in exporter.get_finished_spans()
             if s.name == "decode_step"}
    assert ids and ids <= steps
    # the classic text format has no exemplars, and still parses
    classic = generate_latest(reg).decode()
    assert "trace_id=" not in classic
    assert {f.name for f in text_string_to_metric_families(classic)} >= {
        "cachescope_ops", "cachescope_decode_step_duration_seconds"}


def test_no_exemplar_without_a_recording_span() -> None:
    """Without a tracer provider the histogram is observed without exemplars."""
    reg = CollectorRegistry()
    from opentelemetry.trace import NoOpTracerProvider
    cache = _cache(reg, tracing=True, tracer_provider=NoOpTracerProvider())
    run_decode(cache, new_tokens=2)
    assert "trace_id=" not in generate_openmetrics(reg).decode()
    assert _value(reg, "cachescope_decode_step_duration_seconds_count", cache="t") == 2


def test_promtool_check_metrics_passes() -> None:
    """`promtool check metrics` accepts the exposition of a run with violations and two caches."""
    promtool = require_binary("promtool", PROMTOOL)
    reg = CollectorRegistry()
    provider, _ = otel_memory()
    a = _cache(reg, "a", tracing=True, tracer_provider=provider, const_labels={"rank": "0"})
    b = _cache(reg, "b", const_labels={"rank": "1"})
    run_decode_swapped(a, step=0)
    run_decode(b)
    proc = subprocess.run([promtool, "check", "metrics"], input=generate_latest(reg),
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_telemetry_errors_are_counted() -> None:
    """A failing sink is counted in cachescope_telemetry_errors_total by sink name; ours start at 0."""
    class Boom:
        def on_step_end(self, cache, step):
            raise RuntimeError("boom")

    reg = CollectorRegistry()
    cache = _cache(reg, tracing=True)
    cache.add_sink(Boom())
    assert _value(reg, "cachescope_telemetry_errors_total", cache="t", sink="MetricsSink") == 0
    assert _value(reg, "cachescope_telemetry_errors_total", cache="t", sink="TracingSink") == 0
    tokens = run_decode(cache)
    assert tokens == run_decode(Cache())
    assert _value(reg, "cachescope_telemetry_errors_total", cache="t", sink="Boom") == NEW_TOKENS


def test_hot_path_touches_no_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    """MetricsSink has no per-op hook and never calls .labels() while decoding (the child is pre-bound)."""
    assert not hasattr(MetricsSink, "on_op")
    reg = CollectorRegistry()
    cache = _cache(reg)

    def no_labels(*a, **k):
        raise AssertionError(".labels() called on the hot path")

    monkeypatch.setattr(prometheus_client.Histogram, "labels", no_labels)
    run_decode(cache)
    assert cache.stats.telemetry_errors == {}
    assert _value(reg, "cachescope_decode_step_duration_seconds_count", cache="t") == NEW_TOKENS


def test_metrics_server_serves_openmetrics_on_a_free_port() -> None:
    """start_metrics_server(0) picks a free port and negotiates OpenMetrics (with exemplars) or classic text."""
    reg = CollectorRegistry()
    provider, _ = otel_memory()
    cache = _cache(reg, tracing=True, tracer_provider=provider)
    run_decode(cache, new_tokens=2)
    server, thread, port = start_metrics_server(0, registry=reg)
    try:
        assert port > 0 and thread.is_alive()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            body = resp.read().decode()
        assert 'trace_id="' in body and body.rstrip().endswith("# EOF")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
            assert 'cachescope_decode_steps_total{cache="t"} 2.0' in resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_server_port_in_use() -> None:
    """A port in use raises MetricsServerError with a message that says what to do."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(MetricsServerError) as info:
            start_metrics_server(port, registry=CollectorRegistry())
    assert str(info.value) == (f"port {port} on 127.0.0.1 is in use: pick another with "
                               "--metrics-port or use 0 for a free port")
    assert isinstance(info.value, OSError)
    with pytest.raises(ValueError):
        start_metrics_server(70000)


def test_metrics_false_and_prompt_len_unaffected() -> None:
    """metrics=False attaches no MetricsSink; decoding results never depend on the exporters."""
    cache = InstrumentedCache(name="nometrics", metrics=False, tracing=False)
    assert cache.metrics is None
    assert run_decode(cache, prompt=PROMPT) == run_decode(Cache(), prompt=PROMPT)


def test_garbage_collection_during_attach_does_not_deadlock() -> None:
    """Caches that die in reference cycles while others attach or scrape never deadlock the registry."""
    import threading

    reg = CollectorRegistry()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            old = gc.get_threshold()
            gc.set_threshold(1, 1, 1)  # collect on nearly every allocation
            try:
                for i in range(300):
                    c = _cache(reg, f"c{i % 7}")
                    c.cycle = c  # only the cyclic collector can free it
                    del c
                    if i % 10 == 0:
                        generate_latest(reg)
            finally:
                gc.set_threshold(*old)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "attach/scrape deadlocked while the garbage collector ran"
    assert not errors, errors


def test_step_durations_are_observed_at_scrape_time_and_stay_bounded() -> None:
    """Without a recording span, step durations wait in a bounded deque and a scrape observes
    them all; every step is counted exactly once."""
    from prometheus_client import CollectorRegistry

    from cachescope import metrics as M

    reg = CollectorRegistry()
    cache = InstrumentedCache(name="deferred", registry=reg, tracing=False)
    sink = cache.metrics
    for i in range(M._PENDING_STEPS + 10):
        cache.mark_step(i, i + 1)
        cache.end_step(tokens=1)
    assert len(sink._pending) == 10   # folded once when it filled
    count = reg.get_sample_value("cachescope_decode_step_duration_seconds_count", {"cache": "deferred"})
    assert count == M._PENDING_STEPS + 10 and len(sink._pending) == 0
    assert reg.get_sample_value("cachescope_decode_step_duration_seconds_count",
                                {"cache": "deferred"}) == count   # a second scrape adds nothing


def test_exemplars_come_from_a_tracer_attached_by_hand() -> None:
    """A tracer attached with tracing.trace (the cache made none) gives the step histogram and the
    violations counter their trace-id exemplars."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from cachescope import metrics, tracing
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    reg = CollectorRegistry()
    cache = InstrumentedCache(name="by-hand", metrics=False, tracing=False)
    metrics.export(cache, registry=reg)
    tracing.trace(cache, tracer_provider=provider)
    with cache.generation():
        cache.set("state_ids", (None, 0))
        with cache.owner("a"):
            cache.push("kv_0", 1)
        with cache.owner("b"):
            cache.push("kv_0", 2)
        cache.end_step(1)
        cache.set("state_ids", (0, 1))
        with cache.owner("b"):
            cache.pop("kv_0")      # a's item: owner_mismatch
        with cache.owner("a"):
            cache.pop("kv_0")
        cache.end_step(1)
    from prometheus_client.openmetrics.exposition import generate_latest
    text = generate_latest(reg).decode()
    step_lines = [ln for ln in text.splitlines()
                  if ln.startswith("cachescope_decode_step_duration_seconds_bucket") and "# {" in ln]
    violation_lines = [ln for ln in text.splitlines()
                       if ln.startswith('cachescope_violations_total{') and 'owner_mismatch' in ln]
    assert step_lines and "trace_id=" in step_lines[0]
    assert violation_lines and "trace_id=" in violation_lines[0]
