"""Tests for the OpenTelemetry export (cachescope.tracing): span tree, events, errors, cost guards."""

from __future__ import annotations

import logging
import time

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import NoOpTracerProvider, StatusCode

from cachescope import InstrumentedCache
from cachescope import _attributes as A
from cachescope._cache import Cache
from cachescope._sdk import GuardedExporter
from cachescope.tracing import TracingSink

from _loop import NEW_TOKENS, PROMPT, otel_memory, run_decode, run_decode_swapped, tiny_model

LAYERS = 4


def _cache(provider, name: str = "t", **kw) -> InstrumentedCache:
    return InstrumentedCache(name=name, metrics=False, tracer_provider=provider, **kw)


def _by_name(spans, name):
    return [s for s in spans if s.name == name]


def test_span_tree_generate_with_decode_step_children() -> None:
    """One generate span per generation with one decode_step child per token, in the same trace."""
    provider, exporter = otel_memory()
    cache = _cache(provider)
    run_decode(cache)
    spans = exporter.get_finished_spans()
    (gen,) = _by_name(spans, "generate")
    steps = sorted(_by_name(spans, "decode_step"), key=lambda s: s.attributes[A.STEP])
    assert len(steps) == NEW_TOKENS and len(spans) == NEW_TOKENS + 1
    assert gen.parent is None
    assert gen.attributes[A.PROMPT_TOKENS] == len(PROMPT)
    assert gen.attributes[A.MAX_NEW_TOKENS] == NEW_TOKENS
    assert gen.attributes[A.STEPS] == NEW_TOKENS and gen.attributes[A.TOKENS] == NEW_TOKENS
    assert gen.attributes[A.SEQ_LEN] == len(PROMPT) + NEW_TOKENS
    assert gen.attributes[A.CACHE] == "t"
    assert gen.status.status_code is StatusCode.UNSET
    for i, s in enumerate(steps):
        assert s.parent.span_id == gen.context.span_id
        assert s.context.trace_id == gen.context.trace_id
        assert s.attributes[A.STEP] == i
        assert s.attributes.get(A.STATE_PREV) == (None if i == 0 else i - 1)
        assert s.attributes[A.STATE_NEXT] == i
        assert s.attributes[A.TOKENS] == 1
        assert gen.start_time <= s.start_time <= s.end_time <= gen.end_time
    # steps do not overlap
    for a, b in zip(steps, steps[1:]):
        assert a.end_time <= b.start_time


def test_op_events_with_attributes() -> None:
    """Each push/pop is a span event on its step, with queue, family, owner, depth and bytes."""
    provider, exporter = otel_memory()
    cache = _cache(provider)
    run_decode(cache)
    steps = sorted(_by_name(exporter.get_finished_spans(), "decode_step"),
                   key=lambda s: s.attributes[A.STEP])
    first = [e for e in steps[0].events if e.name == "push"]
    assert len(first) == LAYERS and not [e for e in steps[0].events if e.name == "pop"]
    for s in steps[1:]:
        assert len([e for e in s.events if e.name == "pop"]) == LAYERS
        assert len([e for e in s.events if e.name == "push"]) == LAYERS
        assert s.attributes[A.OPS] == len(s.events)
    i = steps[1].attributes[A.STEP]
    push = next(e for e in steps[1].events if e.name == "push")
    pop = next(e for e in steps[1].events if e.name == "pop")
    assert push.attributes[A.QUEUE] == f"attn_kv_{i}" and push.attributes[A.FAMILY] == "attn_kv"
    assert pop.attributes[A.QUEUE] == f"attn_kv_{i - 1}"
    assert push.attributes[A.DEPTH] == 1 and pop.attributes[A.DEPTH] == LAYERS - 1
    # storage bytes only where they differ from logical: the prompt step's v is a view of qkv
    assert push.attributes[A.BYTES_LOGICAL] > 0 and A.BYTES_STORAGE not in push.attributes
    prompt_push = steps[0].events[0]
    assert prompt_push.attributes[A.BYTES_STORAGE] > prompt_push.attributes[A.BYTES_LOGICAL] > 0
    assert "attention" in push.attributes[A.OWNER].lower()
    assert A.PRODUCER not in pop.attributes   # the producer is the owner: said once
    assert A.VIOLATION_KIND not in pop.attributes
    # only plain values: no tensors, no token ids
    for s in steps:
        for e in s.events:
            assert all(isinstance(v, (str, int, float, bool)) for v in e.attributes.values())
            assert all(k.startswith("cachescope.") and k == k.lower() for k in e.attributes)


