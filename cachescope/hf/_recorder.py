"""``HFRecorder``: the front end that turns ``transformers.Cache`` calls into cachescope's ops.

One *view* (an ``InstrumentedCache``) per top-level model: a step is one forward of that model
(forward hooks on its root), and an ``update`` of layer ``i`` is, in the view, a pop of queue
``layer_i`` then a push, so the core checker's owner rule (an entry is extended only by the
module that wrote it) reports ``owner_mismatch`` with its reports, counters, metrics and traces.
The Hugging Face-specific checks (``_checks``) reach the view through ``add_violation``.

Everything here runs inside the model's forward: every entry point catches its own failures
(logged once, counted in ``telemetry_errors``) so that the host sees the same return values and
exceptions as without cachescope. Only strict mode raises, and only ``HFCacheError``.
"""

from __future__ import annotations

import logging
import operator
import sys
import threading
import weakref
from collections import Counter
from typing import Any, Callable

import torch

from .. import metrics as _metrics
from .. import tracing as _tracing
from .._instrumented import InstrumentedCache
from .._records import Violation
from . import _checks
from ._checks import HFCacheError
from ._state import CacheState, Forward, LayerKV, TokenTrail, digest_tokens, layer_queue, layer_skew

__all__ = ["HFRecorder", "HFCacheError", "HFWatch"]

log = logging.getLogger("cachescope")

#: ``_positions``' answer when the new keys start where the layer ends
_POS_OK = ("cache_position", (), ())

#: the layer classes whose lengths cachescope reads, and where the length is
_LENGTHS = {"DynamicLayer": "keys", "DynamicSlidingWindowLayer": "cumulative",
            "StaticLayer": "static", "StaticSlidingWindowLayer": "cumulative_int"}


class _View:
    """A model's instrumented cache plus what the recorder keeps beside it."""

    __slots__ = ("cache", "name", "model", "root", "gen_depth", "gen_cm", "kv")

    def __init__(self, cache: InstrumentedCache, model: str, root: Any) -> None:
        self.cache = cache
        self.name = cache.name
        self.model = model
        self.root = weakref.ref(root) if root is not None else None
        self.gen_depth = 0
        self.gen_cm: Any = None
        #: layer lengths after the last completed forward: (per-layer sliding flags, full length,
        #: sliding length) when the layers agree, else {layer: (length, sliding)}
        self.kv: Any = None


class HFWatch:
    """Returned by ``cachescope.hf.watch``: while active, the modules that carry a ``layer_idx``
    (transformers' attention modules) are named by qualified name in their model's view.
    ``remove()`` stops it (idempotent); also a context manager."""

    def __init__(self, attributor: Any, model: Any, prefix: str = "") -> None:
        self._attributor = attributor
        self._handles: list[Any] = []
        #: qualified names of the modules named (the attention modules)
        self.names: list[str] = []
        for qualname, module in model.named_modules():
            idx = getattr(module, "layer_idx", None)
            if type(idx) is not int:
                continue
            name = f"{prefix}{qualname}" if qualname else (prefix.rstrip(".") or type(module).__name__)
            old = attributor.label(module)
            if old != name:
                attributor.aliases[old] = name   # entries written before watch() still match
            self._hook(module, name)
            self.names.append(name)
        attributor.watching += 1
        self.active = True

    def _hook(self, module: Any, name: str) -> None:
        attributor, key = self._attributor, id(module)

        def pre(_module: Any, _args: Any) -> None:
            attributor.enter(key, name)

        def post(_module: Any, _args: Any, _out: Any) -> None:
            attributor.exit(key)

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post, always_call=True))

    def remove(self) -> None:
        if not self.active:
            return
        self.active = False
        self._attributor.watching = max(0, self._attributor.watching - 1)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "HFWatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class _Collector:
    """Sink on every view (added first): gives owner mismatches on layer queues the Hugging Face
    hint, and collects every violation for the recorder, in order."""

    def __init__(self, recorder: "HFRecorder") -> None:
        self._rec = weakref.ref(recorder)

    def on_violation(self, cache: Any, v: Violation) -> None:
        rec = self._rec()
        if rec is None:
            return
        if v.kind == "owner_mismatch" and v.family == "layer" and v.seq:
            v.hint = _checks.OWNER_HINT    # the core's (its pops); cachescope.hf's own have seq 0
        rec._collect(v)


