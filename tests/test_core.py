"""Core behaviour: the seed cache, the drop-in InstrumentedCache, violations, reports, attribution,
install, byte accounting, families and memory hygiene."""

from __future__ import annotations

import gc
import re
import weakref

import pytest
import torch
from torch import nn

import cachescope
from cachescope import Cache, InstrumentedCache, PopOrderError, _cache
from cachescope._families import MAX_FAMILIES, OTHER_FAMILY, FamilyMap, default_family

from _helpers import construct, make_cache
from _kvloop import Attention, KVLayer, Net, decode, layers, run

X = torch.ones(2, 4)


@pytest.fixture(autouse=True)
def _no_leftover_install():
    """Every test starts and ends with the seed's singleton, uninstalled."""
    cachescope.uninstall()
    saved = _cache.set_cache(None)
    yield
    cachescope.uninstall()
    _cache.set_cache(saved)


def prompt(cache, mods):
    cache.set("state_ids", (None, 0))
    run(mods, X)


# ---------------------------------------------------------------- the seed cache
@pytest.mark.parametrize("cls", [Cache, InstrumentedCache])
def test_push_pop_is_fifo(cls):
    """Items come out of a queue in the order they were pushed, as the very same objects."""
    c = cls() if cls is Cache else make_cache()
    items = [torch.zeros(1), object(), None, (1, 2)]
    for it in items:
        c.push("q", it)
    assert [c.pop("q") for _ in items] == items
    assert all(a is b for a, b in zip([*items], items))


@pytest.mark.parametrize("cls", [Cache, InstrumentedCache])
def test_pop_never_pushed_raises_keyerror(cls):
    """Popping a name that was never pushed raises KeyError."""
    c = cls() if cls is Cache else make_cache()
    with pytest.raises(KeyError):
        c.pop("nope")


@pytest.mark.parametrize("cls", [Cache, InstrumentedCache])
def test_pop_empty_raises_indexerror(cls):
    """Popping a drained queue raises IndexError (the seed keeps the empty queue)."""
    c = cls() if cls is Cache else make_cache()
    c.push("q", 1)
    c.pop("q")
    assert c.q_size("q") == 0
    with pytest.raises(IndexError):
        c.pop("q")


@pytest.mark.parametrize("cls", [Cache, InstrumentedCache])
def test_q_size_none_for_missing_or_plain_value(cls):
    """q_size is None for a missing name and for a plain (non-list) value, else the queue length."""
    c = cls() if cls is Cache else make_cache()
    assert c.q_size("missing") is None
    c.set("v", (1, 2))
    assert c.q_size("v") is None
    c.push("q", 1)
    c.push("q", 2)
    assert c.q_size("q") == 2


@pytest.mark.parametrize("cls", [Cache, InstrumentedCache])
def test_set_get_default(cls):
    """get returns what set stored, the default when missing, and None as default default."""
    c = cls() if cls is Cache else make_cache()
    sentinel = object()
    c.set("k", sentinel)
    assert c.get("k") is sentinel
    assert c.get("missing") is None
    assert c.get("missing", 5) == 5


@pytest.mark.parametrize("cls", [Cache, InstrumentedCache])
def test_clear_missing_raises_keyerror(cls):
    """clear removes a key and raises KeyError when the key is missing."""
    c = cls() if cls is Cache else make_cache()
    c.set("k", 1)
    c.clear("k")
    assert c.get("k") is None
    with pytest.raises(KeyError):
        c.clear("k")


@pytest.mark.parametrize("cls", [Cache, InstrumentedCache])
def test_clear_all_drops_everything(cls):
    """clear_all drops every queue and value."""
    c = cls() if cls is Cache else make_cache()
    c.push("q", 1)
    c.set("k", 2)
    c.clear_all()
    assert c.q_size("q") is None and c.get("k") is None
    with pytest.raises(KeyError):
        c.pop("q")


def test_get_cache_is_a_singleton():
    """get_cache creates one Cache on first use and returns it every time after."""
    a = cachescope.get_cache()
    assert type(a) is Cache
    assert cachescope.get_cache() is a


def test_instrumented_returns_identical_values(kind):
    """The instrumented cache returns the very objects the seed does, with the same q_size."""
    plain, inst = Cache(), construct(kind)
    k, v = torch.randn(2, 3), torch.randn(2, 3)
    for c in (plain, inst):
        c.push("attn_kv_0", (k, v))
        c.push("attn_kv_0", k)
        c.set("use_cache", True)
    assert inst.q_size("attn_kv_0") == plain.q_size("attn_kv_0") == 2
    a, b = plain.pop("attn_kv_0"), inst.pop("attn_kv_0")
    assert a is b if not isinstance(a, tuple) else (a[0] is b[0] and a[1] is b[1])
    assert plain.pop("attn_kv_0") is inst.pop("attn_kv_0") is k
    assert plain.get("use_cache") is inst.get("use_cache") is True
    assert isinstance(inst, Cache)


