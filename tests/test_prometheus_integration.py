"""End to end: real `cachescope run --serve` exporters, a real Prometheus, the dashboard, the rules.

Two decode processes serve /metrics on loopback ports: a clean one and one with an injected
fault (`--fault swap@3`). A real Prometheus scrapes both every second with the alert rules
loaded; then every panel query of the generated dashboard must return data, the violation panels
and the pop-order alert must show the fault (and only for the faulty run), `promtool check
metrics` must accept the live exposition, and every metric the dashboard and rules use must be
exposed. Fails (does not skip) when Prometheus is missing and CI is set.

The command is `python -m cachescope` (the `cachescope` script beside the interpreter when the
package has no __main__); CACHESCOPE_CLI overrides it (a shell-split command prefix).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from _prom import (
    GRAFANA_SUBSTITUTIONS,
    HF_ROW,
    PROMTOOL,
    ROOT,
    RULES_FILE,
    PromHandle,
    contract_name,
    dashboard_targets,
    exposed_metric_names,
    free_port,
    label_values,
    load_contract,
    load_dashboard,
    metric_tokens,
    require_binary,
    rule_exprs,
    start_prometheus,
    substitute,
    variable_queries,
    wait_for_every_panel_query,
)

STARTUP_TIMEOUT = 180  # importing torch and building the model on a 2-core machine
DATA_TIMEOUT = 120


@dataclass
class Run:
    """One `cachescope run --serve` process."""

    name: str
    proc: subprocess.Popen
    port: int
    log: Path
    cache: str | None  # the cache label when --cache-name is supported
    args: list[str] = field(default_factory=list)

    @property
    def instance(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.instance}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGINT (the CLI's documented stop), then SIGTERM, then SIGKILL."""
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                return
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue


def cli_command() -> list[str]:
    """The command prefix that runs the cachescope CLI."""
    if os.environ.get("CACHESCOPE_CLI"):
        return shlex.split(os.environ["CACHESCOPE_CLI"])
    script = Path(sys.executable).parent / "cachescope"
    if not (ROOT / "cachescope" / "__main__.py").exists() and script.exists():
        return [str(script)]
    return [sys.executable, "-m", "cachescope"]


