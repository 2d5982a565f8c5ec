"""Behaviour tests that need no torch: they run on every supported CPython (3.10-3.13), also
where torch is not installed (scripts/test_pythons.sh runs this file on 3.10, 3.12 and 3.13).

Nothing here imports torch, directly or through cachescope: owners are named explicitly with
``cache.owner(...)`` and values are plain Python objects. Optional pieces (hypothesis, the
OpenTelemetry SDK) are skipped when they are not installed.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import io
import os
import random
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry

import cachescope
from cachescope._cache import Cache
from cachescope._families import default_family

# These tests provoke violations on purpose: never fail them under `pytest --cachescope-strict`.
pytestmark = pytest.mark.cachescope(strict=False)

#: Whether something (another test module, a plugin) imported torch before this module: then the
#: in-process "no torch" check below has nothing to say.
_TORCH_BEFORE = "torch" in sys.modules
_PACKAGE_ROOT = str(Path(cachescope.__file__).resolve().parent.parent)

try:
    import hypothesis  # noqa: F401 - optional
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
except ImportError:  # pragma: no cover - hypothesis is a test dependency, but optional here
    hypothesis = None

try:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
except ImportError:  # pragma: no cover - opentelemetry-sdk is optional for the library
    TracerProvider = None


# ------------------------------------------------------------------------------------ helpers
def new_cache(**options: Any) -> cachescope.InstrumentedCache:
    """An ``InstrumentedCache`` exporting to its own registry (so tests never share metrics)."""
    options.setdefault("registry", CollectorRegistry())
    return cachescope.InstrumentedCache(**options)


def run_step(cache: Any, prev: Any, nxt: Any, order: list[str]) -> None:
    """One NeoX-style decode step: each owner pops ``attn_kv_{prev}`` and pushes ``attn_kv_{nxt}``."""
    for owner in order:
        with cache.owner(owner):
            if prev is not None:
                cache.pop(f"attn_kv_{prev}")
            cache.push(f"attn_kv_{nxt}", (owner, nxt))


def decode(cache: Any, orders: list[list[str]]) -> None:
    """Steps 0..n-1, step i with ``state_ids = (i - 1, i)`` and the layers in ``orders[i]``."""
    for i, order in enumerate(orders):
        prev = None if i == 0 else i - 1
        cache.set("state_ids", (prev, i))
        run_step(cache, prev, i, order)
        cache.end_step(tokens=1)


def kinds(cache: Any) -> list[str]:
    return [v.kind for v in cache.violations]


class _NoTorch(importlib.abc.MetaPathFinder):
    """A meta path finder that refuses every import of torch, noting the stack that asked."""

    def __init__(self) -> None:
        self.stacks: list[str] = []

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == "torch" or fullname.startswith("torch."):
            self.stacks.append("".join(traceback.format_stack(limit=12)))
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by test_portable)",
                                      name=fullname)
        return None


@contextlib.contextmanager
def torch_absent() -> Iterator[_NoTorch]:
    """Run the block as if torch were not installed (when it is, and was not imported yet)."""
    finder = _NoTorch()
    if "torch" in sys.modules:
        yield finder
        return
    sys.meta_path.insert(0, finder)
    try:
        yield finder
    finally:
        sys.meta_path.remove(finder)


# ------------------------------------------------------------------------ drop-in equivalence
_NAMES: list[Any] = ["a", "b", "attn_kv_0", "attn_kv_1", "state_ids", ("t", 1), 7]
_UNHASHABLE = ["x"]
_OWNERS = [None, "layer0", "layer1", "layer2"]
_DEFAULT = object()


def _value(kind: int) -> Callable[[], Any]:
    """A factory of one value (called once per cache, so mutable values are never shared)."""
    return [
        lambda: None, lambda: 0, lambda: 42, lambda: "text", lambda: (1, 2), lambda: (None, 0),
        lambda: (0, 1, 2), lambda: [], lambda: [1, "two"], lambda: {}, lambda: {0: "zero"},
        lambda: ("k", "v"), lambda: b"bytes", lambda: 1.5,
    ][kind % 14]


def apply_op(seed: Cache, inst: cachescope.InstrumentedCache, op: tuple[Any, ...]) -> None:
    """Apply one op to both caches; the return values and the exception types must be identical."""
    kind, name, value_kind, owner = op
    if kind == "end_step":          # instrumented-only API: must not change what the cache holds
        inst.end_step(tokens=1)
        return
    if kind == "mark_step":
        inst.mark_step()
        return
    make = _value(value_kind)
    calls: dict[str, Callable[[Any], Any]] = {
        "push": lambda c: c.push(name, make()),
        "pop": lambda c: c.pop(name),
        "get": lambda c: c.get(name),
        "get_default": lambda c: c.get(name, _DEFAULT),
        "set": lambda c: c.set(name, make()),
        "clear": lambda c: c.clear(name),
        "clear_all": lambda c: c.clear_all(),
        "q_size": lambda c: c.q_size(name),
    }
    call = calls[kind]
    results = []
    for cache in (seed, inst):
        ctx = inst.owner(owner) if cache is inst and owner is not None else contextlib.nullcontext()
        try:
            with ctx:
                results.append(("ok", call(cache)))
        except Exception as exc:  # noqa: BLE001 - comparing whatever the seed raises
            results.append(("raised", exc))
    (s_how, s_out), (i_how, i_out) = results
    assert s_how == i_how, f"{op}: seed {s_how} {s_out!r}, instrumented {i_how} {i_out!r}"
    if s_how == "raised":
        assert type(i_out) is type(s_out), f"{op}: seed raised {s_out!r}, instrumented {i_out!r}"
        assert i_out.args == s_out.args, f"{op}: seed raised {s_out!r}, instrumented {i_out!r}"
    else:
        assert type(i_out) is type(s_out) and i_out == s_out, f"{op}: {s_out!r} != {i_out!r}"


def assert_same_contents(seed: Cache, inst: cachescope.InstrumentedCache) -> None:
    """Every key holds the same thing in both caches (read through the public API)."""
    for name in _NAMES:
        assert inst.q_size(name) == seed.q_size(name), name
        assert inst.get(name, _DEFAULT) == seed.get(name, _DEFAULT), name
    assert inst.queues() == {n: len(v) for n, v in seed._cache.items() if type(v) is list and v}


_OPS = ["push", "push", "push", "pop", "pop", "pop", "get", "get_default", "set", "clear",
        "clear_all", "q_size", "end_step", "mark_step"]


def random_op(rng: random.Random) -> tuple[Any, ...]:
    kind = rng.choice(_OPS)
    if kind == "clear_all" and rng.random() < 0.7:
        kind = "push"   # keep queues around long enough to be popped
    name = _UNHASHABLE if rng.random() < 0.02 else rng.choice(_NAMES)
    return kind, name, rng.randrange(14), rng.choice(_OWNERS)


@pytest.mark.parametrize("with_owners", [False, True])
def test_random_sequences_match_the_seed(with_owners: bool) -> None:
    """Random op sequences give the seed's return values, exceptions and contents, on caches with
    default options and with per-op owners."""
    rng = random.Random(20240611 + with_owners)
    for _ in range(40):
        seed = Cache()
        inst = new_cache(name="random") if with_owners else cachescope.InstrumentedCache(
            metrics=False)
        for _ in range(80):
            op = random_op(rng)
            if not with_owners:
                op = op[:3] + (None,)
            apply_op(seed, inst, op)
        assert_same_contents(seed, inst)
        # the checker saw every op and made nothing up
        assert inst.seq >= 1 and all(v.kind in cachescope.KINDS for v in inst.violations)


if hypothesis is not None:
    _op_strategy = st.tuples(
        st.sampled_from(_OPS),
        st.one_of(st.sampled_from(_NAMES), st.just(_UNHASHABLE)),
        st.integers(0, 13),
        st.sampled_from(_OWNERS),
    )

    class SeedEquivalence(RuleBasedStateMachine):
        """The seed ``Cache`` and an ``InstrumentedCache`` driven by the same ops."""

        def __init__(self) -> None:
            super().__init__()
            self.seed = Cache()
            self.inst = new_cache(name="hypothesis")

        @rule(op=_op_strategy)
        def op(self, op: tuple[Any, ...]) -> None:
            apply_op(self.seed, self.inst, op)

        @rule(name=st.sampled_from(["attn_kv_0", "attn_kv_1"]),
              owners=st.lists(st.sampled_from(_OWNERS[1:]), min_size=1, max_size=4))
        def layers(self, name: str, owners: list[str]) -> None:
            for owner in owners:   # a burst of pushes by several owners, then their pops
                apply_op(self.seed, self.inst, ("push", name, 1, owner))
            for owner in reversed(owners):
                apply_op(self.seed, self.inst, ("pop", name, 0, owner))

        @invariant()
        def same_contents(self) -> None:
            assert_same_contents(self.seed, self.inst)

    SeedEquivalence.TestCase.settings = settings(
        max_examples=60, stateful_step_count=30, deadline=None, database=None,
        suppress_health_check=list(HealthCheck))
    TestSeedEquivalence = SeedEquivalence.TestCase
    TestSeedEquivalence.__doc__ = ("A hypothesis state machine finds no op sequence on which the "
                                   "instrumented cache differs from the seed.")


# ------------------------------------------------------------------- pop order, explicit owners
def test_clean_decode_has_no_violations() -> None:
    """Layers that pop in the order they pushed produce no violation and a drained pipeline."""
    cache = new_cache()
    decode(cache, [["layer0", "layer1"]] * 4)
    assert cache.violations == []
    assert cache.step == 3
    assert cache.queues() == {"attn_kv_3": 2}
    assert [r.owner for r in cache.pending("attn_kv_3")] == ["layer0", "layer1"]
    assert cache.family("attn_kv_3") == "attn_kv"
    assert cache.stats.steps == 4 and cache.stats.tokens == 4


def test_swapped_layers_are_an_owner_mismatch() -> None:
    """Two owners popping in the opposite order of their pushes give two owner_mismatch violations."""
    cache = new_cache()
    decode(cache, [["layer0", "layer1"], ["layer1", "layer0"]])
    assert kinds(cache) == ["owner_mismatch", "owner_mismatch"]
    first = cache.violations[0]
    assert (first.consumer, first.producer, first.step) == ("layer1", "layer0", 1)
    assert (first.queue, first.family, first.position) == ("attn_kv_0", "attn_kv", 1)
    assert "layer1 popped the item pushed by layer0" in first.summary()


def test_layer_run_twice_is_pop_empty_and_still_an_index_error() -> None:
    """A second pop of a drained queue records pop_empty and raises the seed's IndexError."""
    cache = new_cache()
    decode(cache, [["layer0", "layer1"]])
    cache.set("state_ids", (0, 1))
    run_step(cache, 0, 1, ["layer0", "layer1"])
    with pytest.raises(IndexError) as info:
        run_step(cache, 0, 1, ["layer1"])
    assert type(info.value) is IndexError
    assert kinds(cache) == ["pop_empty"]
    v = cache.violations[0]
    assert (v.consumer, v.queue, v.step, v.depth) == ("layer1", "attn_kv_0", 1, 0)


