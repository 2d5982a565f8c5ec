#!/usr/bin/env python3
"""Generate the cachescope Grafana dashboard (``dashboards/grafana/cachescope.json``).

Plain Python and the standard library only: no Grafana SDK. The committed JSON is this script's
output (sorted keys, 2-space indent, trailing newline); ``--check`` fails when it is stale.

    python dashboards/generate.py            # (re)write dashboards/grafana/cachescope.json
    python dashboards/generate.py --check    # exit 1 when the committed file differs
    python dashboards/generate.py --stdout   # print the JSON instead of writing it

Metric names and labels follow docs/metrics.md (the contract); tests/test_dashboards.py checks
every name used here against it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "grafana" / "cachescope.json"

UID = "cachescope-overview"
TITLE = "cachescope: KV cache"
SCHEMA_VERSION = 39

#: Every panel and every target uses this datasource reference (the `datasource` variable).
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

#: Label filters. Every cachescope selector carries BASE; metrics with a `family` label carry FAM.
#: `rank` is a constant label of multi-rank runs (docs/metrics.md); its All value `.*` also
#: matches the series of single-process runs, which have no rank label.
SCOPE = 'job=~"$job", instance=~"$instance", cache=~"$cache"'
BASE = SCOPE + ', rank=~"$rank"'
FAM = BASE + ', family=~"$family"'


def sel(metric: str, extra: str = "", family: bool = True) -> str:
    """A selector for ``metric`` with the dashboard's variable filters (+ ``extra`` matchers)."""
    matchers = FAM if family else BASE
    if extra:
        matchers = extra + ", " + matchers
    return f"{metric}{{{matchers}}}"


# ---------------------------------------------------------------------------------------------
# Queries (one place, so docs/dashboards.md and the tests can refer to them by meaning)
# ---------------------------------------------------------------------------------------------

VIOL = sel("cachescope_violations_total")
#: Violations in the last 5 minutes. A series that is new in the window (the process started, or
#: the first violation happened, less than 5m ago) counts in full: increase() cannot see the
#: jump from "no series" to its first sample, which is exactly how a violation at step 3 of a
#: fresh process looks. A reset (new value below the old) counts the new value.
Q_VIOLATIONS_5M = f"sum((({VIOL} - {VIOL} offset 5m) >= 0) or {VIOL}) or vector(0)"
Q_TELEMETRY_ERRORS_5M = (
    "sum(increase(" + sel("cachescope_telemetry_errors_total", family=False) + "[5m])) or vector(0)"
)
Q_VIOLATIONS_CUMULATIVE_BY_CACHE = f"sum by (cache) ({VIOL})"
Q_TOKENS_PER_S = (
    "sum by (cache) (rate("
    + sel("cachescope_decode_tokens_total", family=False)
    + "[$__rate_interval]))"
)
Q_STEPS_PER_S = (
    "sum by (cache) (rate("
    + sel("cachescope_decode_steps_total", family=False)
    + "[$__rate_interval]))"
)


def q_step_quantile(q: float) -> str:
    """Step-latency quantile ``q`` per cache from the step-duration histogram."""
    bucket = sel("cachescope_decode_step_duration_seconds_bucket", family=False)
    return f"histogram_quantile({q}, sum by (cache, le) (rate({bucket}[$__rate_interval])))"


