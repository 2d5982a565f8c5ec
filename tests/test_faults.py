"""Tests for cachescope.faults: the catalogue, the spec parser, and what each fault makes the checker report."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

import cachescope
from cachescope import KINDS, Cache, InstrumentedCache
from cachescope.faults import (DEFAULT_STEP, FAULTS, Fault, InjectedFault, inject, parse_fault)
from cachescope.neox import generate

from _kvloop import KVLayer
from _loop import tiny_model

STEPS = 6
L = [f"layers.{i}.attention" for i in range(4)]


# ----------------------------------------------------------------------------- models and loops

class Block(nn.Module):
    """A transformer-ish layer around a labml-style ``KVLayer`` (so owners are ``layers.i.attention``)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.attention = KVLayer(kv=lambda x: (x.clone(), x.clone()), index=index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x)


def generic_model(n: int = 4) -> nn.Sequential:
    return nn.Sequential(*[Block(i) for i in range(n)])


def generic_decode(model: nn.Module, cache: Any, steps: int) -> None:
    """A labml-style loop: set state_ids (prev, next), run the model."""
    x = torch.zeros(1, 3, 4)
    for i in range(steps):
        cache.set("state_ids", (None, 0) if i == 0 else (i - 1, i))
        x = model(x)[:, -1:]


@pytest.fixture
def installed() -> Any:
    cache = cachescope.install(metrics=False, tracing=False)
    yield cache
    cachescope.uninstall()


def run_fault(which: str, spec: str | list[str] | None, cache: InstrumentedCache | None = None,
              steps: int = STEPS) -> tuple[InstrumentedCache, Any, BaseException | None]:
    """Decode ``steps`` tokens on the ``neox`` or ``generic`` model with ``spec`` injected."""
    if cache is None:
        cache = cachescope.installed() or InstrumentedCache(metrics=False, tracing=False)
    error: BaseException | None = None
    handle = None
    if which == "neox":
        model: nn.Module = tiny_model()
        layers, prefix = model.layers, ""
        drive: Callable[[], Any] = lambda: generate(model, [1, 2, 3], steps, cache=cache)
    else:
        model = generic_model()
        layers, prefix = model, "layers."
        drive = lambda: generic_decode(model, cache, steps)
    with cachescope.watch(model, cache, prefix=prefix):
        try:
            if spec is None:
                drive()
            else:
                with inject(spec, layers, cache, model=model) as handle:
                    drive()
        except (IndexError, KeyError) as exc:
            error = exc
    return cache, handle, error


def observed(cache: InstrumentedCache, consumers: bool = True) -> list[tuple[Any, ...]]:
    return [(v.kind, v.step, v.consumer if consumers else None, v.producer) for v in cache.violations]


MODELS = ["neox", "generic"]


# ----------------------------------------------------------------------------- catalogue and parsing

def test_catalogue_names_docs_and_kinds() -> None:
    """FAULTS holds the six documented faults, each with a one-line doc and known expected kinds."""
    assert list(FAULTS) == ["swap", "skip", "repeat", "retry", "stale-state", "clear"]
    for name, spec in FAULTS.items():
        assert spec.name == name
        assert spec.doc and "\n" not in spec.doc
        assert spec.expected_kinds and set(spec.expected_kinds) <= set(KINDS)


def test_parse_fault_accepts_the_documented_syntax() -> None:
    """NAME, NAME@STEP and NAME@STEP:KEY=VALUE,... parse into Fault objects that print back the same."""
    assert parse_fault("swap") == Fault("swap", DEFAULT_STEP)
    assert parse_fault("swap@3") == Fault("swap", 3)
    f = parse_fault("swap@3:layer=1,other=2")
    assert (f.name, f.step, dict(f.params)) == ("swap", 3, {"layer": 1, "other": 2})
    assert str(f) == "swap@3:layer=1,other=2"
    assert parse_fault(" skip@2:layer=-1 ").params == {"layer": -1}
    assert parse_fault("stale_state@4").name == "stale-state"
    assert parse_fault("clear@2:queue=kv_{prev}").params == {"queue": "kv_{prev}"}
    assert parse_fault("retry:layer=2").step == DEFAULT_STEP
    assert parse_fault("repeat@0").expected_kinds == FAULTS["repeat"].expected_kinds