def test_pop_of_an_unknown_queue_is_pop_missing_and_still_a_key_error() -> None:
    """A pop of a queue never pushed records pop_missing and raises the seed's KeyError."""
    cache = new_cache()
    decode(cache, [["layer0"]])
    with pytest.raises(KeyError) as info, cache.owner("layer0"):
        cache.pop("attn_kv_7")
    assert type(info.value) is KeyError and info.value.args == ("attn_kv_7",)
    assert kinds(cache) == ["pop_missing"]
    assert cache.violations[0].consumer == "layer0"


def test_cleared_queue_is_pop_missing_naming_who_cleared_it() -> None:
    """A pop after another owner cleared the queue is pop_missing whose hint names the clear."""
    cache = new_cache()
    decode(cache, [["layer0", "layer1"]])
    cache.set("state_ids", (0, 1))
    with cache.owner("janitor"):
        cache.clear("attn_kv_0")
    with pytest.raises(KeyError), cache.owner("layer0"):
        cache.pop("attn_kv_0")
    (v,) = cache.violations
    assert v.kind == "pop_missing" and "janitor" in v.hint


def test_skipped_layer_leaves_a_leftover_at_the_step_boundary() -> None:
    """An owner skipped in a step leaves its item queued: leftover at the next boundary."""
    cache = new_cache()
    decode(cache, [["layer0", "layer1"], ["layer0"]])
    assert kinds(cache) == []
    cache.set("state_ids", (1, 2))
    assert kinds(cache) == ["leftover"]
    v = cache.violations[0]
    assert (v.queue, v.producer, v.step, v.depth) == ("attn_kv_0", "layer1", 1, 1)