Q_DEPTH = "sum by (cache, family) (" + sel("cachescope_queue_depth") + ")"
Q_DEPTH_PEAK = "max by (cache, family) (" + sel("cachescope_queue_depth_peak") + ")"
Q_QUEUES_BY_STATE = "sum by (cache, family, state) (" + sel("cachescope_queues") + ")"
Q_EMPTY_QUEUES_GROWTH = (
    "sum by (cache, family) (deriv(" + sel("cachescope_queues", 'state="empty"') + "[5m]))"
)
Q_BYTES = "sum by (cache, family, kind) (" + sel("cachescope_tensor_bytes") + ")"
Q_BYTES_PEAK = "max by (cache, family, kind) (" + sel("cachescope_tensor_bytes_peak") + ")"
#: Storage bytes held now / tokens decoded since the process started (rate-independent, so it
#: works for a paused or a just-started loop; clamp_min avoids dividing by zero before the
#: first token). Within one generation it approaches the per-token K/V footprint; across many
#: generations it must fall towards 0 as caches are cleared. A flat line across generations
#: means every token's tensors are still held: a leak.
Q_BYTES_PER_TOKEN = (
    "sum by (cache) ("
    + sel("cachescope_tensor_bytes", 'kind="storage"')
    + ") / clamp_min(sum by (cache) ("
    + sel("cachescope_decode_tokens_total", family=False)
    + "), 1)"
)
Q_OPS_RATE = (
    "sum by (cache, family, op) (rate(" + sel("cachescope_ops_total") + "[$__rate_interval]))"
)
#: Every violation kind of a queue family is exported from 0; "> 0" keeps the kinds that happened.
Q_VIOLATIONS_BY_KIND = f"sum by (cache, family, kind) ({VIOL}) > 0"
Q_VIOLATIONS_NEW = f"sum by (cache, family, kind) (increase({VIOL}[$__rate_interval]))"
Q_VIOLATIONS_TABLE = f"sum by (job, instance, cache, family, kind) ({VIOL}) > 0"

# Ranks (multi-rank runs: every series carries the rank's constant labels rank/tp_rank/pp_rank).
Q_TOKENS_PER_S_BY_RANK = (
    "sum by (cache, rank) (rate("
    + sel("cachescope_decode_tokens_total", family=False)
    + "[$__rate_interval]))"
)
Q_STEP_P95_BY_RANK = (
    "histogram_quantile(0.95, sum by (cache, rank, le) (rate("
    + sel("cachescope_decode_step_duration_seconds_bucket", family=False)
    + "[$__rate_interval])))"
)
STEPS = sel("cachescope_decode_steps_total", family=False)
#: Decode steps between the rank furthest ahead and the one furthest behind, per run (job and
#: cache). Ranks of one run take every step together; each rank is scraped at its own offset
#: within the scrape interval, so a healthy run shows up to (step rate x scrape interval).
Q_STEP_SKEW = f"max by (job, cache) ({STEPS}) - min by (job, cache) ({STEPS})"
Q_VIOLATIONS_BY_RANK = f"sum by (cache, rank) ({VIOL})"
#: The kinds found by comparing ranks (cachescope.distributed), by the rank that found them.
Q_RANK_VIOLATIONS = (
    "sum by (cache, rank, kind) ("
    + sel("cachescope_violations_total", 'kind=~"rank_.*"')
    + ")"
)

# Hugging Face caches (cachescope.hf): each layer's length after the model's last forward.
LAYER_TOKENS = sel("cachescope_layer_kv_tokens", family=False)
Q_LAYER_TOKENS = f"max by (cache, layer) ({LAYER_TOKENS})"
Q_LAYER_SKEW = "max by (cache) (" + sel("cachescope_layer_kv_skew_tokens", family=False) + ")"


# ---------------------------------------------------------------------------------------------
# Panel builders
# ---------------------------------------------------------------------------------------------


def target(expr: str, legend: str, ref: str, *, instant: bool = False, table: bool = False) -> dict:
    """A Prometheus query target bound to the ``datasource`` variable."""
    return {
        "datasource": dict(DATASOURCE),
        "editorMode": "code",
        "expr": expr,
        "format": "table" if table else "time_series",
        "instant": instant,
        "legendFormat": legend,
        "range": not instant,
        "refId": ref,
    }


def _targets(queries: list[tuple[str, str]], **kw: Any) -> list[dict]:
    return [target(e, legend, chr(ord("A") + i), **kw) for i, (e, legend) in enumerate(queries)]


