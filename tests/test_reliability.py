"""Reliability: odd input, failing sinks, long runs, bounded memory and series, no data in reports,
and no device synchronisation on GPU."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from cachescope import Cache, InstrumentedCache
from cachescope._values import measure

from _helpers import CONSTRUCTIONS, construct, exporters_available
from _kvloop import Attention, decode, layers, run

X = torch.ones(2, 4)


# ---------------------------------------------------------------- odd input
class _Sub(torch.Tensor):
    """A plain tensor subclass."""


class _Hostile(torch.Tensor):
    """A subclass on which every torch function (shape, nbytes, storage...) raises."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("hostile tensor")


def _cycle():
    xs = [torch.ones(2)]
    xs.append(xs)
    d = {"list": xs}
    d["self"] = d
    return d


def _deep(n):
    x = torch.ones(1)
    for _ in range(n):
        x = [x]
    return x


_HOSTILE = torch.zeros(3).as_subclass(_Hostile)

ODD_VALUES = {
    "none": None,
    "int": 3,
    "string": "text",
    "nested": {"k": (torch.ones(2), [torch.zeros(3), None]), "n": 1},
    "cycle": _cycle(),
    "deep": _deep(50_000),
    "wide": [torch.ones(1)] * 100_000,
    "meta": (torch.empty(4, 4, device="meta"), torch.empty(4, 4, device="meta")),
    "zero_size": (torch.empty(0, 8), torch.empty(0, 8)),
    "parameter": nn.Parameter(torch.ones(2)),
    "subclass": torch.ones(2).as_subclass(_Sub),
    "hostile": _HOSTILE,
    "hostile_pair": (_HOSTILE, _HOSTILE),
    "sparse": torch.eye(3).to_sparse(),
    "nested_tensor_like": (torch.ones(2, 2).t(), torch.ones(2, 2)[:, 1]),
}

ODD_NAMES = [0, -1, 3.5, (0, 1), ("attn_kv", 3), None, frozenset({1}), b"attn_kv_0",
             "", "x" * 10_000, "name\nwith\x00control\tchars", "ünïcødé_17", object()]


@pytest.mark.parametrize("label", list(ODD_VALUES))
def test_odd_values_round_trip(kind, label):
    """Any value pushes, is measured without raising, and pops back as the same object."""
    value = ODD_VALUES[label]
    plain, c = Cache(), construct(kind)
    for cache in (plain, c):
        cache.push("attn_kv_0", value)
        cache.push("attn_kv_0", value)
        assert cache.q_size("attn_kv_0") == 2
        assert cache.pop("attn_kv_0") is value
    fs = c.stats.family("attn_kv")
    assert fs.depth == 1 and fs.logical >= 0 and fs.storage >= 0
    c.report()
    assert c.pop("attn_kv_0") is value
    fs = c.stats.family("attn_kv")
    assert (fs.depth, fs.logical, fs.storage) == (0, 0, 0)


def test_measure_of_odd_values():
    """measure() never raises, counts zero-size and meta tensors by nbytes, and caps huge nests."""
    assert measure(ODD_VALUES["zero_size"]).logical == 0
    assert measure(ODD_VALUES["meta"]).logical == 2 * 64
    assert measure(ODD_VALUES["wide"]).truncated
    assert measure(ODD_VALUES["deep"]).truncated
    m = measure(ODD_VALUES["cycle"])
    assert m.logical == 8 and not m.truncated
    for value in ODD_VALUES.values():
        measure(value)


@pytest.mark.parametrize("name", ODD_NAMES, ids=repr)
def test_odd_queue_names_behave_like_the_seed(kind, name):
    """Non-string and odd queue names work exactly as in the seed."""
    plain, c = Cache(), construct(kind)
    value = torch.ones(1)
    for cache in (plain, c):
        cache.push(name, value)
        assert cache.q_size(name) == 1
        assert cache.pop(name) is value
        with pytest.raises(IndexError):
            cache.pop(name)
        cache.set(name, 5)
        assert cache.get(name) == 5 and cache.q_size(name) is None
        cache.clear(name)
        with pytest.raises(KeyError):
            cache.pop(name)
    assert [v.kind for v in c.violations] == ["pop_empty", "pop_missing"]
    for v in c.violations:
        assert len(v.report()) < 5000


