"""Recording and replaying a multi-rank run: per-rank recordings analyzed and drawn together.

One launch of 4 real gloo ranks (tests/_record_worker.py, torch's launcher, tp 2 x pp 2) records
every rank to run.rank{r}.jsonl.gz with the live cross-rank checker attached. Generation 1: rank 1
swaps its two layers at step 2 (``cachescope.faults.inject``, rank 1 only), rank 3 continues with
another token than rank 0's after step 3. Generation 2: rank 2's loop crashes before its third
step. The tests analyze and draw those files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from _torchrun import torchrun

from cachescope.analyze import (RankSetError, analyze_file, main_analyze, read_record, replay,
                                replay_ranks)
from cachescope.cli import main
from cachescope.record import Recorder, inputs_digest

WORKER = Path(__file__).with_name("_record_worker.py")
WORLD = 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recordings of one 4-rank run (launched once for the module)."""
    out = tmp_path_factory.mktemp("ranks")
    args = ["--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1", "--master_port",
            str(_free_port()), str(WORKER), str(out), "--tp", "2", "--pp", "2", "--skip",
            "1:swap@2", "--diverge", "3:3", "--crash", "2:2"]
    _code, text = torchrun(args, env=dict(os.environ, PYTHONPATH=str(WORKER.parent.parent)),
                           timeout=240)
    for r in range(WORLD):
        assert (out / f"rank{r}.json").exists(), f"rank {r} did not finish:\n{text[-4000:]}"
    return out


def rank_files(d: Path) -> list[Path]:
    return [d / f"run.rank{r}.jsonl.gz" for r in range(WORLD)]


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines() if line]


def with_header(src: Path, dst: Path, change: Any) -> Path:
    """A copy of the recording ``src`` whose header ``change(header)`` edited."""
    raw = gzip.decompress(src.read_bytes()).split(b"\n")
    header = json.loads(raw[0])
    change(header)
    raw[0] = json.dumps(header).encode()
    dst.write_bytes(gzip.compress(b"\n".join(raw)))
    return dst


def table_rows(text: str) -> dict[int, list[str]]:
    table = text[text.index("Per-rank summary"):].splitlines()[2:]
    return {int(line.split()[0]): line.split(None, 6)[1:] for line in table if line.strip()}


# ----------------------------------------------------------------------------- the recordings

