"""Structure of the generated Grafana dashboard, its provisioning, and the metric-name contract."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest

from _prom import (
    DASHBOARD_JSON,
    GENERATOR,
    ROOT,
    contract_name,
    dashboard_targets,
    load_contract,
    load_dashboard,
    metric_tokens,
    rule_exprs,
    selectors,
    substitute,
    variable_queries,
)

DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
ROWS = ["Overview", "Queues", "Memory", "Operations", "Violations", "Ranks", "Hugging Face cache layers"]
FILTER_LABELS = {"job": "$job", "instance": "$instance", "cache": "$cache", "rank": "$rank"}
#: Constant labels of multi-rank runs (docs/metrics.md, cachescope.metrics.RANK_LABELS).
RANK_LABELS = {"rank", "tp_rank", "pp_rank"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    """The committed dashboard JSON."""
    return load_dashboard()


@pytest.fixture(scope="module")
def generator():
    """dashboards/generate.py loaded as a module."""
    spec = importlib.util.spec_from_file_location("cachescope_dashboard_generate", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def contract() -> dict:
    """The metrics contract parsed from docs/metrics.md."""
    parsed = load_contract()
    assert len(parsed) >= 10, f"could not parse docs/metrics.md: {parsed}"
    return parsed


def visual_panels(dashboard: dict) -> list[dict]:
    """Every panel that is not a row."""
    return [p for p in dashboard["panels"] if p["type"] != "row"]


# -- generator -------------------------------------------------------------------------------


def test_committed_json_equals_generator_output(generator) -> None:
    """The committed JSON is byte-for-byte what generate.py renders."""
    assert DASHBOARD_JSON.read_text() == generator.render(), (
        "dashboards/grafana/cachescope.json is stale: run `python dashboards/generate.py`"
    )


def test_generate_check_exits_zero_when_fresh() -> None:
    """`generate.py --check` exits 0 for the committed file."""
    proc = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_generate_check_fails_with_message_when_stale(tmp_path: Path) -> None:
    """`generate.py --check` exits non-zero and says how to fix a stale or missing file."""
    stale = tmp_path / "cachescope.json"
    stale.write_text(DASHBOARD_JSON.read_text().replace("Tokens / s", "Tokens per second"))
    for path in (stale, tmp_path / "missing.json"):
        proc = subprocess.run(
            [sys.executable, str(GENERATOR), "--check", "--output", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0
        assert "python dashboards/generate.py" in proc.stderr


def test_generate_writes_the_output_file(tmp_path: Path, generator) -> None:
    """`generate.py --output PATH` writes the rendered dashboard there."""
    out = tmp_path / "sub" / "dash.json"
    proc = subprocess.run(
        [sys.executable, str(GENERATOR), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == generator.render()


def test_committed_json_is_sorted_and_two_space_indented() -> None:
    """The committed file is sorted-key, 2-space indented JSON ending in a newline."""
    text = DASHBOARD_JSON.read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


# -- identity and variables ------------------------------------------------------------------


def test_dashboard_identity(dashboard: dict) -> None:
    """uid, title, schemaVersion and tags are the stable ones."""
    assert dashboard["uid"] == "cachescope-overview"
    assert dashboard["title"] == "cachescope: KV cache"
    assert dashboard["schemaVersion"] == 39
    assert dashboard["id"] is None
    assert "cachescope" in dashboard["tags"]


def test_template_variables(dashboard: dict) -> None:
    """datasource, job, instance, cache, family and rank variables exist and are wired correctly."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "instance", "cache", "family", "rank"]
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("job", "instance", "cache", "family", "rank"):
        v = variables[name]
        assert v["type"] == "query", name
        assert v["datasource"] == DATASOURCE_REF, name
        query = v["query"]["query"]
        assert v["definition"] == query
        assert re.fullmatch(rf"label_values\(cachescope_ops_total(\{{.*\}})?, {name}\)", query), (
            query
        )
        if v["includeAll"]:
            assert v["allValue"] == ".*", name
    for name in ("cache", "family", "rank"):
        assert variables[name]["multi"] and variables[name]["includeAll"], name
    # each variable narrows by the ones before it
    assert 'job=~"$job"' in variables["instance"]["query"]["query"]
    assert 'instance=~"$instance"' in variables["cache"]["query"]["query"]
    assert 'cache=~"$cache"' in variables["family"]["query"]["query"]
    assert 'cache=~"$cache"' in variables["rank"]["query"]["query"]