@pytest.mark.parametrize("name", [[1], {"a": 1}, (1, [2])], ids=repr)
def test_unhashable_names_raise_typeerror_like_the_seed(kind, name):
    """Unhashable names raise TypeError from every op, as in the seed, and record nothing."""
    plain, c = Cache(), construct(kind)
    for cache in (plain, c):
        for op, args in (("push", (name, 1)), ("pop", (name,)), ("q_size", (name,)),
                         ("set", (name, 1)), ("get", (name,)), ("clear", (name,))):
            with pytest.raises(TypeError):
                getattr(cache, op)(*args)
    assert c.violations == [] and c.bookkeeping()["queues"] == 0 and c.seq == 0


@pytest.mark.parametrize("state", [5, (1, 2, 3), (), [0], "ab", {"a": 1, "b": 2}, None,
                                   torch.tensor([0, 1]), torch.empty(0), 3.5, object()],
                         ids=lambda s: type(s).__name__ + str(getattr(s, "__len__", lambda: "")()))
def test_odd_state_ids_are_recorded_as_bad_state_ids(kind, state):
    """state_ids of the wrong shape is stored as the seed stores it and recorded as bad_state_ids."""
    plain, c = Cache(), construct(kind)
    plain.set("state_ids", state)
    c.set("state_ids", state)
    assert c.get("state_ids") is plain.get("state_ids") is state
    assert [v.kind for v in c.violations] == ["bad_state_ids"]
    assert c.step == 0
    c.set("state_ids", state)   # again: still bad, never a crash
    assert [v.kind for v in c.violations][-1] == "bad_state_ids"
    c.violations[-1].report()


@pytest.mark.parametrize("state", [[None, 0], (torch.tensor(0), torch.tensor(1)), ("a", "b")],
                         ids=["list", "tensors", "strings"])
def test_unusual_but_valid_state_pairs(kind, state):
    """Any two-element tuple or list is a (prev, next) pair, even of tensors; repeats are handled."""
    c = construct(kind)
    c.set("state_ids", state)
    c.set("state_ids", state)
    assert "bad_state_ids" not in [v.kind for v in c.violations]


# ---------------------------------------------------------------- failing sinks
class FailingSink:
    """A sink whose on_op always raises."""

    def __init__(self):
        self.calls = 0

    def on_op(self, cache, rec):
        self.calls += 1
        raise RuntimeError("sink is down")


class CountingSink:
    def __init__(self):
        self.ops = 0

    def on_op(self, cache, rec):
        self.ops += 1


class FailingEverywhere:
    """A sink that raises in every method of the sink protocol."""

    def _boom(self, *args):
        raise ValueError("down")

    on_op = on_violation = on_step_start = on_step_end = _boom
    on_generation_start = on_generation_end = _boom


def _cachescope_warnings(caplog):
    return [r for r in caplog.records if r.name == "cachescope" and r.levelno == logging.WARNING]


def test_failing_sink_does_not_change_the_decode(kind, caplog):
    """A sink that raises: the decode gives the same outputs, one warning, every failure counted."""
    plain = Cache()
    expected = decode(layers(2, plain), plain, 8, end_steps=False)
    c = construct(kind)
    failing, counting = FailingSink(), CountingSink()
    c.add_sink(failing)
    c.add_sink(counting)
    caplog.set_level(logging.WARNING, logger="cachescope")
    with c.generation():
        got = decode(layers(2, c), c, 8)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert len(_cachescope_warnings(caplog)) == 1
    assert "FailingSink" in _cachescope_warnings(caplog)[0].getMessage()
    assert failing.calls == counting.ops > 0
    assert c.stats.telemetry_errors == {"FailingSink": failing.calls}
    assert c.violations == []


