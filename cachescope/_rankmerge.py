"""One summary of a multi-rank ``cachescope run``: each rank's result, merged and printed by rank 0.

A rank's result (``rank_result``) is the single-process ``run --json`` summary of its own cache
plus who it is (rank, tp_rank, pp_rank, local rank, host, the global layers it holds) and how it
ended. ``merge`` makes the run's summary from them: the single-process fields (ops, peaks,
families summed or maxed over ranks; the tokens and timing of rank 0), a ``ranks`` list, and every
violation with its ``rank``. Pure functions on JSON-able dicts; no torch, no process group.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping, Sequence

__all__ = ["rank_result", "merge", "format_human", "MAX_VIOLATIONS_PER_RANK"]

#: Violations (with reports) a rank sends; all are counted in ``violations_by_kind``.
MAX_VIOLATIONS_PER_RANK = 200
_MAX_FULL_REPORTS = 20
_RANK_KINDS = ("rank_divergence", "rank_stalled")


def rank_result(summary: dict[str, Any], *, rank: int, tp_rank: int, pp_rank: int,
                local_rank: int, host: str, layers: Sequence[int], report: str,
                stalled: str | None = None) -> dict[str, Any]:
    """This rank's result: ``summary`` (``cli.run_summary`` of its cache) plus its identity.

    Violations are capped at ``MAX_VIOLATIONS_PER_RANK``; each gets ``rank`` (the rank it
    concerns: this one unless the checker said otherwise) and ``reported_by``; fault events get
    ``rank``. ``stalled``: the stall that ended the run here (a violation summary), if any."""
    out = dict(summary)
    violations = []
    for v in summary.get("violations", [])[:MAX_VIOLATIONS_PER_RANK]:
        v = dict(v)
        if v.get("rank") is None:
            v["rank"] = rank
        v["reported_by"] = rank
        violations.append(v)
    out["violations"] = violations
    out["fault_events"] = [dict(e, rank=rank) for e in summary.get("fault_events", [])]
    out.update(rank=rank, tp_rank=tp_rank, pp_rank=pp_rank, local_rank=local_rank, host=host,
               layers_held=list(layers), report=report, stalled=stalled)
    return out


def _sum_counts(dicts: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    out: collections.Counter[str] = collections.Counter()
    for d in dicts:
        out.update({k: int(v) for k, v in d.items()})
    return dict(out)


def _families(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per family over ranks: peaks are the highest rank's, everything else is summed."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        for fam, fs in r.get("families", {}).items():
            acc = out.setdefault(fam, {})
            for key, value in fs.items():
                if isinstance(value, dict):
                    acc[key] = _sum_counts([acc.get(key, {}), value])
                elif key.startswith("peak_"):
                    acc[key] = max(acc.get(key, 0), value)
                else:
                    acc[key] = acc.get(key, 0) + value
    return dict(sorted(out.items()))


def _violations(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's violations; a cross-rank one that several ranks saw is kept once."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for r in results:
        for v in r.get("violations", []):
            if v.get("kind") in _RANK_KINDS:   # a stall is one fact whoever saw it
                peer = v.get("peer") if v.get("kind") == "rank_divergence" else None
                key = (v.get("kind"), v.get("rank"), peer, v.get("step"), v.get("queue"))
                if key in seen:
                    continue
                seen.add(key)
            out.append(v)
    return sorted(out, key=lambda v: (v.get("step") if isinstance(v.get("step"), int) else -1,
                                      v.get("rank") if isinstance(v.get("rank"), int) else -1))


def _kinds(results: Sequence[Mapping[str, Any]], violations: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Local kinds: each rank's own counts (all of them, also those not sent); cross-rank kinds:
    the de-duplicated list."""
    local = _sum_counts([{k: n for k, n in r.get("violations_by_kind", {}).items()
                          if k not in _RANK_KINDS} for r in results])
    cross = collections.Counter(v["kind"] for v in violations if v.get("kind") in _RANK_KINDS)
    return dict(sorted({**local, **cross}.items()))


