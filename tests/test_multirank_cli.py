"""Tests for the multi-rank ``cachescope run`` (--nproc/--tp/--pp; cachescope._multirank).

Real runs: ``python -m cachescope run --nproc N`` as a subprocess, which starts the ranks with
torch's launcher (gloo on 127.0.0.1). A launch costs seconds on a small machine, so each one is
made once (module-scoped fixtures) and shared by the tests that read it. Argument checks run
in-process, with the launcher's ``Popen`` replaced so a launch would fail the test.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

import cachescope
from cachescope import _multirank, _rankmerge
from cachescope.cli import build_parser, main

from _helpers import save_tiny_neox_checkpoint
from _multirank_helpers import (LAUNCH_TIMEOUT_S, SERVING, _env, _launch, _no_leftovers,
                                _read_until, _stop)

KILLER = Path(__file__).resolve().parent / "_multirank_site"
PROMPT = "3,1,4,1,5"


def _single_process_tokens(capsys: pytest.CaptureFixture[str], *args: str) -> list[int]:
    assert main(["run", "--json", *args]) == 0
    tokens = json.loads(capsys.readouterr().out)["output_tokens"]
    assert cachescope.installed() is None
    return tokens


# ----------------------------------------------------------------------------- clean runs

@pytest.fixture(scope="module")
def tp2(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One TP=2 run: --json, a recording per rank."""
    d = tmp_path_factory.mktemp("tp2")
    proc = _launch("--nproc", "2", "--max-new-tokens", "5", "--prompt-ids", PROMPT, "--json",
                   "--record", str(d / "run.jsonl.gz"), cwd=d)
    return proc, d