def test_retried_step_is_step_restarted() -> None:
    """Setting a half-run step's state_ids again inside a generation is step_restarted."""
    cache = new_cache()
    with cache.generation(prompt_tokens=2):
        decode(cache, [["layer0", "layer1"]])
        cache.set("state_ids", (0, 1))
        run_step(cache, 0, 1, ["layer0"])          # fails here, half-way
        cache.set("state_ids", (0, 1))             # retried without restoring the queues
    assert kinds(cache)[0] == "step_restarted"
    assert cache.violations[0].step == 2


def test_repeated_state_ids_after_a_finished_step_is_state_not_advanced() -> None:
    """Setting a completed step's state_ids again is state_not_advanced."""
    cache = new_cache()
    decode(cache, [["layer0", "layer1"], ["layer0", "layer1"]])
    cache.set("state_ids", (0, 1))
    assert kinds(cache) == ["state_not_advanced"]


@pytest.mark.parametrize("value", [5, (1, 2, 3), "0,1", None])
def test_state_ids_that_are_not_a_pair_are_bad_state_ids(value: Any) -> None:
    """A state_ids value other than a (prev, next) pair is bad_state_ids (and still stored)."""
    cache = new_cache()
    cache.set("state_ids", value)
    assert kinds(cache) == ["bad_state_ids"]
    assert cache.get("state_ids") == value