def _status(r: Mapping[str, Any] | None) -> str:
    if r is None:
        return "no result"
    if r.get("error"):
        return "error"
    if r.get("stalled"):
        return "stopped at a stall"
    return "ok"


def merge(results: Mapping[int, Mapping[str, Any] | None], *, cache: str, world_size: int,
          tp: int, pp: int, serve: bool, waited_s: float) -> dict[str, Any]:
    """The run's summary from every rank's result (None: the rank sent none within ``waited_s``
    seconds). Rank 0's result must be there."""
    base = results[0]
    assert base is not None, "rank 0 merges: its own result is always there"
    got = [results[r] for r in sorted(results) if results[r] is not None]
    present: list[Mapping[str, Any]] = [r for r in got if r is not None]
    violations = _violations(present)
    faults = list(base.get("faults", []))
    events = sorted((e for r in present for e in r.get("fault_events", [])),
                    key=lambda e: (e.get("step", 0), e.get("rank", 0)))
    fired = {e["fault"] for e in events}
    missing = [r for r in range(world_size) if results.get(r) is None]
    errors = [f"rank {r['rank']}: {r['error']}" for r in present if r.get("error")]
    errors += [f"rank {r}: sent no result within {waited_s:.0f} s (stalled, stuck or dead)"
               for r in missing]
    stalls = [r["stalled"] for r in present if r.get("stalled")]
    ranks = []
    for rank in range(world_size):
        r = results.get(rank)
        ranks.append({
            "rank": rank, "tp_rank": rank % tp, "pp_rank": rank // tp,
            "local_rank": None if r is None else r.get("local_rank"),
            "host": None if r is None else r.get("host"),
            "layers": None if r is None else r.get("layers_held"),
            "tokens": None if r is None else r.get("tokens"),
            "output_tokens": None if r is None else r.get("output_tokens"),
            "ops": None if r is None else r.get("total_ops"),
            "violations": None if r is None else sum(r.get("violations_by_kind", {}).values()),
            "status": _status(r), "error": None if r is None else r.get("error"),
            "stalled": None if r is None else r.get("stalled"),
        })
    failed = bool(violations) or bool(errors) or any(
        sum(r.get("violations_by_kind", {}).values()) for r in present)
    exit_code = 1 if (failed and not serve) or missing else 0
    out: dict[str, Any] = {k: base.get(k) for k in (
        "model", "layers", "hidden_size", "vocab_size", "device", "prompt_tokens",
        "max_new_tokens", "generations", "tokens", "steps", "elapsed_s", "tokens_per_s")}
    fam = _families(present)
    out.update({
        "cache": cache, "world_size": world_size, "tp": tp, "pp": pp,
        "ops": _sum_counts([r.get("ops", {}) for r in present]),
        "total_ops": sum(int(r.get("total_ops", 0)) for r in present),
        "peak_queue_depth": max((int(r.get("peak_queue_depth", 0)) for r in present), default=0),
        "peak_bytes": {k: max((int(r.get("peak_bytes", {}).get(k, 0)) for r in present), default=0)
                       for k in ("logical", "storage")},
        "families": fam,
        "faults": faults,
        "fault_events": events,
        "faults_not_fired": [f["spec"] for f in faults if f["spec"] not in fired],
        "violations_by_kind": _kinds(present, violations),
        "violations_dropped": sum(int(r.get("violations_dropped", 0)) for r in present),
        "violations": violations,
        "error": "; ".join(errors) if errors else None,
        "stalled": stalls[0] if stalls else None,
        "output_tokens": base.get("output_tokens"),
        "ranks": ranks,
        "exit_code": exit_code,
    })
    return out