@pytest.mark.parametrize(("spec", "message"), [
    ("explode@3", "unknown fault 'explode'.*valid faults: swap, skip, repeat, retry, stale-state, clear"),
    ("swap@x", "bad step 'x'"),
    ("swap@-1", "bad step '-1'"),
    ("swap@", "bad step ''"),
    ("skip@2:layer", "bad parameter 'layer'"),
    ("skip@2:layer=one", "bad value 'one' for layer"),
    ("skip@2:depth=1", "fault skip has no parameter 'depth'; its parameters: layer"),
    ("stale-state@3:layer=1", "has no parameter 'layer'; its parameters: none"),
    ("swap@2:layer=1,other=1", "must differ"),
    ("skip@2:layer=1,layer=2", "given twice"),
    ("stale-state@0", "step must be >= 1"),
    ("clear@0", "step must be >= 1"),
    ("", "empty fault spec"),
    ("@3", "bad fault spec"),
])
def test_parse_fault_rejects_bad_specs_clearly(spec: str, message: str) -> None:
    """Unknown names, bad steps and bad parameters raise ValueError saying what is wrong."""
    with pytest.raises(ValueError, match=message):
        parse_fault(spec)


def test_fault_constructor_validates() -> None:
    """Fault(...) checks its name, step and parameter types like the parser does."""
    with pytest.raises(ValueError, match="valid faults"):
        Fault("nope")
    with pytest.raises(ValueError, match="step must be an int"):
        Fault("swap", "3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layer must be an int"):
        Fault("skip", 2, {"layer": "1"})


# ----------------------------------------------------------------------------- the mapping, per fault

@pytest.mark.parametrize("which", MODELS)
def test_clean_run_has_no_violations(which: str, installed: InstrumentedCache) -> None:
    """Without a fault (or with one whose step never comes) the checker reports nothing."""
    cache, _, error = run_fault(which, None)
    assert error is None and cache.violations == []
    cache2 = InstrumentedCache(metrics=False, tracing=False)
    cachescope.uninstall()
    cachescope.install(cache2)
    _, handle, error = run_fault(which, "swap@50", cache2)
    assert error is None and cache2.violations == []
    assert not handle.fired and [str(f) for f in handle.not_fired()] == ["swap@50:layer=0,other=1"]


@pytest.mark.parametrize("which", MODELS)
def test_swap(which: str, installed: InstrumentedCache) -> None:
    """swap@3 of layers 1 and 2: owner_mismatch both ways at step 3, and again at step 4."""
    cache, handle, error = run_fault(which, "swap@3:layer=1,other=2")
    assert error is None
    assert observed(cache) == [
        ("owner_mismatch", 3, L[2], L[1]), ("owner_mismatch", 3, L[1], L[2]),
        ("owner_mismatch", 4, L[1], L[2]), ("owner_mismatch", 4, L[2], L[1])]
    assert [(e.step, e.cache_step) for e in handle.events] == [(3, 3)]
    assert "order 0,2,1,3" in handle.events[0].what
    assert "layers ran in a different order" in cache.violations[0].hint
    assert f"{L[2]} ran in {L[1]}'s place" in cache.violations[1].hint


@pytest.mark.parametrize("which", MODELS)
def test_skip(which: str, installed: InstrumentedCache) -> None:
    """skip@2 of layer 1: later layers pop their predecessor's item and layer 3's item is left over
    at step 2; at step 3 layers 1-2 are off by one and layer 3 pops an empty queue."""
    cache, _, error = run_fault(which, "skip@2:layer=1")
    assert isinstance(error, IndexError)
    assert observed(cache) == [
        ("owner_mismatch", 2, L[2], L[1]), ("owner_mismatch", 2, L[3], L[2]),
        ("leftover", 2, None, L[3]),
        ("owner_mismatch", 3, L[1], L[2]), ("owner_mismatch", 3, L[2], L[3]),
        ("pop_empty", 3, L[3], None)]
    assert cache.violations[2].queue == "attn_kv_1"


@pytest.mark.parametrize("which", MODELS)
def test_skip_last_layer(which: str, installed: InstrumentedCache) -> None:
    """Skipping the last layer leaves its item behind, then that layer finds its queue empty."""
    cache, _, error = run_fault(which, "skip@2:layer=-1")
    assert isinstance(error, IndexError)
    assert observed(cache) == [("leftover", 2, None, L[3]), ("pop_empty", 3, L[3], None)]
    assert "never pushed to this queue" in cache.violations[1].hint


@pytest.mark.parametrize("which", MODELS)
def test_repeat(which: str, installed: InstrumentedCache) -> None:
    """repeat@2 of layer 1: its second run pops layer 2's item, and so on; layer 3 pops an empty queue."""
    cache, _, error = run_fault(which, "repeat@2:layer=1")
    assert isinstance(error, IndexError)
    assert observed(cache) == [
        ("owner_mismatch", 2, L[1], L[2]), ("owner_mismatch", 2, L[2], L[3]),
        ("pop_empty", 2, L[3], None)]
    assert "already popped this queue" in cache.violations[0].hint