def test_mark_step_timeline_and_ops_since() -> None:
    """mark_step opens steps for loops without state_ids; the timeline and ops_since read the ops."""
    cache = new_cache(timeline_size=8)
    cache.mark_step(None, 0)
    with cache.owner("layer0"):
        cache.push("kv", 1)
    start = cache.seq
    cache.mark_step(0, 1)
    with cache.owner("layer0"):
        assert cache.pop("kv") == 1
        cache.push("kv", 2)
    assert cache.step == 1 and cache.violations == []
    first, recs = cache.ops_since(start)
    assert first == start + 1
    assert [(r.op, r.owner) for r in recs if r.op != "set"] == [("pop", "layer0"), ("push", "layer0")]
    assert [r.seq for r in cache.timeline()] == list(range(1, cache.seq + 1))


# ---------------------------------------------------------------------------------- strict mode
def test_strict_mode_raises_pop_order_errors_that_keep_the_seed_types() -> None:
    """strict=True raises PopOrderError; for pop_empty/pop_missing it is also an IndexError/KeyError."""
    cache = new_cache(strict=True)
    decode(cache, [["layer0", "layer1"]])
    cache.set("state_ids", (0, 1))
    with pytest.raises(cachescope.PopOrderError) as mismatch:
        run_step(cache, 0, 1, ["layer1"])
    assert mismatch.value.violation.kind == "owner_mismatch"
    assert "layer0" in str(mismatch.value) and "layer1" in str(mismatch.value)

    with pytest.raises(KeyError) as missing, cache.owner("layer0"):
        cache.pop("nowhere")
    assert isinstance(missing.value, cachescope.PopOrderError)
    assert missing.value.violation.kind == "pop_missing"

    cache.push("once", 1)
    cache.pop("once")
    with pytest.raises(IndexError) as empty:
        cache.pop("once")
    assert isinstance(empty.value, cachescope.PopOrderError)
    assert empty.value.violation.kind == "pop_empty"

    fresh = new_cache(strict=True)
    with pytest.raises(cachescope.PopOrderError) as bad:
        fresh.set("state_ids", "oops")
    assert bad.value.violation.kind == "bad_state_ids"


def test_non_strict_errors_carry_a_note_on_pythons_that_have_notes() -> None:
    """A failed pop outside strict mode re-raises the seed's exception, with a note where supported."""
    cache = new_cache()
    with pytest.raises(KeyError) as info:
        cache.pop("nothing")
    notes = getattr(info.value, "__notes__", None)
    if sys.version_info >= (3, 11):
        assert notes and "pop_missing" in notes[0]
    else:
        assert notes is None


