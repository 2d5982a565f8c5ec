"""Dashboard queries and alert rules against a real Prometheus scraping synthetic exporters.

Two loopback HTTP servers serve contract-shaped expositions (docs/metrics.md): a "clean" cache
and a "faulty" one whose violation counter is already non-zero on its first scrape, as after a
fault injected at step 3. This proves the PromQL without needing the cachescope CLI; the
end-to-end run with the real exporter is tests/test_prometheus_integration.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from cachescope import KINDS
from _prom import (
    GRAFANA_SUBSTITUTIONS,
    RULES_FILE,
    PromHandle,
    exposed_metric_names,
    label_values,
    load_contract,
    load_dashboard,
    serve_text,
    start_prometheus,
    substitute,
    variable_queries,
    wait_for_every_panel_query,
)

BUCKETS = [
    "0.0005",
    "0.001",
    "0.0025",
    "0.005",
    "0.01",
    "0.025",
    "0.05",
    "0.1",
    "0.25",
    "0.5",
    "1",
    "2.5",
    "5",
    "+Inf",
]


def exposition(cache: str, started: float, violations: int) -> str:
    """A text exposition shaped like docs/metrics.md for ``cache``, advancing with wall time."""
    t = time.monotonic() - started
    steps = int(20 * t) + 1
    layers = 4
    lines: list[str] = []

    def metric(name: str, kind: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} synthetic {name}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{series} {value}" for series, value in samples)

    c = f'cache="{cache}"'
    fam = f'{c},family="attn_kv"'
    metric(
        "cachescope_ops_total",
        "counter",
        [
            (f'cachescope_ops_total{{{fam},op="push"}}', steps * layers),
            (f'cachescope_ops_total{{{fam},op="pop"}}', (steps - 1) * layers),
            (f'cachescope_ops_total{{{c},family="state_ids",op="get"}}', steps * layers),
            (f'cachescope_ops_total{{{c},family="state_ids",op="set"}}', steps),
        ],
    )
    metric("cachescope_queue_depth", "gauge", [(f"cachescope_queue_depth{{{fam}}}", layers)])
    metric(
        "cachescope_queue_depth_peak", "gauge", [(f"cachescope_queue_depth_peak{{{fam}}}", layers)]
    )
    held = 4096 * steps * layers
    metric(
        "cachescope_tensor_bytes",
        "gauge",
        [
            (f'cachescope_tensor_bytes{{{fam},kind="logical"}}', 2 * held),
            (f'cachescope_tensor_bytes{{{fam},kind="storage"}}', held),
        ],
    )
    metric(
        "cachescope_tensor_bytes_peak",
        "gauge",
        [
            (f'cachescope_tensor_bytes_peak{{{fam},kind="logical"}}', 2 * held),
            (f'cachescope_tensor_bytes_peak{{{fam},kind="storage"}}', held),
        ],
    )
    metric(
        "cachescope_queues",
        "gauge",
        [
            (f'cachescope_queues{{{fam},state="live"}}', layers),
            (f'cachescope_queues{{{fam},state="empty"}}', (steps - 1) * layers),
        ],
    )
    # like the exporter: every kind of a queue family from 0 (rank_* included)
    metric(
        "cachescope_violations_total",
        "counter",
        [
            (
                f'cachescope_violations_total{{{fam},kind="{kind}"}}',
                violations if kind == "owner_mismatch" else 0,
            )
            for kind in KINDS
        ],
    )
    metric(
        "cachescope_decode_steps_total",
        "counter",
        [(f"cachescope_decode_steps_total{{{c}}}", steps)],
    )
    metric(
        "cachescope_decode_tokens_total",
        "counter",
        [(f"cachescope_decode_tokens_total{{{c}}}", steps)],
    )
    buckets = []
    for le in BUCKETS:  # every step takes ~7 ms
        count = steps if le == "+Inf" or float(le) >= 0.01 else 0
        buckets.append((f'cachescope_decode_step_duration_seconds_bucket{{{c},le="{le}"}}', count))
    buckets.append((f"cachescope_decode_step_duration_seconds_sum{{{c}}}", 0.007 * steps))
    buckets.append((f"cachescope_decode_step_duration_seconds_count{{{c}}}", steps))
    metric("cachescope_decode_step_duration_seconds", "histogram", buckets)
    metric("cachescope_telemetry_errors_total", "counter", [])  # no errors: TYPE line only
    # cachescope.hf's per-layer lengths: the prompt (8) plus a token per step; the faulty cache's
    # last layer holds one token more (seq_len_mismatch)
    tokens = [8 + steps + (1 if violations and i == layers - 1 else 0) for i in range(layers)]
    metric(
        "cachescope_layer_kv_tokens",
        "gauge",
        [(f'cachescope_layer_kv_tokens{{{c},layer="{i}",attention="full"}}', n)
         for i, n in enumerate(tokens)],
    )
    metric(
        "cachescope_layer_kv_skew_tokens",
        "gauge",
        [(f"cachescope_layer_kv_skew_tokens{{{c}}}", max(tokens) - min(tokens))],
    )
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[PromHandle, dict[str, str]]]:
    """A clean and a faulty synthetic exporter scraped every second by Prometheus with the rules."""
    started = time.monotonic()
    tmp = tmp_path_factory.mktemp("prom-live")
    with (
        serve_text(lambda: exposition("clean", started, 0)) as clean,
        serve_text(lambda: exposition("faulty", started, 3)) as faulty,
    ):
        with start_prometheus([clean, faulty], tmp, "1s", rule_files=[RULES_FILE]) as prom:
            prom.wait_for('count(up{job="cachescope"} == 1) == 2', timeout=30)
            yield prom, {"clean": clean, "faulty": faulty}


def test_every_panel_query_returns_data(stack) -> None:
    """Every panel target of the dashboard returns a non-empty result."""
    prom, _ = stack
    wait_for_every_panel_query(prom, load_dashboard(), timeout=60)


def test_variable_queries_return_values(stack) -> None:
    """The job, instance, cache and family variables list the scraped values (no rank labels)."""
    prom, instances = stack
    values = [label_values(prom, q) for q in variable_queries(load_dashboard())]
    job, instance, cache, family, rank = values
    assert job == ["cachescope"]
    assert sorted(instance) == sorted(instances.values())
    assert cache == ["clean", "faulty"]
    assert family == ["attn_kv", "state_ids"]
    assert rank == []


def test_violation_panels_show_the_faulty_cache_only(stack) -> None:
    """The violations stat and table count the faulty cache's violations and none for clean."""
    prom, _ = stack
    by_title = {p["title"]: p for p in load_dashboard()["panels"]}
    table = substitute(by_title["Violations (current totals)"]["targets"][0]["expr"])
    rows = prom.wait_for(table, timeout=30)
    assert {r["metric"]["cache"]: float(r["value"][1]) for r in rows} == {"faulty": 3.0}
    stat = by_title["Violations (last 5m)"]["targets"][0]["expr"]
    for cache, expected in (("faulty", 3.0), ("clean", 0.0)):
        values = dict(GRAFANA_SUBSTITUTIONS, cache=cache)
        (result,) = prom.query(substitute(stat, values))
        assert float(result["value"][1]) == expected, cache


def test_pop_order_alert_fires_for_a_violation_before_the_first_scrape(stack) -> None:
    """CachescopePopOrderViolation fires for the faulty cache although its counter never grew."""
    prom, instances = stack
    firing = prom.wait_for(
        'ALERTS{alertname="CachescopePopOrderViolation", alertstate="firing"}', timeout=30
    )
    assert [a["metric"]["cache"] for a in firing] == ["faulty"]
    assert firing[0]["metric"]["instance"] == instances["faulty"]
    assert firing[0]["metric"]["severity"] == "critical"
    names = {a["labels"]["alertname"] for a in prom.alerts()}
    assert "CachescopeTargetDown" not in names


def test_synthetic_exposition_covers_the_contract() -> None:
    """The synthetic exporter exposes every contract metric (keeps this test honest)."""
    contract = load_contract()
    assert exposed_metric_names(exposition("x", time.monotonic(), 1), contract) == set(contract)
