"""A real Prometheus scrapes a real multi-rank run: `cachescope run --nproc 2 --serve` with a
rank fault, every rank found through the file_sd targets file rank 0 writes, read by the shipped
prometheus.yml; every dashboard panel query returns data, the cross-rank alert fires, and each
rank's /metrics page passes `promtool check metrics`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from _multirank_helpers import LAUNCH_TIMEOUT_S, SERVING, _env, _no_leftovers, _read_until, _stop
from _prom import (HF_ROW, PROMTOOL, load_dashboard, require_binary, rule_exprs, shipped_config,
                   start_prometheus, variable_queries, label_values, wait_for_every_panel_query)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_binary("prometheus")
    tmp = tmp_path_factory.mktemp("served")
    marker = f"mr-live-{uuid.uuid4().hex[:8]}"
    targets = tmp / "targets" / "cachescope-ranks.json"
    targets.parent.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachescope", "run", "--nproc", "2", "--serve", "--metrics-port",
         "0", "--targets-file", str(targets), "--max-new-tokens", "6", "--cache-name", marker,
         "--fault", "rank-diverge@2:rank=1"],
        cwd=tmp, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = _read_until(proc, r"wrote Prometheus file_sd targets", LAUNCH_TIMEOUT_S)
        ports = {int(m.group(2)): int(m.group(1)) for m in SERVING.finditer(seen)}
        assert sorted(ports) == [0, 1], seen
        config = shipped_config(targets.parent / "*.json")
        with start_prometheus([], tmp, config=config) as prom:
            prom.wait_for('count(up{job="cachescope"} == 1) == 2', timeout=60)
            yield prom, ports, targets, marker, proc
    finally:
        _stop(proc)


def test_file_sd_finds_every_rank_with_its_labels(served) -> None:
    prom, ports, targets, _, _ = served
    groups = json.loads(targets.read_text())
    assert sorted(g["labels"]["rank"] for g in groups) == ["0", "1"]
    up = prom.query('up{job="cachescope"}')
    assert sorted((u["metric"]["rank"], u["metric"]["instance"]) for u in up) == [
        ("0", f"127.0.0.1:{ports[0]}"), ("1", f"127.0.0.1:{ports[1]}")]
    assert label_values(prom, variable_queries(load_dashboard())[-1]) == ["0", "1"]


def test_every_panel_query_returns_data(served) -> None:
    prom = served[0]
    wait_for_every_panel_query(prom, load_dashboard(), timeout=90, exclude_rows=(HF_ROW,))


def test_rule_queries_evaluate_and_the_cross_rank_alert_fires(served) -> None:
    prom, _, _, marker, _ = served
    for _name, expr in rule_exprs():
        prom.query(expr)                  # raises on an evaluation error
    firing = prom.wait_for(
        f'ALERTS{{alertname="CachescopeRankViolation", alertstate="firing", cache="{marker}"}}',
        timeout=90)
    assert "1" in {a["metric"]["rank"] for a in firing}
    assert {a["metric"]["kind"] for a in firing} == {"rank_divergence"}


def test_each_rank_exposition_passes_promtool(served) -> None:
    _, ports, _, _, _ = served
    promtool = require_binary("promtool", PROMTOOL)
    for rank, port in ports.items():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            page = resp.read()
        assert f'rank="{rank}"'.encode() in page
        proc = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sigterm_ends_the_served_run_cleanly(served) -> None:
    _, _, targets, marker, proc = served
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "rank_divergence" in out and "Traceback" not in err
    assert not targets.exists()
    assert _no_leftovers(marker) == []