def test_decode_outputs_identical_to_seed(kind):
    """A decode loop produces bit-identical outputs on the seed cache and the instrumented one."""
    plain = Cache()
    a = decode(layers(3, plain), plain, 5, end_steps=False)
    c = construct(kind)
    b = decode(layers(3, c), c, 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert c.violations == []


# ---------------------------------------------------------------- violations
def test_correct_loop_has_no_violations(kind):
    """A correct decode loop records zero violations and a 'violations: none' summary."""
    c = construct(kind)
    decode(layers(3, c), c, 6)
    assert c.violations == []
    assert c.stats.violations_by_kind() == {}
    assert "violations: none" in c.report()


def test_owner_mismatch_on_swapped_layers(kind):
    """Swapping two layers in a step is an owner_mismatch naming consumer, producer, queue and step."""
    c = construct(kind)
    mods = layers(3, c)
    decode(mods, c, 2, order=lambda i: [0, 2, 1] if i == 2 else [0, 1, 2])
    kinds = [v.kind for v in c.violations]
    assert kinds and set(kinds) == {"owner_mismatch"}
    v = c.violations[0]
    assert (v.queue, v.step, v.consumer, v.producer) == ("attn_kv_1", 2, "Attention#2", "Attention#1")
    assert v.family == "attn_kv" and v.position == 2


def test_pop_empty_when_a_layer_runs_twice(kind):
    """A layer running twice drains the queue early: pop_empty, then IndexError as in the seed."""
    c = construct(kind)
    mods = layers(1, c)
    prompt(c, mods)
    c.set("state_ids", (0, 1))
    mods[0](X)
    with pytest.raises(IndexError) as ei:
        mods[0](X)
    assert type(ei.value) is IndexError
    v = c.violations[-1]
    assert (v.kind, v.queue, v.step, v.consumer, v.producer) == (
        "pop_empty", "attn_kv_0", 1, "Attention#0", None)
    assert "already popped" in v.hint


def test_pop_missing_never_pushed(kind):
    """Popping a queue nobody pushed is pop_missing (KeyError) with a hint about state_ids."""
    c = construct(kind)
    mods = layers(1, c)
    c.set("state_ids", (7, 8))
    with pytest.raises(KeyError) as ei:
        mods[0](X)
    assert type(ei.value) is KeyError
    v = c.violations[-1]
    assert (v.kind, v.queue, v.step, v.consumer, v.producer) == (
        "pop_missing", "attn_kv_7", 0, "Attention#0", None)
    assert "nothing was ever pushed" in v.hint and "(7, 8)" in v.detail


class Janitor(nn.Module):
    """A module that wrongly clears a KV queue mid-step."""

    def __init__(self, cache):
        super().__init__()
        self.cache = cache

    def forward(self, x):
        self.cache.clear("attn_kv_0")
        return x


def test_pop_missing_after_clear_names_who_cleared(kind):
    """A pop after a mid-step clear is pop_missing with a hint naming the module that cleared."""
    c = construct(kind)
    mods = layers(1, c)
    prompt(c, mods)
    c.set("state_ids", (0, 1))
    Janitor(c)(X)
    with pytest.raises(KeyError):
        mods[0](X)
    v = c.violations[-1]
    assert (v.kind, v.queue, v.step, v.consumer) == ("pop_missing", "attn_kv_0", 1, "Attention#0")
    assert "cleared by Janitor#0" in v.hint and "step 1" in v.hint


def test_pop_missing_after_clear_all_hint(kind):
    """A pop after clear_all says clear_all ran."""
    c = construct(kind)
    mods = layers(1, c)
    prompt(c, mods)
    c.clear_all()
    c.set("state_ids", (0, 1))
    with pytest.raises(KeyError):
        mods[0](X)
    assert "clear_all()" in c.violations[-1].hint


def test_leftover_when_a_layer_is_skipped(kind):
    """A skipped layer leaves its item behind: leftover at the next boundary, naming the producer."""
    c = construct(kind)
    mods = layers(3, c)
    prompt(c, mods)
    c.set("state_ids", (0, 1))
    mods[0](X)
    mods[2](X)            # layer 1 skipped: layer 2 gets layer 1's item
    c.set("state_ids", (1, 2))
    kinds = [v.kind for v in c.violations]
    assert kinds == ["owner_mismatch", "leftover"]
    v = c.violations[1]
    assert (v.kind, v.queue, v.step, v.consumer, v.producer) == (
        "leftover", "attn_kv_0", 1, None, "Attention#2")
    assert v.depth == 1 and "never popped" in v.hint


def test_leftover_at_end_of_generation(kind):
    """finish_generation checks the last step for leftovers too."""
    c = construct(kind)
    mods = layers(2, c)
    with c.generation():
        prompt(c, mods)
        c.set("state_ids", (0, 1))
        mods[0](X)
    assert [v.kind for v in c.violations] == ["leftover"]
    assert c.violations[0].producer == "Attention#1"


def test_step_restarted_on_retry(kind):
    """Retrying a step that died half-way with the same state_ids is step_restarted."""
    c = construct(kind)
    mods = layers(2, c)
    prompt(c, mods)
    c.set("state_ids", (0, 1))
    mods[0].fail = True
    with pytest.raises(RuntimeError):
        run(mods, X)
    mods[0].fail = False
    c.set("state_ids", (0, 1))  # the retry
    v = c.violations[-1]
    assert (v.kind, v.step) == ("step_restarted", 2)
    assert v.queue in ("attn_kv_0", "attn_kv_1") and v.family == "attn_kv"
    assert "(0, 1)" in v.detail and "restore the queues" in v.hint


def test_state_not_advanced(kind):
    """Setting a completed step's state_ids again is state_not_advanced."""
    c = construct(kind)
    mods = layers(2, c)
    prompt(c, mods)
    c.set("state_ids", (0, 1))
    run(mods, X)
    c.set("state_ids", (0, 1))
    v = c.violations[-1]
    assert (v.kind, v.queue, v.step, v.consumer, v.producer) == (
        "state_not_advanced", "state_ids", 2, None, None)
    assert "advance state_ids" in v.hint


@pytest.mark.parametrize("bad", [5, (1, 2, 3), "01", None, [0], torch.zeros(2)])
def test_bad_state_ids(kind, bad):
    """state_ids that is not a (prev, next) pair is bad_state_ids; the value is still stored."""
    c = construct(kind)
    c.set("state_ids", bad)
    assert c.get("state_ids") is bad
    v = c.violations[-1]
    assert (v.kind, v.queue, v.step, v.consumer, v.producer) == (
        "bad_state_ids", "state_ids", 0, None, None)
    assert "(prev_state, next_state)" in v.hint


def test_strict_raises_poporder_error_at_first_violation(kind):
    """strict=True raises PopOrderError at the first violation, holding it."""
    c = construct(kind, strict=True)
    mods = layers(3, c)
    prompt(c, mods)
    c.set("state_ids", (0, 1))
    mods[0](X)
    with pytest.raises(PopOrderError) as ei:
        mods[2](X)
    assert ei.value.violation is c.violations[0]
    assert len(c.violations) == 1 and ei.value.violation.kind == "owner_mismatch"
    assert "owner_mismatch" in str(ei.value)


def test_strict_pop_errors_keep_base_types(kind):
    """In strict mode pop_empty is still an IndexError and pop_missing still a KeyError."""
    c = construct(kind, strict=True)
    c.push("q", 1)
    c.pop("q")
    with pytest.raises(PopOrderError) as e1:
        c.pop("q")
    assert isinstance(e1.value, IndexError) and e1.value.violation.kind == "pop_empty"
    with pytest.raises(KeyError) as e2:
        c.pop("never")
    assert isinstance(e2.value, PopOrderError) and e2.value.violation.kind == "pop_missing"
    assert "pop_missing" in str(e2.value)


def test_strict_bad_state_ids_raises(kind):
    """strict mode also raises for step-boundary violations, after storing the value."""
    c = construct(kind, strict=True)
    with pytest.raises(PopOrderError):
        c.set("state_ids", 3)
    assert c.get("state_ids") == 3


def test_default_mode_reraises_base_exception_after_recording(kind):
    """Without strict, a failed pop re-raises the seed's exception type, with a note, once recorded."""
    c = construct(kind)
    with pytest.raises(KeyError) as ei:
        c.pop("attn_kv_3")
    assert type(ei.value) is KeyError
    assert c.violations[-1].kind == "pop_missing"
    notes = getattr(ei.value, "__notes__", [])
    assert any("pop_missing" in n for n in notes)


# ---------------------------------------------------------------- reports
def _swapped(c):
    mods = layers(3, c)
    decode(mods, c, 1, order=lambda i: [0, 2, 1] if i == 1 else [0, 1, 2])
    return c.violations[0]


def test_violation_report_has_both_sides_timeline_and_hint(kind):
    """A violation report names both owners, their steps and call sites, the timeline and a hint."""
    c = construct(kind)
    v = _swapped(c)
    text = v.report()
    assert "owner_mismatch" in text and "attn_kv_0" in text
    assert "Pop by   Attention#2 at step 1" in text
    assert "Push by  Attention#1 at step 0" in text
    sites = re.findall(r"at (\S+\.py:\d+)", text)
    assert len(sites) == 2 and all("_kvloop.py" in s for s in sites)
    assert "Recent ops on 'attn_kv_0'" in text
    assert re.search(r"> #\d+ +step 1 +pop +attn_kv_0 +Attention#2 \(item of Attention#1\)", text)
    assert "Hint: layers ran in a different order" in text
    assert "Tensor[" in text and "float32" in text   # value summary: shapes/dtype, not contents
    assert str(v) == v.summary() and "Attention#2 popped the item pushed by Attention#1" in str(v)
    assert v.to_dict()["consumer"] == "Attention#2"


def test_run_report_summary(kind):
    """cache.report() summarises steps, ops, families, bytes and violations by kind."""
    c = construct(kind)
    _swapped(c)
    text = c.report()
    assert "steps: 2" in text and "tokens: 2" in text
    assert "push=6" in text and "pop=3" in text
    assert "family attn_kv:" in text and "queues live" in text
    assert "owner_mismatch=" in text
    assert "Attention#2 popped the item pushed by Attention#1" in text


# ---------------------------------------------------------------- attribution
def test_attribution_by_stack_without_watch(kind):
    """Without watch(), ops are attributed to ClassName#n of the module found on the stack."""
    c = construct(kind)
    mods = layers(2, c)
    prompt(c, mods)
    owners = [r.owner for r in c.timeline() if r.op == "push"]
    assert owners == ["Attention#0", "Attention#1"]
    import inspect
    line = inspect.currentframe().f_lineno + 1
    c.push("outside", 1)
    assert c.timeline()[-1].owner is None
    assert c.timeline()[-1].site.endswith(f"test_core.py:{line}")


def test_watch_names_sequential_children(kind):
    """watch() on nn.Sequential names owners '0', '1', ..."""
    c = construct(kind)
    model = nn.Sequential(Attention(c, seed=0), Attention(c, seed=1))
    with cachescope.watch(model, c) as h:
        assert h.hooked == ["0", "1"]
        c.set("state_ids", (None, 0))
        model(X)
        c.set("state_ids", (0, 1))
        model[1](X)
    v = c.violations[0]
    assert (v.consumer, v.producer) == ("1", "0")


def test_watch_nested_model_names_and_hooks_only_cache_users(kind):
    """In a nested model owners are 'layers.3.attention' and only cache-using modules get hooks."""
    c = construct(kind)
    net = Net(4, c)
    h = cachescope.watch(net, c)
    assert h.hooked == [f"layers.{i}.attention" for i in range(4)]
    c.set("state_ids", (None, 0))
    net(X)
    assert [r.owner for r in c.timeline() if r.op == "push"] == [
        f"layers.{i}.attention" for i in range(4)]
    c.set("state_ids", (0, 1))
    net.layers[0](X)
    net.layers[3](X)
    v = c.violations[0]
    assert (v.consumer, v.producer) == ("layers.3.attention", "layers.1.attention")
    h.remove()


def test_watch_after_stack_labels_keeps_matching(kind):
    """Items pushed before watch() (stack labels) still match their owner's pops after watch()."""
    c = construct(kind)
    mods = layers(2, c)
    prompt(c, mods)
    h = cachescope.watch(mods, c)
    c.set("state_ids", (0, 1))
    run(mods, X)
    assert c.violations == []
    assert [r.owner for r in c.timeline() if r.op == "pop"] == ["0", "1"]
    h.remove()


def test_watch_defaults_to_installed_cache_and_rejects_plain(kind):
    """watch() without a cache uses the installed one and refuses a plain Cache."""
    with pytest.raises(TypeError):
        cachescope.watch(nn.Sequential(Attention()))
    c = cachescope.install(construct(kind))
    model = nn.Sequential(Attention(), Attention(seed=1))
    h = cachescope.watch(model)
    c.set("state_ids", (None, 0))
    model(X)
    assert [r.owner for r in c.timeline() if r.op == "push"] == ["0", "1"]
    h.remove()


def test_no_stale_owner_after_module_raises(kind):
    """A watched module that raises mid-forward leaves no owner behind for later ops."""
    c = construct(kind)
    model = nn.Sequential(Attention(c), Attention(c, seed=1))
    h = cachescope.watch(model, c)
    c.set("state_ids", (None, 0))
    model[0].fail = True
    with pytest.raises(RuntimeError):
        model(X)
    c.push("outside", 1)
    c.set("after", 1)
    assert c.timeline()[-2].owner is None and c.timeline()[-1].owner is None
    model[0].fail = False
    model[1](X)
    assert c.timeline()[-1].owner == "1"
    h.remove()


def test_watch_remove_is_idempotent_and_detaches(kind):
    """handle.remove() detaches every hook (twice is fine); attribution falls back to the stack."""
    c = construct(kind)
    model = nn.Sequential(Attention(c), Attention(c, seed=1))
    h = cachescope.watch(model, c)
    assert all(m._forward_pre_hooks and m._forward_hooks for m in model)
    h.remove()
    h.remove()
    assert h.hooked == []
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model)
    c.set("state_ids", (None, 0))
    model(X)
    owners = [r.owner for r in c.timeline() if r.op == "push"]
    assert all(o.startswith("Attention#") for o in owners) and len(set(owners)) == 2


