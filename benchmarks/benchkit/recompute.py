"""Section ``loop``: the reference model's cached decode vs no-cache recompute (plain ``Cache``,
greedy), and that both give the same tokens."""

from __future__ import annotations

import gc
import statistics
from typing import Any, Callable

import torch

from cachescope import Cache
from cachescope.neox import NeoXConfig, NeoXModel, generate

from .common import PERF, Context, log, prompt_for


def run(ctx: Context) -> dict[str, Any]:
    log("loop: cached vs no-cache recompute")
    presets = ["tiny"] if ctx.quick else ["tiny", "pythia-70m"]
    return bench_loop(presets, 32 if ctx.quick else 256, 1 if ctx.quick else 2)


def bench_loop(presets: list[str], tokens: int, reps: int) -> dict[str, Any]:
    rows = []
    for preset in presets:
        cfg = NeoXConfig.preset(preset)
        model = NeoXModel(cfg)
        prompt = prompt_for(cfg.vocab_size)
        res: dict[str, list[float]] = {"cached": [], "no-cache": []}
        toks: dict[str, list[int]] = {}
        with torch.inference_mode():
            generate(model, prompt, 4, cache=Cache())
            for _ in range(reps if preset == "tiny" else 1):
                for kind in ("cached", "no-cache"):
                    gc.collect()
                    t0 = PERF()
                    toks[kind] = generate(model, prompt, tokens, cache=Cache(),
                                          use_cache=(kind == "cached"))
                    res[kind].append((PERF() - t0) / tokens * 1e3)
        c, nc = statistics.median(res["cached"]), statistics.median(res["no-cache"])
        same = toks["cached"] == toks["no-cache"]
        rows.append({"preset": preset, "tokens": tokens, "reps": len(res["cached"]), "cached_ms": c,
                     "nocache_ms": nc, "speedup": nc / c, "same_tokens": same})
        log(f"  loop {preset}: cached {c:.2f} ms/token, no-cache {nc:.2f} ms/token "
            f"({nc / c:.1f}x), same tokens: {same}")
    return {"rows": rows}


def render(loop: dict[str, Any], w: Callable[[str], None]) -> None:
    w("## Decode loop speed: KV cache vs recompute")
    w("")
    w("Reference model, plain `Cache`, greedy; ms per new token (median of the repetitions).")
    w("")
    w("| preset | new tokens | reps | cached ms/token | no-cache ms/token | speed-up | same tokens |")
    w("|---|---|---|---|---|---|---|")
    for r in loop["rows"]:
        w(f"| {r['preset']} | {r['tokens']} | {r['reps']} | {r['cached_ms']:.2f} | "
          f"{r['nocache_ms']:.2f} | {r['speedup']:.1f}x | {'yes' if r['same_tokens'] else 'no'} |")
    w("")
