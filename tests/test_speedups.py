"""The C fast path (``cachescope/_speedups.c``) against the pure-Python path.

``InstrumentedCache`` takes the common case of push/pop/get in C when the extension is built
(``cachescope._hot``) and falls back to its Python methods for everything unusual. These tests
run the same work twice, ``speedups=True`` and ``speedups=False``, and require everything a user
or an exporter can observe to be identical: return values, exceptions (type, message, notes),
``cache.stats`` (every ``FamilyStats`` field), the timeline records (all fields but ``time``;
``value`` by bytes, storage sizes and kind, since the fast path leaves ``Measure.summary`` None),
the violations with their full reports, the run report and what sinks receive. They also check
that the fast path really ran (the Python methods are called for far fewer ops than were made)
and that it keeps no tensor alive.

When the ``CI`` environment variable is set, the extension must be built and active: tests that
need it fail instead of skipping.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
import weakref
from collections import Counter
from typing import Any, Callable, NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from torch import nn

import cachescope
from cachescope import InstrumentedCache, PopOrderError
from cachescope import _hot as hotpath
from cachescope._accounting import FamilyStats
from cachescope._checker import PopEmptyError, PopMissingError
from cachescope.faults import FAULTS, inject

from _kvloop import require_fast_path
from _loop import run_decode, tiny_model

L = [f"layers.{i}.attention" for i in range(4)]


# ----------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture(autouse=True)
def _python_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path is not switched off from the environment for these tests."""
    monkeypatch.delenv("CACHESCOPE_PURE_PYTHON", raising=False)


@pytest.fixture(autouse=True)
def _no_unraisable(monkeypatch: pytest.MonkeyPatch):
    """The fast path reports internal errors with PyErr_WriteUnraisable: any of them fails the test."""
    seen: list[str] = []

    def hook(u: Any) -> None:
        seen.append(f"{u.exc_type.__name__}: {u.exc_value} (object {u.object!r})")

    monkeypatch.setattr(sys, "unraisablehook", hook)
    yield
    assert seen == [], f"unraisable errors: {seen}"


def new_cache(speedups: bool, construction: str = "bare", **options: Any) -> InstrumentedCache:
    """A cache on the requested path (asserting that it is the path in use)."""
    if speedups:
        require_fast_path()
    if construction == "default":   # metrics + tracing sinks, own registry: names never clash
        from prometheus_client import CollectorRegistry
        options.setdefault("name", "speedups")
        cache = InstrumentedCache(registry=CollectorRegistry(), speedups=speedups, **options)
    else:
        cache = InstrumentedCache(metrics=False, tracing=False, speedups=speedups, **options)
    assert cache.speedups_active is speedups
    return cache


class SlowCalls:
    """Counts the ops that reached the Python implementation, per cache.

    ``InstrumentedCache.push``/``pop`` do their attribution by reading the caller's frame, so a
    Python wrapper around them would change the recorded call sites; they delegate all the work to
    ``_push``/``_pop``, which the fast path never calls, so those are counted instead. ``get``
    reads no frame: the Python function behind the class's C descriptor is wrapped, in a new
    descriptor (before any cache exists: ``Hot`` keeps that function as its slow path).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter[tuple[int, str]] = Counter()
        counts = self.counts
        descriptor = InstrumentedCache.__dict__["get"]
        orig_push, orig_pop = InstrumentedCache._push, InstrumentedCache._pop
        orig_get = getattr(descriptor, "__wrapped__", descriptor)

        def _push(self: Any, *args: Any, **kwargs: Any) -> Any:
            counts[id(self), "push"] += 1
            return orig_push(self, *args, **kwargs)

        def _pop(self: Any, *args: Any, **kwargs: Any) -> Any:
            counts[id(self), "pop"] += 1
            return orig_pop(self, *args, **kwargs)

        def get(self: Any, *args: Any, **kwargs: Any) -> Any:
            counts[id(self), "get"] += 1
            return orig_get(self, *args, **kwargs)

        monkeypatch.setattr(InstrumentedCache, "_push", _push)
        monkeypatch.setattr(InstrumentedCache, "_pop", _pop)
        fast_op = type(descriptor)
        monkeypatch.setattr(InstrumentedCache, "get",
                            fast_op(2, get) if fast_op.__name__ == "FastOp" else get)

    def __call__(self, cache: Any, op: str) -> int:
        return self.counts[id(cache), op]


@pytest.fixture
def slow_calls(monkeypatch: pytest.MonkeyPatch) -> SlowCalls:
    return SlowCalls(monkeypatch)


def total(cache: InstrumentedCache, op: str) -> int:
    return sum(getattr(fs, op) for fs in cache.stats.families.values())


# ----------------------------------------------------------------------------- normalised views

def norm_measure(m: Any) -> Any:
    """A Measure without its summary (None on the fast path) and storage keys (addresses)."""
    if m is None:
        return None
    return (m.logical, tuple(n for _, n in m.storages), m.kind, m.truncated)


def norm_record(r: Any) -> Any:
    return r._replace(time=0.0, value=norm_measure(r.value))


def norm_violation(v: Any) -> dict[str, Any]:
    d = v.to_dict()
    d["timeline"] = [norm_record(r) for r in v.timeline]
    d["report"] = v.report()
    d["summary"] = v.summary()
    return d


def norm_error(exc: BaseException | None) -> Any:
    if exc is None:
        return None
    out = (type(exc), str(exc), tuple(getattr(exc, "__notes__", ())))
    if isinstance(exc, PopOrderError):
        out += (norm_violation(exc.violation),)
    cause = exc.__cause__
    return out + ((type(cause), str(cause)) if cause is not None else None,)


def stats_view(cache: InstrumentedCache) -> dict[str, Any]:
    fams = {}
    for fam, fs in cache.stats.families.items():
        d = {field: getattr(fs, field) for field in FamilyStats.FIELDS}
        d["violations"] = dict(fs.violations)
        d["_storages"] = fs.held_storages()
        fams[fam] = d
    s = cache.stats
    return {"families": fams, "steps": s.steps, "tokens": s.tokens,
            "violations_dropped": s.violations_dropped, "telemetry_errors": dict(s.telemetry_errors)}


def _key(k: Any) -> str:
    return f"{type(k).__name__}:{k!r}" if not isinstance(k, str) else k


def _leaf(x: Any) -> Any:
    """State ids may hold anything (tensors too): compared by identity beyond plain data."""
    if x is None or type(x) in (int, str, float, bool):
        return x
    if type(x) in (tuple, list):
        return (type(x).__name__, tuple(_leaf(i) for i in x))
    return (type(x).__name__, id(x))


def snapshot(cache: InstrumentedCache) -> dict[str, Any]:
    """Everything observable about a cache's instrumentation, with times and addresses left out."""
    step = cache.current_step
    return {
        "stats": stats_view(cache),
        "timeline": [norm_record(r) for r in cache.timeline()],
        "violations": [norm_violation(v) for v in cache.violations],
        "report": cache.report(),
        "seq": cache._seq,
        "step": cache.step,
        "current_step": None if step is None else (
            step.index, _leaf(step.prev), _leaf(step.next), step.end is None, step.tokens, step.ops,
            step.violations, sorted(map(_key, step.pushed)), sorted(map(_key, step.popped))),
        "step_pops": sorted(((_key(n), o) for n, o in cache._step_pops), key=repr),
        "contents": {_key(k): (len(v) if type(v) is list else type(v).__name__)
                     for k, v in cache._cache.items()},
        "provenance": {_key(k): ([norm_record(r) for r in q.items], q.pops)
                       for k, q in cache._queues.items()},
        "owners": sorted(label for _, label in cache._attributor._labels.values()),
    }