def test_attribution_off(kind):
    """attribution='off' records no owners or sites and so finds no owner mismatches."""
    c = construct(kind, attribution="off")
    _mods = layers(3, c)
    decode(_mods, c, 1, order=lambda i: [0, 2, 1] if i == 1 else [0, 1, 2])
    assert c.violations == []
    assert all(r.owner is None and r.site is None for r in c.timeline())


# ---------------------------------------------------------------- install
def test_install_uninstall_round_trip_patches_labml(kind):
    """install()/uninstall() are idempotent and swap both cachescope's and labml_nn's singleton."""
    labml = pytest.importorskip("labml_nn.neox.utils.cache")
    before_ours = cachescope.get_cache()
    before_labml = labml.get_cache()
    c = construct(kind)
    assert cachescope.install(c) is c
    assert cachescope.install() is c          # idempotent
    assert cachescope.install(c) is c
    assert cachescope.installed() is c
    with pytest.raises(RuntimeError):
        cachescope.install(construct(kind))
    assert cachescope.get_cache() is c and labml.get_cache() is c
    labml.get_cache().push("attn_kv_0", 1)   # unmodified labml code talks to the instrumented cache
    assert c.stats.family("attn_kv").push == 1
    cachescope.uninstall()
    cachescope.uninstall()
    assert cachescope.installed() is None
    assert cachescope.get_cache() is before_ours and labml.get_cache() is before_labml


