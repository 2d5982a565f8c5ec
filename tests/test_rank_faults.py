"""Tests for the rank faults of cachescope.faults: parsing and validation, ``inject(..., rank=)``
on a single-process model, and the decoder hooks of ``rank_hooks``.

Real multi-rank runs of these faults are tested with the parallel decoder (tests of
``cachescope.distributed``); here each rank's side is checked in one process.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import cachescope
from cachescope import KINDS, Cache, InstrumentedCache
from cachescope.faults import (FAULTS, RANK_FAULTS, Fault, RankHooks, check_ranks, inject,
                               parse_fault, rank_hooks)
from cachescope.neox import generate

from _loop import tiny_model

STEPS = 6
PROMPT = [1, 2, 3]


def decode(spec: str | list[str] | None, rank: int | None = None
           ) -> tuple[InstrumentedCache, Any, list[int], BaseException | None]:
    """Greedy decode of STEPS tokens with the tiny model, ``spec`` injected as this ``rank``."""
    model = tiny_model()
    cache = InstrumentedCache(metrics=False, tracing=False)
    tokens: list[int] = []
    error: BaseException | None = None
    handle = None
    with cachescope.watch(model, cache):
        try:
            if spec is None:
                tokens = generate(model, PROMPT, STEPS, cache=cache)
            else:
                with inject(spec, model.layers, cache, model=model, rank=rank) as handle:
                    tokens = generate(model, PROMPT, STEPS, cache=cache)
        except (IndexError, KeyError) as exc:
            error = exc
    return cache, handle, tokens, error


def observed(cache: InstrumentedCache) -> list[tuple[Any, ...]]:
    return [(v.kind, v.step, v.consumer, v.producer, v.queue) for v in cache.violations]


# ----------------------------------------------------------------------------- catalogue and parsing

def test_rank_catalogue() -> None:
    """RANK_FAULTS holds the five rank faults, each needing rank=, with known kinds; FAULTS is unchanged."""
    assert list(RANK_FAULTS) == ["rank-skip", "rank-retry", "rank-diverge", "rank-stall", "rank-exit"]
    assert list(FAULTS) == ["swap", "skip", "repeat", "retry", "stale-state", "clear"]
    for name, spec in RANK_FAULTS.items():
        assert spec.name == name and spec.doc and "\n" not in spec.doc
        assert "rank" in spec.required and spec.params["rank"][0] is int
        assert spec.expected_kinds and set(spec.expected_kinds) <= set(KINDS)
        assert spec.kinds_note
    assert RANK_FAULTS["rank-stall"].required == ("rank", "seconds")
    assert RANK_FAULTS["rank-diverge"].expected_kinds == ("rank_divergence",)
    assert RANK_FAULTS["rank-exit"].expected_kinds == ("rank_stalled",)
    assert "rank_divergence" in RANK_FAULTS["rank-skip"].expected_kinds
    assert "rank_stalled" in RANK_FAULTS["rank-retry"].expected_kinds


def test_parse_rank_faults() -> None:
    """The rank faults use the usual syntax; seconds= is a float; Fault.rank names the rank."""
    f = parse_fault("rank-skip@2:rank=1,layer=-1")
    assert (f.name, f.step, dict(f.params), f.rank) == ("rank-skip", 2, {"rank": 1, "layer": -1}, 1)
    assert str(f) == "rank-skip@2:rank=1,layer=-1"
    assert parse_fault("rank_diverge@0:rank=0") == Fault("rank-diverge", 0, {"rank": 0})
    stall = parse_fault("rank-stall@3:rank=1,seconds=2")
    assert stall.params == {"rank": 1, "seconds": 2.0} and type(stall.params["seconds"]) is float
    assert str(stall) == "rank-stall@3:rank=1,seconds=2.0"
    assert parse_fault(str(stall)) == stall
    assert parse_fault("rank-stall:rank=0,seconds=.25").params["seconds"] == 0.25
    assert parse_fault("rank-stall:rank=0,seconds=1e-3").params["seconds"] == 0.001
    assert parse_fault("rank-exit:rank=3").step == 2
    assert parse_fault("skip@2").rank is None


@pytest.mark.parametrize(("spec", "message"), [
    ("rank-skip@2", "fault rank-skip needs rank= (the rank it acts on, 0..world size - 1), e.g. "
                    "rank-skip@2:rank=1"),
    ("rank-stall@2:rank=1", "fault rank-stall needs seconds= (how long the rank stops, a number "
                            "of seconds > 0), e.g. rank-stall@2:rank=1,seconds=5"),
    ("rank-exit@2:rank=-1", "fault rank-exit: rank must be >= 0, got -1"),
    ("rank-diverge@2:rank=one", "bad value 'one' for rank in fault spec 'rank-diverge@2:rank=one': "
                                "expected a rank number"),
    ("rank-stall@2:rank=1,seconds=0", "fault rank-stall: seconds must be a positive finite number, "
                                      "got 0.0"),
    ("rank-stall@2:rank=1,seconds=-1.5", "fault rank-stall: seconds must be a positive finite "
                                         "number, got -1.5"),
    ("rank-stall@2:rank=1,seconds=inf", "bad value 'inf' for seconds in fault spec "
                                        "'rank-stall@2:rank=1,seconds=inf': expected a number, e.g. 2.5"),
    ("rank-stall@2:rank=1,seconds=2s", "bad value '2s' for seconds in fault spec "
                                       "'rank-stall@2:rank=1,seconds=2s': expected a number, e.g. 2.5"),
    ("rank-diverge@2:rank=1,layer=1", "fault rank-diverge has no parameter 'layer'; its parameters: rank"),
    ("rank-skip@2:rank=1,seconds=1", "fault rank-skip has no parameter 'seconds'; its parameters: "
                                     "rank, layer"),
    ("rank-crash@2:rank=1", "unknown fault 'rank-crash' in 'rank-crash@2:rank=1'; valid faults: swap, "
                            "skip, repeat, retry, stale-state, clear, rank-skip, rank-retry, "
                            "rank-diverge, rank-stall, rank-exit"),
])
def test_parse_rejects_bad_rank_specs(spec: str, message: str) -> None:
    """Missing or bad rank=/seconds= and unknown parameters raise ValueError with this exact message."""
    with pytest.raises(ValueError) as info:
        parse_fault(spec)
    assert str(info.value) == message


def test_fault_constructor_validates_rank_params() -> None:
    """Fault(...) checks rank and seconds like the parser; an int seconds is stored as a float."""
    assert Fault("rank-stall", 1, {"rank": 0, "seconds": 3}).params["seconds"] == 3.0
    bad = "fault rank-stall: seconds must be a positive finite number, got "
    for params, message in [
        ({"rank": 0, "seconds": float("nan")}, bad + "nan"),
        ({"rank": 0, "seconds": float("inf")}, bad + "inf"),
        ({"rank": 0, "seconds": "1"}, bad + "'1'"),
        ({"rank": 0, "seconds": True}, bad + "True"),
        ({"rank": True, "seconds": 1.0}, "fault rank-stall: rank must be an int, got True"),
        ({"seconds": 1.0}, "fault rank-stall needs rank= (the rank it acts on, 0..world size - 1), "
                           "e.g. rank-stall@2:rank=1,seconds=5"),
    ]:
        with pytest.raises(ValueError) as info:
            Fault("rank-stall", 1, params)
        assert str(info.value) == message


def test_check_ranks() -> None:
    """check_ranks accepts ranks below the world size, names the first one out of range, ignores FAULTS."""
    check_ranks(["rank-skip@2:rank=1", "rank-exit@3:rank=0", "swap@2"], 2)
    check_ranks([], 1)
    with pytest.raises(ValueError) as info:
        check_ranks(["rank-exit@3:rank=0", "rank-stall@1:rank=2,seconds=1"], 2)
    assert str(info.value) == ("fault rank-stall@1:rank=2,seconds=1.0: rank=2 is out of range for a "
                               "world of 2 rank(s) (valid: 0..1); pick a lower rank or launch more "
                               "(--nproc)")
    with pytest.raises(ValueError, match=r"^check_ranks\(\): world_size must be an int >= 1, got 0$"):
        check_ranks("rank-exit:rank=0", 0)


# ----------------------------------------------------------------------------- inject(rank=)

def test_rank_faults_need_a_rank() -> None:
    """inject() without rank= refuses any rank fault in one line, before changing anything."""
    model = tiny_model()
    cache = Cache()
    for spec in ("rank-skip@2:rank=1", "rank-exit@2:rank=0"):
        with pytest.raises(ValueError) as info:
            with inject(["swap@1", spec], model.layers, cache, model=model):
                pass
        assert str(info.value) == (f"fault {spec}: rank faults need a multi-rank run, e.g. "
                                   f"cachescope run --nproc 2 --fault {spec}")
        assert "set" not in vars(cache)
    with pytest.raises(ValueError) as info:
        with inject("rank-skip@2:rank=1", model.layers, cache, rank=-1):
            pass
    assert str(info.value) == "inject(): rank must be an int >= 0 (this process's global rank), got -1"


def test_rank_skip_fires_only_on_its_rank() -> None:
    """On rank 1, rank-skip@2:rank=1 gives exactly the violations of skip@2; on rank 0 it does nothing."""
    skip_cache, skip_handle, _, skip_error = decode("skip@2:layer=1")
    cache, handle, _, error = decode("rank-skip@2:rank=1,layer=1", rank=1)
    assert isinstance(error, IndexError) and isinstance(skip_error, IndexError)
    assert observed(cache) == observed(skip_cache) != []
    assert {v.kind for v in cache.violations} == {"leftover", "owner_mismatch", "pop_empty"}
    assert handle.fired and [str(e) for e in handle.events] == [
        "rank-skip@2:rank=1,layer=1 fired at step 2: " + skip_handle.events[0].what]

    _, _, clean, _ = decode(None)
    other, handle0, tokens, error = decode("rank-skip@2:rank=1,layer=1", rank=0)
    assert error is None and other.violations == [] and tokens == clean
    assert handle0.events == [] and handle0.active == () and handle0.fired
    assert handle0.not_fired() == [] and [str(f) for f in handle0.faults] == ["rank-skip@2:rank=1,layer=1"]


def test_rank_retry_fires_only_on_its_rank() -> None:
    """rank-retry on its rank gives the violations of retry (default layer resolved alike); elsewhere none."""
    retry_cache, retry_handle, _, _ = decode("retry@2")
    cache, handle, _, error = decode("rank-retry@2:rank=0", rank=0)
    assert isinstance(error, IndexError)
    assert observed(cache) == observed(retry_cache) != []
    assert handle.faults[0].params == {"rank": 0, "layer": retry_handle.faults[0].params["layer"]}
    assert [e.step for e in handle.events] == [2]
    other, _, _, error = decode("rank-retry@2:rank=0", rank=3)
    assert error is None and other.violations == []


def test_inject_leaves_hook_faults_and_other_ranks_alone() -> None:
    """Hook faults and other ranks' faults are kept in handle.faults but neither acted on nor 'not fired';
    a layer= that does not fit this rank's container is checked on its own rank only."""
    specs = ["rank-diverge@1:rank=0", "rank-stall@1:rank=0,seconds=9", "rank-exit@1:rank=0",
             "rank-skip@1:rank=1,layer=9", "swap@50"]
    model = tiny_model()
    with inject(specs, model.layers, Cache(), model=model, rank=0) as handle:
        pass
    assert [str(f) for f in handle.faults] == (
        [str(parse_fault(s)) for s in specs[:4]] + ["swap@50:layer=0,other=1"])
    assert [str(f) for f in handle.active] == ["swap@50:layer=0,other=1"]
    assert [str(f) for f in handle.not_fired()] == ["swap@50:layer=0,other=1"]
    with pytest.raises(ValueError, match=r"layer=9 is out of range for a container of 4 layers"):
        with inject(specs, model.layers, Cache(), model=model, rank=1):
            pass