def assert_same(fast: Any, slow: Any, what: str = "") -> None:
    """``fast == slow``, field by field for dicts so that a failure names what differs."""
    if isinstance(fast, dict) and isinstance(slow, dict) and fast != slow:
        assert fast.keys() == slow.keys(), what
        for k in fast:
            assert_same(fast[k], slow[k], f"{what}.{k}")
    elif isinstance(fast, list) and isinstance(slow, list) and fast != slow:
        assert len(fast) == len(slow), f"{what}: {len(fast)} vs {len(slow)} entries"
        for i, (a, b) in enumerate(zip(fast, slow)):
            assert_same(a, b, f"{what}[{i}]")
    else:
        assert fast == slow, f"{what}: fast path {fast!r} != python path {slow!r}"


class EventLog:
    """A sink that logs every event it gets, normalised (reads no value summaries)."""

    needs_values = False

    def __init__(self) -> None:
        self.events: list[Any] = []

    def on_op(self, cache: Any, rec: Any) -> None:
        self.events.append(("op", norm_record(rec)))

    def on_violation(self, cache: Any, v: Any) -> None:
        self.events.append(("violation", v.kind, v.queue, v.seq))

    def on_step_start(self, cache: Any, step: Any) -> None:
        self.events.append(("step_start", step.index, _leaf(step.prev), _leaf(step.next)))

    def on_step_end(self, cache: Any, step: Any) -> None:
        self.events.append(("step_end", step.index, step.tokens, step.ops, step.violations,
                            sorted(map(_key, step.pushed)), sorted(map(_key, step.popped))))

    def on_generation_start(self, cache: Any, info: Any) -> None:
        self.events.append(("generation_start", dict(info)))

    def on_generation_end(self, cache: Any, info: Any) -> None:
        info = dict(info)
        info["error"] = type(info["error"]).__name__ if info.get("error") is not None else None
        self.events.append(("generation_end", info))


class ValueLog(EventLog):
    """A sink that needs full values (as sinks without ``needs_values`` do); keeps the summaries."""

    needs_values = True

    def __init__(self) -> None:
        super().__init__()
        self.summaries: list[Any] = []

    def on_op(self, cache: Any, rec: Any) -> None:
        super().on_op(cache, rec)
        if rec.op == "push":
            self.summaries.append(rec.value.summary)


# ----------------------------------------------------------------------------- 1. built and on

def test_fast_path_is_built_and_on_by_default() -> None:
    """CI builds the extension: AVAILABLE is True and a default InstrumentedCache() uses it."""
    require_fast_path()
    assert hotpath.AVAILABLE is True
    cache = InstrumentedCache()
    assert cache.speedups_active is True
    assert type(cache._hot).__module__ == "cachescope._speedups"
    for op in ("push", "pop", "get"):
        # the class's op is the C method descriptor; bound, it keeps the cache (like a method)
        assert type(getattr(InstrumentedCache, op)).__name__ == "FastOp", op
        assert getattr(cache, op).__self__ is cache, op
    assert not {"push", "pop", "get"} & set(vars(cache))
    del cache


def test_pure_python_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    """speedups=False and CACHESCOPE_PURE_PYTHON=1 force the Python methods; so does an unbuilt extension."""
    off = InstrumentedCache(metrics=False, tracing=False, speedups=False)
    assert off.speedups_active is False and isinstance(off._hot, hotpath.PyHot)
    assert not {"push", "pop", "get"} & set(vars(off))
    for value in ("1", "yes", "true"):
        monkeypatch.setenv("CACHESCOPE_PURE_PYTHON", value)
        assert InstrumentedCache(metrics=False, tracing=False).speedups_active is False
    for value in ("", "0", "no", "false"):
        monkeypatch.setenv("CACHESCOPE_PURE_PYTHON", value)
        assert InstrumentedCache(metrics=False, tracing=False).speedups_active is hotpath.AVAILABLE
    monkeypatch.delenv("CACHESCOPE_PURE_PYTHON")
    monkeypatch.setattr(hotpath, "AVAILABLE", False)
    unbuilt = InstrumentedCache(metrics=False, tracing=False)
    assert unbuilt.speedups_active is False and isinstance(unbuilt._hot, hotpath.PyHot)


# ----------------------------------------------------------------------------- 2. decodes and faults

class Run(NamedTuple):
    tokens: list[int]
    error: Any
    events: list[Any]
    fault_events: list[Any]
    snap: dict[str, Any]


def decode_run(speedups: bool, spec: Any = None, *, watch: bool = True,
               construction: str = "bare", strict: bool = False, new_tokens: int = 6,
               sink: type = EventLog) -> tuple[InstrumentedCache, Run]:
    """Decode with the tiny NeoX model, optionally with ``spec`` injected (see docs/faults.md)."""
    cache = new_cache(speedups, construction, strict=strict)
    log = cache.add_sink(sink())
    model = tiny_model()
    tokens: list[int] = []
    error = None
    handle = None
    with contextlib.ExitStack() as stack:
        if watch:
            stack.enter_context(cachescope.watch(model, cache))
        try:
            if spec is not None:
                handle = stack.enter_context(inject(spec, model.layers, cache, model=model))
            run_decode(cache, new_tokens, on_step=lambda i, t: tokens.append(t))
        except (IndexError, KeyError, PopOrderError) as exc:
            error = exc
    fault_events = [] if handle is None else [(str(e.fault), e.step, e.cache_step, e.what)
                                               for e in handle.events]
    return cache, Run(tokens, norm_error(error), log.events, fault_events, snapshot(cache))


def assert_runs_match(fast: Run, slow: Run) -> None:
    assert fast.tokens == slow.tokens
    assert fast.error == slow.error
    assert fast.fault_events == slow.fault_events
    assert_same(fast.snap, slow.snap, "snapshot")
    assert_same(fast.events, slow.events, "sink events")


@pytest.mark.parametrize("watch", [True, False], ids=["watched", "stack-walk"])
@pytest.mark.parametrize("construction", ["bare", "default"])
def test_clean_decode_matches_and_runs_in_c(construction: str, watch: bool,
                                            slow_calls: SlowCalls) -> None:
    """A real decode gives the same tokens, stats, timeline, report and sink events on both paths,
    and on the fast path almost no push/pop/get reaches Python."""
    fast_cache, fast = decode_run(True, watch=watch, construction=construction, new_tokens=8)
    slow_cache, slow = decode_run(False, watch=watch, construction=construction, new_tokens=8)
    assert_runs_match(fast, slow)
    assert fast.error is None and fast.snap["violations"] == []
    assert fast.snap["stats"]["steps"] == 8 and fast.snap["stats"]["tokens"] == 8
    owners = {r.owner for r in fast.snap["timeline"] if r.op in ("push", "pop")}
    assert owners == (set(L) if watch else {f"Attention#{i}" for i in range(4)})

    pushes, pops, gets = (total(fast_cache, op) for op in ("push", "pop", "get"))
    assert (pushes, pops) == (4 * 8, 4 * 7)
    # Python path: every op goes through the Python implementation.
    assert [slow_calls(slow_cache, op) for op in ("push", "pop", "get")] == [pushes, pops, gets]
    # Fast path: at most the first op of each layer (its module is not labelled yet) and the
    # first get of each key (its family is not memoised yet) take the Python methods.
    assert slow_calls(fast_cache, "push") <= (0 if watch else 4)
    assert slow_calls(fast_cache, "pop") == 0
    assert slow_calls(fast_cache, "get") <= 2 < gets


FAULT_SPECS = sorted(set(FAULTS) | {
    "swap@3:layer=1,other=2", "skip@2:layer=1", "skip@2:layer=-1", "repeat@2:layer=1",
    "retry@2:layer=2", "stale-state@2", "stale-state@1", "clear@2:layer=1", "swap@0", "skip@0",
    "repeat@0", "retry@0", "retry@1:layer=0", "clear@3:layer=2,queue=attn_kv_3",
}) + [["swap@1:layer=0,other=1", "swap@4:layer=2,other=3"]]


