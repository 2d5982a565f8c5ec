"""OpenTelemetry export: a ``generate`` span per generation, a ``decode_step`` child span per step,
each cache op as a span event on its step, violations as ERROR status plus a report event.

Depends on ``opentelemetry-api`` only. Without a configured SDK (or with ``tracer_provider`` set to
the API's no-op provider) no step spans are made. Op events are added in batches from the cache's
timeline when their span changes (see ``_flush``). See docs/tracing.md.

Multi-rank runs: ``attributes=`` puts constant attributes (``rank_attributes(rank, tp_rank,
pp_rank)``) on every generate and decode_step span, and a generation whose info carries a W3C
``traceparent`` (``cache.generation(traceparent=...)``, or the sink's ``traceparent`` default)
starts its span as a child of that remote context, so every rank's spans of one generation share
one trace. Rank 0 mints the shared context with ``start_rank_trace`` / ``new_traceparent``.
"""

from __future__ import annotations


import logging
import threading
from typing import Any, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.trace import Span, Status, StatusCode

from . import _attributes as A
from ._records import OpRecord, StepInfo

__all__ = ["TracingSink", "trace", "rank_attributes", "RankTrace", "start_rank_trace",
           "new_traceparent", "RANK", "TP_RANK", "PP_RANK", "VIOLATION_RANK", "VIOLATION_PEER",
           "SPAN_PARALLEL_GENERATE"]

log = logging.getLogger("cachescope")

_NS = 1_000_000_000
_MARK_STEP = "<mark_step>"   # the queue name of mark_step's record

# Multi-rank attribute keys and span name (docs/tracing.md). TODO(lead): move to _attributes.py
# with the other keys (this helper does not own that module).
RANK = "cachescope.rank"                    # generate, decode_step: global rank of the process
TP_RANK = "cachescope.tp_rank"              # tensor-parallel rank
PP_RANK = "cachescope.pp_rank"              # pipeline stage
VIOLATION_RANK = "cachescope.violation.rank"  # violation event: the rank it concerns
VIOLATION_PEER = "cachescope.violation.peer"  # violation event: the rank it was compared with
SPAN_PARALLEL_GENERATE = "parallel_generate"  # rank 0's root span of one multi-rank generation

#: ``generation(**info)`` keys read as the W3C trace context to join (never span attributes).
_TRACEPARENT = "traceparent"
_TRACESTATE = "tracestate"


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


def _check_attributes(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    """``attributes`` as span attributes (strings cut to 256 characters); ValueError if unusable."""
    if not attributes:
        return {}
    if not isinstance(attributes, Mapping):
        raise ValueError(f"attributes must be a dict of attribute name -> value, got "
                         f"{type(attributes).__name__}")
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"span attribute names must be non-empty strings, got {key!r}")
        if type(value) is str:
            value = _trunc(value)
        elif type(value) not in (bool, int, float):
            raise ValueError(f"attributes[{key!r}] is a {type(value).__name__}: constant span "
                             "attributes must be bool, int, float or str (e.g. "
                             "rank_attributes(rank, tp_rank, pp_rank))")
        out[key] = value
    return out


def rank_attributes(rank: int, tp_rank: int | None = None,
                    pp_rank: int | None = None) -> dict[str, int]:
    """The constant span attributes of one rank: ``cachescope.rank`` (and ``cachescope.tp_rank``
    / ``cachescope.pp_rank`` when given), for ``trace(..., attributes=...)``."""
    out = {RANK: int(rank)}
    if tp_rank is not None:
        out[TP_RANK] = int(tp_rank)
    if pp_rank is not None:
        out[PP_RANK] = int(pp_rank)
    return out


def _propagator() -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    return TraceContextTextMapPropagator()


def _remote_context(traceparent: Any, tracestate: Any = None) -> otel_context.Context | None:
    """The context of a W3C ``traceparent`` string (a remote parent); None if it is not one."""
    if type(traceparent) is not str:
        return None
    carrier = {_TRACEPARENT: traceparent}
    if type(tracestate) is str and tracestate:
        carrier[_TRACESTATE] = tracestate
    ctx = _propagator().extract(carrier)
    if not otel_trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def _traceparent_of(span: Span) -> str | None:
    """The W3C ``traceparent`` header value naming ``span`` (None for an invalid span)."""
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _propagator().inject(carrier, context=otel_trace.set_span_in_context(span))
    return carrier.get(_TRACEPARENT)