def test_each_rank_file_names_its_place_in_the_run(run_dir):
    """Headers carry rank, tp_rank, pp_rank, tp, pp, world_size and the process group; input
    digests and the live cross-rank violations (with rank, peer, peer_side) are recorded."""
    masters = set()
    for r, path in enumerate(rank_files(run_dir)):
        lines = lines_of(path)
        header = lines[0]
        assert {k: header["run"][k] for k in ("rank", "tp_rank", "pp_rank", "tp", "pp",
                                               "world_size")} == {
            "rank": r, "tp_rank": r % 2, "pp_rank": r // 2, "tp": 2, "pp": 2, "world_size": 4}
        dist = header["dist"]
        assert (dist["rank"], dist["world_size"], dist["backend"]) == (r, 4, "gloo")
        masters.add(dist["master"])
        inputs = [d for d in lines if d["type"] == "inputs"]
        assert len(inputs) == (8 if r == 2 else 10)
        assert all(len(d["digest"]) == 16 and set(d) == {"type", "step", "seq", "digest"}
                   for d in inputs)
    assert len(masters) == 1 and masters.pop().startswith("127.0.0.1:")
    (live,) = [d for d in lines_of(rank_files(run_dir)[1]) if d["type"] == "violation"
               and d["kind"] == "rank_divergence"]
    assert (live["rank"], live["peer"], live["step"]) == (1, 0, 2)
    assert "Rank 0's step 2" in live["peer_side"]


# ----------------------------------------------------------------------------- analysis

def test_ranks_are_compared_step_by_step_like_the_live_checker(run_dir):
    """replay_ranks re-derives each rank_divergence (rank, peer, step, queue) and the crashed
    rank's stall from the files, given in any order."""
    files = rank_files(run_dir)
    random.Random(1).shuffle(files)
    a = replay_ranks(files)
    assert [f.rank for f in a.ranks] == [0, 1, 2, 3]
    assert [(f.tp_rank, f.pp_rank) for f in a.ranks] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert (a.world_size, a.tp, a.pp, a.missing) == (4, 2, 2, [])
    assert a.inputs_compared and a.steps_compared == 10 and a.recorded == []
    found = sorted((v.kind, v.rank, v.peer, v.step) for v in a.cross_rank)
    assert found == [("rank_divergence", 0, 1, 2), ("rank_divergence", 1, 0, 2),
                     ("rank_divergence", 3, 0, 4), ("rank_stalled", 2, 0, 8)]
    by_rank = {v.rank: v for v in a.cross_rank}
    swap = by_rank[1]
    assert (swap.queue, swap.consumer) == ("attn_kv_1", "layers.1.attention")
    assert "rank 1 ran its layers in another order than rank 0 at step 2" in swap.hint
    assert "no majority" in swap.detail          # two TP peers in stage 0: both sides reported
    token = by_rank[3]
    assert token.queue == "<inputs>" and "rank 3 sampled a different token at step 3" in token.hint
    stall = by_rank[2]
    assert stall.detail.startswith("generation 2: rank 2 ended generation 2 with RuntimeError")
    assert "after step 7 while rank 0 reached step 9" in stall.detail
    assert "decode loop failed" in stall.hint and stall.queue == "attn_kv_1"
    # each rank's own violations come from its replay, labelled with its rank
    assert [v.kind for v in a.ranks[1].violations] == ["owner_mismatch"] * 4
    assert all(v.rank == 1 for v in a.ranks[1].violations)
    assert a.by_kind(1) == {"owner_mismatch": 4, "rank_divergence": 1}
    assert a.by_kind(2) == {"rank_stalled": 1}


def test_offline_divergences_equal_what_the_live_checker_recorded(run_dir):
    """The divergences found from the files are the ones the live checker found (same rank,
    peer, step, queue, owners and hint; same text but for the input digests)."""
    a = replay_ranks(rank_files(run_dir))
    live = []
    for r in range(WORLD):
        checker = json.loads((run_dir / f"rank{r}.json").read_text())["checker"]
        live += [v for v in checker if v["kind"] == "rank_divergence"]
    recorded = [v for f in a.ranks for v in f.result.recorded_cross_rank
                if v.kind == "rank_divergence"]

    def key(v: Any) -> tuple:
        d = v if isinstance(v, dict) else v.to_dict()
        return (d["rank"], d["peer"], d["step"], d["queue"], d["consumer"], d["producer"],
                d["hint"], d["detail"] if d["queue"] != "<inputs>" else None)

    offline = sorted(key(v) for v in a.cross_rank if v.kind == "rank_divergence")
    assert offline == sorted(key(v) for v in live) == sorted(key(v) for v in recorded)


def test_cli_analyze_prints_each_rank_then_the_cross_rank_reports_and_a_table(run_dir, capsys):
    """`cachescope analyze run.rank*.jsonl.gz` labels each rank's replay, prints the cross-rank
    reports and the per-rank table, and exits 1."""
    assert main(["analyze", *map(str, rank_files(run_dir))]) == 1
    out = capsys.readouterr().out
    heads = [out.index(f"--- rank {r} (tp_rank {r % 2}, pp_rank {r // 2}): ") for r in range(4)]
    assert heads == sorted(heads)
    assert "4 rank recording(s) of one run: world 4 (tp 2 x pp 2), model 'tiny-4'" in out
    assert "(rank 1 of 4, tp_rank 1, pp_rank 0, cache 'rank1'" in out
    assert "Cross-rank check: 4 ranks aligned by (generation, step), 10 step(s) compared " \
           "(inputs compared): 4 cross-rank violation(s)" in out
    assert "[cache rank3, rank 3]" in out and "Rank 0's step 4" in out
    rows = table_rows(out)
    assert rows[1] == ["1", "0", "10", "10", "88", "owner_mismatch=4, rank_divergence=1"]
    assert rows[2] == ["0", "1", "8", "8", "70", "rank_stalled=1"]
    assert rows[0][-1] == rows[3][-1] == "rank_divergence=1"
    assert main(["analyze", "--quiet", *map(str, rank_files(run_dir))]) == 1
    quiet = capsys.readouterr().out
    assert "Per-rank summary" not in quiet and "--- rank" not in quiet
    assert quiet.count("cachescope: rank_divergence") == 3
    assert quiet.count("cachescope: owner_mismatch") == 4


def test_a_missing_rank_is_a_note_and_the_others_are_compared(run_dir, tmp_path):
    """Without rank 3's file the other three are compared, the table shows the gap, and a note
    says what cannot be seen."""
    dest = tmp_path / "analysis.txt"
    assert main_analyze(argparse.Namespace(file=[str(p) for p in rank_files(run_dir)[:3]],
                                           out=str(dest), progress=False, quiet=False)) == 1
    assert table_rows(dest.read_text())[3][-1] == "(no recording given)"
    a = replay_ranks(rank_files(run_dir)[:3])
    assert a.missing == [3]
    assert any("rank(s) 3 of the world of 4 have no recording here" in n for n in a.notes)
    assert sorted((v.kind, v.rank) for v in a.cross_rank) == [
        ("rank_divergence", 0), ("rank_divergence", 1), ("rank_stalled", 2)]


def test_one_rank_file_alone_keeps_its_recorded_cross_rank_violation(run_dir):
    """Analyzed alone, a rank's file shows the rank_divergence recorded live (carried over, with
    a note), its own violations carry its rank, and the title names its place."""
    result = analyze_file(rank_files(run_dir)[1], out=None)
    assert [v.kind for v in result.violations] == ["owner_mismatch"] * 4 + ["rank_divergence"]
    assert all(v.rank == 1 for v in result.violations)
    v = result.violations[-1]
    assert (v.peer, v.step) == (0, 2) and "Rank 0's step 2" in v.report()
    assert any("recorded live are shown as recorded" in n for n in result.notes)
    assert "rank 1 of 4, tp_rank 1, pp_rank 0" in result.title()
    assert "rank_divergence=1" in result.summary()


def test_cli_with_one_file_prints_what_analyze_file_prints(run_dir, capsys):
    """One file on the command line is analyzed exactly as before (the single-file text)."""
    path = rank_files(run_dir)[0]
    expected = analyze_file(path, out=None)
    assert main(["analyze", str(path)]) == (1 if expected.violations else 0)
    assert capsys.readouterr().out == expected.text()


# ----------------------------------------------------------------------------- report

def test_report_draws_the_ranks_side_by_side(run_dir, capsys):
    """`cachescope report run.rank*.jsonl.gz` writes the per-rank pictures and a page with the
    table and the cross-rank reports, by default in run-report next to the files."""
    assert main(["report", *map(str, rank_files(run_dir))]) == 0
    out_dir = run_dir / "run-report"
    written = [Path(p) for p in capsys.readouterr().out.split()]
    assert [p.name for p in written] == ["ranks_queues.png", "ranks_ops.png", "ranks_steps.png",
                                         "index.html"]
    assert all(p.parent == out_dir for p in written)
    for p in written[:3]:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000
    page = (out_dir / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert page.count("cachescope: rank_divergence") == 3 and "rank_stalled" in page
    assert "<td>owner_mismatch=4, rank_divergence=1</td>" in page


# ----------------------------------------------------------------------------- bad inputs

def _expect_error(capsys, args: list[str], message: str) -> None:
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err


def test_files_that_are_not_the_ranks_of_one_run_are_refused(run_dir, tmp_path, capsys):
    """A rank twice, another run's or another layout's file, a file without a rank, or a header
    whose tp_rank contradicts the layout: one line, exit 2, for analyze and report."""
    f0, f1, f2, f3 = map(str, rank_files(run_dir))
    twice = shutil.copy(f1, tmp_path / "again.rank1.jsonl.gz")
    _expect_error(capsys, ["analyze", f0, f1, str(twice)], "rank 1 is recorded twice")
    other = with_header(Path(f1), tmp_path / "other.jsonl.gz",
                        lambda h: h["dist"].update(master="127.0.0.1:1"))
    _expect_error(capsys, ["analyze", f0, str(other)], "different process groups")
    model = with_header(Path(f1), tmp_path / "model.jsonl.gz",
                        lambda h: h["run"].update(model="pythia-70m"))
    _expect_error(capsys, ["report", f0, str(model), "--out", str(tmp_path / "r")],
                  "differ in model ('tiny-4' vs 'pythia-70m')")
    layout = with_header(Path(f1), tmp_path / "layout.jsonl.gz",
                         lambda h: h["run"].update(tp=4, pp=1, pp_rank=0))
    _expect_error(capsys, ["analyze", f0, str(layout)], "different runs or layouts")
    bad = with_header(Path(f1), tmp_path / "bad.jsonl.gz", lambda h: h["run"].update(tp_rank=0))
    _expect_error(capsys, ["analyze", f0, str(bad)], "says tp_rank=0 for rank 1")
    plain = tmp_path / "plain.jsonl"
    from cachescope import InstrumentedCache
    cache = InstrumentedCache(metrics=False, tracing=False)
    with Recorder(plain).attach(cache):
        cache.set("state_ids", (None, 0))
    _expect_error(capsys, ["analyze", f0, str(plain)], "names no rank")
    with pytest.raises(RankSetError, match="no recordings"):
        replay_ranks([])


def test_a_malformed_cross_rank_line_is_skipped_with_a_note(tmp_path):
    """A recorded rank_divergence line with a wrong field type is skipped, never a traceback."""
    from cachescope import InstrumentedCache
    path = tmp_path / "r.jsonl"
    cache = InstrumentedCache(metrics=False, tracing=False)
    with Recorder(path).attach(cache):
        cache.set("state_ids", (None, 0))
    with open(path, "a") as f:
        f.write(json.dumps({"type": "violation", "kind": "rank_divergence", "queue": "q",
                            "step": "three", "rank": 1}) + "\n")
    result = replay(path)
    assert result.violations == [] and any("malformed" in n for n in result.notes)


# ----------------------------------------------------------------------------- recorder

def test_input_digests_are_keyed_and_written_only_with_a_key(tmp_path):
    """note_inputs writes a keyed digest (never the ids) only when the recorder has a key; the
    same key gives the same digest on every rank."""
    from cachescope import InstrumentedCache
    cache = InstrumentedCache(metrics=False, tracing=False)
    plain = Recorder(tmp_path / "a.jsonl").attach(cache)
    cache.set("state_ids", (None, 0))
    assert plain.note_inputs([101, 202]) is False
    plain.close()
    cache2 = InstrumentedCache(metrics=False, tracing=False)
    rec = Recorder(tmp_path / "b.jsonl", inputs_key="secret").attach(cache2)
    cache2.set("state_ids", (None, 0))
    assert rec.note_inputs([101, 202]) is True
    rec.close()
    (line,) = [d for _n, d in read_record(tmp_path / "b.jsonl")[1] if d["type"] == "inputs"]
    assert line == {"type": "inputs", "step": 0, "seq": 1,
                    "digest": inputs_digest([101, 202], b"secret")}
    assert line["digest"] != inputs_digest([101, 202], b"other")
    assert "101" not in (tmp_path / "b.jsonl").read_text()
    assert not [d for _n, d in read_record(tmp_path / "a.jsonl")[1] if d["type"] == "inputs"]
    for bad in (b"", b"x" * 65, 7):
        with pytest.raises(ValueError, match="inputs_key must be 1 to 64 bytes"):
            Recorder(tmp_path / "c.jsonl", inputs_key=bad)
