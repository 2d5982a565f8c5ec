"""cachescope.testing.run_ranks and the cachescope_ranks fixture, on real gloo ranks started by
torch's elastic launcher: what the ranks recorded comes back, a rank that raises or hangs ends
the run with a message naming it, and strict mode fails a test on a rank's violation.

Each launch costs seconds (every rank is a new process that imports torch): the tests share
launches between assertions, and the pytest-plugin test runs the docs' example as it is written.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import re
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import cachescope
from cachescope.neox import NeoXConfig, NeoXModel
from cachescope.testing import RankFailed, RankResults, RanksTimedOut, run_ranks

from _helpers import plugin_autoloaded

pytest_plugins = ["pytester"]

# The ranks here break on purpose and the tests assert each violation themselves; the launch the
# module shares (``diverged``) must not fail whichever test happens to set it up.
pytestmark = pytest.mark.cachescope(strict=False)

REPO = Path(__file__).resolve().parents[1]
PLUGIN = [] if plugin_autoloaded() else ["-p", "cachescope.pytest_plugin"]
FAST = ["-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio"]


# ----------------------------------------------------------------------------- rank functions
# Module level: each rank is a new process that imports this module and finds them by name.

def decode(ctx, odd_rank: int | None = None, *, pick_at: int | None = None,
           raise_at: int | None = None) -> dict:
    """Every rank decodes the same prompt with the same tiny model, one all_reduce per step (the
    ranks are TP peers that must agree). ``odd_rank`` picks another token at ``pick_at`` or
    raises at ``raise_at``."""
    odd = ctx.rank == odd_rank
    model = NeoXModel(NeoXConfig.preset("tiny", num_layers=2))
    for p in model.parameters():     # also syncs the ranks before the loop, like real set-up code
        dist.broadcast(p.data, src=0)
    ctx.watch(model)
    cache, prompt, tokens = ctx.cache, [5, 9, 2, 7], []
    with torch.no_grad(), cache.generation():
        cache.set("use_cache", True)
        for i in range(5):
            if odd and i == raise_at:
                raise ValueError(f"rank {ctx.rank} cannot go on")
            cache.set("state_ids", (None, 0) if i == 0 else (i - 1, i))
            ids = prompt if i == 0 else tokens[-1:]
            ctx.check.note_inputs(ids)
            logits = model(torch.tensor([ids]))[0, -1]
            dist.all_reduce(torch.zeros(1))
            token = int(logits.argmax())
            if odd and i == pick_at:
                token += 1
            tokens.append(token)
            cache.end_step(tokens=1)
    print(f"rank {ctx.rank} done")
    return {"rank": ctx.rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank,
            "world_size": ctx.world_size, "tokens": tokens, "cache": ctx.cache.name,
            "installed": cachescope.installed() is ctx.cache}


@pytest.fixture(autouse=True)
def _no_leftovers():
    """No rank process outlives a test, and the host's singleton is untouched."""
    before = cachescope.installed()
    yield
    assert multiprocessing.active_children() == []
    assert cachescope.installed() is before


# ----------------------------------------------------------------------------- before launching

def test_bad_layouts_and_functions_are_refused_before_anything_starts():
    """A layout that does not fit nproc, or a fn/args the ranks cannot import, fail at once."""
    with pytest.raises(ValueError, match=r"tp=2 x pp=1 = 2, but nproc=3"):
        run_ranks(decode, 3, tp=2)
    with pytest.raises(ValueError, match=r"pp=2 pipeline stages do not divide nproc=3"):
        run_ranks(decode, 3, pp=2)
    with pytest.raises(TypeError, match=r"must be a module-level function"):
        run_ranks(lambda ctx: None, 2)
    with pytest.raises(TypeError, match=r"cannot send args or cache_options"):
        run_ranks(decode, 2, args=(lambda: 1,))
    with pytest.raises(ValueError, match=r"timeout must be a positive number"):
        run_ranks(decode, 2, timeout=0)


# ----------------------------------------------------------------------------- real ranks

@pytest.fixture(scope="module")
def diverged() -> RankResults:
    """One launch of 3 ranks in which rank 1 picks another token at step 2 (a partial of a
    module-level function pickles by reference too)."""
    return run_ranks(functools.partial(decode, pick_at=2), 3, args=(1,), stall_timeout=30.0,
                     echo=False)


def test_each_rank_gets_its_layout_and_an_installed_cache(diverged):
    """fn sees its rank, layout and isolated installed cache; returns and output come back."""
    assert [r["rank"] for r in diverged.returns] == [0, 1, 2]
    assert [(r["tp_rank"], r["pp_rank"], r["world_size"]) for r in diverged.returns] == \
        [(0, 0, 3), (1, 0, 3), (2, 0, 3)]
    assert [r["cache"] for r in diverged.returns] == ["rank0", "rank1", "rank2"]
    assert all(r["installed"] for r in diverged.returns)
    assert all(f"rank {r} done" in diverged.output[r] for r in range(3))
    assert diverged.steps == {0: 4, 1: 4, 2: 4}


def test_a_rank_that_picks_another_token_is_named_by_the_majority(diverged):
    """Rank 1's other token makes its step-3 inputs differ: one rank_divergence, on rank 1 only."""
    tokens = [r["tokens"] for r in diverged.returns]
    assert tokens[0] == tokens[2] and tokens[0][:2] == tokens[1][:2] != tokens[0][2:3] != tokens[1][2:3]
    assert [(v.kind, v.rank, v.step) for v in diverged.violations] == [("rank_divergence", 1, 3)]
    assert diverged.by_rank[0] == [] and diverged.by_rank[2] == []
    (v,) = diverged.by_rank[1]
    assert v.reported_by == (1,) and v.cache == "rank1" and v.queue == "<inputs>"
    assert "rank 1 sampled a different token at step 2" in v.hint
    assert "Rank 0's step 3" in v.report() and "Rank 1's step 3" in v.report()