def test_sink_failing_everywhere_warns_once_per_method(kind, caplog):
    """A sink failing in every method never reaches the decode loop and warns once per method."""
    c = construct(kind)
    c.add_sink(FailingEverywhere())
    caplog.set_level(logging.WARNING, logger="cachescope")
    mods = layers(2, c)
    with c.generation():
        decode(mods, c, 3, order=lambda i: [1, 0] if i == 2 else [0, 1])   # violations too
    with c.generation():
        decode(mods, c, 3)
    assert c.violations
    warned = _cachescope_warnings(caplog)
    assert len(warned) == 6
    assert c.stats.telemetry_errors["FailingEverywhere"] > 6


def test_failing_sink_in_strict_mode_still_raises_the_violation(kind):
    """A failing sink does not swallow the strict-mode PopOrderError."""
    from cachescope import PopOrderError
    c = construct(kind, strict=True)
    c.add_sink(FailingEverywhere())
    mods = layers(2, c)
    with pytest.raises(PopOrderError):
        decode(mods, c, 2, order=lambda i: [1, 0] if i == 1 else [0, 1])


# ---------------------------------------------------------------- long runs stay bounded
def _bounded_state(c):
    return c.bookkeeping()


def test_long_decode_is_bounded(kind):
    """2,000 decode steps on a 2-layer model: every bookkeeping structure stays small."""
    c = construct(kind, timeline_size=64, max_violations=50)
    mods = layers(2, c)
    with c.generation():
        decode(mods, c, 2000, order=lambda i: [1, 0] if i % 2 and i > 0 else [0, 1])
    s = _bounded_state(c)
    assert s["queues"] <= 1 and s["timeline"] == 64 and s["violations"] == 50
    assert s["family_memo"] <= 4096 and s["families"] <= 3
    assert s["stat_families"] <= 4 and s["labels"] <= 2
    assert c.stats.violations_dropped == sum(c.stats.violations_by_kind().values()) - 50 > 0
    assert c.stats.steps == 2001
    fs = c.stats.family("attn_kv")
    assert fs.depth == 2 and fs.live == 1
    # the seed never deletes a drained queue: one empty list per decoded token stays in the cache
    assert fs.empty == 2000 == sum(c.q_size(f"attn_kv_{i}") == 0 for i in range(2001))


def test_long_decode_with_cleanup_is_bounded(kind):
    """A loop that clears each drained queue keeps the cache and the 'cleared' memory bounded."""
    c = construct(kind)
    mods = layers(2, c)
    x = X
    c.set("state_ids", (None, 0))
    run(mods, x)
    for i in range(2000):
        c.set("state_ids", (i, i + 1))
        run(mods, x[-1:])
        c.clear(f"attn_kv_{i}")
        c.end_step(1)
    assert c.queues().keys() == {"attn_kv_2000"} and c.bookkeeping()["cleared"] <= 256
    assert c.stats.family("attn_kv").empty == 0 and c.violations == []


def test_ops_without_step_boundaries_stay_bounded(kind):
    """A loop that never marks steps (no state_ids) does not grow per-step bookkeeping."""
    c = construct(kind)
    for i in range(20_000):
        c.push(f"q_{i}", i)
        c.pop(f"q_{i}")
        if i % 100 == 0:
            c.clear_all()
    s = _bounded_state(c)
    assert s["queues"] == 0 and s["timeline"] <= 256


def test_one_endless_step_stays_bounded(kind):
    """A loop that sets state_ids once and then uses fresh queue names forever stays bounded."""
    c = construct(kind)
    c.set("state_ids", (None, 0))
    for i in range(20_000):
        c.push(f"q_{i}", i)
        c.pop(f"q_{i}")
    step = c.current_step
    assert len(step.popped) <= 4096 and len(step.pushed) <= 4096
    assert c.bookkeeping()["queues"] == 0