@pytest.fixture(scope="module")
def tp2pp2(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """One 4-rank run, TP=2 x PP=2, --json."""
    d = tmp_path_factory.mktemp("tp2pp2")
    return _launch("--nproc", "4", "--tp", "2", "--pp", "2", "--max-new-tokens", "4",
                   "--prompt-ids", PROMPT, "--json", cwd=d)


def test_tp2_json_has_ranks_and_the_single_process_tokens(
        tp2: tuple[subprocess.CompletedProcess[str], Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    """--nproc 2 --json exits 0 with one JSON document: ``ranks`` per rank, and the tokens of the
    single-process run on the same weights and prompt."""
    proc, _ = tp2
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    s = json.loads(proc.stdout)
    assert (s["world_size"], s["tp"], s["pp"], s["exit_code"]) == (2, 2, 1, 0)
    assert s["violations"] == [] and s["error"] is None and s["faults_not_fired"] == []
    single = _single_process_tokens(capsys, "--max-new-tokens", "5", "--prompt-ids", PROMPT)
    assert s["output_tokens"] == single
    assert [(r["rank"], r["tp_rank"], r["pp_rank"], r["status"]) for r in s["ranks"]] == [
        (0, 0, 0, "ok"), (1, 1, 0, "ok")]
    assert all(r["output_tokens"] == single and r["tokens"] == 5 and r["violations"] == 0
               and r["layers"] == [0, 1, 2, 3] for r in s["ranks"])
    # Every TP rank runs every layer (its own heads): twice the single-process pushes.
    assert s["ops"]["push"] == 2 * 4 * 5 and s["total_ops"] == sum(r["ops"] for r in s["ranks"])


def test_tp2_records_one_file_per_rank(tp2: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """--record run.jsonl.gz writes run.rank0.jsonl.gz and run.rank1.jsonl.gz, each header
    naming its rank and the layout."""
    import gzip
    _, d = tp2
    assert sorted(p.name for p in d.glob("run*")) == ["run.rank0.jsonl.gz", "run.rank1.jsonl.gz"]
    for r in (0, 1):
        with gzip.open(d / f"run.rank{r}.jsonl.gz", "rt") as f:
            header = json.loads(f.readline())
        run = header["run"]
        assert (run["rank"], run["tp_rank"], run["pp_rank"], run["tp"], run["pp"],
                run["world_size"]) == (r, r, 0, 2, 1, 2)
        assert run["max_new_tokens"] == 5 and run["layers"] == [0, 1, 2, 3]


def test_tp2_pp2_four_ranks(tp2pp2: subprocess.CompletedProcess[str],
                            capsys: pytest.CaptureFixture[str]) -> None:
    """--nproc 4 --tp 2 --pp 2: four ranks, each stage holding two layers, the single-process
    tokens, exit 0."""
    assert tp2pp2.returncode == 0, tp2pp2.stderr
    s = json.loads(tp2pp2.stdout)
    assert (s["world_size"], s["tp"], s["pp"]) == (4, 2, 2)
    assert [(r["rank"], r["tp_rank"], r["pp_rank"], r["layers"]) for r in s["ranks"]] == [
        (0, 0, 0, [0, 1]), (1, 1, 0, [0, 1]), (2, 0, 1, [2, 3]), (3, 1, 1, [2, 3])]
    single = _single_process_tokens(capsys, "--max-new-tokens", "4", "--prompt-ids", PROMPT)
    assert s["output_tokens"] == single
    assert all(r["status"] == "ok" and r["output_tokens"] == single for r in s["ranks"])
    assert s["violations"] == [] and s["exit_code"] == 0


def test_serve_per_rank_metrics_targets_file_and_sigterm(tmp_path: Path) -> None:
    """--serve --metrics-port 0: every rank serves /metrics with its rank labels, the targets
    file lists them; SIGTERM ends the run with exit 0, the per-rank table, the targets file
    removed and no process left."""
    marker = f"mr-serve-{uuid.uuid4().hex[:8]}"
    targets = tmp_path / "targets.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachescope", "run", "--nproc", "2", "--serve", "--metrics-port",
         "0", "--targets-file", str(targets), "--max-new-tokens", "3", "--cache-name", marker],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = _read_until(proc, r"wrote Prometheus file_sd targets", LAUNCH_TIMEOUT_S)
        ports = {int(m.group(2)): int(m.group(1)) for m in SERVING.finditer(seen)}
        assert sorted(ports) == [0, 1], seen
        groups = json.loads(targets.read_text())
        assert sorted((g["labels"]["rank"], g["labels"]["tp_rank"], g["labels"]["pp_rank"],
                       g["targets"][0]) for g in groups) == [
            ("0", "0", "0", f"127.0.0.1:{ports[0]}"), ("1", "1", "0", f"127.0.0.1:{ports[1]}")]
        tokens = re.compile(r'cachescope_decode_tokens_total\{[^}]*pp_rank="0",rank="1",'
                            r'tp_rank="1"\} [1-9]')
        body = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not tokens.search(body):
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/metrics", timeout=5) as resp:
                body = resp.read().decode()
            time.sleep(0.2)
        assert tokens.search(body), body[:2000]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        _stop(proc)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert re.search(r"rank\s+tp_rank\s+pp_rank\s+layers\s+tokens\s+ops\s+violations\s+status", out)
    assert re.search(r"\n\s+0\s+0\s+0\s+0-3\s+\d+\s+\d+\s+0\s+ok", out)
    assert re.search(r"\n\s+1\s+1\s+0\s+0-3\s+\d+\s+\d+\s+0\s+ok", out)
    assert "result: no violations" in out
    assert not targets.exists()
    assert _no_leftovers(marker) == []


def test_plain_torchrun_runs_one_rank_per_process(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m cachescope run --tp 2`` works without cachescope's
    launcher: rank 0 prints the one merged summary."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
         "127.0.0.1", "--master_port", str(port), "-m", "cachescope", "run", "--tp", "2",
         "--max-new-tokens", "3", "--prompt-ids", PROMPT, "--json"],
        cwd=tmp_path, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)     # one document: only rank 0 prints
    assert [r["status"] for r in s["ranks"]] == ["ok", "ok"] and s["exit_code"] == 0


# ----------------------------------------------------------------------------- failures

def test_rank_that_fails_at_start_ends_the_run(tmp_path: Path) -> None:
    """A checkpoint whose config is fine but whose weights are not fails in the ranks: exit 1,
    one line naming the rank and the problem, no traceback, no process left."""
    ckpt = save_tiny_neox_checkpoint(tmp_path / f"ckpt-{uuid.uuid4().hex[:8]}")
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    proc = _launch("--nproc", "2", "--checkpoint", str(ckpt), "--max-new-tokens", "3",
                   cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.match(r"cachescope run: rank [01] failed.*--checkpoint: .*safetensors.*the run was "
                    r"stopped$", lines[0])
    assert proc.stdout == ""
    assert _no_leftovers(str(ckpt)) == []


def test_killed_rank_ends_the_run(tmp_path: Path) -> None:
    """A rank killed with SIGKILL mid-decode: exit 1, one line naming it, no torch launcher
    banner, no process left."""
    marker = f"mr-kill-{uuid.uuid4().hex[:8]}"
    proc = _launch("--nproc", "2", "--serve", "--max-new-tokens", "3", "--cache-name", marker,
                   cwd=tmp_path, PYTHONPATH=str(KILLER), CACHESCOPE_TEST_KILL_RANK="1")
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"^cachescope run: rank 1 \(pid \d+\) died before the run's result",
                     proc.stderr, re.M), proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert _no_leftovers(marker) == []


def test_rank_faults_are_reported_with_their_rank_and_a_stall_ends_the_run(tmp_path: Path) -> None:
    """rank-diverge on rank 1 and a 120 s rank-stall on rank 0 (the rank that merges) with
    --stall-timeout 2: exit 1 well before the stall is over, rank_divergence and rank_stalled
    each with its rank, and no process left."""
    marker = f"mr-fault-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    proc = _launch("--nproc", "2", "--max-new-tokens", "6", "--stall-timeout", "2", "--json",
                   "--fault", "rank-diverge@1:rank=1", "--fault", "rank-stall@3:rank=0,seconds=120",
                   "--cache-name", marker, cwd=tmp_path)
    assert time.monotonic() - t0 < 100
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    s = json.loads(proc.stdout)
    found = {(v["kind"], v["rank"], v["step"]) for v in s["violations"]}
    assert {("rank_divergence", 1, 2), ("rank_stalled", 0, 3)} <= found, found
    assert all(v["kind"] in ("rank_divergence", "rank_stalled") and "report" in v
               for v in s["violations"])
    assert ("rank-diverge@1:rank=1", 1, 1) in [(e["fault"], e["rank"], e["step"])
                                                for e in s["fault_events"]]
    assert "rank 0 has not reached step 3" in s["stalled"] and s["exit_code"] == 1
    assert _no_leftovers(marker) == []


# ----------------------------------------------------------------------------- bad arguments

@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Starting torch's launcher fails the test."""
    def popen(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the launcher was started: {args}")
    monkeypatch.setattr(_multirank.subprocess, "Popen", popen)
    yield


@pytest.mark.parametrize(("args", "message"), [
    (["--nproc", "0"], "expected a positive integer, got 0"),
    (["--nproc", "4", "--tp", "3", "--pp", "2"], "--tp 3 x --pp 2 = 6 rank(s), but the run has 4"),
    (["--nproc", "4", "--pp", "3"], "--pp 3 does not divide the 4 rank(s)"),
    (["--nproc", "3"], "--tp 3 does not divide the model's 4 attention heads"),
    (["--tp", "1", "--pp", "5"], "--pp 5 is more pipeline stages than the model's 4 layers"),
    (["--nproc", "2", "--fault", "rank-exit@2:rank=2"], "rank=2 is out of range for a world of 2"),
    (["--nproc", "2", "--fault", "rank-stall@40:rank=1,seconds=1"], "step 40 never comes"),
    (["--nproc", "2", "--pp", "2", "--fault", "swap@2:layer=1,other=2"],
     "(rank 0 holds 2 of the 4 layers)"),
    (["--nproc", "2", "--metrics-port", "65535"], "past 65535"),
    (["--nproc", "2", "--targets-file", "t.json"], "add --metrics-port"),
    (["--targets-file", "t.json"], "add --nproc N"),
    (["--nproc", "2", "--stall-timeout", "0"], "expected a positive number of seconds"),
    (["--nproc", "2", "--device", "cuda:1"], "cuda"),
    (["--nproc", "2", "--prompt-ids", "1,99999"], "out of range for a vocabulary of 512"),
    (["--nproc", "2", "--record", "/nonexistent/dir/run.jsonl"], "cannot write"),
    (["--nproc", "2", "--checkpoint", "/nonexistent/ckpt"], "is not a directory"),
])
def test_bad_arguments_exit_2_without_launching(
        capsys: pytest.CaptureFixture[str], no_launch: None, args: list[str], message: str) -> None:
    """Bad multi-rank arguments exit 2 with a one-line message before any rank starts."""
    rc = main(["run", *args])
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err + out


def test_metrics_port_range_in_use_exits_2(capsys: pytest.CaptureFixture[str],
                                           no_launch: None) -> None:
    """--metrics-port P with N ranks needs P..P+N-1 free: a busy port among them exits 2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        rc = main(["run", "--nproc", "2", "--metrics-port", str(busy - 1)])
    _, err = capsys.readouterr()
    assert rc == 2
    assert re.search(rf"port {busy - 1}\b.* in use|port {busy} on 127\.0\.0\.1 is in use", err), err


# ----------------------------------------------------------------------------- pieces

def _ns(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *args])


@pytest.mark.parametrize(("args", "layout"), [
    (["--nproc", "4"], (4, 4, 1)),
    (["--nproc", "4", "--pp", "2"], (4, 2, 2)),
    (["--nproc", "4", "--tp", "1"], (4, 1, 4)),
    (["--tp", "2", "--pp", "3"], (6, 2, 3)),
    (["--pp", "2"], (2, 1, 2)),
])
def test_layout_from_the_options(args: list[str], layout: tuple[int, int, int]) -> None:
    """--nproc alone means --tp N --pp 1; any two of --nproc/--tp/--pp fix the third."""
    assert _multirank.layout_of(_ns(*args)) == layout


def test_rank_path() -> None:
    """The rank goes before the recording's suffix."""
    assert _multirank.rank_path("d/run.jsonl.gz", 3) == str(Path("d/run.rank3.jsonl.gz"))
    assert _multirank.rank_path("run.jsonl", 0) == "run.rank0.jsonl"
    assert _multirank.rank_path("run.log", 1) == "run.rank1.log"
    assert _multirank.rank_path("run", 2) == "run.rank2"


def test_forwarded_options_parse_back_the_same() -> None:
    """What the launcher passes to the ranks parses to the same options, spelt in full."""
    ns = _ns("--nproc", "4", "--pp", "2", "--max-new", "7", "--prompt-ids", "1,2",
             "--fault", "rank-stall@3:rank=1,seconds=2.5", "--fault", "swap@2", "--serve",
             "--metrics-port", "0", "--stall-timeout", "1.5", "--cache-name", "c")
    args = _multirank._forwarded(ns, 2, 2)
    assert "--nproc" not in args and "--max-new" not in args
    again = _ns(*args)
    for name in ("max_new_tokens", "prompt_ids", "serve", "metrics_port", "stall_timeout",
                 "cache_name", "tp", "pp"):
        assert getattr(again, name) == (getattr(ns, name) if name not in ("tp", "pp") else 2)
    assert [str(f) for f in again.fault] == [str(f) for f in ns.fault]


def _result(rank: int, *, kinds: dict[str, int] | None = None, violations: list[Any] = (),
            error: str | None = None) -> dict[str, Any]:
    summary = {"model": "preset tiny", "layers": 4, "hidden_size": 64, "vocab_size": 512,
               "device": "cpu", "prompt_tokens": 3, "max_new_tokens": 2, "generations": 1,
               "tokens": 2, "steps": 2, "elapsed_s": 0.1, "tokens_per_s": 20.0,
               "ops": {"push": 8, "pop": 4}, "total_ops": 12, "peak_queue_depth": 4,
               "peak_bytes": {"logical": 10, "storage": 20},
               "families": {"attn_kv": {"depth": 0, "peak_depth": 4, "ops": {"push": 8}}},
               "faults": [], "fault_events": [], "violations_by_kind": kinds or {},
               "violations_dropped": 0, "violations": list(violations), "error": error,
               "output_tokens": [7, 8]}
    return _rankmerge.rank_result(summary, rank=rank, tp_rank=rank, pp_rank=0, local_rank=rank,
                                  host="h", layers=[0, 1, 2, 3], report="")


def test_merge_sums_ranks_and_keeps_a_cross_rank_violation_once() -> None:
    """Counters add up over ranks, peaks take the largest rank's; a rank_stalled that two ranks
    saw is kept once with its rank; a rank without a result fails the run."""
    stall = {"kind": "rank_stalled", "rank": 2, "peer": None, "step": 1, "queue": "",
             "report": "r"}
    results = {0: _result(0, kinds={"rank_stalled": 1}, violations=[stall]),
               1: _result(1, kinds={"rank_stalled": 1}, violations=[stall]), 2: None}
    s = _rankmerge.merge(results, cache="c", world_size=3, tp=3, pp=1, serve=False, waited_s=5)
    assert s["ops"] == {"push": 16, "pop": 8} and s["total_ops"] == 24
    assert s["peak_bytes"] == {"logical": 10, "storage": 20}
    assert s["families"]["attn_kv"] == {"depth": 0, "peak_depth": 4, "ops": {"push": 16}}
    assert [(v["kind"], v["rank"], v["reported_by"]) for v in s["violations"]] == [
        ("rank_stalled", 2, 0)]
    assert s["violations_by_kind"] == {"rank_stalled": 1}
    assert [r["status"] for r in s["ranks"]] == ["ok", "ok", "no result"]
    assert "rank 2: sent no result" in s["error"] and s["exit_code"] == 1
    clean = _rankmerge.merge({0: _result(0), 1: _result(1)}, cache="c", world_size=2, tp=2, pp=1,
                             serve=False, waited_s=5)
    assert clean["exit_code"] == 0 and clean["error"] is None
    text = _rankmerge.format_human(clean, prog="cachescope", quiet=False, serve=False,
                                   format_bytes=str)
    assert "result: no violations" in text and "  rank  tp_rank  pp_rank" in text
