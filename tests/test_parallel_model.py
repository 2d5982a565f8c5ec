"""Tests for cachescope.neox.parallel: the reference NeoX split over real torch.distributed ranks.

Two launches of real ranks (gloo on 127.0.0.1, started by ``python -m torch.distributed.run``
through tests/_parallel_worker.py) run every multi-rank scenario: one of 2 ranks, one of 4. Each
rank decodes with its own InstrumentedCache and reports tokens, last-step logits, owners and
violations; the tests compare them with the single-process NeoXModel (and a Hugging Face model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from _parallel_worker import launch
from cachescope import InstrumentedCache
from cachescope._cache import Cache
from cachescope.neox import NeoXConfig, NeoXModel, generate, logits_for
from cachescope.neox.parallel import ParallelLayout, ParallelNeoX, parallel_generate

PROMPT = [1, 2, 3, 4, 5]
NEW = 6
SAMPLING = {"temperature": 0.8, "top_k": 50, "seed": 3}


def _scenario(name: str, tp: int, pp: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "tp": tp, "pp": pp, "prompt": PROMPT, "new_tokens": NEW, **extra}


def _hf_checkpoint(path: Path) -> tuple[Path, Any]:
    """A small GPTNeoXForCausalLM (3 layers, 4 heads, hidden 32) whose every parameter, biases
    and LayerNorms included, is random; saved to ``path``."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, rotary_pct=0.25, max_position_embeddings=64,
        use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * noise)
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The HF checkpoint folder and the HF model's greedy tokens and last-step logits."""
    path, model = _hf_checkpoint(tmp_path_factory.mktemp("hf") / "neox")
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return {"path": str(path), "tokens": ids[len(PROMPT):], "logits": logits}


