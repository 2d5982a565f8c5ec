"""Sections ``lockstep`` and ``decode``: decode overhead on the reference model
(``cachescope.neox``), plain ``Cache`` vs ``InstrumentedCache`` modes.

``lockstep``: each mode decodes token by token beside two plain caches on the same model
(``cachescope.neox.Decoder``; per token: the mode, plain A, plain B). Overhead = mode / B; A / B
is the control (how much the mode's step slows the plain step right after it); a ``plain-aa``
mode is the A/A control of the whole design.

``decode``: whole ``generate()`` calls, modes shuffled in every repetition, the cross-check.
"""

from __future__ import annotations

import gc
import random
from typing import Any, Callable

import torch

from cachescope import Cache
from cachescope.neox import Decoder, NeoXConfig, NeoXModel, generate

from .common import (CPU, PERF, Context, GCWatch, Modes, fmt_ci, gc_summary, loadavg, lockstep,
                     LockstepTally, log, paired_diff, paired_overhead, pct, prompt_for, quantiles,
                     shuffled_rounds)

LOCKSTEP_MODES = ("plain-aa", "core", "default", "trace-all", "trace-10")
DECODE_MODES = ("plain", "plain-aa", "core", "default", "trace-all", "trace-10")

#: (new tokens per decode, repetitions) per preset; ``quick`` under --quick
LOCKSTEP_SIZES = {"tiny": (128, 20), "pythia-70m": (32, 12), "pythia-160m": (24, 8), "quick": (12, 2)}
DECODE_SIZES = {"tiny": (128, 20), "pythia-70m": (64, 8), "pythia-160m": (48, 6), "quick": (12, 2)}


class DecoderRun:
    """A ``cachescope.neox.Decoder`` as a lockstep run."""

    def __init__(self, model: NeoXModel, prompt: list[int], tokens: int, cache: Any) -> None:
        self.model, self.cache = model, cache
        self.decoder = Decoder(model, prompt, tokens, cache=cache)
        self.tokens = self.decoder.tokens

    def active(self) -> Any:
        return self.model.using_cache(self.cache)

    def open(self) -> None:
        self.decoder.__enter__()

    def step(self) -> None:
        self.decoder.step()

    def settle(self) -> None:
        pass   # the reference model keeps nothing between steps

    def close(self) -> None:
        self.decoder.__exit__(None, None, None)


# ----------------------------------------------------------------------------- lockstep

def _warm_up(model: Any, prompt: list[int], tokens: int, caches: dict[str, Any],
             reference: Any = None) -> None:
    """A short decode on every mode's cache (labels the modules), which must give the same
    tokens as on ``reference`` (or as on the first mode's cache)."""
    expected = generate(model, prompt, min(tokens, 8), cache=reference) \
        if reference is not None else None
    for m, cache in caches.items():
        out = generate(model, prompt, min(tokens, 8), cache=cache)
        expected = expected or out
        if out != expected:
            raise AssertionError(f"mode {m} changed the generated tokens")

def run_lockstep(ctx: Context) -> list[dict[str, Any]]:
    out = []
    for preset in ctx.presets:
        tokens, reps = ctx.size(LOCKSTEP_SIZES, preset, lockstep=True)
        log(f"lockstep {preset}: {reps} reps x {len(LOCKSTEP_MODES)} modes (+2 plain arms) x "
            f"{tokens} tokens")
        d = bench_lockstep(preset, tokens, reps, LOCKSTEP_MODES, ctx.seed)
        for mode, r in d["modes"].items():
            log(f"  {mode:10s} {r['median_ms']:8.3f} ms/token  overhead {fmt_ci(r['overhead_wall'])}"
                f"  (plain step after it {fmt_ci(r['plain_after_mode'])}; GC/500 tokens "
                f"{r['gc']['mode']['per_500']:.1f} vs {r['gc']['plain']['per_500']:.1f})")
        out.append(d)
    return out


