"""Section ``ranks``: what the cross-rank checker (``cachescope.distributed.attach``) costs a
tensor-parallel decode on CPU.

Two ranks started by torch's launcher (``python -m torch.distributed.run --nproc_per_node 2``,
gloo on 127.0.0.1, ``torch.set_num_threads(1)`` per rank) decode ``ParallelNeoX`` (TP=2, PP=1)
with ``ParallelDecoder``. The arms differ only in the cache the attention layers use:

* ``plain`` / ``plain-aa``: a plain ``Cache()`` (``plain-aa`` is the A/A control);
* ``default``: ``InstrumentedCache()`` in default mode, no cross-rank check (the core's cost);
* ``rankcheck``: default + ``attach(cache, tp=2)``, every step checked (``every=1``);
* ``rankcheck-every-8``: the same with ``every=8``.

Both ranks run the same arms in the same order (the shuffles are seeded alike), so every
collective is shared. Designs: lockstep (token i of every arm back to back, order shuffled per
repetition), whole decodes ABBA, and solo decodes (one arm at a time: GC collections, the watcher
thread's CPU time, its store round trips). The worker (``_rank_bench_worker.py``) returns raw
timings; the statistics are made here, from rank 0's (rank 1's overhead is shown beside it).

The goal is judged on the lockstep CPU estimate: the checked arm's extra CPU time per token over
``default`` (the decoding thread's, ``time.thread_time()``, plus its watcher thread's per token of
a decode running alone) as a share of ``default``'s wall time per token. On a shared 2-CPU host
the wall-clock ratios of two ranks that wait on each other in every collective have CIs of
+-2-4 %; the CPU estimate's A/A stays within about +-0.5 %.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from .common import (ROOT, Context, bootstrap_ci, fmt_ci, loadavg, log, paired_diff,
                     paired_overhead, pct, quantiles)

WORKER = Path(__file__).resolve().parent / "_rank_bench_worker.py"
TP = 2
#: (new tokens per decode, repetitions) per preset; ``quick`` under --quick
LOCKSTEP_SIZES = {"tiny": (64, 12), "pythia-70m": (32, 24), "quick": (6, 2)}
WHOLE_SIZES = {"tiny": (64, 6), "pythia-70m": (48, 6), "quick": (6, 2)}
#: new tokens of each solo decode
SOLO_TOKENS = {"tiny": 500, "pythia-70m": 250, "quick": 12}
#: (arm, base) pairs reported; the first is the checker's own cost
PAIRS = (("rankcheck", "default"), ("rankcheck-every-8", "default"), ("default", "plain"),
         ("rankcheck", "plain"), ("rankcheck-every-8", "plain"), ("plain-aa", "plain"))
ARM_TEXT = {
    "plain": "`Cache()`: no cachescope instrumentation",
    "plain-aa": "a second plain `Cache()`: the A/A control (its \"overhead\" is noise)",
    "default": "`InstrumentedCache()` (default mode), no cross-rank check: the core's cost",
    "rankcheck": "default + `cachescope.distributed.attach(cache, tp=2)` (every step checked) and "
                 "`ParallelDecoder(rank_check=...)` feeding it the step's input ids",
    "rankcheck-every-8": "the same with `every=8` (one step in 8 fingerprinted and compared; "
                         "progress watched on every step)",
}
LAUNCH_TIMEOUT_S = 3600


def run(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {"tp": TP, "pp": 1, "presets": []}
    for preset in ctx.presets:
        lock = ctx.size(LOCKSTEP_SIZES, preset, lockstep=True)
        whole = ctx.size(WHOLE_SIZES, preset)
        solo = SOLO_TOKENS["quick" if ctx.quick else preset if preset in SOLO_TOKENS else "pythia-70m"]
        log(f"ranks {preset}: TP={TP} over 2 gloo ranks; lockstep {lock[1]} reps x 5 arms x "
            f"{lock[0]} tokens; whole decodes {whole[1]} reps x 5 arms x 2 (ABBA) x {whole[0]} "
            f"tokens; solo decodes of {solo} tokens")
        load0 = loadavg()
        raw = launch({"preset": preset, "seed": ctx.seed, "lockstep": list(lock),
                      "whole": list(whole), "solo_tokens": solo})
        d = summarize(preset, raw)
        d["loadavg_start"] = load0
        for arm, row in d["lockstep"]["arms"].items():
            vs = row.get("vs_default")
            log(f"  lockstep {arm:18s} {row['median_ms']:8.3f} ms/token"
                + (f"  vs default {fmt_ci(vs)}" if vs else "")
                + (f"  vs plain {fmt_ci(row['vs_plain'])}" if row.get("vs_plain") else ""))
        for arm, row in d["whole"]["arms"].items():
            vs = row.get("vs_default")
            if vs:
                log(f"  whole    {arm:18s} {row['median_ms']:8.3f} ms/token  vs default {fmt_ci(vs)}")
        t = d["solo"]["arms"].get("rankcheck-counted", {})
        if "round_trips_per_s" in t:
            log(f"  store: {t['round_trips_per_s']:.1f} round trips/s, {t['round_trips_per_token']:.2f} "
                f"per token; watcher CPU {d['solo']['arms']['rankcheck']['watcher_cpu_us_per_token']:.0f} "
                "us/token")
        out["presets"].append(d)
    return out


# ----------------------------------------------------------------------------- the launch
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: dict[str, Any], nproc: int = TP) -> dict[int, dict[str, Any]]:
    """Run the worker on ``nproc`` ranks with torch's launcher; every rank's raw results."""
    with tempfile.TemporaryDirectory(prefix="cachescope-bench-ranks-") as tmp:
        cfg = Path(tmp) / "config.json"
        cfg.write_text(json.dumps(config))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(WORKER), str(cfg), tmp]
        env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=tmp, PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S)
        results = {}
        for r in range(nproc):
            path = Path(tmp) / f"rank{r}.json"
            if path.is_file():
                results[r] = json.loads(path.read_text())
        if proc.returncode != 0 or len(results) != nproc:
            raise RuntimeError(
                f"the ranks benchmark launch failed (exit {proc.returncode}, results from ranks "
                f"{sorted(results)} of {nproc}): {' '.join(cmd)}\n--- output (tail) ---\n"
                f"{(proc.stdout + proc.stderr)[-4000:]}")
    return results


# ----------------------------------------------------------------------------- statistics
def _token_ratio(arm_steps: list[list[float]], base_steps: list[list[float]]) -> float:
    """Median over repetitions of the median per-token ratio arm / base, minus 1."""
    return statistics.median(statistics.median(a / b for a, b in zip(xa, xb))
                             for xa, xb in zip(arm_steps, base_steps)) - 1


def _arms(per_token: dict[str, list[float]], steps: dict[str, list[list[float]]] | None,
          other: dict[str, list[float]] | None) -> dict[str, Any]:
    """Per arm: ms/token quantiles and its overheads over ``plain`` and ``default``."""
    arms: dict[str, Any] = {}
    for arm, xs in per_token.items():
        q1, med, q3 = quantiles(xs)
        row: dict[str, Any] = {"ms": [x * 1e3 for x in xs], "median_ms": med * 1e3,
                               "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3}
        for a, base in PAIRS:
            if a != arm:
                continue
            row[f"vs_{base}"] = paired_overhead(per_token[base], xs)
            row[f"extra_us_vs_{base}"] = paired_diff(per_token[base], xs)["median"] * 1e6
            if steps is not None:
                row[f"token_ratio_vs_{base}"] = _token_ratio(steps[arm], steps[base])
            if other is not None:   # the other rank's view of the same pairs
                row[f"other_rank_vs_{base}"] = paired_overhead(other[base], other[arm])
        arms[arm] = row
    return arms


def _watcher_s_per_token(wh: dict[str, Any]) -> dict[str, float]:
    """Per checked arm, its watcher thread's CPU seconds per token in its own whole decodes
    (median over the ABBA cells)."""
    return {a: statistics.median(cpu) / wh["tokens"] for a, cpu in wh["watcher_cpu_cell_s"].items()}


def _cpu_with_watcher(wh: dict[str, Any]) -> dict[str, list[float]]:
    """Whole decodes: per repetition, the decoding thread's CPU seconds/token of each arm, a
    checked arm's plus its watcher thread's over the same two cells."""
    out = {a: list(xs) for a, xs in wh["main_cpu_per_token"].items()}
    for a, cells in wh["watcher_cpu_cell_s"].items():
        per_rep = [(cells[2 * i] + cells[2 * i + 1]) / (2 * wh["tokens"])
                   for i in range(wh["reps"])]
        out[a] = [x + c for x, c in zip(out[a], per_rep)]
    return out


def _cpu_estimate(cpu: dict[str, list[float]], wall: dict[str, list[float]], arm: str,
                  base: str) -> dict[str, float]:
    """Per repetition, ``arm``'s extra CPU seconds/token over ``base`` (decoding thread, plus the
    watcher thread for a checked arm) as a share of ``base``'s wall seconds/token: the wall-clock
    overhead if the extra CPU time delays the decode one for one (it does on the decoding thread:
    both ranks run it between the same collectives). Median with a 95 % bootstrap CI, and the
    median extra microseconds per token."""
    shares = [(c - b) / w for c, b, w in zip(cpu[arm], cpu[base], wall[base])]
    lo, hi = bootstrap_ci(shares, statistics.median)
    extra = statistics.median(c - b for c, b in zip(cpu[arm], cpu[base])) * 1e6
    return {"median": statistics.median(shares), "lo": lo, "hi": hi, "extra_us": extra}


def _estimates(row: dict[str, Any], arm: str, cpu: dict[str, list[float]],
               wall: dict[str, list[float]], cpu1: dict[str, list[float]] | None,
               wall1: dict[str, list[float]] | None) -> None:
    """The CPU-time estimates of ``row`` (arm ``arm``) against ``default`` and ``plain``."""
    for base in ("default", "plain"):
        if arm == base or (base == "default" and arm in ("plain", "plain-aa")):
            continue
        row[f"cpu_est_vs_{base}"] = _cpu_estimate(cpu, wall, arm, base)
        if cpu1 is not None and wall1 is not None:
            row[f"other_rank_cpu_est_vs_{base}"] = _cpu_estimate(cpu1, wall1, arm, base)


def _charged(ls: dict[str, Any], watcher: dict[str, float]) -> dict[str, list[float]]:
    """Lockstep seconds/token per repetition, each checked arm's plus its watcher thread's CPU
    seconds per token (``watcher``), as if all of it delayed the decode. In lockstep the watchers'
    work slows whichever arm is stepping, every arm alike in expectation (the order is shuffled),
    so the arm's own steps against ``default`` give the checker's cost on the decoding thread;
    adding the watcher's CPU per token of a decode running alone gives its whole cost."""
    out = {a: list(xs) for a, xs in ls["seconds_per_token"].items()}
    for a, s in watcher.items():
        out[a] = [x + s for x in out[a]]
    return out