def test_rank_retry_needs_a_runner() -> None:
    """rank-retry on its rank needs model= like retry; on another rank it does not."""
    model = tiny_model()
    with pytest.raises(ValueError, match="^the rank-retry fault needs model="):
        with inject("rank-retry@1:rank=1", model.layers, Cache(), rank=1):
            pass
    with inject("rank-retry@1:rank=1", model.layers, Cache(), rank=0):
        pass


# ----------------------------------------------------------------------------- rank_hooks

def test_hooks_take_this_ranks_hook_faults() -> None:
    """rank_hooks keeps only the hook faults of its rank; rank= and vocab_size= are checked."""
    specs = ["rank-diverge@1:rank=0", "rank-exit@2:rank=1", "rank-skip@1:rank=0", "swap@1"]
    hooks = rank_hooks(specs, rank=0, vocab_size=10)
    assert isinstance(hooks, RankHooks)
    assert [str(f) for f in hooks.faults] == ["rank-diverge@1:rank=0"]
    assert [str(f) for f in rank_hooks(specs, rank=1, vocab_size=10).faults] == ["rank-exit@2:rank=1"]
    assert rank_hooks(specs, rank=2, vocab_size=10).faults == ()
    with pytest.raises(ValueError) as info:
        rank_hooks(specs, rank=None, vocab_size=10)  # type: ignore[arg-type]
    assert str(info.value) == "rank_hooks(): rank must be an int >= 0 (this process's global rank), got None"
    with pytest.raises(ValueError) as info:
        rank_hooks(specs, rank=0, vocab_size=1)
    assert str(info.value) == ("rank_hooks(): vocab_size must be an int >= 2 (rank-diverge picks "
                               "another token id), got 1")


