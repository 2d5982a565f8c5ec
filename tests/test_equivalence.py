"""InstrumentedCache is a drop-in Cache: random op sequences give the same results on both.

A hypothesis state machine applies the same push/pop/q_size/set/get/clear/clear_all sequence to a
seed ``Cache`` and an ``InstrumentedCache`` side by side, with names and values chosen to be awkward
(ints, tuples, unhashable lists, None, a name whose hash fails; tensors, None, nested containers,
cycles, deep nests, zero-size, meta and subclassed tensors, objects whose repr/eq raise), and checks
after every op that both return the very same objects (tensors by identity), raise the same
exception types, hold the same keys and report the same q_size.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from torch import nn

from cachescope import Cache

from _helpers import CONSTRUCTIONS, construct


class _Sub(torch.Tensor):
    """A tensor subclass."""


class _Weird:
    """Equality and repr raise; hashing works."""

    def __eq__(self, other):
        raise RuntimeError("no eq")

    __hash__ = object.__hash__

    def __repr__(self):
        raise RuntimeError("no repr")


class _BadHash:
    """A queue name whose hash raises something other than TypeError."""

    def __hash__(self):
        raise ValueError("no hash")


class _PopNoLen:
    """A plain value with ``pop(0)`` but no ``len``: the seed's pop happily calls it."""

    def __init__(self):
        self.items = [1, 2, 3]

    def pop(self, i):
        return self.items.pop(i) if self.items else None


T = torch.randn(2, 3)
BUF = torch.zeros(4, 4)
VIEW = BUF[1]
Z = torch.empty(0)
META = torch.empty(2, 3, device="meta")
INTS = torch.arange(3)
PARAM = nn.Parameter(torch.ones(2))
SUB = torch.zeros(2).as_subclass(_Sub)
WEIRD = _Weird()


def _cycle_list():
    xs = [T]
    xs.append(xs)
    return xs


def _cycle_dict():
    d = {0: T}
    d["self"] = d
    return d


def _deep():
    x = [T]
    for _ in range(200):
        x = [x, VIEW]
    return x


def _wide():
    return [(T, VIEW)] * 5000


# Factories: called once per cache so mutable containers are not shared between the two caches
# (the seed appends to a list stored with set()); leaf objects are shared and compared by identity.
VALUES = [
    lambda: T, lambda: None, lambda: (T, VIEW), lambda: (META, META), lambda: Z, lambda: SUB,
    lambda: (PARAM, INTS), lambda: [T, Z], lambda: {0: T, "k": META}, lambda: {}, lambda: [],
    lambda: [T], lambda: [[T, [Z]], (VIEW,)], _cycle_list, _cycle_dict, _deep, _wide,
    lambda: 7, lambda: "s", lambda: (None, 0), lambda: (0, 1), lambda: (1, 2), lambda: (T, T),
    lambda: (WEIRD, WEIRD), lambda: WEIRD, _PopNoLen, lambda: torch.Size([2, 3]),
]

NAMES = ["attn_kv_0", "attn_kv_1", "state_ids", "use_cache", "", "17", 0, 7, (0, 1), ("a", 2),
         None, [1], (1, [2]), "x" * 300, "a\nb\x00", _BadHash(), WEIRD]



class _Pick:
    """A drawn name or value factory, shown by index (some of them cannot be repr'd or hashed)."""

    def __init__(self, kind: str, index: int, obj: object) -> None:
        self.kind, self.index, self.obj = kind, index, obj

    def __repr__(self) -> str:
        return f"{self.kind}[{self.index}]"


names = st.sampled_from([_Pick("NAMES", i, n) for i, n in enumerate(NAMES)])
values = st.sampled_from([_Pick("VALUES", i, v) for i, v in enumerate(VALUES)])


def _label(x) -> str:
    if isinstance(x, type):
        return x.__name__
    return f"<{type(x).__name__}>"


def _outcome(fn, *args):
    try:
        return True, fn(*args)
    except Exception as exc:  # noqa: BLE001 - the exception type is what we compare
        return False, type(exc)