# a retry raising before the first cache layer ran: nothing was popped or pushed, nothing to report
NO_VIOLATIONS = ["retry@1:layer=0"]


@pytest.mark.parametrize("watch", [True, False], ids=["watched", "stack-walk"])
@pytest.mark.parametrize("spec", FAULT_SPECS, ids=str)
def test_faults_match(spec: Any, watch: bool) -> None:
    """Every fault of cachescope.faults gives the same violations, reports, error and state on both paths."""
    _, fast = decode_run(True, spec, watch=watch)
    _, slow = decode_run(False, spec, watch=watch)
    assert_runs_match(fast, slow)
    if spec not in NO_VIOLATIONS:
        assert fast.snap["violations"], "the fault fired and was reported"
    if watch and isinstance(spec, str) and spec in FAULTS:
        assert set(FAULTS[spec].expected_kinds) <= {v["kind"] for v in fast.snap["violations"]}


@pytest.mark.parametrize("spec", sorted(FAULTS))
def test_faults_match_in_strict_mode(spec: str) -> None:
    """In strict mode the first violation raises the same PopOrderError subclass with the same report."""
    _, fast = decode_run(True, spec, strict=True)
    _, slow = decode_run(False, spec, strict=True)
    assert_runs_match(fast, slow)
    assert fast.error is not None and issubclass(fast.error[0], PopOrderError)


def test_values_are_measured_in_full_when_a_sink_needs_them() -> None:
    """The fast path leaves Measure.summary None only while no sink needs values."""
    require_fast_path()
    fast_cache, fast = decode_run(True, sink=ValueLog)
    _, slow = decode_run(False, sink=ValueLog)
    assert_runs_match(fast, slow)
    pushes = [r for r in fast_cache.timeline() if r.op == "push"]
    assert pushes and all(r.value.summary is not None for r in pushes)
    assert all(s is not None and len(s) == 2 for s in fast_cache.sinks[0].summaries)
    quiet, _ = decode_run(True, sink=EventLog)
    assert all(r.value.summary is None for r in quiet.timeline() if r.op == "push")


# ----------------------------------------------------------------------------- 3. attribution

class Layer(nn.Module):
    """A labml-style layer: pops ``kv_{prev}``, pushes ``kv_{next}`` from its own forward."""

    def __init__(self, cache: Any, index: int) -> None:
        super().__init__()
        self.cache = cache
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        prev, nxt = cache.get("state_ids")
        if prev is not None:
            k, _ = cache.pop(f"kv_{prev}")
            x = x + k[-1:]
        cache.push(f"kv_{nxt}", (x.clone(), x * 2))
        return x + self.index


class ClosureLayer(Layer):
    """``self`` is a cell variable of forward (a closure refers to it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = lambda t: t * self.index   # noqa: E731 - makes `self` a cell
        cache = self.cache
        prev, nxt = cache.get("state_ids")
        if prev is not None:
            k, _ = cache.pop(f"kv_{prev}")
            x = x + scale(k[-1:])
        cache.push(f"kv_{nxt}", (x.clone(), x * 2))
        return x


class NestedPushLayer(Layer):
    """Pushes from a nested function (free variable `self`, first argument not named self)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        prev, nxt = cache.get("state_ids")

        def push(value: Any) -> None:
            cache.push(f"kv_{nxt}", value)
            assert self is not None

        if prev is not None:
            k, _ = cache.pop(f"kv_{prev}")
            x = x + k[-1:]
        push((x.clone(), x * 2))
        return x


def _helper_pop_push(cache: Any, prev: Any, nxt: Any, x: torch.Tensor) -> torch.Tensor:
    if prev is not None:
        k, _ = cache.pop(f"kv_{prev}")
        x = x + k[-1:]
    cache.push(f"kv_{nxt}", (x.clone(), x * 2))
    return x


class HelperLayer(Layer):
    """Its ops are made by a plain function it calls (the owner is found by walking the stack)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prev, nxt = self.cache.get("state_ids")
        return _helper_pop_push(self.cache, prev, nxt, x)


class NotAModule:
    """A method whose first argument is `self` but not an nn.Module."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        prev, nxt = self.cache.get("state_ids")
        return _helper_pop_push(self.cache, prev, nxt, x)