def timeseries(
    title: str,
    description: str,
    unit: str,
    queries: list[tuple[str, str]],
    *,
    bars: bool = False,
    stepped: bool = False,
    stack: bool = False,
    no_value: str | None = None,
) -> dict:
    """A time-series panel; ``queries`` are (PromQL, legend) pairs."""
    custom: dict[str, Any] = {
        "axisSoftMin": 0,
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 60 if bars else 10,
        "lineInterpolation": "stepAfter" if stepped else "linear",
        "lineWidth": 1,
        "pointSize": 4,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
    }
    defaults: dict[str, Any] = {"custom": custom, "unit": unit}
    if no_value is not None:
        defaults["noValue"] = no_value
    return {
        "description": description,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {
                "calcs": ["lastNotNull", "max"],
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": _targets(queries),
        "title": title,
        "type": "timeseries",
    }


def stat(title: str, description: str, unit: str, expr: str, legend: str, red_at: float) -> dict:
    """A single-value panel that turns red at ``red_at``."""
    return {
        "description": description,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "decimals": 0,
                "thresholds": {
                    "mode": "absolute",
                    "steps": [
                        {"color": "green", "value": None},
                        {"color": "red", "value": red_at},
                    ],
                },
                "unit": unit,
            },
            "overrides": [],
        },
        "options": {
            "colorMode": "background",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        },
        "targets": _targets([(expr, legend)]),
        "title": title,
        "type": "stat",
    }


def table(title: str, description: str, unit: str, expr: str) -> dict:
    """A table of an instant query, one row per label set."""
    return {
        "description": description,
        "fieldConfig": {
            "defaults": {
                "custom": {"align": "auto", "cellOptions": {"type": "auto"}},
                "noValue": "no violations",
                "unit": unit,
            },
            "overrides": [],
        },
        "options": {
            "cellHeight": "sm",
            "showHeader": True,
            "sortBy": [{"desc": True, "displayName": "violations"}],
        },
        "targets": _targets([(expr, "__auto")], instant=True, table=True),
        "title": title,
        "transformations": [
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True},
                    "indexByName": {
                        "job": 0,
                        "instance": 1,
                        "cache": 2,
                        "family": 3,
                        "kind": 4,
                        "Value": 5,
                    },
                    "renameByName": {"Value": "violations"},
                },
            }
        ],
        "type": "table",
    }


def row(title: str) -> dict:
    """A (non-collapsed) row header."""
    return {"collapsed": False, "panels": [], "title": title, "type": "row"}


# ---------------------------------------------------------------------------------------------
# Layout: rows of (panel, (x, dy, w, h)), dy counted from the line below the row header
# ---------------------------------------------------------------------------------------------


#: The row whose panels only a run on Hugging Face caches (cachescope.hf) fills.
HF_ROW = "Hugging Face cache layers"