def test_install_with_options_and_type_checks():
    """install(**options) builds a cache; non-instrumented caches and cache+options are refused."""
    with pytest.raises(TypeError):
        cachescope.install(Cache())
    with pytest.raises(TypeError):
        cachescope.install(make_cache(), strict=True)
    c = cachescope.install(metrics=False, tracing=False, strict=True)
    assert isinstance(c, InstrumentedCache) and c.strict and cachescope.get_cache() is c


def test_labml_model_code_is_instrumented_after_install():
    """labml's own get_cache() inside a module is attributed after install()."""
    labml = pytest.importorskip("labml_nn.neox.utils.cache")

    c = cachescope.install(make_cache())
    model = nn.Sequential(KVLayer(get_cache=labml.get_cache), KVLayer(get_cache=labml.get_cache))
    h = cachescope.watch(model)
    assert h.hooked == ["0", "1"]
    c.set("state_ids", (None, 0))
    model(X)
    c.set("state_ids", (0, 1))
    model[1](X)
    assert (c.violations[0].consumer, c.violations[0].producer) == ("1", "0")
    h.remove()


# ---------------------------------------------------------------- bytes and queues
def test_view_counts_whole_storage_and_shared_storage_once(kind):
    """A view of a bigger buffer counts its whole storage; one storage in two items counts once."""
    c = construct(kind)

    def held():   # counters are read through cache.stats, which brings them up to date
        fs = c.stats.family("attn_kv")
        return fs.logical, fs.storage

    buf = torch.zeros(4, 8)                      # 128 bytes of storage
    c.push("attn_kv_0", (buf[0], buf[1]))        # 2 x 32 logical bytes, one storage
    assert held() == (64, 128)
    c.push("attn_kv_1", buf[2])                  # same storage again, in another item
    assert held() == (96, 128)
    other = torch.zeros(2)                       # a distinct 8-byte storage
    c.push("attn_kv_1", other)
    assert held() == (104, 136)
    rec = c.timeline()[0]
    assert (rec.logical_bytes, rec.storage_bytes) == (64, 128)
    c.pop("attn_kv_0")
    assert held() == (40, 136)   # buf still held by attn_kv_1's item
    c.pop("attn_kv_1")
    assert held() == (8, 8)
    c.pop("attn_kv_1")
    assert held() == (0, 0)
    fs = c.stats.family("attn_kv")
    assert (fs.peak_logical, fs.peak_storage) == (104, 136)