# ---------------------------------------------------------------------------------------- reports
def test_report_names_both_owners() -> None:
    """The violation report and the run report name the consumer and the producer."""
    cache = new_cache(name="report-test")
    decode(cache, [["layer0", "layer1"], ["layer1", "layer0"]])
    text = cache.violations[0].report()
    assert "owner_mismatch" in text and "attn_kv_0" in text
    assert "layer0" in text and "layer1" in text
    assert "Hint:" in text
    run = cache.report()
    assert "report-test" in run and "owner_mismatch=2" in run
    assert "layer0" in run and "layer1" in run


# ---------------------------------------------------------------------------------------- metrics
def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.mark.parametrize("how", ["option", "export"])
def test_metrics_read_back_from_a_fresh_registry(how: str) -> None:
    """Counters and gauges documented in docs/metrics.md read back from a fresh CollectorRegistry."""
    registry = CollectorRegistry()
    if how == "option":
        cache = cachescope.InstrumentedCache(name="m", registry=registry)
    else:
        cache = cachescope.InstrumentedCache(name="m", metrics=False)
        assert _sample(registry, "cachescope_decode_steps_total", cache="m") is None
        cachescope.metrics.export(cache, registry=registry)
    decode(cache, [["layer0", "layer1"], ["layer1", "layer0"], ["layer0", "layer1"]])
    m = {"cache": "m"}
    assert _sample(registry, "cachescope_ops_total", op="push", family="attn_kv", **m) == 6
    assert _sample(registry, "cachescope_ops_total", op="pop", family="attn_kv", **m) == 4
    assert _sample(registry, "cachescope_ops_total", op="set", family="state_ids", **m) == 3
    assert _sample(registry, "cachescope_queue_depth", family="attn_kv", **m) == 2
    assert _sample(registry, "cachescope_queue_depth_peak", family="attn_kv", **m) == 2
    assert _sample(registry, "cachescope_queues", family="attn_kv", state="live", **m) == 1
    assert _sample(registry, "cachescope_queues", family="attn_kv", state="empty", **m) == 2
    assert _sample(registry, "cachescope_tensor_bytes", family="attn_kv", kind="logical", **m) == 0
    assert _sample(registry, "cachescope_violations_total", family="attn_kv",
                   kind="owner_mismatch", **m) == 4
    assert _sample(registry, "cachescope_violations_total", family="attn_kv",
                   kind="leftover", **m) == 0
    assert _sample(registry, "cachescope_decode_steps_total", **m) == 3
    assert _sample(registry, "cachescope_decode_tokens_total", **m) == 3
    assert _sample(registry, "cachescope_decode_step_duration_seconds_count", **m) == 3
    assert _sample(registry, "cachescope_telemetry_errors_total", sink="MetricsSink", **m) == 0


