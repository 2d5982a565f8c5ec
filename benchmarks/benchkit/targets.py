"""The goals of the benchmark and their verdicts (reported in RESULTS.md, never asserted by the
tests). ``bench.py --check`` exits 1 when one FAILs."""

from __future__ import annotations

from typing import Any

from .common import ci_note, fmt_ci

#: (goal, labml preset, mode, limit as a fraction of the plain cache's time)
DECODE_GOALS = (
    ("default-mode overhead, upstream labml `tiny` shapes (vocab 1000, hidden 128, 2 layers, "
     "4 heads), whole decode", "tiny", "default", 0.05),
    ("default-mode overhead, upstream labml `pythia-70m` shapes (vocab 50304, hidden 512, "
     "6 layers, 8 heads), whole decode", "pythia-70m", "default", 0.01),
    ("every step traced, upstream labml `pythia-70m` shapes", "pythia-70m", "trace-all", 0.02),
)
#: (goal, preset, arm, limit as a fraction of the ``default`` arm's time): the cross-rank
#: checker's own cost (issue #19), section ``ranks``
RANK_GOALS = (
    ("cross-rank checker overhead, TP=2 pythia-70m, CPU gloo (rankcheck vs default)",
     "pythia-70m", "rankcheck", 0.01),
    ("cross-rank checker overhead, every=8, TP=2 pythia-70m, CPU gloo (rankcheck-every-8 vs "
     "default; informational)", "pythia-70m", "rankcheck-every-8", 0.01),
)
#: the GC goal, "0 collections per 500 tokens caused by the instrumentation": default mode's
#: collections minus the plain arm's, per 500 tokens of whole decodes, round to 0
GC_EXCESS_LIMIT = 0.5


