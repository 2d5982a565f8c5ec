"""Section ``ops``: per-op microbenchmarks (push+pop pair, set, get, step boundary), ns/op,
every mode against the plain ``Cache``."""

from __future__ import annotations

import contextlib
import random
from typing import Any, Callable

import torch
from torch import nn

from cachescope.neox import NeoXConfig

from .common import PERF, Context, Modes, log, paired_diff, quantiles

OP_MODES = ("plain", "core", "default", "trace-all", "trace-10")


class Driver(nn.Module):
    """Issues cache ops from inside an ``nn.Module`` method, the way an attention layer does
    (attribution finds the owner in the first frame it looks at)."""

    def pushpop(self, cache: Any, value: Any, n: int) -> float:
        push, pop = cache.push, cache.pop
        t0 = PERF()
        for _ in range(n):
            push("attn_kv_0", value)
            pop("attn_kv_0")
        return PERF() - t0

    def push_only(self, cache: Any, value: Any) -> None:
        cache.push("attn_kv_x", value)

    def pop_only(self, cache: Any) -> Any:
        return cache.pop("attn_kv_x")

    def sets(self, cache: Any, value: Any, n: int) -> float:
        set_ = cache.set
        t0 = PERF()
        for _ in range(n):
            set_("use_cache", True)
        return PERF() - t0

    def gets(self, cache: Any, value: Any, n: int) -> float:
        get = cache.get
        t0 = PERF()
        for _ in range(n):
            get("state_ids")
        return PERF() - t0

    def steps(self, cache: Any, value: Any, n: int) -> float:
        set_ = cache.set
        end = getattr(cache, "end_step", None) or (lambda tokens=0: None)
        base = cache.get("state_ids")[1] + 1
        t0 = PERF()
        for i in range(base, base + n):
            set_("state_ids", (i, i + 1))
            end(tokens=1)
        return PERF() - t0


def f_pushpop(cache: Any, value: Any, n: int) -> float:
    push, pop = cache.push, cache.pop
    t0 = PERF()
    for _ in range(n):
        push("attn_kv_0", value)
        pop("attn_kv_0")
    return PERF() - t0


def f_sets(cache: Any, value: Any, n: int) -> float:
    set_ = cache.set
    t0 = PERF()
    for _ in range(n):
        set_("use_cache", True)
    return PERF() - t0


def f_gets(cache: Any, value: Any, n: int) -> float:
    get = cache.get
    t0 = PERF()
    for _ in range(n):
        get("state_ids")
    return PERF() - t0


OPS = {  # name -> (Driver method, free function, ops per iteration)
    "push+pop": ("pushpop", f_pushpop, 2),
    "set": ("sets", f_sets, 1),
    "get": ("gets", f_gets, 1),
    "step boundary": ("steps", None, 1),
}


def run(ctx: Context) -> dict[str, Any]:
    log("ops: per-op microbenchmarks")
    res = bench_ops(n=200 if ctx.quick else 400, reps=2 if ctx.quick else 15,
                    blocks=2 if ctx.quick else 10, seed=ctx.seed)
    for r in res["rows"]:
        if r["variant"] == "module":
            over = "" if r["mode"] == "plain" else f"  +{r['over_ns']:.0f} ns"
            log(f"  {r['op']:14s} {r['mode']:10s} {r['ns_per_op']:8.0f} ns/op{over}")
    return res


def bench_ops(n: int, reps: int, blocks: int, seed: int) -> dict[str, Any]:
    """ns per op. Each repetition runs ``blocks`` generations (``cache.generation()`` + one open
    step, so that tracing modes have a span to record into); in each, every mode runs ``n``
    iterations of each op; modes are shuffled within a repetition."""
    cfg = NeoXConfig.preset("tiny")
    k = torch.randn(1, cfg.num_heads, 64, cfg.head_dim)
    value = (k, k.clone())
    driver = Driver()
    mk = Modes("ops")
    caches = {m: mk.make(m) for m in OP_MODES}
    rng = random.Random(seed)
    variants = [("module", op) for op in OPS] + [("function", op) for op in OPS if OPS[op][1]]
    per: dict[tuple[str, str, str], list[float]] = {}
    with torch.inference_mode():
        for rep in range(reps + 1):           # the first repetition is a warm-up
            order = list(OP_MODES)
            rng.shuffle(order)
            totals = {(m, v, op): 0.0 for m in order for v, op in variants}
            for m in order:
                cache = caches[m]
                for _ in range(blocks):
                    ctx = cache.generation() if hasattr(cache, "generation") else contextlib.nullcontext()
                    with ctx:
                        cache.set("state_ids", (None, 0))
                        for v, op in variants:
                            meth, fn, _ = OPS[op]
                            bench = getattr(driver, meth) if v == "module" else fn
                            totals[(m, v, op)] += bench(cache, value, n)
                        if hasattr(cache, "end_step"):
                            cache.end_step(tokens=0)
                    cache.clear("state_ids")
                    cache.clear("use_cache")
                    mk.flush(m)   # (not timed) so the export thread does not run in the next cell
            if rep > 0:
                for key, t in totals.items():
                    per.setdefault(key, []).append(t / (blocks * n * OPS[key[2]][2]) * 1e9)
    mk.close()
    out: dict[str, Any] = {"n": n, "reps": reps, "blocks": blocks, "rows": []}
    for v, op in variants:
        base = per[("plain", v, op)]
        for m in OP_MODES:
            xs = per[(m, v, op)]
            q1, med, q3 = quantiles(xs)
            row = {"variant": v, "op": op, "mode": m, "ns_per_op": med, "q1": q1, "q3": q3,
                   "min": min(xs)}
            if m != "plain":
                d = paired_diff(base, xs)
                row.update(over_ns=d["median"], over_lo=d["lo"], over_hi=d["hi"])
            out["rows"].append(row)
    return out


def render(ops: dict[str, Any], w: Callable[[str], None]) -> None:
    w("## Per-op microbenchmarks")
    w("")
    w(f"ns per op, median of {ops['reps']} repetitions (modes shuffled per repetition); each "
      f"repetition runs {ops['blocks']} blocks of {ops['n']} iterations per op, each block inside "
      "`cache.generation()` with one open step (so tracing modes record span events). A push+pop "
      "pair counts as 2 ops. `module` loop: ops issued from an `nn.Module` method (attribution "
      "finds the owner in the first frame, as in a decode); `function` loop: from a plain "
      "function (attribution walks the stack and finds no module). `step boundary` = "
      "`set('state_ids', (i, i+1))` + `end_step()` per step. Overhead = median of paired "
      "differences vs plain [95% bootstrap CI].")
    w("")
    w("| op | loop | mode | ns/op (median) | IQR | over plain, ns/op [95% CI] |")
    w("|---|---|---|---|---|---|")
    for r in ops["rows"]:
        over = "-" if r["mode"] == "plain" else (
            f"{r['over_ns']:.0f} [{r['over_lo']:.0f}, {r['over_hi']:.0f}]")
        w(f"| {r['op']} | {r['variant']} | {r['mode']} | {r['ns_per_op']:.0f} | "
          f"{r['q1']:.0f}-{r['q3']:.0f} | {over} |")
    w("")