def summarize(preset: str, raw: dict[int, dict[str, Any]]) -> dict[str, Any]:
    r0, r1 = raw[0], raw.get(1)
    ls, wh, so = r0["lockstep"], r0["whole"], r0["solo"]
    tokens_ls = ls["tokens"] * ls["reps"]
    lock = {"tokens": ls["tokens"], "reps": ls["reps"], "elapsed_s": ls["elapsed_s"],
            "arms": _arms(ls["seconds_per_token"], ls["step_s"],
                          r1["lockstep"]["seconds_per_token"] if r1 else None)}
    w_s = _watcher_s_per_token(wh)
    charged = _charged(ls, w_s)
    charged1 = _charged(r1["lockstep"], _watcher_s_per_token(r1["whole"])) if r1 else None
    cpu = _charged({"tokens": ls["tokens"], "seconds_per_token": ls["main_cpu_per_token"]}, w_s)
    cpu1 = _charged({"tokens": ls["tokens"],
                     "seconds_per_token": r1["lockstep"]["main_cpu_per_token"]},
                    _watcher_s_per_token(r1["whole"])) if r1 else None
    wall1 = r1["lockstep"]["seconds_per_token"] if r1 else None
    for arm, row in lock["arms"].items():
        row["cpu_ms"] = statistics.median(ls["main_cpu_per_token"][arm]) * 1e3
        _estimates(row, arm, cpu, ls["seconds_per_token"], cpu1, wall1)
    for arm in w_s:
        row = lock["arms"][arm]
        row["vs_default_charged"] = paired_overhead(charged["default"], charged[arm])
        if charged1 is not None:
            row["other_rank_vs_default_charged"] = paired_overhead(charged1["default"],
                                                                   charged1[arm])
    for arm, row in lock["arms"].items():
        g = ls["gc"][arm]
        row["gc"] = dict(g, tokens=tokens_ls, per_500=g["collections"] / tokens_ls * 500)
    default_ms = lock["arms"]["default"]["median_ms"]
    watcher: dict[str, Any] = {}
    for arm, cpu_s in ls["watcher_cpu_s"].items():
        cells = [c / wh["tokens"] * 1e6 for c in wh["watcher_cpu_cell_s"][arm]]
        q1, us, q3 = quantiles(cells)
        watcher[arm] = {"us_per_token": us, "q1_us": q1, "q3_us": q3, "cells_us": cells,
                        "lockstep_cpu_s": cpu_s,
                        "lockstep_us_per_token": cpu_s / tokens_ls * 1e6,
                        "share_of_default_token": us / (default_ms * 1e3),
                        "core_fraction_lockstep": cpu_s / ls["elapsed_s"],
                        "core_fraction_whole": wh["watcher_cpu_s"][arm] / wh["elapsed_s"],
                        "flush_ms_lockstep": statistics.median(ls["flush_s"][arm]) * 1e3,
                        "flush_ms_whole": statistics.median(wh["flush_s"][arm]) * 1e3}
    whole = {"tokens": wh["tokens"], "reps": wh["reps"], "elapsed_s": wh["elapsed_s"],
             "arms": _arms(wh["seconds_per_token"], None,
                           r1["whole"]["seconds_per_token"] if r1 else None)}
    for arm, row in whole["arms"].items():
        row["cpu_ms"] = statistics.median(wh["main_cpu_per_token"][arm]) * 1e3
    cpu_all = _cpu_with_watcher(wh)
    cpu_all1 = _cpu_with_watcher(r1["whole"]) if r1 else None
    for arm, row in whole["arms"].items():
        _estimates(row, arm, cpu_all, wh["seconds_per_token"], cpu_all1,
                   r1["whole"]["seconds_per_token"] if r1 else None)
    solo: dict[str, Any] = {"tokens": so["tokens"], "arms": {}}
    for arm, s in so["arms"].items():
        n = s["tokens"]
        row = {"ms_per_token": s["wall_s"] / n * 1e3, "collections": s["collections"],
               "by_generation": s["by_generation"], "gc_ms": s["gc_ms"],
               "per_500": s["collections"] / n * 500, "tokens": n,
               "rank1_per_500": (r1["solo"]["arms"][arm]["collections"] / n * 500) if r1 else None}
        if "watcher_cpu_s" in s:
            row.update(watcher_cpu_us_per_token=s["watcher_cpu_s"] / n * 1e6,
                       flush_ms=s["flush_s"] * 1e3, flushed=s["flushed"],
                       violations=s["violations"])
        if "store_calls" in s:
            calls = {k: v for k, v in s["store_calls"].items() if k != "fingerprints"}
            trips = sum(calls.values())
            row.update(store_calls=calls, round_trips=trips,
                       round_trips_per_s=trips / s["store_s"], round_trips_per_token=trips / n,
                       fingerprints=s["store_calls"].get("fingerprints", 0), store_s=s["store_s"],
                       steps_per_s=n / s["wall_s"])
        solo["arms"][arm] = row
    one, eight = solo["arms"]["rankcheck"], solo["arms"]["rankcheck-every-8"]
    solo["watcher_us_per_fingerprint"] = (
        (one["watcher_cpu_us_per_token"] - eight["watcher_cpu_us_per_token"]) / (1 - 1 / 8))
    violations = {r: d["violations"] for r, d in raw.items()}
    return {"preset": preset, "tp": r0["tp"], "pp": r0["pp"], "world_size": r0["world_size"],
            "threads": r0["threads"], "sample_tokens": r0["warmup_tokens"],
            "gc_threshold": r0["gc_threshold"], "lockstep": lock, "whole": whole,
            "watcher": watcher, "solo": solo, "violations": violations,
            "checker_violations": {r: d["checker_violations"] for r, d in raw.items()},
            "loadavg_end": r0["loadavg_end"]}