def test_prompt_step_value_view_of_qkv():
    """(k, v) views split from one fused projection hold the projection's whole storage."""
    c = make_cache()
    qkv = torch.zeros(1, 5, 3 * 16)
    q, k, v = qkv.split(16, dim=-1)
    c.push("attn_kv_0", (k, v))
    fs = c.stats.family("attn_kv")
    assert fs.logical == 2 * 5 * 16 * 4 and fs.storage == 3 * 5 * 16 * 4


def test_live_vs_empty_queue_counts_and_depth(kind):
    """Drained queues stay in the seed as empty queues; live/empty counts and depth follow."""
    c = construct(kind)
    decode(layers(2, c), c, 3)
    fs = c.stats.family("attn_kv")
    # attn_kv_0..2 were drained and stay as empty lists; attn_kv_3 holds one item per layer.
    assert [c.q_size(f"attn_kv_{i}") for i in range(4)] == [0, 0, 0, 2]
    assert (fs.live, fs.empty) == (1, 3)
    assert (fs.depth, fs.peak_depth) == (2, 2)   # each layer pops before it pushes
    c.clear("attn_kv_0")
    assert (fs.live, fs.empty) == (1, 2)
    c.clear("attn_kv_3")
    assert (fs.live, fs.empty, fs.depth, fs.logical, fs.storage) == (0, 2, 0, 0, 0)
    c.clear_all()
    assert (fs.live, fs.empty, fs.depth) == (0, 0, 0)


