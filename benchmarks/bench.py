#!/usr/bin/env python
"""cachescope overhead budget and decode-loop speed (issue 7).

    python benchmarks/bench.py [--quick] [--presets tiny,pythia-70m] [--out benchmarks/RESULTS.md]
                               [--check] [--threads 1] [--json results.json]

Sections (``--sections``, default all):
  lockstep decode overhead from token-level triples: each mode decodes in lockstep with two
           plain ``Cache`` runs on the same model (``cachescope.neox.Decoder``; per token: the
           mode, plain A, plain B), with an A/A control; the decode-overhead targets are judged
           on it (mode / plain B);
  decode   ms/token of whole ``generate()`` calls, plain ``Cache`` vs ``InstrumentedCache`` modes,
           paired and interleaved (shuffled mode order in every repetition), with an A/A control
           (the cross-check of the lockstep figures, and the only one with ``default-py``);
  ops      per-op microbenchmarks (push+pop pair, set, get, step boundary), ns/op;
  profile  where the instrumentation's time goes (component microbenchmarks, cProfile of a
           real decode, push+pop after cache-evicting matmuls, and in-situ costs inside a real
           decode: per op on the pure-Python path, and for the C path an ablation with no
           wrappers plus its slow-path call counts);
  loop     cached decode vs no-cache recompute, and cachescope ``generate`` vs Hugging Face
           ``GPTNeoXForCausalLM.generate`` on identical weights;
  memory   RSS and Prometheus series over a long run, and a weakref check that the
           instrumentation keeps no tensor alive.

Modes:
  plain      ``cachescope.Cache()`` (the seed's cache)
  plain-aa   a second plain ``Cache()``: the A/A control (its "overhead" is pure noise)
  core       ``InstrumentedCache(metrics=False, tracing=False)``: bookkeeping only
  default    ``InstrumentedCache()``: Prometheus collector attached, tracing through the global
             OpenTelemetry API provider, which is the no-op one (no SDK configured); push, pop
             and get take the C fast path (``cachescope._speedups``) when it is built
  default-py ``InstrumentedCache(speedups=False)``: the same exporters on the pure-Python path,
             so default vs default-py is the C path's gain (identical when the extension is not
             built or ``CACHESCOPE_PURE_PYTHON=1``)
  trace-all  default + ``tracer_provider=TracerProvider(sampler=ALWAYS_ON)`` with a
             ``BatchSpanProcessor`` over a counting no-op exporter (spans are built, ended,
             queued and handed to the exporter, which only counts them)
  trace-10   same with ``sampler=TraceIdRatioBased(0.1)``; the sampling unit is the trace, and
             one ``generate()`` call is one trace, so ~10 % of generations are traced end to end

The C path reads an op's owner from the Python caller frame (one lookup when the caller is a
method of an already-labelled ``nn.Module``, as in the decode loop), so every measurement meant to
exercise it issues push/pop/get straight from an ``nn.Module`` method: no Python wrapper in
between, and no subclass overriding an op (that makes ``InstrumentedCache`` fall back to the
pure-Python path entirely).

``--check`` makes the process exit 1 when a target FAILs (without it the verdicts are printed
and written, and the exit status is 0).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import cachescope  # noqa: E402
from cachescope import Cache, InstrumentedCache  # noqa: E402
from cachescope import _hot as hotpath  # noqa: E402
from cachescope import _instrumented  # noqa: E402
from cachescope.neox import Decoder, NeoXConfig, NeoXModel, generate  # noqa: E402

PERF = time.perf_counter
CPU = time.process_time

ALL_MODES = ("plain", "plain-aa", "core", "default", "default-py", "trace-all", "trace-10")
OP_MODES = ("plain", "core", "default", "default-py", "trace-all", "trace-10")
SECTIONS = ("lockstep", "decode", "ops", "profile", "loop", "memory")

# Targets (issue 7). Overheads are fractions of the plain cache's time per token.
TARGET_DEFAULT = {"tiny": 0.03, "pythia-70m": 0.01}
TARGET_TRACE_ALL = {"pythia-70m": 0.03}
TARGET_OP_NS = 1000.0            # per op; a push+pop pair counts as 2 ops
MEMORY_SLACK_BYTES = 4 << 20     # RSS may wobble by this much after warm-up (allocator noise)


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- environment
def machine() -> dict[str, Any]:
    cpu = "unknown"
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    versions = {}
    for mod in ("transformers", "prometheus_client", "opentelemetry.sdk", "numpy"):
        try:
            if mod == "opentelemetry.sdk":
                from importlib.metadata import version
                versions[mod] = version("opentelemetry-sdk")
            elif mod == "prometheus_client":
                from importlib.metadata import version
                versions[mod] = version("prometheus-client")
            else:
                versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = "n/a"
    commit = "n/a"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, timeout=10).stdout.strip() or "n/a"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no",
                                "cachescope"], cwd=ROOT, text=True, capture_output=True,
                               timeout=10).stdout
        files = ", ".join(line[3:] for line in dirty.splitlines() if line.strip())
        if files:
            commit += f" (uncommitted changes in {files})"
    except Exception:
        pass
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "memory": mem,
        "avx512": "avx512f" in flags, "avx2": "avx2" in flags,
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cachescope": cachescope.__version__, "commit": commit, **versions,
        "speedups_available": bool(getattr(hotpath, "AVAILABLE", False)),
        "speedups_env_disabled": bool(getattr(hotpath, "_disabled_by_env", lambda: False)()),
        "speedups_active": bool(getattr(InstrumentedCache(metrics=False, tracing=False),
                                        "speedups_active", False)),
        "raw_sizes": _raw_sizes_on(),
        "loadavg_start": _loadavg(),
    }


def _raw_sizes_on() -> bool:
    """Whether the C path's raw tensor size reader is on (cachescope/_layout.py)."""
    try:
        import torch as _t
        from cachescope import _speedups
        return _speedups.raw_sizes(_t.ones(1)) is not None
    except Exception:
        return False


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------- statistics
def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3)."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=4, method="inclusive")
    return q[0], q[1], q[2]


def bootstrap_ci(values: list[float], stat: Callable[[list[float]], float], b: int = 2000,
                 seed: int = 12345) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(values)
    if n < 2:
        return values[0], values[0]
    boots = sorted(stat([values[rng.randrange(n)] for _ in range(n)]) for _ in range(b))
    return boots[int(0.025 * b)], boots[min(b - 1, int(math.ceil(0.975 * b)) - 1)]


def paired_overhead(base: list[float], other: list[float]) -> dict[str, float]:
    """Overhead of ``other`` over ``base`` from per-repetition pairs (same repetition = adjacent
    in time): median of the paired ratios - 1, with a 95 % bootstrap CI over repetitions; and the
    ratio of the means - 1 (which counts rare slow repetitions, e.g. sampled traces)."""
    ratios = [o / b for b, o in zip(base, other)]
    med = statistics.median(ratios) - 1
    lo, hi = bootstrap_ci(ratios, statistics.median)
    mean_ratio = statistics.fmean(other) / statistics.fmean(base) - 1
    pairs = list(zip(base, other))
    mlo, mhi = bootstrap_ci(list(range(len(pairs))), lambda idx: (
        statistics.fmean(pairs[i][1] for i in idx) / statistics.fmean(pairs[i][0] for i in idx) - 1))
    return {"median": med, "lo": lo - 1, "hi": hi - 1, "mean": mean_ratio, "mean_lo": mlo,
            "mean_hi": mhi}


def paired_diff(base: list[float], other: list[float]) -> dict[str, float]:
    """Median of paired differences (other - base) with a 95 % bootstrap CI."""
    diffs = [o - b for b, o in zip(base, other)]
    lo, hi = bootstrap_ci(diffs, statistics.median)
    return {"median": statistics.median(diffs), "lo": lo, "hi": hi}


# ----------------------------------------------------------------------------- modes
try:
    from opentelemetry.sdk.trace.export import SpanExporter as _SpanExporterBase
except Exception:  # pragma: no cover - the SDK is needed only by the tracing modes
    _SpanExporterBase = object  # type: ignore[misc,assignment]


class CountingExporter(_SpanExporterBase):  # type: ignore[misc,valid-type]
    """A no-op span exporter that only counts what it is handed."""

    def __init__(self) -> None:
        self.spans: Counter[str] = Counter()
        self.events = 0

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult
        for s in spans:
            self.spans[s.name] += 1
            self.events += len(s.events)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _sdk_provider(ratio: float | None) -> tuple[Any, CountingExporter]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, TraceIdRatioBased

    exporter = CountingExporter()
    sampler = ALWAYS_ON if ratio is None else TraceIdRatioBased(ratio)
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, exporter