# -- panels ----------------------------------------------------------------------------------


def test_rows_in_order(dashboard: dict) -> None:
    """The rows are Overview, Queues, Memory, Operations, Violations, each followed by panels."""
    panels = dashboard["panels"]
    assert [p["title"] for p in panels if p["type"] == "row"] == ROWS
    for i, p in enumerate(panels):
        if p["type"] == "row":
            assert not p["collapsed"] and p["panels"] == []
            assert i + 1 < len(panels) and panels[i + 1]["type"] != "row", p["title"]
    assert panels[0]["type"] == "row"


def test_every_panel_and_target_uses_the_datasource_variable(dashboard: dict) -> None:
    """Every panel (rows too) and every target references `${datasource}`."""
    for p in dashboard["panels"]:
        assert p["datasource"] == DATASOURCE_REF, p["title"]
    for p in visual_panels(dashboard):
        assert p["targets"], f"{p['title']} has no targets"
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE_REF, p["title"]


def test_panel_ids_and_ref_ids_unique(dashboard: dict) -> None:
    """Panel ids are unique and refIds are unique within each panel."""
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in visual_panels(dashboard):
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_grid_positions_are_sane_and_do_not_overlap(dashboard: dict) -> None:
    """Every gridPos fits the 24-column grid, rows span it, and no two panels overlap."""
    rects = []
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert set(g) == {"h", "w", "x", "y"}, p["title"]
        assert all(isinstance(g[k], int) for k in g), p["title"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["w"] >= 1, p["title"]
        assert g["y"] >= 0 and g["h"] >= 1, p["title"]
        if p["type"] == "row":
            assert g == {"h": 1, "w": 24, "x": 0, "y": g["y"]}, p["title"]
        else:
            assert g["h"] >= 3 and g["w"] >= 3, f"{p['title']} is too small"
        rects.append((p["title"], g))
    for (ta, a), (tb, b) in combinations(rects, 2):
        apart = (
            a["x"] + a["w"] <= b["x"]
            or b["x"] + b["w"] <= a["x"]
            or a["y"] + a["h"] <= b["y"]
            or b["y"] + b["h"] <= a["y"]
        )
        assert apart, f"{ta!r} overlaps {tb!r}"
    # panels sit below their row and above the next one
    row_y = None
    for p in dashboard["panels"]:
        if p["type"] == "row":
            assert row_y is None or p["gridPos"]["y"] > row_y
            row_y = p["gridPos"]["y"]
        else:
            assert row_y is not None and p["gridPos"]["y"] > row_y, p["title"]


def test_units_and_legends(dashboard: dict) -> None:
    """Every panel has a unit and every time-series target a readable legend."""
    allowed_units = {"bytes", "s", "ops", "short"}
    for p in visual_panels(dashboard):
        assert p["fieldConfig"]["defaults"].get("unit") in allowed_units, p["title"]
        assert p.get("description"), p["title"]
        if p["type"] == "timeseries":
            for t in p["targets"]:
                legend = t["legendFormat"]
                assert "{{" in legend and legend != "__auto", (p["title"], legend)
                labels = set(re.findall(r"\{\{(\w+)\}\}", legend))
                grouped = re.search(r"by \(([^)]*)\)", t["expr"])
                assert grouped, (p["title"], t["expr"])
                by = {label.strip() for label in grouped.group(1).split(",")}
                assert labels <= by, f"{p['title']}: legend {legend} uses labels not in {by}"


def test_units_match_the_quantity(dashboard: dict) -> None:
    """Byte panels use `bytes`, latency `s`, operation rates `ops`."""
    for p in visual_panels(dashboard):
        unit = p["fieldConfig"]["defaults"]["unit"]
        exprs = " ".join(t["expr"] for t in p["targets"])
        if "cachescope_tensor_bytes" in exprs:
            assert unit == "bytes", p["title"]
        if "duration_seconds" in exprs:
            assert unit == "s", p["title"]
        if "rate(cachescope_ops_total" in exprs:
            assert unit == "ops", p["title"]


def test_required_panels_and_queries(dashboard: dict) -> None:
    """The panels the issue asks for exist with the right query shape."""
    by_title = {p["title"]: p for p in visual_panels(dashboard)}
    exprs = {title: [t["expr"] for t in p["targets"]] for title, p in by_title.items()}

    def find(fragment: str, panel_type: str | None = None) -> list[str]:
        return [
            title
            for title, es in exprs.items()
            if any(fragment in e for e in es)
            and (panel_type is None or by_title[title]["type"] == panel_type)
        ]

    assert find("cachescope_violations_total", "stat"), "violations stat"
    assert find("rate(cachescope_decode_tokens_total"), "tokens/s"
    latency = find("histogram_quantile(")
    assert latency
    quantiles = {
        q for t in latency for e in exprs[t] for q in re.findall(r"histogram_quantile\(([\d.]+)", e)
    }
    assert quantiles == {"0.5", "0.95", "0.99"}
    assert all(
        "cachescope_decode_step_duration_seconds_bucket" in e for t in latency for e in exprs[t]
    )
    assert find("sum by (cache, family) (cachescope_queue_depth{"), "depth by family"
    assert any("state" in e for t in find("cachescope_queues{") for e in exprs[t]), "live vs empty"
    assert any(
        "cachescope_tensor_bytes{" in e and "kind" in e
        for t in find("cachescope_tensor_bytes{")
        for e in exprs[t]
    ), "logical vs storage"
    per_token = find('kind="storage"')
    assert any("cachescope_decode_tokens_total" in e for t in per_token for e in exprs[t])
    assert find("by (cache, family, op) (rate(cachescope_ops_total"), "op rate by op and family"
    assert find("by (cache, family, kind) (cachescope_violations_total", "timeseries")
    tables = [p for p in visual_panels(dashboard) if p["type"] == "table"]
    assert tables, "violations table"
    for t in tables[0]["targets"]:
        assert t["instant"] and not t["range"] and t["format"] == "table"
        assert "cachescope_violations_total" in t["expr"]


# -- queries and the metric-name contract ----------------------------------------------------


def test_every_query_filters_on_the_variables(dashboard: dict, contract: dict) -> None:
    """Every cachescope selector filters job/instance/cache, and family where the metric has it."""
    for panel, target in dashboard_targets(dashboard):
        for metric, matchers in selectors(target["expr"]):
            where = f"{panel['title']}: {metric}"
            assert matchers is not None, f"{where} has no label filters"
            for label, var in FILTER_LABELS.items():
                assert matchers.get(label) == ("=~", var), f'{where} lacks {label}=~"{var}"'
            name = contract_name(metric, contract)
            assert name, f"{where} is not in docs/metrics.md"
            if "family" in contract[name]["labels"]:
                assert matchers.get("family") == ("=~", "$family"), f"{where} lacks family filter"
            else:
                assert "family" not in matchers, f"{where}: metric has no family label"
            for label in matchers:
                assert label in contract[name]["labels"] | {"job", "instance", "le"} | RANK_LABELS, (
                    f"{where} filters on unknown label {label}"
                )


def test_rank_panels(dashboard: dict) -> None:
    """The Ranks row has per-rank tokens/s and violations, the step skew and cross-rank violations."""
    panels = dashboard["panels"]
    ranks = row_panels(panels, "Ranks")
    exprs = {p["title"]: p["targets"][0]["expr"] for p in ranks}
    assert any(e.startswith("sum by (cache, rank) (rate(cachescope_decode_tokens_total{")
               for e in exprs.values()), exprs
    assert any(e.startswith("sum by (cache, rank) (cachescope_violations_total{")
               for e in exprs.values()), exprs
    skew = [e for e in exprs.values() if "cachescope_decode_steps_total" in e]
    assert len(skew) == 1 and re.fullmatch(
        r"max by \(job, cache\) \((cachescope_decode_steps_total\{[^}]*\})\) - "
        r"min by \(job, cache\) \(\1\)", skew[0]), skew
    cross = [e for e in exprs.values() if 'kind=~"rank_.*"' in e]
    assert len(cross) == 1 and cross[0].startswith("sum by (cache, rank, kind) ("), cross
    assert any("by (cache, rank, le)" in e for e in exprs.values()), "step latency by rank"


def row_panels(panels: list[dict], title: str) -> list[dict]:
    """The panels of the row titled ``title`` (up to the next row)."""
    start = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == title)
    out = []
    for p in panels[start + 1:]:
        if p["type"] == "row":
            break
        out.append(p)
    return out


