"""Every rank fault, end to end: `cachescope run --nproc N --fault rank-...` on real gloo ranks
started by torch's launcher; each is reported with the right kind, step and rank, the run ends
(exit 1) instead of hanging, and nothing is left running."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from _multirank_helpers import _launch, _no_leftovers


def _run(tmp_path: Path, nproc: int, *args: str) -> tuple[dict, set[tuple[str, int, int]], float]:
    marker = f"mr-faults-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    proc = _launch("--nproc", str(nproc), *args, "--max-new-tokens", "6", "--stall-timeout", "2",
                   "--json", "--cache-name", marker, cwd=tmp_path)
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    s = json.loads(proc.stdout)
    assert s["exit_code"] == 1
    assert all(v["rank"] is not None and v["report"] for v in s["violations"])
    assert _no_leftovers(marker) == []
    return s, {(v["kind"], v["step"], v["rank"]) for v in s["violations"]}, took


def test_rank_diverge_is_named_by_the_majority(tmp_path: Path) -> None:
    # 4 ranks (TP=2 x PP=2): rank 3 (last stage) continues with another token after step 2
    s, found, _ = _run(tmp_path, 4, "--tp", "2", "--pp", "2", "--fault", "rank-diverge@2:rank=3")
    assert {k for k in found if k[0] == "rank_divergence"} == {("rank_divergence", 3, 3)}, found
    (v,) = [v for v in s["violations"] if v["kind"] == "rank_divergence"]
    assert "rank 3 sampled a different token at step 2" in v["hint"]
    assert "Rank 3's step 3" in v["report"] and "Rank 0's step 3" in v["report"]


def test_rank_exit_is_reported_at_once(tmp_path: Path) -> None:
    s, found, took = _run(tmp_path, 2, "--fault", "rank-exit@3:rank=1")
    assert ("rank_stalled", 3, 1) in found, found
    (v,) = [v for v in s["violations"] if v["kind"] == "rank_stalled"]
    assert "rank 1 ended generation 1 after step 2 while its peers reached step 3" in v["detail"]


def test_rank_stall_longer_than_the_timeout_ends_the_run(tmp_path: Path) -> None:
    s, found, took = _run(tmp_path, 2, "--fault", "rank-stall@3:rank=1,seconds=300")
    assert ("rank_stalled", 3, 1) in found, found
    assert took < 120, f"the run took {took:.0f} s: it waited for the stalled rank"
    (v,) = [v for v in s["violations"] if v["kind"] == "rank_stalled"]
    assert "rank 1 has not reached step 3" in v["detail"]
    assert "Rank 1's last cache op:" in v["report"]


def test_rank_skip_under_tp_is_found_in_the_step_that_never_completes(tmp_path: Path) -> None:
    s, found, _ = _run(tmp_path, 2, "--fault", "rank-skip@2:rank=1")
    assert ("owner_mismatch", 2, 1) in found and ("rank_divergence", 2, 1) in found, found
    assert ("rank_stalled", 2, 0) in found and ("rank_stalled", 2, 1) in found, found
    (v,) = [v for v in s["violations"] if v["kind"] == "rank_divergence" and v["rank"] == 1]
    assert "step 2 never completed" in v["detail"]
    assert "rank 0 ran layers.0.attention more often than rank 1" in v["hint"]


def test_rank_retry_restarts_the_step_on_that_rank_only(tmp_path: Path) -> None:
    s, found, _ = _run(tmp_path, 2, "--fault", "rank-retry@2:rank=1")
    assert ("step_restarted", 3, 1) in found, found
    assert not any(k[2] == 0 and k[0] not in ("rank_stalled",) for k in found), found
    stalled = [v for v in s["violations"] if v["kind"] == "rank_stalled"]
    assert stalled and all(v["rank"] == 1 for v in stalled), stalled
    assert "IndexError" in stalled[0]["detail"]