@pytest.fixture(scope="module")
def two_ranks(hf: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """One launch of 2 ranks running every 2-rank scenario."""
    scenarios = [
        _scenario("tp2", 2, 1),
        _scenario("pp2_uneven", 1, 2, config={"num_layers": 5}),
        _scenario("pp2_no_cache", 1, 2, config={"num_layers": 3}, use_cache=False),
        _scenario("tp2_sampling", 2, 1, sampling=SAMPLING),
        _scenario("hf_tp2", 2, 1, hf=hf["path"]),
        _scenario("hf_pp2", 1, 2, hf=hf["path"]),
        _scenario("hooks", 1, 2, hooks={"stop_at": 4, "diverge": {"rank": 1, "step": 1, "token": 7}}),
        {"name": "world_mismatch", "tp": 2, "pp": 2, "expect_error": True},
        {"name": "heads_not_divisible", "tp": 2, "pp": 1, "expect_error": True,
         "config": {"num_heads": 1}},
    ]
    return launch(2, scenarios, tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def four_ranks(hf: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """One launch of 4 ranks running every 4-rank scenario."""
    scenarios = [
        _scenario("tp2pp2", 2, 2),
        _scenario("tp2pp2_uneven", 2, 2, config={"num_layers": 5}),
        _scenario("tp4", 4, 1),
        _scenario("pp4", 1, 4, config={"num_layers": 5}),
        _scenario("hf_tp2pp2", 2, 2, hf=hf["path"]),
    ]
    return launch(4, scenarios, tmp_path_factory.mktemp("four_ranks"))


def _reference(config: dict[str, Any], **sampling: Any) -> tuple[NeoXModel, list[int], torch.Tensor]:
    """The single-process model, its tokens and its last-step logits."""
    full = NeoXModel(NeoXConfig.preset("tiny", **config))
    tokens = generate(full, PROMPT, NEW, cache=Cache(), **sampling)
    return full, tokens, logits_for(full, PROMPT + tokens[:-1])[-1]


def _check_matches(results: dict[int, dict[str, Any]], name: str, tp: int, pp: int,
                   tokens: list[int], logits: torch.Tensor, num_layers: int) -> None:
    """Every rank of scenario ``name`` produced ``tokens``; the last stage's logits match;
    stages hold contiguous layer ranges covering the model, first stages the extra layer."""
    stages: dict[int, list[int]] = {}
    for rank, by_name in results.items():
        r = by_name[name]
        assert (r["tp_rank"], r["pp_rank"]) == (rank % tp, rank // tp)
        assert r["tokens"] == tokens, f"rank {rank} of {name}"
        assert r["generate_tokens"] == tokens, f"rank {rank} of {name} (parallel_generate)"
        if r["pp_rank"] == pp - 1:
            got = torch.tensor(r["logits"])
            assert torch.allclose(got, logits, atol=1e-4, rtol=0), \
                f"rank {rank} of {name}: max |diff| {float((got - logits).abs().max()):.2e}"
        else:
            assert r["logits"] is None
        assert stages.setdefault(r["pp_rank"], r["layer_range"]) == r["layer_range"]
    ranges = [stages[p] for p in range(pp)]
    assert sum(ranges, []) == list(range(num_layers))
    sizes = [len(x) for x in ranges]
    assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1


def _check_cache(results: dict[int, dict[str, Any]], name: str) -> None:
    """Each rank's cache recorded no violation, owners and producers carry the rank's GLOBAL
    layer indices, and the run removed what it put in the cache."""
    for rank, by_name in results.items():
        r = by_name[name]
        owners = [f"layers.{g}.attention" for g in r["layer_range"]]
        assert r["violations"] == [], f"rank {rank} of {name}"
        assert r["owners"] == sorted(owners), f"rank {rank} of {name}"
        assert r["producers"] == sorted(owners), f"rank {rank} of {name}"
        assert r["hooked"] == sorted(owners), f"rank {rank} of {name}"
        assert r["pushes"] == len(owners) * NEW    # one push per local layer and step
        assert r["leftover"] == [], f"rank {rank} of {name}"


@pytest.mark.parametrize("name,tp,pp,config", [
    ("tp2", 2, 1, {}),
    ("pp2_uneven", 1, 2, {"num_layers": 5}),
    ("pp2_no_cache", 1, 2, {"num_layers": 3}),
])
def test_two_ranks_match_single_process(two_ranks: dict[int, dict[str, Any]], name: str, tp: int,
                                        pp: int, config: dict[str, Any]) -> None:
    """TP=2 and PP=2 (uneven 3/2 split; also without the cache) decode the single-process
    model's greedy tokens, with its last-step logits within 1e-4."""
    _, tokens, logits = _reference(config)
    _check_matches(two_ranks, name, tp, pp, tokens, logits, NeoXConfig.preset("tiny", **config).num_layers)
    if name != "pp2_no_cache":
        _check_cache(two_ranks, name)


def test_tensor_parallel_shards_weights(two_ranks: dict[int, dict[str, Any]]) -> None:
    """Under TP=2 each rank holds fewer parameters than the full model (its heads and MLP columns)."""
    full = sum(p.numel() for p in NeoXModel(NeoXConfig.preset("tiny")).parameters())
    assert all(two_ranks[r]["tp2"]["params"] < full for r in (0, 1))


def test_sampling_matches_single_process(two_ranks: dict[int, dict[str, Any]]) -> None:
    """Seeded temperature/top-k sampling under TP=2 picks the single-process model's tokens."""
    _, tokens, logits = _reference({}, **SAMPLING)
    _check_matches(two_ranks, "tp2_sampling", 2, 1, tokens, logits, 4)


@pytest.mark.parametrize("name,tp,pp", [("hf_tp2", 2, 1), ("hf_pp2", 1, 2)])
def test_hf_checkpoint_sharded(two_ranks: dict[int, dict[str, Any]], hf: dict[str, Any], name: str,
                               tp: int, pp: int) -> None:
    """An HF checkpoint loaded sharded (TP=2; PP=2 over 3 layers) gives the HF model's greedy
    tokens and last-step logits."""
    _check_matches(two_ranks, name, tp, pp, hf["tokens"], hf["logits"], 3)
    _check_cache(two_ranks, name)


def test_hooks_and_rank_check(two_ranks: dict[int, dict[str, Any]]) -> None:
    """hooks.before_step returning False stops the run on every rank at that step; hooks.token's
    result is what that rank continues with (its next input); rank_check.note_inputs gets each
    step's input ids right after state_ids is set."""
    _, reference, _ = _reference({})
    expected = reference[:4]
    diverged = expected[:1] + [7] + expected[2:]
    for rank in (0, 1):
        r = two_ranks[rank]["hooks"]
        assert r["stopped"]
        assert r["tokens"] == (diverged if rank == 1 else expected), f"rank {rank}"
        assert r["generate_tokens"] == r["tokens"], f"rank {rank}"
        calls = r["hook_calls"]
        assert [c for c in calls if c[0] == "before_step"] == [["before_step", s] for s in range(5)]
        assert [c for c in calls if c[0] == "token"] == [["token", s, expected[s]] for s in range(4)]
        own = r["tokens"]
        assert r["notes"] == [[PROMPT, [None, 0]]] + [[[own[s - 1]], [s - 1, s]] for s in range(1, 4)]
        assert r["violations"] == [] and r["leftover"] == []


def test_world_size_mismatch_is_a_clear_error(two_ranks: dict[int, dict[str, Any]]) -> None:
    """tp * pp != world size: from_env raises a ValueError naming the invariant, the values and
    the fix, on every rank."""
    for rank in (0, 1):
        message = two_ranks[rank]["world_mismatch"]["error"]
        assert message is not None
        assert "tp * pp must equal the world size" in message
        assert "tp=2 x pp=2 = 4" in message and "2 ranks" in message
        assert "--nproc_per_node 4" in message


def test_heads_not_divisible_is_a_clear_error(two_ranks: dict[int, dict[str, Any]]) -> None:
    """tp not dividing num_heads: building the model raises a ValueError on every rank (before any
    collective), naming num_heads, tp and the valid choices."""
    for rank in (0, 1):
        message = two_ranks[rank]["heads_not_divisible"]["error"]
        assert message is not None
        assert "tp must divide num_heads" in message
        assert "num_heads=1" in message and "tp=2" in message and "choose tp among 1" in message


@pytest.mark.parametrize("name,tp,pp,config", [
    ("tp2pp2", 2, 2, {}),
    ("tp2pp2_uneven", 2, 2, {"num_layers": 5}),
    ("tp4", 4, 1, {}),
    ("pp4", 1, 4, {"num_layers": 5}),
])
def test_four_ranks_match_single_process(four_ranks: dict[int, dict[str, Any]], name: str, tp: int,
                                         pp: int, config: dict[str, Any]) -> None:
    """TP=2 x PP=2 (even and uneven), TP=4 and PP=4 decode the single-process model's greedy
    tokens with its logits; every rank's cache is clean and names global layers."""
    _, tokens, logits = _reference(config)
    _check_matches(four_ranks, name, tp, pp, tokens, logits, NeoXConfig.preset("tiny", **config).num_layers)
    _check_cache(four_ranks, name)


def test_hf_checkpoint_tp2_pp2(four_ranks: dict[int, dict[str, Any]], hf: dict[str, Any]) -> None:
    """An HF checkpoint loaded over TP=2 x PP=2 gives the HF model's greedy tokens and logits."""
    _check_matches(four_ranks, "hf_tp2pp2", 2, 2, hf["tokens"], hf["logits"], 3)
    _check_cache(four_ranks, "hf_tp2pp2")


# -- in-process: no process group needed ----------------------------------------------------------


def test_layout_arithmetic() -> None:
    """Ranks map to (pp_rank, tp_rank) as rank = pp_rank * tp + tp_rank; stages get contiguous
    layer ranges, the first stages the extra layer; neighbours and the token source follow."""
    layouts = [ParallelLayout(tp=2, pp=3, rank=r) for r in range(6)]
    assert [(x.pp_rank, x.tp_rank) for x in layouts] == [(p, t) for p in range(3) for t in range(2)]
    assert [x.world_size for x in layouts] == [6] * 6
    assert [list(layouts[2 * p].stage_layers(8)) for p in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [list(layouts[0].stage_layers(5, p)) for p in range(3)] == [[0, 1], [2, 3], [4]]
    assert [(x.prev_rank, x.next_rank) for x in layouts[2:4]] == [(0, 4), (1, 5)]
    assert layouts[0].prev_rank is None and layouts[5].next_rank is None
    assert {x.token_src for x in layouts} == {4}
    assert layouts[3].global_rank(2, 1) == 5
    with pytest.raises(ValueError, match=r"rank must be an int in 0\.\.5"):
        ParallelLayout(tp=2, pp=3, rank=6)
    with pytest.raises(ValueError, match="tp must be a positive int"):
        ParallelLayout(tp=0, pp=1, rank=0)


@pytest.mark.parametrize("tp,pp,config,message", [
    (2, 1, {"num_heads": 1}, "tp must divide num_heads, got num_heads=1; choose tp among 1"),
    (2, 1, {"intermediate_size": 255}, "intermediate_size evenly over the tp=2 ranks of a stage, "
                                       "got intermediate_size=255; choose tp among 1"),
    (1, 2, {"num_layers": 1}, "each of the 2 pipeline stages needs at least one layer, but the "
                              "model has num_layers=1; choose pp <= 1"),
])
def test_layouts_the_model_cannot_use(tp: int, pp: int, config: dict[str, Any], message: str) -> None:
    """A config the layout cannot split is refused when the model is built, before any weight is
    made or any collective runs, with the invariant, the values and the fix."""
    with pytest.raises(ValueError) as info:
        ParallelNeoX.from_config(NeoXConfig.preset("tiny", **config), ParallelLayout(tp, pp, 0))
    assert message in str(info.value)


def test_from_env_needs_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """ParallelLayout.from_env without an initialised process group says to call
    init_process_group first."""
    # as if no process group existed, whatever other tests of the session did in this process
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match=r"call dist\.init_process_group"):
        ParallelLayout.from_env(tp=1, pp=1)


def test_single_rank_layout_matches_generate() -> None:
    """A 1 x 1 layout runs without any process group and equals generate(), owners included;
    the shard shares no storage with the full model it was copied from."""
    full = NeoXModel(NeoXConfig.preset("tiny"))
    model = ParallelNeoX.from_full(full, ParallelLayout(1, 1, 0))
    cache = InstrumentedCache(metrics=False, tracing=False)
    with model.watch(cache) as handle:
        assert handle.hooked == [f"layers.{g}.attention" for g in range(4)]
        tokens = parallel_generate(model, PROMPT, NEW, cache=cache)
    assert tokens == generate(full, PROMPT, NEW, cache=Cache())
    full_storages = {p.untyped_storage().data_ptr() for p in full.parameters()}
    assert not any(p.untyped_storage().data_ptr() in full_storages for p in model.parameters())
    assert cache.violations == []
    assert {r.owner for r in cache.timeline() if r.op == "push"} == {f"layers.{g}.attention" for g in range(4)}
    assert handle.hooked == []   # removed on leaving the with block
