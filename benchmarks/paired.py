#!/usr/bin/env python
"""A tighter paired estimate of decode overhead than bench.py's decode section (analysis.md,
"Measuring at pythia-70m"): the same caches reused for every cell, short cells, many repetitions.

    python benchmarks/paired.py PRESET TOKENS REPS MODES
    python benchmarks/paired.py pythia-70m 16 50 plain,plain-aa,default

MODES: comma-separated, must include ``plain``; ``plain*`` = ``Cache()``, ``core`` =
``InstrumentedCache(metrics=False, tracing=False)``, ``default`` = ``InstrumentedCache()``; a
``-py`` suffix adds ``speedups=False``; ``trace-all`` / ``trace-10`` as in bench.py. Prints, per mode, the median of the per-repetition ratios
to plain minus 1 with a 95 % bootstrap CI, and the mean.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cachescope import Cache, InstrumentedCache  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from cachescope.neox import NeoXConfig, NeoXModel, generate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (its tracing modes)


def make(mode: str, modes: "bench.Modes") -> object:
    if mode.startswith("plain"):
        return Cache()
    if mode.startswith("trace"):   # bench.py's tracing modes: SDK provider, batch processor
        return modes.make(mode, registry=CollectorRegistry())
    bare = mode.startswith("core")
    return InstrumentedCache(name=mode, registry=CollectorRegistry(), metrics=not bare,
                             tracing=not bare, speedups=not mode.endswith("-py"))


def main(argv: list[str]) -> int:
    preset, tokens, reps, modes = argv[0], int(argv[1]), int(argv[2]), argv[3].split(",")
    if "plain" not in modes:
        raise SystemExit("MODES must include plain")
    torch.set_num_threads(1)
    model = NeoXModel(NeoXConfig.preset(preset)).eval()
    prompt = list(range(16))
    factory = bench.Modes("paired")
    caches = {m: make(m, factory) for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    with torch.inference_mode():
        for m in modes:
            generate(model, prompt, 4, cache=caches[m])   # warm-up: labels the modules
        for _ in range(reps):
            order = modes[:]
            random.shuffle(order)
            for m in order:
                t0 = time.perf_counter()
                generate(model, prompt, tokens, cache=caches[m])
                times[m].append((time.perf_counter() - t0) / tokens * 1e6)
    base = times["plain"]
    print(f"{preset}: plain {statistics.median(base):.0f} us/token, {reps} reps x {tokens} tokens")
    for m in modes:
        if m == "plain":
            continue
        ratios = [b / a - 1 for a, b in zip(base, times[m])]
        boot = sorted(statistics.median(random.choices(ratios, k=len(ratios))) for _ in range(2000))
        print(f"  {m:12s} {statistics.median(ratios) * 100:+.2f}% "
              f"[{boot[50] * 100:+.2f}, {boot[1949] * 100:+.2f}]  mean {statistics.mean(ratios) * 100:+.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
