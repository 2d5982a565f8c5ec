"""Tests for the ``cachescope`` command (cachescope.cli)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import cachescope
from cachescope.cli import main
from cachescope.faults import FAULTS

from _helpers import save_tiny_neox_checkpoint, serve_scrape_and_stop

ROOT = Path(__file__).resolve().parents[1]
SERVING = re.compile(r"cachescope: serving metrics on http://127\.0\.0\.1:(\d+)/metrics")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    assert cachescope.installed() is None
    return rc, out, err


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


# ----------------------------------------------------------------------------- help and clean runs

def test_bare_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Plain ``cachescope`` prints the help (naming the subcommands) on stderr and exits 2."""
    rc, out, err = run(capsys)
    assert rc == 2 and out == ""
    assert "run" in err and "analyze" in err and "report" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """``run --help`` lists the options and the fault catalogue and exits 0."""
    rc, out, _ = run(capsys, "run", "--help")
    assert rc == 0
    for option in ("--preset", "--checkpoint", "--prompt-tokens", "--prompt-ids", "--max-new-tokens",
                   "--fault", "--strict", "--seed", "--device", "--cache-name", "--quiet", "--json",
                   "--metrics-port", "--metrics-addr", "--serve", "--otlp-endpoint",
                   "--console-traces", "--trace-sample", "--record"):
        assert option in out
    assert "stale-state" in out


def test_clean_run_prints_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """A clean run exits 0 with tokens/s, ops by kind, peaks and 'no violations' in the summary."""
    rc, out, err = run(capsys, "run", "--max-new-tokens", "6", "--prompt-ids", "1,2,3",
                       "--cache-name", "demo")
    assert rc == 0, err
    assert "generated 6 tokens in" in out and "tokens/s" in out
    assert "ops by kind: push=24, pop=20" in out
    assert "cachescope summary for cache 'demo'" in out
    assert "peak queue depth: 4" in out and "peak bytes held:" in out
    assert "violations: none" in out and "result: no violations" in out