def test_violation_sets_error_status_and_report_event() -> None:
    """An injected layer swap marks the step span ERROR and adds a cachescope.violation event with the report."""
    provider, exporter = otel_memory()
    cache = _cache(provider)
    run_decode_swapped(cache, step=1)
    assert cache.violations
    spans = exporter.get_finished_spans()
    bad = [s for s in _by_name(spans, "decode_step") if s.status.status_code is StatusCode.ERROR]
    assert [s.attributes[A.STEP] for s in bad] == [2]
    (step,) = bad
    assert "owner_mismatch" in step.status.description
    events = [e for e in step.events if e.name == A.EVENT_VIOLATION]
    assert len(events) == len(cache.violations)
    ev = events[0]
    assert ev.attributes[A.VIOLATION_KIND] == "owner_mismatch"
    assert ev.attributes[A.VIOLATION_REPORT] == cache.violations[0].report()[:A.MAX_REPORT_LEN]
    assert len(ev.attributes[A.VIOLATION_REPORT]) <= A.MAX_REPORT_LEN
    assert step.attributes[A.VIOLATION_COUNT] == len(cache.violations)
    flagged = [e for e in step.events if e.name == "pop" and A.VIOLATION_KIND in e.attributes]
    assert flagged and flagged[0].attributes[A.VIOLATION_KIND] == "owner_mismatch"
    v = cache.violations[0]
    assert flagged[0].attributes[A.OWNER] == v.consumer
    assert flagged[0].attributes[A.PRODUCER] == v.producer != v.consumer
    # the generation itself did not raise
    (gen,) = _by_name(spans, "generate")
    assert gen.status.status_code is StatusCode.UNSET


def test_report_text_is_truncated() -> None:
    """A huge violation report is cut to MAX_REPORT_LEN characters in the event."""
    provider, exporter = otel_memory()
    cache = _cache(provider)
    sink = cache.tracer

    class Huge:
        kind, queue, family, step, consumer, producer, hint = "pop_empty", "q" * 5000, "q", 0, None, None, ""

        def report(self):
            return "x" * 100_000

    cache.mark_step(None, 0)
    sink.on_violation(cache, Huge())
    cache.end_step()
    (step,) = exporter.get_finished_spans()
    ev = step.events[-1]
    assert len(ev.attributes[A.VIOLATION_REPORT]) == A.MAX_REPORT_LEN
    assert len(ev.attributes[A.QUEUE]) <= A.MAX_STR_LEN


def test_steps_outside_a_generation_have_no_parent() -> None:
    """A loop that sets state_ids without generation() still gets root decode_step spans."""
    provider, exporter = otel_memory()
    cache = _cache(provider)
    model = tiny_model()
    import torch
    with torch.no_grad(), model.using_cache(cache):
        cache.set("use_cache", True)
        cache.set("state_ids", (None, 0))
        model(torch.tensor([PROMPT]))
        cache.end_step(tokens=1)
        cache.set("state_ids", (0, 1))
        model(torch.tensor([[5]]))
        cache.end_step(tokens=1)
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["decode_step", "decode_step"]
    assert all(s.parent is None for s in spans)
    assert spans[0].context.trace_id != spans[1].context.trace_id
    assert len([e for e in spans[1].events if e.name == "pop"]) == LAYERS


def test_generation_error_is_recorded() -> None:
    """An exception inside the generation ends its spans and marks generate ERROR with the exception event."""
    provider, exporter = otel_memory()
    cache = _cache(provider)

    def boom(i, _t):
        if i == 1:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        run_decode(cache, on_step=boom)
    spans = exporter.get_finished_spans()
    (gen,) = _by_name(spans, "generate")
    assert gen.status.status_code is StatusCode.ERROR
    assert "RuntimeError: stop here" in gen.status.description
    assert any(e.name == "exception" for e in gen.events)
    assert len(_by_name(spans, "decode_step")) == 2
    assert all(s.end_time is not None for s in spans)


def test_no_provider_path_works_and_is_cheap() -> None:
    """With the no-op provider nothing records, add_op returns at once, and tokens are unchanged."""
    cache = _cache(NoOpTracerProvider())
    sink = cache.tracer
    assert isinstance(sink, TracingSink)
    assert run_decode(cache) == run_decode(Cache())
    assert sink.trace_id() is None
    cache.mark_step(None, 0)
    assert sink._event_span is None
    rec = cache.timeline()[-1]
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        sink.add_op(cache, rec)
    per_call = (time.perf_counter() - t0) / n
    assert per_call < 5e-6, f"no-op add_op took {per_call * 1e9:.0f} ns"
    # the global (proxy) provider path works too
    assert run_decode(InstrumentedCache(name="global", metrics=False)) == run_decode(Cache())