@pytest.mark.skipif(not exporters_available(), reason="cachescope.metrics not available yet")
def test_metric_series_bounded_over_a_long_run():
    """The number of exported series does not grow with the number of steps or queue names."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    c = InstrumentedCache(name="long-run", registry=registry, tracing=False)
    mods = layers(2, c)

    def series():
        return sum(len(m.samples) for m in registry.collect())

    with c.generation():
        decode(mods, c, 10)
    after_10 = series()
    with c.generation():
        decode(mods, c, 1000)
    assert series() == after_10
    families = {s.labels.get("family") for m in registry.collect() for s in m.samples}
    assert families <= {None, "attn_kv", "state_ids", "all", "mark_step"}


# ---------------------------------------------------------------- no data in reports
SECRET = 123456.0


def _texts(c, raw=True):
    """Every text cachescope makes for people; with ``raw`` also the records and violation fields."""
    out = [c.report(), repr(c)]
    for v in c.violations:
        out += [v.report(), v.summary()]
    if raw:
        out.append("\n".join(map(str, c.timeline())))
        out += [str(v.to_dict()) + repr(v) for v in c.violations]
    return out


def test_reports_hold_no_tensor_contents(kind):
    """Reports, repr and the timeline describe tensors by shape/dtype only, never by contents."""
    c = construct(kind)

    class Leaky(Attention):
        def forward(self, x):
            return super().forward(torch.full_like(x, SECRET))

    mods = nn.ModuleList([Leaky(c), Leaky(c, seed=1)])
    decode(mods, c, 3, order=lambda i: [1, 0] if i == 2 else [0, 1])
    c.push("attn_kv_secret", torch.full((3,), SECRET))
    c.set("state_ids", (9, 10))
    c.push("attn_kv_9", torch.full((2,), SECRET))
    c.pop("attn_kv_9")
    with pytest.raises(IndexError):
        c.pop("attn_kv_9")
    assert {v.kind for v in c.violations} >= {"owner_mismatch", "pop_empty"}
    for text in _texts(c):
        assert "123456" not in text and "1.2346e+05" not in text


def test_state_ids_tensors_are_not_printed(kind):
    """Token-id-like tensors used as state_ids are summarised, not printed, in every report."""
    c = construct(kind)
    tokens = torch.tensor([123456, 654321])
    c.set("state_ids", tokens)                                   # bad_state_ids
    c.set("state_ids", (torch.tensor([123456]), torch.tensor([1])))
    c.push("attn_kv_1", 1)
    c.pop("attn_kv_1")
    c.set("state_ids", (c.current_step.prev, c.current_step.next))   # same pair again
    with pytest.raises(KeyError):
        c.pop("attn_kv_missing")                                  # pop_missing prints state_ids
    assert {v.kind for v in c.violations} >= {"bad_state_ids", "pop_missing"}
    for text in _texts(c):
        assert "123456" not in text and "654321" not in text


def test_long_and_odd_queue_names_are_truncated_and_escaped(kind):
    """A huge queue name is truncated in reports; control characters cannot forge report lines."""
    c = construct(kind)
    long_name = "attn_kv_" + "y" * 50_000
    odd = "attn\nFAKE LINE\x1b[31m"
    for name in (long_name, odd):
        c.push(name, 1)
        c.pop(name)
        with pytest.raises(IndexError):
            c.pop(name)
    for text in _texts(c, raw=False):
        assert "y" * 1000 not in text
        assert "\nFAKE LINE" not in text and "\x1b" not in text
    assert len(c.violations[0].report()) < 6000
    assert "attn_kv_yyyy" in c.violations[0].report()


# ---------------------------------------------------------------- GPU: no host syncs
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_instrumented_decode_never_synchronises_cuda():
    """On CUDA an instrumented decode (default construction) makes no device synchronisation."""
    c = construct(CONSTRUCTIONS[-1])
    mods = layers(3, c).cuda()
    x = torch.linspace(-1, 1, 12, device="cuda").reshape(3, 4)
    with torch.no_grad():
        c.set("state_ids", (None, 0))
        y = run(mods, x)   # warm-up outside the check (kernels load)
        c.set("state_ids", (0, 1))
        y = run(mods, y[-1:])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with c.generation():
                for i in range(1, 20):
                    c.set("state_ids", (i, i + 1))
                    y = run(mods, y[-1:])
                    c.end_step(tokens=1)
                c.push("attn_kv_x", (y, y[0]))
                c.pop("attn_kv_x")
                c.report()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert c.violations == []
    assert c.stats.family("attn_kv").logical > 0