def test_subprocess_run_works(tmp_path: Path) -> None:
    """``python -m cachescope run --max-new-tokens 8`` exits 0 and prints the summary."""
    proc = subprocess.run([sys.executable, "-m", "cachescope", "run", "--max-new-tokens", "8"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "generated 8 tokens" in proc.stdout and "tokens/s" in proc.stdout
    assert "preset tiny (4 layers" in proc.stdout
    assert "result: no violations" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_json_summary_parses(capsys: pytest.CaptureFixture[str]) -> None:
    """``--json`` prints one JSON document with counts, peaks and an empty violation list."""
    rc, out, _ = run(capsys, "run", "--max-new-tokens", "5", "--prompt-tokens", "4", "--json")
    assert rc == 0
    s = json.loads(out)
    assert (s["tokens"], s["steps"], s["prompt_tokens"], s["exit_code"]) == (5, 5, 4, 0)
    assert s["ops"]["push"] == 20 and s["peak_queue_depth"] == 4
    assert s["peak_bytes"]["storage"] >= s["peak_bytes"]["logical"] > 0
    assert s["violations"] == [] and s["error"] is None and len(s["output_tokens"]) == 5
    assert s["tokens_per_s"] > 0


def test_seeded_prompt_is_reproducible(capsys: pytest.CaptureFixture[str]) -> None:
    """The same --seed gives the same tokens; --quiet prints nothing for a clean run."""
    outs = []
    for _ in range(2):
        rc, out, _ = run(capsys, "run", "--max-new-tokens", "4", "--seed", "3", "--json")
        outs.append(json.loads(out)["output_tokens"])
    assert outs[0] == outs[1]
    rc, out, err = run(capsys, "run", "--max-new-tokens", "3", "--quiet")
    assert (rc, out) == (0, "")


def test_progress_line(capsys: pytest.CaptureFixture[str]) -> None:
    """``--progress`` writes progress lines to stderr."""
    rc, _, err = run(capsys, "run", "--max-new-tokens", "3", "--progress")
    assert rc == 0 and "step 1/3" in err


# ----------------------------------------------------------------------------- faults

def test_fault_run_reports_both_sides(capsys: pytest.CaptureFixture[str]) -> None:
    """A swap exits 1 and prints full reports naming the popping and the pushing layer."""
    rc, out, _ = run(capsys, "run", "--max-new-tokens", "6", "--fault", "swap@3:layer=1,other=2")
    assert rc == 1
    assert "fault swap@3:layer=1,other=2 fired at step 3" in out
    assert "Pop by   layers.2.attention at step 3" in out
    assert "Push by  layers.1.attention at step 2" in out
    assert "Pop by   layers.1.attention at step 4" in out
    assert "result: 4 violation(s) (owner_mismatch=4)" in out


def test_fault_that_breaks_the_loop(capsys: pytest.CaptureFixture[str]) -> None:
    """A skip ends the decode with an IndexError: reported with the violations, exit 1, no traceback."""
    rc, out, err = run(capsys, "run", "--max-new-tokens", "6", "--fault", "skip@2:layer=1")
    assert rc == 1
    assert "the decode loop raised IndexError" in out
    assert "cachescope: leftover" in out and "cachescope: pop_empty" in out
    assert "Traceback" not in out + err


@pytest.mark.parametrize("name", list(FAULTS))
def test_each_fault_from_the_command_line(capsys: pytest.CaptureFixture[str], name: str) -> None:
    """Every catalogue fault, at its default step, makes ``run`` exit 1 with its expected kinds."""
    rc, out, _ = run(capsys, "run", "--max-new-tokens", "6", "--fault", name, "--json")
    assert rc == 1
    s = json.loads(out)
    assert set(FAULTS[name].expected_kinds) <= set(s["violations_by_kind"])
    assert s["fault_events"] and s["faults_not_fired"] == []
    assert all("report" in v and v["kind"] in cachescope.KINDS for v in s["violations"])


def test_strict_stops_at_the_first_violation(capsys: pytest.CaptureFixture[str]) -> None:
    """``--strict`` stops at the first violation, reports it and exits 1."""
    rc, out, _ = run(capsys, "run", "--max-new-tokens", "6", "--fault", "swap@2", "--strict")
    assert rc == 1
    assert "stopped at the first violation (--strict)" in out
    assert "result: 1 violation(s) (owner_mismatch=1)" in out


def test_several_faults(capsys: pytest.CaptureFixture[str]) -> None:
    """``--fault`` is repeatable; each fault fires at its own step."""
    rc, out, _ = run(capsys, "run", "--max-new-tokens", "8", "--json",
                     "--fault", "swap@1:layer=0,other=1", "--fault", "swap@5:layer=2,other=3")
    assert rc == 1
    s = json.loads(out)
    assert [e["step"] for e in s["fault_events"]] == [1, 5]
    assert sorted({v["step"] for v in s["violations"]}) == [1, 2, 5, 6]


# ----------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize(("args", "message"), [
    (["run", "--fault", "explode@3"], "unknown fault 'explode'"),
    (["run", "--fault", "swap@x"], "bad step 'x'"),
    (["run", "--fault", "skip@2:depth=1"], "has no parameter 'depth'"),
    (["run", "--fault", "swap@40"], "step 40 never comes"),
    (["run", "--fault", "skip@2:layer=9"], "layer=9 is out of range"),
    (["run", "--checkpoint", "/nonexistent/ckpt"], "is not a directory"),
    (["run", "--prompt-ids", "1,x,3"], "comma-separated token ids"),
    (["run", "--prompt-ids", "1,99999"], "out of range for a vocabulary of 512"),
    (["run", "--prompt-ids", "1", "--prompt-tokens", "3"], "not allowed with argument"),
    (["run", "--prompt-tokens", "0"], "positive integer"),
    (["run", "--max-new-tokens", "many"], "positive integer"),
    (["run", "--max-new-tokens", "5000"], "max_position_embeddings"),
    (["run", "--metrics-port", "70000"], "0..65535"),
    (["run", "--trace-sample", "2"], "[0, 1]"),
    (["run", "--otlp-endpoint", "localhost:4318"], "is not a URL"),
    (["run", "--device", "tpu"], "use cpu or cuda"),
    (["run", "--preset", "gpt-5"], "invalid choice"),
    (["run", "--bogus"], "unrecognized arguments"),
    (["run", "--record", "/nonexistent/dir/run.jsonl"], "cannot write"),
    (["frobnicate"], "invalid choice"),
    (["analyze", "/nonexistent/run.jsonl"], "no such file"),
    (["report", "/nonexistent/run.jsonl", "--out", "x"], "no such file"),
])
def test_bad_arguments_exit_2_with_a_message(capsys: pytest.CaptureFixture[str], args: list[str],
                                            message: str) -> None:
    """Bad arguments exit 2 with a one-line message naming the problem and no traceback."""
    rc, out, err = run(capsys, *args)
    assert rc == 2
    assert message in err
    assert "Traceback" not in err + out


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``--device cuda`` without CUDA exits 2 saying CUDA is not available."""
    rc, _, err = run(capsys, "run", "--device", "cuda")
    assert rc == 2 and "CUDA is not available" in err


def test_checkpoint_without_config_is_a_clear_error(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    """A checkpoint directory without config.json exits 2 with the loader's message."""
    rc, _, err = run(capsys, "run", "--checkpoint", str(tmp_path))
    assert rc == 2 and "config.json" in err and "Traceback" not in err


