"""Start a real Prometheus on loopback for tests, and query it (stdlib only).

    with start_prometheus(["127.0.0.1:9464"], tmp_path) as prom:
        prom.wait_for('up{job="cachescope"} == 1', timeout=30)
        prom.query("sum(cachescope_ops_total)")

Also: ``require_binary`` (skip locally / fail under CI when a tool is missing) and
``serve_text`` (a tiny loopback HTTP server for synthetic /metrics pages).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"


def require_binary(name: str, default: str | None = None) -> str:
    """Path of tool ``name``; skips the test when missing, but fails it when CI is set."""
    path = default if default and os.access(default, os.X_OK) else shutil.which(name)
    if path:
        return path
    reason = (
        f"{name} not found (install Debian's prometheus package: apt-get install -y prometheus)"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip")
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromQueryError(RuntimeError):
    """The Prometheus HTTP API answered with an error (bad PromQL, timeout, ...)."""


class PromHandle:
    """A running Prometheus process and a small client for its HTTP API."""

    def __init__(self, proc: subprocess.Popen, port: int, workdir: Path, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.workdir = workdir
        self.log_path = log_path

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> PromHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop Prometheus (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of Prometheus' log, for failure messages."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    # -- HTTP API ----------------------------------------------------------------------------
    def get(self, path: str, params: dict[str, str] | None = None, timeout: float = 10) -> Any:
        """GET ``path`` and return the decoded JSON (the raw text for non-JSON answers)."""
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body = resp.read().decode()
        except urllib.error.HTTPError as e:  # API errors come with a JSON body
            body = e.read().decode(errors="replace")
            try:
                return json.loads(body)
            except ValueError:
                raise PromQueryError(f"HTTP {e.code} for {url}: {body[:500]}") from e
        try:
            return json.loads(body)
        except ValueError:
            return body

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query; returns ``data.result`` (vector samples; ``[t, v]`` for a scalar)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        answer = self.get("/api/v1/query", params)
        if not isinstance(answer, dict) or answer.get("status") != "success":
            raise PromQueryError(f"query {expr!r} failed: {answer}")
        data = answer["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        """Range query; returns ``data.result`` (matrix)."""
        answer = self.get(
            "/api/v1/query_range",
            {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": str(step)},
        )
        if not isinstance(answer, dict) or answer.get("status") != "success":
            raise PromQueryError(f"query_range {expr!r} failed: {answer}")
        return answer["data"]["result"]

    def wait_for(
        self,
        expr: str,
        timeout: float = 30,
        predicate: Callable[[list[dict]], bool] = bool,
        interval: float = 0.5,
    ) -> list[dict]:
        """Poll ``expr`` until ``predicate(result)`` (default: non-empty), else TimeoutError."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{expr!r} not satisfied after {timeout}s; last result: {result}"
                )
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            time.sleep(interval)

    def targets(self) -> list[dict]:
        """Active scrape targets (``/api/v1/targets``)."""
        return self.get("/api/v1/targets")["data"]["activeTargets"]

    def alerts(self) -> list[dict]:
        """Pending and firing alerts (``/api/v1/alerts``)."""
        return self.get("/api/v1/alerts")["data"]["alerts"]


def write_config(
    path: Path,
    targets: list[str],
    scrape_interval: str = "1s",
    job: str = "cachescope",
    rule_files: list[str | Path] | None = None,
) -> Path:
    """Write a Prometheus config scraping ``targets`` as ``job`` (JSON is valid YAML)."""
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(Path(r).resolve()) for r in rule_files or []],
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    path.write_text(json.dumps(config, indent=2))
    return path