# ----------------------------------------------------------------------------- report
CPU_HEADER = ("CPU estimate vs default: extra CPU us/token (decoding thread + watcher), as a share "
              "of default's wall time [95% CI] | CPU estimate vs plain | rank 1: CPU estimate vs "
              "default")


def _cpu_cells(row: dict[str, Any]) -> str:
    """The CPU-estimate cells of a row (see ``CPU_HEADER``)."""
    out = []
    for key in ("cpu_est_vs_default", "cpu_est_vs_plain", "other_rank_cpu_est_vs_default"):
        o = row.get(key)
        out.append("-" if o is None else f"{o['extra_us']:.0f} us, {fmt_ci(o)}"
                   if key == "cpu_est_vs_default" else "-" if o is None else fmt_ci(o))
    return " | ".join(out)


def _vs(row: dict[str, Any], base: str) -> str:
    o = row.get(f"vs_{base}")
    return "-" if o is None else fmt_ci(o)


def render(res: dict[str, Any], w: Callable[[str], None]) -> None:
    for d in res["presets"]:
        ls, wh, so = d["lockstep"], d["whole"], d["solo"]
        n_viol = sum(sum(v.values()) for v in d["violations"].values())
        w(f"## Cross-rank checker, TP={d['tp']} decode on CPU: `{d['preset']}`")
        w("")
        w(f"{d['world_size']} ranks started by torch's launcher (`python -m torch.distributed.run "
          f"--nproc_per_node {d['world_size']}`, gloo on 127.0.0.1, `torch.set_num_threads("
          f"{d['threads']})` per rank), `ParallelNeoX.from_config(NeoXConfig.preset("
          f"'{d['preset']}'), layout)` with TP={d['tp']}, PP={d['pp']}, greedy `ParallelDecoder` "
          "decodes of a 16-token prompt under `torch.inference_mode()`; both ranks run the same "
          "arms in the same order, so every collective (an `all_reduce` per layer, the token "
          "`broadcast`) is shared. Timings are rank 0's (the other rank's overhead is given "
          f"beside). Every arm generated the same tokens (first: {d['sample_tokens'][:8]}); "
          f"cross-rank and local violations recorded by the instrumented arms: {n_viol}. "
          f"Load average (1, 5, 15 min) before: {d.get('loadavg_start', 'n/a')}, after: "
          f"{d['loadavg_end']}. Arms:")
        w("")
        for arm, text in ARM_TEXT.items():
            w(f"- `{arm}`: {text}")
        w("")
        w("The checker's own cost is `rankcheck` vs `default` (the 1 % goal of issue #19); "
          "`rankcheck` vs `plain` adds the instrumented core's cost. The checker's work on the "
          "decoding thread (its sink at each step's end) is in every design; its watcher thread "
          "(store round trips a few times a second, the comparison with the peer's "
          "fingerprints) runs beside the decode, so in lockstep its CPU time falls on whichever "
          "arm is stepping: the lockstep table adds it to its own arm (\"watcher CPU charged\", "
          "and in the CPU estimate, the judged figure), the whole decodes keep it mostly in the "
          "arm's own cells, and the watcher table gives it per token.")
        w("")
        w(f"**Lockstep**: {ls['reps']} repetitions; in each, every arm decodes {ls['tokens']} new "
          "tokens, token i of every arm back to back in an order shuffled per repetition (pointing "
          "the model at the arm's cache is not timed), `gc.collect()` before each repetition, the "
          "checkers' `flush()` after it (not timed; given below). Overhead = median of the "
          "per-repetition ratios of seconds/token [95% bootstrap CI]. The watchers' work slows "
          "whichever arm is stepping, every arm alike in expectation, so a checked arm against "
          "`default` is the checker's cost on the decoding thread; \"watcher CPU charged\" adds "
          "its watcher thread's CPU time per token of a decode running alone (the watcher table) "
          "as if all of it delayed the decode. **CPU estimate** (the judged figure): per "
          "repetition, the arm's extra CPU time per token over the base arm (the decoding "
          "thread's in the arm's steps, `time.thread_time()`, which waiting in a collective does "
          "not add to; a checked arm's plus its watcher's CPU per token of a decode running "
          "alone), as a share of the base arm's wall time per token: the wall-clock overhead if "
          "the extra CPU delays the decode one for one (the decoding thread's does: both ranks "
          "run it between the same collectives). It leaves out the other rank's and the host's "
          "scheduling noise that dominates the wall-clock figures on a shared 2-CPU machine, "
          "and also any cost of the watcher and the decode contending for the GIL or a core "
          "beyond the watcher's own CPU time. "
          f"Wall time {ls['elapsed_s']:.0f} s.")
        w("")
        w("| arm | median ms/token | IQR | vs default [95% CI] | vs default, watcher CPU charged "
          "[95% CI] | vs plain [95% CI] | mean-ratio vs default [95% CI] | extra us/token vs "
          "default | median per-token ratio vs default | rank 1: vs default; charged | GC "
          "collections / 500 tokens | CPU ms/token, decoding thread | " + CPU_HEADER + " |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for arm, r in ls["arms"].items():
            vd = r.get("vs_default")
            other = [r.get(k) for k in ("other_rank_vs_default", "other_rank_vs_default_charged")]
            cells = ([fmt_ci(vd, "mean"), f"{r['extra_us_vs_default']:.0f}",
                      pct(r["token_ratio_vs_default"]),
                      "; ".join(fmt_ci(o) for o in other if o) or "-"]
                     if vd else ["-"] * 4)
            w(f"| {arm} | {r['median_ms']:.3f} | {r['q1_ms']:.3f}-{r['q3_ms']:.3f} | "
              f"{_vs(r, 'default')} | {_vs(r, 'default_charged')} | {_vs(r, 'plain')} | "
              f"{' | '.join(cells)} | {r['gc']['per_500']:.2f} | {r['cpu_ms']:.3f} | "
              f"{_cpu_cells(r)} |")
        w("")
        w(f"**Whole decodes, ABBA**: {wh['reps']} repetitions; in each, the arms in a shuffled "
          f"order and then reversed, one whole decode of {wh['tokens']} new tokens per cell "
          "(opening, steps, closing; the watcher's work lands in the arm's own cell, give or take "
          "one poll), an arm's time the sum of its two cells; a checked arm's `flush()` "
          "right after its cell, not timed. CPU estimate as in lockstep, with the watcher's CPU "
          f"time over the arm's own two cells. Wall time {wh['elapsed_s']:.0f} s.")
        w("")
        w("| arm | median ms/token | IQR | vs default [95% CI] | vs plain [95% CI] | extra us/token "
          "vs default | rank 1: vs default | CPU ms/token, decoding thread | " + CPU_HEADER + " |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for arm, r in wh["arms"].items():
            vd = r.get("vs_default")
            cells = ([f"{r['extra_us_vs_default']:.0f}", fmt_ci(r["other_rank_vs_default"])]
                     if vd else ["-"] * 2)
            w(f"| {arm} | {r['median_ms']:.3f} | {r['q1_ms']:.3f}-{r['q3_ms']:.3f} | "
              f"{_vs(r, 'default')} | {_vs(r, 'plain')} | {' | '.join(cells)} | "
              f"{r['cpu_ms']:.3f} | {_cpu_cells(r)} |")
        w("")
        w("**Watcher thread** (CPU time of the thread `attach` started, "
          "`time.pthread_getcpuclockid`, user + system): per token of its arm's whole decodes "
          "(from a cell's start to the end of the `flush()` after it: its work for the cell's "
          "steps and its polling, at the rate of a decode running alone; median and "
          "IQR over the cells), that time as a share of a `default` lockstep token (what it adds "
          "if all of it delays the decode: the two ranks keep both cores busy), per token of its "
          "arm in lockstep (higher: it polls all the while the other arms step), the share of one "
          "core it used over each phase, and the median `flush()` at the end of a run (waiting "
          "for the peer's last fingerprints; once per run, not per token).")
        w("")
        w("| arm | watcher CPU us/token, own decodes (IQR) | share of a default token | us/token "
          "in lockstep | core share, lockstep / whole | flush ms, lockstep / whole |")
        w("|---|---|---|---|---|---|")
        for arm, x in d["watcher"].items():
            w(f"| {arm} | {x['us_per_token']:.0f} ({x['q1_us']:.0f}-{x['q3_us']:.0f}) | "
              f"{pct(x['share_of_default_token'])} | {x['lockstep_us_per_token']:.0f} | "
              f"{x['core_fraction_lockstep'] * 100:.2f}% / {x['core_fraction_whole'] * 100:.2f}% | "
              f"{x['flush_ms_lockstep']:.1f} / {x['flush_ms_whole']:.1f} |")
        w("")
        w(f"**Solo decodes** (one decode of {so['tokens']} new tokens per arm, alone, after the "
          "other checkers were detached; `gc.collect()` before each): cyclic-GC collections that "
          "started during the decode (`gc.callbacks`, whichever thread triggered them), per 500 "
          "tokens, on rank 0 (rank 1 beside). `rankcheck-counted` is `rankcheck` with its store "
          "wrapped in a counting `dist.Store` (one count per client call, a round trip to the "
          "TCPStore each), for the watcher's store traffic.")
        w("")
        w("| arm | ms/token (one decode) | collections (gen 0/1/2) | per 500 tokens (rank 1) | "
          "ms in GC | watcher CPU us/token | store round trips / s | per token | fingerprints "
          "published | flush ms |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for arm, r in so["arms"].items():
            gens = "/".join(str(x) for x in r["by_generation"])
            r1 = "" if r["rank1_per_500"] is None else f" ({r['rank1_per_500']:.2f})"
            cpu = f"{r['watcher_cpu_us_per_token']:.0f}" if "watcher_cpu_us_per_token" in r else "-"
            trips = (f"{r['round_trips_per_s']:.1f} | {r['round_trips_per_token']:.2f} | "
                     f"{r['fingerprints']}") if "round_trips" in r else "- | - | -"
            fl = f"{r['flush_ms']:.1f}" if "flush_ms" in r else "-"
            w(f"| {arm} | {r['ms_per_token']:.3f} | {r['collections']} ({gens}) | "
              f"{r['per_500']:.2f}{r1} | {r['gc_ms']:.1f} | {cpu} | {trips} | {fl} |")
        w("")
        w(f"Watcher CPU per fingerprint (the `every=1` and `every=8` solo decodes' difference, "
          f"per fingerprint not taken): about {so['watcher_us_per_fingerprint']:.0f} us.")
        counted = so["arms"].get("rankcheck-counted", {})
        if counted.get("store_calls"):
            w("")
            w("Store calls of `rankcheck-counted`: " + ", ".join(
                f"{k} {v}" for k, v in sorted(counted["store_calls"].items()))
              + f" over {counted['store_s']:.1f} s ({counted['steps_per_s']:.1f} steps/s).")
        found = [(r, arm, text) for r, arms in sorted(d["checker_violations"].items())
                 for arm, texts in arms.items() for text in texts]
        if found:
            w("")
            w("Cross-rank violations the checkers recorded (rank, arm: summary):")
            w("")
            for r, arm, text in found:
                w(f"- rank {r}, `{arm}`: {text}")
        w("")