def test_port_in_use_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A metrics port already in use exits 2 with the metrics module's message."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, _, err = run(capsys, "run", "--max-new-tokens", "2", "--metrics-port", str(port))
    assert rc == 2 and "in use" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- exporters and subcommands

def test_record_then_analyze_and_report_delegate(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``--record`` writes a recording; ``analyze`` / ``report`` hand their arguments to analyze/plots."""
    path = tmp_path / "run.jsonl"
    rc, _, err = run(capsys, "run", "--max-new-tokens", "3", "--record", str(path), "--quiet")
    assert rc == 0, err
    header = json.loads(path.read_text().splitlines()[0])
    assert header
    calls: list[tuple[str, Any]] = []
    analyze = types.ModuleType("cachescope.analyze")
    analyze.main_analyze = lambda ns: calls.append(("analyze", ns)) or 1  # type: ignore[attr-defined]
    plots = types.ModuleType("cachescope.plots")
    plots.main_report = lambda ns: calls.append(("report", ns)) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cachescope.analyze", analyze)
    monkeypatch.setitem(sys.modules, "cachescope.plots", plots)
    assert run(capsys, "analyze", str(path), "--quiet")[0] == 1
    assert run(capsys, "report", str(path), "--out", str(tmp_path / "pics"))[0] == 0
    assert [(c, ns.file) for c, ns in calls] == [("analyze", str(path)), ("report", str(path))]
    assert calls[0][1].quiet is True and calls[1][1].out == str(tmp_path / "pics")
    assert calls[0][1].out is None and calls[1][1].quiet is False


def test_analyze_a_real_recording(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A faulty run recorded with --record is analyzed by the real analyze module: exit 1, same kinds."""
    pytest.importorskip("cachescope.analyze")
    path = tmp_path / "run.jsonl.gz"
    rc, out, _ = run(capsys, "run", "--max-new-tokens", "6", "--fault", "swap@2", "--record",
                     str(path), "--json")
    assert rc == 1
    kinds = set(json.loads(out)["violations_by_kind"])
    rc, out, err = run(capsys, "analyze", str(path), "--quiet")
    assert rc == 1, err
    assert all(k in out for k in kinds)


def test_console_traces(capsys: pytest.CaptureFixture[str]) -> None:
    """``--console-traces`` runs cleanly with spans printed to stderr."""
    rc, _, err = run(capsys, "run", "--max-new-tokens", "2", "--console-traces", "--quiet")
    assert rc == 0 and "trace_id" in err


def test_metrics_served_during_a_run(capsys: pytest.CaptureFixture[str]) -> None:
    """``--metrics-port 0`` prints the serving line with the chosen port."""
    rc, _, err = run(capsys, "run", "--max-new-tokens", "2", "--metrics-port", "0", "--quiet")
    assert rc == 0 and SERVING.search(err)


def test_serve_exposes_metrics_and_stops_on_sigterm() -> None:
    """``--serve --metrics-port 0`` serves cachescope_ metrics on 127.0.0.1 and exits 0 on SIGTERM."""
    rc, out, err, body = serve_scrape_and_stop(
        ["run", "--serve", "--metrics-port", "0", "--max-new-tokens", "4", "--fault", "swap@1"],
        ROOT, env(), r'cachescope_violations_total\{[^}]*kind="owner_mismatch"[^}]*\} [1-9]')
    assert "cachescope_ops_total" in body and "cachescope_decode_tokens_total" in body
    assert rc == 0, err
    assert "result:" in out and "owner_mismatch" in out
    assert "Traceback" not in err


def test_run_from_a_hugging_face_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``--checkpoint DIR`` decodes with the loaded model (its shapes in the summary); a fault still maps to its layers."""
    save_tiny_neox_checkpoint(tmp_path)
    rc, out, err = run(capsys, "run", "--checkpoint", str(tmp_path), "--max-new-tokens", "4")
    assert rc == 0, err
    assert f"checkpoint {tmp_path} (3 layers, hidden 32, vocab 128)" in out
    rc, out, _ = run(capsys, "run", "--checkpoint", str(tmp_path), "--max-new-tokens", "4",
                     "--fault", "swap@1:layer=1,other=2", "--json")
    assert rc == 1
    s = json.loads(out)
    assert [(v["consumer"], v["producer"]) for v in s["violations"] if v["step"] == 1] == [
        ("layers.2.attention", "layers.1.attention"), ("layers.1.attention", "layers.2.attention")]
    rc, _, err = run(capsys, "run", "--checkpoint", str(tmp_path), "--prompt-ids", "1,200")
    assert rc == 2 and "vocabulary of 128" in err