def test_hf_layer_panels(dashboard: dict) -> None:
    """The Hugging Face row draws every layer's length by layer and the layer length skew."""
    exprs = [p["targets"][0]["expr"] for p in row_panels(dashboard["panels"], "Hugging Face cache layers")]
    assert [e.split("{")[0] for e in exprs] == ["max by (cache, layer) (cachescope_layer_kv_tokens",
                                                "max by (cache) (cachescope_layer_kv_skew_tokens"]
    assert all('rank=~"$rank"' in e and 'cache=~"$cache"' in e for e in exprs), exprs


def test_queries_use_only_known_variables(dashboard: dict) -> None:
    """Queries use only dashboard/built-in variables and range windows of $__rate_interval or 5m."""
    for panel, target in dashboard_targets(dashboard):
        substitute(target["expr"])  # raises KeyError for an unknown variable
        windows = set(re.findall(r"\[([^\]]+)\]", target["expr"]))
        assert windows <= {"$__rate_interval", "5m"}, (panel["title"], windows)


def test_metric_names_are_in_the_contract(dashboard: dict, contract: dict) -> None:
    """Every cachescope metric named in the dashboard and the alert rules is in docs/metrics.md."""
    exprs = [t["expr"] for _, t in dashboard_targets(dashboard)] + variable_queries(dashboard)
    exprs += [expr for _, expr in rule_exprs()]
    used = set().union(*(metric_tokens(e) for e in exprs))
    assert used, "no metric names found"
    unknown = sorted(token for token in used if contract_name(token, contract) is None)
    assert not unknown, f"not in docs/metrics.md: {unknown}"