class Modes:
    """Creates one cache per mode and keeps the tracer providers to shut them down."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.providers: dict[str, tuple[Any, CountingExporter]] = {}

    def make(self, mode: str, registry: Any = None) -> Cache:
        name = f"bench-{self.tag}-{mode}"
        if mode in ("plain", "plain-aa"):
            return Cache()
        if mode == "core":
            return InstrumentedCache(name=name, metrics=False, tracing=False)
        if mode == "default":
            return InstrumentedCache(name=name, registry=registry)
        if mode == "default-py":
            return InstrumentedCache(name=name, registry=registry, speedups=False)
        if mode in ("trace-all", "trace-10"):
            provider, exporter = _sdk_provider(None if mode == "trace-all" else 0.1)
            self.providers[mode] = (provider, exporter)
            return InstrumentedCache(name=name, registry=registry, tracer_provider=provider)
        raise ValueError(mode)

    def flush(self, mode: str | None = None) -> None:
        """Drain the BatchSpanProcessor queue(s) (of ``mode`` only, when given)."""
        for m, (provider, _) in self.providers.items():
            if mode is None or m == mode:
                provider.force_flush()

    def spans(self, mode: str) -> Counter[str] | None:
        entry = self.providers.get(mode)
        if entry is None:
            return None
        entry[0].force_flush()
        return entry[1].spans

    def close(self) -> None:
        for provider, _ in self.providers.values():
            provider.shutdown()
        self.providers.clear()


C_OPS = ("push", "pop", "get")


@contextlib.contextmanager
def counting_slow_path() -> Any:
    """Counts the Python slow-path calls of C-path caches created inside the ``with``.

    Patches ``InstrumentedCache.push/pop/get`` at class level with counting wrappers (restored on
    exit; with the extension, new C descriptors around wrapped Python methods). A C-path cache's
    ``Hot`` object captures the Python methods as its slow path when the cache is created, so a cache created inside keeps counting after the exit, and only its
    slow-path calls are counted: the C path itself runs no Python. (A pure-Python cache looks
    the methods up at call time, so it is counted only while inside.) The wrapper adds one Python
    frame to the slow path: attribution still finds the module (its walk skips the wrapper), but
    records from those calls name the wrapper as the call site, so use these caches for counts,
    not for reports or timings of slow calls."""
    cls = _instrumented.InstrumentedCache
    counts: Counter[str] = Counter()
    saved = {op: cls.__dict__[op] for op in C_OPS}

    def wrap(fn: Callable[..., Any], op: str) -> Callable[..., Any]:
        # the first argument is not called `self`, so attribution does not take the wrapper for
        # a method frame
        def counted(cache_: Any, *a: Any, **k: Any) -> Any:
            counts[op] += 1
            return fn(cache_, *a, **k)
        counted.__wrapped__ = fn  # type: ignore[attr-defined]
        return counted

    for kind, (op, fn) in enumerate(saved.items()):
        if type(fn).__name__ == "FastOp":   # the C descriptor: wrap the Python method behind it
            setattr(cls, op, type(fn)(kind, wrap(fn.__wrapped__, op)))
        else:
            setattr(cls, op, wrap(fn, op))
    try:
        yield counts
    finally:
        for op, fn in saved.items():
            setattr(cls, op, fn)


def op_totals(cache: Any) -> Counter[str]:
    """push/pop/get counts so far from the cache's family stats (both paths update them)."""
    tot: Counter[str] = Counter()
    for fs in cache.stats.families.values():
        for op in C_OPS:
            tot[op] += getattr(fs, op)
    return tot


def describe_mode(mode: str) -> str:
    return {
        "plain": "`Cache()`",
        "plain-aa": "second `Cache()` (A/A control)",
        "core": "`InstrumentedCache(metrics=False, tracing=False)`",
        "default": "`InstrumentedCache()`: metrics collector, API no-op tracer; push/pop/get on "
                   "the C fast path when it is built",
        "default-py": "`InstrumentedCache(speedups=False)`: the same exporters on the pure-Python "
                      "path (default vs default-py = the C path's gain)",
        "trace-all": "default + SDK `TracerProvider(ALWAYS_ON)`, BatchSpanProcessor, no-op exporter",
        "trace-10": "default + SDK `TracerProvider(TraceIdRatioBased(0.1))`, same processor",
    }[mode]


def prompt_for(cfg: NeoXConfig, n: int = 16, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist()


# ----------------------------------------------------------------------------- decode overhead
class _GCClock:
    """Time spent in the cyclic garbage collector (via ``gc.callbacks``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.count = 0
        self._t0 = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = PERF()
        else:
            self.seconds += PERF() - self._t0
            self.count += 1

    def reset(self) -> None:
        self.seconds = 0.0
        self.count = 0


gc_clock = _GCClock()


def bench_decode(preset: str, tokens: int, reps: int, modes: tuple[str, ...], seed: int) -> dict[str, Any]:
    cfg = NeoXConfig.preset(preset)
    model = NeoXModel(cfg)
    prompt = prompt_for(cfg)
    mk = Modes(preset)
    caches = {m: mk.make(m) for m in modes}
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    gcs: dict[str, list[float]] = {m: [] for m in modes}
    gcn: Counter[str] = Counter()
    rng = random.Random(seed)
    expected: list[int] | None = None
    with torch.inference_mode():
        for m in modes:                                   # warm-up, and same tokens everywhere
            out = generate(model, prompt, min(tokens, 8), cache=caches[m])
            expected = expected or out
            if out != expected:
                raise AssertionError(f"mode {m} changed the generated tokens")
        t_start = PERF()
        for r in range(reps):
            order = list(modes)
            rng.shuffle(order)
            for m in order:
                gc.collect()
                gc_clock.reset()
                c0, t0 = CPU(), PERF()
                generate(model, prompt, tokens, cache=caches[m])
                mk.flush(m)   # charge the span export thread's work to the mode that made it
                t1, c1 = PERF(), CPU()
                wall[m].append((t1 - t0) / tokens)
                cpu[m].append((c1 - c0) / tokens)
                gcs[m].append(gc_clock.seconds / tokens)
                gcn[m] += gc_clock.count
    elapsed = PERF() - t_start
    traced = {}
    for m in ("trace-all", "trace-10"):
        sp = mk.spans(m) if m in modes else None
        if sp is not None:
            gens = reps + 1
            traced[m] = {"generate_spans": sp.get("generate", 0), "generations": gens,
                         "step_spans": sp.get("decode_step", 0)}
    summary: dict[str, Any] = {"preset": preset, "tokens": tokens, "reps": reps,
                               "elapsed_s": elapsed, "modes": {}, "traced": traced,
                               "loadavg_end": _loadavg(),
                               "speedups": {m: bool(getattr(caches[m], "speedups_active", False))
                                            for m in modes}}
    for m in modes:
        q1, med, q3 = quantiles(wall[m])
        cq1, cmed, cq3 = quantiles(cpu[m])
        row: dict[str, Any] = {"wall_ms": [x * 1e3 for x in wall[m]],
                               "cpu_ms": [x * 1e3 for x in cpu[m]],
                               "median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
                               "min_ms": min(wall[m]) * 1e3, "max_ms": max(wall[m]) * 1e3,
                               "cpu_median_ms": cmed * 1e3,
                               "gc_us": statistics.fmean(gcs[m]) * 1e6,
                               "gc_collections": gcn[m]}
        if m != "plain":
            row["overhead_wall"] = paired_overhead(wall["plain"], wall[m])
            row["overhead_cpu"] = paired_overhead(cpu["plain"], cpu[m])
            row["extra_us_per_token"] = paired_diff(wall["plain"], wall[m])["median"] * 1e6
        summary["modes"][m] = row
    del caches
    mk.close()
    gc.collect()
    return summary


# ----------------------------------------------------------------------------- lockstep decode
LOCKSTEP_MODES = ("plain-aa", "core", "default", "trace-all", "trace-10")


def _lockstep_run(model: NeoXModel, prompt: list[int], tokens: int,
                  caches: tuple[Any, ...]) -> tuple[list[float], list[list[float]], list[list[int]]]:
    """One decode per cache, stepped in lockstep: token i of every run back to back, always in
    the order of ``caches``.

    Returns each arm's total seconds (opening, every step, closing), its per-step seconds and its
    tokens. Opening and closing a run (``Decoder.__enter__/__exit__``: the cache's
    ``generation()``, the cleanup) are timed too; pointing the model at a cache between steps is
    not (``generate`` does that once per run).
    """
    runs = [Decoder(model, prompt, tokens, cache=c) for c in caches]
    totals = [0.0] * len(runs)
    steps: list[list[float]] = [[] for _ in runs]
    for a, run in enumerate(runs):
        t0 = PERF()
        run.__enter__()
        totals[a] += PERF() - t0
    for _ in range(tokens):
        for a, run in enumerate(runs):
            with model.using_cache(run.cache):
                t0 = PERF()
                run.step()
                dt = PERF() - t0
            totals[a] += dt
            steps[a].append(dt)
    for a in reversed(range(len(runs))):
        t0 = PERF()
        runs[a].__exit__(None, None, None)
        totals[a] += PERF() - t0
    return totals, steps, [r.tokens for r in runs]


def bench_lockstep(preset: str, tokens: int, reps: int, modes: tuple[str, ...],
                   seed: int) -> dict[str, Any]:
    """Decode overhead from token-level triples: each mode decodes in lockstep with two plain caches
    on the same model, in the order mode, plain A, plain B for every token. All three arms see the
    same machine state within a few milliseconds (the whole-``generate()`` design of
    ``bench_decode`` compares runs seconds apart, and this VM drifts on that scale).

    * overhead = mode / plain B - 1: the mode's step always follows another cache's step, so its
      own data is colder than in a real decode (a pessimistic figure), and plain B always follows
      a plain step;
    * plain A / plain B - 1: how much the mode's step slows the plain step right after it (CPU
      caches, garbage collections its allocations trigger): what an interleaved pair would
      wrongly take off the mode's overhead.
    Per repetition and mode one ratio each, from the arms' total times."""
    cfg = NeoXConfig.preset(preset)
    model = NeoXModel(cfg)
    prompt = prompt_for(cfg)
    mk = Modes(f"lockstep-{preset}")
    caches = {m: mk.make(m) for m in modes}
    plain_a, plain_b = Cache(), Cache()
    arm: dict[str, list[list[float]]] = {m: [[], [], []] for m in modes}   # mode, plain A, plain B
    token_ratios: dict[str, list[float]] = {m: [] for m in modes}
    rng = random.Random(seed)
    with torch.inference_mode():
        expected = generate(model, prompt, min(tokens, 8), cache=plain_a)
        for m in modes:                                  # warm-up: labels the modules
            if generate(model, prompt, min(tokens, 8), cache=caches[m]) != expected:
                raise AssertionError(f"mode {m} changed the generated tokens")
        t_start = PERF()
        for _ in range(reps):
            order = list(modes)
            rng.shuffle(order)
            for m in order:
                gc.collect()
                totals, steps, toks = _lockstep_run(model, prompt, tokens,
                                                    (caches[m], plain_a, plain_b))
                t0 = PERF()
                mk.flush(m)   # the span export thread's backlog is charged to the traced arm
                totals[0] += PERF() - t0
                if not toks[0] == toks[1] == toks[2]:
                    raise AssertionError(f"mode {m} changed the generated tokens")
                for i in range(3):
                    arm[m][i].append(totals[i] / tokens)
                token_ratios[m].append(statistics.median(x / b for x, b in zip(steps[0], steps[2])))
    elapsed = PERF() - t_start
    out: dict[str, Any] = {"preset": preset, "tokens": tokens, "reps": reps, "elapsed_s": elapsed,
                           "loadavg_end": _loadavg(), "modes": {},
                           "speedups": {m: bool(getattr(caches[m], "speedups_active", False))
                                        for m in modes}}
    for m in modes:
        mode_s, a_s, b_s = arm[m]
        q1, med, q3 = quantiles(mode_s)
        out["modes"][m] = {
            "plain_median_ms": statistics.median(b_s) * 1e3,
            "median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
            "plain_ms": [x * 1e3 for x in b_s], "mode_ms": [x * 1e3 for x in mode_s],
            "plain_after_mode_ms": [x * 1e3 for x in a_s],
            "overhead_wall": paired_overhead(b_s, mode_s),
            "plain_after_mode": paired_overhead(b_s, a_s),
            "extra_us_per_token": paired_diff(b_s, mode_s)["median"] * 1e6,
            "token_median_ratio": statistics.median(token_ratios[m]) - 1,
            "ratio_sd": statistics.stdev(o / b for b, o in zip(b_s, mode_s)) if reps > 1 else 0.0,
        }
    del caches
    mk.close()
    gc.collect()
    return out