def test_sampled_out_traces_skip_events() -> None:
    """A sampler that drops the trace makes the step spans non-recording, so ops are not turned into events."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
    provider = TracerProvider(sampler=ALWAYS_OFF)
    cache = _cache(provider)
    cache.mark_step(None, 0)
    assert cache.tracer._event_span is None and cache.tracer.trace_id() is None


class RaisingExporter(SpanExporter):
    def __init__(self):
        self.calls = 0

    def export(self, spans):
        self.calls += 1
        raise ConnectionError("collector exploded")

    def shutdown(self):
        pass


def test_raising_exporter_does_not_break_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    """An exporter that raises on every span leaves tokens unchanged and is logged once."""
    raising = RaisingExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(GuardedExporter(raising)))
    cache = _cache(provider)
    with caplog.at_level(logging.WARNING):
        assert run_decode(cache) == run_decode(Cache())
    assert raising.calls == NEW_TOKENS + 1
    ours = [r for r in caplog.records if "RaisingExporter" in r.getMessage()]
    assert len(ours) == 1
    # an unguarded raising exporter is swallowed by the SDK: the loop still gives the same tokens
    provider2 = TracerProvider()
    provider2.add_span_processor(SimpleSpanProcessor(RaisingExporter()))
    logging.getLogger("opentelemetry").disabled = True
    try:
        assert run_decode(_cache(provider2, "t2")) == run_decode(Cache())
    finally:
        logging.getLogger("opentelemetry").disabled = False


def test_raising_span_processor_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    """A span processor that raises on span end is caught by the cache, counted, logged once, and tracing recovers."""
    class BadProcessor(SimpleSpanProcessor):
        def on_end(self, span):
            raise RuntimeError("processor broke")

    provider, exporter = otel_memory()
    provider.add_span_processor(BadProcessor(exporter))
    cache = _cache(provider)
    with caplog.at_level(logging.WARNING, logger="cachescope"):
        assert run_decode(cache) == run_decode(Cache())
    assert cache.stats.telemetry_errors["TracingSink"] >= NEW_TOKENS
    assert len([r for r in caplog.records if "TracingSink" in r.getMessage()]) <= 3  # once per method
    # every span still ended exactly once (the in-memory processor ran before the bad one)
    names = [s.name for s in exporter.get_finished_spans()]
    assert names.count("decode_step") == NEW_TOKENS and names.count("generate") == 1
    assert cache.tracer._step_span is None and cache.tracer._gen_span is None


def test_sink_keeps_no_tensor_references() -> None:
    """After a traced decode the sink holds no tensors (nothing but names, spans and ints)."""
    import gc

    import torch
    provider, _ = otel_memory()
    cache = _cache(provider)
    run_decode(cache)
    sink = cache.tracer
    seen = [r for r in gc.get_referents(*vars(sink).values())]
    assert not [o for o in seen if isinstance(o, torch.Tensor)]


def test_trace_id_for_metrics_exemplars() -> None:
    """trace_id(step) gives the hex trace id of the step's span while open and just after it ends."""
    provider, exporter = otel_memory()
    cache = _cache(provider)
    cache.mark_step(None, 0)
    step = cache.current_step
    tid = cache.tracer.trace_id(step)
    assert tid is not None and len(tid) == 32
    cache.end_step(tokens=1)
    assert cache.tracer.trace_id(step) == tid
    (span,) = exporter.get_finished_spans()
    assert format(span.context.trace_id, "032x") == tid
    other = type(step)(99, None, None, 0.0, 0.0)
    assert cache.tracer.trace_id(other) is None


def test_long_names_are_truncated() -> None:
    """Queue names and owners longer than MAX_STR_LEN are cut in attributes."""
    provider, exporter = otel_memory()
    cache = _cache(provider)
    cache.mark_step(None, 0)
    cache.push("q" * 1000, 1)
    cache.end_step()
    (span,) = exporter.get_finished_spans()
    push = next(e for e in span.events if e.name == "push")
    assert len(push.attributes[A.QUEUE]) == A.MAX_STR_LEN


def test_op_events_can_be_turned_off() -> None:
    """With op_events=False steps get spans without op events, and violations are still reported."""
    provider, exporter = otel_memory()
    cache = _cache(provider)
    cache.tracer.op_events = False
    run_decode_swapped(cache, step=1)
    spans = exporter.get_finished_spans()
    steps = _by_name(spans, "decode_step")
    assert len(steps) == NEW_TOKENS
    assert {e.name for s in spans for e in s.events} == {A.EVENT_VIOLATION}
    assert [s.attributes[A.STEP] for s in steps if s.status.status_code is StatusCode.ERROR] == [2]