def bench_lockstep(preset: str, tokens: int, reps: int, modes: tuple[str, ...],
                   seed: int) -> dict[str, Any]:
    """Per repetition and mode, three decodes in lockstep on one model: the mode's, plain A's and
    plain B's, in that order for every token; mode order shuffled per repetition,
    ``gc.collect()`` before each triple."""
    cfg = NeoXConfig.preset(preset)
    model = NeoXModel(cfg)
    prompt = prompt_for(cfg.vocab_size)
    mk = Modes(f"lockstep-{preset}")
    caches = {m: mk.make(m) for m in modes}
    plain_a, plain_b = Cache(), Cache()
    tally = LockstepTally(modes)
    rng = random.Random(seed)
    with torch.inference_mode(), GCWatch() as watch:
        _warm_up(model, prompt, tokens, caches, reference=plain_a)
        t_start = PERF()
        for m in shuffled_rounds(modes, reps, rng):
            gc.collect()
            runs = [DecoderRun(model, prompt, tokens, c) for c in (caches[m], plain_a, plain_b)]
            r = lockstep(runs, tokens, watch, (m, f"{m}/A", f"{m}/B"))
            t0 = PERF()
            mk.flush(m)   # the span export thread's backlog is charged to the traced arm
            r["totals"][0] += PERF() - t0
            if not runs[0].tokens == runs[1].tokens == runs[2].tokens:
                raise AssertionError(f"mode {m} changed the generated tokens")
            tally.add(m, r, tokens)
    elapsed = PERF() - t_start
    out: dict[str, Any] = {"preset": preset, "tokens": tokens, "reps": reps, "elapsed_s": elapsed,
                           "loadavg_end": loadavg(), "modes": {}}
    for m in modes:
        row = tally.row(m)
        row["gc"] = {name: gc_summary(watch, label, tokens * reps)
                     for name, label in (("mode", m), ("plain_a", f"{m}/A"), ("plain", f"{m}/B"))}
        out["modes"][m] = row
    del caches
    mk.close()
    gc.collect()
    return out


# ----------------------------------------------------------------------------- whole generate()
def run_decode(ctx: Context) -> list[dict[str, Any]]:
    out = []
    for preset in ctx.presets:
        tokens, reps = ctx.size(DECODE_SIZES, preset)
        log(f"decode {preset}: {reps} reps x {len(DECODE_MODES)} modes x {tokens} tokens")
        d = bench_decode(preset, tokens, reps, DECODE_MODES, ctx.seed)
        for mode, r in d["modes"].items():
            extra = "" if mode == "plain" else f"  overhead {fmt_ci(r['overhead_wall'])}"
            log(f"  {mode:10s} {r['median_ms']:8.3f} ms/token{extra}")
        out.append(d)
    return out


def bench_decode(preset: str, tokens: int, reps: int, modes: tuple[str, ...], seed: int) -> dict[str, Any]:
    """One ``generate()`` per cell, mode order shuffled in every repetition, ``gc.collect()``
    before each cell."""
    cfg = NeoXConfig.preset(preset)
    model = NeoXModel(cfg)
    prompt = prompt_for(cfg.vocab_size)
    mk = Modes(preset)
    caches = {m: mk.make(m) for m in modes}
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    rng = random.Random(seed)
    with torch.inference_mode(), GCWatch() as watch:
        _warm_up(model, prompt, tokens, caches)
        t_start = PERF()
        for m in shuffled_rounds(modes, reps, rng):
            gc.collect()
            watch.label = m
            c0, t0 = CPU(), PERF()
            generate(model, prompt, tokens, cache=caches[m])
            mk.flush(m)   # charge the span export thread's work to the mode that made it
            t1, c1 = PERF(), CPU()
            watch.label = None
            wall[m].append((t1 - t0) / tokens)
            cpu[m].append((c1 - c0) / tokens)
    elapsed = PERF() - t_start
    traced = {}
    for m in ("trace-all", "trace-10"):
        exported = mk.exported(m) if m in modes else None
        if exported is not None:
            traced[m] = {"generate_spans": exported["spans"].get("generate", 0),
                         "generations": reps + 1,
                         "step_spans": exported["spans"].get("decode_step", 0)}
    summary: dict[str, Any] = {"preset": preset, "tokens": tokens, "reps": reps,
                               "elapsed_s": elapsed, "modes": {}, "traced": traced,
                               "loadavg_end": loadavg()}
    for m in modes:
        q1, med, q3 = quantiles(wall[m])
        row: dict[str, Any] = {"wall_ms": [x * 1e3 for x in wall[m]],
                               "cpu_ms": [x * 1e3 for x in cpu[m]],
                               "median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
                               "min_ms": min(wall[m]) * 1e3, "max_ms": max(wall[m]) * 1e3,
                               "gc_us": watch.seconds[m] / (tokens * reps) * 1e6,
                               "gc_collections": watch.count(m)}
        if m != "plain":
            row["overhead_wall"] = paired_overhead(wall["plain"], wall[m])
            row["overhead_cpu"] = paired_overhead(cpu["plain"], cpu[m])
            row["extra_us_per_token"] = paired_diff(wall["plain"], wall[m])["median"] * 1e6
        summary["modes"][m] = row
    del caches
    mk.close()
    gc.collect()
    return summary