def test_histogram_suffixes_map_to_the_histogram(contract: dict) -> None:
    """_bucket/_sum/_count map to a histogram; suffixes on non-histograms do not."""
    base = "cachescope_decode_step_duration_seconds"
    for suffix in ("_bucket", "_sum", "_count"):
        assert contract_name(base + suffix, contract) == base
    assert contract_name("cachescope_queue_depth_count", contract) is None
    assert contract_name("cachescope_nonexistent", contract) is None
    assert metric_tokens('rate(cachescope_ops_total{a="b"}[1m]) / up') == {"cachescope_ops_total"}


# -- provisioning ----------------------------------------------------------------------------


def _yaml(path: Path):
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    return yaml.safe_load(path.read_text())


def test_datasource_provisioning() -> None:
    """The provisioned Prometheus datasource has uid `prometheus` and points at 127.0.0.1:9090."""
    doc = _yaml(ROOT / "dashboards" / "provisioning" / "datasources" / "cachescope.yaml")
    assert doc["apiVersion"] == 1
    (ds,) = doc["datasources"]
    assert ds["type"] == "prometheus" and ds["uid"] == "prometheus"
    assert ds["url"] == "http://127.0.0.1:9090"
    assert ds["jsonData"]["timeInterval"] == "5s"


def test_dashboard_provisioning() -> None:
    """The file provider loads dashboards/grafana via $CACHESCOPE_DASHBOARDS."""
    doc = _yaml(ROOT / "dashboards" / "provisioning" / "dashboards" / "cachescope.yaml")
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "${CACHESCOPE_DASHBOARDS}"
    assert DASHBOARD_JSON.parent.name == "grafana"