# ----------------------------------------------------------------------------- per-op microbench
class _Driver(nn.Module):
    """Issues cache ops from inside an ``nn.Module`` method, the way an attention layer does
    (the attribution finds the owner in the first frame it looks at)."""

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


OPS = {  # name -> (in-module fn name, free function, ops per iteration)
    "push+pop": ("pushpop", f_pushpop, 2),
    "set": ("sets", f_sets, 1),
    "get": ("gets", f_gets, 1),
    "step boundary": ("steps", None, 1),
}


def bench_ops(n: int, reps: int, blocks: int, seed: int) -> dict[str, Any]:
    """ns per op. Each repetition runs ``blocks`` generations (``cache.generation()`` + one open
    step, so that tracing modes have a span to record into); in each, every mode runs ``n``
    iterations of each op; modes are shuffled within a repetition."""
    cfg = NeoXConfig.preset("tiny")
    k = torch.randn(1, cfg.num_heads, 64, cfg.head_dim)
    value = (k, k.clone())
    driver = _Driver()
    mk = Modes("ops")
    caches = {m: mk.make(m) for m in OP_MODES}
    rng = random.Random(seed)
    variants = [("module", op) for op in OPS] + [("function", op) for op in OPS if OPS[op][1]]
    per: dict[tuple[str, str, str], list[float]] = {}
    with torch.inference_mode():
        for _ in range(reps + 1):           # first repetition is warm-up
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
                            run = getattr(driver, meth) if v == "module" else fn
                            totals[(m, v, op)] += run(cache, value, n)
                        if hasattr(cache, "end_step"):
                            cache.end_step(tokens=0)
                    cache.clear("state_ids")
                    cache.clear("use_cache")
                    mk.flush(m)   # (untimed) so the export thread does not run in the next cell
            if _ > 0:
                for key, t in totals.items():
                    per.setdefault(key, []).append(t / (blocks * n * OPS[key[2]][2]) * 1e9)
    mk.close()
    slow_share = _ops_slow_share(driver, value, variants, n)
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
            if (m, v, op) in slow_share:
                row["slow_share"] = slow_share[(m, v, op)]
            out["rows"].append(row)
    return out


def _ops_slow_share(driver: _Driver, value: Any, variants: list[tuple[str, str]],
                    n: int) -> dict[tuple[str, str, str], float]:
    """Share of push/pop/get calls a C-path cache hands to the Python slow path in each op loop,
    on separate caches that run the same loops untimed (the counting wrappers would slow the
    slow path down in the timed ones)."""
    share: dict[tuple[str, str, str], float] = {}
    mk = Modes("ops-probe")
    with counting_slow_path() as slow:
        caches = {m: mk.make(m) for m in OP_MODES}
    with torch.inference_mode():
        for m, cache in caches.items():
            if not getattr(cache, "speedups_active", False):
                continue
            with cache.generation():
                cache.set("state_ids", (None, 0))
                for v, op in variants:
                    if op not in ("push+pop", "get"):
                        continue
                    meth, fn, per_iter = OPS[op]
                    run = getattr(driver, meth) if v == "module" else fn
                    run(cache, value, 20)   # warm-up: labels the driver
                    before = sum(slow.values())
                    run(cache, value, n)
                    share[(m, v, op)] = (sum(slow.values()) - before) / (n * per_iter)
                cache.end_step(tokens=0)
    mk.close()
    return share


# ----------------------------------------------------------------------------- profile
def bench_profile(preset: str, tokens: int) -> dict[str, Any]:
    """Component costs (microbenchmarks of the pieces a push/pop goes through) and a cProfile of
    a real decode in default mode."""
    import timeit

    out: dict[str, Any] = {"components": [], "cprofile": [], "preset": preset, "tokens": tokens}
    cfg = NeoXConfig.preset(preset)
    k = torch.randn(1, cfg.num_heads, 64, cfg.head_dim)
    kv = (k, k.clone())

    def t(stmt: Callable[[], Any], number: int = 20000) -> float:
        return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e9

    comps = out["components"]
    try:
        from cachescope._values import measure
        comps.append(("measure((k, v)) (bytes, storages, shapes)", t(lambda: measure(kv))))
    except Exception as exc:  # internals moved: skip this line
        comps.append((f"measure: n/a ({exc!r})", float("nan")))

    class Owner(nn.Module):
        def lookup(self, cache: Any, n: int) -> float:
            look = cache._attributor.lookup
            t0 = PERF()
            for _ in range(n):
                look(0)
            return PERF() - t0

        def lookup_off(self, cache: Any, n: int) -> float:
            t0 = PERF()
            for _ in range(n):
                pass
            return PERF() - t0

    owner = Owner()
    core = InstrumentedCache(name="bench-profile-core", metrics=False, tracing=False)
    try:
        n = 20000
        raw = min(owner.lookup(core, n) for _ in range(5)) / n * 1e9
        empty = min(owner.lookup_off(core, n) for _ in range(5)) / n * 1e9
        comps.append(("attribution (Python path): `_attributor.lookup` from a module method",
                      raw - empty))
    except Exception as exc:
        comps.append((f"attribution: n/a ({exc!r})", float("nan")))
    try:
        from cachescope._values import measure
        m = measure(kv)
        core.set("state_ids", (None, 0))

        def body() -> None:
            core._push("attn_kv_0", kv, "layer", "model.py:1", m)
            core._pop("attn_kv_0", "layer", "model.py:1")
        comps.append(("bookkeeping (Python path): `_push` + `_pop` (no attribution, no measure, "
                      "no sinks)", t(body)))
    except Exception as exc:
        comps.append((f"bookkeeping: n/a ({exc!r})", float("nan")))
    plain = Cache()
    comps.append(("plain `Cache.push` + `Cache.pop`",
                  t(lambda: (plain.push("attn_kv_0", kv), plain.pop("attn_kv_0")))))
    # push+pop issued straight from an nn.Module method (_Driver.pushpop binds cache.push and
    # cache.pop, i.e. the C methods on a C-path cache, and calls them in its own frame), one
    # driver per cache, warmed up so that the driver is labelled before the timed loops.
    check = {"ops": 0, "slow": 0}
    for label, mode, speedups in (
            ("C fast path push+pop (module method): `core`, no sinks", "core", True),
            ("C fast path push+pop (module method): `default` (metrics collector, no-op tracer)",
             "default", True),
            ("Python path push+pop (module method): `core`, `speedups=False`", "core", False),
            ("Python path push+pop (module method): `default-py`", "default-py", False)):
        mk = Modes("profile")
        with counting_slow_path() as slow:
            c = (mk.make(mode) if speedups or mode != "core" else
                 InstrumentedCache(name="bench-profile-core-py", metrics=False, tracing=False,
                                   speedups=False))
        active = bool(getattr(c, "speedups_active", False))
        driver = _Driver()
        c.set("state_ids", (None, 0))
        driver.pushpop(c, kv, 100)
        before = sum(slow.values())
        n = 20000
        ns = min(driver.pushpop(c, kv, n) for _ in range(5)) / n * 1e9
        if speedups:
            check["ops"] += 5 * n * 2
            check["slow"] += sum(slow.values()) - before
            if not active:
                label += " (C path NOT active: pure Python)"
        comps.append((label, ns))
        mk.close()
    out["c_path_check"] = check

    # cProfile of a real decode (default mode). Profiling inflates per-call costs; read the
    # shares, not the absolute numbers.
    model = NeoXModel(cfg)
    prompt = prompt_for(cfg)
    mk = Modes("cprofile")
    cache = mk.make("default")
    cache_c = bool(getattr(cache, "speedups_active", False))
    out["cprofile_c_path"] = cache_c
    with torch.inference_mode():
        generate(model, prompt, 8, cache=cache)
        prof = cProfile.Profile()
        t0 = PERF()
        prof.enable()
        generate(model, prompt, tokens, cache=cache)
        prof.disable()
        total = PERF() - t0
    mk.close()
    st = pstats.Stats(prof)
    rows = []
    cs_total = 0.0
    for (fname, line, func), (cc, nc, tt, ct, callers) in st.stats.items():  # type: ignore[attr-defined]
        short = None
        if "/cachescope/" in fname and "/neox/" not in fname:
            short = f"{Path(fname).parent.name}/{Path(fname).name}:{line}({func})"
        elif fname == "~" and "cachescope._speedups" in func:   # the C methods (cProfile sees them)
            short = _c_name(func)
        if short is not None:
            rows.append((short, nc, tt, ct))
            cs_total += tt
    rows.sort(key=lambda r: -r[2])
    out["cprofile_total_s"] = total
    out["cprofile_cachescope_tottime_s"] = cs_total
    out["cprofile"] = [(name, nc / tokens, tt / tokens * 1e6, tt / cs_total if cs_total else 0)
                       for name, nc, tt, ct in rows[:18]]
    # top-level entry points: inclusive time per token
    entry = []
    for (fname, line, func), (cc, nc, tt, ct, callers) in st.stats.items():  # type: ignore[attr-defined]
        if fname.endswith("cachescope/_instrumented.py") and func in (
                "push", "pop", "get", "set", "clear", "end_step", "generation", "finish_generation"):
            # on a C-path cache, push/pop/get here are only the slow-path calls
            entry.append((f"InstrumentedCache.{func}" + (" (Python slow path)" if func in C_OPS
                                                         and cache_c else ""),
                          nc / tokens, ct / tokens * 1e6))
        elif fname == "~" and "cachescope._speedups.Hot" in func:
            entry.append((_c_name(func), nc / tokens, ct / tokens * 1e6))
    entry.sort(key=lambda r: -r[2])
    out["entry_points"] = entry
    return out