def verdicts(res: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, limit: str, value: str, ok: bool | None, note: str = "") -> None:
        out.append({"target": name, "limit": limit, "measured": value,
                    "verdict": "SKIP" if ok is None else ("PASS" if ok else "FAIL"), "note": note})

    labml = res.get("labml") or {}
    runs = {d["preset"]: d for d in labml.get("presets", [])}
    for name, preset, mode, limit in DECODE_GOALS:
        d = runs.get(preset)
        if d is None:
            add(name, f"<= {limit:.0%}", "not run", None,
                labml.get("skipped", f"run `--sections labml` with preset {preset}"))
            continue
        ls, wh = d["lockstep"]["modes"], d["whole"]["arms"]
        o = ls[mode]["overhead_wall"]
        note = (f"lockstep (judged); {ci_note(o, limit)}; whole decodes ABBA "
                f"{fmt_ci(wh[mode]['overhead']) if mode in wh else 'not run'}; A/A controls: "
                f"lockstep {fmt_ci(ls['plain-aa']['overhead_wall'])}, whole "
                f"{fmt_ci(wh['plain-aa']['overhead'])}; plain step right after the mode's "
                f"{fmt_ci(ls[mode]['plain_after_mode'])}")
        add(name, f"<= {limit:.0%}", fmt_ci(o), o["median"] <= limit, note)
    for preset, d in runs.items():
        arms = d["whole"]["arms"]
        g, p = arms["default"]["gc"], arms["plain"]["gc"]
        excess = g["per_500"] - p["per_500"]
        lock = d["lockstep"]["modes"]["default"]["gc"]
        add(f"GC collections caused by the instrumentation in steady state, upstream labml "
            f"`{preset}`, default mode", "0 per 500 tokens",
            f"{excess:+.2f} per 500 tokens (default {g['per_500']:.2f}, plain {p['per_500']:.2f})",
            excess < GC_EXCESS_LIMIT,
            f"whole decodes, {g['tokens']} tokens per arm; net GC-tracked allocations per step "
            f"{g['net_allocs_per_token']:+.2f} (default) vs {p['net_allocs_per_token']:+.2f} "
            f"(plain); lockstep: {lock['mode']['per_500']:.2f} (default) vs "
            f"{lock['plain']['per_500']:.2f} (plain B) per 500 tokens")
    ranks = {d["preset"]: d for d in (res.get("ranks") or {}).get("presets", [])}
    for name, preset, arm, limit in RANK_GOALS:
        d = ranks.get(preset)
        if d is None:
            add(name, f"<= {limit:.0%}", "not run", None,
                f"run `--sections ranks` with preset {preset}")
            continue
        ls, wh, x = d["lockstep"]["arms"], d["whole"]["arms"], d["watcher"][arm]
        solo = d["solo"]["arms"]
        o = ls[arm]["cpu_est_vs_default"]
        note = (f"lockstep CPU estimate (judged: extra CPU time per token, decoding thread + "
                f"watcher, {o['extra_us']:.0f} us, as a share of default's wall time); "
                f"{ci_note(o, limit)}; rank 1 {fmt_ci(ls[arm]['other_rank_cpu_est_vs_default'])}; "
                f"A/A of the estimate {fmt_ci(ls['plain-aa']['cpu_est_vs_plain'])}; whole decodes "
                f"{fmt_ci(wh[arm]['cpu_est_vs_default'])}. Wall clock: lockstep "
                f"{fmt_ci(ls[arm]['vs_default'])}, watcher CPU charged "
                f"{fmt_ci(ls[arm]['vs_default_charged'])}, whole decodes ABBA "
                f"{fmt_ci(wh[arm]['vs_default'])}; A/A lockstep "
                f"{fmt_ci(ls['plain-aa']['vs_plain'])}, whole {fmt_ci(wh['plain-aa']['vs_plain'])}. "
                f"Watcher thread {x['us_per_token']:.0f} us CPU per token; end-of-run flush "
                f"{x['flush_ms_whole']:.1f} ms; GC collections per 500 tokens (solo decodes) "
                f"{solo[arm]['per_500']:.2f} vs default {solo['default']['per_500']:.2f}")
        add(name, f"<= {limit:.0%}", fmt_ci(o), o["median"] <= limit, note)
    hf = res.get("hf") or {}
    if "ratio_hfcheck" in hf:
        o = hf["ratio_hfcheck"] - 1
        lo, hi = hf["ratio_hfcheck_lo"] - 1, hf["ratio_hfcheck_hi"] - 1
        add(f"default-mode overhead of `cachescope.hf` on transformers' `generate`, "
            f"`{hf['preset']}` shapes (issue #20"
            + ("; informational)" if hf.get("lockstep") else ")"), "<= 1%",
            f"{o * 100:+.2f}% [{lo * 100:+.2f}%, {hi * 100:+.2f}%]", o <= 0.01,
            f"whole `generate()` calls, {hf['reps']} shuffled repetitions of {hf['tokens']} "
            "tokens, median of the paired ratios to unpatched HF cells" + (
                "; informational: judged on the lockstep row below (CI over every token)"
                if hf.get("lockstep") else ""))
    lock = hf.get("lockstep") if "ratio_hfcheck" in hf else None
    if lock:
        o, lo, hi = lock["overhead"], lock["overhead_lo"], lock["overhead_hi"]
        add(f"default-mode overhead of `cachescope.hf`, forward by forward in lockstep, "
            f"`{hf['preset']}` shapes (issue #20)", "<= 1%",
            f"{o * 100:+.2f}% [{lo * 100:+.2f}%, {hi * 100:+.2f}%]", o <= 0.01,
            f"median of per-token paired ratios, {lock['reps']} x {lock['tokens']} tokens, one model "
            f"and three caches in rotating order; A/A {lock['aa'] * 100:+.2f}% "
            f"[{lock['aa_lo'] * 100:+.2f}%, {lock['aa_hi'] * 100:+.2f}%]; "
            f"{lock['violations']} violations, same tokens: {'yes' if lock['same_tokens'] else 'no'}")
    mem = res.get("memory")
    if mem:
        for mode, run_ in mem["runs"].items():
            add(f"memory flat after warm-up ({mode}, {mem['steps']} steps)",
                "RSS growth <= 4 MiB, series constant",
                f"RSS {run_['rss_growth_after_warmup'] / 2**20:+.2f} MiB, series "
                f"{'constant' if run_['series_flat'] else 'grew'}", run_["flat"])
        for mode, w in mem.get("weakref", {}).items():
            add(f"no tensor kept alive ({mode})", "0 alive", f"{w['alive']} of {w['tracked']} alive",
                w["alive"] == 0)
    return out


def summary_line(v: dict[str, Any]) -> str:
    return f"{v['verdict']:4s}  {v['target']}: {v['measured']} (limit {v['limit']})"