class Net(nn.Module):
    def __init__(self, layers: list[Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList([m for m in layers if isinstance(m, nn.Module)])
        self.all = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.all:
            x = layer(x)
        return x


LAYER_KINDS: dict[str, Callable[[Any, int], Any]] = {
    "method": Layer, "closure": ClosureLayer, "nested": NestedPushLayer, "helper": HelperLayer,
    "not-a-module": lambda cache, i: NotAModule(cache),
}


def small_decode(cache: Any, net: Any, steps: int = 5, before_step: Callable[[int], None] | None = None,
                 top_level: bool = False) -> list[torch.Tensor]:
    """Prompt step then ``steps`` steps; ``top_level`` also pushes/pops from this plain function."""
    x = torch.linspace(-1, 1, 12).reshape(3, 4)
    outs = []
    with torch.no_grad():
        for i in range(steps + 1):
            if before_step is not None:
                before_step(i)
            cache.set("state_ids", (None, 0) if i == 0 else (i - 1, i))
            if top_level:
                if i:
                    cache.pop(f"top_{i - 1}")
                cache.push(f"top_{i}", (x[:1].clone(), x[:1].clone()))
            x = net(x)
            outs.append(x)
            cache.end_step(tokens=1)
            x = x[-1:]
    return outs


def compare_decodes(build: Callable[[InstrumentedCache], tuple[Any, Callable[[], Any]]],
                    slow_calls: SlowCalls | None = None, **options: Any) -> tuple[InstrumentedCache, Run]:
    """Run ``build(cache) -> (net, drive)`` on both paths; assert identical results."""
    results = []
    for speedups in (True, False):
        cache = new_cache(speedups, **options)
        log = cache.add_sink(EventLog())
        _, drive = build(cache)
        error = None
        try:
            outs = drive()
        except (IndexError, KeyError, PopOrderError) as exc:
            outs, error = None, exc
        results.append((cache, outs, Run([], norm_error(error), log.events, [], snapshot(cache))))
    (fast_cache, fast_outs, fast), (_, slow_outs, slow) = results
    assert_runs_match(fast, slow)
    if fast_outs is not None:
        assert len(fast_outs) == len(slow_outs)
        assert all(torch.equal(a, b) for a, b in zip(fast_outs, slow_outs))
    return fast_cache, fast


@pytest.mark.parametrize("kind", list(LAYER_KINDS))
def test_owner_attribution_matches(kind: str, slow_calls: SlowCalls) -> None:
    """Methods, closures over self, nested functions, helpers and non-module callers: same owners."""

    def build(cache: InstrumentedCache) -> tuple[Any, Callable[[], Any]]:
        net = Net([LAYER_KINDS[kind](cache, i) for i in range(3)])
        return net, lambda: small_decode(cache, net, top_level=True)

    cache, run = compare_decodes(build)
    assert run.snap["violations"] == []
    owners = [r.owner for r in run.snap["timeline"] if r.op == "push" and r.queue == "kv_1"]
    tops = {r.owner for r in run.snap["timeline"] if r.queue.startswith("top_")}
    assert tops == {None}, "ops from a plain function outside any module have no owner"
    expected = {"method": "Layer", "closure": "ClosureLayer", "nested": "NestedPushLayer",
                "helper": "HelperLayer"}
    if kind == "not-a-module":
        assert owners == ["Net#0"] * 3, "the walk passes the non-module `self` and finds the Net"
    else:
        assert owners == [f"{expected[kind]}#{i}" for i in range(3)]
    assert "self" in ClosureLayer.forward.__code__.co_cellvars
    # The fast path walks up to 6 frames for a labelled module (as Attributor._from_frames does):
    # only the first op of each module (the Python path labels it) leaves C; ops with no module
    # in reach (the top-level pushes) are attributed to nobody in C.
    assert total(cache, "push") == 3 * 6 + 6
    assert slow_calls(cache, "push") <= (1 if kind == "not-a-module" else 3)
    assert slow_calls(cache, "pop") == 0


def test_watched_model_owners(slow_calls: SlowCalls) -> None:
    """watch(): owners are qualified names (layers.0 ...), read from the hooks' per-thread stack."""

    def build(cache: InstrumentedCache) -> tuple[Any, Callable[[], Any]]:
        net = Net([Layer(cache, 0), ClosureLayer(cache, 1), HelperLayer(cache, 2)])
        handle = cachescope.watch(net, cache)

        def drive() -> Any:
            with handle:
                return small_decode(cache, net)
        return net, drive

    cache, run = compare_decodes(build)
    owners = [r.owner for r in run.snap["timeline"] if r.op == "push" and r.queue == "kv_1"]
    assert owners == ["layers.0", "layers.1", "layers.2"]
    assert run.snap["violations"] == []
    # HelperLayer's forward does not name the cache API, so watch() hooks it only once its first
    # op (the Python path) discovers it; every other op reads the hooks' stack in C.
    assert slow_calls(cache, "push") <= 1 and slow_calls(cache, "pop") == 0


def test_watch_added_and_removed_mid_decode() -> None:
    """Labels from before watch() are aliases of the qualified names; removing it falls back to labels."""

    def build(cache: InstrumentedCache) -> tuple[Any, Callable[[], Any]]:
        net = Net([Layer(cache, i) for i in range(3)])
        handles: list[Any] = []

        def before(i: int) -> None:
            if i == 2:
                handles.append(cachescope.watch(net, cache))
            if i == 4:
                handles.pop().remove()
        return net, lambda: small_decode(cache, net, steps=6, before_step=before)

    compare_decodes(build)


class Remover(Layer):
    """Removes the watch() handle from inside its own (hooked) forward: its post-hook never runs,
    so its name stays on the hooks' per-thread stack."""

    handle: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        cache = self.cache
        prev, nxt = cache.get("state_ids")
        if prev is not None:
            k, _ = cache.pop(f"kv_{prev}")
            x = x + k[-1:]
        cache.push(f"kv_{nxt}", (x.clone(), x * 2))
        return x


def test_watch_removed_inside_a_forward() -> None:
    """A stale owner-stack entry left by a watch() removed mid-forward is read the same way on both paths."""

    def build(cache: InstrumentedCache) -> tuple[Any, Callable[[], Any]]:
        net = Net([Layer(cache, 0), Remover(cache, 1), Layer(cache, 2)])
        net.layers[1].handle = cachescope.watch(net, cache)
        return net, lambda: small_decode(cache, net, steps=3)

    compare_decodes(build)


@pytest.mark.parametrize("mode", ["off", "stack", "auto"])
def test_attribution_modes(mode: str, slow_calls: SlowCalls) -> None:
    """attribution='off' (no owners, no sites: all in C), 'stack' and 'auto' give the same results."""

    def build(cache: InstrumentedCache) -> tuple[Any, Callable[[], Any]]:
        net = Net([Layer(cache, 0), HelperLayer(cache, 1), Layer(cache, 2)])
        return net, lambda: small_decode(cache, net, top_level=True)

    cache, run = compare_decodes(build, attribution=mode)
    recs = [r for r in run.snap["timeline"] if r.op in ("push", "pop")]
    if mode == "off":
        assert {(r.owner, r.site) for r in recs} == {(None, None)}
        assert slow_calls(cache, "push") == slow_calls(cache, "pop") == 0
    else:
        assert {r.owner for r in recs} == {None, "Layer#0", "HelperLayer#0", "Layer#1"}


def test_attribution_mode_switched_after_creation() -> None:
    """cache._attributor.mode changed between steps (auto -> off -> stack -> auto)."""

    def build(cache: InstrumentedCache) -> tuple[Any, Callable[[], Any]]:
        net = Net([Layer(cache, 0), ClosureLayer(cache, 1), HelperLayer(cache, 2)])
        modes = {2: "off", 4: "stack", 5: "auto"}

        def before(i: int) -> None:
            if i in modes:
                cache._attributor.mode = modes[i]
        return net, lambda: small_decode(cache, net, steps=6, before_step=before, top_level=True)

    cache, run = compare_decodes(build)
    by_step = {}
    for r in run.snap["timeline"]:
        if r.op == "push" and r.queue.startswith("kv_"):
            by_step.setdefault(r.step, []).append(r.owner)
    assert by_step[1] == ["Layer#0", "ClosureLayer#0", "HelperLayer#0"]
    assert by_step[2] == by_step[3] == [None, None, None]
    assert by_step[4] == by_step[5] == by_step[1]


def test_subclass_overriding_an_op_keeps_its_override() -> None:
    """A subclass that overrides push (or pop, or get) runs its own methods: no fast path at all."""
    require_fast_path()
    calls: list[str] = []

    class Counting(InstrumentedCache):
        def push(self, name: str, value: Any) -> None:
            calls.append(name)
            super().push(name, value)

    class GetOnly(InstrumentedCache):
        def get(self, key: str, default: Any = None) -> Any:
            calls.append(f"get:{key}")
            return super().get(key, default)

    class Plain(InstrumentedCache):
        pass

    for cls, expected in ((Counting, ["kv_0", "kv_0", "kv_1", "kv_1", "kv_2", "kv_2"]), (GetOnly, ["get:state_ids"] * 6)):
        calls.clear()
        cache = cls(metrics=False, tracing=False)
        assert cache.speedups_active is False
        assert not {"push", "pop", "get"} & set(vars(cache))
        net = Net([Layer(cache, 0), Layer(cache, 1)])
        small_decode(cache, net, steps=2)
        assert calls == expected
        assert cache.violations == []
        assert total(cache, "push") == 6 and total(cache, "pop") == 4
    plain = Plain(metrics=False, tracing=False)
    assert plain.speedups_active is True
    assert not Plain(metrics=False, tracing=False, speedups=False).speedups_active


def test_subclass_overriding_the_op_implementations() -> None:
    """Overriding _push/_pop (which the fast path does the work of) keeps the Python path; an
    overridden _emit keeps the fast path and still sees every on_op the Python path would send."""
    require_fast_path()
    runs = []
    for speedups in (True, False):
        seen: list[str] = []

        class Impl(InstrumentedCache):
            def _push(self, *args: Any) -> None:
                seen.append("_push")
                super()._push(*args)

            def _pop(self, *args: Any) -> Any:
                seen.append("_pop")
                return super()._pop(*args)

        class Emit(InstrumentedCache):
            def _emit(self, event: str, *args: Any) -> None:
                seen.append(event)
                super()._emit(event, *args)

        impl = Impl(metrics=False, tracing=False, speedups=speedups)
        emit = Emit(metrics=False, tracing=False, speedups=speedups)
        assert impl.speedups_active is False
        assert emit.speedups_active is speedups
        for cache in (impl, emit):
            cache.add_sink(EventLog())
            small_decode(cache, Net([Layer(cache, 0), Layer(cache, 1)]), steps=2)
        runs.append((list(seen), snapshot(impl), snapshot(emit)))
    assert runs[0][0].count("_push") == 6 and runs[0][0].count("_pop") == 4
    assert runs[0][0].count("on_op") == 2 * 3 + 2 * 2 + 3   # pushes, pops, state_ids sets
    assert_same(runs[0], runs[1], "subclasses")


def test_ops_on_plain_values_after_reset_create_no_family() -> None:
    """reset() forgets the families; a push or pop that the seed refuses (the key holds a plain
    value) must not bring the family back on the fast path either (regression: it did, with zero
    counters, through InstrumentedCache._fstats)."""
    snaps = []
    for speedups in (True, False):
        cache = new_cache(speedups)
        caller = Popper()
        cache.set("state_ids", (None, 0))
        cache.set("flag", 3)
        caller.op(cache, "push", "warm", (torch.ones(1), torch.ones(1)))   # labels the caller
        cache.reset()
        outcomes = [_outcome(caller.op, cache, "pop", "state_ids"),       # tuple has no pop
                    _outcome(caller.op, cache, "push", "flag", 1),        # int has no append
                    _outcome(caller.op, cache, "get", "flag")]
        assert [o[0] for o in outcomes] == ["raised", "raised", "returned"]
        snaps.append((outcomes, snapshot(cache)))
    assert_same(snaps[0], snaps[1], "after reset")
    assert set(snaps[0][1]["stats"]["families"]) == {"flag", "warm"}   # the get; the live queue


def test_clear_all_rebinds_the_dict_the_fast_path_uses(slow_calls: SlowCalls) -> None:
    """clear_all() gives the seed a new dict: later fast pushes and pops go to it, not the old one."""
    require_fast_path()

    def build(cache: InstrumentedCache) -> tuple[Any, Callable[[], Any]]:
        net = Net([Layer(cache, 0), ClosureLayer(cache, 1)])
        seen: list[Any] = []

        def before(i: int) -> None:
            if i == 3:
                old = cache._cache
                cache.clear_all()
                assert cache._cache is not old and cache._cache is cache._hot.cache_dict
                seen.append((old, {k: list(v) for k, v in old.items() if type(v) is list}))
                cache.set("state_ids", (None, 2))   # the next step's set restarts the chain
                net(torch.zeros(1, 4))

        def drive() -> Any:
            outs = small_decode(cache, net, steps=5, before_step=before)
            old, contents = seen[0]
            assert {k: list(v) for k, v in old.items() if type(v) is list} == contents, \
                "nothing reached the dict clear_all() dropped"
            assert cache.q_size("kv_5") == 2 and "kv_5" in cache._hot.cache_dict
            return outs
        return net, drive

    cache, run = compare_decodes(build)
    assert [v["kind"] for v in run.snap["violations"]] == []
    assert slow_calls(cache, "pop") == 0


def test_reset_then_decode_again() -> None:
    """reset() replaces the stats and clears the memos the fast path reads: counts restart identically."""

    def build(cache: InstrumentedCache) -> tuple[Any, Callable[[], Any]]:
        net = Net([Layer(cache, 0), Layer(cache, 1)])

        def before(i: int) -> None:
            if i == 3:
                cache.reset()
        return net, lambda: small_decode(cache, net, steps=5, before_step=before)

    _, run = compare_decodes(build)
    assert run.snap["stats"]["families"]["kv"]["push"] == 2 * 3


THREADS = 8
ROUNDS = 150


class Worker(nn.Module):
    """Pushes and pops its own queues from its forward."""

    def __init__(self, cache: Any, k: int) -> None:
        super().__init__()
        self.cache, self.k = cache, k
        self.t = torch.full((2, 3), float(k))

    def forward(self, i: int) -> None:
        cache, fam = self.cache, f"t{chr(97 + self.k)}_kv"
        items = [(self.t, self.t[0]) for _ in range(3)]
        for item in items:
            cache.push(f"{fam}_{i % 5}", item)
        for item in items:
            assert cache.pop(f"{fam}_{i % 5}") is item, "FIFO order broken within a thread's queue"
        assert cache.get(f"{fam}_{i % 5}") == []


def _threaded(speedups: bool, watch: bool, slow_calls: SlowCalls) -> dict[str, Any]:
    cache = new_cache(speedups, timeline_size=THREADS * ROUNDS * 6 + 10)
    workers = nn.ModuleList([Worker(cache, k) for k in range(THREADS)])
    handle = cachescope.watch(workers, cache, prefix="w.") if watch else None
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def run(k: int) -> None:
        try:
            barrier.wait()
            for i in range(ROUNDS):
                workers[k](i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=run, args=(k,)) for k in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(old)
    if handle is not None:
        handle.remove()
    assert not errors, errors
    n = THREADS * ROUNDS * 3
    recs = cache.timeline()
    labels = {} if watch else sorted_labels(cache)
    assert [r.seq for r in recs] == list(range(1, 2 * n + 1)), "every op recorded once, in order"
    assert cache._seq == 2 * n
    for r in recs:
        k = ord(r.queue[1]) - 97
        assert r.owner == (f"w.{k}" if watch else f"Worker#{labels[k]}"), r
        assert r.violation is None and (r.op == "push" or r.producer == r.owner)
    assert cache.violations == []
    fams = stats_view(cache)["families"]
    for k in range(THREADS):
        fs = fams[f"t{chr(97 + k)}_kv"]
        assert (fs["push"], fs["pop"], fs["get"]) == (ROUNDS * 3, ROUNDS * 3, ROUNDS)
        assert (fs["depth"], fs["logical"], fs["storage"], fs["live"], fs["empty"]) == (0, 0, 0, 0, 5)
        assert fs["peak_depth"] >= 3 and fs["_storages"] == []
    if speedups:
        assert slow_calls(cache, "push") <= (0 if watch else THREADS)
        assert slow_calls(cache, "pop") == 0
    # Labels are numbered in the order threads first ran: only compare what does not depend on it.
    return {name: {k: v for k, v in fs.items()} for name, fs in fams.items()}


def sorted_labels(cache: InstrumentedCache) -> dict[int, int]:
    """Worker index -> n of its ``Worker#n`` label (threads label their modules in any order)."""
    out = {}
    for ref, label in cache._attributor._labels.values():
        module = ref()
        if isinstance(module, Worker):
            out[module.k] = int(label.split("#")[1])
    return out


@pytest.mark.parametrize("watch", [False, True], ids=["stack-walk", "watched"])
def test_threads_exact_counts(watch: bool, slow_calls: SlowCalls) -> None:
    """Eight threads pushing and popping their own queues through module methods: exact counts,
    the right owner on every record, the same totals on both paths."""
    fast = _threaded(True, watch, slow_calls)
    slow = _threaded(False, watch, slow_calls)
    assert_same(fast, slow, "families")


# ----------------------------------------------------------------------------- 4. exceptions

class Popper(nn.Module):
    """Makes any op from its own method (a labelled module on the fast path)."""

    def op(self, cache: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(cache, name)(*args, **kwargs)


def _outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - compared between the paths
        return ("raised", norm_error(exc))
    return ("returned", result)


def _script(cache: InstrumentedCache, a: Popper, b: Popper) -> list[Any]:
    """A warm-up, then every way a pop or push can fail, from labelled modules and from here."""
    t = torch.ones(2, 2)
    kv = (t, t * 2)
    out = []
    for who in (a, b):
        out.append(_outcome(who.op, cache, "push", "warm", kv))
    out.append(_outcome(a.op, cache, "pop", "warm"))
    out.append(_outcome(b.op, cache, "pop", "warm"))
    cache.set("state_ids", (None, 0))
    out.append(_outcome(a.op, cache, "pop", "never_pushed"))          # KeyError, pop_missing
    out.append(_outcome(a.op, cache, "pop", "warm"))                  # IndexError, pop_empty
    out.append(_outcome(cache.pop, "warm"))                           # same, from no module
    out.append(_outcome(a.op, cache, "push", "q", kv))
    out.append(_outcome(b.op, cache, "pop", "q"))                     # owner_mismatch
    cache.clear("warm")
    out.append(_outcome(a.op, cache, "pop", "warm"))                  # pop_missing after clear
    cache.set("plain", 5)
    out.append(_outcome(a.op, cache, "push", "plain", kv))           # the seed's AttributeError
    cache.set("d", {0: "zero"})
    out.append(_outcome(a.op, cache, "pop", "d"))                     # dict.pop(0): returns
    out.append(_outcome(a.op, cache, "pop", "d"))                     # then the seed's KeyError
    out.append(_outcome(a.op, cache, "push", 7, kv))                  # non-str names
    out.append(_outcome(a.op, cache, "pop", 7))
    out.append(_outcome(a.op, cache, "pop", [1]))                     # unhashable: TypeError
    out.append(_outcome(a.op, cache, "push", name="kw", value=kv))   # keywords
    out.append(_outcome(a.op, cache, "pop", name="kw"))
    out.append(_outcome(a.op, cache, "push", "only_name"))           # wrong arity: TypeError
    out.append(_outcome(a.op, cache, "pop"))
    out.append(_outcome(a.op, cache, "get"))
    out.append(_outcome(a.op, cache, "get", "state_ids", default=1))
    out.append(_outcome(a.op, cache, "get", [1]))
    cache.clear_all()
    out.append(_outcome(a.op, cache, "pop", "q"))                     # pop_missing after clear_all
    return [o if o[0] == "raised" else ("returned", norm_returned(o[1])) for o in out]


def norm_returned(x: Any) -> Any:
    if isinstance(x, tuple) and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(t.tolist() for t in x)
    return x


@pytest.mark.parametrize("strict", [False, True], ids=["recording", "strict"])
def test_failed_pops_raise_the_same_errors(strict: bool) -> None:
    """Missing/empty queues raise KeyError/IndexError (PopMissingError/PopEmptyError when strict)
    with the violation recorded; every other misuse raises what the seed raises; both paths agree."""
    runs = []
    for speedups in (True, False):
        cache = new_cache(speedups, strict=strict)
        runs.append((_script(cache, Popper(), Popper()), snapshot(cache)))
    (fast, fast_snap), (slow, slow_snap) = runs
    assert_same(fast, slow, "outcomes")
    assert_same(fast_snap, slow_snap, "snapshot")
    missing, empty, empty_top = fast[4], fast[5], fast[6]
    if strict:
        assert issubclass(missing[1][0], PopMissingError) and issubclass(missing[1][0], KeyError)
        assert issubclass(empty[1][0], PopEmptyError) and issubclass(empty[1][0], IndexError)
        assert issubclass(fast[8][1][0], PopOrderError)
    else:
        assert missing[1][0] is KeyError and empty[1][0] is IndexError and empty_top[1][0] is IndexError
        assert "pop_missing" in missing[1][2][0] and "pop_empty" in empty[1][2][0]
        assert fast[8][0] == "returned"
    kinds = [v["kind"] for v in fast_snap["violations"]]
    assert kinds[:4] == ["pop_missing", "pop_empty", "pop_empty", "owner_mismatch"]
    assert "pop_missing" in kinds[4:]
    assert fast[11] == ("returned", "zero")


# ----------------------------------------------------------------------------- 5. tensor lifetime

@pytest.mark.parametrize("sink", [None, EventLog, ValueLog], ids=["no-sink", "sink", "values-sink"])
def test_no_tensor_outlives_its_pop(sink: Any, slow_calls: SlowCalls) -> None:
    """After a fast-path pop (or a mismatch, a leftover, a clear) nothing keeps the tensors alive."""
    require_fast_path()
    cache = new_cache(True)
    if sink is not None:
        cache.add_sink(sink())
    a, b = Popper(), Popper()
    a.op(cache, "push", "warm", (torch.ones(1), torch.ones(1)))   # labels a: later ops are fast
    a.op(cache, "pop", "warm")
    refs = []

    def fresh() -> tuple[torch.Tensor, torch.Tensor]:
        base = torch.randn(4, 8)
        kv = (base[:2], torch.randn(3, 8))             # a view keeps its whole storage
        refs.extend(weakref.ref(t) for t in (*kv, base))
        return kv

    before = slow_calls(cache, "push"), slow_calls(cache, "pop")
    for _ in range(3):
        a.op(cache, "push", "kv", fresh())
    got = a.op(cache, "pop", "kv")
    assert (slow_calls(cache, "push"), slow_calls(cache, "pop")) == before, "ops ran in C"
    del got
    cache.set("state_ids", (None, 0))
    got = b.op(cache, "pop", "kv")                    # owner_mismatch: the Python path
    del got
    cache.set("state_ids", (0, 1))                    # leftover: re-measures the held item
    kinds = [v.kind for v in cache.violations]
    assert kinds == ["owner_mismatch", "leftover"]
    assert "Tensor[2, 8]" in cache.violations[1].value
    a.op(cache, "pop", "kv")
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)
    if sink is ValueLog:
        assert all(s is not None for s in cache.sinks[0].summaries)
    # nothing in the records, violations, provenance or stats holds a tensor either
    held = [cache.timeline(), cache.violations, cache._queues, cache.stats.families]
    assert _tensors_reachable(held) == []


def _tensors_reachable(roots: list[Any], depth: int = 6) -> list[Any]:
    found, seen, frontier = [], set(), list(roots)
    for _ in range(depth):
        nxt = []
        for obj in frontier:
            if id(obj) in seen or isinstance(obj, (type, nn.Module)):
                continue
            seen.add(id(obj))
            if isinstance(obj, torch.Tensor):
                found.append(obj)
            else:
                nxt.extend(gc.get_referents(obj))
        frontier = nxt
    return found


def test_bound_op_outlives_the_cache() -> None:
    """A bound op keeps its cache alive, as a Python bound method does, and keeps counting."""
    require_fast_path()
    push, pop = new_cache(True).push, None
    cache = push.__self__
    pop = cache.pop
    del cache
    push("a", 1)
    assert pop("a") == 1
    assert push.__self__.stats.families["a"].push == 1 and push.__self__.speedups_active


# ----------------------------------------------------------------------------- differential machine

BASE = torch.zeros(8, 4)
VIEW = BASE[2:4]   # values are shared by both caches: leaves must be the same objects
K, V = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
META = torch.empty(2, 3, device="meta")
Z = torch.empty(0)
PARAM = nn.Parameter(torch.ones(3))
VALUES: list[Callable[[], Any]] = [
    lambda: (K, V), lambda: (K, K), lambda: (VIEW, BASE), lambda: (META, META),
    lambda: (PARAM, K), lambda: K, lambda: None, lambda: (K,), lambda: (K, V, K), lambda: [K],
    lambda: {"k": V}, lambda: [], lambda: 5, lambda: (1, 2), lambda: (K, Z),
]
NAMES: list[Any] = ["kv_0", "kv_1", "attn_kv_2", "state_ids", "", 0, ("t", 1), "x" * 250]
STATE_IDS: list[Callable[[], Any]] = [lambda: (None, 0), lambda: (0, 1), lambda: (1, 2),
                                      lambda: (0, 1), lambda: "bad", lambda: [1, 2]]


class FailingSink(EventLog):
    """Raises on every event after logging it (counted in stats.telemetry_errors)."""

    def on_op(self, cache: Any, rec: Any) -> None:
        super().on_op(cache, rec)
        raise RuntimeError("sink failed")

    def on_violation(self, cache: Any, v: Any) -> None:
        super().on_violation(cache, v)
        raise RuntimeError("sink failed")


class Caller(nn.Module):
    def forward(self, cache: Any, op: str, *args: Any) -> Any:
        return getattr(cache, op)(*args)


class CellCaller(nn.Module):
    def forward(self, cache: Any, op: str, *args: Any) -> Any:
        me = lambda: self   # noqa: E731 - `self` is a cell
        return getattr(cache, op)(*args) if me() is not None else None


class HelperCaller(nn.Module):
    def forward(self, cache: Any, op: str, *args: Any) -> Any:
        return _plain_call(cache, op, *args)


def _plain_call(cache: Any, op: str, *args: Any) -> Any:
    return getattr(cache, op)(*args)


class ObjectCaller:
    def __call__(self, cache: Any, op: str, *args: Any) -> Any:
        return getattr(cache, op)(*args)


CALLERS: list[Any] = [Caller(), Caller(), CellCaller(), HelperCaller(), _plain_call, ObjectCaller()]
WATCHED = nn.ModuleList([m for m in CALLERS if isinstance(m, nn.Module)])


def _same_value(a: Any, b: Any) -> bool:
    """Returned values: the same leaves (pushed objects are shared, containers built per cache)."""
    if a is b:
        return True
    if type(a) is not type(b) or type(a) not in (list, tuple, dict):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))