def test_depth_per_family(kind):
    """Depth is tracked per family, independent of other families."""
    c = construct(kind)
    c.push("attn_kv_0", 1)
    c.push("attn_kv_1", 2)
    c.push("ffn_cache_0", 3)
    assert c.stats.family("attn_kv").depth == 2
    assert c.stats.family("ffn_cache").depth == 1
    assert c.stats.peak_depth() == 2


# ---------------------------------------------------------------- families
@pytest.mark.parametrize(("name", "family"), [
    ("attn_kv_17", "attn_kv"), ("attn_kv_0", "attn_kv"), ("kv.3.1", "kv"), ("layer-2", "layer"),
    ("42", "<numeric>"), ("a b/c", "a_b_c"), (17, "<int>"), (("a", 1), "<tuple>"), (None, "<NoneType>"),
])
def test_default_family(name, family):
    """The default normaliser strips trailing ids and labels non-strings by type."""
    assert default_family(name) == family


def test_family_map_is_bounded():
    """At most max_families labels exist; later ones fold into 'other'; the memo is bounded."""
    fm = FamilyMap(memo_limit=100)
    labels = {fm(f"family{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}_{i}") for i in range(1000)}
    assert len(fm.families) == MAX_FAMILIES
    assert OTHER_FAMILY in labels and len(labels) == MAX_FAMILIES + 1
    assert len(fm._memo) <= 100
    assert fm([1]) == "<list>"                       # unhashable names do not raise


def test_custom_family_fn_that_raises_is_contained(kind):
    """A user family function that raises labels the op 'other' instead of breaking the loop."""
    def bad(name):
        raise ValueError("boom")
    c = construct(kind, family=bad)
    c.push("attn_kv_0", 1)
    assert c.pop("attn_kv_0") == 1
    assert c.stats.family(OTHER_FAMILY).push == 1


def test_cache_families_bounded_over_many_queue_names(kind):
    """Thousands of per-token queue names map to one family label."""
    c = construct(kind)
    for i in range(3000):
        c.push(f"attn_kv_{i}", i)
    assert c.family("attn_kv_2999") == "attn_kv" and c.bookkeeping()["families"] == 1
    assert set(c.stats.families) == {"attn_kv"}


# ---------------------------------------------------------------- memory hygiene
def test_no_tensor_reference_after_pop(kind):
    """Once popped and dropped by the caller, pushed tensors are freed: no reference is kept."""
    c = construct(kind)
    mods = layers(2, c)
    prompt(c, mods)
    k, v = torch.randn(3, 4), torch.randn(3, 4)
    c.push("extra", (k, v))
    refs = [weakref.ref(k), weakref.ref(v)]
    del k, v
    item = c.pop("extra")
    del item
    gc.collect()
    assert all(r() is None for r in refs)
    c.report()
    assert all(r() is None for r in refs)


def test_drained_queue_bookkeeping_is_freed(kind):
    """Provenance of a drained queue is dropped (no queue is tracked after draining)."""
    c = construct(kind)
    mods = layers(3, c)
    decode(mods, c, 4)
    assert c.bookkeeping()["queues"] == 1 and len(c.pending("attn_kv_4")) == 3
    c.set("state_ids", (4, 5))
    run(mods, X)
    c.clear("attn_kv_5")
    assert c.bookkeeping()["queues"] == 0 and c.pending("attn_kv_5") == []


def test_timeline_ring_buffer_is_bounded(kind):
    """The timeline keeps only the last timeline_size ops."""
    c = construct(kind, timeline_size=16)
    for i in range(100):
        c.push("q", i)
    tl = c.timeline()
    assert len(tl) == 16 and tl[-1].seq == 100 and tl[0].seq == 85


def test_max_violations_caps_kept_violations(kind):
    """Only max_violations violations are kept; the rest are counted as dropped."""
    c = construct(kind, max_violations=3)
    for _ in range(10):
        with pytest.raises(KeyError):
            c.pop("missing")
    assert len(c.violations) == 3
    assert c.stats.violations_dropped == 7
    assert c.stats.violations_by_kind() == {"pop_missing": 10}
    assert "7 more not kept" in c.report()