class TracingSink:
    """Cache sink that turns generations, steps, ops and violations into OpenTelemetry spans.

    ``tracer_provider=None`` uses the global provider (a no-op until the application configures
    the SDK). Keeps no reference to the cache (only its name) and none to tensors.

    ``attributes``: constant attributes for every generate and decode_step span (e.g.
    ``rank_attributes(rank, tp_rank, pp_rank)``); settable later as ``sink.attributes``.
    ``sink.traceparent``: a W3C traceparent that generations whose info has none join (a
    generation's own ``traceparent=`` wins). Both take effect at the next generation or step.

    Thread-safe: a violation found on another thread (``cachescope.distributed``'s watcher)
    may arrive while the decode loop opens or closes a step.
    """

    # No ``on_op``: the cache calls this sink at step and generation boundaries and on violations
    # only. Op events are added then, in a batch, from ``cache.ops_since()`` with each op's own
    # timestamp: the same events, and no Python per op.

    def __init__(self, cache: Any, tracer_provider: Any = None, op_events: bool = True,
                 attributes: Mapping[str, Any] | None = None) -> None:
        from . import __version__
        #: record each cache op as a span event (the main cost of tracing; see docs/tracing.md).
        #: Takes effect at the next step or generation.
        self.op_events = bool(op_events)
        self._tracer = otel_trace.get_tracer("cachescope", __version__, tracer_provider=tracer_provider)
        #: the API's no-op provider was given: no span would ever record
        self._noop_provider = isinstance(tracer_provider, otel_trace.NoOpTracerProvider)
        self._global = tracer_provider is None
        self.cache_name = _trunc(getattr(cache, "name", "default"))
        self._lock = threading.RLock()   # reentrant: a span processor that re-enters cannot hang
        self._attributes: dict[str, Any] = {}
        self._gen_base: dict[str, Any] = {A.CACHE: self.cache_name}   # every generate span's
        self._step_base: dict[str, Any] = {A.CACHE: self.cache_name}  # every decode_step span's
        self.attributes = attributes
        #: W3C traceparent that generations without their own ``traceparent=`` join (None: none)
        self.traceparent: str | None = None
        self._bad_parent_logged = False
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

    # ------------------------------------------------------------------ constant attributes
    @property
    def attributes(self) -> dict[str, Any]:
        """Constant attributes of every generate and decode_step span (a copy)."""
        return dict(self._attributes)

    @attributes.setter
    def attributes(self, attributes: Mapping[str, Any] | None) -> None:
        attrs = _check_attributes(attributes)   # ValueError before anything changes
        self._attributes = attrs
        # the sink's own keys win over a constant attribute of the same name
        self._gen_base = {**attrs, A.CACHE: self.cache_name}
        self._step_base = {**attrs, A.CACHE: self.cache_name}

    def current_traceparent(self) -> str | None:
        """The W3C traceparent of the current generate span (None outside a generation or without
        an SDK): another process can pass it as ``generation(traceparent=...)`` to join."""
        span = self._gen_span
        return None if span is None else _traceparent_of(span)

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
        with self._lock:
            self._generation_start(cache, info)

    def _parent_context(self, info: dict[str, Any]) -> otel_context.Context | None:
        """The remote parent of the generation (its ``traceparent``, else the sink's), or None
        for the ambient context. A malformed traceparent is logged once and ignored."""
        traceparent = info.get(_TRACEPARENT)
        tracestate = info.get(_TRACESTATE)
        if traceparent is None:
            traceparent, tracestate = self.traceparent, None
        if traceparent is None:
            return None
        ctx = _remote_context(traceparent, tracestate)
        if ctx is None and not self._bad_parent_logged:
            self._bad_parent_logged = True
            log.warning("cachescope: traceparent %r of cache %r is not a W3C traceparent "
                        "('00-<32 hex trace id>-<16 hex span id>-<2 hex flags>', ids not all "
                        "zero); its generate spans start their own traces", _trunc(traceparent, 80),
                        self.cache_name)
        return ctx

    def _generation_start(self, cache: Any, info: dict[str, Any]) -> None:
        self._flush(cache)
        self._end_step_span(None)
        self._end_gen_span(None)
        attrs: dict[str, Any] = dict(self._gen_base)
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
        parent = self._parent_context(info) if (
            _TRACEPARENT in info or self.traceparent is not None) else None
        span = self._tracer.start_span(A.SPAN_GENERATE, context=parent, attributes=attrs)
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
        with self._lock:
            self._generation_end(cache, info)

    def _generation_end(self, cache: Any, info: dict[str, Any]) -> None:
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
        with self._lock:
            self._step_start(cache, step)

    def _step_start(self, cache: Any, step: StepInfo) -> None:
        self._flush(cache)
        self._end_step_span(None)
        attrs: dict[str, Any] = self._step_base.copy()
        attrs[A.STEP] = step.index
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
        with self._lock:
            self._step_end(cache, step)

    def _step_end(self, cache: Any, step: StepInfo) -> None:
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
        if self._event_span is None:
            return
        with self._lock:
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
        with self._lock:
            self._violation(cache, v)

    def _violation(self, cache: Any, v: Any) -> None:
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
        rank = getattr(v, "rank", None)
        if type(rank) is int:
            attrs[VIOLATION_RANK] = rank
        peer = getattr(v, "peer", None)
        if type(peer) is int:
            attrs[VIOLATION_PEER] = peer
        span.add_event(A.EVENT_VIOLATION, attrs)
        span.set_status(Status(StatusCode.ERROR, _trunc(f"{v.kind} on {v.queue}", 512)))

    def close(self, cache: Any = None) -> None:
        """End any open spans (e.g. when the cache is discarded mid-generation); with ``cache``,
        also stop receiving its events."""
        if cache is not None:
            cache.remove_sink(self)
        with self._lock:
            self._end_step_span(None)
            self._end_gen_span(None)

    def __repr__(self) -> str:
        return f"TracingSink(cache={self.cache_name!r})"