def start_prometheus(
    targets: list[str],
    tmp_path: Path,
    scrape_interval: str = "1s",
    *,
    job: str = "cachescope",
    rule_files: list[str | Path] | None = None,
    ready_timeout: float = 60,
    config: dict[str, Any] | None = None,
) -> PromHandle:
    """Start Prometheus on a free loopback port scraping ``targets``; wait until it is ready.

    ``config``: a whole Prometheus config (e.g. from ``shipped_config``) to use instead of the
    one built from ``targets``/``job``/``rule_files``. Config, TSDB and log live under
    ``tmp_path/prometheus``. Use the handle as a context manager (or call ``close()``) to stop it.
    """
    binary = require_binary("prometheus", PROMETHEUS)
    workdir = Path(tmp_path) / "prometheus"
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    if config is None:
        config = write_config(workdir / "prometheus.yml", targets, scrape_interval, job, rule_files)
    else:
        (workdir / "prometheus.yml").write_text(json.dumps(config, indent=2))
        config = workdir / "prometheus.yml"
    log_path = workdir / "prometheus.log"
    last_error = ""
    for _attempt in range(3):  # the free port may be taken between probe and bind
        port = free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=info",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        handle = PromHandle(proc, port, workdir, log_path)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                last_error = f"prometheus exited with {proc.returncode}:\n{handle.log_tail()}"
                break
            try:
                with urllib.request.urlopen(handle.url + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return handle
            except (TimeoutError, urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        else:
            handle.close()
            raise TimeoutError(f"prometheus not ready after {ready_timeout}s:\n{handle.log_tail()}")
        handle.close()
        if "address already in use" not in last_error:
            break
    raise RuntimeError(last_error)


@contextmanager
def serve_text(render: Callable[[], str]) -> Iterator[str]:
    """Serve ``render()`` as a Prometheus text exposition on a loopback port; yields host:port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body = render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# Dashboard / rules / metrics-contract helpers shared by the dashboard, rules and integration
# tests.
# ---------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD_JSON = ROOT / "dashboards" / "grafana" / "cachescope.json"
GENERATOR = ROOT / "dashboards" / "generate.py"
RULES_FILE = ROOT / "dashboards" / "prometheus" / "rules" / "cachescope.rules.yml"
PROMETHEUS_YML = ROOT / "dashboards" / "prometheus" / "prometheus.yml"
METRICS_DOC = ROOT / "docs" / "metrics.md"

_METRIC_TOKEN = re.compile(r"cachescope_[a-z_]+")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def load_contract(path: Path = METRICS_DOC) -> dict[str, dict[str, Any]]:
    """Metric name -> {"type": ..., "labels": set[str]} from the table in docs/metrics.md."""
    contract: dict[str, dict[str, Any]] = {}
    row = re.compile(r"^\|\s*`(cachescope_[a-z_]+)`\s*\|\s*(\w+)\s*\|\s*([^|]*)\|")
    for line in path.read_text().splitlines():
        m = row.match(line)
        if m:
            labels = {part.strip() for part in m.group(3).split(",") if part.strip()}
            contract[m.group(1)] = {"type": m.group(2), "labels": labels}
    return contract


def contract_name(token: str, contract: dict[str, dict[str, Any]]) -> str | None:
    """The contract metric a PromQL token refers to (histogram series map to the histogram)."""
    if token in contract:
        return token
    for suffix in _HISTOGRAM_SUFFIXES:
        base = token[: -len(suffix)]
        if token.endswith(suffix) and contract.get(base, {}).get("type") == "histogram":
            return base
    return None


def metric_tokens(expr: str) -> set[str]:
    """Every ``cachescope_*`` token in a PromQL expression."""
    return set(_METRIC_TOKEN.findall(expr))


def selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]] | None]]:
    """(metric, {label: (op, value)} or None when the metric has no ``{...}``) for each use."""
    out = []
    for m in re.finditer(r"(cachescope_[a-z_]+)(\{([^}]*)\})?", expr):
        if m.group(2) is None:
            out.append((m.group(1), None))
            continue
        matchers = {
            lm.group(1): (lm.group(2), lm.group(3))
            for lm in re.finditer(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', m.group(3))
        }
        out.append((m.group(1), matchers))
    return out


def load_dashboard(path: Path = DASHBOARD_JSON) -> dict[str, Any]:
    """The committed dashboard JSON."""
    return json.loads(path.read_text())


#: The dashboard row that only runs on Hugging Face caches (cachescope.hf) fill: a run of the
#: reference or labml model leaves it empty (dashboards/generate.py's HF_ROW).
HF_ROW = "Hugging Face cache layers"


def dashboard_targets(dashboard: dict[str, Any],
                      exclude_rows: tuple[str, ...] = ()) -> list[tuple[dict, dict]]:
    """(panel, target) for every query target of every panel (rows' nested panels included),
    except the panels of the rows titled in ``exclude_rows`` (each must exist)."""
    rows = {p["title"] for p in dashboard["panels"] if p.get("type") == "row"}
    missing = set(exclude_rows) - rows
    assert not missing, f"no dashboard row titled {sorted(missing)} (rows: {sorted(rows)})"
    out = []
    current = None
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            current = panel["title"]
        if current in exclude_rows:
            continue
        for p in [panel, *panel.get("panels", [])]:
            for t in p.get("targets", []):
                out.append((p, t))
    return out


def variable_queries(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL of every query variable."""
    out = []
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def rule_exprs(path: Path = RULES_FILE) -> list[tuple[str, str]]:
    """(alert or record name, expr) for every rule in the rules file (needs PyYAML)."""
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    doc = yaml.safe_load(path.read_text())
    return [
        (r.get("alert") or r.get("record"), r["expr"]) for g in doc["groups"] for r in g["rules"]
    ]


def shipped_config(
    targets_files: str | Path, scrape_interval: str = "1s", static: bool = False
) -> dict[str, Any]:
    """dashboards/prometheus/prometheus.yml as a dict, made runnable from a temporary directory.

    Its file_sd job (``cachescope-ranks``) reads ``targets_files`` (an absolute path or glob,
    e.g. the file ``cachescope._filesd.write_targets`` wrote) instead of ``targets/*.json``;
    rule files become absolute; every interval becomes ``scrape_interval``. The static job
    (``127.0.0.1:9464``) is left out unless ``static``. Needs PyYAML.
    """
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = scrape_interval
    config["rule_files"] = [str(PROMETHEUS_YML.parent / r) for r in config["rule_files"]]
    jobs = []
    for job in config["scrape_configs"]:
        if "static_configs" in job and not static:
            continue
        job["scrape_interval"] = job["scrape_timeout"] = scrape_interval
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [str(targets_files)]
            sd["refresh_interval"] = "1s"
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


#: Values the integration tests give Grafana's variables when running panel queries directly.
GRAFANA_SUBSTITUTIONS = {
    "datasource": "prometheus",
    "job": ".*",
    "instance": ".*",
    "cache": ".*",
    "family": ".*",
    "rank": ".*",
    "__rate_interval": "15s",
    "__interval": "5s",
    "__range": "5m",
}


def substitute(expr: str, values: dict[str, str] = GRAFANA_SUBSTITUTIONS) -> str:
    """Replace ``$var`` / ``${var}`` Grafana variables in ``expr``; unknown ones raise KeyError."""

    def repl(m: re.Match) -> str:
        return values[m.group(1) or m.group(2)]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def wait_for_every_panel_query(
    prom: PromHandle, dashboard: dict[str, Any], timeout: float = 60,
    exclude_rows: tuple[str, ...] = (),
) -> dict[str, list[dict]]:
    """Run every panel target (variables substituted) until each returns data (the panels of
    ``exclude_rows``: not, e.g. ``HF_ROW`` for a run without Hugging Face caches).

    Returns {substituted expr: result}. Raises AssertionError naming every panel whose query
    stayed empty (or failed) within ``timeout`` seconds overall.
    """
    deadline = time.monotonic() + timeout
    results: dict[str, list[dict]] = {}
    failures: list[str] = []
    for panel, target in dashboard_targets(dashboard, exclude_rows):
        expr = substitute(target["expr"])
        if expr in results:
            continue
        try:
            results[expr] = prom.wait_for(expr, timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            failures.append(f"{panel['title']} [{target['refId']}]: empty: {expr}")
        except PromQueryError as e:
            failures.append(f"{panel['title']} [{target['refId']}]: error: {e}")
    assert not failures, "panel queries without data:\n" + "\n".join(failures)
    return results


def label_values(prom: PromHandle, variable_query: str) -> list[str]:
    """Evaluate Grafana's ``label_values(selector, label)`` the way its Prometheus source does."""
    m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", substitute(variable_query).strip())
    assert m, variable_query
    selector, label = m.group(1), m.group(2)
    answer = prom.get(f"/api/v1/label/{label}/values", {"match[]": selector})
    assert answer.get("status") == "success", answer
    return answer["data"]


def exposed_metric_names(exposition: str, contract: dict[str, dict[str, Any]]) -> set[str]:
    """Contract names present in a text exposition (as a TYPE/HELP line or as samples)."""
    names = set()
    for line in exposition.splitlines():
        m = re.match(r"#\s+(?:TYPE|HELP)\s+(\S+)", line) or re.match(r"([a-zA-Z_:][\w:]*)", line)
        if m:
            name = contract_name(m.group(1), contract)
            if name:
                names.add(name)
    return names