def test_generation_info_keeps_numbers_only() -> None:
    """generation(**info) numbers become attributes; strings and lists (prompt text, token ids) do not."""
    provider, exporter = otel_memory()
    cache = _cache(provider)
    with cache.generation(prompt_tokens=3, temperature=0.5, greedy=True, prompt="secret text",
                          ids=[1, 2, 3]):
        pass
    (gen,) = exporter.get_finished_spans()
    assert gen.attributes[A.PROMPT_TOKENS] == 3
    assert gen.attributes[A.GENERATION_PREFIX + "temperature"] == 0.5
    assert gen.attributes[A.GENERATION_PREFIX + "greedy"] is True
    assert not any("secret" in str(v) for v in gen.attributes.values())
    assert A.GENERATION_PREFIX + "ids" not in gen.attributes


def test_op_events_are_added_per_step_in_op_order_with_op_times() -> None:
    """The tracer has no on_op; each step span still gets one event per op, in op order,
    stamped with the op's own time, and the ops between steps go to the generate span."""
    provider, exporter = otel_memory()
    cache = _cache(provider)
    assert not hasattr(cache.tracer, "on_op")
    run_decode(cache)
    spans = exporter.get_finished_spans()
    recs = {r.seq: r for r in cache.timeline()}
    steps = sorted(_by_name(spans, A.SPAN_DECODE_STEP), key=lambda s: s.attributes[A.STEP])
    assert [e.name for e in steps[0].events] == ["push"] * LAYERS
    for span in steps[1:]:
        assert [e.name for e in span.events] == ["pop", "push"] * LAYERS
    for span in steps + _by_name(spans, A.SPAN_GENERATE):
        seqs = [e.attributes[A.SEQ] for e in span.events]
        assert seqs == sorted(seqs)
        for e in span.events:
            rec = recs.get(e.attributes[A.SEQ])
            if rec is not None:
                assert e.timestamp == int(rec.time * 1_000_000_000) and e.name == rec.op
    (gen,) = _by_name(spans, A.SPAN_GENERATE)
    assert {e.name for e in gen.events} == {"set"}
    assert cache.tracer.ops_dropped == 0


def test_ops_that_left_the_timeline_are_counted_on_the_span() -> None:
    """With a timeline smaller than a step's ops, the oldest ops have no event; the step span says
    how many (cachescope.ops_dropped) and the newest still are events."""
    provider, exporter = otel_memory()
    cache = _cache(provider, timeline_size=3)
    run_decode(cache)
    steps = sorted(_by_name(exporter.get_finished_spans(), A.SPAN_DECODE_STEP),
                   key=lambda s: s.attributes[A.STEP])
    later = steps[1]
    assert later.attributes[A.OPS] == 2 * LAYERS
    assert len(later.events) == 3 and later.attributes[A.OPS_DROPPED] == 2 * LAYERS - 3
    assert [e.name for e in later.events] == ["push", "pop", "push"]
    assert cache.tracer.ops_dropped > 0


def test_step_opening_set_is_the_step_span_not_an_event() -> None:
    """The state_ids set that opens a step has no op event (its decode_step span shows it); the
    generate span keeps the use_cache set and the end-of-generation check, and a bad state_ids
    set is still reported by its violation event."""
    provider, exporter = otel_memory()
    cache = _cache(provider)
    run_decode(cache)
    spans = exporter.get_finished_spans()
    (gen,) = _by_name(spans, A.SPAN_GENERATE)
    assert [(e.name, e.attributes[A.QUEUE]) for e in gen.events] == [("set", "use_cache"),
                                                                      ("set", "<end>")]
    steps = _by_name(spans, A.SPAN_DECODE_STEP)
    assert len(steps) == NEW_TOKENS
    assert not [e for s in steps for e in s.events if e.name == "set"]
    # a typo in the loop: no op event either, and a violation event on the span
    exporter.clear()
    with cache.generation():
        cache.set("state_ids", "(0, 1)")
    events = [e for s in exporter.get_finished_spans() for e in s.events]
    assert not [e for e in events if e.name == "set" and e.attributes[A.QUEUE] == "state_ids"]
    assert [e.attributes[A.VIOLATION_KIND] for e in events
            if e.name == A.EVENT_VIOLATION] == ["bad_state_ids"]
