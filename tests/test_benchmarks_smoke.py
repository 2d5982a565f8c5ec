"""Smoke test: ``benchmarks/bench.py --quick`` runs every section end to end and writes its report.

No timing assertions (the machine running the tests is arbitrary); only that every section ran,
the results are well formed, the report has its tables, and the correctness checks the benchmark
makes (same tokens in every arm, no tensor kept alive by the instrumentation, bounded Prometheus
series) hold.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"
SECTIONS = ("labml", "lockstep", "decode", "ops", "profile", "loop", "hf", "memory", "ranks")

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("prometheus_client")

Run = tuple[subprocess.CompletedProcess[str], Path, Path]


def _bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("bench")
    md, js = out / "RESULTS.md", out / "results.json"
    return _bench("--quick", "--out", str(md), "--json", str(js)), md, js


def _ok(run: Run) -> dict[str, Any]:
    proc, md, js = run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(js.read_text())


def _ci(o: dict[str, float]) -> None:
    assert o["lo"] <= o["median"] <= o["hi"], o
    assert all(math.isfinite(o[k]) for k in ("median", "lo", "hi", "mean", "mean_lo", "mean_hi"))


def _lockstep_row(row: dict[str, Any], reps: int) -> None:
    assert len(row["plain_ms"]) == len(row["mode_ms"]) == len(row["plain_after_mode_ms"]) == reps
    assert row["plain_median_ms"] > 0 and row["median_ms"] > 0
    _ci(row["overhead_wall"])
    _ci(row["plain_after_mode"])
    for arm in ("mode", "plain_a", "plain"):
        g = row["gc"][arm]
        assert g["collections"] == sum(g["by_generation"]) >= 0 and g["tokens"] > 0


def test_quick_run_writes_every_section(quick_run: Run) -> None:
    res = _ok(quick_run)
    text = quick_run[1].read_text()
    assert set(SECTIONS) <= set(res) and set(res["section_s"]) == set(SECTIONS)
    for heading in ("## Machine and settings", "## Targets",
                    "## Upstream labml NeoX, decode overhead: `tiny` shapes",
                    "## Reference model, decode overhead, lockstep: `tiny`",
                    "## Reference model, decode overhead, whole `generate()` calls: `tiny`",
                    "## Per-op microbenchmarks", "## Where the time goes",
                    "## Decode loop speed: KV cache vs recompute",
                    "## cachescope `generate` vs Hugging Face `generate`",
                    "## Memory over a long run", "## Weakref check",
                    "## Cross-rank checker, TP=2 decode on CPU: `tiny`"):
        assert heading in text, heading
    assert "torch.set_num_threads(1)" in text
    assert "| target | limit | measured | verdict | note |" in text   # any verdict is fine here
    assert "## Analysis (hand-written)" not in text                  # not appended to --quick
    assert {v["verdict"] for v in res["verdicts"]} <= {"PASS", "FAIL", "SKIP"}


def test_labml_section(quick_run: Run) -> None:
    res = _ok(quick_run)
    labml = res["labml"]
    if "skipped" in labml:   # labml-nn not installed here (scripts/bootstrap.sh test installs it)
        pytest.skip(labml["skipped"])
    (d,) = labml["presets"]
    assert d["preset"] == "tiny" and d["shape"] == {"vocab": 1000, "hidden": 128, "layers": 2, "heads": 4}
    assert d["install_replaces_singleton"] and d["tokens_match"]
    whole = d["whole"]
    assert set(whole["arms"]) == {"plain", "plain-aa", "default", "trace-all"}
    for arm, row in whole["arms"].items():
        assert len(row["ms"]) == whole["reps"] and row["median_ms"] > 0
        assert row["gc"]["tokens"] == 2 * whole["tokens"] * whole["reps"]
        assert row["gc"]["net_steps"] >= 0
        if arm != "plain":
            _ci(row["overhead"])
    assert whole["exported"]["trace-all"]["spans"]["decode_step"] > 0   # every step traced
    lock = d["lockstep"]
    assert set(lock["modes"]) == {"plain-aa", "default", "trace-all", "trace-spans"}
    for row in lock["modes"].values():
        _lockstep_row(row, lock["reps"])
    judged = {v["target"]: v for v in res["verdicts"]}
    tiny = next(v for k, v in judged.items() if k.startswith("default-mode overhead, upstream labml `tiny`"))
    assert tiny["verdict"] in ("PASS", "FAIL") and tiny["note"].startswith("lockstep")
    assert "whole decodes ABBA" in tiny["note"]
    assert any(k.startswith("GC collections caused by the instrumentation") for k in judged)
    # pythia-70m was not run by --quick
    assert {v["verdict"] for k, v in judged.items() if "pythia-70m" in k} == {"SKIP"}


def test_reference_decode_sections(quick_run: Run) -> None:
    res = _ok(quick_run)
    (lock,) = res["lockstep"]
    assert lock["preset"] == "tiny"
    assert set(lock["modes"]) == {"plain-aa", "core", "default", "trace-all", "trace-10"}
    for row in lock["modes"].values():
        _lockstep_row(row, lock["reps"])
    (decode,) = res["decode"]
    assert set(decode["modes"]) == {"plain", "plain-aa", "core", "default", "trace-all", "trace-10"}
    for mode, row in decode["modes"].items():
        assert row["median_ms"] > 0 and len(row["wall_ms"]) == decode["reps"]
        if mode != "plain":
            _ci(row["overhead_wall"])
    traced = decode["traced"]["trace-all"]
    assert traced["generate_spans"] == traced["generations"]


def test_other_sections(quick_run: Run) -> None:
    res = _ok(quick_run)
    ops = {(r["variant"], r["op"], r["mode"]) for r in res["ops"]["rows"]}
    assert ("module", "push+pop", "default") in ops and ("function", "set", "plain") in ops
    assert not any(r["mode"].endswith("-py") for r in res["ops"]["rows"])
    prof = res["profile"]
    assert prof["components"] and prof["cprofile"] and prof["cold"]["rows"]
    assert {r["op"] for r in prof["insitu"]["presets"]["tiny"]} >= {"push", "pop", "set"}
    assert res["loop"]["rows"][0]["same_tokens"]
    if "skipped" not in res["hf"]:
        assert res["hf"]["same_tokens"]
        lock = res["hf"]["lockstep"]
        # the checked arm was checked: no violation, and every update seen by the checker (a
        # cache argument the model does not take would leave its own cache measured only)
        assert lock["same_tokens"] and lock["violations"] == 0 and lock["measured_only"] == {}
    # correctness checks made by the benchmark (not timings)
    for mode, w in res["memory"]["weakref"].items():
        assert w["tracked"] > 0 and w["alive"] == 0, (mode, w)
    for mode, run in res["memory"]["runs"].items():
        assert run["series_flat"], (mode, run["rows"])


def test_ranks_section(quick_run: Run) -> None:
    """Two gloo ranks decoded every arm in lockstep, ABBA and solo, with the same tokens, no
    violation, and the checker's watcher thread and store traffic measured."""
    res = _ok(quick_run)
    (d,) = res["ranks"]["presets"]
    assert (d["preset"], d["tp"], d["pp"], d["world_size"], d["threads"]) == ("tiny", 2, 1, 2, 1)
    arms = {"plain", "plain-aa", "default", "rankcheck", "rankcheck-every-8"}
    for design in ("lockstep", "whole"):
        block = d[design]
        assert set(block["arms"]) == arms
        for arm, row in block["arms"].items():
            assert len(row["ms"]) == block["reps"] and row["median_ms"] > 0
        for arm in ("rankcheck", "rankcheck-every-8"):
            _ci(block["arms"][arm]["vs_default"])
            _ci(block["arms"][arm]["vs_plain"])
            _ci(block["arms"][arm]["other_rank_vs_default"])
        _ci(block["arms"]["plain-aa"]["vs_plain"])
    for arm in ("rankcheck", "rankcheck-every-8"):
        _ci(d["lockstep"]["arms"][arm]["vs_default_charged"])
        _ci(d["lockstep"]["arms"][arm]["other_rank_vs_default_charged"])
        for design in ("lockstep", "whole"):   # the CPU estimate (judged in lockstep)
            row = d[design]["arms"][arm]
            for key in ("cpu_est_vs_default", "other_rank_cpu_est_vs_default", "cpu_est_vs_plain"):
                o = row[key]
                assert o["lo"] <= o["median"] <= o["hi"] and math.isfinite(o["extra_us"]), (key, o)
    assert "cpu_est_vs_plain" in d["lockstep"]["arms"]["plain-aa"]   # the estimate's A/A
    assert d["violations"] == {"0": {"default": 0, "rankcheck": 0, "rankcheck-every-8": 0},
                               "1": {"default": 0, "rankcheck": 0, "rankcheck-every-8": 0}}
    for arm in ("rankcheck", "rankcheck-every-8"):
        assert d["watcher"][arm]["us_per_token"] > 0
    solo = d["solo"]["arms"]
    counted = solo["rankcheck-counted"]
    assert counted["round_trips"] > 0 and counted["fingerprints"] == d["solo"]["tokens"]
    assert counted["flushed"] and not counted["violations"]
    assert all(solo[a]["tokens"] == d["solo"]["tokens"] for a in solo)
    judged = [v for v in res["verdicts"] if v["target"].startswith("cross-rank checker overhead")]
    assert len(judged) == 2 and {v["verdict"] for v in judged} == {"SKIP"}   # pythia-70m only