def test_reset_forgets_counters_not_values(kind):
    """reset() drops violations, counters and provenance but keeps the cached values."""
    c = construct(kind)
    c.push("attn_kv_0", 1)
    with pytest.raises(KeyError):
        c.pop("missing")
    c.reset()
    assert c.violations == [] and c.timeline() == []
    assert c.q_size("attn_kv_0") == 1 and c.stats.family("attn_kv").live == 1
    assert c.pop("attn_kv_0") == 1


def test_speedups_argument_is_accepted_with_a_deprecation_warning():
    """Code written for the old C fast path still constructs a cache: speedups= warns and does
    nothing, speedups_active is False."""
    with pytest.warns(DeprecationWarning, match="no longer has a C fast path"):
        c = make_cache(speedups=True)
    assert c.speedups_active is False
    c.push("kv_0", 1)
    assert c.pop("kv_0") == 1


@pytest.mark.parametrize("seed", range(6))
def test_storage_counts_match_a_model_over_random_holds_and_releases(seed):
    """Random hold/release/drop_all/set_held sequences keep storage bytes equal to the sum over
    distinct held storages, logical bytes and depth exact, and peaks the running maxima."""
    import random
    from cachescope._accounting import FamilyStats

    rng = random.Random(seed)
    fs = FamilyStats("kv")
    pool = [1000 + 16 * k for k in range(rng.choice((3, 40)))]
    nbytes = {k: rng.randrange(1, 1 << 20) for k in pool}
    live: list[tuple[int, tuple[tuple[int, int], ...]]] = []
    peak_storage = peak_logical = 0

    def model_storage() -> int:
        return sum(nbytes[k] for k in {k for _, st in live for k, _ in st})

    for _ in range(2000):
        r = rng.random()
        if r < 0.5 or not live:
            st = tuple((k, nbytes[k]) for k in rng.sample(pool, rng.choice((0, 1, 2, 3))))
            item = (rng.randrange(0, 1 << 16), st)
            fs.hold(*item)
            live.append(item)
        elif r < 0.95:
            fs.release(*live.pop(rng.randrange(len(live))))
        elif r < 0.98:
            fs.set_held(live)          # measured afresh: the same items, nothing changes
        else:
            fs.drop_all()
            live.clear()
        peak_storage = max(peak_storage, model_storage())
        peak_logical = max(peak_logical, sum(lg for lg, _ in live))
        assert (fs.storage, fs.logical) == (model_storage(), sum(lg for lg, _ in live))
        assert fs.depth == len(live)
        assert (fs.peak_storage, fs.peak_logical) == (peak_storage, peak_logical)


# ---------------------------------------------------------------- pop_push (one call, two ops)
def _ops(c):
    return [(r.op, r.queue, r.owner, r.violation, r.logical_bytes) for r in c.timeline()]


@pytest.mark.parametrize("mismatch", [False, True])
def test_pop_push_is_pop_then_push(kind, mismatch):
    """``pop_push(a, b, v)`` returns what ``pop(a)`` returns and leaves the same records,
    counters and violations as ``pop(a)`` then ``push(b, v)``."""
    results = []
    for fused in (False, True):
        c = construct(kind)
        seen: list = []     # a sink that sees every op gets the same records, in order
        c.add_sink(type("S", (), {"on_op": lambda self, cache, rec: seen.append(
            (rec.seq, rec.op, rec.queue, rec.owner, rec.violation))})())
        first, new = (torch.zeros(2, 3), torch.zeros(2, 3)), (torch.ones(4), torch.ones(4))
        with c.owner("layers.0"):
            c.push("kv_0", first)
        with c.owner("layers.1" if mismatch else "layers.0"):
            got = c.pop_push("kv_0", "kv_1", new) if fused else (c.pop("kv_0"), c.push("kv_1", new))[0]
        assert got is first
        fs = c.stats.family("kv")
        results.append((_ops(c), [(v.kind, v.queue, v.consumer, v.producer) for v in c.violations],
                        (fs.push, fs.pop, fs.logical), c.queues(), seen))
    assert results[0] == results[1]
    assert [k for k, *_ in results[1][1]] == (["owner_mismatch"] if mismatch else [])


@pytest.mark.parametrize("setup, error, kind_", [(False, KeyError, "pop_missing"),
                                                 (True, IndexError, "pop_empty")])
def test_pop_push_failed_pop_raises_the_seeds_error_and_pushes_nothing(kind, setup, error, kind_):
    """A failed pop raises the seed's exception, records the violation, and pushes nothing."""
    c = construct(kind)
    if setup:
        c.push("kv_0", 1)
        c.pop("kv_0")
    with pytest.raises(error):
        c.pop_push("kv_0", "kv_1", 2)
    assert c.q_size("kv_1") is None
    assert [v.kind for v in c.violations] == [kind_]