class HFRecorder:
    """Collects what every instrumented ``transformers.Cache`` did while installed.

    ``violations`` (in the order found, every view's), ``report()`` (the run summary of every
    model's view, plus the caches measured only), ``views`` (model name -> its
    ``InstrumentedCache``: steps, stats, timeline). Made by ``cachescope.hf.install()``.
    """

    def __init__(self, *, name: str = "hf", registry: Any = None, tracer_provider: Any = None,
                 strict: bool = False, metrics: bool = True, tracing: bool = True,
                 const_labels: dict[str, str] | None = None, attribution: str = "auto",
                 timeline_size: int = 256, max_violations: int = 1000,
                 known_caches: tuple[type, ...] = (), known_layers: dict[type, bool] | None = None,
                 cache_base: type | None = None, layer_base: type | None = None) -> None:
        if metrics and const_labels:      # a caller's mistake: raised here, not mid-forward
            from prometheus_client import CollectorRegistry
            probe = InstrumentedCache(name="const-labels-check", metrics=False, tracing=False)
            _metrics.MetricsSink(probe, registry=CollectorRegistry(), const_labels=const_labels).close()
        self.name = str(name)
        self.strict = bool(strict)
        self.registry = registry
        self.tracer_provider = tracer_provider
        self._metrics = metrics
        self._tracing = tracing
        self._const_labels = const_labels
        self._attribution = attribution
        self._timeline_size = timeline_size
        self.max_violations = max_violations
        self._known_caches = frozenset(known_caches)
        #: layer class -> is sliding (only these layers' lengths and positions are checked)
        self._known_layers: dict[type, bool] = dict(known_layers or {})
        #: how to read a known layer's length (by its exact class)
        self._length_of: dict[type, str] = {t: _LENGTHS[t.__name__] for t in self._known_layers
                                            if t.__name__ in _LENGTHS}
        self._cache_base = cache_base
        self._layer_base = layer_base
        self._lock = threading.RLock()
        self._local = threading.local()
        self._views: list[_View] = []
        self._by_module: dict[int, tuple[Any, _View]] = {}
        self._hooks: dict[int, tuple[Any, list[Any]]] = {}
        self._watches: list[HFWatch] = []
        self._states: "weakref.WeakKeyDictionary[Any, CacheState]" = weakref.WeakKeyDictionary()
        self._layer_cache: "weakref.WeakKeyDictionary[Any, tuple[Any, int]]" = weakref.WeakKeyDictionary()
        self._violations: list[Violation] = []
        self.violations_dropped = 0
        self._measured: Counter[str] = Counter()
        self._said: set[str] = set()
        self.telemetry_errors = 0
        self._failed_said: set[str] = set()
        self._loose: _View | None = None
        self._sink = _Collector(self)
        self._transparent: tuple[Callable[..., Any], ...] = ()
        self.active = False
        #: ``cachescope.hf.paused()``: the forward hooks ignore forwards (the patches are off)
        self.paused = False

    # ------------------------------------------------------------------ reading
    @property
    def violations(self) -> list[Violation]:
        """Every violation found so far, in order (at most ``max_violations``; all are counted
        in the views' stats and metrics)."""
        return self._violations

    @property
    def views(self) -> dict[str, InstrumentedCache]:
        """Each model's instrumented cache view, by name (``hf``, ``hf-2``...)."""
        return {v.name: v.cache for v in self._views}

    def view(self, model: Any) -> InstrumentedCache | None:
        """The view of ``model`` (or of the model it belongs to), or None."""
        entry = self._by_module.get(id(model))
        if entry is not None and entry[0]() is model:
            return entry[1].cache
        return None

    @property
    def measured_only(self) -> dict[str, int]:
        """Cache classes seen but not checked, with their update counts."""
        return dict(self._measured)

    def layer_lengths(self) -> dict[str, dict[int, tuple[int, bool]]]:
        """Per view: ``{layer: (tokens, sliding)}`` after its last completed forward (sliding
        layers count the tokens ever added). Read by the per-layer metrics at scrape time."""
        out: dict[str, dict[int, tuple[int, bool]]] = {}
        for v in list(self._views):
            kv = v.kv
            if kv is None:
                continue
            if type(kv) is dict:
                out[v.name] = dict(kv)
                continue
            kinds, full, sliding = kv
            lengths: dict[int, tuple[int, bool]] = {}
            for i, is_sliding in enumerate(kinds):
                n = sliding if is_sliding else full
                if is_sliding is not None and n is not None:
                    lengths[i] = (n, is_sliding)
            out[v.name] = lengths
        return out

    def layer_summary(self, view: str) -> str:
        """One line on the KV tokens per layer of ``view`` after its last forward (``3
        full-attention layer(s) x 8 (skew 0)``, or each layer's length when they differ); empty
        before its first completed forward."""
        return _lengths_line(self.layer_lengths().get(view))

    def report(self) -> str:
        """The run summary of every view (steps, ops, bytes, violations) and what was measured only."""
        parts = [f"cachescope hf summary: {len(self._views)} model view(s), "
                 f"{len(self._violations)} violation(s)"]
        lengths = self.layer_lengths()
        for v in self._views:
            line = _lengths_line(lengths.get(v.name))
            parts.append(v.cache.report() + (f"\n  model: {v.model}" if v.model else "")
                         + (f"\n  {line}" if line else ""))
        if self._measured:
            parts.append("measured only (cache classes cachescope does not check): " + ", ".join(
                f"{cls}: {n} update(s)" for cls, n in sorted(self._measured.items())))
        if self.telemetry_errors:
            parts.append(f"telemetry errors: {self.telemetry_errors} (logged once each)")
        return "\n".join(parts)

    def export_layer_metrics(self) -> None:
        """Export the per-layer KV lengths (``cachescope_layer_kv_tokens``, ``..._skew_tokens``)
        to the recorder's registry (``install()`` does it when metrics are on)."""
        from . import _metrics as _layer_metrics
        registry = self.registry if self.registry is not None else _metrics.REGISTRY
        _layer_metrics.export_layers(self, registry, self._const_labels)

    def close(self) -> None:
        """Detach the views' exporters (their names leave the Prometheus registry)."""
        if self._metrics:
            from . import _metrics as _layer_metrics
            _layer_metrics.unexport_layers(
                self, self.registry if self.registry is not None else _metrics.REGISTRY)
        for v in self._views:
            for handle in (v.cache.metrics, v.cache.tracer):
                if handle is None:
                    continue
                try:
                    if isinstance(handle, _tracing.TracingSink):
                        handle.close(v.cache)
                    else:
                        handle.close()
                except Exception:
                    self._failed("close")

    def __repr__(self) -> str:
        return (f"HFRecorder(name={self.name!r}, views={[v.name for v in self._views]}, "
                f"violations={len(self._violations)})")

    def __enter__(self) -> "HFRecorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        from . import uninstall
        uninstall()

    # ------------------------------------------------------------------ plumbing
    def _collect(self, v: Violation) -> None:
        with self._lock:
            if len(self._violations) < self.max_violations:
                self._violations.append(v)
            else:
                self.violations_dropped += 1
        if self.strict:
            pending = self._local.__dict__.setdefault("pending", [])
            pending.append(v)

    def _raise_pending(self) -> None:
        """Strict mode: raise the first violation found by the op that just ran."""
        pending = self._local.__dict__.get("pending")
        if pending:
            v = pending[0]
            pending.clear()
            raise HFCacheError(v)

    def _failed(self, where: str) -> None:
        """A failure inside cachescope: counted, logged once per place, never raised."""
        self.telemetry_errors += 1
        if where not in self._failed_said:
            self._failed_said.add(where)
            log.warning("cachescope.hf: %s failed; the model runs on unchanged and further "
                        "failures here are counted (HFRecorder.telemetry_errors)", where,
                        exc_info=True)

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning("cachescope.hf: %s", message)

    def _stack(self) -> list[Forward]:
        stack = self._local.__dict__.get("stack")
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _in_op(self) -> int:
        return self._local.__dict__.get("in_op", 0)

    # ------------------------------------------------------------------ views and models
    def _make_view(self, model: Any, name: str | None) -> _View:
        names = {v.name for v in self._views}
        if name is not None:
            candidates = [str(name)]
        else:
            candidates = [self.name] + [f"{self.name}-{n}" for n in range(2, 10_000)]
        last: Exception | None = None
        for candidate in candidates:
            if candidate in names:
                continue
            cache = InstrumentedCache(
                name=candidate, metrics=False, tracing=False, strict=False,
                attribution=self._attribution, timeline_size=self._timeline_size,
                max_violations=self.max_violations)
            cache.add_sink(self._sink)
            if self._metrics:
                try:
                    cache.metrics = _metrics.export(cache, registry=self.registry,
                                                    const_labels=self._const_labels, on_error="log")
                except _metrics.CacheNameTaken as exc:
                    last = exc
                    if name is not None:
                        raise
                    continue
            if self._tracing:
                cache.tracer = _tracing.trace(cache, tracer_provider=self.tracer_provider,
                                              on_error="log")
            cache.attributor.make_transparent(*self._transparent)
            label = "" if model is None else type(model).__name__
            view = _View(cache, label, model)
            self._views.append(view)
            return view
        raise RuntimeError(f"no free name for a cachescope view: {last}")

    def _view_for(self, model: Any, name: str | None = None) -> _View:
        """The view of ``model``: the one it belongs to (as a submodule), else a new one whose
        root it is. ``model`` gets forward hooks (its forwards are the view's steps)."""
        with self._lock:
            entry = self._by_module.get(id(model))
            view = entry[1] if entry is not None and entry[0]() is model else None
            if view is None:
                view = self._adopt(model) or self._make_view(model, name)
                for module in model.modules():
                    try:
                        self._by_module[id(module)] = (weakref.ref(module), view)
                    except TypeError:
                        continue
                if len(self._by_module) > 65536:
                    for k in [k for k, (ref, _) in self._by_module.items() if ref() is None]:
                        del self._by_module[k]
            self._hook(model, view)
            return view

    def _adopt(self, model: Any) -> _View | None:
        """A view whose root is a submodule of ``model`` (found first, e.g. from the stack): it
        becomes ``model``'s view."""
        for module in model.modules():
            entry = self._by_module.get(id(module))
            if entry is None or entry[0]() is not module:
                continue
            view = entry[1]
            if view.root is not None and view.root() is module:
                view.root = weakref.ref(model)
                view.model = type(model).__name__
                return view
        return None

    def _loose_view(self) -> _View:
        """The view of updates made outside any module's forward."""
        with self._lock:
            if self._loose is None:
                self._loose = self._make_view(None, None)
            return self._loose

    def _hook(self, module: Any, view: _View) -> None:
        key = id(module)
        entry = self._hooks.get(key)
        if entry is not None and entry[0]() is module:
            return
        pre, post = self._forward_hooks(view)
        handles = [module.register_forward_pre_hook(pre, with_kwargs=True),
                   module.register_forward_hook(post, always_call=True)]
        self._hooks[key] = (weakref.ref(module), handles)

    def _forward_hooks(self, view: _View) -> tuple[Callable[..., None], Callable[..., None]]:
        rec = self
        quiet = _quiet

        def cachescope_forward_start(module: Any, args: Any, kwargs: Any) -> None:
            if rec.paused or quiet():
                return None
            try:
                rec._begin_forward(view, module, args, kwargs)
            except Exception:
                rec._failed("the forward pre-hook")
            if rec.strict:
                rec._raise_pending()
            return None

        def cachescope_forward_end(module: Any, args: Any, output: Any) -> None:
            if rec.paused or quiet():
                return None
            try:
                rec._end_forward(view, output)
            except Exception:
                rec._failed("the forward hook")
            if rec.strict:
                rec._raise_pending()
            return None

        return cachescope_forward_start, cachescope_forward_end

    def hook(self, model: Any, name: str | None = None) -> InstrumentedCache:
        """Make each forward of ``model`` a step of its view from now on (forward hooks on its
        root; ``generate()`` does this for the models it runs, a loop that calls the model's
        forward itself can do it first); ``name``: the view's name, for a model seen for the
        first time. Returns the view. Undone by ``unhook()``."""
        return self._view_for(model, name=name).cache

    def unhook(self) -> None:
        """Remove every forward hook the recorder put on models (``watch()``'s too)."""
        with self._lock:
            for handle in self._watches:
                handle.remove()
            self._watches.clear()
            for _, handles in self._hooks.values():
                for h in handles:
                    try:
                        h.remove()
                    except Exception:
                        self._failed("removing a hook")
            self._hooks.clear()

    # ------------------------------------------------------------------ steps
    def _begin_forward(self, view: _View, module: Any, args: Any, kwargs: Any) -> None:
        stack = self._stack()
        while stack and stack[-1].orphan and stack[-1].view is view:
            self._close(stack.pop(), ok=False)
        top = stack[-1] if stack else None
        if top is not None and top.view is view and not top.orphan:
            top.depth += 1          # the root called again from inside its own forward
            return
        cache = view.cache
        cache.mark_step(cache.step, cache.step + 1)
        ctx = Forward(view, cache.step)
        base = self._cache_base
        c = kwargs.get("cache")
        if c is None:
            c = kwargs.get("past_key_values")
        if base is not None and isinstance(c, base):
            ctx.cache = c
            ctx.explicit = True
            ctx.state = self._state(c)
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            ctx.input_ids = ids
            ctx.batch, ctx.q = int(ids.shape[0]), int(ids.shape[1])
        else:
            emb = kwargs.get("inputs_embeds")
            if isinstance(emb, torch.Tensor) and emb.dim() == 3:
                ctx.batch, ctx.q = int(emb.shape[0]), int(emb.shape[1])
        ctx.position_ids = kwargs.get("position_ids")
        ctx.mask = kwargs.get("attention_mask")
        stack.append(ctx)

    def _end_forward(self, view: _View, output: Any) -> None:
        stack = self._stack()
        for j in range(len(stack) - 1, -1, -1):
            if stack[j].view is view and not stack[j].orphan:
                break
        else:
            return
        ctx = stack[j]
        if ctx.depth:
            ctx.depth -= 1
            return
        inner = stack[j + 1:]
        del stack[j:]
        for other in inner:
            self._close(other, ok=False)
        self._close(ctx, ok=output is not None)

    def _close(self, ctx: Forward, ok: bool) -> None:
        """End a forward: its view ops and checks (when it completed), then the view's step."""
        try:
            self._flush(ctx)
            if ok and not ctx.orphan and ctx.counts and ctx.cache is not None and not ctx.disturbed:
                self._forward_checks(ctx)
        finally:
            ctx.drop_inputs()
            ctx.view.cache.end_step(tokens=ctx.batch if ok else 0)

    def _forward_checks(self, ctx: Forward) -> None:
        cache = ctx.cache
        st = self._states.get(cache)
        if st is None or not st.checked:
            return
        known = self._known_layers
        start = ctx.start or {}
        if not (st.skipped or st.repeated or st.skew):
            uniform = ctx.uniform
            if uniform is None:
                uniform = self._uniform(cache.layers, ctx.counts, start, ctx.added)
            if uniform is not None:   # the usual forward: every layer once, lengths agree
                full, sliding = uniform
                kinds = st.kinds       # (the report and the per-layer metrics read view.kv)
                if kinds is None or len(kinds) != len(cache.layers):
                    kinds = st.kinds = tuple(self._known_layers.get(type(layer))
                                             for layer in cache.layers)
                ctx.view.kv = (kinds, full, sliding)
                self._follow_tokens(ctx, st, full if full is not None else sliding)
                return
        facts = []
        for i, layer in enumerate(cache.layers):
            t = type(layer)
            sliding = known.get(t)
            if sliding is None:
                continue
            base = start.get(i, 0)     # a layer created during this forward held nothing
            length = None if base is None else base + ctx.added.get(i, 0)
            facts.append(_checks.LayerFacts(i, sliding, ctx.counts.get(i, 0), length, t.__name__))
        view = ctx.view
        view.kv = {f.index: (f.length, f.sliding) for f in facts if f.length is not None}
        found = _checks.end_of_forward(
            facts, step=ctx.step, view=view.name, model=view.model or "the model", q=ctx.q,
            cache_cls=st.cls_name, skipped=st.skipped, repeated=st.repeated, skew=st.skew)
        gaps = st.gap
        gaps.update(st.skew)
        lengths = [f.length for f in facts if f.updates == 1 and not f.sliding and f.length is not None]
        if not lengths:
            lengths = [f.length for f in facts if f.updates == 1 and f.length is not None]
        self._follow_tokens(ctx, st, Counter(lengths).most_common(1)[0][0] if lengths else None)
        if found:
            records = view.cache.timeline()
            for v in found:
                v.timeline = _checks.queue_timeline(records, v.queue)
                view.cache.add_violation(v)

    def _uniform(self, layers: Any, counts: dict[int, int], start: dict[int, int | None],
                 added: dict[int, int]) -> tuple[int | None, int | None] | None:
        """``(full, sliding)``: the length of each kind of layer (None: no layer of that kind)
        when every known layer was updated once and each kind agrees on its length; else None."""
        known = self._known_layers
        full = sliding = None
        for i, layer in enumerate(layers):
            is_sliding = known.get(type(layer))
            if is_sliding is None:
                continue
            base = start.get(i, 0)
            if counts.get(i) != 1 or base is None:
                return None
            length = base + added.get(i, 0)
            if is_sliding:
                if sliding is None:
                    sliding = length
                elif sliding != length:
                    return None
            elif full is None:
                full = length
            elif full != length:
                return None
        if full is None and sliding is None:
            return None
        return full, sliding

    def _follow_tokens(self, ctx: Forward, st: CacheState, ref: int | None) -> None:
        """Extend the cache's token digests with this forward's input ids (``ref``: the cache's
        length now), or stop following it when lengths, rows or inputs do not say exactly which
        tokens it now holds."""
        trail = st.trail
        if trail is None:
            return
        ids = ctx.input_ids
        q = ctx.q
        if ref is None or ids is None or not q or ref != trail.length + q or not trail.extend(ids.tolist()):
            st.trail = None

    # ------------------------------------------------------------------ cache state
    def _state(self, cache: Any) -> CacheState:
        st = self._states.get(cache)
        if st is not None:
            return st
        t = type(cache)
        checked = t in self._known_caches
        st = CacheState(checked, t.__name__)
        if checked:
            try:
                fresh = all(not getattr(layer, "is_initialized", False) for layer in cache.layers)
            except Exception:
                fresh = False
            st.trail = TokenTrail() if fresh else None
        else:
            self._say_once(t.__name__, f"{t.__name__} is not a cache class cachescope checks "
                           "(DynamicCache, StaticCache): measured only (updates counted in "
                           "HFRecorder.measured_only, no checks)")
        try:
            self._states[cache] = st
        except TypeError:
            pass
        return st

    def _length(self, layer: Any) -> int | None:
        """Tokens ``layer`` holds (sliding layers: tokens ever added), for the known layer types;
        None when it cannot be read."""
        try:
            how = self._length_of.get(type(layer))
            if how == "keys":
                keys = layer.keys
                return 0 if keys is None or keys.dim() < 2 else int(keys.shape[-2])
            if how == "cumulative":
                return int(layer.cumulative_length)
            if how == "cumulative_int":
                return int(layer.cumulative_length_int)
            if how == "static":
                return int(layer.cumulative_length) if layer.is_initialized else 0
        except Exception:
            return None
        return None

    def _lengths(self, cache: Any) -> dict[int, int | None]:
        """Lengths of every known layer of ``cache`` (static layers off the CPU: one read)."""
        out: dict[int, int | None] = {}
        later = []
        for i, layer in enumerate(cache.layers):
            t = type(layer)
            if t not in self._known_layers:
                continue
            if self._length_of.get(t) == "static" and layer.is_initialized:
                cl = getattr(layer, "cumulative_length", None)
                if isinstance(cl, torch.Tensor) and cl.device.type != "cpu":
                    later.append((i, cl))
                    continue
            out[i] = self._length(layer)
        if later:
            try:
                values = torch.stack([cl.reshape(()).to(later[0][1].device) for _, cl in later]).tolist()
            except Exception:
                values = [None] * len(later)
            for (i, _), value in zip(later, values):
                out[i] = int(value) if value is not None else None
        return out

    # ------------------------------------------------------------------ update
    def _on_update(self, cache: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """``cache.update(*args, **kwargs)`` just returned (the hot path: once per layer).

        In a forward of a known model (default mode) the update is only noted: its layer, the
        keys it added, where its positions come from, and its owner (looked up here, where the
        model made the call). ``_flush`` checks and applies the noted updates, in order, when the
        forward ends: one warm loop per step instead of cachescope's work between the model's
        kernels. Strict mode, forwards found from the stack and updates outside any forward are
        checked and applied at once."""
        stack = self._local.__dict__.get("stack")
        ctx = stack[-1] if stack else None
        if ctx is not None and ctx.fast is cache:      # the usual case
            try:
                idx = args[2] if len(args) > 2 else kwargs["layer_idx"]
                if type(idx) is not int:
                    idx = operator.index(idx)
                key = args[0] if args else kwargs.get("key_states")
                k = key.shape[-2] if isinstance(key, torch.Tensor) and key.dim() >= 2 else None
            except Exception:
                self._measured[f"{ctx.state.cls_name} (update call not understood)"] += 1
                return
            cp, p = self._pos_source(args, kwargs)
            # depth 2: the frame that called Cache.update, past this one and the update wrapper
            # (looking it up directly spares materialising their frame objects)
            ctx.pending.append((idx, k, cp, p, ctx.view.cache.attributor.lookup(2)))
            return
        st = ctx.state if ctx is not None and ctx.cache is cache else None
        if st is None:
            st = self._state(cache)
        if not st.checked:
            self._measured[st.cls_name] += 1
            return
        try:
            idx = operator.index(args[2] if len(args) > 2 else kwargs["layer_idx"])
            key = args[0] if args else kwargs.get("key_states")
            if not 0 <= idx < len(cache.layers):
                raise IndexError(idx)
        except Exception:
            self._measured[f"{st.cls_name} (update call not understood)"] += 1
            return
        k = int(key.shape[-2]) if isinstance(key, torch.Tensor) and key.dim() >= 2 else None
        if ctx is None:
            ctx = self._discover()
        if ctx is not None:
            if ctx.cache is None:
                ctx.cache = cache
                ctx.state = st
            elif ctx.cache is not cache:
                label = f"{st.cls_name} in {type(ctx.cache).__name__}"
                self._measured[label] += 1
                self._say_once(label, f"{label}: measured only (cachescope checks the cache a "
                               "forward is given or makes, not caches inside other caches)")
                return
            if not ctx.orphan and not self.strict:
                ctx.fast = cache                       # this forward's next updates: noted
                cp, p = self._pos_source(args, kwargs)
                ctx.pending.append((idx, k, cp, p, ctx.view.cache.attributor.lookup(2)))
                return
        cp, p = self._pos_source(args, kwargs)
        self._update(ctx, ctx.view if ctx is not None else self._loose_view(), st, cache, idx, k,
                     cp, p, None)

    def _update(self, ctx: Forward | None, view: _View, st: CacheState, cache: Any, idx: int,
                k: int | None, cp: Any, p: Any, by: Any) -> None:
        """Check one update of layer ``idx`` (``k`` keys added; ``cp``/``p``: its cache_position or
        position_ids, if any) and apply it to the view (``by``: its owner, looked up at the update;
        None: looked up now)."""
        layer = cache.layers[idx]
        lt = type(layer)
        before = pos = None
        if lt in self._known_layers:
            if ctx is not None:
                start = ctx.start
                if start is None:          # lengths before the forward: now minus what it added
                    start = ctx.start = self._start_lengths(cache, ((idx, k),))
                base = start.get(idx, 0)   # a layer created during this forward held nothing
                before = None if base is None else base + ctx.added.get(idx, 0)
                if before is not None and not ctx.counts.get(idx):
                    # (a second update in one forward is layer_repeated, not a gap)
                    pos = self._positions(ctx, cp, p, before)
            else:
                now = self._length(layer)
                before = None if now is None or k is None else now - k
        with self._lock:
            if ctx is not None:
                counts = ctx.counts
                counts[idx] = counts.get(idx, 0) + 1
                if k is not None:
                    ctx.added[idx] = ctx.added.get(idx, 0) + k
                elif ctx.start is not None:
                    ctx.start[idx] = None      # length unknown from here
            if st.skipped:
                st.skipped.discard(idx)
            st.view = view
            writer = st.writers.get(idx)
            first = writer is None
            step = ctx.step if ctx is not None else view.cache.step
            if writer is not None and writer[0] != view.name:
                self._cross_model(view, idx, writer, st, step, by)
                first = True
            kv = st.kv.get(idx)
            if kv is None or kv._ref() is not layer:
                kv = st.kv[idx] = LayerKV(layer)
                if lt in self._known_layers:
                    try:
                        self._layer_cache[layer] = (weakref.ref(cache), idx)
                    except TypeError:
                        pass
            q = view.cache
            self._apply(q, layer_queue(idx), kv, by, first)
            if first:
                if by is None:
                    _, recs = q.ops_since(q.seq - 1)
                    by = (recs[-1].owner, recs[-1].site) if recs else (None, None)
                st.writers[idx] = (view.name, by[0], by[1], step)
            if pos is not None and before is not None:
                self._check_position(view, ctx, st, cache, idx, before, k, pos, lt, by)

    def _start_lengths(self, cache: Any, updates: Any) -> dict[int, int | None]:
        """Each known layer's length before the forward: its length now minus the keys that
        ``updates`` (``(layer, keys added, ...)``: those made but not yet counted) added."""
        start = self._lengths(cache)
        added: dict[int, int | None] = {}
        for i, n, *_ in updates:
            if i in added and added[i] is None:
                continue
            added[i] = None if n is None else added.get(i, 0) + int(n)
        for i, n in added.items():
            now = start.get(i)
            if now is not None:
                start[i] = None if n is None else now - n
        return start

    @staticmethod
    def _apply(q: InstrumentedCache, name: str, kv: LayerKV, by: Any, first: bool) -> None:
        """One update in the view: the owner rule's pop then the push (a new cache's layer: the
        queue is emptied first, there is nothing to extend)."""
        if first or not q.q_size(name):
            if q.q_size(name):
                q.clear(name, by)
            q.push(name, kv, by)
        else:
            q.pop_push(name, name, kv, by)   # the owner rule: popped by its writer?

    def _flush(self, ctx: Forward | None) -> None:
        """Check and apply the updates a forward has noted so far (at its end, or before a
        structural op on its cache)."""
        if ctx is None or not ctx.pending:
            return
        pending, ctx.pending = ctx.pending, []
        if ctx.start is None and not ctx.counts:
            try:
                if self._flush_fast(ctx, pending):
                    return
            except Exception:              # (nothing applied yet: each update checked below)
                self._failed("the one-pass update check")
        view, st, cache = ctx.view, ctx.state, ctx.cache
        if ctx.start is None:
            ctx.start = self._start_lengths(cache, pending)
        update = self._update
        n_layers = len(cache.layers)
        for idx, k, cp, p, by in pending:
            if not 0 <= idx < n_layers:   # (as an update the slow path does not understand)
                self._measured[f"{st.cls_name} (update call not understood)"] += 1
                continue
            try:
                update(ctx, view, st, cache, idx, None if k is None else int(k), cp, p, by)
            except Exception:             # one update's check failing leaves the others checked
                self._failed("the update check")
                ctx.disturbed = True      # (and no end-of-forward verdict on counts it lacks)

    def _flush_fast(self, ctx: Forward, pending: list[Any]) -> bool:
        """The usual forward in one pass: every layer of a known type updated once, in order, by
        the view that wrote it, lengths agreeing and positions continuing them. Checks all of it
        first and, only if it all holds, applies the ops (one ``pop_push_many``) and leaves the
        forward's verdict in ``ctx.uniform``; else changes nothing and returns False (``_update``
        then checks each update and reports what broke)."""
        st, cache, view = ctx.state, ctx.cache, ctx.view
        if (st is None or not st.checked or ctx.disturbed or ctx.orphan or st.skipped
                or st.repeated or st.skew or st.gap or st.view is not view):
            return False
        layers = cache.layers
        n = len(layers)
        if len(pending) != n:
            return False
        known, length_of, writers, kvs = self._known_layers, self._length_of, st.writers, st.kv
        vname, q = view.name, view.cache
        q_size = q.q_size
        positions = self._positions
        tensor = torch.Tensor
        ops = []
        added = {}
        start = {}
        for i in range(n):
            idx, k, cp, p, by = pending[i]
            if idx != i or type(k) is not int:
                return False
            layer = layers[i]
            lt = type(layer)
            if lt not in known:
                return False
            how = length_of.get(lt)
            if how == "keys":
                keys = layer.keys
                now = 0 if keys is None or keys.dim() < 2 else int(keys.shape[-2])
            else:
                if how == "static" and isinstance(getattr(layer, "cumulative_length", None), tensor) \
                        and layer.cumulative_length.device.type != "cpu":
                    return False          # (read all at once by the full path)
                now = self._length(layer)
                if now is None:
                    return False
            w = writers.get(i)
            if w is None or w[0] != vname:
                return False
            kv = kvs.get(i)
            if kv is None or kv._ref() is not layer:
                return False
            before = now - k
            pos = positions(ctx, cp, p, before)
            if pos is not None and pos[1]:
                return False              # a gap: reported by the full path
            name = layer_queue(i)
            if not q_size(name):
                return False
            ops.append((name, name, kv, by))
            added[i] = k
            start[i] = before
        counts = dict.fromkeys(range(n), 1)
        uniform = self._uniform(layers, counts, start, added)
        if uniform is None:               # lengths disagree: reported by the full path
            return False
        with self._lock:
            st.view = view
            ctx.counts = counts
            ctx.added = added
            ctx.start = start
            ctx.uniform = uniform
            try:
                q.pop_push_many(ops)
            except Exception:
                self._failed("applying a forward's updates")
                ctx.disturbed = True      # (no end-of-forward verdict on what was not applied)
        return True

    def _flush_all(self) -> None:
        """Check and apply the updates noted on this thread (a structural op is about to change
        the layers' lengths and to be reported: its timeline and order must include them)."""
        for ctx in self._stack():
            if ctx.pending:
                self._flush(ctx)

    def _cross_model(self, view: _View, idx: int, writer: Any, st: CacheState, step: int,
                     by: Any = None) -> None:
        owner, site = by if by is not None else view.cache.attributor.lookup(0)
        v = _checks.cross_model(idx, step=step, view=view.name, consumer=owner, site=site,
                                writer=writer, cache_cls=st.cls_name,
                                timeline=_checks.queue_timeline(view.cache.timeline(), f"layer_{idx}"))
        view.cache.add_violation(v)

    def _check_position(self, view: _View, ctx: Forward | None, st: CacheState, cache: Any, idx: int,
                        before: int, k: int | None, pos: Any, lt: Any, by: Any = None) -> None:
        source, rows, firsts = pos
        gaps = st.gap
        if not rows:
            gaps.pop(idx, None)
            return
        d = before - firsts[0]
        if gaps.get(idx) == d:
            return
        gaps[idx] = d
        if ctx is not None:
            if d in ctx.gap_skews:
                return
            ctx.gap_skews.add(d)
        owner, site = by if by is not None else view.cache.attributor.lookup(0)
        writer = st.writers.get(idx)
        v = _checks.position_gap(
            idx, step=ctx.step if ctx is not None else view.cache.step, view=view.name,
            model=view.model or "the model", consumer=owner, site=site, before=before,
            positions=firsts, rows=rows, new=k, source=source, cache_cls=st.cls_name,
            layer_cls=getattr(lt, "__name__", "?"), writer=writer[1] if writer else None,
            timeline=_checks.queue_timeline(view.cache.timeline(), f"layer_{idx}"))
        view.cache.add_violation(v)

    @staticmethod
    def _pos_source(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """``(cache_position, position_ids)`` an update carries (small tensors, or None: the
        forward's ``position_ids`` then)."""
        cache_kwargs = args[3] if len(args) > 3 else kwargs.get("cache_kwargs")
        if type(cache_kwargs) is dict:
            cp = cache_kwargs.get("cache_position")
            if isinstance(cp, torch.Tensor):
                return cp, None
        inner = kwargs.get("kwargs")
        if type(inner) is dict:
            p = inner.get("position_ids")
            if isinstance(p, torch.Tensor):
                return None, p
        return None, None

    def _positions(self, ctx: Forward, cp: Any, p: Any, before: int) -> Any:
        """``(source, rows, positions)``: the rows whose new keys do not start at ``before``
        (empty: all do), or None when nothing says where they start (or padding hides it)."""
        if cp is not None:
            memo = ctx.pos_memo
            first = memo.get(id(cp))       # the same tensor for every layer of a forward
            if first is None:
                if not cp.numel():
                    return None
                first = memo[id(cp)] = int(cp.reshape(-1)[0])
                memo[("keep", id(cp))] = cp  # (kept until the forward ends: ids stay unique)
            return _POS_OK if first == before else ("cache_position", (0,), (first,))
        if p is None:
            p = ctx.position_ids
        if not isinstance(p, torch.Tensor) or p.dim() not in (1, 2) or not p.numel():
            return None
        key = (id(p), before)
        memo = ctx.pos_memo.get(key)
        if memo is not None:
            return memo
        first = [int(p[0])] if p.dim() == 1 else p[:, 0].tolist()
        expected = self._expected_positions(ctx.mask, before, len(first))
        if expected is None:
            ctx.pos_memo[key] = None
            return None
        rows, firsts = [], []
        n = max(len(first), len(expected))
        for r in range(n):
            e = expected[r] if len(expected) > 1 else expected[0]
            f = first[r] if len(first) > 1 else first[0]
            if e is not None and f != e:
                rows.append(r)
                firsts.append(f)
        result = ctx.pos_memo[key] = ("position_ids", rows, firsts)
        return result

    @staticmethod
    def _expected_positions(mask: Any, before: int, rows: int) -> list[int | None] | None:
        """Where each row's new tokens should start: ``before`` without padding; with a 2-D mask,
        the real tokens before them (rows whose first new token is padding are not checked);
        a 4-D mask is used only when it shows plain causal attention without padding."""
        if mask is None:
            return [before]
        if isinstance(mask, dict):
            mask = mask.get("full_attention")
            if mask is None:
                return None
        if not isinstance(mask, torch.Tensor):
            return None
        if mask.dim() == 2:
            if mask.shape[-1] < before + 1:
                return None
            if bool(mask.all()):       # no padding (generate's usual mask): one tensor op
                return [before] * int(mask.shape[0])
            m = mask[:, :before + 1]
            real = m[:, :before].sum(-1).tolist()
            valid = (m[:, before] != 0).tolist()
            return [r if ok else None for r, ok in zip(real, valid)]
        if mask.dim() == 4 and mask.dtype == torch.bool:
            counts = mask[:, 0, 0, :].sum(-1).tolist()
            if all(c == before + 1 for c in counts):
                return [before]
        return None

    def _discover(self) -> Forward | None:
        """An update outside any known forward: the outermost module on the stack is the model
        (hooked from now on); this forward becomes a step of its view, without end checks."""
        module_type = torch.nn.Module
        frame = sys._getframe(3)   # past _on_update and the update wrapper
        outer = None
        for _ in range(256):
            if frame is None:
                break
            code = frame.f_code
            if code.co_argcount and code.co_varnames[0] == "self":
                obj = frame.f_locals.get("self")
                if issubclass(type(obj), module_type):
                    outer = obj
            frame = frame.f_back
        del frame
        if outer is None:
            return None
        view = self._view_for(outer)
        cache = view.cache
        cache.mark_step(cache.step, cache.step + 1)
        ctx = Forward(view, cache.step, orphan=True)
        self._stack().append(ctx)
        return ctx

    # ------------------------------------------------------------------ structural ops
    def _enter_op(self, cache: Any, op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._local.in_op = self._in_op() + 1
        st = self._state(cache)
        if not st.checked:
            return None
        ctx = self._running(cache)
        lengths = None
        if ctx is not None:
            self._flush_all()
            ctx.disturbed = True
            lengths = self._lengths(cache)
            view = ctx.view
            owner, site = view.cache.attributor.lookup(0)
            v = _checks.structural(
                op, layer=None, n_layers=len(cache.layers), step=ctx.step, view=view.name,
                model=view.model or "the model", consumer=owner, site=site,
                cache_cls=st.cls_name, mid_step=True, updated=sorted(ctx.counts),
                timeline=tuple(view.cache.timeline()[-12:]))
            view.cache.add_violation(v)
        return (st, cache, op, args, kwargs, ctx, lengths)

    def _running(self, cache: Any) -> Forward | None:
        """The forward in progress on this thread that extends ``cache``, if any."""
        for ctx in reversed(self._stack()):
            if ctx.cache is cache and not ctx.orphan:
                return ctx
        return None

    def _shifted(self, cache: Any, st: CacheState, ctx: Forward | None,
                 before: dict[int, int | None], layer: int | None) -> None:
        """A structural op changed layer lengths mid-step (or one layer's): what follows from it
        (the gap at the next update, the skew after the forward) was reported with it."""
        after = self._lengths(cache)
        gaps = st.gap
        for i, old in before.items():
            new = after.get(i)
            if old is None or new is None or new == old:
                continue
            delta = new - old
            gaps[i] = gaps.get(i, 0) + delta
            if layer is not None:
                st.skew[i] = st.skew.get(i, 0) + delta
            if ctx is not None and ctx.start is not None and ctx.start.get(i) is not None:
                ctx.start[i] += delta

    def _reference_length(self, cache: Any) -> int | None:
        """The length most full-attention layers hold (else most sliding layers' counters)."""
        lengths = self._lengths(cache)
        full = [n for i, n in lengths.items() if n is not None
                and not self._known_layers.get(type(cache.layers[i]), False)]
        pool = full or [n for n in lengths.values() if n is not None]
        return Counter(pool).most_common(1)[0][0] if pool else None

    def _exit_op(self, token: Any, ok: bool) -> None:
        self._local.in_op = max(0, self._in_op() - 1)
        if token is None or not ok:
            return
        st, cache, op, args, kwargs, ctx, lengths = token
        if lengths is not None:
            self._shifted(cache, st, ctx, lengths, None)
        if op == "reset":
            st.forget()
            st.gap.clear()
            return
        trail = st.trail
        if trail is None:
            return
        arg = args[0] if args else next(iter(kwargs.values()), None)
        done = False
        if op == "crop":
            length = self._reference_length(cache)
            done = length is not None and trail.crop_to(length)
        elif op in ("reorder_cache", "batch_select_indices") and isinstance(arg, torch.Tensor):
            rows = arg.nonzero().reshape(-1).tolist() if arg.dtype == torch.bool else arg.reshape(-1).tolist()
            done = trail.select(rows)
        elif op == "batch_repeat_interleave":
            done = trail.repeat(arg)
        if not done:
            st.trail = None

    def _layer_op(self, layer: Any, op: str) -> Any:
        """A structural op on one layer, outside a whole-cache op: reported; returns what
        ``_after_layer_op`` needs."""
        entry = self._layer_cache.get(layer)
        if entry is None:
            return None
        cache = entry[0]()
        idx = entry[1]
        if cache is None:
            return None
        st = self._states.get(cache)
        if st is None or not st.checked:
            return None
        st.trail = None
        self._flush_all()
        view = st.view or self._loose_view()
        step = view.cache.step
        ctx = self._running(cache)
        if ctx is not None:
            step = ctx.step
            view = ctx.view
        owner, site = view.cache.attributor.lookup(0)
        v = _checks.structural(
            op, layer=idx, n_layers=len(cache.layers), step=step, view=view.name,
            model=view.model or "the model", consumer=owner, site=site, cache_cls=st.cls_name,
            mid_step=False, updated=(),
            timeline=_checks.queue_timeline(view.cache.timeline(), f"layer_{idx}"))
        view.cache.add_violation(v)
        return (cache, st, ctx, idx, {idx: self._length(layer)})

    def _after_layer_op(self, token: Any) -> None:
        if token is None:
            return
        cache, st, ctx, idx, before = token
        after = self._length(cache.layers[idx]) if idx < len(cache.layers) else None
        old = before[idx]
        if old is None or after is None or after == old:
            return
        delta = after - old
        gaps = st.gap
        gaps[idx] = gaps.get(idx, 0) + delta
        st.skew[idx] = st.skew.get(idx, 0) + delta
        if ctx is not None and ctx.start is not None and ctx.start.get(idx) is not None:
            ctx.start[idx] += delta

    # ------------------------------------------------------------------ generations
    def _begin_generation(self, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _View:
        view = self._view_for(model)
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs")
        if ids is None and args:
            ids = args[0]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            ids = None
        if view.gen_depth == 0:
            info: dict[str, Any] = {"model": view.model}
            if ids is not None:
                info["prompt_tokens"] = int(ids.shape[1])
                info["batch"] = int(ids.shape[0])
            mnt = kwargs.get("max_new_tokens")
            if type(mnt) is int:
                info["max_new_tokens"] = mnt
            cm = view.cache.generation(**info)
            cm.__enter__()
            view.gen_cm = cm
        view.gen_depth += 1
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")
        if ids is not None and self._cache_base is not None and isinstance(cache, self._cache_base):
            self._stale_check(view, cache, ids, kwargs.get("attention_mask"))
        return view

    def _stale_check(self, view: _View, cache: Any, ids: Any, mask: Any) -> None:
        st = self._states.get(cache)
        if st is None or not st.checked or st.trail is None or not st.trail.length:
            return
        trail = st.trail
        n = trail.length
        if trail.rows != int(ids.shape[0]):
            return
        if isinstance(mask, torch.Tensor) and mask.shape[-1] != ids.shape[1]:
            return    # only the new tokens were passed (the mask covers the whole sequence)
        owner, site = view.cache.attributor.lookup(0)
        if ids.shape[1] < n:
            rows = list(range(int(ids.shape[0])))
            prompt = None
        else:
            got = [digest_tokens(row) for row in ids[:, :n].tolist()]
            rows = [r for r, g in enumerate(got) if g != trail.digest(r)]
            prompt = [got[r] for r in rows]
        if not rows:
            return
        v = _checks.stale_reuse(step=view.cache.step + 1, view=view.name,
                                model=view.model or "the model", cache_cls=st.cls_name, length=n,
                                rows=rows, cached=[trail.digest(r) for r in rows], prompt=prompt,
                                prompt_len=int(ids.shape[1]), site=site)
        view.cache.add_violation(v)

    def _end_generation(self, view: _View, error: BaseException | None) -> None:
        view.gen_depth = max(0, view.gen_depth - 1)
        if view.gen_depth:
            return
        stack = self._stack()
        for ctx in [c for c in stack if c.view is view]:
            stack.remove(ctx)
            self._close(ctx, ok=False)
        cm, view.gen_cm = view.gen_cm, None
        if cm is not None:
            if error is None:
                cm.__exit__(None, None, None)
            else:
                cm.__exit__(type(error), error, error.__traceback__)


def _lengths_line(lengths: dict[int, tuple[int, bool]] | None) -> str:
    """``KV tokens per layer after the last forward: 6 full-attention layers x 21 (skew 0)``, or
    each layer's length when they differ (the first 12)."""
    if not lengths:
        return ""
    parts = []
    for sliding, kind in ((False, "full-attention"), (True, "sliding-window")):
        ns = {i: n for i, (n, s) in lengths.items() if s is sliding}
        if not ns:
            continue
        if len(set(ns.values())) == 1:
            parts.append(f"{len(ns)} {kind} layer(s) x {next(iter(ns.values()))}")
        else:
            shown = ", ".join(f"{i}: {n}" for i, n in sorted(ns.items())[:12])
            parts.append(f"{kind} layers {shown}{' ...' if len(ns) > 12 else ''}")
    return (f"KV tokens per layer after the last forward: {'; '.join(parts)} "
            f"(skew {layer_skew(lengths)})")


def _quiet() -> bool:
    """Inside torch.compile / torch.export tracing or a TorchScript trace: cachescope stays out."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()