# ---------------------------------------------------------------------------------------- tracing
@pytest.mark.skipif(TracerProvider is None, reason="opentelemetry-sdk is not installed")
@pytest.mark.parametrize("how", ["option", "trace"])
def test_generation_span_with_decode_step_children_and_op_events(how: str) -> None:
    """A generation is a `generate` span whose `decode_step` children carry the ops as events."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    if how == "option":
        cache = new_cache(name="traced", tracer_provider=provider)
    else:
        cache = new_cache(name="traced", tracing=False)
        cachescope.tracing.trace(cache, tracer_provider=provider)
    with cache.generation(prompt_tokens=3, max_new_tokens=2):
        decode(cache, [["layer0", "layer1"], ["layer1", "layer0"], ["layer0", "layer1"]])
    spans = exporter.get_finished_spans()
    (gen,) = [s for s in spans if s.name == "generate"]
    steps = sorted((s for s in spans if s.name == "decode_step"),
                   key=lambda s: s.attributes["cachescope.step"])
    assert [s.attributes["cachescope.step"] for s in steps] == [0, 1, 2]
    for s in steps:
        assert s.parent is not None and s.parent.span_id == gen.context.span_id
        assert s.context.trace_id == gen.context.trace_id
    first_events = [(e.name, e.attributes.get("cachescope.owner")) for e in steps[0].events]
    assert first_events == [("push", "layer0"), ("push", "layer1")]
    second = [e for e in steps[1].events if e.name in ("push", "pop")]
    assert [(e.name, e.attributes["cachescope.owner"]) for e in second] == [
        ("pop", "layer1"), ("push", "layer1"), ("pop", "layer0"), ("push", "layer0")]
    assert any(e.name == "cachescope.violation" for e in steps[1].events)
    assert steps[1].status.status_code.name == "ERROR"
    assert steps[0].status.status_code.name != "ERROR"
    assert gen.attributes["cachescope.steps"] == 3
    assert gen.attributes["cachescope.prompt_tokens"] == 3


# ------------------------------------------------------------------------------- record/replay
def test_record_then_analyze_gives_the_same_violations(tmp_path: Path) -> None:
    """A recorded run replayed by analyze_file reports the same violations as the live run."""
    from cachescope.analyze import analyze_file
    from cachescope.record import record

    cache = new_cache(name="recorded")
    path = tmp_path / "run.jsonl.gz"
    with torch_absent(), record(cache, path, model="none"):
        with cache.generation(prompt_tokens=2):
            decode(cache, [["layer0", "layer1"], ["layer1", "layer0"], ["layer1"]])
            with pytest.raises(KeyError), cache.owner("layer1"):
                cache.pop("attn_kv_9")
    live = [v.to_dict() for v in cache.violations]
    assert [v["kind"] for v in live] == ["owner_mismatch", "owner_mismatch", "pop_missing", "leftover"]

    out = io.StringIO()
    result = analyze_file(path, out=out)
    assert [v.to_dict() for v in result.violations] == live
    assert result.reports() == [v.report() for v in cache.violations]
    text = out.getvalue()
    assert "owner_mismatch" in text and "layer0" in text and "layer1" in text


# ---------------------------------------------------------------------------- family names
_ADVERSARIAL = [
    ("kv-00000000-1111-2222-3333-44444444444a", "kv-00000000-1111-2222-3333-44444444444a"),
    ("attn_kv_" + "1" * 5000 + "x", ("attn_kv_" + "1" * 5000)[:64]),
    ("kv" + "-0" * 5000, "kv"),
    ("-0" * 5000, "<numeric>"),
    ("kv-0000-1111-2a", "kv-0000-1111-2a"),
    ("a" + "_1" * 20000 + "!", None),
]


@pytest.mark.parametrize("name,family", _ADVERSARIAL, ids=lambda x: x[:20] if isinstance(x, str) else x)
def test_default_family_is_fast_on_adversarial_names(name: str, family: str | None) -> None:
    """default_family (and a push/pop under that name) takes well under a second on hostile names."""
    started = time.perf_counter()
    got = default_family(name)
    cache = new_cache(tracing=False)
    cache.push(name, 1)
    assert cache.pop(name) == 1
    assert cache.family(name) == got
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"{elapsed:.3f} s for a {len(name)}-character name"
    assert len(got) <= 64
    if family is not None:
        assert got == family


def test_default_family_examples() -> None:
    """Trailing numeric ids are stripped; non-str names get a type label."""
    assert default_family("attn_kv_17") == "attn_kv"
    assert default_family("kv.3.1") == "kv"
    assert default_family("layer/2:7") == "layer"
    assert default_family("123") == "<numeric>"
    assert default_family(("a", 1)) == "<tuple>"
    assert default_family("weird name!") == "weird_name_"


# ------------------------------------------------------------------------------------------ fork
@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "fork"),
                    reason="fork() semantics are tested on Linux only")
def test_forked_child_can_use_the_cache_while_another_thread_held_its_lock() -> None:
    """A child forked while another thread holds the cache's lock still uses the cache (no deadlock)."""
    held, release = threading.Event(), threading.Event()

    def family(name: Any) -> str:
        # called under the cache's lock when the checker first sees a queue name
        if name == "hold":
            held.set()
            release.wait(10)
        return default_family(name)

    registry = CollectorRegistry()
    cache = cachescope.InstrumentedCache(name="forked", registry=registry, family=family,
                                         tracing=False)
    def hold() -> None:
        cache.push("hold", "x")
        cache.report()          # reading settles the push under the lock: family("hold") runs

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(10), "the holder thread never took the lock"
    read_fd, write_fd = os.pipe()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() with threads
            pid = os.fork()
        if pid == 0:   # the child: report through the pipe, never return into pytest
            code = 1
            try:
                os.close(read_fd)
                decode(cache, [["layer0", "layer1"], ["layer1", "layer0"]])
                assert kinds(cache) == ["owner_mismatch", "owner_mismatch"], kinds(cache)
                assert "layer0" in cache.report()
                assert registry.get_sample_value(
                    "cachescope_decode_steps_total", {"cache": "forked"}) == 2
                code = 0
                message = b"ok"
            except BaseException:
                message = traceback.format_exc().encode()
            finally:
                with contextlib.suppress(Exception):
                    os.write(write_fd, message[:60000])
                os._exit(code)
        os.close(write_fd)
        write_fd = -1
        deadline = time.monotonic() + 15
        status = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung on the cache (a lock held at fork() time?)")
        with os.fdopen(read_fd, "rb") as f:
            read_fd = -1
            message = f.read().decode(errors="replace")
        assert os.waitstatus_to_exitcode(status) == 0, message
        assert message == "ok"
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        release.set()
        holder.join(10)
    # the parent goes on as well
    assert cache.pop("hold") == "x"
    assert cache.violations == []