def _layers_text(layers: Sequence[int] | None) -> str:
    if not layers:
        return "-"
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def format_human(s: Mapping[str, Any], *, prog: str, quiet: bool, serve: bool,
                 format_bytes: Any) -> str:
    """The human summary of a merged run (``--quiet``: only errors and violation reports)."""
    out: list[str] = []
    if not quiet:
        out.append(f"{prog} run: {s['model']} ({s['layers']} layers, hidden {s['hidden_size']}, "
                   f"vocab {s['vocab_size']}) on {s['device']}, {s['world_size']} ranks (tp "
                   f"{s['tp']} x pp {s['pp']}); prompt {s['prompt_tokens']} tokens, "
                   f"{s['max_new_tokens']} new tokens"
                   + (f", {s['generations']} generation(s)" if serve else ""))
        rate = f"{s['tokens_per_s']:.1f}" if s.get("tokens_per_s") is not None else "n/a"
        elapsed = s.get("elapsed_s") or 0.0
        out.append(f"generated {s['tokens']} tokens in {elapsed:.2f} s ({rate} tokens/s, rank 0)")
        for e in s["fault_events"]:
            out.append(f"fault {e['fault']} fired at step {e['step']} on rank {e['rank']}: {e['what']}")
        for f in s["faults_not_fired"]:
            out.append(f"fault {f} did not fire (its step did not come, or it had nothing to act on)")
        ops = ", ".join(f"{k}={n}" for k, n in s["ops"].items() if n)
        by_kind = s["violations_by_kind"]
        out.append(f"{prog} summary for cache '{s['cache']}' over {s['world_size']} ranks")
        out.append(f"  steps: {s['steps']}   tokens: {s['tokens']}   ops: {s['total_ops']} "
                   "(all ranks)")
        out.append(f"  ops by kind: {ops}")
        for fam, fs in s["families"].items():
            out.append(f"  family {fam}: depth now {fs.get('depth', 0)} (largest rank's peak "
                       f"{fs.get('peak_depth', 0)}), queues live {fs.get('queues_live', 0)} / "
                       f"empty {fs.get('queues_empty', 0)}, bytes held "
                       f"{format_bytes(fs.get('logical_bytes', 0))} logical / "
                       f"{format_bytes(fs.get('storage_bytes', 0))} storage")
        out.append("  violations: " + (", ".join(f"{k}={n}" for k, n in by_kind.items())
                                       if by_kind else "none"))
        out.append(f"  peak queue depth: {s['peak_queue_depth']}   peak bytes held: "
                   f"{format_bytes(s['peak_bytes']['logical'])} logical / "
                   f"{format_bytes(s['peak_bytes']['storage'])} storage (largest rank)")
        out.extend(_rank_table(s["ranks"]))
    if s.get("stalled"):
        out.append(f"{prog}: the run was ended at a stall: {s['stalled']}")
    if s["error"]:
        out.append(f"{prog}: {s['error']}")
    violations = s["violations"]
    for v in violations[:_MAX_FULL_REPORTS]:
        out.append(f"[rank {v['rank']}" + (f", reported by rank {v['reported_by']}"
                                          if v.get("reported_by") not in (None, v["rank"]) else "")
                   + "]")
        out.append(v.get("report") or str(v))
    if len(violations) > _MAX_FULL_REPORTS:
        out.append(f"... {len(violations) - _MAX_FULL_REPORTS} more violation report(s) not shown "
                   "(use --json for all)")
    if not quiet:
        total = sum(s["violations_by_kind"].values())
        if total:
            out.append(f"result: {total} violation(s) "
                       f"({', '.join(f'{k}={n}' for k, n in s['violations_by_kind'].items())})")
        elif s["error"]:
            out.append("result: the decode failed on a rank")
        else:
            out.append("result: no violations")
    return "\n".join(out)


def _rank_table(ranks: Sequence[Mapping[str, Any]]) -> list[str]:
    head = ("rank", "tp_rank", "pp_rank", "layers", "tokens", "ops", "violations", "status")
    rows = [head] + [(str(r["rank"]), str(r["tp_rank"]), str(r["pp_rank"]),
                      _layers_text(r["layers"]),
                      "-" if r["tokens"] is None else str(r["tokens"]),
                      "-" if r["ops"] is None else str(r["ops"]),
                      "-" if r["violations"] is None else str(r["violations"]),
                      r["status"]) for r in ranks]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return ["  " + "  ".join(c.rjust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1]
            for row in rows]