def layout() -> list[tuple[str, list[tuple[dict, tuple[int, int, int, int]]]]]:
    """The dashboard's rows and panels with their positions inside each row."""
    overview = [
        (
            stat(
                "Violations (last 5m)",
                "Pop-order violations in the last 5 minutes, all selected caches and families. "
                "Anything above 0 means a layer popped a queue entry it did not push (or an "
                "empty queue): decoded tokens are wrong from that step on.",
                "short",
                Q_VIOLATIONS_5M,
                "violations",
                1,
            ),
            (0, 0, 5, 4),
        ),
        (
            stat(
                "Telemetry errors (last 5m)",
                "Exporter/sink failures swallowed to protect the decode loop. Non-zero means "
                "some telemetry (metrics, traces, recordings) is incomplete.",
                "short",
                Q_TELEMETRY_ERRORS_5M,
                "errors",
                1,
            ),
            (0, 4, 5, 4),
        ),
        (
            timeseries(
                "Violations over time (cumulative)",
                "Violations counted since each process started, per cache. Every step up is a "
                "new violation; see the Violations row for kind and family.",
                "short",
                [(Q_VIOLATIONS_CUMULATIVE_BY_CACHE, "{{cache}}")],
                stepped=True,
            ),
            (5, 0, 6, 8),
        ),
        (
            timeseries(
                "Tokens / s",
                "Tokens produced by the decode loop per second (rate of "
                "cachescope_decode_tokens_total).",
                "short",
                [(Q_TOKENS_PER_S, "{{cache}}")],
            ),
            (11, 0, 6, 8),
        ),
        (
            timeseries(
                "Decode step latency",
                "p50/p95/p99 wall time per decode step from the step-duration histogram. "
                "Exemplars on the histogram link to the step's trace.",
                "s",
                [
                    (q_step_quantile(0.5), "{{cache}} p50"),
                    (q_step_quantile(0.95), "{{cache}} p95"),
                    (q_step_quantile(0.99), "{{cache}} p99"),
                ],
            ),
            (17, 0, 7, 8),
        ),
    ]
    queues = [
        (
            timeseries(
                "Queue depth by family",
                "Items held in each family's queues now (solid) and the highest depth seen "
                "(peak). A healthy decode loop holds a constant number (one item per layer); "
                "steady growth is a missing pop.",
                "short",
                [(Q_DEPTH, "{{cache}} {{family}}"), (Q_DEPTH_PEAK, "{{cache}} {{family}} peak")],
            ),
            (0, 0, 8, 8),
        ),
        (
            timeseries(
                "Live vs empty queues",
                "Number of queues that hold items (live) and that are empty. The seed cache "
                "never deletes an emptied queue, so empty attn_kv queues grow by one per "
                "decoded token until clear_all().",
                "short",
                [(Q_QUEUES_BY_STATE, "{{cache}} {{family}} {{state}}")],
            ),
            (8, 0, 8, 8),
        ),
        (
            timeseries(
                "Empty queues created / s",
                "Growth rate of empty queues (deriv over 5m). Positive for a long time means "
                "empty queues pile up (see alert CachescopeEmptyQueuesPilingUp).",
                "short",
                [(Q_EMPTY_QUEUES_GROWTH, "{{cache}} {{family}}")],
            ),
            (16, 0, 8, 8),
        ),
    ]
    memory = [
        (
            timeseries(
                "Tensor bytes held (logical vs storage)",
                "Bytes of tensors held by queued items. logical = sum of nbytes (views count "
                "in full); storage = distinct underlying storages. logical far above storage "
                "means many views of the same storage.",
                "bytes",
                [(Q_BYTES, "{{cache}} {{family}} {{kind}}")],
            ),
            (0, 0, 8, 8),
        ),
        (
            timeseries(
                "Tensor bytes peak",
                "Highest tensor bytes seen per family since the cache was created.",
                "bytes",
                [(Q_BYTES_PEAK, "{{cache}} {{family}} {{kind}} peak")],
            ),
            (8, 0, 8, 8),
        ),
        (
            timeseries(
                "Storage bytes held per decoded token",
                "Storage bytes held now divided by tokens decoded since the process started. "
                "Within one generation it approaches the per-token K/V footprint; across "
                "generations it falls towards 0 as caches are cleared. A line that stays flat "
                "across generations means every token's tensors are still held: a leak.",
                "bytes",
                [(Q_BYTES_PER_TOKEN, "{{cache}}")],
            ),
            (16, 0, 8, 8),
        ),
    ]
    operations = [
        (
            timeseries(
                "Operations / s by op and family",
                "Cache operations per second (push, pop, set, get, clear, clear_all). In a "
                "healthy decode loop push and pop rates of attn_kv are equal.",
                "ops",
                [(Q_OPS_RATE, "{{cache}} {{family}} {{op}}")],
            ),
            (0, 0, 16, 8),
        ),
        (
            timeseries(
                "Decode steps / s",
                "Decode steps completed per second.",
                "short",
                [(Q_STEPS_PER_S, "{{cache}}")],
            ),
            (16, 0, 8, 8),
        ),
    ]
    violations = [
        (
            timeseries(
                "Violations by kind and family (cumulative)",
                "Violations since each process started, by family and kind, for the kinds that "
                "occurred (owner_mismatch: popped an entry another layer pushed; pop_empty: "
                "popped an empty queue; ... see the README's violation kinds).",
                "short",
                [(Q_VIOLATIONS_BY_KIND, "{{cache}} {{family}} {{kind}}")],
                stepped=True,
                no_value="no violations",
            ),
            (0, 0, 12, 8),
        ),
        (
            timeseries(
                "New violations per interval",
                "Violations added in each rate interval, by family and kind.",
                "short",
                [(Q_VIOLATIONS_NEW, "{{cache}} {{family}} {{kind}}")],
                bars=True,
            ),
            (12, 0, 12, 8),
        ),
        (
            table(
                "Violations (current totals)",
                "Violations since each process started, one row per job, instance, cache, "
                "family and kind that occurred (empty: no violations).",
                "short",
                Q_VIOLATIONS_TABLE,
            ),
            (0, 8, 24, 8),
        ),
    ]
    ranks = [
        (
            timeseries(
                "Tokens / s by rank",
                "Tokens produced per second by each rank of a multi-rank run (series without a "
                "rank label: single-process runs). Ranks decode in lockstep: one rank at 0 while "
                "the others are not means it stopped; all at 0 means they wait on each other.",
                "short",
                [(Q_TOKENS_PER_S_BY_RANK, "{{cache}} rank {{rank}}")],
            ),
            (0, 0, 8, 8),
        ),
        (
            timeseries(
                "Decode step latency p95 by rank",
                "p95 wall time per decode step on each rank. Every rank waits for the slowest "
                "at each step's collectives, so a rank whose own latency is lower is waiting "
                "for another: the highest line is the straggler's pipeline stage or shard.",
                "s",
                [(Q_STEP_P95_BY_RANK, "{{cache}} rank {{rank}} p95")],
            ),
            (8, 0, 8, 8),
        ),
        (
            timeseries(
                "Decode step skew across ranks",
                "Decode steps between the rank furthest ahead and the one furthest behind, per "
                "job and cache (max - min of cachescope_decode_steps_total). Each rank is scraped "
                "at its own offset within the scrape interval, so a healthy run shows up to "
                "(steps/s x scrape interval); growth means a rank fell behind (alert "
                "CachescopeRankStepSkew). Only meaningful for the ranks of one run: processes "
                "sharing a job and cache name are compared too.",
                "short",
                [(Q_STEP_SKEW, "{{job}} {{cache}}")],
            ),
            (16, 0, 8, 8),
        ),
        (
            timeseries(
                "Violations by rank (cumulative)",
                "Violations of every kind counted by each rank since it started (the rank "
                "whose cache counted them; a cross-rank report names the rank it concerns).",
                "short",
                [(Q_VIOLATIONS_BY_RANK, "{{cache}} rank {{rank}}")],
                stepped=True,
            ),
            (0, 8, 12, 8),
        ),
        (
            timeseries(
                "Cross-rank violations (cumulative)",
                "rank_divergence (ranks that decode the same sequence disagree on a step: ops, "
                "kv lengths, state ids or input tokens) and rank_stalled (a rank has not reached "
                "a step its peers are past), by the rank that found them (alert "
                "CachescopeRankViolation). Exported from 0, so a flat 0 line means the ranks "
                "agreed.",
                "short",
                [(Q_RANK_VIOLATIONS, "{{cache}} rank {{rank}} {{kind}}")],
                stepped=True,
            ),
            (12, 8, 12, 8),
        ),
    ]
    hf_layers = [
        (
            timeseries(
                "KV tokens per layer (Hugging Face caches)",
                "Tokens each layer of a transformers Cache holds after the model's last forward "
                "(cachescope.hf; sliding-window layers count the tokens ever added). On a correct "
                "run every full-attention layer draws the same line, growing one token per step "
                "and falling back at each new generation; a layer off the others is a skipped, "
                "repeated or cropped layer (violation seq_len_mismatch or layer_skipped). Layers "
                "past 255 are one series, layer=\"other\".",
                "short",
                [(Q_LAYER_TOKENS, "{{cache}} layer {{layer}}")],
            ),
            (0, 0, 16, 8),
        ),
        (
            timeseries(
                "Layer length skew (Hugging Face caches)",
                "Longest minus shortest layer after the model's last forward (full-attention and "
                "sliding layers each among themselves). 0 on a correct run; above 0, the layers "
                "disagree on what the cache holds and attention reads the wrong past "
                "(seq_len_mismatch).",
                "short",
                [(Q_LAYER_SKEW, "{{cache}}")],
                stepped=True,
            ),
            (16, 0, 8, 8),
        ),
    ]
    return [
        ("Overview", overview),
        ("Queues", queues),
        ("Memory", memory),
        ("Operations", operations),
        ("Violations", violations),
        ("Ranks", ranks),
        (HF_ROW, hf_layers),
    ]


