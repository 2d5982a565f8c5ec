"""Threads: several threads using one InstrumentedCache on separate queues.

The seed cache is one process-wide dict and is not meant for threads interleaving on the *same*
queues (or the same ``state_ids``); what cachescope guarantees is that its own bookkeeping stays
exact and raises nothing when threads use separate queues, and that attribution is per thread.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from torch import nn

import cachescope

from _helpers import construct

THREADS = 8
ROUNDS = 400


@pytest.fixture(autouse=True)
def _fast_switching():
    """Switch threads as often as possible so operations really interleave."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _run_threads(target, n=THREADS):
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def wrapped(k):
        try:
            start.wait()
            target(k)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return errors


def test_counts_are_exact_under_threads(kind):
    """Every push/pop/get/set/clear made by 8 threads on their own queues is counted exactly once."""
    c = construct(kind, timeline_size=64)
    tensors = [torch.full((2, 3), float(k)) for k in range(THREADS)]

    def work(k):
        fam = f"t{chr(97 + k)}_kv"       # one family per thread: ta_kv, tb_kv, ...
        for i in range(ROUNDS):
            items = [(tensors[k], tensors[k][0]) for _ in range(3)]
            for j, item in enumerate(items):
                c.push(f"{fam}_{i % 5}", item)
            for item in items:
                got = c.pop(f"{fam}_{i % 5}")
                assert got is item, "FIFO order broken within a thread's own queue"
            c.set(f"{fam}_flag", i)
            assert c.get(f"{fam}_flag") == i
            assert c.q_size(f"{fam}_{i % 5}") == 0
        for q in range(5):
            c.clear(f"{fam}_{q}")
        with pytest.raises(KeyError):
            c.pop(f"{fam}_missing")

    errors = _run_threads(work)
    assert errors == []
    for k in range(THREADS):
        fam = f"t{chr(97 + k)}_kv"
        fs = c.stats.family(fam)
        assert fs.ops() == {"push": 3 * ROUNDS, "pop": 3 * ROUNDS, "set": 0,
                            "get": 0, "clear": 5, "clear_all": 0}
        assert (fs.depth, fs.logical, fs.storage, fs.live, fs.empty) == (0, 0, 0, 0, 0)
        assert fs.peak_depth == 3 and fs.peak_logical == 3 * (24 + 12)
        flag = c.stats.family(f"{fam}_flag")
        assert (flag.set, flag.get) == (ROUNDS, ROUNDS)
        missing = c.stats.family(f"{fam}_missing")
        assert missing.pop == 1 and missing.violations == {"pop_missing": 1}
    ops = c.stats.ops_by_op()
    assert ops["push"] == THREADS * 3 * ROUNDS and ops["pop"] == THREADS * (3 * ROUNDS + 1)
    recorded = THREADS * (3 * ROUNDS + 3 * ROUNDS + 1 + ROUNDS + 5)   # get is not recorded
    assert c.timeline()[-1].seq == recorded == c.seq
    assert [v.kind for v in c.violations] == ["pop_missing"] * THREADS
    assert c.bookkeeping()["queues"] == 0
    assert c.stats.telemetry_errors == {}


def test_queue_depth_and_bytes_exact_with_items_left(kind):
    """Items left in per-thread queues are counted exactly (depth, bytes, live queues)."""
    c = construct(kind)
    t = torch.zeros(4, 4)   # 64 bytes

    def work(k):
        for i in range(ROUNDS):
            c.push(f"kv{chr(97 + k)}_{i % 10}", t)
        for i in range(ROUNDS // 2):
            c.pop(f"kv{chr(97 + k)}_{i % 10}")

    assert _run_threads(work) == []
    total_depth = sum(c.q_size(f"kv{chr(97 + k)}_{q}") for k in range(THREADS) for q in range(10))
    assert total_depth == THREADS * ROUNDS // 2
    depth = sum(fs.depth for fs in c.stats.families.values())
    logical = sum(fs.logical for fs in c.stats.families.values())
    live = sum(fs.live for fs in c.stats.families.values())
    assert depth == total_depth and logical == 64 * total_depth and live == THREADS * 10
    # one storage shared by every item: counted once per family
    assert all(fs.storage == 64 for fs in c.stats.families.values())


class Layer(nn.Module):
    """Pushes then pops its own thread's queue; optionally waits in between."""

    def __init__(self, cache, tag, gate=None, inside=None):
        super().__init__()
        self.cache, self.tag, self.gate, self.inside = cache, tag, gate, inside

    def forward(self, x):
        self.cache.push(f"{self.tag}_kv", (x, x))
        if self.gate is not None:
            self.inside.set()
            assert self.gate.wait(10)
        self.cache.pop(f"{self.tag}_kv")
        return x


def test_watch_attribution_is_per_thread(kind):
    """A module running in one thread does not own the ops another thread makes meanwhile."""
    c = construct(kind)
    gate, inside = threading.Event(), threading.Event()
    model = nn.ModuleDict({"slow": Layer(c, "slow", gate, inside), "fast": Layer(c, "fast")})
    handle = cachescope.watch(model, c)
    assert handle.hooked == ["fast", "slow"]
    x = torch.ones(1)
    slow = threading.Thread(target=model["slow"], args=(x,))
    slow.start()
    assert inside.wait(10)            # 'slow' is mid-forward in its thread, hooks entered
    c.push("main_kv", 1)              # outside any module, in this thread
    c.pop("main_kv")
    model["fast"](x)
    gate.set()
    slow.join(10)
    by_queue: dict[str, set] = {}
    for r in c.timeline():
        by_queue.setdefault(r.queue, set()).add(r.owner)
    assert by_queue == {"slow_kv": {"slow"}, "main_kv": {None}, "fast_kv": {"fast"}}
    assert c.violations == []
    handle.remove()


def test_attribution_in_many_threads_without_watch(kind):
    """Stack attribution names each thread's own module and finds no false mismatches."""
    c = construct(kind)
    layers = [Layer(c, f"w{chr(97 + k)}") for k in range(THREADS)]
    x = torch.ones(2)

    def work(k):
        for _ in range(ROUNDS // 4):
            layers[k](x)

    assert _run_threads(work) == []
    assert c.violations == []
    owners = {r.queue: r.owner for r in c.timeline()}
    labels = {c.attributor.label(m) for m in layers}
    assert len(labels) == THREADS and set(owners.values()) <= labels
    assert c.stats.ops_by_op()["push"] == THREADS * (ROUNDS // 4)


def test_watched_threads_attribute_by_name(kind):
    """With watch(), concurrent threads running different layers get their qualified names."""
    c = construct(kind)
    model = nn.ModuleList([Layer(c, f"w{chr(97 + k)}") for k in range(THREADS)])
    handle = cachescope.watch(model, c)
    x = torch.ones(2)

    def work(k):
        for _ in range(ROUNDS // 4):
            model[k](x)

    assert _run_threads(work) == []
    assert c.violations == []
    for r in c.timeline():
        assert r.owner == str(ord(r.queue[1]) - 97)
    handle.remove()
