"""Section ``memory``: RSS and Prometheus series over a long run (one cache, many generations),
and a weakref check that the instrumentation keeps no pushed tensor alive, violations included."""

from __future__ import annotations

import contextlib
import gc
import sys
import weakref
from typing import Any, Callable

import torch

from cachescope import InstrumentedCache
from cachescope.neox import NeoXConfig, NeoXModel, generate

from .common import PERF, Context, Modes, log, prompt_for, rss_bytes
from .ops import Driver

MEMORY_SLACK_BYTES = 4 << 20     # RSS may wobble by this much after warm-up (allocator noise)


def run(ctx: Context) -> dict[str, Any]:
    steps = ctx.memory_steps or (300 if ctx.quick else 10_000)
    log(f"memory: {steps} steps")
    res = bench_memory(steps, gen_tokens=100 if ctx.quick else 1000,
                       checkpoints=3 if ctx.quick else 10,
                       modes=("default",) if ctx.quick else ("plain", "default", "trace-all"))
    res["weakref"] = weakref_check(("plain", "default", "trace-all"))
    for mode, x in res["weakref"].items():
        log(f"  weakref {mode}: {x['alive']} of {x['tracked']} alive")
    return res


def series_count(registry: Any) -> int:
    from prometheus_client import generate_latest
    text = generate_latest(registry).decode()
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def _size(read: Callable[[], Any]) -> int | None:
    """len() of a public structure of the cache, or None where this version has none."""
    try:
        return len(read())
    except Exception:
        return None