def trace(cache: Any, tracer_provider: Any = None, *, op_events: bool = True,
          attributes: Mapping[str, Any] | None = None,
          on_error: str = "raise") -> TracingSink | None:
    """Trace ``cache`` from now on: a span per generation and per step, op events, violations.
    ``tracer_provider``: an OpenTelemetry ``TracerProvider`` (default: the global one, a no-op
    until the application configures the SDK). ``attributes``: constant attributes of every
    generate and decode_step span (e.g. ``rank_attributes(rank, tp_rank, pp_rank)``). Returns the
    handle (``close(cache)`` stops it).

    Unusable ``attributes`` raise ``ValueError``; with ``on_error='log'`` any other failure to set
    up is logged once and None returned.
    """
    checked = _check_attributes(attributes)   # a caller's mistake: raised, also with 'log'
    try:
        sink = TracingSink(cache, tracer_provider=tracer_provider, op_events=op_events,
                           attributes=checked)
    except Exception:
        if on_error != "log":
            raise
        log.warning("cachescope: could not set up tracing for cache %r; continuing without it",
                    getattr(cache, "name", "?"), exc_info=True)
        return None
    cache.add_sink(sink)
    return sink


# ---------------------------------------------------------------------------------------------
# One trace for all ranks of a generation
# ---------------------------------------------------------------------------------------------


class RankTrace:
    """Rank 0's root span (``parallel_generate``) of one multi-rank generation.

    Share ``traceparent`` with every rank (e.g. through the process group's store); each rank
    passes it as ``cache.generation(traceparent=...)`` (or sets ``cache.tracer.traceparent``), so
    that every rank's generate span becomes a child of this span, in one trace. ``traceparent`` is
    None when no SDK records (then there is nothing to join); for a trace the sampler dropped it
    still names the trace, with the sampled flag off, so that every rank drops it too (parent-based
    samplers follow the parent's decision). ``end()`` (or leaving the ``with`` block) ends the
    span; call it when every rank is done. Never raises: a tracing failure is logged.
    """

    def __init__(self, span: Span | None) -> None:
        self._span = span
        self.traceparent: str | None = None
        if span is not None:
            try:
                self.traceparent = _traceparent_of(span)
            except Exception:
                log.warning("cachescope: could not read the rank trace's context", exc_info=True)

    def end(self, error: BaseException | None = None) -> None:
        """End the root span (ERROR status with the exception when ``error``). Idempotent."""
        span, self._span = self._span, None
        if span is None:
            return
        try:
            if error is not None and span.is_recording():
                if isinstance(error, Exception):
                    span.record_exception(error)
                text = _trunc(f"{type(error).__name__}: {error}")
                span.set_status(Status(StatusCode.ERROR, text))
            span.end()
        except Exception:
            log.warning("cachescope: could not end the rank trace's span", exc_info=True)

    def __enter__(self) -> "RankTrace":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.end(exc)

    def __repr__(self) -> str:
        return f"RankTrace(traceparent={self.traceparent!r})"


def start_rank_trace(tracer_provider: Any = None, *, attributes: Mapping[str, Any] | None = None,
                     name: str = SPAN_PARALLEL_GENERATE) -> RankTrace:
    """Start rank 0's root span of a multi-rank generation (see ``RankTrace``) in the ambient
    context, with ``attributes`` (e.g. ``{"cachescope.world_size": 4}``)::

        with tracing.start_rank_trace(provider) as root:      # rank 0
            store.set("cachescope/traceparent", root.traceparent or "")
            with cache.generation(traceparent=root.traceparent, ...): ...
            # ... wait for the other ranks' results, then leave the block

    Unusable ``attributes`` raise ``ValueError``; any tracing failure gives a ``RankTrace``
    whose ``traceparent`` is None.
    """
    from . import __version__
    attrs = _check_attributes(attributes)
    try:
        tracer = otel_trace.get_tracer("cachescope", __version__, tracer_provider=tracer_provider)
        span = tracer.start_span(_trunc(name, 128), attributes=attrs)
    except Exception:
        log.warning("cachescope: could not start the rank trace", exc_info=True)
        return RankTrace(None)
    return RankTrace(span)


def new_traceparent(tracer_provider: Any = None, *,
                    attributes: Mapping[str, Any] | None = None) -> str | None:
    """A fresh W3C traceparent for all ranks of one generation to share: ``start_rank_trace``
    ended at once (a zero-length ``parallel_generate`` root span that the ranks' generate spans
    hang under). None when no SDK records. Prefer ``start_rank_trace`` when rank 0 can end the
    root after the ranks finish (the root then spans the whole generation).
    """
    root = start_rank_trace(tracer_provider, attributes=attributes)
    root.end()
    return root.traceparent