def test_from_json_rerenders(quick_run: Run, tmp_path: Path) -> None:
    _ok(quick_run)
    again = tmp_path / "again.md"
    r = _bench("--from-json", str(quick_run[2]), "--out", str(again), timeout=120)
    assert r.returncode == 0, r.stderr
    assert again.read_text() == quick_run[1].read_text()


def test_sections_option(tmp_path: Path) -> None:
    bad = _bench("--sections", "ops,nope", timeout=120)
    assert bad.returncode == 2 and "unknown section 'nope'" in bad.stderr
    js = tmp_path / "ops.json"
    r = _bench("--quick", "--sections", "ops", "--json", str(js), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(js.read_text())
    assert set(SECTIONS) & set(res) == {"ops"} and res["args"]["sections"] == ["ops"]


def test_no_private_cachescope_names() -> None:
    """The benchmarks use cachescope's public API only (the core's internals can change)."""
    import re
    pattern = re.compile(r"cachescope\._[a-z]|from cachescope import _|from cachescope\.\w+ import _"
                         r"|cache\w*\._[a-z]|CACHESCOPE_PURE_PYTHON|CACHESCOPE_RAW_SIZES|speedups")
    for path in [BENCH, *sorted((ROOT / "benchmarks" / "benchkit").glob("*.py"))]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not pattern.search(line), f"{path.name}:{n}: {line.strip()}"


def test_hf_costs_script(tmp_path: Path) -> None:
    """``scripts/hf_costs.py`` (the cost attribution RESULTS.md cites) runs every configuration,
    each decoding the plain arms' tokens without violations, and writes its table and JSON."""
    pytest.importorskip("transformers")
    out = tmp_path / "costs.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "hf_costs.py"), "--tiny",
                        "--rounds", "1", "--reps", "1", "--tokens", "3", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [x["config"] for x in rows] == ["full", "no-end-work", "const-owner", "no-update-work",
                                           "interception"]
    assert "| interception |" in r.stdout



def test_hf_gpu_check_script_dry_run(tmp_path: Path) -> None:
    """``scripts/hf_gpu_check.py`` (run on a GPU when a session is lent one; CI has none) passes
    every check in its CPU dry run, so it does not rot between GPU sessions."""
    pytest.importorskip("transformers")
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "hf_gpu_check.py"), "--device", "cpu",
                        "--tokens", "2", "--reps", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["failed"] == [] and res["overhead"]["measured_only"] == {}
    assert {"neox/greedy", "llama/beam", "neox/static"} <= set(res["correct"])
    assert res["faults"]["neox/skip@2:layer=1"] == [["layer_skipped", 2, "layer_1"]]