def cli_help() -> str:
    """`cachescope run --help`; fails the test with the output if the CLI is missing."""
    proc = subprocess.run(
        [*cli_command(), "run", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
    )
    assert proc.returncode == 0, (
        f"`{' '.join(cli_command())} run --help` failed (the CLI of `cachescope run --serve` "
        f"is needed):\n{proc.stdout}\n{proc.stderr}"
    )
    for option in ("--serve", "--metrics-port", "--metrics-addr", "--fault"):
        assert option in proc.stdout, f"`cachescope run` has no {option} option:\n{proc.stdout}"
    return proc.stdout


def start_run(name: str, tmp: Path, named_caches: bool, extra: list[str]) -> Run:
    """Start `python -m cachescope run --serve` on a free loopback port."""
    port = free_port()
    args = [
        *cli_command(),
        "run",
        "--serve",
        "--metrics-port",
        str(port),
        "--metrics-addr",
        "127.0.0.1",
        *extra,
    ]
    if named_caches:
        args += ["--cache-name", name]
    log = tmp / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return Run(name, proc, port, log, name if named_caches else None, args)


def wait_until_serving(run: Run, timeout: float = STARTUP_TIMEOUT) -> None:
    """Wait until the run's /metrics answers; fail with its log if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run.proc.poll() is not None:
            pytest.fail(
                f"{run.name} run exited with {run.proc.returncode} before serving metrics\n"
                f"command: {' '.join(run.args)}\n{run.log_tail()}"
            )
        try:
            if "cachescope_" in run.metrics():
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{run.name} run did not serve /metrics within {timeout}s\n{run.log_tail()}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[PromHandle, dict[str, Run]]]:
    """A clean and a faulty decode run, scraped every second by Prometheus with the rules."""
    require_binary("prometheus")  # before the CLI: missing Prometheus is the clearer failure
    named = "--cache-name" in cli_help()
    tmp = tmp_path_factory.mktemp("e2e")
    runs: dict[str, Run] = {}
    try:
        runs["clean"] = start_run("clean", tmp, named, [])
        runs["faulty"] = start_run("faulty", tmp, named, ["--fault", "swap@3"])
        for run in runs.values():
            wait_until_serving(run)
        targets = [run.instance for run in runs.values()]
        with start_prometheus(targets, tmp, "1s", rule_files=[RULES_FILE]) as prom:
            prom.wait_for('count(up{job="cachescope"} == 1) == 2', timeout=60)
            # both runs keep decoding: tokens/s is positive for each
            prom.wait_for(
                "count(rate(cachescope_decode_tokens_total[15s]) > 0) == 2", timeout=DATA_TIMEOUT
            )
            yield prom, runs
    finally:
        for run in runs.values():
            run.stop()


def only(run: Run) -> dict[str, str]:
    """Variable values selecting one run (by instance, and by cache when caches are named)."""
    values = dict(GRAFANA_SUBSTITUTIONS, instance=run.instance.replace(".", r"\\."))
    if run.cache:
        values["cache"] = run.cache
    return values


def test_every_panel_query_returns_data(stack) -> None:
    """Every panel target of the generated dashboard returns a non-empty result (the Hugging
    Face row excepted: this run has no transformers cache; tests/test_hf_live.py fills it)."""
    prom, _ = stack
    wait_for_every_panel_query(prom, load_dashboard(), timeout=DATA_TIMEOUT, exclude_rows=(HF_ROW,))


def test_variable_queries_list_both_runs(stack) -> None:
    """The job/instance/cache/family variables list values, and instance lists both runs."""
    prom, runs = stack
    job, instance, cache, family, rank = (
        label_values(prom, q) for q in variable_queries(load_dashboard())
    )
    assert rank == []  # single-process runs have no rank label
    assert job == ["cachescope"]
    assert sorted(instance) == sorted(run.instance for run in runs.values())
    assert cache and family
    if runs["clean"].cache:
        assert {"clean", "faulty"} <= set(cache)


def test_violation_panels_show_the_injected_fault(stack) -> None:
    """The violations table, stat and by-kind panels show violations for the faulty run only."""
    prom, runs = stack
    by_title = {p["title"]: p for p in load_dashboard()["panels"]}
    faulty, clean = runs["faulty"], runs["clean"]

    table = by_title["Violations (current totals)"]["targets"][0]["expr"]
    rows = prom.wait_for(
        substitute(table, only(faulty)),
        timeout=DATA_TIMEOUT,
        predicate=lambda r: any(float(x["value"][1]) > 0 for x in r),
    )
    assert all(x["metric"]["instance"] == faulty.instance for x in rows)
    clean_rows = prom.query(substitute(table, only(clean)))
    assert all(float(x["value"][1]) == 0 for x in clean_rows), clean_rows

    stat = by_title["Violations (last 5m)"]["targets"][0]["expr"]
    (value,) = prom.query(substitute(stat, only(faulty)))
    assert float(value["value"][1]) > 0
    (value,) = prom.query(substitute(stat, only(clean)))
    assert float(value["value"][1]) == 0

    by_kind = by_title["Violations by kind and family (cumulative)"]["targets"][0]["expr"]
    series = prom.query(substitute(by_kind, only(faulty)))
    assert any(float(s["value"][1]) > 0 and s["metric"].get("kind") for s in series), series


def test_pop_order_alert_fires_for_the_faulty_run_only(stack) -> None:
    """CachescopePopOrderViolation fires for the faulty run's instance and not for the clean one."""
    prom, runs = stack
    firing = prom.wait_for(
        'ALERTS{alertname="CachescopePopOrderViolation", alertstate="firing"}', timeout=60
    )
    instances = {a["metric"]["instance"] for a in firing}
    assert instances == {runs["faulty"].instance}, firing


def test_live_exposition_passes_promtool_check_metrics(stack) -> None:
    """`promtool check metrics` accepts each run's live /metrics page."""
    _, runs = stack
    promtool = require_binary("promtool", PROMTOOL)
    for run in runs.values():
        proc = subprocess.run(
            [promtool, "check", "metrics"],
            input=run.metrics(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, f"{run.name}: {proc.stdout}{proc.stderr}"


def test_every_metric_used_is_exposed(stack) -> None:
    """Every metric the dashboard and the alert rules use appears in the live scrapes."""
    _, runs = stack
    contract = load_contract()
    dashboard = load_dashboard()
    exprs = [t["expr"] for _, t in dashboard_targets(dashboard, (HF_ROW,))] + variable_queries(dashboard)
    exprs += [expr for _, expr in rule_exprs()]
    used = {contract_name(tok, contract) for e in exprs for tok in metric_tokens(e)}
    exposed = set().union(*(exposed_metric_names(run.metrics(), contract) for run in runs.values()))
    missing = sorted(name for name in used if name not in exposed)
    assert not missing, f"used by dashboards/rules but not exposed: {missing}"


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers: `cachescope run --backend hf --serve`, scraped by a real Prometheus
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_stack(tmp_path_factory) -> Iterator[tuple[PromHandle, Run]]:
    """transformers' own generate with a duplicated layer_idx (layer 0's cache gets two modules'
    tokens), serving metrics; Prometheus scrapes it every second with the rules."""
    require_binary("prometheus")
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("e2e-hf")
    run = start_run("hf-faulty", tmp, True, ["--backend", "hf", "--max-new-tokens", "6",
                                             "--fault", "dup-layer-idx"])
    try:
        wait_until_serving(run)
        with start_prometheus([run.instance], tmp, "1s", rule_files=[RULES_FILE]) as prom:
            prom.wait_for('count(up{job="cachescope"} == 1) == 1', timeout=60)
            prom.wait_for("count(rate(cachescope_decode_tokens_total[15s]) > 0) == 1",
                          timeout=DATA_TIMEOUT)
            yield prom, run
    finally:
        run.stop()
    assert run.proc.returncode == 0, run.log_tail()   # SIGINT ends --serve cleanly


def test_hf_run_answers_every_dashboard_query(hf_stack) -> None:
    """Every panel of the dashboard returns data for an HF run, its own row included, and every
    metric the dashboard and the rules use is exposed by it."""
    prom, run = hf_stack
    wait_for_every_panel_query(prom, load_dashboard(), timeout=DATA_TIMEOUT)
    contract = load_contract()
    dashboard = load_dashboard()
    exprs = [t["expr"] for _, t in dashboard_targets(dashboard)] + variable_queries(dashboard)
    exprs += [expr for _, expr in rule_exprs()]
    for _name, expr in rule_exprs():
        prom.query(expr)                  # raises on an evaluation error
    used = {contract_name(tok, contract) for e in exprs for tok in metric_tokens(e)}
    missing = sorted(used - exposed_metric_names(run.metrics(), contract))
    assert not missing, f"used by dashboards/rules but not exposed by the hf run: {missing}"


def test_hf_layer_panels_show_every_layer_and_the_skew(hf_stack) -> None:
    """The per-layer panel has one series per layer of the preset (4), and the skew panel shows
    the duplicated layer's extra tokens (> 0)."""
    prom, run = hf_stack
    panels = {p["title"]: p for p in load_dashboard()["panels"]}
    per_layer = substitute(panels["KV tokens per layer (Hugging Face caches)"]["targets"][0]["expr"],
                           only(run))
    series = prom.wait_for(per_layer, timeout=DATA_TIMEOUT, predicate=lambda r: len(r) == 4)
    assert sorted(s["metric"]["layer"] for s in series) == ["0", "1", "2", "3"]
    skew = substitute(panels["Layer length skew (Hugging Face caches)"]["targets"][0]["expr"],
                      only(run))
    prom.wait_for(skew, timeout=DATA_TIMEOUT,
                  predicate=lambda r: len(r) == 1 and float(r[0]["value"][1]) > 0)


def test_hf_violations_fire_the_pop_order_alert_and_pass_promtool(hf_stack) -> None:
    """The layer's owner mismatches fire CachescopePopOrderViolation for the hf run, labelled
    family="layer", and its /metrics page passes `promtool check metrics`."""
    prom, run = hf_stack
    firing = prom.wait_for(
        'ALERTS{alertname="CachescopePopOrderViolation", alertstate="firing"}', timeout=60)
    assert {(a["metric"]["instance"], a["metric"].get("family")) for a in firing} == {
        (run.instance, "layer")}, firing
    promtool = require_binary("promtool", PROMTOOL)
    proc = subprocess.run([promtool, "check", "metrics"], input=run.metrics(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
