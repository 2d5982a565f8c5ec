"""Per-rank telemetry of multi-rank runs (issue #19): rank labels on every series, the file_sd
targets file, one trace for all ranks of a generation, and the dashboard's rank panels and rank
alerts against a real Prometheus scraping two rank processes through that file."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import NoOpTracerProvider, StatusCode
from prometheus_client import CollectorRegistry, generate_latest

from cachescope import InstrumentedCache, Violation
from cachescope import _attributes as A
from cachescope import tracing
from cachescope._filesd import DEFAULT_JOB, remove_targets, write_targets
from cachescope.metrics import RANK_LABELS, rank_labels

from _prom import (
    GRAFANA_SUBSTITUTIONS,
    HF_ROW,
    PROMTOOL,
    ROOT,
    PromHandle,
    label_values,
    load_dashboard,
    require_binary,
    rule_exprs,
    shipped_config,
    start_prometheus,
    substitute,
    variable_queries,
    wait_for_every_panel_query,
)

LAYERS = 2


def decode_step(cache: InstrumentedCache, i: int, layers: int = LAYERS) -> None:
    """One decode step the way NeoX layers use the cache: each layer pops its previous K/V and
    pushes the new one (no torch: plain values)."""
    cache.set("state_ids", (None if i == 0 else i - 1, i))
    for layer in range(layers):
        with cache.owner(f"layers.{layer}.attention"):
            if i:
                cache.pop(f"attn_kv_{i - 1}")
            cache.push(f"attn_kv_{i}", (layer, i))
    cache.end_step(tokens=1)


def rank_violation(kind: str = "rank_divergence", rank: int = 1, peer: int | None = 0) -> Violation:
    """A cross-rank violation as cachescope.distributed records it on a cache."""
    return Violation(kind=kind, queue="attn_kv_3", family="attn_kv", step=3,
                     consumer="layers.1.attention", producer=None, rank=rank, peer=peer,
                     detail=f"rank {rank} and rank {peer} disagree")


# -- metrics: rank labels on every series ----------------------------------------------------


def test_rank_labels_reach_every_series() -> None:
    """rank/tp_rank/pp_rank const labels sit on every sample, histogram and error series too."""
    registry = CollectorRegistry()
    cache = InstrumentedCache(name="decoder", registry=registry, tracing=False,
                              const_labels=rank_labels(3, 1, 1))
    for i in range(3):
        decode_step(cache, i)
    cache.add_violation(rank_violation())
    samples = [s for m in registry.collect() for s in m.samples]
    assert {s.name for s in samples} >= {
        "cachescope_ops_total", "cachescope_decode_steps_total",
        "cachescope_decode_step_duration_seconds_bucket", "cachescope_violations_total",
        "cachescope_telemetry_errors_total", "cachescope_queue_depth"}
    for s in samples:
        assert {k: s.labels.get(k) for k in RANK_LABELS} == {
            "rank": "3", "tp_rank": "1", "pp_rank": "1"}, s


def test_cross_rank_kinds_are_counted_in_the_violations_counter() -> None:
    """add_violation(rank_*) counts under its kind; both rank kinds are exported from 0."""
    registry = CollectorRegistry()
    cache = InstrumentedCache(name="decoder", registry=registry, tracing=False,
                              const_labels=rank_labels(0))
    decode_step(cache, 0)
    labels = {"cache": "decoder", "family": "attn_kv", **rank_labels(0)}
    for kind in ("rank_divergence", "rank_stalled"):
        assert registry.get_sample_value(
            "cachescope_violations_total", {**labels, "kind": kind}) == 0, kind
    cache.add_violation(rank_violation("rank_divergence"))
    cache.add_violation(rank_violation("rank_divergence"))
    cache.add_violation(rank_violation("rank_stalled", rank=2, peer=0))
    assert registry.get_sample_value(
        "cachescope_violations_total", {**labels, "kind": "rank_divergence"}) == 2
    assert registry.get_sample_value(
        "cachescope_violations_total", {**labels, "kind": "rank_stalled"}) == 1


def test_rank_exposition_passes_promtool_check_metrics() -> None:
    """promtool check metrics accepts a rank's exposition (rank labels, rank kinds)."""
    promtool = require_binary("promtool", PROMTOOL)
    registry = CollectorRegistry()
    cache = InstrumentedCache(name="decoder", registry=registry, tracing=False,
                              const_labels=rank_labels(1, 1, 0))
    for i in range(3):
        decode_step(cache, i)
    cache.add_violation(rank_violation())
    proc = subprocess.run([promtool, "check", "metrics"], input=generate_latest(registry),
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rank_labels_values_and_errors() -> None:
    """rank_labels gives string values in RANK_LABELS order and rejects bad ranks."""
    assert rank_labels(5, 1, 2) == {"rank": "5", "tp_rank": "1", "pp_rank": "2"}
    assert list(rank_labels(0)) == list(RANK_LABELS)
    for bad in ((-1,), ("0",), (True,), (0, None)):
        with pytest.raises(ValueError, match="non-negative int"):
            rank_labels(*bad)


# -- file_sd targets ---------------------------------------------------------------------------


def test_write_targets_one_group_per_rank(tmp_path: Path) -> None:
    """One target group per rank with its rank labels and job; parents created; file is 0644."""
    path = tmp_path / "sub" / "ranks.json"
    out = write_targets(path, [("127.0.0.1", 9470), ("::1", 9471)],
                        [rank_labels(0), rank_labels(1, 1, 0)])
    assert out == path
    groups = json.loads(path.read_text())
    assert groups == [
        {"targets": ["127.0.0.1:9470"],
         "labels": {"job": DEFAULT_JOB, "rank": "0", "tp_rank": "0", "pp_rank": "0"}},
        {"targets": ["[::1]:9471"],
         "labels": {"job": DEFAULT_JOB, "rank": "1", "tp_rank": "1", "pp_rank": "0"}},
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(path.parent) == ["ranks.json"]  # no temporary file left behind


def test_write_targets_job_and_replacement(tmp_path: Path) -> None:
    """job= sets the job label (a job in the labels wins); a rewrite replaces the whole file."""
    path = tmp_path / "ranks.json"
    write_targets(path, [("h", 1), ("h", 2)], [{"rank": 0}, {"rank": 1, "job": "mine"}], job="j")
    assert [g["labels"]["job"] for g in json.loads(path.read_text())] == ["j", "mine"]
    write_targets(path, [("h", 3)])
    assert json.loads(path.read_text()) == [{"targets": ["h:3"], "labels": {"job": "cachescope"}}]
    assert remove_targets(path) and not path.exists()
    assert remove_targets(path) is False


@pytest.mark.parametrize(
    ("targets", "labels", "message"),
    [
        ([("h", 1)], [{}, {}], "2 entries for 1 targets"),
        ([("h", 0)], None, "port must be an int in 1..65535"),
        ([("h", "80")], None, "port must be an int"),
        ([("", 80)], None, "host must be a non-empty"),
        ([("h", 1, 2)], None, r"must be a \(host, port\) pair"),
        ([("h", 1), ("h", 1)], None, "each rank needs its own metrics port"),
        ([("h", 1)], [{"bad-name": 1}], "invalid Prometheus label name"),
    ],
)
def test_write_targets_rejects_bad_arguments_and_keeps_the_old_file(
    tmp_path: Path, targets, labels, message
) -> None:
    """Bad targets or labels raise ValueError naming the entry; the previous file stays intact."""
    path = tmp_path / "ranks.json"
    write_targets(path, [("h", 9)])
    before = path.read_text()
    with pytest.raises(ValueError, match=message):
        write_targets(path, targets, labels)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["ranks.json"]


# -- tracing: rank attributes and one trace per generation across ranks ---------------------


def _provider(sampler=None) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler) if sampler is not None else TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _sampled(traceparent: str) -> bool:
    """The sampled bit of a W3C traceparent's flags (bit 1 is the 'random trace id' flag)."""
    return bool(int(traceparent.rsplit("-", 1)[1], 16) & 1)


def _rank_cache(provider, rank: int, tp_rank: int, pp_rank: int = 0) -> InstrumentedCache:
    """A rank's cache with the tracer its constructor attached, given the rank's attributes."""
    cache = InstrumentedCache(name="decoder", metrics=False, tracer_provider=provider)
    cache.tracer.attributes = tracing.rank_attributes(rank, tp_rank, pp_rank)
    return cache


def _generate(cache: InstrumentedCache, steps: int = 2, **info) -> None:
    with cache.generation(prompt_tokens=3, max_new_tokens=steps, **info):
        for i in range(steps):
            decode_step(cache, i)


def test_ranks_sharing_a_traceparent_join_one_trace() -> None:
    """Two rank caches given rank 0's traceparent put their spans in its trace, under its root."""
    root_provider, root_exporter = _provider()
    provider0, exporter0 = _provider()   # one SDK per rank, as in separate processes
    provider1, exporter1 = _provider()
    with tracing.start_rank_trace(root_provider, attributes={"cachescope.world_size": 2}) as root:
        tp = root.traceparent
        assert tp and tp.startswith("00-") and _sampled(tp)
        _generate(_rank_cache(provider0, 0, 0), traceparent=tp)
        _generate(_rank_cache(provider1, 1, 1), traceparent=tp)
    (root_span,) = root_exporter.get_finished_spans()
    assert root_span.name == tracing.SPAN_PARALLEL_GENERATE
    assert root_span.attributes["cachescope.world_size"] == 2
    trace_id = root_span.context.trace_id
    for rank, exporter in ((0, exporter0), (1, exporter1)):
        spans = exporter.get_finished_spans()
        (gen,) = [s for s in spans if s.name == A.SPAN_GENERATE]
        steps = [s for s in spans if s.name == A.SPAN_DECODE_STEP]
        assert len(steps) == 2
        assert gen.parent is not None and gen.parent.is_remote
        assert gen.parent.span_id == root_span.context.span_id
        assert "traceparent" not in str(dict(gen.attributes))   # never an attribute
        for s in [gen, *steps]:
            assert s.context.trace_id == trace_id, (rank, s.name)
            assert s.attributes[tracing.RANK] == rank
            assert s.attributes[tracing.TP_RANK] == rank
            assert s.attributes[tracing.PP_RANK] == 0
            assert s.attributes[A.CACHE] == "decoder"
        for s in steps:
            assert s.parent.span_id == gen.context.span_id


def test_default_traceparent_and_current_traceparent() -> None:
    """sink.traceparent is joined by generations without their own; current_traceparent names
    the running generate span, so another cache can join a rank's own generation."""
    provider, exporter = _provider()
    lead = _rank_cache(provider, 0, 0)
    follower = _rank_cache(provider, 1, 1)
    with lead.generation(prompt_tokens=1):
        tp = lead.tracer.current_traceparent()
        follower.tracer.traceparent = tp
        _generate(follower)
        _generate(follower)   # every following generation joins it
    assert lead.tracer.current_traceparent() is None
    spans = exporter.get_finished_spans()
    lead_gen = [s for s in spans if s.name == A.SPAN_GENERATE and s.attributes[tracing.RANK] == 0]
    joined = [s for s in spans if s.name == A.SPAN_GENERATE and s.attributes[tracing.RANK] == 1]
    assert len(lead_gen) == 1 and len(joined) == 2
    for s in joined:
        assert s.context.trace_id == lead_gen[0].context.trace_id
        assert s.parent.span_id == lead_gen[0].context.span_id
    # the generation's own traceparent wins over the sink's
    other = tracing.new_traceparent(provider)
    exporter.clear()
    _generate(follower, traceparent=other)
    (gen,) = [s for s in exporter.get_finished_spans() if s.name == A.SPAN_GENERATE]
    assert format(gen.context.trace_id, "032x") == other.split("-")[1]


def test_malformed_traceparent_is_logged_once_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    """A traceparent that is not W3C leaves the generation a trace of its own, with one warning."""
    provider, exporter = _provider()
    cache = _rank_cache(provider, 0, 0)
    with caplog.at_level(logging.WARNING, logger="cachescope"):
        _generate(cache, traceparent="not-a-traceparent")
        _generate(cache, traceparent="00-" + "0" * 32 + "-" + "0" * 16 + "-01")
    warnings = [r for r in caplog.records if "is not a W3C traceparent" in r.getMessage()]
    assert len(warnings) == 1
    gens = [s for s in exporter.get_finished_spans() if s.name == A.SPAN_GENERATE]
    assert len(gens) == 2 and all(g.parent is None for g in gens)
    assert gens[0].context.trace_id != gens[1].context.trace_id


def test_unsampled_root_is_unsampled_on_every_rank() -> None:
    """A root the sampler dropped still names the trace (unsampled flag); ranks drop theirs too."""
    root_provider, root_exporter = _provider(sampler=ALWAYS_OFF)
    tp = tracing.new_traceparent(root_provider)
    assert tp is not None and not _sampled(tp)
    provider, exporter = _provider(sampler=ParentBased(ALWAYS_OFF))
    _generate(_rank_cache(provider, 1, 1), traceparent=tp)
    assert root_exporter.get_finished_spans() == () and exporter.get_finished_spans() == ()


def test_no_sdk_gives_no_traceparent() -> None:
    """Without an SDK there is nothing to join: new_traceparent returns None."""
    assert tracing.new_traceparent(NoOpTracerProvider()) is None
    with tracing.start_rank_trace(NoOpTracerProvider()) as root:
        assert root.traceparent is None


def test_rank_trace_records_an_error_on_exit() -> None:
    """An exception leaving the start_rank_trace block marks the root span ERROR."""
    provider, exporter = _provider()
    with pytest.raises(RuntimeError):
        with tracing.start_rank_trace(provider):
            raise RuntimeError("rank 1 died")
    (root,) = exporter.get_finished_spans()
    assert root.status.status_code is StatusCode.ERROR
    assert "rank 1 died" in root.status.description


def test_attributes_are_validated_and_settable() -> None:
    """Unusable attributes raise ValueError (also with on_error='log'); sink.attributes changes
    the next spans; the sink's own keys win over a constant of the same name."""
    cache = InstrumentedCache(name="decoder", metrics=False, tracing=False)
    for bad in ({"cachescope.rank": [1]}, {"": 1}, {1: 1}, ["x"]):
        with pytest.raises(ValueError):
            tracing.trace(cache, attributes=bad, on_error="log")
    assert cache.sinks == ()
    provider, exporter = _provider()
    sink = tracing.trace(cache, provider)
    sink.attributes = {**tracing.rank_attributes(4), A.CACHE: "other", "note": "x" * 300}
    assert sink.attributes[tracing.RANK] == 4
    _generate(cache, steps=1)
    for s in exporter.get_finished_spans():
        assert s.attributes[tracing.RANK] == 4 and tracing.TP_RANK not in s.attributes
        assert s.attributes[A.CACHE] == "decoder"
        assert len(s.attributes["note"]) == A.MAX_STR_LEN
    with pytest.raises(ValueError):
        sink.attributes = {"x": object()}
    assert sink.attributes[tracing.RANK] == 4   # unchanged


def test_cross_rank_violation_event_names_the_ranks() -> None:
    """A rank_* violation on the current step carries the rank it concerns and the peer."""
    provider, exporter = _provider()
    cache = _rank_cache(provider, 0, 0)
    with cache.generation(prompt_tokens=1):
        decode_step(cache, 0)
        cache.set("state_ids", (0, 1))
        cache.add_violation(rank_violation("rank_stalled", rank=1, peer=0))
        cache.end_step(tokens=1)
    (step,) = [s for s in exporter.get_finished_spans()
               if s.name == A.SPAN_DECODE_STEP and s.attributes[A.STEP] == 1]
    (event,) = [e for e in step.events if e.name == A.EVENT_VIOLATION]
    assert event.attributes[A.VIOLATION_KIND] == "rank_stalled"
    assert event.attributes[tracing.VIOLATION_RANK] == 1
    assert event.attributes[tracing.VIOLATION_PEER] == 0
    assert step.status.status_code is StatusCode.ERROR


def test_violations_from_another_thread_during_steps() -> None:
    """Violations added by a watcher thread while the loop steps leave every span whole."""
    provider, exporter = _provider()
    cache = InstrumentedCache(name="decoder", metrics=False, tracing=False)
    tracing.trace(cache, provider, attributes=tracing.rank_attributes(0, 0, 0))
    stop = threading.Event()

    def watcher() -> None:
        while not stop.is_set():
            cache.add_violation(rank_violation())
            time.sleep(0.0005)

    thread = threading.Thread(target=watcher)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # interleave the two threads as often as possible
    thread.start()
    try:
        for _ in range(5):
            _generate(cache, steps=20)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(switch)
    assert cache.stats.telemetry_errors == {}
    spans = exporter.get_finished_spans()
    seqs = [e.attributes[A.SEQ] for s in spans for e in s.events if A.SEQ in e.attributes]
    assert len(seqs) == len(set(seqs)) == 5 * (20 * 2 * LAYERS - LAYERS + 1)   # each op once
    assert len([s for s in spans if s.name == A.SPAN_GENERATE]) == 5
    assert len([s for s in spans if s.name == A.SPAN_DECODE_STEP]) == 100
    assert sum(len([e for e in s.events if e.name == A.EVENT_VIOLATION]) for s in spans) > 0


# -- a real Prometheus scraping two rank processes through the file_sd file -----------------

#: A rank process: serves its cache's metrics (rank const labels) on a free port, prints it,
#: decodes a step every 20 ms until ``stop_after`` steps (-1: forever), records a
#: rank_divergence at step ``diverge_at`` (-1: never), and exits when its stdin closes.
WORKER = r"""
import os, sys, threading, time
from cachescope import InstrumentedCache, Violation
from cachescope.metrics import rank_labels, start_metrics_server

def decode_step(cache, i, layers=2):  # as in test_rank_telemetry.decode_step
    cache.set("state_ids", (None if i == 0 else i - 1, i))
    for layer in range(layers):
        with cache.owner(f"layers.{layer}.attention"):
            if i:
                cache.pop(f"attn_kv_{i - 1}")
            cache.push(f"attn_kv_{i}", (layer, i))
    cache.end_step(tokens=1)

rank, tp_rank, stop_after, diverge_at = (int(a) for a in sys.argv[1:5])
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
cache = InstrumentedCache(name="decoder", tracing=False, const_labels=rank_labels(rank, tp_rank, 0))
server, _thread, port = start_metrics_server(0)
print(port, flush=True)
step = 0
while True:
    if stop_after < 0 or step < stop_after:
        decode_step(cache, step)
        if step == diverge_at:
            cache.add_violation(Violation(
                kind="rank_divergence", queue=f"attn_kv_{step}", family="attn_kv", step=step,
                consumer=None, producer=None, rank=rank, peer=0))
        step += 1
    time.sleep(0.02)
"""


def start_rank(
    rank: int, tp_rank: int, stop_after: int, diverge_at: int
) -> tuple[subprocess.Popen, int]:
    """Start a rank process; returns it and its metrics port."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(rank), str(tp_rank), str(stop_after), str(diverge_at)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        pytest.fail(f"rank {rank} process did not start: {line}{proc.stderr.read()}")
    return proc, int(line)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Iterator[tuple[PromHandle, dict[str, int]]]:
    """Rank 0 decodes on; rank 1 stops after 5 steps and found a rank_divergence at step 3.
    The shipped prometheus.yml, its file_sd job pointed at the file write_targets wrote."""
    require_binary("prometheus")
    tmp = tmp_path_factory.mktemp("ranks")
    procs = []
    try:
        procs.append(start_rank(0, 0, -1, -1))
        procs.append(start_rank(1, 1, 5, 3))
        ports = {str(r): port for r, (_, port) in enumerate(procs)}
        targets = tmp / "targets" / "cachescope-ranks.json"
        write_targets(targets, [("127.0.0.1", p) for p in ports.values()],
                      [rank_labels(0, 0, 0), rank_labels(1, 1, 0)])
        config = shipped_config(tmp / "targets" / "*.json")
        with start_prometheus([], tmp, config=config) as prom:
            prom.wait_for('count(up{job="cachescope"} == 1) == 2', timeout=30)
            yield prom, ports
    finally:
        for proc, _ in procs:
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            proc.stdout.close()
            proc.stderr.close()


def _panel(title: str) -> dict:
    (panel,) = [p for p in load_dashboard()["panels"] if p["title"] == title]
    return panel


def test_targets_and_series_carry_the_rank_labels(ranks) -> None:
    """up has the file_sd rank labels; every cachescope series keeps the exposition's rank
    labels (honor_labels: no exported_rank copies); the rank variable lists both ranks."""
    prom, ports = ranks
    up = prom.query('up{job="cachescope"}')
    assert sorted((u["metric"]["rank"], u["metric"]["tp_rank"], u["metric"]["instance"])
                  for u in up) == [("0", "0", f"127.0.0.1:{ports['0']}"),
                                   ("1", "1", f"127.0.0.1:{ports['1']}")]
    prom.wait_for('count(cachescope_decode_steps_total{rank="1"}) == 1', timeout=30)
    assert prom.query('count({__name__=~"cachescope_.+", rank=""})') == []
    assert prom.query('count({exported_rank!=""})') == []
    rows = prom.query("count by (rank, tp_rank, pp_rank) (cachescope_ops_total)")
    assert sorted((r["metric"]["rank"], r["metric"]["tp_rank"]) for r in rows) == [
        ("0", "0"), ("1", "1")]
    rank_var = variable_queries(load_dashboard())[-1]
    assert label_values(prom, rank_var) == ["0", "1"]


def test_every_panel_query_returns_data_for_ranks(ranks) -> None:
    """Every panel of the dashboard returns data for the two rank processes."""
    prom, _ = ranks
    wait_for_every_panel_query(prom, load_dashboard(), timeout=60, exclude_rows=(HF_ROW,))


def test_per_rank_panels_select_one_rank(ranks) -> None:
    """With the rank variable set, the per-rank panels show that rank only."""
    prom, _ = ranks
    for title in ("Tokens / s by rank", "Decode step latency p95 by rank",
                  "Violations by rank (cumulative)", "Cross-rank violations (cumulative)"):
        expr = _panel(title)["targets"][0]["expr"]
        for rank in ("0", "1"):
            result = prom.wait_for(substitute(expr, dict(GRAFANA_SUBSTITUTIONS, rank=rank)),
                                   timeout=30)
            assert {r["metric"]["rank"] for r in result} == {rank}, (title, result)


def test_cross_rank_violation_panel_and_alert(ranks) -> None:
    """The cross-rank panel counts rank 1's rank_divergence (rank 0: 0); CachescopeRankViolation
    fires for rank 1 only and the pop-order alert stays silent."""
    prom, ports = ranks
    expr = substitute(_panel("Cross-rank violations (cumulative)")["targets"][0]["expr"])
    rows = prom.wait_for(expr, timeout=30, predicate=lambda r: len(r) == 4)
    values = {(r["metric"]["rank"], r["metric"]["kind"]): float(r["value"][1]) for r in rows}
    assert values == {("0", "rank_divergence"): 0, ("0", "rank_stalled"): 0,
                      ("1", "rank_divergence"): 1, ("1", "rank_stalled"): 0}
    firing = prom.wait_for(
        'ALERTS{alertname="CachescopeRankViolation", alertstate="firing"}', timeout=30)
    assert [(a["metric"]["rank"], a["metric"]["kind"], a["metric"]["instance"])
            for a in firing] == [("1", "rank_divergence", f"127.0.0.1:{ports['1']}")]
    assert prom.query('ALERTS{alertname="CachescopePopOrderViolation"}') == []


def test_step_skew_panel_and_rule_expression(ranks) -> None:
    """The skew panel grows while rank 0 decodes on and rank 1 stopped at step 5; the
    CachescopeRankStepSkew expression evaluates against the live series."""
    prom, _ = ranks
    expr = substitute(_panel("Decode step skew across ranks")["targets"][0]["expr"])
    (row,) = prom.wait_for(expr, timeout=30,
                           predicate=lambda r: len(r) == 1 and float(r[0]["value"][1]) >= 20)
    assert row["metric"] == {"job": "cachescope", "cache": "decoder"}
    (rule,) = [e for name, e in rule_exprs() if name == "CachescopeRankStepSkew"]
    prom.query(rule)   # raises on an evaluation error (e.g. many-to-many matching)


def test_live_rank_exposition_passes_promtool(ranks) -> None:
    """promtool check metrics accepts each rank's live /metrics page."""
    _, ports = ranks
    promtool = require_binary("promtool", PROMTOOL)
    for rank, port in ports.items():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            page = resp.read()
        assert f'rank="{rank}"'.encode() in page
        proc = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