def _c_name(func: str) -> str:
    """``Hot.push (C)`` for cProfile's ``<method 'push' of 'cachescope._speedups.Hot' objects>``."""
    import re
    m = re.match(r"<(?:method|built-in method) '?(\w+)'? of '?cachescope\._speedups\.?(\w*)'?", func)
    if m is None:
        return f"{func} (C)"
    return f"_speedups.{m.group(2) + '.' if m.group(2) else ''}{m.group(1)} (C)"


def bench_cold(n: int) -> dict[str, Any]:
    """push+pop timed alone, (a) back to back, (b) right after a 2048x512 matmul (an MLP-sized
    weight, 4 MiB), (c) right after a 50304x512 matmul (the pythia-70m readout, 98 MiB, which
    evicts the CPU caches the way every decode step does)."""
    vocab, hidden = 50304, 512
    big = torch.randn(vocab, hidden)
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
        for mode in ("plain", "core", "default", "default-py"):
            with counting_slow_path() as slow:
                cache = mk.make(mode)
            cache.set("state_ids", (None, 0))
            layer.run(cache, lambda: None, 50)   # warm-up; labels the layer
            before = sum(slow.values())
            row = {"mode": mode,
                   "warm_ns": layer.run(cache, lambda: None, n),
                   "mlp_ns": layer.run(cache, lambda: x @ mid.T, n),
                   "readout_ns": layer.run(cache, lambda: x @ big.T, max(20, n // 4))}
            if isinstance(cache, InstrumentedCache):
                row["c_path"] = bool(getattr(cache, "speedups_active", False))
                if row["c_path"]:   # slow-path calls during the timed pairs (0: all in C)
                    row["slow_calls"] = sum(slow.values()) - before
            rows.append(row)
    mk.close()
    del big
    return {"n": n, "rows": rows}


TIMED_OPS = ("push", "pop", "get", "set", "clear", "end_step", "q_size")


def _timed_class(base: type, ops: tuple[str, ...] = TIMED_OPS) -> type:
    """``base`` with each op in ``ops`` wrapped in a perf_counter_ns accumulator (~0.3 us each).

    Overriding push, pop or get makes an ``InstrumentedCache`` subclass run the pure-Python path
    for every op (and a wrapper frame would defeat the C path's owner lookup anyway); wrapping
    only the other ops keeps push/pop/get on the C path."""
    pc = time.perf_counter_ns
    ns: dict[str, Any] = {}
    for name in ops:
        orig = getattr(base, name, None)
        if orig is None:
            continue

        def make(orig: Callable[..., Any], name: str) -> Callable[..., Any]:
            def timed(self: Any, *a: Any, **k: Any) -> Any:
                t0 = pc()
                try:
                    return orig(self, *a, **k)
                finally:
                    self._bench_ns[name] += pc() - t0
                    self._bench_calls[name] += 1
            return timed
        ns[name] = make(orig, name)
    return type(f"Timed{base.__name__}", (base,), ns)


def bench_insitu(presets: list[str], tokens: int, reps: int) -> dict[str, Any]:
    """Cost of each public op measured inside a real decode (wrappers around the calls), plain
    vs ``InstrumentedCache(speedups=False)``, so it can be set against the warm tight-loop
    numbers. This measures the pure-Python path only: the wrappers (a subclass overriding the
    ops) would defeat the C path, which ``bench_insitu_c`` measures without wrappers."""
    out: dict[str, Any] = {"tokens": tokens, "reps": reps, "presets": {}, "mode": "default-py"}
    timed_plain, timed_inst = _timed_class(Cache), _timed_class(InstrumentedCache)
    for preset in presets:
        cfg = NeoXConfig.preset(preset)
        model = NeoXModel(cfg)
        prompt = prompt_for(cfg)
        caches = {"plain": timed_plain(),
                  "default": timed_inst(name=f"bench-insitu-{preset}", speedups=False)}
        per: dict[str, dict[str, list[tuple[float, float]]]] = {k: {} for k in caches}
        with torch.inference_mode():
            for r in range(reps + 1):
                for mode, cache in caches.items():
                    cache._bench_ns, cache._bench_calls = Counter(), Counter()
                    generate(model, prompt, tokens, cache=cache)
                    if r == 0:
                        continue
                    for op, calls in cache._bench_calls.items():
                        per[mode].setdefault(op, []).append(
                            (cache._bench_ns[op] / calls, calls / tokens))
        rows = []
        for op in per["default"]:
            d = per["default"][op]
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


# (mode, the mode it adds to, what it adds): the C path's in-situ ablation, in order
INSITU_C_STEPS = (
    ("core-noattr", "plain", "bookkeeping with no owner lookup: `InstrumentedCache(metrics=False, "
                             "tracing=False, attribution='off')`, C path"),
    ("core", "core-noattr", "+ owner lookup (`core`: a frame read in C for push/pop, the Python "
                            "lookup for set/clear)"),
    ("default", "core", "+ metrics collector and no-op tracer (`default`)"),
    ("default-py", "default", "the same as `default` on the pure-Python path (`default-py`); "
                              "its step is the C path's saving, with the sign reversed"),
)
PY_SIDE_OPS = ("set", "clear", "end_step", "q_size")   # ops timed with wrappers (see the text)


def bench_insitu_c(presets: list[str], tokens: int, reps: int, seed: int) -> dict[str, Any]:
    """The C path inside a real decode, with no wrapper around push/pop/get and cProfile off.

    (a) ablation: ``generate()`` ms/token of plain and the ``INSITU_C_STEPS`` modes, interleaved
        (order shuffled per repetition, ``gc.collect()`` before each cell); each step's extra
        us/token = median of the paired differences against the mode it adds to;
    (b) the ops with no C path (set, clear, end_step, q_size) timed in situ with wrappers on
        those ops only (push/pop/get stay on the C path), plain vs default: the rest of default's
        extra time is push/pop/get in C plus indirect costs (GC, CPU caches);
    (c) push/pop/get calls per token and how many of them went to the Python slow path
        (``counting_slow_path``), in the first generation of a fresh default cache (which labels
        the modules) and in the next one."""
    out: dict[str, Any] = {"tokens": tokens, "reps": reps, "presets": {},
                           "steps": [list(x) for x in INSITU_C_STEPS]}
    modes = ("plain",) + tuple(m for m, _, _ in INSITU_C_STEPS)
    timed_plain, timed_c = _timed_class(Cache, PY_SIDE_OPS), _timed_class(InstrumentedCache,
                                                                          PY_SIDE_OPS)
    for preset in presets:
        cfg = NeoXConfig.preset(preset)
        model = NeoXModel(cfg)
        prompt = prompt_for(cfg)
        mk = Modes(f"insitu-c-{preset}")
        caches = {m: (InstrumentedCache(name=f"bench-insitu-c-{preset}-noattr", metrics=False,
                                        tracing=False, attribution="off")
                      if m == "core-noattr" else mk.make(m)) for m in modes}
        active = {m: bool(getattr(c, "speedups_active", False)) for m, c in caches.items()}
        wall: dict[str, list[float]] = {m: [] for m in modes}
        rng = random.Random(seed)
        res: dict[str, Any] = {"c_path": active}
        with torch.inference_mode():
            # (a)
            for m in modes:
                generate(model, prompt, min(tokens, 8), cache=caches[m])
            for _ in range(reps):
                order = list(modes)
                rng.shuffle(order)
                for m in order:
                    gc.collect()
                    t0 = PERF()
                    generate(model, prompt, tokens, cache=caches[m])
                    wall[m].append((PERF() - t0) / tokens)
            res["ms_per_token"] = {m: statistics.median(wall[m]) * 1e3 for m in modes}
            steps = []
            for m, prev, _ in INSITU_C_STEPS:
                tot = paired_diff(wall["plain"], wall[m])
                inc = paired_diff(wall[prev], wall[m])
                steps.append({"mode": m, "over": prev, "c_path": active[m],
                              "extra_us": tot["median"] * 1e6, "extra_lo": tot["lo"] * 1e6,
                              "extra_hi": tot["hi"] * 1e6, "step_us": inc["median"] * 1e6,
                              "step_lo": inc["lo"] * 1e6, "step_hi": inc["hi"] * 1e6})
            res["ablation"] = steps
            del caches
            mk.close()
            # (b)
            timed = {"plain": timed_plain(), "default": timed_c(name=f"bench-insitu-c-{preset}")}
            res["timed_c_path"] = bool(getattr(timed["default"], "speedups_active", False))
            per: dict[str, dict[str, list[tuple[float, float]]]] = {k: {} for k in timed}
            for r in range(reps + 1):
                for mode, cache in timed.items():
                    cache._bench_ns, cache._bench_calls = Counter(), Counter()
                    generate(model, prompt, tokens, cache=cache)
                    if r == 0:
                        continue
                    for op, calls in cache._bench_calls.items():
                        per[mode].setdefault(op, []).append(
                            (cache._bench_ns[op] / calls, calls / tokens))
            rows = []
            for op in per["default"]:
                d, pl = per["default"][op], per["plain"].get(op)
                ns_d = statistics.median(x[0] for x in d)
                ns_p = statistics.median(x[0] for x in pl) if pl else 0.0
                rows.append({"op": op, "calls_per_token": d[0][1], "plain_ns": ns_p if pl else None,
                             "default_ns": ns_d, "extra_us_per_token": (ns_d - ns_p) * d[0][1] / 1e3})
            rows.sort(key=lambda r: -r["extra_us_per_token"])
            res["python_ops"] = rows
            del timed
            # (c)
            with counting_slow_path() as slow:
                cc = InstrumentedCache(name=f"bench-insitu-c-count-{preset}")
            res["count_c_path"] = bool(getattr(cc, "speedups_active", False))
            counts: dict[str, Any] = {}
            for phase in ("first", "next"):
                tot0, slow0 = op_totals(cc), dict(slow)
                generate(model, prompt, tokens, cache=cc)
                tot1 = op_totals(cc)
                counts[phase] = {}
                for op in C_OPS:
                    calls = tot1[op] - tot0[op]
                    n_slow = slow.get(op, 0) - slow0.get(op, 0)
                    counts[phase][op] = {"calls": calls / tokens, "slow": n_slow / tokens,
                                         "c": (calls - n_slow) / tokens}
            res["counts"] = counts
            del cc
        out["presets"][preset] = res
        gc.collect()
    return out


# ----------------------------------------------------------------------------- decode loop speed
def bench_loop(presets: list[str], tokens: int, reps: int) -> dict[str, Any]:
    rows = []
    for preset in presets:
        cfg = NeoXConfig.preset(preset)
        model = NeoXModel(cfg)
        prompt = prompt_for(cfg)
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
        rows.append({"preset": preset, "tokens": tokens, "reps": len(res["cached"]), "cached_ms": c,
                     "nocache_ms": nc, "speedup": nc / c,
                     "same_tokens": toks["cached"] == toks["no-cache"]})
        log(f"  loop {preset}: cached {c:.2f} ms/token, no-cache {nc:.2f} ms/token "
            f"({nc / c:.1f}x), same tokens: {toks['cached'] == toks['no-cache']}")
    return {"rows": rows}


def bench_hf(preset: str, tokens: int, reps: int, seed: int) -> dict[str, Any]:
    """cachescope ``generate`` vs HF ``GPTNeoXForCausalLM.generate(do_sample=False)``, same
    random weights (saved by HF, loaded with ``cachescope.neox.load_hf_checkpoint``)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    except Exception as exc:  # pragma: no cover - transformers is a test extra
        return {"skipped": f"transformers not importable: {exc!r}"}
    transformers.logging.set_verbosity_error()
    with contextlib.suppress(Exception):
        transformers.utils.logging.disable_progress_bar()
    from cachescope.neox import load_hf_checkpoint

    cfg = NeoXConfig.preset(preset)
    hf_cfg = GPTNeoXConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings, rotary_pct=cfg.rotary_pct,
        rotary_emb_base=cfg.rotary_base, use_parallel_residual=True, hidden_act="gelu",
        layer_norm_eps=cfg.layer_norm_eps, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=0)
    torch.manual_seed(seed)
    hf = GPTNeoXForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stderr(io.StringIO()):
            hf.save_pretrained(d)
        ours = load_hf_checkpoint(d)
    hf.generation_config.eos_token_id = None   # never stop early: exactly `tokens` new tokens
    hf.generation_config.pad_token_id = 0
    prompt = prompt_for(cfg, seed=seed)
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    mk = Modes("hf")
    inst = mk.make("default")
    runs = {
        "hf": lambda n: hf.generate(ids, attention_mask=mask, max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False)[0, len(prompt):].tolist(),
        "cachescope": lambda n: generate(ours, prompt, n, cache=Cache()),
        "cachescope+default": lambda n: generate(ours, prompt, n, cache=inst),
    }
    res: dict[str, list[float]] = {k: [] for k in runs}
    out_tokens: dict[str, list[int]] = {}
    rng = random.Random(seed)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in runs:
            runs[k](4)
        for _ in range(reps):
            order = list(runs)
            rng.shuffle(order)
            for k in order:
                gc.collect()
                t0 = PERF()
                out_tokens[k] = runs[k](tokens)
                res[k].append((PERF() - t0) / tokens * 1e3)
    mk.close()
    med = {k: statistics.median(v) for k, v in res.items()}
    ratios = [c / h for c, h in zip(res["cachescope"], res["hf"])]
    lo, hi = bootstrap_ci(ratios, statistics.median)
    ratios_i = [c / h for c, h in zip(res["cachescope+default"], res["hf"])]
    ilo, ihi = bootstrap_ci(ratios_i, statistics.median)
    same = out_tokens["hf"] == out_tokens["cachescope"]
    first_diff = None
    if not same:
        first_diff = next((i for i, (a, b) in enumerate(zip(out_tokens["hf"], out_tokens["cachescope"]))
                           if a != b), None)
    return {"preset": preset, "tokens": tokens, "reps": reps, "ms": med, "raw": res,
            "ratio": statistics.median(ratios), "ratio_lo": lo, "ratio_hi": hi,
            "ratio_inst": statistics.median(ratios_i), "ratio_inst_lo": ilo, "ratio_inst_hi": ihi,
            "same_tokens": same, "first_diff": first_diff,
            "transformers": transformers.__version__}


# ----------------------------------------------------------------------------- memory
def series_count(registry: Any) -> int:
    from prometheus_client import generate_latest
    text = generate_latest(registry).decode()
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def bench_memory(steps: int, gen_tokens: int, checkpoints: int, modes: tuple[str, ...]) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry

    cfg = NeoXConfig.preset("tiny")
    gen_tokens = min(gen_tokens, cfg.max_position_embeddings - 32)
    model = NeoXModel(cfg)
    prompt = prompt_for(cfg)
    out: dict[str, Any] = {"steps": steps, "gen_tokens": gen_tokens, "runs": {}}
    for mode in modes:
        registry = CollectorRegistry()
        mk = Modes(f"mem-{mode}")
        cache = mk.make(mode, registry=registry)
        every = max(1, steps // checkpoints)
        rows = []
        done = 0
        t0 = PERF()

        def checkpoint() -> None:
            gc.collect()
            row = {"steps": done, "rss": rss_bytes(), "elapsed_s": PERF() - t0}
            if isinstance(cache, InstrumentedCache):
                row["series"] = series_count(registry)
                row["timeline"] = len(cache.timeline())
                row["queues"] = len(getattr(cache, "_queues", ()))
                row["families"] = len(cache.stats.families)
                row["violations"] = len(cache.violations)
                att = getattr(cache, "_attributor", None)
                row["owner_labels"] = len(getattr(att, "_labels", ()))
            row["cache_keys"] = len(cache._cache)
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
    the loop's own references are gone; also after a pop-order violation."""
    cfg = NeoXConfig.preset("tiny")
    model = NeoXModel(cfg)
    prompt = prompt_for(cfg)
    out = {}
    for mode in modes:
        mk = Modes(f"weak-{mode}")
        cache = mk.make(mode)
        refs: list[weakref.ref[Any]] = []

        def on_step(i: int, tok: int) -> None:
            for name, q in list(cache._cache.items()):
                if isinstance(q, list):
                    for item in q:
                        for t in item:
                            refs.append(weakref.ref(t))

        with torch.inference_mode():
            generate(model, prompt, 24, cache=cache, on_step=on_step)
            # a violation path too: pop an empty queue, push/pop from different owners
            extra = torch.ones(3, 5)
            refs.append(weakref.ref(extra))
            producer, consumer = _Driver(), _Driver()
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
        holders = []
        for r in alive[:3]:
            obj = r()
            holders += [type(h).__name__ for h in gc.get_referrers(obj)
                        if h is not refs and not isinstance(h, type(sys._getframe()))]
            del obj
        out[mode] = {"tracked": len(refs), "alive": len(alive), "holders": holders[:6]}
        mk.close()
        del cache
    return out


# ----------------------------------------------------------------------------- report
def pct(x: float) -> str:
    return f"{x * 100:+.2f}%"


def fmt_ci(o: dict[str, float], key: str = "") -> str:
    if key == "mean":
        return f"{pct(o['mean'])} [{pct(o['mean_lo'])}, {pct(o['mean_hi'])}]"
    return f"{pct(o['median'])} [{pct(o['lo'])}, {pct(o['hi'])}]"


def ci_note(o: dict[str, float], limit: float) -> str:
    if o["hi"] <= limit:
        return "whole CI within the limit"
    if o["lo"] > limit:
        return "whole CI above the limit"
    return "CI crosses the limit"


def verdicts(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    decode = {d["preset"]: d for d in res.get("decode", [])}
    metric = res["args"]["metric"]

    def add(name: str, target: str, value: str, ok: bool | None, note: str = "") -> None:
        out.append({"target": name, "limit": target, "measured": value,
                    "verdict": "SKIP" if ok is None else ("PASS" if ok else "FAIL"), "note": note})

    lock = {d["preset"]: d for d in res.get("lockstep", [])}

    def decode_target(name: str, preset: str, mode: str, limit: float) -> None:
        """Judged on the lockstep design when it ran (the whole-generate one is the cross-check)."""
        ls, d = lock.get(preset), decode.get(preset)
        whole = (d["modes"][mode][f"overhead_{metric}"]
                 if d is not None and mode in d["modes"] else None)
        if ls is not None and mode in ls["modes"]:
            o = ls["modes"][mode]["overhead_wall"]
            note = f"lockstep; {ci_note(o, limit)}"
            if whole is not None:
                note += f"; whole-generate cross-check {fmt_ci(whole)}"
            add(name, f"<= {limit:.0%}", fmt_ci(o), o["median"] <= limit, note)
        elif whole is not None:
            add(name, f"<= {limit:.0%}", fmt_ci(whole), whole["median"] <= limit,
                f"whole-generate; {ci_note(whole, limit)}")
        else:
            add(name, f"<= {limit:.0%}", "not run", None)

    for preset, limit in TARGET_DEFAULT.items():
        decode_target(f"default-mode overhead, {preset}", preset, "default", limit)
    for preset, limit in TARGET_TRACE_ALL.items():
        decode_target(f"tracing every step, {preset}", preset, "trace-all", limit)
    ops = res.get("ops")
    if ops:
        for row in ops["rows"]:
            if row["mode"] == "default" and row["op"] in ("push+pop", "set", "get"):
                add(f"per-op cost over plain, default mode, {row['op']} ({row['variant']} loop)",
                    "<= 1000 ns/op", f"{row['over_ns']:.0f} ns/op [{row['over_lo']:.0f}, "
                    f"{row['over_hi']:.0f}]", row["over_ns"] <= TARGET_OP_NS,
                    "push+pop counted as 2 ops" if row["op"] == "push+pop" else "")
    mem = res.get("memory")
    if mem:
        for mode, run in mem["runs"].items():
            add(f"memory flat after warm-up ({mode}, {mem['steps']} steps)",
                f"RSS growth <= {MEMORY_SLACK_BYTES >> 20} MiB, series constant",
                f"RSS {run['rss_growth_after_warmup'] / 2**20:+.2f} MiB, series "
                f"{'constant' if run['series_flat'] else 'grew'}", run["flat"])
    weak = res.get("weakref")
    if weak:
        for mode, w in weak.items():
            add(f"no tensor kept alive ({mode})", "0 alive", f"{w['alive']} of {w['tracked']} alive",
                w["alive"] == 0)
    return out


def c_path_note(active: bool | None) -> str:
    if active is None:
        return ""
    return " (C fast path)" if active else " (C fast path not active: pure Python)"


def write_insitu_c(w: Callable[[str], None], x: dict[str, Any]) -> None:
    desc = {m: d for m, _, d in x.get("steps", INSITU_C_STEPS)}
    w(f"In situ, C path, no wrappers: `generate()` of {x['tokens']} tokens with cProfile off and "
      "no wrapper around push/pop/get (the layers call the C methods directly), "
      f"{x['reps']} interleaved repetitions (order shuffled in each, `gc.collect()` before each "
      "cell). Extra us/token = median of the paired differences [95% bootstrap CI], against "
      "plain (total) and against the previous row (step).")
    for preset, r in x["presets"].items():
        w("")
        w(f"`{preset}` (plain: {r['ms_per_token']['plain']:.3f} ms/token):")
        w("")
        w("| mode | adds | path | ms/token | extra us/token vs plain [95% CI] | step us/token [95% CI] |")
        w("|---|---|---|---|---|---|")
        for s_ in r["ablation"]:
            m_ = s_["mode"]
            w(f"| `{m_}` | {desc.get(m_, '')} | {'C' if s_['c_path'] else 'Python'} | "
              f"{r['ms_per_token'][m_]:.3f} | {s_['extra_us']:.1f} [{s_['extra_lo']:.1f}, "
              f"{s_['extra_hi']:.1f}] | {s_['step_us']:+.1f} vs `{s_['over']}` "
              f"[{s_['step_lo']:+.1f}, {s_['step_hi']:+.1f}] |")
        rows = r.get("python_ops", [])
        if rows:
            default_extra = next((s_["extra_us"] for s_ in r["ablation"] if s_["mode"] == "default"),
                                 None)
            w("")
            if r.get("timed_c_path"):
                w("Ops with no C path, timed in situ with wrappers on those ops only (push/pop/get "
                  "stay on the C path: yes), plain vs `default`:")
            else:
                w("set, clear, end_step and q_size timed in situ with wrappers, plain vs `default`. "
                  "set (its common cases) and end_step have a C path too, and a subclass that "
                  "wraps them runs every op in Python (C path active here: NO), so these are the "
                  "pure-Python costs of those ops: an upper bound for the C path, with no "
                  "'rest' row:")
            w("")
            w("| op | calls/token | plain ns/call | default ns/call | extra us/token |")
            w("|---|---|---|---|---|")
            for o in rows:
                pl = "-" if o["plain_ns"] is None else f"{o['plain_ns']:.0f}"
                w(f"| `{o['op']}` | {o['calls_per_token']:.2f} | {pl} | {o['default_ns']:.0f} | "
                  f"{o['extra_us_per_token']:.1f} |")
            total = sum(o["extra_us_per_token"] for o in rows)
            w(f"| total | | | | {total:.1f} |")
            if default_extra is not None and r.get("timed_c_path"):
                w(f"| rest of `default`'s extra (ablation total - this total): push/pop/get in C, "
                  "run with the CPU caches cold (see the cold-cache table), `generation()`, "
                  "indirect costs | | | | "
                  f"{default_extra - total:.1f} |")
        counts = r.get("counts")
        if counts:
            w("")
            w("push/pop/get per token in `default` mode, and how many went to the Python slow "
              "path (counted by class-level wrappers around `InstrumentedCache.push/pop/get`, which "
              "the C object calls for its slow path; C path active: "
              f"{'yes' if r.get('count_c_path') else 'NO'}); first generation of a fresh cache "
              "(labels the modules) and the next one:")
            w("")
            w("| op | generation | calls/token | C path/token | Python slow path/token |")
            w("|---|---|---|---|---|")
            for op in C_OPS:
                for phase, c in counts.items():
                    v = c[op]
                    w(f"| `{op}` | {phase} | {v['calls']:.2f} | {v['c']:.2f} | {v['slow']:.2f} |")
    w("")


def speedups_line(m: dict[str, Any]) -> str:
    avail = m.get("speedups_available")
    if avail is None:
        return "not recorded (this run predates the C extension: every mode is pure Python)"
    if not avail:
        return ("not built for this interpreter (`cachescope._hot.AVAILABLE` is False): "
                "`default` and `default-py` both run the pure-Python path")
    if m.get("speedups_env_disabled") or not m.get("speedups_active", True):
        return ("built (`cachescope._hot.AVAILABLE` is True) but disabled "
                "(`CACHESCOPE_PURE_PYTHON`): every mode runs the pure-Python path")
    raw = m.get("raw_sizes")
    reader = ("" if raw is None else
              "; raw tensor size reader (`cachescope/_layout.py`) " + ("on" if raw else "off"))
    return ("built and active (`cachescope._hot.AVAILABLE` is True): push/pop/get of `core`, "
            "`default` and the tracing modes run in C; `default-py` is the pure-Python path"
            + reader)


def write_speedups(w: Callable[[str], None], sp: dict[str, bool] | None) -> None:
    """The line saying in which modes of a decode section the C fast path ran."""
    if sp is None:
        return
    on = [k for k, v in sp.items() if v]
    w("")
    w(f"C fast path active (`cache.speedups_active`) in: "
      f"{', '.join(f'`{k}`' for k in on) if on else 'no mode (pure Python throughout)'}.")


def write_markdown(res: dict[str, Any], path: Path, command: str) -> str:
    m = res["machine"]
    a = res["args"]
    L: list[str] = []
    w = L.append
    w("# cachescope benchmark results (issue 7)")
    w("")
    w("Generated by `benchmarks/bench.py`; regenerate with the command below. Hand-written notes "
      "come from `benchmarks/analysis.md` (appended verbatim at the end).")
    w("")
    w("## Machine and settings")
    w("")
    w(f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs; AVX2 {'yes' if m['avx2'] else 'no'}, "
      f"AVX-512 {'yes' if m['avx512'] else 'no'}), memory {m['memory']}")
    w(f"- Python {m['python']}, torch {m['torch']} (CPU), transformers {m['transformers']}, "
      f"prometheus-client {m['prometheus_client']}, opentelemetry-sdk {m['opentelemetry.sdk']}")
    w(f"- `torch.set_num_threads({a['threads']})` for every measurement (the HF comparison "
      "included); decoding under `torch.inference_mode()`")
    w(f"- cachescope {m['cachescope']} at commit {m['commit']}")
    w(f"- C fast path (`cachescope._speedups`): {speedups_line(m)}")
    w(f"- load average at start {m['loadavg_start']}, at end {res.get('loadavg_end', 'n/a')} "
      "(the machine is shared; see the A/A rows for the noise floor)")
    w(f"- wall time of the whole run: {res.get('elapsed_s', 0):.0f} s")
    w("")
    w(f"Command: `{command}`")
    w("")
    w("Modes:")
    w("")
    ran = {mode for d in res.get("decode", []) for mode in d["modes"]}
    for mode in ALL_MODES:
        if mode != "default-py" or mode in ran or "speedups_available" in m:
            w(f"- `{mode}`: {describe_mode(mode)}")
    w("")

    v = res.get("verdicts", [])
    if v:
        w("## Targets")
        w("")
        w("Decode overheads are judged on wall-clock time in the lockstep design (below) when it "
          "ran: the median of the per-repetition paired ratios (mode / plain arm B of the same "
          "lockstep triple) minus 1, with a 95 % bootstrap CI over repetitions; the note gives the "
          "whole-`generate()` design's figure as a cross-check. PASS means the point estimate is "
          "within the limit; the note says whether the whole CI is.")
        w("")
        w("| target | limit | measured | verdict | note |")
        w("|---|---|---|---|---|")
        for x in v:
            w(f"| {x['target']} | {x['limit']} | {x['measured']} | **{x['verdict']}** | {x['note']} |")
        w("")

    for d in res.get("lockstep", []):
        w(f"## Decode overhead, lockstep: `{d['preset']}`")
        w("")
        w(f"{d['reps']} repetitions x {len(d['modes'])} modes. Per repetition and mode, three "
          f"decodes of {d['tokens']} new tokens (16-token prompt) on the same model, one on the "
          "mode's cache and two on plain `Cache()`s (A and B), driven token by token with "
          "`cachescope.neox.Decoder`: for every token the mode's step, then A's, then B's; mode "
          "order shuffled per repetition, `gc.collect()` before each triple. An arm's time is its "
          "opening, steps and closing (a traced arm also pays its span processor's flush). The "
          "three arms see the same machine state within a few milliseconds, so the drift that "
          "dominates the whole-`generate()` design below cancels. The overhead is mode / B: the "
          "mode's step always follows another cache's step, so its own data is colder than in a "
          "real decode (pessimistic), while B always follows a plain step. A / B shows how much "
          "the mode's step slows the plain step right after it (CPU caches, collections its "
          "allocations trigger): what a two-arm interleave would wrongly take off the overhead. "
          f"Section wall time {d['elapsed_s']:.0f} s; load average after: {d['loadavg_end']}.")
        w("")
        w("| mode | plain B median ms/token | mode median ms/token | overhead: mode / plain B "
          "[95% CI] | mean-ratio overhead [95% CI] | sd of the ratios | median per-token ratio | "
          "extra us/token | plain A (right after the mode) / plain B [95% CI] |")
        w("|---|---|---|---|---|---|---|---|---|")
        for mode, r in d["modes"].items():
            w(f"| {mode} | {r['plain_median_ms']:.3f} | {r['median_ms']:.3f} | "
              f"{fmt_ci(r['overhead_wall'])} | {fmt_ci(r['overhead_wall'], 'mean')} | "
              f"{r['ratio_sd'] * 100:.2f}% | {pct(r['token_median_ratio'])} | "
              f"{r['extra_us_per_token']:.0f} | {fmt_ci(r['plain_after_mode'])} |")
        write_speedups(w, d.get("speedups"))
        w("")

    for d in res.get("decode", []):
        w(f"## Decode overhead, whole `generate()` calls: `{d['preset']}`")
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
            if mode == "plain":
                w(f"| {mode} | {r['median_ms']:.3f} | {r['q1_ms']:.3f}-{r['q3_ms']:.3f} | "
                  f"{r['min_ms']:.3f} / {r['max_ms']:.3f} | - | - | - | - | "
                  f"{r['gc_us']:.1f} ({r['gc_collections']}) |")
            else:
                w(f"| {mode} | {r['median_ms']:.3f} | {r['q1_ms']:.3f}-{r['q3_ms']:.3f} | "
                  f"{r['min_ms']:.3f} / {r['max_ms']:.3f} | {fmt_ci(r['overhead_wall'])} | "
                  f"{fmt_ci(r['overhead_wall'], 'mean')} | {fmt_ci(r['overhead_cpu'])} | "
                  f"{r['extra_us_per_token']:.0f} | {r['gc_us']:.1f} ({r['gc_collections']}) |")
        for mode, t in d["traced"].items():
            w("")
            w(f"`{mode}`: {t['generate_spans']} of {t['generations']} generations traced "
              f"(warm-up included), {t['step_spans']} `decode_step` spans exported.")
        write_speedups(w, d.get("speedups"))
        w("")

    ops = res.get("ops")
    if ops:
        w("## Per-op microbenchmarks")
        w("")
        w(f"ns per op, median of {ops['reps']} repetitions (modes shuffled per repetition); each "
          f"repetition runs {ops['blocks']} blocks of {ops['n']} iterations per op, each block "
          "inside `cache.generation()` with one open step (so tracing modes record span events). "
          "A push+pop pair counts as 2 ops. `module` loop: ops issued from an `nn.Module` method "
          "(attribution finds the owner in the first frame, as in the decode loop); `function` "
          "loop: from a plain function (attribution walks up to 6 frames and finds no module). "
          + ("`default` vs `default-py` is the C path's gain; set and the step boundary have no C "
             "path. " if any(r["mode"] == "default-py" for r in ops["rows"]) else "")
          + ("`slow path`: share of the push/pop/get calls that a C-path cache handed to the "
             "Python slow path in the same loop (counted on separate caches running it untimed; "
             "- = not a C-path cache or not a C op). "
             if any("slow_share" in r for r in ops["rows"]) else "") +
          "`step boundary` = `set('state_ids', (i, i+1))` + `end_step()` per step. "
          "Overhead = median of paired differences vs plain [95% bootstrap CI].")
        w("")
        has_share = any("slow_share" in r for r in ops["rows"])
        w("| op | loop | mode | ns/op (median) | IQR | over plain, ns/op [95% CI] |"
          + (" slow path |" if has_share else ""))
        w("|---|---|---|---|---|---|" + ("---|" if has_share else ""))
        for r in ops["rows"]:
            over = "-" if r["mode"] == "plain" else (
                f"{r['over_ns']:.0f} [{r['over_lo']:.0f}, {r['over_hi']:.0f}]")
            share = (f" {r['slow_share']:.0%} |" if "slow_share" in r else " - |") if has_share else ""
            w(f"| {r['op']} | {r['variant']} | {r['mode']} | {r['ns_per_op']:.0f} | "
              f"{r['q1']:.0f}-{r['q3']:.0f} | {over} |{share}")
        w("")

    prof = res.get("profile")
    if prof:
        w("## Where the time goes")
        w("")
        w("Component microbenchmarks (min of 5 timeit repeats, ns per call; `tiny` shapes):")
        w("")
        w("| component | ns |")
        w("|---|---|")
        for name, ns in prof["components"]:
            w(f"| {name} | {ns:.0f} |")
        w("")
        chk = prof.get("c_path_check")
        if chk:
            w("The push+pop rows are timed inside `_Driver.pushpop`, an `nn.Module` method that "
              "calls the cache's bound `push`/`pop` directly (no Python wrapper in between), after a "
              f"warm-up that labels the driver. C fast path rows: {chk['slow']} of {chk['ops']} "
              "timed ops went to the Python slow path (counted with class-level counting wrappers, "
              "see `counting_slow_path`).")
            w("")
        w(f"cProfile of one `generate()` of {prof['tokens']} tokens on `{prof['preset']}` in "
          f"default mode{c_path_note(prof.get('cprofile_c_path'))} "
          f"({prof['cprofile_total_s'] * 1e3 / prof['tokens']:.2f} ms/token under the "
          f"profiler; cachescope's own code: "
          f"{prof['cprofile_cachescope_tottime_s'] * 1e6 / prof['tokens']:.0f} us/token of tottime). "
          "Profiling inflates every Python call, so read the shares. `(C)` rows are the C "
          "methods (tottime excludes the Python they call: slow path, sinks):")
        w("")
        w("| cachescope function | calls/token | tottime us/token (profiled) | share of cachescope tottime |")
        w("|---|---|---|---|")
        for name, calls, us, share in prof["cprofile"]:
            w(f"| `{name}` | {calls:.1f} | {us:.1f} | {share:.0%} |")
        w("")
        w("Inclusive (cumulative) time of the public entry points, per token (profiled):")
        w("")
        w("| entry point | calls/token | us/token |")
        w("|---|---|---|")
        for name, calls, us in prof["entry_points"]:
            w(f"| `{name if '.' in name else 'InstrumentedCache.' + name}` | {calls:.1f} | {us:.1f} |")
        w("")

    cold = res.get("cold")
    if cold:
        w("Cold caches: one push+pop (pair) timed alone from an `nn.Module` method, median of "
          f"{cold['n']} (readout: {max(20, cold['n'] // 4)}), back to back (warm), right after a "
          "1x512 @ 512x2048 matmul (4 MiB of weights, an MLP projection) and right after a "
          "1x512 @ 512x50304 matmul (98 MiB, the pythia-70m readout, which every decode step runs "
          "and which evicts the CPU caches)"
          + ("; `path`: where a C-path cache runs the pair (the layer calls `cache.push`/`pop` "
             "in its own method, no wrapper), with the calls it handed to the Python slow path "
             "during the timed pairs:" if any("c_path" in r for r in cold["rows"]) else ":"))
        w("")
        has_c = any("c_path" in r for r in cold["rows"])
        if has_c:
            w("| mode | path | warm us/pair | after MLP matmul | after readout matmul | "
              "slow-path calls in the timed pairs |")
            w("|---|---|---|---|---|---|")
        else:
            w("| mode | warm us/pair | after MLP matmul | after readout matmul |")
            w("|---|---|---|---|")
        for r in cold["rows"]:
            cells = f"{r['warm_ns'] / 1e3:.1f} | {r['mlp_ns'] / 1e3:.1f} | {r['readout_ns'] / 1e3:.1f}"
            if has_c:
                path_ = "-" if "c_path" not in r else ("C" if r["c_path"] else "Python")
                w(f"| {r['mode']} | {path_} | {cells} | {r.get('slow_calls', '-')} |")
            else:
                w(f"| {r['mode']} | {cells} |")
        w("")
    insitu = res.get("insitu")
    if insitu:
        imode = insitu.get("mode", "default")
        if imode == "default-py":
            w(f"In situ, pure-Python path: every public op wrapped in a `perf_counter_ns` "
              f"accumulator (~0.3 us of wrapper per call, in both columns) during `generate()` of "
              f"{insitu['tokens']} tokens, {insitu['reps']} repetitions (median), plain `Cache` vs "
              "`InstrumentedCache(speedups=False)` (`default-py`). This measures the pure-Python "
              "path only: wrappers would defeat the C path (a subclass that overrides push/pop/get "
              "runs pure Python for every op, and a wrapper frame sits between the layer and the "
              "op, where the C path looks for the owner); the C path is measured without wrappers "
              "in the next table.")
        else:
            w(f"In situ: every public op wrapped in a `perf_counter_ns` accumulator (~0.3 us of "
              f"wrapper per call, in both columns) during `generate()` of {insitu['tokens']} tokens, "
              f"{insitu['reps']} repetitions (median), plain `Cache` vs `InstrumentedCache()` "
              "(default mode):")
        for preset, rows in insitu["presets"].items():
            w("")
            w(f"`{preset}`{' (pure-Python path)' if imode == 'default-py' else ''}:")
            w("")
            w(f"| op | calls/token | plain ns/call | {imode} ns/call | extra us/token |")
            w("|---|---|---|---|---|")
            for r in rows:
                pl = "-" if r["plain_ns"] is None else f"{r['plain_ns']:.0f}"
                w(f"| `{r['op']}` | {r['calls_per_token']:.2f} | {pl} | {r['default_ns']:.0f} | "
                  f"{r['extra_us_per_token']:.1f} |")
            total = sum(r["extra_us_per_token"] for r in rows)
            w(f"| total | | | | {total:.1f} |")
        w("")
    insitu_c = res.get("insitu_c")
    if insitu_c:
        write_insitu_c(w, insitu_c)

    loop = res.get("loop")
    if loop:
        w("## Decode loop speed")
        w("")
        w("Plain `Cache`, greedy; ms per new token (median of the repetitions).")
        w("")
        w("| preset | new tokens | reps | cached ms/token | no-cache ms/token | speed-up | same tokens |")
        w("|---|---|---|---|---|---|---|")
        for r in loop["rows"]:
            w(f"| {r['preset']} | {r['tokens']} | {r['reps']} | {r['cached_ms']:.2f} | "
              f"{r['nocache_ms']:.2f} | {r['speedup']:.1f}x | {'yes' if r['same_tokens'] else 'no'} |")
        w("")
    hf = res.get("hf")
    if hf:
        w("## cachescope `generate` vs Hugging Face `generate`")
        w("")
        if "skipped" in hf:
            w(f"Skipped: {hf['skipped']}")
        else:
            w(f"Random `GPTNeoXForCausalLM` with the `{hf['preset']}` shape (transformers "
              f"{hf['transformers']}), saved with `save_pretrained` and loaded into cachescope "
              f"with `load_hf_checkpoint` (identical weights); {hf['tokens']} new tokens after a "
              f"16-token prompt, HF `generate(do_sample=False, min_new_tokens=max_new_tokens)` "
              f"with its default DynamicCache; {hf['reps']} interleaved repetitions, same threads.")
            w("")
            w("| run | median ms/token |")
            w("|---|---|")
            for k, ms in hf["ms"].items():
                w(f"| {k} | {ms:.2f} |")
            w("")
            w(f"Ratio cachescope / HF (median of paired ratios): **{hf['ratio']:.3f}** "
              f"[{hf['ratio_lo']:.3f}, {hf['ratio_hi']:.3f}] (below 1 = cachescope faster); with "
              f"`InstrumentedCache()` (default mode): {hf['ratio_inst']:.3f} "
              f"[{hf['ratio_inst_lo']:.3f}, {hf['ratio_inst_hi']:.3f}]. Generated tokens identical: "
              f"{'yes' if hf['same_tokens'] else 'no (first difference at token %s)' % hf['first_diff']}.")
        w("")
    mem = res.get("memory")
    if mem:
        w("## Memory over a long run")
        w("")
        w(f"`tiny` preset, {mem['steps']} decode steps as generations of {mem['gen_tokens']} new "
          "tokens, one cache for the whole run, its own Prometheus `CollectorRegistry`; "
          "`gc.collect()` before each checkpoint. series = samples in the registry's text "
          "exposition; timeline = ring-buffer length; queues = live provenance entries.")
        for mode, run in mem["runs"].items():
            w("")
            w(f"`{mode}` (warm-up = the first {run['warmup_steps']} steps; RSS growth after "
              f"warm-up {run['rss_growth_after_warmup'] / 2**20:+.2f} MiB):")
            w("")
            w("| steps | RSS MiB | series | timeline | queues | families | owner labels | cache keys | gc objects | s |")
            w("|---|---|---|---|---|---|---|---|---|---|")
            for r in run["rows"]:
                w(f"| {r['steps']} | {r['rss'] / 2**20:.1f} | {r.get('series', '-')} | "
                  f"{r.get('timeline', '-')} | {r.get('queues', '-')} | {r.get('families', '-')} | "
                  f"{r.get('owner_labels', '-')} | {r['cache_keys']} | {r['gc_objects']} | "
                  f"{r['elapsed_s']:.1f} |")
        w("")
    weak = res.get("weakref")
    if weak:
        w("## Weakref check")
        w("")
        w("Weak references to every (k, v) tensor in the queues after each step of a 24-token "
          "generation, plus a tensor pushed and popped around pop-order violations (a pop from a "
          "different owner and a pop of an empty queue); after the generation, `gc.collect()`.")
        w("")
        w("| mode | tensors tracked | still alive | held by |")
        w("|---|---|---|---|")
        for mode, x in weak.items():
            w(f"| {mode} | {x['tracked']} | {x['alive']} | {', '.join(x['holders']) or '-'} |")
        w("")
    notes = ROOT / "benchmarks" / "analysis.md"
    if notes.is_file() and not a.get("quick"):
        w(notes.read_text().rstrip())
        w("")
    text = "\n".join(L)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


# ----------------------------------------------------------------------------- main
#: (new tokens per cell, repetitions) of the decode sections, per preset; --quick: the last entry
SECTION_SIZES = {
    "lockstep": {"tiny": (128, 30), "pythia-70m": (32, 20), "pythia-160m": (24, 10), "quick": (16, 3)},
    "decode": {"tiny": (128, 40), "pythia-70m": (64, 12), "pythia-160m": (48, 8), "quick": (16, 4)},
}


def section_size(section: str, preset: str, quick: bool, tokens: int | None,
                 reps: int | None) -> tuple[int, int]:
    """Tokens and repetitions of a decode section (``--tokens`` / ``--reps`` override)."""
    sizes = SECTION_SIZES[section]
    t, r = sizes["quick" if quick else preset if preset in sizes else "pythia-70m"]
    return tokens or t, reps or r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test, < ~60 s)")
    p.add_argument("--presets", default=None,
                   help="comma-separated decode presets (default tiny,pythia-70m; --quick: tiny)")
    p.add_argument("--out", default=None, help="write the Markdown report here")
    p.add_argument("--json", default=None, help="write raw results as JSON here")
    p.add_argument("--check", action="store_true", help="exit 1 if a target FAILs")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--reps", type=int, default=None, help="decode repetitions per mode")
    p.add_argument("--lockstep-reps", type=int, default=None, help="lockstep repetitions per mode")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per decode cell")
    p.add_argument("--metric", choices=("wall", "cpu"), default="wall",
                   help="time base of the decode-overhead verdicts (default wall)")
    p.add_argument("--memory-steps", type=int, default=None)
    p.add_argument("--hf-preset", default=None, help="model shape of the HF comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-json", default=None,
                   help="do not measure: re-render --out from a --json file of an earlier run "
                        "(e.g. after editing benchmarks/analysis.md)")
    args = p.parse_args(argv)
    if args.from_json:
        if not args.out:
            p.error("--from-json needs --out")
        res = json.loads(Path(args.from_json).read_text())
        write_markdown(res, Path(args.out), res.get("command", "python benchmarks/bench.py"))
        log(f"wrote {args.out} from {args.from_json}")
        failed = [v for v in res.get("verdicts", []) if v["verdict"] == "FAIL"]
        return 1 if args.check and failed else 0

    quick = args.quick
    presets = [s for s in (args.presets or ("tiny" if quick else "tiny,pythia-70m")).split(",") if s]
    sections = [s for s in args.sections.split(",") if s]
    for s in sections:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
    for pr in presets:
        NeoXConfig.preset(pr)  # validates the name
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    logging_quiet()

    res: dict[str, Any] = {"args": {**vars(args), "presets": presets}, "machine": machine()}
    t_all = PERF()
    log(f"cachescope bench: presets {presets}, threads {args.threads}, sections {sections}, "
        f"{'quick' if quick else 'full'}; load average {res['machine']['loadavg_start']}")

    if "lockstep" in sections:
        res["lockstep"] = []
        for preset in presets:
            tokens, reps = section_size("lockstep", preset, quick, args.tokens, args.lockstep_reps)
            log(f"lockstep {preset}: {reps} reps x {len(LOCKSTEP_MODES)} modes (+2 plain arms) x "
                f"{tokens} tokens")
            d = bench_lockstep(preset, tokens, reps, LOCKSTEP_MODES, args.seed)
            res["lockstep"].append(d)
            for mode, r in d["modes"].items():
                o = r["overhead_wall"]
                log(f"  {mode:10s} {r['median_ms']:8.3f} ms/token  overhead {fmt_ci(o)}  "
                    f"(sd {r['ratio_sd'] * 100:.2f}%, per-token median {pct(r['token_median_ratio'])}; "
                    f"plain step after it {fmt_ci(r['plain_after_mode'])})")
    if "decode" in sections:
        res["decode"] = []
        for preset in presets:
            tokens, reps = section_size("decode", preset, quick, args.tokens, args.reps)
            log(f"decode {preset}: {reps} reps x {len(ALL_MODES)} modes x {tokens} tokens")
            d = bench_decode(preset, tokens, reps, ALL_MODES, args.seed)
            res["decode"].append(d)
            for mode, r in d["modes"].items():
                extra = ""
                if mode != "plain":
                    o = r[f"overhead_{args.metric}"]
                    extra = f"  overhead {fmt_ci(o)}  (mean {pct(o['mean'])})"
                log(f"  {mode:10s} {r['median_ms']:8.3f} ms/token{extra}")
    if "ops" in sections:
        log("ops: per-op microbenchmarks")
        res["ops"] = bench_ops(n=200 if quick else 400, reps=3 if quick else 15,
                               blocks=2 if quick else 10, seed=args.seed)
        for r in res["ops"]["rows"]:
            if r["variant"] == "module":
                over = "" if r["mode"] == "plain" else f"  +{r['over_ns']:.0f} ns"
                log(f"  {r['op']:14s} {r['mode']:10s} {r['ns_per_op']:8.0f} ns/op{over}")
    if "profile" in sections:
        log("profile: components and cProfile")
        res["profile"] = bench_profile("tiny", 32 if quick else 256)
        res["cold"] = bench_cold(40 if quick else 400)
        for r in res["cold"]["rows"]:
            log(f"  cold {r['mode']:8s} push+pop warm {r['warm_ns'] / 1e3:.1f} us, after MLP matmul "
                f"{r['mlp_ns'] / 1e3:.1f} us, after readout matmul {r['readout_ns'] / 1e3:.1f} us")
        insitu_presets = [p_ for p_ in ("tiny", "pythia-70m") if p_ in presets] or ["tiny"]
        res["insitu"] = bench_insitu(insitu_presets, 16 if quick else 64, 1 if quick else 3)
        res["insitu_c"] = bench_insitu_c(insitu_presets, 16 if quick else 64, 3 if quick else 10,
                                         args.seed)
        for preset, x in res["insitu_c"]["presets"].items():
            nxt = x["counts"]["next"]
            log(f"  in situ (C path) {preset}: " + ", ".join(
                f"{s_['mode']} {s_['extra_us']:+.0f}" for s_ in x["ablation"]) + " us/token; "
                "slow-path calls/token " + ", ".join(f"{op} {nxt[op]['slow']:.2f}/{nxt[op]['calls']:.2f}"
                                                     for op in C_OPS))
    if "loop" in sections:
        log("loop: cached vs no-cache, cachescope vs HF")
        loop_presets = ["tiny"] if quick else [p_ for p_ in ("tiny", "pythia-70m")]
        res["loop"] = bench_loop(loop_presets, 32 if quick else 256, 1 if quick else 2)
        hf_preset = args.hf_preset or ("tiny" if quick else "pythia-70m")
        res["hf"] = bench_hf(hf_preset, 16 if quick else 128, 2 if quick else 7, args.seed)
        if "skipped" not in res["hf"]:
            log(f"  hf {hf_preset}: {res['hf']['ms']}, ratio {res['hf']['ratio']:.3f}, "
                f"same tokens {res['hf']['same_tokens']}")
    if "memory" in sections:
        steps = args.memory_steps or (300 if quick else 10_000)
        log(f"memory: {steps} steps")
        res["memory"] = bench_memory(steps, gen_tokens=100 if quick else 1000,
                                     checkpoints=3 if quick else 10,
                                     modes=("default",) if quick else ("plain", "default", "trace-all"))
        res["weakref"] = weakref_check(("plain", "default", "trace-all"))
        for mode, x in res["weakref"].items():
            log(f"  weakref {mode}: {x['alive']} of {x['tracked']} alive")
    res["elapsed_s"] = PERF() - t_all
    res["loadavg_end"] = _loadavg()
    res["verdicts"] = verdicts(res)
    log("")
    for v in res["verdicts"]:
        log(f"{v['verdict']:4s}  {v['target']}: {v['measured']} (limit {v['limit']}) {v['note']}")
    command = "python benchmarks/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res["command"] = command.strip()
    if args.out:
        write_markdown(res, Path(args.out), command.strip())
        log(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    failed = [v for v in res["verdicts"] if v["verdict"] == "FAIL"]
    if args.check and failed:
        log(f"{len(failed)} target(s) FAILED")
        return 1
    return 0


def logging_quiet() -> None:
    import logging
    logging.getLogger("opentelemetry").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)


if __name__ == "__main__":
    sys.exit(main())