@pytest.mark.parametrize("which", MODELS)
def test_retry(which: str, installed: InstrumentedCache) -> None:
    """retry@2 raising before layer 2: step_restarted when state_ids is set again, then the retried
    layers 0-1 pop the items of layers 2-3 and layer 2 finds the queue empty (the retry is step 3)."""
    cache, handle, error = run_fault(which, "retry@2:layer=2")
    assert isinstance(error, IndexError)
    assert observed(cache, consumers=False) == [
        ("step_restarted", 3, None, None),
        ("owner_mismatch", 3, None, L[2]), ("owner_mismatch", 3, None, L[3]),
        ("pop_empty", 3, None, None)]
    assert [v.consumer for v in cache.violations[1:]] == [L[0], L[1], L[2]]
    restarted = cache.violations[0]
    assert restarted.queue == "attn_kv_1" and "(1, 2)" in restarted.detail
    assert [e.step for e in handle.events] == [2]
    assert "step 3 is a retry of step 2" in cache.violations[1].hint


@pytest.mark.parametrize("which", MODELS)
def test_stale_state(which: str, installed: InstrumentedCache) -> None:
    """stale-state@2: the loop sets (0, 1) again: state_not_advanced, then layer 0 pops the drained queue."""
    cache, handle, error = run_fault(which, "stale-state@2")
    assert isinstance(error, IndexError)
    assert observed(cache) == [("state_not_advanced", 2, None, None), ("pop_empty", 2, L[0], None)]
    assert cache.violations[1].queue == "attn_kv_0"
    assert "(0, 1)" in handle.events[0].what and "(1, 2)" in handle.events[0].what
    assert handle.events[0].cache_step == 2


@pytest.mark.parametrize("which", MODELS)
def test_clear(which: str, installed: InstrumentedCache) -> None:
    """clear@2 before layer 1: layer 1's pop finds no queue (pop_missing); the hint says who cleared it."""
    cache, _, error = run_fault(which, "clear@2:layer=1")
    assert isinstance(error, KeyError)
    assert observed(cache) == [("pop_missing", 2, L[1], None)]
    v = cache.violations[0]
    assert v.queue == "attn_kv_1"
    assert "cleared by layers.1 " in v.hint and "faults.py" in v.hint
    assert "cleared by layers.1" in v.report()


@pytest.mark.parametrize("name", list(FAULTS))
def test_every_fault_produces_its_expected_kinds(name: str, installed: InstrumentedCache) -> None:
    """With default parameters at the default step each fault fires and produces its expected kinds."""
    cache, handle, _ = run_fault("neox", name)
    assert handle.fired
    assert set(FAULTS[name].expected_kinds) <= {v.kind for v in cache.violations}


# ----------------------------------------------------------------------------- mechanics

def test_everything_is_restored_on_exit_and_on_error(installed: InstrumentedCache) -> None:
    """After the block (also when it raises) the container, hooks, model.forward and cache.set are back."""
    model = tiny_model()
    modules = model.layers._modules
    hooks = [dict(layer._forward_pre_hooks) for layer in model.layers]
    for spec in ("swap@0", "retry@0", "clear@1", "stale-state@1"):
        with pytest.raises(RuntimeError, match="boom"):
            with inject(spec, model.layers, installed, model=model) as handle:
                installed.set("state_ids", (None, 0))
                assert spec != "swap@0" or model.layers._modules is not modules
                raise RuntimeError("boom")
        assert handle.events or spec != "swap@0"
        assert model.layers._modules is modules
        assert [dict(layer._forward_pre_hooks) for layer in model.layers] == hooks
        assert "forward" not in vars(model) and "set" not in vars(installed)
    assert [type(m).__name__ for m in model.layers] == ["TransformerLayer"] * 4


def test_order_is_changed_for_one_step_only(installed: InstrumentedCache) -> None:
    """A reordering applies to the faulty step and is undone at the next state_ids set."""
    model = generic_model(3)
    seen: list[list[int]] = []
    with inject("swap@1:layer=0,other=2", model, installed):
        for i in range(3):
            installed.set("state_ids", (None, i))
            seen.append([m.attention.index for m in model])
    assert seen == [[0, 1, 2], [2, 1, 0], [0, 1, 2]]


