"""OpenTelemetry export: a ``generate`` span per generation, a ``decode_step`` child span per step,
each cache op as a span event on its step, violations as ERROR status plus a report event.

Depends on ``opentelemetry-api`` only. Without a configured SDK (or with ``tracer_provider`` set to
the API's no-op provider) no step spans are made. Op events are added in batches from the cache's
timeline when their span changes (see ``_flush``). See docs/tracing.md.
"""

from __future__ import annotations


import logging
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import Span, Status, StatusCode

from . import _attributes as A
from ._records import OpRecord, StepInfo

__all__ = ["TracingSink", "trace"]

log = logging.getLogger("cachescope")

_NS = 1_000_000_000
_MARK_STEP = "<mark_step>"   # the queue name of mark_step's record


def _trunc(s: Any, limit: int = A.MAX_STR_LEN) -> str:
    if type(s) is not str:
        try:
            s = str(s)
        except Exception:
            s = f"<{type(s).__name__}>"
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _state_value(x: Any) -> int | str | None:
    """A state id as an attribute value: ints stay ints, anything else becomes a short string."""
    if x is None:
        return None
    if type(x) is int or type(x) is bool:
        return int(x)
    if type(x) is str:
        return _trunc(x)
    return _trunc(f"<{type(x).__name__}>" if hasattr(x, "shape") else x)  # never tensor contents


def _number(x: Any) -> bool | int | float | None:
    """Numbers and flags only: strings in ``generation(**info)`` may be prompt text."""
    return x if type(x) in (bool, int, float) else None


def _trace_hex(span: Span) -> str | None:
    ctx = span.get_span_context()
    if ctx.is_valid and ctx.trace_flags.sampled:
        return format(ctx.trace_id, "032x")
    return None