def bench_memory(steps: int, gen_tokens: int, checkpoints: int, modes: tuple[str, ...]) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry

    cfg = NeoXConfig.preset("tiny")
    gen_tokens = min(gen_tokens, cfg.max_position_embeddings - 32)
    model = NeoXModel(cfg)
    prompt = prompt_for(cfg.vocab_size)
    out: dict[str, Any] = {"steps": steps, "gen_tokens": gen_tokens, "runs": {}}
    for mode in modes:
        registry = CollectorRegistry()
        mk = Modes(f"mem-{mode}")
        cache = mk.make(mode, registry=registry)
        every = max(1, steps // checkpoints)
        rows: list[dict[str, Any]] = []
        done = 0
        t0 = PERF()

        def checkpoint() -> None:
            gc.collect()
            row: dict[str, Any] = {"steps": done, "rss": rss_bytes(), "elapsed_s": PERF() - t0}
            if isinstance(cache, InstrumentedCache):
                row["series"] = series_count(registry)
                row["timeline"] = _size(cache.timeline)
                row["families"] = _size(lambda: cache.stats.families)
                row["violations"] = _size(lambda: cache.violations)
            row["gc_objects"] = len(gc.get_objects())
            rows.append(row)

        with torch.inference_mode():
            checkpoint()
            next_cp = every
            while done < steps:
                n = min(gen_tokens, steps - done)

                def on_step(i: int, tok: int) -> None:
                    nonlocal done, next_cp
                    done += 1
                    if done >= next_cp:
                        next_cp += every
                        checkpoint()

                generate(model, prompt, n, cache=cache, on_step=on_step)
        mk.close()
        warm = rows[min(2, len(rows) - 1)]
        last = rows[-1]
        growth = last["rss"] - warm["rss"]
        series_flat = all(r.get("series") == warm.get("series") for r in rows[2:])
        out["runs"][mode] = {"rows": rows, "rss_growth_after_warmup": growth,
                             "series_flat": series_flat,
                             "flat": growth <= MEMORY_SLACK_BYTES and series_flat,
                             "warmup_steps": warm["steps"]}
        log(f"  memory {mode}: {steps} steps, RSS {warm['rss'] / 2**20:.1f} -> "
            f"{last['rss'] / 2**20:.1f} MiB after warm-up, series {warm.get('series')} -> "
            f"{last.get('series')}")
        del cache
        gc.collect()
    return out


def weakref_check(modes: tuple[str, ...]) -> dict[str, Any]:
    """Every (k, v) tensor the decode loop pushed must be freed once the generation is over and
    the loop's own references are gone; also after pop-order violations."""
    cfg = NeoXConfig.preset("tiny")
    model = NeoXModel(cfg)
    prompt = prompt_for(cfg.vocab_size)
    out = {}
    for mode in modes:
        mk = Modes(f"weak-{mode}")
        cache = mk.make(mode)
        refs: list[weakref.ref[Any]] = []

        def on_step(i: int, tok: int) -> None:
            queue = cache.get(f"attn_kv_{i}")   # what step i pushed (the seed's get returns the list)
            for item in queue if isinstance(queue, list) else ():
                for t in item:
                    refs.append(weakref.ref(t))

        with torch.inference_mode():
            generate(model, prompt, 24, cache=cache, on_step=on_step)
            # the violation paths too: a pop by another owner, then a pop of an empty queue
            extra = torch.ones(3, 5)
            refs.append(weakref.ref(extra))
            producer, consumer = Driver(), Driver()
            producer.push_only(cache, (extra, extra))
            with contextlib.suppress(Exception):
                consumer.pop_only(cache)              # owner_mismatch
            with contextlib.suppress(Exception):
                consumer.pop_only(cache)              # pop_empty
            del extra
        on_step = None  # type: ignore[assignment]
        mk.flush()
        gc.collect()
        alive = [r for r in refs if r() is not None]
        holders: list[str] = []
        for r in alive[:3]:
            obj = r()
            holders += [type(h).__name__ for h in gc.get_referrers(obj)
                        if h is not refs and not isinstance(h, type(sys._getframe()))]
            del obj
        out[mode] = {"tracked": len(refs), "alive": len(alive), "holders": holders[:6]}
        mk.close()
        del cache
    return out


def render(mem: dict[str, Any], w: Callable[[str], None]) -> None:
    render_memory(mem, w)
    render_weakref(mem["weakref"], w)


def render_memory(mem: dict[str, Any], w: Callable[[str], None]) -> None:
    w("## Memory over a long run")
    w("")
    w(f"Reference model, `tiny` preset, {mem['steps']} decode steps as generations of "
      f"{mem['gen_tokens']} new tokens, one cache for the whole run, its own Prometheus "
      "`CollectorRegistry`; `gc.collect()` before each checkpoint. series = samples in the "
      "registry's text exposition; timeline = `len(cache.timeline())`; families = "
      "`len(cache.stats.families)`; gc objects = `len(gc.get_objects())`.")
    for mode, run_ in mem["runs"].items():
        w("")
        w(f"`{mode}` (warm-up = the first {run_['warmup_steps']} steps; RSS growth after warm-up "
          f"{run_['rss_growth_after_warmup'] / 2**20:+.2f} MiB):")
        w("")
        w("| steps | RSS MiB | series | timeline | families | violations | gc objects | s |")
        w("|---|---|---|---|---|---|---|---|")
        for r in run_["rows"]:
            cells = [r.get(k) for k in ("series", "timeline", "families", "violations")]
            w(f"| {r['steps']} | {r['rss'] / 2**20:.1f} | "
              + " | ".join("-" if c is None else str(c) for c in cells)
              + f" | {r['gc_objects']} | {r['elapsed_s']:.1f} |")
    w("")


def render_weakref(weak: dict[str, Any], w: Callable[[str], None]) -> None:
    w("## Weakref check")
    w("")
    w("Weak references to every (k, v) tensor in the queues after each step of a 24-token "
      "generation (read with `cache.get`), plus a tensor pushed and popped around pop-order "
      "violations (a pop by a different owner and a pop of an empty queue); after the generation, "
      "`gc.collect()`.")
    w("")
    w("| mode | tensors tracked | still alive | held by |")
    w("|---|---|---|---|")
    for mode, x in weak.items():
        w(f"| {mode} | {x['tracked']} | {x['alive']} | {', '.join(x['holders']) or '-'} |")
    w("")