def test_assertions_on_rank_violations(diverged):
    """assert_no_violations shows the reports; assert_violation matches, then counts as expected."""
    with pytest.raises(AssertionError) as info:
        diverged.assert_no_violations()
    text = str(info.value)
    assert text.startswith("the 3 rank(s) recorded 1 violation(s) (rank_divergence x1); expected none.")
    assert "A rank_divergence means ranks that decode one sequence disagreed" in text
    assert "cachescope: rank_divergence on queue '<inputs>'" in text and "Rank 1's step 3" in text
    with pytest.raises(AssertionError, match=r"expected a rank_divergence on rank 1 at step 2, but "
                                             r"the 3 rank\(s\) recorded: rank_divergence on rank 1 "
                                             r"at step 3\."):
        diverged.assert_violation("rank_divergence", rank=1, step=2)
    with pytest.raises(ValueError, match="unknown violation kind 'rank_diverged'"):
        diverged.assert_violation("rank_diverged")
    (v,) = diverged.assert_violation("rank_divergence", rank=1, step=3)
    assert v is diverged.violations[0]
    diverged.assert_no_violations()


def test_a_rank_that_raises_stops_the_run_and_is_named():
    """The run ends when rank 1 raises; the error names it first, with its traceback from fn."""
    t0 = time.monotonic()
    with pytest.raises(RankFailed) as info:
        run_ranks(functools.partial(decode, raise_at=2), 2, args=(1,), echo=False)
    assert time.monotonic() - t0 < 45
    err = info.value
    assert not isinstance(err, RanksTimedOut)
    text = str(err)
    assert text.startswith("rank 1 of 2 raised ValueError: rank 1 cannot go on; the run was stopped")
    assert "--- rank 1 ---\nTraceback (most recent call last):" in text
    assert re.search(r'test_testing_dist\.py", line \d+, in decode\n\s+raise ValueError', text)
    rank1 = text.split("--- rank 1 ---")[1].split("--- rank 0 ---")[0]
    assert "in _rank_main" not in rank1      # the traceback starts at fn, not in the wrapper
    assert "ValueError: rank 1 cannot go on" in err.failures[1]
    assert err.results.returns[1] is None


def test_a_hung_rank_ends_the_run_at_the_timeout_without_orphans(tmp_path):
    """Rank 1 sleeps for good before step 1: the run is killed at the timeout, the error says
    rank 1 fell behind while rank 0 waited at step 1, and no rank process survives."""
    timeout = 4.0
    t0 = time.monotonic()
    with pytest.raises(RanksTimedOut) as info:
        run_ranks(hang, 2, args=(str(tmp_path),), timeout=timeout, stall_timeout=1.0, echo=False)
    took = time.monotonic() - t0
    err = info.value
    assert err.phase == "fn" and err.pending == [0, 1] and err.steps == {0: 1, 1: 0}
    assert took < err.results.seconds + 1 and timeout < took < 60, took
    text = str(err)
    assert text.startswith(f"the ranks did not return from fn within timeout={timeout:g} s and "
                           "were all killed; ranks 0 and 1 had not returned. Rank 1 fell behind: "
                           "rank 0 reached step 1 and is most likely blocked in a collective "
                           "waiting for it.\n"
                           "  rank 0: had not returned, last started step 1\n"
                           "  rank 1: had not returned, last started step 0\n"), text
    stalled = err.results.assert_violation("rank_stalled", rank=1, step=1)
    assert stalled[0].reported_by == (0, 1)     # both ranks saw it; merged once
    assert "rank 1 has not reached step 1" in text and "(seen by rank 0)" in text
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def hang(ctx, pid_dir: str) -> None:
    """Rank 1 sleeps for good before step 1 while rank 0 waits for it in the step's collective."""
    Path(pid_dir, f"rank{ctx.rank}.pid").write_text(str(os.getpid()))
    cache = ctx.cache
    with cache.generation():
        for i in range(3):
            if ctx.rank == 1 and i == 1:
                time.sleep(3600)
            cache.set("state_ids", (None, 0) if i == 0 else (i - 1, i))
            dist.all_reduce(torch.zeros(1))
            cache.end_step()


# ----------------------------------------------------------------------------- the pytest plugin

def _docs_example() -> str:
    text = (REPO / "docs" / "testing.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
                if "cachescope_ranks" in b]
    return block


def test_fixture_runs_the_docs_example_and_strict_mode_fails_undeclared_rank_violations(
        pytester: pytest.Pytester) -> None:
    """The docs' example passes under --cachescope-strict as written; a test whose ranks diverge
    without declaring it fails there, with the ranks' reports."""
    pytester.makepyfile(test_tp_decode=_docs_example() + '''

def test_undeclared(cachescope_ranks):
    cachescope_ranks(decode, nproc=2, args=(1,))
''')
    result = pytester.runpytest(*PLUGIN, *FAST, "--cachescope-strict", "-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "*cachescope strict mode: 2 unexpected cache violation(s) during test_undeclared (cache "
        "'test_undeclared-rank0', 'test_undeclared-rank1': rank_divergence x2).",
        "A rank_divergence means ranks that decode one sequence disagreed at a step *"
        "(ranks of run_ranks: `results.assert_violation(kind, rank=..., step=...)`)*",
        "*cachescope: rank_divergence on queue '<inputs>' (family <inputs>) at step 3*",
        "*no majority among the ranks compared, so each side is reported*",
        "*FAILED test_tp_decode.py::test_undeclared - Failed: cachescope strict mode*",
    ])