def panels() -> list[dict]:
    """All panels, rows included, with ids and gridPos filled in."""
    out: list[dict] = []
    y = 0
    next_id = 1
    for title, items in layout():
        r = row(title)
        r["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
        out.append(r)
        y += 1
        bottom = y
        for panel, (x, dy, w, h) in items:
            panel["gridPos"] = {"h": h, "w": w, "x": x, "y": y + dy}
            out.append(panel)
            bottom = max(bottom, y + dy + h)
        y = bottom
    for p in out:
        p["datasource"] = dict(DATASOURCE)
        p["id"] = next_id
        next_id += 1
    return out


# ---------------------------------------------------------------------------------------------
# Templating
# ---------------------------------------------------------------------------------------------


def query_var(name: str, label: str, query: str, *, multi: bool, include_all: bool) -> dict:
    """A Prometheus label_values() query variable."""
    return {
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]} if include_all else {},
        "datasource": dict(DATASOURCE),
        "definition": query,
        "hide": 0,
        "includeAll": include_all,
        "label": label,
        "multi": multi,
        "name": name,
        "options": [],
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
        "type": "query",
    }


def templating() -> dict:
    """The datasource, job, instance, cache, family and rank variables (in dependency order)."""
    return {
        "list": [
            {
                "current": {"selected": False, "text": "Prometheus", "value": "prometheus"},
                "hide": 0,
                "includeAll": False,
                "label": "Data source",
                "multi": False,
                "name": "datasource",
                "options": [],
                "query": "prometheus",
                "refresh": 1,
                "regex": "",
                "skipUrlSync": False,
                "type": "datasource",
            },
            query_var(
                "job",
                "Job",
                "label_values(cachescope_ops_total, job)",
                multi=True,
                include_all=True,
            ),
            query_var(
                "instance",
                "Instance",
                'label_values(cachescope_ops_total{job=~"$job"}, instance)',
                multi=True,
                include_all=True,
            ),
            query_var(
                "cache",
                "Cache",
                'label_values(cachescope_ops_total{job=~"$job", instance=~"$instance"}, cache)',
                multi=True,
                include_all=True,
            ),
            query_var(
                "family",
                "Family",
                "label_values(cachescope_ops_total{" + SCOPE + "}, family)",
                multi=True,
                include_all=True,
            ),
            query_var(
                "rank",
                "Rank",
                "label_values(cachescope_ops_total{" + SCOPE + "}, rank)",
                multi=True,
                include_all=True,
            ),
        ]
    }


def build_dashboard() -> dict:
    """The whole dashboard as a JSON-ready dict."""
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "Queue/KV cache of GPT-NeoX decode loops, as exported by cachescope "
        "(metric names: docs/metrics.md).",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "liveNow": False,
        "panels": panels(),
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["cachescope", "kv-cache", "prometheus"],
        "templating": templating(),
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": TITLE,
        "uid": UID,
        "version": 1,
        "weekStart": "",
    }


def render() -> str:
    """The dashboard JSON text exactly as committed."""
    return json.dumps(build_dashboard(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="fail when the output file is stale")
    group.add_argument("--stdout", action="store_true", help="print the JSON instead of writing")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"default: {OUTPUT}")
    args = parser.parse_args(argv)

    text = render()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        try:
            current = args.output.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != text:
            what = "missing" if current is None else "stale"
            print(
                f"{args.output} is {what}: regenerate it with `python dashboards/generate.py`",
                file=sys.stderr,
            )
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