# ----------------------------------------------------------------------------- report
def render_lockstep(res: list[dict[str, Any]], w: Callable[[str], None]) -> None:
    for d in res:
        w(f"## Reference model, decode overhead, lockstep: `{d['preset']}`")
        w("")
        w(f"{d['reps']} repetitions x {len(d['modes'])} modes. Per repetition and mode, three "
          f"decodes of {d['tokens']} new tokens (16-token prompt) on the same `cachescope.neox` "
          "model, one on the mode's cache and two on plain `Cache()`s (A and B), driven token by "
          "token with `cachescope.neox.Decoder`: for every token the mode's step, then A's, then "
          "B's; mode order shuffled per repetition, `gc.collect()` before each triple. An arm's "
          "time is its opening, steps and closing (a traced arm also pays its span processor's "
          "flush). The overhead is mode / B: the mode's step always follows another cache's step, "
          "so its own data is colder than in a real decode (pessimistic), while B always follows a "
          "plain step. A / B shows how much the mode's step slows the plain step right after it. "
          "GC: collections that started during each arm's steps, per 500 tokens (few: each "
          "triple starts from a `gc.collect()`). "
          f"Section wall time {d['elapsed_s']:.0f} s; load average after: {d['loadavg_end']}.")
        w("")
        w("| mode | plain B median ms/token | mode median ms/token | overhead: mode / plain B "
          "[95% CI] | mean-ratio overhead [95% CI] | sd of the ratios | median per-token ratio | "
          "extra us/token | plain A (right after the mode) / plain B [95% CI] | GC collections / "
          "500 tokens: mode, A, B |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for mode, r in d["modes"].items():
            g = r["gc"]
            w(f"| {mode} | {r['plain_median_ms']:.3f} | {r['median_ms']:.3f} | "
              f"{fmt_ci(r['overhead_wall'])} | {fmt_ci(r['overhead_wall'], 'mean')} | "
              f"{r['overhead_wall']['sd'] * 100:.2f}% | {pct(r['token_median_ratio'])} | "
              f"{r['extra_us_per_token']:.0f} | {fmt_ci(r['plain_after_mode'])} | "
              f"{g['mode']['per_500']:.2f}, {g['plain_a']['per_500']:.2f}, "
              f"{g['plain']['per_500']:.2f} |")
        w("")


def render_decode(res: list[dict[str, Any]], w: Callable[[str], None]) -> None:
    for d in res:
        w(f"## Reference model, decode overhead, whole `generate()` calls: `{d['preset']}`")
        w("")
        w(f"{d['reps']} repetitions x {len(d['modes'])} modes, one `generate()` of {d['tokens']} "
          f"new tokens (16-token prompt) per cell, mode order shuffled in every repetition, "
          f"`gc.collect()` before each cell; ms/token = wall time of the call / new tokens. "
          f"Section wall time {d['elapsed_s']:.0f} s; load average after: {d['loadavg_end']}.")
        w("")
        w("| mode | median ms/token | IQR | min / max | overhead vs plain (wall) [95% CI] | "
          "mean-ratio overhead [95% CI] | overhead (CPU time) [95% CI] | extra us/token | "
          "GC us/token (collections) |")
        w("|---|---|---|---|---|---|---|---|---|")
        for mode, r in d["modes"].items():
            cells = (["-"] * 4 if mode == "plain" else
                     [fmt_ci(r["overhead_wall"]), fmt_ci(r["overhead_wall"], "mean"),
                      fmt_ci(r["overhead_cpu"]), f"{r['extra_us_per_token']:.0f}"])
            w(f"| {mode} | {r['median_ms']:.3f} | {r['q1_ms']:.3f}-{r['q3_ms']:.3f} | "
              f"{r['min_ms']:.3f} / {r['max_ms']:.3f} | {' | '.join(cells)} | "
              f"{r['gc_us']:.1f} ({r['gc_collections']}) |")
        for mode, t in d["traced"].items():
            w("")
            w(f"`{mode}`: {t['generate_spans']} of {t['generations']} generations traced "
              f"(warm-up included), {t['step_spans']} `decode_step` spans exported.")
        w("")