class Differential(RuleBasedStateMachine):
    """The same random ops, from modules, closures, helpers and plain functions, on a fast-path and
    a pure-Python cache; after every op everything observable must be the same."""

    def __init__(self) -> None:
        super().__init__()
        self.caches = [InstrumentedCache(metrics=False, tracing=False, speedups=s, timeline_size=40,
                                         max_violations=12) for s in (True, False)]
        assert [c.speedups_active for c in self.caches] == [True, False]
        self.sinks: list[list[Any]] = [[], []]
        self.watches: list[Any] = []

    def _both(self, who: int, op: str, *args: Any) -> None:
        caller = CALLERS[who]
        results = []
        for cache in self.caches:
            built = [a() if callable(a) and not isinstance(a, (nn.Module, torch.Tensor)) else a
                     for a in args]
            try:
                results.append(("returned", caller(cache, op, *built)))
            except Exception as exc:  # noqa: BLE001 - compared between the paths
                results.append(("raised", norm_error(exc)))
        (kf, rf), (ks, rs) = results
        assert kf == ks, f"{op}{args}: fast path {kf} {rf!r}, python path {ks} {rs!r}"
        if kf == "raised":
            assert_same(rf, rs, f"{op} error")
        else:
            assert _same_value(rf, rs), f"{op}: different values returned"

    @rule(who=st.integers(0, len(CALLERS) - 1), name=st.sampled_from(NAMES),
          value=st.sampled_from(VALUES))
    def push(self, who: int, name: Any, value: Any) -> None:
        self._both(who, "push", name, value)

    @rule(who=st.integers(0, len(CALLERS) - 1), name=st.sampled_from(NAMES))
    def pop(self, who: int, name: Any) -> None:
        self._both(who, "pop", name)

    @rule(who=st.integers(0, len(CALLERS) - 1), name=st.sampled_from(NAMES))
    def get(self, who: int, name: Any) -> None:
        self._both(who, "get", name)

    @rule(name=st.sampled_from(NAMES))
    def q_size(self, name: Any) -> None:
        self._both(4, "q_size", name)

    @rule(who=st.integers(0, len(CALLERS) - 1), name=st.sampled_from(NAMES),
          value=st.sampled_from(VALUES))
    def set(self, who: int, name: Any, value: Any) -> None:
        self._both(who, "set", name, value)

    @rule(who=st.integers(0, len(CALLERS) - 1), value=st.sampled_from(STATE_IDS))
    def state_ids(self, who: int, value: Any) -> None:
        self._both(who, "set", "state_ids", value)

    @rule(tokens=st.integers(0, 2))
    def end_step(self, tokens: int) -> None:
        self._both(4, "end_step", tokens)

    @rule()
    def mark_step(self) -> None:
        self._both(4, "mark_step")

    @rule(who=st.integers(0, len(CALLERS) - 1), name=st.sampled_from(NAMES))
    def clear(self, who: int, name: Any) -> None:
        self._both(who, "clear", name)

    @rule()
    def clear_all(self) -> None:
        self._both(3, "clear_all")

    @rule()
    def reset(self) -> None:
        for cache in self.caches:
            cache.reset()

    @rule(mode=st.sampled_from(["off", "stack", "auto"]))
    def attribution(self, mode: str) -> None:
        for cache in self.caches:
            cache._attributor.mode = mode

    @rule(strict=st.booleans())
    def strictness(self, strict: bool) -> None:
        for cache in self.caches:
            cache.strict = strict

    @rule(kind=st.sampled_from(["events", "values", "failing"]))
    def toggle_sink(self, kind: str) -> None:
        cls = {"events": EventLog, "values": ValueLog, "failing": FailingSink}[kind]
        for cache, sinks in zip(self.caches, self.sinks):
            mine = [s for s in sinks if type(s) is cls]
            if mine:
                cache.remove_sink(mine[0])
                sinks.remove(mine[0])
            else:
                sinks.append(cache.add_sink(cls()))

    @rule()
    def toggle_watch(self) -> None:
        if self.watches:
            for handle in self.watches:
                handle.remove()
            self.watches.clear()
        else:
            self.watches = [cachescope.watch(WATCHED, cache, prefix="c.") for cache in self.caches]

    @invariant()
    def same_everything(self) -> None:
        fast, slow = self.caches
        assert_same(snapshot(fast), snapshot(slow), "snapshot")
        for a, b in zip(*self.sinks):
            assert_same(a.events, b.events, f"{type(a).__name__} events")

    def teardown(self) -> None:
        for handle in self.watches:
            handle.remove()