def test_loop_call_site_is_kept(installed: InstrumentedCache) -> None:
    """The set() wrapper keeps the decode loop's call site in the cache's op records."""
    model = generic_model()
    with cachescope.watch(model, installed, prefix="layers."):
        with inject("swap@1", model, installed):
            generic_decode(model, installed, 2)
    sets = [r for r in installed.timeline() if r.op == "set" and r.queue == "state_ids"]
    assert sets and all(r.site and r.site.endswith(f"test_faults.py:{_LOOP_SET_LINE}") for r in sets)


_LOOP_SET_LINE = generic_decode.__code__.co_firstlineno + 4


def test_works_on_a_plain_cache() -> None:
    """On the seed Cache steps are counted from state_ids sets: a swap changes the tokens, a skip crashes."""
    model = tiny_model()
    clean = generate(model, [1, 2, 3], STEPS, cache=Cache())
    cache = Cache()
    with inject("swap@1:layer=0,other=3", model.layers, cache) as handle:
        swapped = generate(model, [1, 2, 3], STEPS, cache=cache)
    assert handle.fired and handle.events[0].cache_step is None
    assert swapped != clean
    c = Cache()
    with pytest.raises(IndexError):
        with inject("skip@2", model.layers, c):
            generate(model, [1, 2, 3], STEPS, cache=c)


def test_several_faults_in_one_block(installed: InstrumentedCache) -> None:
    """Faults at different steps each fire once; faults at the same step compose."""
    cache, handle, error = run_fault("neox", ["swap@1:layer=0,other=1", "swap@4:layer=2,other=3"])
    assert error is None and handle.fired
    assert [(v.step, v.consumer) for v in cache.violations] == [
        (1, L[1]), (1, L[0]), (2, L[0]), (2, L[1]), (4, L[3]), (4, L[2]), (5, L[2]), (5, L[3])]
    model = generic_model()
    seen: list[list[int]] = []
    with inject(["swap@1:layer=0,other=1", "skip@1:layer=3", "repeat@1:layer=2"], model, installed):
        installed.set("state_ids", (None, 0))
        installed.set("state_ids", (0, 1))
        seen.append([m.attention.index for m in model])
    assert seen == [[1, 0, 2, 2]]


def test_retry_needs_a_runner() -> None:
    """retry on a ModuleList needs model=; an nn.Sequential runs itself."""
    model = tiny_model()
    with pytest.raises(ValueError, match="needs model="):
        with inject("retry@1", model.layers, Cache()):
            pass
    with inject("retry@1", generic_model(), Cache()):
        pass


def test_injected_fault_escapes_without_a_retry_wrapper(installed: InstrumentedCache) -> None:
    """Calling a layer container that is not the runner lets InjectedFault out, as a real failure would."""
    model = generic_model()
    outer = nn.Sequential(model)
    with inject("retry@0:layer=1", model, installed, model=outer):
        installed.set("state_ids", (None, 0))
        with pytest.raises(InjectedFault):
            model(torch.zeros(1, 1, 4))


def test_bad_layer_indices_and_containers() -> None:
    """Out-of-range layers and non-container arguments are refused before anything changes."""
    model = tiny_model()
    cache = Cache()
    with pytest.raises(ValueError, match="layer=7 is out of range.*0..3"):
        with inject("skip@1:layer=7", model.layers, cache):
            pass
    with pytest.raises(TypeError, match="nn.ModuleList or nn.Sequential"):
        with inject("skip@1", model, cache):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="no layer after layer 3"):
        with inject("swap@1:layer=3", model.layers, cache):
            pass
    assert "set" not in vars(cache)


def test_defaults_pick_layers_that_use_the_cache(installed: InstrumentedCache) -> None:
    """Without layer=, faults act on the container's cache-using layers (an embedding-like first child is skipped)."""
    model = nn.Sequential(nn.Identity(), *[Block(i) for i in range(3)])
    with inject(["swap@5", "skip@6", "retry@7", "clear@8"], model, installed) as handle:
        pass
    params = {f.name: dict(f.params) for f in handle.faults}
    assert params == {"swap": {"layer": 1, "other": 2}, "skip": {"layer": 1},
                      "retry": {"layer": 2}, "clear": {"layer": 2, "queue": "attn_kv_{prev}"}}


def test_strict_mode_stops_at_the_first_violation() -> None:
    """With strict=True the first violation a fault causes raises PopOrderError."""
    cache = InstrumentedCache(metrics=False, tracing=False, strict=True)
    cachescope.install(cache)
    try:
        with pytest.raises(cachescope.PopOrderError) as info:
            run_fault("neox", "swap@2:layer=1,other=2", cache)
    finally:
        cachescope.uninstall()
    assert info.value.violation.kind == "owner_mismatch"
    assert (info.value.violation.consumer, info.value.violation.producer) == (L[2], L[1])
