"""Regression tests from an adversarial review of the pure-Python core: torch.compile and symbolic
tracing, pathological queue names, fork(), absurd and odd tensors, storages resized in place,
non-str keys, hostile callers and hostile sinks. Public API only (``InstrumentedCache``,
``install``/``uninstall``, ``watch``, the cache's ops, ``stats``, ``report()``, ``add_sink`` and
the Prometheus exposition)."""

from __future__ import annotations

import gc
import os
import re
import signal
import threading
import time
import warnings
import weakref
from typing import Any, Callable

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from torch import nn

import cachescope

from _kvloop import labml_decode

# Several tests provoke violations on purpose: never fail them through the plugin's strict mode.
pytestmark = [pytest.mark.cachescope(strict=False),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

BARE = dict(metrics=False, tracing=False)
CONSTRUCTIONS = [pytest.param(BARE, id="bare"), pytest.param({}, id="default")]


def new_cache(options: dict[str, Any], **more: Any) -> cachescope.InstrumentedCache:
    """A cache; with metrics on it exports to a registry of its own (scraped by the tests)."""
    if options.get("metrics", True):
        more.setdefault("registry", CollectorRegistry())
    return cachescope.InstrumentedCache(**options, **more)


def held(cache: cachescope.InstrumentedCache, family: str = "kv") -> tuple[int, int, int]:
    """``(depth, logical bytes, storage bytes)`` held by ``family`` now (read afresh from
    ``cache.stats`` each time: the counters are only current when read through the cache)."""
    fs = cache.stats.family(family)
    return fs.depth, fs.logical, fs.storage


def scrape(cache: cachescope.InstrumentedCache) -> dict[str, float]:
    """``{'name{labels}': value}`` of the cache's Prometheus exposition."""
    text = generate_latest(cache.metrics.registry).decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def byte_gauges(cache: cachescope.InstrumentedCache, family: str) -> dict[str, float]:
    return {k: v for k, v in scrape(cache).items()
            if k.startswith("cachescope_tensor_bytes") and f'family="{family}"' in k}


_HELD = re.compile(r"family (\S+): .*bytes held (\S+ \S+) logical / (\S+ \S+) storage "
                   r"\(peak (\S+ \S+) / (\S+ \S+)\)")


def report_bytes(cache: cachescope.InstrumentedCache, family: str) -> tuple[str, ...]:
    """The byte figures that ``report()`` prints for ``family`` (held and peak)."""
    for m in _HELD.finditer(cache.report()):
        if m.group(1) == family:
            return m.groups()[1:]
    raise AssertionError(f"no line for family {family!r} in:\n{cache.report()}")


# ------------------------------------------------------------------------------ 1. torch.compile
@pytest.fixture
def dynamo_reset() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_module_using_the_cache_gives_the_eager_result(dynamo_reset: None, backend: str) -> None:
    """A torch.compile'd module that pushes and pops through an InstrumentedCache returns what eager mode returns, with the ops counted and no exception."""
    cache = cachescope.InstrumentedCache(registry=CollectorRegistry())

    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            cache.push("kv_1", (x, x))
            return cache.pop("kv_1")[0] + 1

    expected = M()(torch.ones(2))
    out = torch.compile(M(), backend=backend)(torch.ones(2))
    torch.testing.assert_close(out, expected)
    fs = cache.stats.family("kv")
    assert (fs.push, fs.pop, fs.depth, fs.logical, fs.storage) == (2, 2, 0, 0, 0)
    assert cache.q_size("kv_1") == 0
    assert cache.violations == []


def test_fullgraph_compile_raises_dynamos_graph_break_error(dynamo_reset: None) -> None:
    """With fullgraph=True, cache ops are a graph break: torch._dynamo raises its own error naming it (no crash), the cache is left untouched, and the same module compiles without fullgraph."""
    cache = cachescope.InstrumentedCache(registry=CollectorRegistry())

    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            cache.push("kv_1", (x, x))
            return cache.pop("kv_1")[0] + 1

    with pytest.raises(torch._dynamo.exc.TorchDynamoException) as caught:
        torch.compile(M(), backend="eager", fullgraph=True)(torch.ones(2))
    assert "graph break" in str(caught.value).lower()
    assert cache.q_size("kv_1") is None and cache.seq == 0   # nothing half-applied
    torch.testing.assert_close(torch.compile(M(), backend="eager")(torch.ones(2)), torch.full((2,), 2.0))
    assert cache.stats.family("kv").push == 1 and cache.violations == []


LABML_LAYERS, LABML_HIDDEN, LABML_HEADS = 3, 16, 2


@pytest.mark.parametrize("backend,use_watch", [("aot_eager", False), ("inductor", True)],
                         ids=["aot_eager-stack", "inductor-watch"])
def test_compiled_labml_attention_decodes_like_plain_labml_and_catches_a_swap(
        dynamo_reset: None, backend: str, use_watch: bool) -> None:
    """labml's AttentionLayer, compiled after cachescope.install(), decodes the same outputs as with labml's plain cache, and layers swapped in one step are still reported as owner_mismatch."""
    try:
        from labml_nn.neox.model import AttentionLayer
        from labml_nn.neox.utils import cache as labml_cache
    except Exception as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"labml_nn.neox is not importable here ({exc!r})")

    def make() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(*[AttentionLayer(n_hidden=LABML_HIDDEN, n_heads=LABML_HEADS)
                               for _ in range(LABML_LAYERS)])

    torch.manual_seed(1)
    tokens = torch.randn(1, 5, LABML_HIDDEN)
    saved = labml_cache._INSTANCE
    cachescope.uninstall()
    try:
        labml_cache._INSTANCE = labml_cache.Cache()          # the reference: labml's own cache, eager
        reference = labml_decode(make(), tokens, 3)
        reference_swapped = labml_decode(make(), tokens, 3, swap_at=2)

        layers = make()
        compiled = nn.Sequential(*[torch.compile(layer, backend=backend) for layer in layers])
        cache = cachescope.install(**BARE)
        handle = cachescope.watch(layers, prefix="layers.") if use_watch else None
        try:
            outputs = labml_decode(compiled, tokens, 3)
            assert cache.violations == []
            for got, want in zip(outputs, reference, strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            fs = cache.stats.family("attn_kv")
            assert (fs.push, fs.pop) == (LABML_LAYERS * 3, LABML_LAYERS * 2)

            if handle is not None:
                handle.remove()
            cachescope.uninstall()                       # a fresh cache for the faulty decode
            cache = cachescope.install(**BARE)
            handle = cachescope.watch(layers, prefix="layers.") if use_watch else None
            outputs = labml_decode(compiled, tokens, 3, swap_at=2)
            for got, want in zip(outputs, reference_swapped, strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            kinds = {v.kind for v in cache.violations}
            assert kinds == {"owner_mismatch"}, [v.summary() for v in cache.violations]
            first = cache.violations[0]
            assert first.queue == "attn_kv_1" and first.step == 2
            names = ("layers.2", "layers.1") if use_watch else ("AttentionLayer#2", "AttentionLayer#1")
            assert (first.consumer, first.producer) == names
        finally:
            if handle is not None:
                handle.remove()
            cachescope.uninstall()
    finally:
        labml_cache._INSTANCE = saved


# ------------------------------------------------------------------------------ 2. family names
ADVERSARIAL_NAMES = [
    "kv-00000000-1111-2222-3333-44444444444a",
    "attn_kv_" + "1" * 5000 + "x",
    "req_1733450000123456789_kv",
    "kv" + "-0" * 10_000,
    "-1" * 5000 + "a",
    "1_" * 5000,
    "_" * 10_000 + "1",
    "1" * 20_000,
    ".1:2/3-4_" * 2000 + "!",
    "x" * 10_000 + "_1" * 5000 + "z",
    "\u0663" * 5000 + "x",                      # Arabic-Indic digits: str.isdecimal() is True
    "attn_kv_" + "\x00\n\t" * 3000 + "7",
]


@pytest.mark.parametrize("options", CONSTRUCTIONS)
def test_adversarial_queue_names_take_linear_time(options: dict[str, Any]) -> None:
    """Queue names built to make a backtracking family normaliser take exponential time are labelled, reported and scraped in well under a second in all."""
    cache = new_cache(options)
    start = time.perf_counter()
    for name in ADVERSARIAL_NAMES:
        cache.push(name, 1)
        assert cache.pop(name) == 1
        with pytest.raises(KeyError):
            cache.pop(name + "#missing")                  # a violation report with the name in it
        label = cache.family(name)
        assert isinstance(label, str) and 0 < len(label) <= 64
    cache.report()
    for v in cache.violations:
        v.report()
    if options.get("metrics", True):
        scrape(cache)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"{len(ADVERSARIAL_NAMES)} names took {elapsed:.3f} s"
    assert cache.family("kv-00000000-1111-2222-3333-44444444444a").startswith("kv")
    assert cache.family("req_1733450000123456789_kv") == "req_1733450000123456789_kv"


# ------------------------------------------------------------------------------ 3. fork
def _wait_child(pid: int, timeout: float) -> int | str:
    """The child's exit code, or 'hung' (after killing it) when it runs past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hung"
        time.sleep(0.005)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_can_use_the_cache_while_other_threads_held_its_lock() -> None:
    """A child forked while other threads were inside the cache (one blocked under the cache's lock, others looping on report() and on scrapes) can push, pop, report and scrape its copy: 10 forks, none hangs."""
    hold = threading.Event()        # set: the family normaliser below blocks its caller
    entered = threading.Event()
    release = threading.Event()

    def family(name: Any) -> str:
        # Runs inside the cache's op (under its lock) the first time a name is seen.
        if hold.is_set() and str(name).startswith("hold"):
            entered.set()
            release.wait(30)
        return str(name).rstrip("0123456789_") or "x"

    registry = CollectorRegistry()
    cache = cachescope.InstrumentedCache(name="forked", registry=registry, family=family)
    k, v = torch.ones(2, 3), torch.ones(2, 3)
    for i in range(50):
        cache.push(f"attn_kv_{i}", (k, v))
    stop = threading.Event()

    def loop(fn: Callable[[], Any]) -> None:
        while not stop.is_set():
            fn()

    spinners = [threading.Thread(target=loop, args=(cache.report,), daemon=True),
                threading.Thread(target=loop, args=(lambda: generate_latest(registry),), daemon=True)]
    for t in spinners:
        t.start()
    results: list[int | str] = []
    try:
        for i in range(10):
            blocker = None
            if i % 2 == 0:  # deterministic: a thread sits inside an op, holding the cache's lock
                hold.set()
                entered.clear()
                release.clear()
                blocker = threading.Thread(target=cache.push, args=(f"hold_{i}", 1), daemon=True)
                blocker.start()
                assert entered.wait(10)
            else:
                time.sleep(0.02)
            pid = os.fork()
            if pid == 0:  # the child: never return into pytest
                code = 1
                try:
                    cache.push("attn_kv_child", (k, v))
                    assert cache.pop("attn_kv_child")[0] is k
                    assert "cachescope summary" in cache.report()
                    text = generate_latest(registry).decode()
                    assert 'cachescope_ops_total{cache="forked"' in text
                    code = 0
                finally:
                    os._exit(code)
            hold.clear()
            release.set()
            if blocker is not None:
                blocker.join(10)
            results.append(_wait_child(pid, 10))
            if results[-1] != 0:
                break                        # one hung child is enough (and costs 10 s)
    finally:
        stop.set()
        hold.clear()
        release.set()
        for t in spinners:
            t.join(10)
    assert results == [0] * 10, f"child exit codes, one per fork (hung = killed after 10 s): {results}"


# ------------------------------------------------------------------------------ 4. symbolic tracing
def _kv_module(cache: Any) -> nn.Module:
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            cache.push("kv", (x, x))
            k, v = cache.pop("kv")
            return k + v
    return M()


def _export(cache: Any) -> Any:
    return torch.export.export(_kv_module(cache), (torch.ones(5, 7),),
                               dynamic_shapes={"x": {0: torch.export.Dim("b")}}, strict=False)


@pytest.mark.parametrize("options", CONSTRUCTIONS)
def test_export_with_dynamic_shapes_matches_the_plain_cache(options: dict[str, Any]) -> None:
    """torch.export with a dynamic batch dimension exports a module using an InstrumentedCache exactly as with the plain Cache (no 'Constraints violated', same graph, same ranges)."""
    plain = _export(cachescope.Cache())
    cache = new_cache(options)
    exported = _export(cache)
    assert str(exported.graph) == str(plain.graph)
    assert {str(k): str(v) for k, v in exported.range_constraints.items()} == \
        {str(k): str(v) for k, v in plain.range_constraints.items()}
    torch.testing.assert_close(exported.module()(torch.ones(3, 7)), torch.full((3, 7), 2.0))
    assert cache.stats.family("kv").depth == 0
    cache.report()


@pytest.mark.parametrize("options", CONSTRUCTIONS)
def test_make_fx_symbolic_adds_no_guards(options: dict[str, Any]) -> None:
    """make_fx(tracing_mode='symbolic') through an InstrumentedCache gives the plain Cache's graph with no shape guard, also when a pop breaks the owner rule and its report is written."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def trace(cache: Any, mismatch: bool) -> Any:
        def f(x: torch.Tensor) -> torch.Tensor:
            owner = getattr(cache, "owner", None)
            if owner is None:
                cache.push("kv", (x, x))
                k, v = cache.pop("kv")
            else:
                with owner("A"):
                    cache.push("kv", (x, x))
                with owner("B" if mismatch else "A"):
                    k, v = cache.pop("kv")
            return k * 2
        return make_fx(f, tracing_mode="symbolic")(torch.ones(5, 7))

    plain = trace(cachescope.Cache(), False)
    for mismatch in (False, True):
        cache = new_cache(options)
        g = trace(cache, mismatch)
        assert str(g.graph) == str(plain.graph)
        assert list(g.shape_env.guards) == list(plain.shape_env.guards) == []
        shape = [n for n in g.graph.nodes if n.op == "placeholder"][0].meta["val"].shape
        assert all(isinstance(d, torch.SymInt) for d in shape)
        assert [v.kind for v in cache.violations] == (["owner_mismatch"] if mismatch else [])
        for v in cache.violations:
            v.report()
        cache.report()


# ------------------------------------------------------------------------------ 5. >= 2**63 bytes
def _huge_views() -> list[torch.Tensor]:
    """Expanded views whose nbytes is 2**63 bytes or more (one real element each)."""
    return [
        torch.empty(1, dtype=torch.float32).expand(2**61),             # 2**63
        torch.empty(1, dtype=torch.float64).expand(2**60 + 1),         # 2**63 + 8
        torch.empty(1, dtype=torch.complex128).expand(2**59 + 3),      # 2**63 + 48
        torch.empty(1, 1, dtype=torch.int64).expand(3, 2**59),         # 1.5 * 2**63
        torch.empty(1, dtype=torch.uint8).expand(2**62 - 1),           # four of these pass 2**63
    ]


@pytest.mark.parametrize("options", CONSTRUCTIONS)
def test_tensors_of_2_63_bytes_and_more_push_pop_and_never_count_negative(options: dict[str, Any]) -> None:
    """Expanded views of 2**63 bytes and more push and pop unchanged, and however many are held, no byte count in stats, report() or the Prometheus gauges is negative; all return to 0 after the pops."""
    cache = new_cache(options)
    views = _huge_views()
    assert views[0].nbytes >= 2**63
    u8 = views[-1]
    values: list[tuple[str, Any]] = [(f"kv_{i}", (t, t)) for i, t in enumerate(views)]
    values += [("kv_a", views[0]), ("kv_b", [views[1], views[2]]), ("kv_c", (views[3], torch.ones(3)))]
    values += [(f"kv_u{i}", (u8, u8.expand(2**62 - 1))) for i in range(4)]   # four pushes
    for name, value in values:
        cache.push(name, value)
        fs = cache.stats.family("kv")
        assert min(fs.logical, fs.storage, fs.peak_logical, fs.peak_storage) >= 0, \
            (name, fs.logical, fs.storage, fs.peak_logical, fs.peak_storage)
    assert all("-" not in figure for figure in report_bytes(cache, "kv")), report_bytes(cache, "kv")
    if options.get("metrics", True):
        gauges = byte_gauges(cache, "kv")
        assert len(gauges) == 4 and all(v >= 0 for v in gauges.values()), gauges
    for name, value in values:
        assert cache.pop(name) is value
    assert held(cache) == (0, 0, 0)
    assert report_bytes(cache, "kv")[:2] == ("0 B", "0 B")
    assert not any(cache.stats.telemetry_errors.values())


# ------------------------------------------------------------------------------ 6. nested tensors
def _nested_cases() -> list[Any]:
    a, b = torch.ones(2, 3), torch.ones(4, 3)
    with warnings.catch_warnings():   # "nested tensors are a prototype", at collection time
        warnings.simplefilter("ignore")
        strided = torch.nested.nested_tensor([a, b], layout=torch.strided)
        empty = torch.nested.nested_tensor([torch.ones(0, 3), torch.ones(5, 3)], layout=torch.strided)
    return [
        pytest.param(strided, id="strided"),
        pytest.param(strided.transpose(1, 2), id="strided-transposed-view"),
        pytest.param(empty, id="strided-with-empty-component"),
    ]


@pytest.mark.parametrize("nt", _nested_cases())
@pytest.mark.parametrize("options", CONSTRUCTIONS)
def test_strided_nested_tensors_are_measured_like_torch_measures_them(options: dict[str, Any],
                                                                      nt: torch.Tensor) -> None:
    """A strided nested tensor counts its nbytes as logical bytes (torch's nbytes: the sum of its components') and its buffer's size as storage, alone, in a (k, v) pair and in a list, and never raises."""
    assert nt.is_nested
    components = sum(t.nbytes for t in nt.unbind())
    assert nt.nbytes == components                          # what torch's public API says
    buffer = nt.untyped_storage().nbytes()
    cache = new_cache(options)
    dense = torch.ones(3)
    cache.push("kv_0", nt)
    assert held(cache)[1:] == (components, buffer)
    cache.push("kv_1", (nt, nt))
    cache.push("kv_2", [nt, dense])
    assert held(cache)[1:] == (4 * components + dense.nbytes, buffer + dense.nbytes)
    with cache.owner("A"):
        cache.push("kv_3", (nt, nt))
    with cache.owner("B"):
        assert cache.pop("kv_3")[0] is nt                   # an owner_mismatch, with a value summary
    assert [v.kind for v in cache.violations] == ["owner_mismatch"]
    assert "logical" in cache.violations[0].report()
    cache.report()
    for name in ("kv_0", "kv_1", "kv_2"):
        cache.pop(name)
    assert held(cache) == (0, 0, 0)


# ------------------------------------------------------------------------------ 7. resized storages
def _resize(kind: str, k: torch.Tensor) -> None:
    if kind == "storage-grow":
        k.untyped_storage().resize_(1 << 20)
    elif kind == "storage-shrink":
        k.untyped_storage().resize_(16)
    elif kind == "storage-free":
        k.untyped_storage().resize_(0)
    elif kind == "tensor-grow":
        k.resize_(256, 256)
    elif kind == "tensor-shrink":
        k.resize_(1)
    else:  # pragma: no cover
        raise AssertionError(kind)


RESIZES = ["storage-grow", "storage-shrink", "storage-free", "tensor-grow", "tensor-shrink"]


@pytest.mark.parametrize("kind", RESIZES)
@pytest.mark.parametrize("read_first", [True, False], ids=["read-before-resize", "not-read"])
@pytest.mark.parametrize("options", CONSTRUCTIONS)
def test_held_bytes_return_to_zero_after_a_storage_is_resized_in_place(options: dict[str, Any],
                                                                       read_first: bool, kind: str) -> None:
    """Resizing a queued tensor's storage in place (untyped_storage().resize_ or Tensor.resize_) leaves no negative or stale residue: once every item is popped, depth and held bytes are exactly 0 in stats, report() and the gauges (whether or not the bytes were read before the resize)."""
    cache = new_cache(options)
    qkv = torch.zeros(4, 12)
    k, v = qkv[:, 4:8], qkv[:, 8:]            # views of one buffer, like labml's prompt step
    own = torch.zeros(4, 4)
    cache.push("kv_0", (k, v))
    cache.push("kv_1", (own, own))
    if read_first:
        assert held(cache) == (2, k.nbytes + v.nbytes + 2 * own.nbytes,
                               qkv.untyped_storage().nbytes() + own.untyped_storage().nbytes())
    _resize(kind, qkv if kind.startswith("tensor") else k)
    _resize(kind, own)
    cache.push("kv_2", (k, own))              # measured after the resize, shares both storages
    assert min(held(cache)) >= 0, held(cache)
    for name in ("kv_1", "kv_0", "kv_2"):
        cache.pop(name)
        assert min(held(cache)) >= 0, held(cache)
    assert held(cache) == (0, 0, 0)
    assert report_bytes(cache, "kv")[:2] == ("0 B", "0 B")
    if options.get("metrics", True):
        gauges = byte_gauges(cache, "kv")
        assert gauges['cachescope_tensor_bytes{cache="%s",family="kv",kind="logical"}' % cache.name] == 0
        assert gauges['cachescope_tensor_bytes{cache="%s",family="kv",kind="storage"}' % cache.name] == 0


@pytest.mark.parametrize("kind", ["storage-grow", "storage-free", "tensor-grow"])
def test_held_bytes_are_current_after_a_storage_is_resized_while_queued(kind: str) -> None:
    """While an item is queued, the bytes the cache reports follow a resize of its storage in place (not the size they had when last read or pushed)."""
    cache = new_cache(BARE)
    k, v = torch.zeros(4, 4), torch.zeros(4, 4)
    cache.push("kv_0", (k, v))
    assert held(cache) == (1, 128, 128)       # read once at the push-time size
    _resize(kind, k)
    # Plain ints only below: an assertion that mentions a tensor whose storage was freed would
    # have pytest repr (read) it.
    storage_now = k.untyped_storage().nbytes() + v.untyped_storage().nbytes()
    logical_now = k.nbytes + v.nbytes
    del k, v
    _, held_logical, held_storage = held(cache)
    assert (held_logical, held_storage) == (logical_now, storage_now), \
        "cache says (logical, storage) = (%d, %d) B held; torch now says (%d, %d) B" % (
            held_logical, held_storage, logical_now, storage_now)


# ------------------------------------------------------------------------------ 8. non-str keys
class _Key:
    """An arbitrary hashable object used as a queue name or key."""


@pytest.mark.parametrize("in_step", [False, True], ids=["no-step", "inside-a-step"])
@pytest.mark.parametrize("ops", ["push-pop-clear", "set-get-clear", "push-clear_all", "failed-pops"])
@pytest.mark.parametrize("options", CONSTRUCTIONS)
def test_tensor_and_object_keys_are_not_kept_alive_after_removal(options: dict[str, Any], ops: str,
                                                                 in_step: bool) -> None:
    """Tensors (1 MiB each) and arbitrary objects used as queue names or keys are freed once the caller drops them after removing them from the cache (the seed keeps a drained queue until it is cleared, so pops are followed by clear), also in the middle of a decode step."""
    cache = new_cache(options)
    if in_step:
        cache.set("state_ids", (None, 0))
    refs = []
    for i in range(200):
        key: Any = torch.empty(262_144) if i % 4 else _Key()     # 1 MiB of float32
        refs.append(weakref.ref(key))
        if ops == "push-pop-clear":
            cache.push(key, (key, key))
            cache.get(key)
            assert cache.pop(key)[0] is key
            cache.clear(key)
        elif ops == "set-get-clear":
            cache.set(key, key)
            assert cache.get(key) is key
            cache.clear(key)
        elif ops == "push-clear_all":
            cache.push(key, 1)
        else:
            with pytest.raises(KeyError):
                cache.pop(key)
            cache.push(key, 1)
            cache.pop(key)
            with pytest.raises(IndexError):
                cache.pop(key)
            cache.clear(key)
        del key
    if ops == "push-clear_all":
        cache.clear_all()
    gc.collect()
    alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} of 200 keys are still alive (nothing read from the cache since)"
    cache.report()                              # readers do not resurrect or keep anything
    cache.timeline()
    for v in cache.violations:
        v.report()
    if options.get("metrics", True):
        scrape(cache)
    gc.collect()
    alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} of 200 keys are still alive after reading the cache"


# ------------------------------------------------------------------------------ 9. hostile callers
class _Calls:
    n = 0


class _Hostile(Exception):
    pass


def _hostile(name: str) -> Any:
    _Calls.n += 1
    raise _Hostile(name)


class _UsesCache:
    """Methods that use the cache, with ``self`` the hostile object."""
    def forward(self, cache: Any, x: Any) -> Any:
        cache.push("kv_0", x)
        return cache.pop("kv_0")

    def push_only(self, cache: Any, x: Any) -> None:
        cache.push("kv_2", x)

    def pop_only(self, cache: Any) -> Any:
        return cache.pop("kv_2")


class _ClassRaises(_UsesCache):
    @property  # type: ignore[misc]
    def __class__(self) -> Any:
        return _hostile("__class__")


class _GetattrRaises(_UsesCache):
    def __getattr__(self, name: str) -> Any:
        return _hostile(name)


class _GetattributeRaises(_UsesCache):
    def __getattribute__(self, name: str) -> Any:
        if name in ("forward", "push_only", "pop_only"):
            return object.__getattribute__(self, name)
        return _hostile(name)


class _ModuleClassRaises(_UsesCache, nn.Module):
    @property  # type: ignore[misc]
    def __class__(self) -> Any:
        return _hostile("__class__")


class _ModuleGetattrRaises(_UsesCache, nn.Module):
    def __getattr__(self, name: str) -> Any:
        return _hostile(name)


class _ModuleEqHashRaise(_UsesCache, nn.Module):
    def __eq__(self, other: object) -> bool:
        return _hostile("__eq__")

    def __hash__(self) -> int:
        return _hostile("__hash__")


@pytest.mark.parametrize("cls", [_ClassRaises, _GetattrRaises, _GetattributeRaises, _ModuleClassRaises,
                                 _ModuleGetattrRaises, _ModuleEqHashRaise], ids=lambda c: c.__name__)
@pytest.mark.parametrize("attribution", ["auto", "stack"])
@pytest.mark.parametrize("options", CONSTRUCTIONS)
def test_attribution_never_runs_the_callers_code(options: dict[str, Any], attribution: str,
                                                 cls: type) -> None:
    """Attribution never runs the caller's code: ops made from a method of an object whose __class__, __getattr__, __getattribute__ or __eq__/__hash__ raise succeed, store and return the value, none of that code is called, and such modules are still told apart."""
    cache = new_cache(options, attribution=attribution)
    x, y = torch.ones(2), torch.zeros(2)
    _Calls.n = 0
    first, second = cls(), cls()
    _Calls.n = 0
    assert first.forward(cache, x) is x
    cache.push("kv_1", y)                  # not from a method: nobody's code
    assert cache.q_size("kv_1") == 1
    assert second.forward(cache, y) is y
    first.push_only(cache, x)                # one object pushes, the other pops
    assert cache.q_size("kv_2") == 1
    assert second.pop_only(cache) is x
    # Modules are still told apart (the mismatch is caught); other objects are nobody.
    expected = ["owner_mismatch"] if issubclass(cls, nn.Module) else []
    assert [v.kind for v in cache.violations] == expected
    cache.report()
    for v in cache.violations:
        v.report()
    assert _Calls.n == 0, f"the caller's hostile code ran {_Calls.n} time(s)"


def test_attribution_does_not_run_a_metaclass_property() -> None:
    """Attribution does not run code of the caller's metaclass: a module class whose metaclass makes __name__ a raising property still has its ops succeed, and that property is never called."""
    calls: list[str] = []

    class Meta(type):
        @property
        def __name__(cls) -> str:   # type: ignore[override]
            calls.append("__name__")
            raise _Hostile("__name__")

    class Layer(nn.Module, metaclass=Meta):
        def forward(self, cache: Any, x: Any) -> Any:
            cache.push("kv_0", x)
            return cache.pop("kv_0")

    cache = new_cache(BARE)
    x = torch.ones(2)
    assert Layer()(cache, x) is x
    assert cache.stats.family("kv").push == 1
    cache.report()
    assert calls == [], f"the metaclass property ran {len(calls)} time(s) during cache ops"


# ------------------------------------------------------------------------------ 10. hostile sinks
class _NeedsValuesRaises:
    def on_op(self, cache: Any, record: Any) -> None:
        pass

    @property
    def needs_values(self) -> bool:
        raise RuntimeError("needs_values")


class _OnOpPropertyRaises:
    @property
    def on_op(self) -> Any:
        raise RuntimeError("on_op")

    def on_step_end(self, cache: Any, step: Any) -> None:
        pass


class _EveryAttributeRaises:
    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(name)


class _NeedsValuesBoolRaises:
    class _Bad:
        def __bool__(self) -> bool:
            raise RuntimeError("__bool__")

    needs_values = _Bad()

    def on_op(self, cache: Any, record: Any) -> None:
        pass


@pytest.mark.parametrize("sink_cls", [_NeedsValuesRaises, _OnOpPropertyRaises, _EveryAttributeRaises,
                                      _NeedsValuesBoolRaises], ids=lambda c: c.__name__)
@pytest.mark.parametrize("options", CONSTRUCTIONS)
def test_sink_with_raising_properties_never_reaches_the_host(options: dict[str, Any],
                                                             sink_cls: type) -> None:
    """A sink whose optional attributes raise is accepted by add_sink, never raises into the cache's ops, and its failure is counted in stats.telemetry_errors (and the telemetry errors metric)."""
    cache = new_cache(options)
    sink = sink_cls()
    assert cache.add_sink(sink) is sink
    k = torch.ones(2)
    cache.set("state_ids", (None, 0))
    cache.push("attn_kv_0", (k, k))
    cache.set("state_ids", (0, 1))
    assert cache.pop("attn_kv_0")[0] is k
    cache.end_step(tokens=1)
    with cache.owner("A"):
        cache.push("attn_kv_1", 1)
    with cache.owner("B"):
        assert cache.pop("attn_kv_1") == 1
    assert [v.kind for v in cache.violations] == ["owner_mismatch"]
    cache.report()
    errors = cache.stats.telemetry_errors.get(sink_cls.__name__, 0)
    assert errors >= 1, cache.stats.telemetry_errors
    if options.get("metrics", True):
        key = 'cachescope_telemetry_errors_total{cache="%s",sink="%s"}' % (cache.name, sink_cls.__name__)
        assert scrape(cache).get(key, 0) >= 1
    cache.remove_sink(sink)
    assert sink not in cache.sinks
