"""The cross-rank checker (cachescope.distributed): fingerprints, comparison, and real ranks.

The end-to-end tests start real ranks with torch's launcher (gloo on 127.0.0.1) running
tests/_rank_worker.py: every rank decodes the same sequence with the reference NeoX and one
all_reduce per step; one rank is broken the way each rank fault breaks it.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch.distributed as dist

from _torchrun import torchrun

import cachescope
import cachescope.distributed as csd
from cachescope import OpRecord

WORKER = Path(__file__).with_name("_rank_worker.py")


# ----------------------------------------------------------------------------- pure functions

def _rec(seq: int, op: str, queue: str, owner: str | None, nbytes: int = 0) -> OpRecord:
    return OpRecord(seq, 0.0, 1, op, queue, "attn_kv", owner, "model.py:1", None, nbytes,
                    nbytes, None, None)


def _fp(owners: list[str], *, step: int = 3, ids: tuple = (2, 3), inputs: str | None = "aa",
        kv: int = 7, rank: int = 0) -> dict:
    recs = [_rec(1, "set", "state_ids", None)]
    for i, o in enumerate(owners):
        recs.append(_rec(2 * i + 2, "pop", "attn_kv_2", o))
        recs.append(_rec(2 * i + 3, "push", "attn_kv_3", o, 100))
    lengths = [kv] * len(owners)
    return csd.step_fingerprint(recs, step=step, state_ids=ids, inputs_digest=inputs,
                                kv_lengths=lengths, rank=rank)


LAYERS = ["layers.0.attention", "layers.1.attention", "layers.2.attention"]


def test_identical_fingerprints_agree():
    fps = {r: _fp(LAYERS, rank=r) for r in range(4)}
    assert csd.compare_step(fps, tp=2, pp=2) == []
    assert fps[0]["d"] == fps[1]["d"] and fps[0]["n"] == 7 and fps[0]["kv"] == "7"


def test_majority_blames_only_the_odd_rank_and_names_the_skipped_layer():
    fps = {r: _fp(LAYERS, rank=r) for r in range(3)}
    fps[2] = _fp([LAYERS[0], LAYERS[2]], rank=2)
    (v,) = csd.compare_step(fps, tp=3, pp=1)
    assert (v.kind, v.rank, v.peer, v.step) == ("rank_divergence", 2, 0, 3)
    assert v.queue == "attn_kv_2" and v.consumer == LAYERS[2] and v.producer == LAYERS[1]
    assert "rank 2 skipped layers.1.attention at step 3" in v.hint
    report = v.report()
    assert "rank 2" in report and "Rank 0's step 3" in report and "Rank 2's step 3" in report
    assert "no majority" not in v.detail


def test_a_tie_reports_both_sides():
    fps = {0: _fp(LAYERS, inputs="aa"), 1: _fp(LAYERS, inputs="bb", rank=1)}
    vs = csd.compare_step(fps, tp=2)
    assert sorted((v.rank, v.peer) for v in vs) == [(0, 1), (1, 0)]
    assert all(v.queue == "<inputs>" and "no majority" in v.detail for v in vs)
    assert "continued with different tokens after step 2" in vs[0].hint


def test_sampled_token_divergence_hint_with_a_majority():
    fps = {r: _fp(LAYERS, inputs="aa", rank=r) for r in range(4)}
    fps[1] = _fp(LAYERS, inputs="bb", rank=1)
    (v,) = csd.compare_step(fps, tp=2, pp=2)
    assert v.rank == 1 and "rank 1 sampled a different token at step 2" in v.hint


def test_pipeline_stages_compare_state_ids_kv_and_inputs_not_owners():
    # stage 0 (ranks 0, 1) holds layers 0-1, stage 1 (ranks 2, 3) layer 2: owners differ by design
    fps = {0: _fp(LAYERS[:2]), 1: _fp(LAYERS[:2], rank=1), 2: _fp(LAYERS[2:], rank=2),
           3: _fp(LAYERS[2:], rank=3)}
    assert csd.compare_step(fps, tp=2, pp=2) == []
    fps[3] = _fp(LAYERS[2:], ids=(3, 4), rank=3)          # rank 3 counts steps differently
    (v,) = csd.compare_step(fps, tp=2, pp=2)
    assert v.rank == 3 and v.queue == "state_ids" and "retried or restarted" in v.hint
    fps[3] = _fp(LAYERS[2:], kv=8, rank=3)                # rank 3 holds one more position
    (v,) = csd.compare_step(fps, tp=2, pp=2)
    assert v.rank == 3 and "kv length(s) 8" in v.detail


def test_repeated_layer_and_reorder_hints():
    base = {r: _fp(LAYERS, rank=r) for r in range(3)}
    base[1] = _fp([LAYERS[0], LAYERS[1], LAYERS[1], LAYERS[2]], rank=1)
    (v,) = csd.compare_step(base, tp=3)
    assert "rank 1 ran again layers.1.attention" in v.hint
    base[1] = _fp([LAYERS[1], LAYERS[0], LAYERS[2]], rank=1)
    (v,) = csd.compare_step(base, tp=3)
    assert "another order" in v.hint


def test_kv_length_and_inputs_digest():
    import torch
    k = torch.zeros(1, 2, 9, 4)
    assert csd.kv_length((k, k)) == 9 and csd.kv_length([[k]]) == 9
    assert csd.kv_length(object()) is None and csd.kv_length(()) is None
    assert csd.inputs_digest([1, 2]) == csd.inputs_digest((1, 2)) != csd.inputs_digest([2, 1])
    assert len(csd.inputs_digest([1])) == 16


# ----------------------------------------------------------------------------- in one process

@pytest.fixture
def world_of_one(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield store
    finally:
        dist.destroy_process_group()


def test_attach_needs_a_process_group_and_a_consistent_layout(tmp_path):
    cache = cachescope.InstrumentedCache(metrics=False, tracing=False)
    with pytest.raises(ValueError, match="init_process_group"):
        csd.attach(cache)
    store = dist.FileStore(str(tmp_path / "s"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"tp=2 x pp=1 = 2, but the group has 1 rank"):
            csd.attach(cache, tp=2, store=store)
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            csd.attach(cache, every=0, store=store)
        with pytest.raises(TypeError, match="InstrumentedCache"):
            csd.attach(cachescope.Cache(), store=store)
    finally:
        dist.destroy_process_group()


def test_a_single_rank_publishes_fingerprints_and_stays_clean(world_of_one):
    from cachescope.neox import NeoXConfig, NeoXModel, generate
    model = NeoXModel(NeoXConfig.preset("tiny", num_layers=2))
    cache = cachescope.InstrumentedCache(metrics=False, tracing=False)
    watch = cachescope.watch(model, cache)
    with csd.attach(cache, store=world_of_one, stall_timeout=1.0) as check:
        generate(model, [1, 2, 3, 4, 5, 6, 7, 8], 4, cache=cache)
        watch.remove()
        assert check.flush(timeout=5)
        fp = json.loads(check.store.get("fp/1/2/0"))
    assert fp["s"] == 2 and fp["ids"] == "(1, 2)" and fp["kv"] == "10"
    assert [o[0] for o in csd.fingerprint_ops(fp)][:3] == ["set", "pop", "push"]
    assert check.violations == [] and cache.violations == []
    assert check not in cache.sinks


# ----------------------------------------------------------------------------- real ranks

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, nproc: int, *scenario: str, env: dict | None = None,
            timeout: float = 90) -> dict[int, dict]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    args = ["--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
            str(_free_port()), str(WORKER), str(out), *scenario]
    full_env = dict(os.environ, RANKCHECK_STALL_TIMEOUT="2", PYTHONPATH=str(WORKER.parent.parent),
                    **(env or {}))
    _code, text = torchrun(args, env=full_env, timeout=timeout)
    if os.environ.get("RANKCHECK_SHOW"):
        print(text)
    results = {}
    for r in range(nproc):
        path = out / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no result; launcher output:\n{text[-4000:]}"
        results[r] = json.loads(path.read_text())
    return results


def _kinds(result: dict) -> list[tuple[str, int, int]]:
    return [(v["kind"], v["step"], v["rank"]) for v in result["violations"]]


def test_clean_ranks_agree(tmp_path):
    res = _launch(tmp_path, 2, "clean")
    assert res[0]["tokens"] == res[1]["tokens"] and len(res[0]["tokens"]) == 6
    assert _kinds(res[0]) == [] and _kinds(res[1]) == []


def test_a_rank_that_samples_another_token_is_named_by_the_majority(tmp_path):
    res = _launch(tmp_path, 3, "diverge", "2", "1")
    assert _kinds(res[1]) == [("rank_divergence", 3, 1)]
    assert _kinds(res[0]) == [] and _kinds(res[2]) == []
    (v,) = res[1]["violations"]
    assert "rank 1 sampled a different token at step 2" in v["hint"]
    assert "Rank 0's step 3" in v["report"] and "Rank 1's step 3" in v["report"]


def test_a_rank_that_skips_a_layer_diverges_at_that_step(tmp_path):
    res = _launch(tmp_path, 2, "skip", "2", "1")
    kinds1 = _kinds(res[1])
    assert ("rank_divergence", 2, 1) in kinds1 and ("leftover", 2, 1) in kinds1
    (v,) = [v for v in res[1]["violations"] if v["kind"] == "rank_divergence"]
    assert v["queue"] == "attn_kv_1" and v["consumer"] == "layers.2.attention"
    assert v["producer"] == "layers.1.attention"


def test_a_stalled_rank_is_named_within_the_timeout(tmp_path):
    import time
    t0 = time.monotonic()
    res = _launch(tmp_path, 2, "stall", "3", "1", "30")
    assert time.monotonic() - t0 < 25, "the run waited for the stalled rank instead of ending"
    for r in (0, 1):
        assert ("rank_stalled", 3, 1) in _kinds(res[r]), res[r]["violations"]
    (v,) = [v for v in res[0]["violations"] if v["kind"] == "rank_stalled"]
    assert "rank 1 has not reached step 3" in v["detail"] and "seen by rank 0" in v["detail"]
    assert "Rank 1's last cache op: push 'attn_kv_2' by layers.2.attention" in v["report"]


def test_a_rank_that_ends_early_is_reported_at_once(tmp_path):
    res = _launch(tmp_path, 2, "exit", "3", "1")
    assert ("rank_stalled", 3, 1) in _kinds(res[0])
    (v,) = [v for v in res[0]["violations"] if v["kind"] == "rank_stalled"]
    assert "rank 1 ended generation 1 after step 2 while its peers reached step 3" in v["detail"]
    assert "finished early" in v["hint"]


def test_a_retried_step_on_one_rank(tmp_path):
    res = _launch(tmp_path, 2, "retry", "2", "1")
    kinds1 = _kinds(res[1])
    assert ("step_restarted", 3, 1) in kinds1
    stalled = [k for r in (0, 1) for k in _kinds(res[r]) if k[0] == "rank_stalled"]
    assert stalled and all(k[2] == 1 for k in stalled), stalled


def test_sampling_every_k_steps(tmp_path):
    res = _launch(tmp_path, 2, "diverge", "2", "1", env={"RANKCHECK_EVERY": "2"})
    # step 3 (the first with other inputs) is not checked; step 4 is
    assert ("rank_divergence", 4, 1) in _kinds(res[1])


def test_two_ranks_with_different_layers_get_one_symmetric_hint():
    fps = {0: _fp(LAYERS), 1: _fp([LAYERS[0], LAYERS[2]], rank=1)}
    vs = csd.compare_step(fps, tp=2)
    assert sorted(v.rank for v in vs) == [0, 1]
    for v in vs:
        assert ("rank 0 ran layers.1.attention more often than rank 1 at step 3: rank 1 skipped "
                "it or rank 0 repeated or retried it") in v.hint


def test_fingerprints_are_strings_and_read_back():
    recs = [_rec(1, "set", "state_ids", None), _rec(2, "pop", "q\x1fodd\x1ename", "a.b"),
            _rec(3, "push", "attn_kv_3", None, 64)]
    fp = csd.step_fingerprint(recs, step=1, state_ids=(0, 1), kv_lengths=[None])
    # only str / int / None values: peers' fingerprints cost the cyclic GC one dict each
    assert all(v is None or type(v) in (str, int, float) for v in fp.values())
    assert csd.fingerprint_ops(fp) == [
        ("set", "state_ids", None, "model.py:1", None),
        ("pop", "q odd name", "a.b", "model.py:1", None),
        ("push", "attn_kv_3", None, "model.py:1", "64B")]
    assert fp["kv"] == "64B" and fp["n"] == 3


def test_two_checkers_in_one_process_do_not_share_keys(world_of_one):
    a = csd.attach(cachescope.InstrumentedCache(metrics=False, tracing=False), store=world_of_one)
    b = csd.attach(cachescope.InstrumentedCache(metrics=False, tracing=False), store=world_of_one)
    try:
        a.store.set("probe", "1")
        assert a.store.check(["probe"]) and not b.store.check(["probe"])
    finally:
        a.detach()
        b.detach()


def test_ranks_idle_together_then_one_moves_first_is_no_stall(tmp_path):
    """Between two generations every rank idles longer than the stall timeout; rank 0 starts
    the next one first. Nobody was behind for the timeout: no rank_stalled (a rank's idle time
    before its peers moved on does not count)."""
    res = _launch(tmp_path, 2, "idle")
    assert _kinds(res[0]) == [] and _kinds(res[1]) == []
    assert res[0]["tokens"] == res[1]["tokens"] and len(res[0]["tokens"]) == 6


def test_a_hung_launch_is_killed_whole(tmp_path):
    """A launch that never ends (rank 1 sleeps, no stall timeout to end it) is killed at the
    test's timeout, ranks included: torch's launcher puts each rank in a session of its own, so
    killing the launcher's process group alone would leave them running."""
    import time

    from _multirank_helpers import _no_leftovers
    out = tmp_path / "hung"
    out.mkdir()
    args = ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
            str(_free_port()), str(WORKER), str(out), "stall", "1", "1", "600"]
    env = dict(os.environ, RANKCHECK_STALL_TIMEOUT="600", PYTHONPATH=str(WORKER.parent.parent))
    t0 = time.monotonic()
    code, _text = torchrun(args, env=env, timeout=15)
    assert code is None and time.monotonic() - t0 < 60
    assert _no_leftovers(str(out)) == []