def test_random_op_sequences_match_between_paths(caplog: pytest.LogCaptureFixture) -> None:
    """Random op sequences (odd names and values, every caller kind, mode switches, sinks, watch,
    strict, reset) leave the two paths indistinguishable."""
    require_fast_path()
    caplog.set_level(logging.CRITICAL, logger="cachescope")   # FailingSink's warnings
    Differential.TestCase.settings = settings(
        max_examples=300, stateful_step_count=40, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    Differential.TestCase().runTest()


def test_cleanup_clears_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode's cleanup (clear of drained queues and plain values) runs in C once the families
    exist, and records what the Python path records; clears it cannot take (a queue that still
    holds items, a missing key) go to Python, which raises the seed's KeyError."""
    require_fast_path()
    slow: Counter[bool] = Counter()
    orig = InstrumentedCache._clear

    def _clear(self: Any, *args: Any, **kwargs: Any) -> Any:
        slow[bool(self.speedups_active)] += 1
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(InstrumentedCache, "_clear", _clear)
    snaps = []
    for fast in (True, False):
        cache = new_cache(fast)
        run_decode(cache, new_tokens=3)
        slow.clear()
        run_decode(cache, new_tokens=5)   # cleanup: 5 queues (the last holds items), 2 values
        assert slow[fast] == (1 if fast else 7)   # C: only the queue that still holds items
        cache.set("plain", 1)
        cache.clear("plain")
        with pytest.raises(KeyError):
            cache.clear("plain")
        assert cache._cleared["plain"][0] == max(r.seq for r in cache.timeline() if r.op == "clear")
        snaps.append(snapshot(cache))
    assert_same(snaps[0], snaps[1], "cleanup")


@settings(max_examples=300, deadline=None)
@given(stem=st.text(alphabet="ab_.:/-Z9 é", min_size=0, max_size=8),
       ids=st.lists(st.tuples(st.sampled_from(["", "_", ".", ":", "/", "-", "__"]),
                              st.integers(0, 10**6)), min_size=0, max_size=3))
def test_new_queue_names_get_the_family_python_gives(stem: str, ids: list) -> None:
    """The C path's family of a new queue name (the default normaliser, an existing family) is
    the one ``default_family`` gives, for any mix of letters, separators and ids."""
    require_fast_path()
    from cachescope._families import FamilyMap
    suffix = "".join(f"{sep}{n}" for sep, n in ids)
    first, second = f"{stem}{suffix}", f"{stem}{suffix}7"
    fast, slow = new_cache(True), new_cache(False)
    # every prefix that is a family of its own exists too, so a wrong cut would find a family
    decoys = [second[:i] for i in range(1, len(second)) if FamilyMap()(second[:i]) == second[:i]]
    for cache in (fast, slow):
        for name in decoys + [first, second]:   # the first creates the family, the second finds it
            cache.push(name, 1)
    for name in (first, second):
        want = FamilyMap()(name)
        assert fast._fs_memo[name].family == slow._fs_memo[name].family == want
        assert fast._fs_memo[name] is fast.stats.families[want]
    assert snapshot(fast)["stats"] == snapshot(slow)["stats"]


def test_the_cache_lock_behaves_like_threading_rlock() -> None:
    """The fast path's lock: reentrant for its owner, refused to others while held (non-blocking
    and timed tries), handed over on release, and only its owner may release it."""
    require_fast_path()
    lock = new_cache(True)._lock
    assert type(lock).__name__ == "RLock" and type(lock).__module__ == "cachescope._speedups"
    assert lock.acquire() and lock.acquire(blocking=False) and lock._is_owned()
    seen: dict[str, Any] = {}

    def other() -> None:
        seen["try"] = lock.acquire(blocking=False)
        seen["timed"] = lock.acquire(timeout=0.05)
        try:
            lock.release()
        except RuntimeError as exc:
            seen["release"] = str(exc)
        seen["blocking"] = lock.acquire()   # returns once the owner released twice
        seen["owned"] = lock._is_owned()
        lock.release()

    t = threading.Thread(target=other)
    t.start()
    t.join(0.5)
    assert t.is_alive() and seen == {"try": False, "timed": False,
                                     "release": "cannot release un-acquired lock"}
    lock.release()
    t.join(0.2)
    assert t.is_alive() and "blocking" not in seen   # still held once: the other thread waits
    lock.release()
    t.join(5)
    assert not t.is_alive() and seen["blocking"] is True and seen["owned"] is True
    with lock:   # free again, usable as a context manager
        assert lock._is_owned()
    assert not lock._is_owned()


# ----------------------------------------------------------------------------- reused step objects

def _steps_run(speedups: bool, ids: list[tuple[Any, Any]], keep: bool) -> tuple[list, list]:
    from _kvloop import layers, run
    cache = InstrumentedCache(metrics=False, tracing=False, speedups=speedups)
    mods = layers(3, cache)
    x = torch.linspace(-1, 1, 12).reshape(3, 4)
    snaps, kept = [], []
    with torch.no_grad():
        for state in ids:
            cache.set("state_ids", state)
            run(mods, x)
            cache.end_step(tokens=1)
            snaps.append(snapshot(cache))
            if keep:
                kept.append(cache.current_step)
    frozen = [(s.index, s.prev, s.next, s.tokens, s.ops, sorted(s.pushed), sorted(s.popped))
              for s in kept]
    return snaps, frozen


STEP_IDS = [(None, 4), (None, 3), (3, 5), (4, 5), (5, 6), (6, 7)]


@pytest.mark.parametrize("keep", [False, True], ids=["dropped", "kept"])
def test_steps_reusing_queue_names_match_between_paths(keep: bool) -> None:
    """The C boundary reuses the closing step's StepInfo when nothing else holds it, and skips
    re-adding a step's last pushed name. Steps (3, 5) then (4, 5) push the same queue name:
    the reused step must still list it, and a StepInfo the caller kept must not change."""
    require_fast_path()
    fast, fast_kept = _steps_run(True, STEP_IDS, keep)
    slow, slow_kept = _steps_run(False, STEP_IDS, keep)
    for i, (f, s) in enumerate(zip(fast, slow)):
        assert_same(f, s, f"after step {STEP_IDS[i]}")
    assert fast[3]["current_step"][-2] == ["attn_kv_5"]   # (4, 5) pushed attn_kv_5 again
    assert fast_kept == slow_kept
    if keep:
        assert [k[0] for k in fast_kept] == list(range(len(STEP_IDS)))
        assert fast_kept[2][5] == ["attn_kv_5"] and fast_kept[3][5] == ["attn_kv_5"]


# ----------------------------------------------------------------------------- tracing's op events

def _span_events(speedups: bool, spec: Any = None) -> list[Any]:
    """(span name, step, [(event name, attributes)]) of a traced decode, timestamps left out."""
    from _loop import otel_memory
    provider, exporter = otel_memory()
    cache = InstrumentedCache(name="events", metrics=False, tracer_provider=provider,
                              speedups=speedups)
    assert cache.speedups_active is speedups
    model = tiny_model()
    with contextlib.ExitStack() as stack:
        stack.enter_context(cachescope.watch(model, cache))
        if spec is not None:
            stack.enter_context(inject(spec, model.layers, cache, model=model))
        try:
            run_decode(cache, 5)
        except (IndexError, KeyError):   # a skipped layer leaves a later one an empty queue
            pass
    out = []
    for s in exporter.get_finished_spans():
        events = [(e.name, dict(e.attributes)) for e in s.events
                  if e.name != "cachescope.violation"]   # reports name call sites: compared elsewhere
        out.append((s.name, s.attributes.get("cachescope.step"), events))
    return sorted(out, key=repr)


@pytest.mark.parametrize("spec", [None, "swap@2:layer=0,other=1", "skip@2:layer=1"])
def test_op_events_built_in_c_equal_the_python_ones(spec: Any) -> None:
    """Op events the C ring builds (``Timeline.events_since``) have the names and attributes the
    Python path gives the same decode, with and without a fault (producer, violation kinds)."""
    require_fast_path()
    fast, slow = _span_events(True, spec), _span_events(False, spec)
    assert fast == slow
    assert any(events for _, _, events in fast)


def test_events_since_hands_odd_entries_to_python() -> None:
    """An entry with a name longer than the attribute limit comes back as its OpRecord (Python cuts
    it); the boundary set of the state key has no item; first_seq reports the oldest op kept."""
    require_fast_path()
    from cachescope import _attributes as A
    from cachescope._records import OpRecord
    from cachescope.tracing import _EVENT_KEYS, _MARK_STEP

    class Layer(nn.Module):
        def forward(self, cache: InstrumentedCache, name: str) -> None:
            cache.push(name, (torch.zeros(2), torch.zeros(2)))
            cache.pop(name)

    cache = InstrumentedCache(name="odd", metrics=False, tracing=False, timeline_size=8)
    layer = Layer()
    long_name = "q" * (A.MAX_STR_LEN + 1)
    cache.set("state_ids", (None, 0))
    for name in ("attn_kv_0", long_name):   # first ops of a module / queue: the Python path
        layer(cache, name)
    last = cache._seq
    cache.set("state_ids", (0, 1))          # a step boundary: no event
    for name in ("attn_kv_0", long_name, "attn_kv_0"):
        layer(cache, name)
    first, items = cache._timeline.events_since(last, cache._seq, _EVENT_KEYS, "state_ids",
                                                _MARK_STEP, A.MAX_STR_LEN)
    assert first == last + 1
    if isinstance(items[0], OpRecord):   # a boundary the Python path made: _op_event skips it
        assert (items[0].op, items[0].queue, items[0].violation) == ("set", "state_ids", None)
        items = items[1:]
    kinds = [type(i).__name__ if type(i) is not tuple else i[0] for i in items]
    assert kinds == ["push", "pop", "OpRecord", "OpRecord", "push", "pop"]
    assert all(isinstance(i, OpRecord) and i.queue == long_name for i in items[2:4])
    name, attrs, ts = items[0]
    rec = next(r for r in cache.timeline() if r.seq == attrs[A.SEQ])
    assert ts == int(rec.time * 1_000_000_000)
    assert attrs == {A.QUEUE: "attn_kv_0", A.FAMILY: "attn_kv", A.SEQ: rec.seq,
                     A.OWNER: rec.owner, A.DEPTH: 1, A.BYTES_LOGICAL: 16}
    # only ops up to `upto`; the ring forgot the oldest: first_seq says where it starts now
    for _ in range(4):
        layer(cache, "attn_kv_0")
    first, items = cache._timeline.events_since(0, cache._seq - 2, _EVENT_KEYS, "state_ids",
                                                _MARK_STEP, A.MAX_STR_LEN)
    assert first == cache._seq - 7 and len(items) == 6
