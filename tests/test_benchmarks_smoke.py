"""Smoke test: ``benchmarks/bench.py --quick`` runs end to end and writes its report.

No timing assertions (the machine running the tests is arbitrary); only that every section ran,
the report has its tables, and the correctness checks the benchmark makes (no tensor kept alive by
the instrumentation, bounded Prometheus series) hold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("prometheus_client")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    out = tmp_path_factory.mktemp("bench")
    md, js = out / "RESULTS.md", out / "results.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(md), "--json", str(js)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc, md, js


def test_quick_run_succeeds_and_writes_report(quick_run: tuple[subprocess.CompletedProcess[str], Path, Path]) -> None:
    proc, md, js = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = md.read_text()
    for heading in ("## Machine and settings", "## Targets", "## Decode overhead, lockstep: `tiny`",
                    "## Decode overhead, whole `generate()` calls: `tiny`",
                    "## Per-op microbenchmarks", "## Where the time goes", "## Decode loop speed",
                    "## Memory over a long run", "## Weakref check"):
        assert heading in text, heading
    assert "torch.set_num_threads(1)" in text
    assert "| target | limit | measured | verdict | note |" in text   # any verdict is fine here


def test_quick_run_results(quick_run: tuple[subprocess.CompletedProcess[str], Path, Path]) -> None:
    proc, md, js = quick_run
    assert proc.returncode == 0
    res = json.loads(js.read_text())
    decode = res["decode"][0]
    assert decode["preset"] == "tiny"
    assert set(decode["modes"]) == {"plain", "plain-aa", "core", "default", "default-py", "trace-all", "trace-10"}
    for mode, row in decode["modes"].items():
        assert row["median_ms"] > 0
        assert len(row["wall_ms"]) == decode["reps"]
        if mode != "plain":
            o = row["overhead_wall"]
            assert o["lo"] <= o["median"] <= o["hi"]
    assert decode["traced"]["trace-all"]["generate_spans"] == decode["traced"]["trace-all"]["generations"]
    lock = res["lockstep"][0]
    assert lock["preset"] == "tiny"
    assert set(lock["modes"]) == {"plain-aa", "core", "default", "trace-all", "trace-10"}
    for row in lock["modes"].values():
        assert len(row["plain_ms"]) == len(row["mode_ms"]) == len(row["plain_after_mode_ms"]) == lock["reps"]
        assert row["plain_median_ms"] > 0 and row["median_ms"] > 0
        for o in (row["overhead_wall"], row["plain_after_mode"]):
            assert o["lo"] <= o["median"] <= o["hi"]
    judged = {v["target"]: v for v in res["verdicts"]}
    assert judged["default-mode overhead, tiny"]["note"].startswith("lockstep")
    assert "whole-generate cross-check" in judged["default-mode overhead, tiny"]["note"]
    ops = {(r["variant"], r["op"], r["mode"]) for r in res["ops"]["rows"]}
    assert ("module", "push+pop", "default") in ops and ("function", "set", "plain") in ops
    # correctness checks made by the benchmark (not timings)
    for mode, w in res["weakref"].items():
        assert w["tracked"] > 0 and w["alive"] == 0, (mode, w)
    for mode, run in res["memory"]["runs"].items():
        assert run["series_flat"], (mode, run["rows"])
    if "skipped" not in res["hf"]:
        assert res["hf"]["same_tokens"]
    assert res["loop"]["rows"][0]["same_tokens"]


def test_from_json_rerenders(quick_run: tuple[subprocess.CompletedProcess[str], Path, Path], tmp_path: Path) -> None:
    proc, md, js = quick_run
    assert proc.returncode == 0
    again = tmp_path / "again.md"
    r = subprocess.run([sys.executable, str(BENCH), "--from-json", str(js), "--out", str(again)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert again.read_text() == md.read_text()


def test_insitu_op_timer_builds_and_reports_every_op() -> None:
    """``benchmarks/insitu_ops.py`` still patches the current ``_speedups.c``, builds, and times
    every C op of a short decode (no timing assertion: only that each op was seen)."""
    import platform
    import shutil

    from _kvloop import require_fast_path
    require_fast_path()
    if platform.machine() not in ("x86_64", "AMD64") or shutil.which("gcc") is None:
        pytest.skip("the in-situ timer reads the x86-64 TSC and builds with gcc")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "insitu_ops.py"), "tiny", "4", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = {line.split()[0] for line in proc.stdout.splitlines()[2:]}
    assert {"push", "pop", "get", "set", "end_step", "clear", "all"} <= seen, proc.stdout
