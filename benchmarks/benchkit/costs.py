"""Section ``profile``: where the instrumentation's time goes.

* push+pop in a warm loop per mode (from an ``nn.Module`` method, as a layer issues them);
* cProfile of a real decode in default mode (cachescope's own functions, and the inclusive time
  of its public entry points);
* push+pop right after cache-evicting matmuls (a decode step runs its ops with cold CPU caches);
* in situ: every public op of a real decode wrapped in a ``perf_counter_ns`` accumulator
  (a subclass of each cache class), plain vs default.
"""

from __future__ import annotations

import cProfile
import gc
import pstats
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import cachescope
from cachescope import Cache, InstrumentedCache
from cachescope.neox import NeoXConfig, NeoXModel, generate

from .common import PERF, Context, Modes, log, prompt_for
from .ops import Driver, f_pushpop

ENTRY_POINTS = ("push", "pop", "get", "set", "clear", "clear_all", "q_size", "end_step",
                "mark_step", "generation", "finish_generation")
TIMED_OPS = ("push", "pop", "get", "set", "clear", "end_step", "q_size")


def run(ctx: Context) -> dict[str, Any]:
    log("profile: push+pop per mode, cProfile, cold caches, in situ")
    q = ctx.quick
    res = bench_profile("tiny", 32 if q else 256, n=2000 if q else 20000)
    res["cold"] = bench_cold(40 if q else 400)
    for r in res["cold"]["rows"]:
        log(f"  cold {r['mode']:8s} push+pop warm {r['warm_ns'] / 1e3:.1f} us, after MLP matmul "
            f"{r['mlp_ns'] / 1e3:.1f} us, after readout matmul {r['readout_ns'] / 1e3:.1f} us")
    presets = [p for p in ("tiny", "pythia-70m") if p in ctx.presets] or ["tiny"]
    res["insitu"] = bench_insitu(presets, 16 if q else 64, 1 if q else 5)
    for preset, rows in res["insitu"]["presets"].items():
        log(f"  in situ {preset}: default adds {sum(r['extra_us_per_token'] for r in rows):.1f} "
            "us/token in its ops")
    return res


def bench_profile(preset: str, tokens: int, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"preset": preset, "tokens": tokens, "components": []}
    cfg = NeoXConfig.preset(preset)
    k = torch.randn(1, cfg.num_heads, 64, cfg.head_dim)
    kv = (k, k.clone())
    comps = out["components"]
    plain = Cache()

    comps.append(("plain `Cache.push` + `Cache.pop` from a function",
                  min(f_pushpop(plain, kv, n) for _ in range(5)) / n * 1e9))
    for mode in ("plain", "core", "default", "trace-all"):
        mk = Modes("profile")
        cache = mk.make(mode)
        driver = Driver()
        ctx = cache.generation() if hasattr(cache, "generation") else None
        if ctx is not None:
            ctx.__enter__()
        cache.set("state_ids", (None, 0))
        driver.pushpop(cache, kv, 100)          # warm-up: labels the driver
        ns = min(driver.pushpop(cache, kv, n) for _ in range(5)) / n * 1e9
        if ctx is not None:
            ctx.__exit__(None, None, None)
        comps.append((f"push + pop from an `nn.Module` method: `{mode}`", ns))
        mk.close()

    # cProfile of a real decode in default mode. Profiling inflates every Python call: read the
    # shares, not the absolute numbers.
    model = NeoXModel(cfg)
    prompt = prompt_for(cfg.vocab_size)
    mk = Modes("cprofile")
    cache = mk.make("default")
    with torch.inference_mode():
        generate(model, prompt, 8, cache=cache)
        prof = cProfile.Profile()
        t0 = PERF()
        prof.enable()
        generate(model, prompt, tokens, cache=cache)
        prof.disable()
        total = PERF() - t0
    mk.close()
    package = str(Path(cachescope.__file__).resolve().parent)
    neox = str(Path(package) / "neox")
    rows, entry = [], []
    own_total = 0.0
    for (fname, line, func), (cc, nc, tt, ct, callers) in pstats.Stats(prof).stats.items():  # type: ignore[attr-defined]
        try:
            path = str(Path(fname).resolve())
        except (OSError, ValueError):
            continue
        if not path.startswith(package) or path.startswith(neox):
            continue
        name = f"{Path(fname).name}:{line}({func})"
        rows.append((name, nc, tt))
        own_total += tt
        if func in ENTRY_POINTS:
            entry.append((f"{Path(fname).name}:{func}", nc / tokens, ct / tokens * 1e6))
    rows.sort(key=lambda r: -r[2])
    entry.sort(key=lambda r: -r[2])
    out["cprofile_total_s"] = total
    out["cprofile_cachescope_tottime_s"] = own_total
    out["cprofile"] = [(name, nc / tokens, tt / tokens * 1e6, tt / own_total if own_total else 0.0)
                       for name, nc, tt in rows[:18]]
    out["entry_points"] = entry
    return out