class TracingSink:
    """Cache sink that turns generations, steps, ops and violations into OpenTelemetry spans.

    ``tracer_provider=None`` uses the global provider (a no-op until the application configures
    the SDK). Keeps no reference to the cache (only its name) and none to tensors.
    """

    # No ``on_op``: the cache calls this sink at step and generation boundaries and on violations
    # only. Op events are added then, in a batch, from ``cache.ops_since()`` with each op's own
    # timestamp: the same events, and no Python per op.

    def __init__(self, cache: Any, tracer_provider: Any = None, op_events: bool = True) -> None:
        from . import __version__
        #: record each cache op as a span event (the main cost of tracing; see docs/tracing.md).
        #: Takes effect at the next step or generation.
        self.op_events = bool(op_events)
        self._tracer = otel_trace.get_tracer("cachescope", __version__, tracer_provider=tracer_provider)
        #: the API's no-op provider was given: no span would ever record
        self._noop_provider = isinstance(tracer_provider, otel_trace.NoOpTracerProvider)
        self._global = tracer_provider is None
        self.cache_name = _trunc(getattr(cache, "name", "default"))
        self._gen_span: Span | None = None
        self._gen_ctx: otel_context.Context | None = None
        self._gen_steps = 0
        self._gen_tokens = 0
        self._gen_prompt = 0
        self._step_span: Span | None = None
        self._step_index: int | None = None
        # The span that op events go to (the recording step span, else the recording generate
        # span, else None): ``on_op`` checks only this.
        self._event_span: Span | None = None
        self._step_trace: str | None = None          # trace id (hex) of the current step span
        self._last_trace: tuple[int, str | None] = (-1, None)  # (step index, trace id) last ended
        self._gen_trace: str | None = None
        self._flushed_seq = 0      # op records up to this seq are events already (or skipped)
        self.ops_dropped = 0       # ops that left the timeline before their events were added
        # The current generation's span is the API's no-op one (no SDK configured): its steps
        # would be no-op spans too, so on_step_start skips making them.
        self._gen_noop = False

    # ------------------------------------------------------------------ trace ids (for exemplars)
    def trace_id(self, step: StepInfo | None = None) -> str | None:
        """Hex trace id of ``step``'s span (current or just ended), else of the current span."""
        if step is not None:
            if self._step_span is not None and self._step_index == step.index:
                return self._step_trace
            index, tid = self._last_trace
            if index == step.index:
                return tid
            return None
        if self._step_span is not None and self._step_trace is not None:
            return self._step_trace
        return self._gen_trace

    last_trace_id = trace_id

    # ------------------------------------------------------------------ op events, in batches
    def _flush(self, cache: Any) -> None:
        """Add the ops since the last flush as events of the span they happened under (the
        current event span: it changes only in the sink methods, which flush first)."""
        span = self._event_span
        seq_now = getattr(cache, "seq", None)
        if type(seq_now) is not int:   # not an InstrumentedCache: nothing to read
            return
        last = self._flushed_seq
        self._flushed_seq = seq_now
        if span is None or seq_now <= last:
            return
        first, records = cache.ops_since(last)
        if first > last + 1:   # the ring buffer wrapped within one span
            self.ops_dropped += first - last - 1
            if span.is_recording():
                span.set_attribute(A.OPS_DROPPED, first - last - 1)
        state_key = getattr(cache, "state_key", None)
        for rec in records:
            if rec.seq > seq_now:
                break
            self._op_event(span, rec, state_key)

    # ------------------------------------------------------------------ generations
    def on_generation_start(self, cache: Any, info: dict[str, Any]) -> None:
        self._flush(cache)
        self._end_step_span(None)
        self._end_gen_span(None)
        attrs: dict[str, Any] = {A.CACHE: self.cache_name}
        for key, value in info.items():
            v = _number(value)
            if v is None:
                continue
            if key == "prompt_tokens":
                attrs[A.PROMPT_TOKENS] = v
            elif key == "max_new_tokens":
                attrs[A.MAX_NEW_TOKENS] = v
            else:
                attrs[A.GENERATION_PREFIX + _trunc(key, 64)] = v
        span = self._tracer.start_span(A.SPAN_GENERATE, attributes=attrs)
        self._gen_span = span
        self._gen_ctx = otel_trace.set_span_in_context(span)
        self._gen_steps = self._gen_tokens = 0
        prompt = info.get("prompt_tokens")
        self._gen_prompt = prompt if type(prompt) is int else 0
        recording = span.is_recording()
        self._gen_noop = not span.get_span_context().is_valid
        self._gen_trace = _trace_hex(span) if recording else None
        if self._step_span is None:
            self._event_span = span if recording and self.op_events else None

    def on_generation_end(self, cache: Any, info: dict[str, Any]) -> None:
        self._flush(cache)
        self._end_step_span(None)
        span = self._gen_span
        if span is None:
            return
        error = info.get("error")
        if span.is_recording():
            span.set_attribute(A.STEPS, self._gen_steps)
            span.set_attribute(A.TOKENS, self._gen_tokens)
            if self._gen_prompt:
                span.set_attribute(A.SEQ_LEN, self._gen_prompt + self._gen_tokens)
            if error is not None:
                if isinstance(error, Exception):
                    span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, _trunc(f"{type(error).__name__}: {error}")))
        self._end_gen_span(None)

    def _end_gen_span(self, end_time: int | None) -> None:
        span = self._gen_span
        self._gen_span = None
        self._gen_noop = False
        self._gen_ctx = None
        self._gen_trace = None
        if self._event_span is span:
            self._event_span = None
        if span is not None:
            span.end(end_time=end_time)

    # ------------------------------------------------------------------ steps
    def _unconfigured(self) -> bool:
        """No SDK behind this sink's tracer (the no-op provider, or the global provider while the
        application has not set one): a span would not record, so none is made."""
        return self._noop_provider or (
            self._global and type(otel_trace.get_tracer_provider()) is otel_trace.ProxyTracerProvider)

    def on_step_start(self, cache: Any, step: StepInfo) -> None:
        if self._step_span is None:
            if self._gen_span is None:
                if self._unconfigured():
                    return   # no SDK: nothing would record this step
            elif self._gen_noop:
                return   # no SDK: nothing would record this step (and no op events are pending)
        self._flush(cache)
        self._end_step_span(None)
        attrs: dict[str, Any] = {A.CACHE: self.cache_name, A.STEP: step.index}
        prev = _state_value(step.prev)
        if prev is not None:
            attrs[A.STATE_PREV] = prev
        nxt = _state_value(step.next)
        if nxt is not None:
            attrs[A.STATE_NEXT] = nxt
        span = self._tracer.start_span(
            A.SPAN_DECODE_STEP, context=self._gen_ctx, attributes=attrs,
            start_time=int(step.start_time * _NS))
        self._step_span = span
        self._step_index = step.index
        if span.is_recording():
            self._event_span = span if self.op_events else None
            self._step_trace = _trace_hex(span)
        else:
            self._event_span = None
            self._step_trace = None

    def on_step_end(self, cache: Any, step: StepInfo) -> None:
        if self._step_span is None and self._event_span is None:
            return   # nothing records (the next flush skips the ops since)
        self._flush(cache)
        if self._step_span is None or self._step_index != step.index:
            return
        span = self._step_span
        if span.is_recording():
            attrs = {A.TOKENS: step.tokens, A.OPS: step.ops}
            if step.violations:
                attrs[A.VIOLATION_COUNT] = step.violations
            span.set_attributes(attrs)
        self._gen_steps += 1
        self._gen_tokens += step.tokens
        end_time = None
        duration = step.duration
        if duration is not None:
            end_time = int(step.start_time * _NS) + int(duration * _NS)
        self._end_step_span(end_time)

    def _end_step_span(self, end_time: int | None) -> None:
        span = self._step_span
        if span is None:
            return
        self._last_trace = (self._step_index if self._step_index is not None else -1,
                            self._step_trace)
        self._step_span = None
        self._step_index = None
        self._step_trace = None
        gen = self._gen_span
        self._event_span = (gen if gen is not None and self.op_events and gen.is_recording()
                            else None)
        span.end(end_time=end_time)  # last: a failing span processor leaves the sink consistent

    # ------------------------------------------------------------------ ops and violations
    def add_op(self, cache: Any, rec: OpRecord) -> None:
        """One op as an event now (for callers that feed records themselves)."""
        span = self._event_span
        if span is None:
            return
        self._flush(cache)
        if rec.seq > self._flushed_seq:
            self._flushed_seq = rec.seq
        self._op_event(span, rec, getattr(cache, "state_key", None))

    def _op_event(self, span: Span, rec: OpRecord, state_key: Any = None) -> None:
        if (rec.op == "set" and rec.violation is None
                and (rec.queue == state_key or rec.queue == _MARK_STEP)):
            return   # the op that opens a step: its decode_step span shows it
        attrs: dict[str, Any] = {A.QUEUE: rec.queue if len(rec.queue) <= A.MAX_STR_LEN
                                 else _trunc(rec.queue), A.FAMILY: rec.family, A.SEQ: rec.seq}
        if rec.owner is not None:
            attrs[A.OWNER] = rec.owner if len(rec.owner) <= A.MAX_STR_LEN else _trunc(rec.owner)
        if rec.depth is not None:
            attrs[A.DEPTH] = rec.depth
        # Each attribute costs the SDK ~0.5 us of validation per event: the two below are only
        # added when they say something the others do not (a view keeping a larger storage
        # alive; a pop that got another owner's item).
        if rec.logical_bytes:
            attrs[A.BYTES_LOGICAL] = rec.logical_bytes
            if rec.storage_bytes != rec.logical_bytes:
                attrs[A.BYTES_STORAGE] = rec.storage_bytes
        if rec.producer is not None and rec.producer != rec.owner:
            attrs[A.PRODUCER] = _trunc(rec.producer)
        if rec.violation is not None:
            attrs[A.VIOLATION_KIND] = rec.violation
        span.add_event(rec.op, attrs, int(rec.time * _NS))

    def on_violation(self, cache: Any, v: Any) -> None:
        self._flush(cache)   # the ops before it come first
        span = self._step_span if self._step_span is not None else self._gen_span
        if span is None or not span.is_recording():
            return
        try:
            report = v.report()
        except Exception:
            report = str(v)
        attrs: dict[str, Any] = {
            A.VIOLATION_KIND: v.kind, A.QUEUE: _trunc(v.queue), A.FAMILY: v.family, A.STEP: v.step,
            A.VIOLATION_REPORT: _trunc(report, A.MAX_REPORT_LEN),
        }
        if v.consumer is not None:
            attrs[A.OWNER] = _trunc(v.consumer)
        if v.producer is not None:
            attrs[A.PRODUCER] = _trunc(v.producer)
        if v.hint:
            attrs[A.VIOLATION_HINT] = _trunc(v.hint, 1024)
        span.add_event(A.EVENT_VIOLATION, attrs)
        span.set_status(Status(StatusCode.ERROR, _trunc(f"{v.kind} on {v.queue}", 512)))

    def close(self, cache: Any = None) -> None:
        """End any open spans (e.g. when the cache is discarded mid-generation); with ``cache``,
        also stop receiving its events."""
        if cache is not None:
            cache.remove_sink(self)
        self._end_step_span(None)
        self._end_gen_span(None)

    def __repr__(self) -> str:
        return f"TracingSink(cache={self.cache_name!r})"


def trace(cache: Any, tracer_provider: Any = None, *, op_events: bool = True,
          on_error: str = "raise") -> TracingSink | None:
    """Trace ``cache`` from now on: a span per generation and per step, op events, violations.
    ``tracer_provider``: an OpenTelemetry ``TracerProvider`` (default: the global one, a no-op
    until the application configures the SDK). Returns the handle (``close(cache)`` stops it).

    With ``on_error='log'`` a failure to set up is logged once and None returned.
    """
    try:
        sink = TracingSink(cache, tracer_provider=tracer_provider, op_events=op_events)
    except Exception:
        if on_error != "log":
            raise
        log.warning("cachescope: could not set up tracing for cache %r; continuing without it",
                    getattr(cache, "name", "?"), exc_info=True)
        return None
    cache.add_sink(sink)
    return sink