# ----------------------------------------------------------------------------------- no torch
_EXERCISE = r"""
import importlib.abc, sys, traceback

class Spy(importlib.abc.MetaPathFinder):
    # notes every attempt to import torch and refuses it (as if torch were not installed)
    stacks = []
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torch" or fullname.startswith("torch."):
            self.stacks.append("".join(traceback.format_stack(limit=12)))
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None

spy = Spy()
sys.meta_path.insert(0, spy)

import cachescope
from prometheus_client import CollectorRegistry, generate_latest

registry = CollectorRegistry()
cache = cachescope.InstrumentedCache(name="portable", registry=registry)

def run(cache):
    with cache.generation(prompt_tokens=1):
        for i, order in enumerate([["a", "b"], ["b", "a"], ["a"]]):
            prev = None if i == 0 else i - 1
            cache.set("state_ids", (prev, i))
            for owner in order:
                with cache.owner(owner):
                    if prev is not None:
                        cache.pop(f"attn_kv_{prev}")
                    cache.push(f"attn_kv_{i}", (owner, [1.5, "x"], {"k": b"v"}))
            cache.end_step(tokens=1)
        try:
            cache.pop("missing")
        except KeyError:
            pass

WHAT = sys.argv[1]
if WHAT == "core":
    try:
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        pass
    else:
        cachescope.tracing.trace(cache, tracer_provider=TracerProvider())
    run(cache)
    cache.report(); [v.report() for v in cache.violations]; cache.timeline()
    generate_latest(registry)
    import importlib.util
    if importlib.util.find_spec("labml_nn") is None:   # labml_nn itself imports torch
        cachescope.install(); cachescope.get_cache(); cachescope.uninstall()
else:
    from cachescope.analyze import analyze_file
    from cachescope.record import record
    path = sys.argv[2]
    with record(cache, path):
        run(cache)
    analyze_file(path, out=None)
assert cache.violations, "the scenario should have violations"
if spy.stacks or "torch" in sys.modules:
    print("torch was imported (or tried) from:\n" + "\n----\n".join(spy.stacks))
    sys.exit(3)
print("no torch")
"""


def _run_exercise(tmp_path: Path, what: str) -> None:
    script = tmp_path / "exercise.py"
    script.write_text(_EXERCISE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    env.pop("PYTHONSTARTUP", None)
    proc = subprocess.run([sys.executable, str(script), what, str(tmp_path / "run.jsonl")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("no torch")


def test_core_never_imports_torch(tmp_path: Path) -> None:
    """In a fresh interpreter, cache ops, reports, metrics, tracing and install() never try to
    import torch."""
    _run_exercise(tmp_path, "core")


def test_record_and_analyze_never_import_torch(tmp_path: Path) -> None:
    """In a fresh interpreter, recording and analyzing a run never try to import torch."""
    _run_exercise(tmp_path, "record")


def test_torch_not_in_sys_modules(request: pytest.FixtureRequest) -> None:
    """After every test above in this process, torch is still not imported (run this file alone)."""
    others = {item.path for item in request.session.items} - {Path(__file__)}
    if _TORCH_BEFORE or others:
        pytest.skip("other test modules (or a plugin) in this session may import torch")
    assert "torch" not in sys.modules
    assert not [m for m in sys.modules if m.startswith("torch.")]