def bench_cold(n: int) -> dict[str, Any]:
    """push+pop timed alone, (a) back to back, (b) right after a 2048x512 matmul (an MLP-sized
    weight, 4 MiB), (c) right after a 50304x512 matmul (the pythia-70m readout, 98 MiB, which
    evicts the CPU caches the way every decode step does)."""
    hidden = 512
    big = torch.randn(50304, hidden)
    mid = torch.randn(2048, hidden)
    x = torch.randn(1, hidden)
    kv = (torch.randn(1, 8, 100, 64), torch.randn(1, 8, 100, 64))
    pc = time.perf_counter_ns

    class Layer(nn.Module):
        def run(self, cache: Any, flush: Callable[[], Any], n: int) -> float:
            ts = []
            for _ in range(n):
                flush()
                t0 = pc()
                cache.push("attn_kv_1", kv)
                cache.pop("attn_kv_1")
                ts.append(pc() - t0)
            return statistics.median(ts)

    rows = []
    mk = Modes("cold")
    layer = Layer()
    with torch.inference_mode():
        for mode in ("plain", "core", "default"):
            cache = mk.make(mode)
            cache.set("state_ids", (None, 0))
            layer.run(cache, lambda: None, 50)   # warm-up; labels the layer
            rows.append({"mode": mode,
                         "warm_ns": layer.run(cache, lambda: None, n),
                         "mlp_ns": layer.run(cache, lambda: x @ mid.T, n),
                         "readout_ns": layer.run(cache, lambda: x @ big.T, max(20, n // 4))})
    mk.close()
    del big
    return {"n": n, "rows": rows}


def timed_class(base: type) -> type:
    """``base`` with each op in ``TIMED_OPS`` wrapped in a ``perf_counter_ns`` accumulator; the
    class keeps the totals (``bench_ns``, ``bench_calls``)."""
    pc = time.perf_counter_ns
    ns: Counter[str] = Counter()
    calls: Counter[str] = Counter()

    def make(orig: Callable[..., Any], name: str) -> Callable[..., Any]:
        # the first argument is not called `self`, so nothing takes the wrapper for a method frame
        def timed(cache_: Any, *a: Any, **k: Any) -> Any:
            t0 = pc()
            try:
                return orig(cache_, *a, **k)
            finally:
                ns[name] += pc() - t0
                calls[name] += 1
        return timed

    body: dict[str, Any] = {name: make(getattr(base, name), name) for name in TIMED_OPS
                            if hasattr(base, name)}
    body.update(bench_ns=ns, bench_calls=calls)
    return type(f"Timed{base.__name__}", (base,), body)


def bench_insitu(presets: list[str], tokens: int, reps: int) -> dict[str, Any]:
    """Each public op timed inside a real decode (a wrapper around every call, ~0.3 us, in both
    columns), plain vs default; median over repetitions."""
    out: dict[str, Any] = {"tokens": tokens, "reps": reps, "presets": {}}
    for preset in presets:
        cfg = NeoXConfig.preset(preset)
        model = NeoXModel(cfg)
        prompt = prompt_for(cfg.vocab_size)
        classes = {"plain": timed_class(Cache), "default": timed_class(InstrumentedCache)}
        caches = {"plain": classes["plain"](),
                  "default": classes["default"](name=f"bench-insitu-{preset}")}
        per: dict[str, dict[str, list[tuple[float, float]]]] = {k: {} for k in caches}
        with torch.inference_mode():
            for r in range(reps + 1):   # the first is a warm-up
                for mode, cache in caches.items():
                    cls = classes[mode]
                    cls.bench_ns.clear()
                    cls.bench_calls.clear()
                    generate(model, prompt, tokens, cache=cache)
                    if r == 0:
                        continue
                    for op, calls in cls.bench_calls.items():
                        per[mode].setdefault(op, []).append((cls.bench_ns[op] / calls, calls / tokens))
        rows = []
        for op, d in per["default"].items():
            pl = per["plain"].get(op)
            ns_d = statistics.median(x[0] for x in d)
            ns_p = statistics.median(x[0] for x in pl) if pl else 0.0
            calls = d[0][1]
            rows.append({"op": op, "calls_per_token": calls, "plain_ns": ns_p if pl else None,
                         "default_ns": ns_d, "extra_us_per_token": (ns_d - ns_p) * calls / 1e3})
        rows.sort(key=lambda r: -r["extra_us_per_token"])
        out["presets"][preset] = rows
        del caches
        gc.collect()
    return out


def render(prof: dict[str, Any], w: Callable[[str], None]) -> None:
    w("## Where the time goes")
    w("")
    w("push+pop pairs in a warm loop (min of 5 runs, ns per pair; `tiny` shapes; the module "
      "rows inside `cache.generation()` with one open step):")
    w("")
    w("| component | ns |")
    w("|---|---|")
    for name, ns in prof["components"]:
        w(f"| {name} | {ns:.0f} |")
    w("")
    w(f"cProfile of one `generate()` of {prof['tokens']} tokens on `{prof['preset']}` in default "
      f"mode ({prof['cprofile_total_s'] * 1e3 / prof['tokens']:.2f} ms/token under the profiler; "
      f"cachescope's own code: {prof['cprofile_cachescope_tottime_s'] * 1e6 / prof['tokens']:.0f} "
      "us/token of tottime). Profiling inflates every Python call, so read the shares:")
    w("")
    w("| cachescope function | calls/token | tottime us/token (profiled) | share of cachescope tottime |")
    w("|---|---|---|---|")
    for name, calls, us, share in prof["cprofile"]:
        w(f"| `{name}` | {calls:.1f} | {us:.1f} | {share:.0%} |")
    w("")
    w("Inclusive (cumulative) time of the entry points, per token (profiled):")
    w("")
    w("| entry point | calls/token | us/token |")
    w("|---|---|---|")
    for name, calls, us in prof["entry_points"]:
        w(f"| `{name}` | {calls:.1f} | {us:.1f} |")
    w("")
    cold = prof.get("cold")
    if cold:
        w("Cold caches: one push+pop timed alone from an `nn.Module` method, median of "
          f"{cold['n']} (readout: {max(20, cold['n'] // 4)}), back to back (warm), right after a "
          "1x512 @ 512x2048 matmul (4 MiB of weights, an MLP projection) and right after a "
          "1x512 @ 512x50304 matmul (98 MiB, the pythia-70m readout, which every decode step runs "
          "and which evicts the CPU caches):")
        w("")
        w("| mode | warm us/pair | after MLP matmul | after readout matmul |")
        w("|---|---|---|---|")
        for r in cold["rows"]:
            w(f"| {r['mode']} | {r['warm_ns'] / 1e3:.1f} | {r['mlp_ns'] / 1e3:.1f} | "
              f"{r['readout_ns'] / 1e3:.1f} |")
        w("")
    insitu = prof.get("insitu")
    if insitu:
        w(f"In situ: every public op wrapped in a `perf_counter_ns` accumulator (~0.3 us of wrapper "
          f"per call, in both columns) during `generate()` of {insitu['tokens']} tokens, "
          f"{insitu['reps']} repetitions (median), plain `Cache` vs `InstrumentedCache()` "
          "(default mode), each through a subclass that wraps the ops:")
        for preset, rows in insitu["presets"].items():
            w("")
            w(f"`{preset}`:")
            w("")
            w("| op | calls/token | plain ns/call | default ns/call | extra us/token |")
            w("|---|---|---|---|---|")
            for r in rows:
                pl = "-" if r["plain_ns"] is None else f"{r['plain_ns']:.0f}"
                w(f"| `{r['op']}` | {r['calls_per_token']:.2f} | {pl} | {r['default_ns']:.0f} | "
                  f"{r['extra_us_per_token']:.1f} |")
            w(f"| total | | | | {sum(r['extra_us_per_token'] for r in rows):.1f} |")
        w("")