class Equivalence(RuleBasedStateMachine):
    construction = "bare"
    options: dict = {}

    def __init__(self) -> None:
        super().__init__()
        self.plain = Cache()
        self.inst = construct(self.construction, **self.options)
        self.twin: dict[int, object] = {}
        self.keep: list[object] = []   # keep twins alive so their ids stay unique

    # -- helpers ---------------------------------------------------------------------------------
    def _pair(self, factory):
        a, b = factory(), factory()
        self._register(a, b, set())
        return a, b

    def _register(self, a, b, seen):
        if a is b or id(a) in seen:
            return
        seen.add(id(a))
        self.twin[id(a)] = b
        self.keep += [a, b]
        if isinstance(a, dict):
            for x, y in zip(a.values(), b.values()):
                self._register(x, y, seen)
        elif isinstance(a, (list, tuple)):
            for x, y in zip(a, b):
                self._register(x, y, seen)

    def _same(self, a, b) -> bool:
        return a is b or self.twin.get(id(a)) is b

    def _both(self, method, *picks):
        """Call ``method`` on both caches with the drawn name/value picks."""
        args_a, args_b = [], []
        for p in picks:
            if p.kind == "NAMES":
                args_a.append(p.obj)
                args_b.append(p.obj)
            else:
                a, b = self._pair(p.obj)
                args_a.append(a)
                args_b.append(b)
        ok_a, ra = _outcome(getattr(self.plain, method), *args_a)
        ok_b, rb = _outcome(getattr(self.inst, method), *args_b)
        what = f"{method}{tuple(picks)}"
        assert ok_a == ok_b, (f"{what}: seed {'returned' if ok_a else 'raised'} {_label(ra)}, "
                              f"instrumented {'returned' if ok_b else 'raised'} {_label(rb)}")
        if ok_a and method == "q_size":
            assert ra == rb, f"{what}: seed {ra}, instrumented {rb}"
        elif ok_a:
            assert self._same(ra, rb), f"{what}: different objects returned"
        else:
            assert ra is rb, f"{what}: seed raised {ra.__name__}, instrumented {rb.__name__}"
        return ok_a, ra

    # -- rules -----------------------------------------------------------------------------------
    @rule(name=names, value=values)
    def push(self, name, value):
        ok, _ = self._both("push", name, value)
        if ok:  # each cache may have created its own queue list: they are twins from now on
            qa, qb = self.plain._cache[name.obj], self.inst._cache[name.obj]
            if not self._same(qa, qb):
                self.twin[id(qa)] = qb
                self.keep += [qa, qb]

    @rule(name=names)
    def pop(self, name):
        self._both("pop", name)

    @rule(name=names)
    def q_size(self, name):
        self._both("q_size", name)

    @rule(name=names, value=values)
    def set(self, name, value):
        self._both("set", name, value)

    @rule(name=names, default=st.one_of(st.none(), values))
    def get(self, name, default):
        if default is None:
            self._both("get", name)
        else:
            self._both("get", name, default)

    @rule(name=names)
    def clear(self, name):
        self._both("clear", name)

    @rule()
    def clear_all(self):
        self._both("clear_all")

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def same_contents(self):
        a, b = self.plain._cache, self.inst._cache
        assert len(a) == len(b)
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            assert ka is kb
            assert self._same(va, vb)
            if type(va) is list:
                assert len(va) == len(vb)
                assert all(self._same(x, y) for x, y in zip(va, vb))

    @invariant()
    def same_q_size(self):
        for name in NAMES:
            assert _outcome(self.plain.q_size, name) == _outcome(self.inst.q_size, name)

    @invariant()
    def accounting_is_sane(self):
        inst = self.inst
        live: dict[str, int] = {}
        empty: dict[str, int] = {}
        for key, value in inst._cache.items():
            if type(value) is list:
                fam = inst.family(key)
                (live if value else empty)[fam] = (live if value else empty).get(fam, 0) + 1
        for fam, fs in inst.stats.families.items():
            assert min(fs.depth, fs.logical, fs.storage, fs.live, fs.empty) >= 0, fam
            assert fs.depth <= fs.peak_depth and fs.logical <= fs.peak_logical
            assert fs.storage <= fs.peak_storage
            assert (fs.live, fs.empty) == (live.get(fam, 0), empty.get(fam, 0)), fam
        assert len(inst.timeline()) <= inst.timeline_size
        assert len(inst.violations) <= inst.max_violations
        lists = {k: v for k, v in inst._cache.items() if type(v) is list}
        assert inst.bookkeeping()["queues"] <= len(lists)
        assert all(len(inst.pending(k)) <= len(v) for k, v in lists.items())

    @invariant()
    def exporters_never_fail(self):
        assert self.inst.stats.telemetry_errors == {}


_SETTINGS = settings(deadline=None, stateful_step_count=50,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _machine(construction: str, examples: int, **options):
    cls = type(f"Equivalence_{construction}", (Equivalence,),
               {"construction": construction, "options": options})
    return cls, settings(_SETTINGS, max_examples=examples)


@pytest.mark.parametrize("construction", CONSTRUCTIONS)
def test_random_op_sequences_match_the_seed(construction):
    """Hundreds of random 50-op sequences give identical results on Cache and InstrumentedCache."""
    cls, s = _machine(construction, 300 if construction == "bare" else 120)
    cls.TestCase.settings = s
    cls.TestCase().runTest()


def test_random_op_sequences_match_the_seed_with_tight_bounds():
    """The same holds with a tiny timeline, few kept violations and stack-only attribution."""
    cls, s = _machine("bare", 100, timeline_size=3, max_violations=2, attribution="stack")
    cls.TestCase.settings = s
    cls.TestCase().runTest()