def test_pop_push_strict_raises_poporder_error_after_both_ops():
    """Strict mode: an owner mismatch raises PopOrderError; both ops were made (as pop + push)."""
    c = make_cache(strict=True)
    with c.owner("a"):
        c.push("kv_0", 1)
    with c.owner("b"), pytest.raises(PopOrderError):
        c.pop_push("kv_0", "kv_0", 2)
    assert c.q_size("kv_0") == 1


@pytest.mark.parametrize("sink", [False, True])
def test_pop_push_many_is_pop_push_for_each(kind, sink):
    """``pop_push_many(ops)`` leaves the same records, counters, queues and violations (in the same
    order) as one ``pop_push`` per op, with or without a sink that sees every op; ``by=None``
    takes the caller's owner."""
    results = []
    for many in (False, True):
        c = construct(kind)
        seen = []
        if sink:
            c.add_sink(type("S", (), {"on_op": lambda self, cache, rec: seen.append(rec.op)})())
        for i in range(3):
            with c.owner(f"layers.{i}"):
                c.push(f"kv_{i}", (torch.zeros(2, i + 1), torch.zeros(2, i + 1)))
        ops = [(f"kv_{i}", f"kv_{i}", (torch.ones(3), torch.ones(3)),
                ("layers.1" if i == 2 else f"layers.{i}", f"x.py:{i}")) for i in range(3)]
        ops.append(("kv_0", "kv_0", (torch.ones(1), torch.ones(1)), None))
        with c.owner("layers.0"):
            if many:
                assert c.pop_push_many(ops) is None
            else:
                for op in ops:
                    c.pop_push(*op)
        results.append((_ops(c), [(v.kind, v.queue, v.consumer, v.producer, v.seq) for v in c.violations],
                        c.queues(), c.stats.family("kv").logical, seen))
    assert results[0] == results[1]
    assert [v[:4] for v in results[1][1]] == [("owner_mismatch", "kv_2", "layers.1", "layers.2")]


def test_pop_push_many_failed_pop_raises_after_the_ops_before_it():
    """A failed pop raises the seed's error (recorded as for ``pop_push``); the ops before it took
    effect, the ones after it were not made. Strict mode raises at the first violation."""
    c = make_cache()
    c.push("kv_0", 1)
    with pytest.raises(KeyError):
        c.pop_push_many([("kv_0", "kv_0", 2, ("a", None)), ("kv_9", "kv_9", 3, ("a", None)),
                         ("kv_0", "kv_0", 4, ("a", None))])
    assert c.queues() == {"kv_0": 1} and c.get_quiet("kv_0") == [2]
    assert [v.kind for v in c.violations] == ["pop_missing"]
    s = make_cache(strict=True)
    with s.owner("a"):
        s.push("kv_0", 1)
        s.push("kv_1", 1)
    with pytest.raises(PopOrderError):
        s.pop_push_many([("kv_0", "kv_0", 2, ("b", None)), ("kv_1", "kv_1", 2, ("b", None))])
    assert s.get_quiet("kv_0") == [2] and s.get_quiet("kv_1") == [1]


def test_leftover_counts_only_items_pushed_before_the_step(kind):
    """A queue popped then pushed in one step (a layer's slot) leaves no leftover; an older item
    still there is a leftover, and only it is counted."""
    c = construct(kind)
    c.set("state_ids", (None, 0))
    c.push("kv_0", "a")
    c.set("state_ids", (0, 1))
    c.pop_push("kv_0", "kv_0", "b")
    c.set("state_ids", (1, 2))
    assert c.violations == []
    c.push("kv_0", "c")                # a second item: one more than the layer pops
    c.set("state_ids", (2, 3))
    c.pop_push("kv_0", "kv_0", "d")    # pops "b"; "c" (pushed in step 2) stays behind
    c.set("state_ids", (3, 4))
    assert [(v.kind, v.queue, v.step, v.depth) for v in c.violations] == [("leftover", "kv_0", 3, 1)]


class _LayerRef(cachescope.TensorPair):
    def __init__(self, owner):
        self.owner = owner

    def pair(self):
        return self.owner.keys, self.owner.values


def test_tensor_pair_is_measured_like_a_tuple_at_push_and_when_read():
    """An item that stands for two tensors (``TensorPair``) counts their bytes at its push, and
    again when the counters are read (a layer whose tensors grew meanwhile)."""
    c = make_cache()
    layer = nn.Module()
    layer.keys, layer.values = torch.zeros(2, 4), torch.zeros(2, 4)
    c.push("kv_0", _LayerRef(layer))
    assert c.timeline()[-1].logical_bytes == 64
    layer.keys, layer.values = torch.zeros(3, 4), torch.zeros(3, 4)
    fs = c.stats.family("kv")
    assert (fs.logical, fs.storage) == (96, 96)
    with c.owner("x"):
        c.push("kv_0", _LayerRef(nn.Module()))   # no tensors: measured as nothing, no error
    c.pop("kv_0")
    v = c.pop("kv_0")
    assert isinstance(v, _LayerRef) and c.violations == []