def test_diverge_changes_one_token_on_its_rank() -> None:
    """rank-diverge@3 changes the token of step 3 on its rank only, once, wrapping at vocab_size."""
    spec = "rank-diverge@3:rank=1"
    hooks = rank_hooks(spec, rank=1, vocab_size=50)
    assert [hooks.token(i, 49) for i in range(6)] == [49, 49, 49, 0, 49, 49]
    assert hooks.token(3, 7) == 7   # fired already
    assert [(str(e.fault), e.step, e.cache_step, e.what) for e in hooks.events] == [
        (spec, 3, None, "rank 1 continues with token 0 instead of 49 (its peers' token) after step 3")]
    assert hooks.fired and hooks.not_fired() == []
    peer = rank_hooks(spec, rank=0, vocab_size=50)
    assert [peer.token(i, 5) for i in range(6)] == [5] * 6 and peer.events == []
    assert all(peer.before_step(i) for i in range(6))


def test_exit_stops_its_rank_at_the_step() -> None:
    """rank-exit@2 makes before_step(2) return False on its rank only; an unreached step is not fired."""
    hooks = rank_hooks("rank-exit@2:rank=0", rank=0, vocab_size=8)
    assert [hooks.before_step(i) for i in range(2)] == [True, True]
    assert not hooks.fired and [str(f) for f in hooks.not_fired()] == ["rank-exit@2:rank=0"]
    assert hooks.before_step(2) is False
    assert [(e.step, e.what) for e in hooks.events] == [
        (2, "rank 0 ended its generation before step 2; its peers wait for it")]
    assert hooks.fired and hooks.before_step(3) is True
    peer = rank_hooks("rank-exit@2:rank=0", rank=1, vocab_size=8)
    assert all(peer.before_step(i) for i in range(4)) and peer.events == []


def test_stall_sleeps_before_its_step() -> None:
    """rank-stall@1 sleeps about `seconds` in before_step(1) on its rank, then lets the step run."""
    hooks = rank_hooks("rank-stall@1:rank=1,seconds=0.3", rank=1, vocab_size=8)
    t0 = time.monotonic()
    assert hooks.before_step(0) is True
    assert time.monotonic() - t0 < 0.1
    assert hooks.before_step(1) is True
    assert 0.3 <= time.monotonic() - t0 < 2.0
    [event] = hooks.events
    assert event.step == 1 and event.what.startswith("rank 1 stopped for 0.3")
    assert event.what.endswith("s before step 1 (before its state_ids set)")
    t1 = time.monotonic()
    assert rank_hooks("rank-stall@1:rank=1,seconds=5", rank=0, vocab_size=8).before_step(1) is True
    assert time.monotonic() - t1 < 0.1


def test_close_cuts_a_stall_short() -> None:
    """close() from another thread wakes a long stall at once; after it later stalls do not sleep."""
    hooks = rank_hooks(["rank-stall@0:rank=0,seconds=60", "rank-stall@1:rank=0,seconds=60"],
                       rank=0, vocab_size=8)
    timer = threading.Timer(0.2, hooks.close)
    timer.start()
    t0 = time.monotonic()
    try:
        assert hooks.before_step(0) is True
    finally:
        timer.cancel()
    assert 0.15 <= time.monotonic() - t0 < 10
    assert hooks.closed and "; cut short by close() (60 s asked)" in hooks.events[0].what
    t1 = time.monotonic()
    assert hooks.before_step(1) is True and time.monotonic() - t1 < 0.1
    assert len(hooks.events) == 2 and hooks.fired


def test_hooks_as_context_manager_and_composition() -> None:
    """A stall and an exit at one step: the rank sleeps, then exits; leaving `with` closes the hooks."""
    with rank_hooks(["rank-exit@1:rank=0", "rank-stall@1:rank=0,seconds=0.05"], rank=0,
                    vocab_size=8) as hooks:
        assert hooks.before_step(1) is False
        assert [str(e.fault) for e in hooks.events] == ["rank-stall@1:rank=0,seconds=0.05",
                                                        "rank-exit@1:rank=0"]
        assert not hooks.closed
    assert hooks.closed
    assert "RankHooks(rank=0" in repr(hooks)
