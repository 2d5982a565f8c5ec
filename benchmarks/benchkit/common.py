"""Shared by every section: machine facts, statistics, the cache modes, GC accounting and the
lockstep engine. Only cachescope's public API is used."""

from __future__ import annotations

import gc
import math
import os
import platform
import random
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol, Sequence

import torch

import cachescope
from cachescope import Cache, InstrumentedCache

ROOT = Path(__file__).resolve().parents[2]
PERF = time.perf_counter
CPU = time.process_time


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- run settings
@dataclass
class Context:
    """What the command line asked for; sections size themselves from it."""

    presets: list[str]
    quick: bool = False
    seed: int = 0
    threads: int = 1
    tokens: int | None = None          # --tokens: new tokens per decode, every decode section
    reps: int | None = None            # --reps: repetitions of the whole-decode designs
    lockstep_reps: int | None = None   # --lockstep-reps: repetitions of the lockstep designs
    memory_steps: int | None = None
    hf_preset: str | None = None

    def size(self, table: dict[str, tuple[int, int]], preset: str,
             lockstep: bool = False) -> tuple[int, int]:
        """(new tokens, repetitions) from a section's size table (``quick`` row under --quick;
        an unlisted preset gets the ``pythia-70m`` row), with the command line's overrides."""
        key = "quick" if self.quick else preset if preset in table else "pythia-70m"
        tokens, reps = table[key]
        override = self.lockstep_reps if lockstep else self.reps
        return self.tokens or tokens, override or reps


# ----------------------------------------------------------------------------- environment
def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "n/a"


def machine() -> dict[str, Any]:
    cpu, flags, mem = "unknown", "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    commit = "n/a"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, timeout=10).stdout.strip() or "n/a"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "cachescope"],
                               cwd=ROOT, text=True, capture_output=True, timeout=10).stdout
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
        "cachescope": cachescope.__version__, "cachescope_path": str(Path(cachescope.__file__).parent),
        "commit": commit,
        "versions": {d: _version(d) for d in ("transformers", "prometheus-client",
                                               "opentelemetry-sdk", "labml-nn", "labml", "numpy")},
        "gc_threshold": list(gc.get_threshold()),
        "loadavg_start": loadavg(),
    }


def loadavg() -> str:
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
def quantiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3)."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=4, method="inclusive")
    return q[0], q[1], q[2]


def bootstrap_ci(values: Sequence[Any], stat: Callable[[list[Any]], float], b: int = 2000,
                 seed: int = 12345) -> tuple[float, float]:
    """95 % percentile bootstrap CI of ``stat`` over ``values``."""
    rng = random.Random(seed)
    n = len(values)
    if n < 2:
        v = stat(list(values))
        return v, v
    boots = sorted(stat([values[rng.randrange(n)] for _ in range(n)]) for _ in range(b))
    return boots[int(0.025 * b)], boots[min(b - 1, int(math.ceil(0.975 * b)) - 1)]


def paired_overhead(base: Sequence[float], other: Sequence[float]) -> dict[str, float]:
    """Overhead of ``other`` over ``base`` from per-repetition pairs: the median of the paired
    ratios - 1 with a 95 % bootstrap CI over repetitions, and the ratio of the means - 1 (which
    counts rare slow repetitions, e.g. sampled traces) with its CI."""
    ratios = [o / b for b, o in zip(base, other)]
    lo, hi = bootstrap_ci(ratios, statistics.median)
    pairs = list(zip(base, other))
    mlo, mhi = bootstrap_ci(list(range(len(pairs))), lambda idx: (
        statistics.fmean(pairs[i][1] for i in idx) / statistics.fmean(pairs[i][0] for i in idx) - 1))
    return {"median": statistics.median(ratios) - 1, "lo": lo - 1, "hi": hi - 1,
            "mean": statistics.fmean(other) / statistics.fmean(base) - 1, "mean_lo": mlo,
            "mean_hi": mhi,
            "sd": statistics.stdev(ratios) if len(ratios) > 1 else 0.0}


def paired_diff(base: Sequence[float], other: Sequence[float]) -> dict[str, float]:
    """Median of paired differences (other - base) with a 95 % bootstrap CI."""
    diffs = [o - b for b, o in zip(base, other)]
    lo, hi = bootstrap_ci(diffs, statistics.median)
    return {"median": statistics.median(diffs), "lo": lo, "hi": hi}


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


# ----------------------------------------------------------------------------- cache modes
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


def sdk_provider(ratio: float | None) -> tuple[Any, CountingExporter]:
    """An SDK ``TracerProvider`` (ALWAYS_ON, or ``TraceIdRatioBased(ratio)``) whose
    ``BatchSpanProcessor`` hands spans to a ``CountingExporter``."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, TraceIdRatioBased

    exporter = CountingExporter()
    provider = TracerProvider(sampler=ALWAYS_ON if ratio is None else TraceIdRatioBased(ratio))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, exporter


MODES = {
    "plain": "`Cache()` (the seed's cache; in the labml section labml's own "
             "`labml_nn.neox.utils.cache.Cache()`)",
    "plain-aa": "a second plain cache: the A/A control (its \"overhead\" is noise)",
    "core": "`InstrumentedCache(metrics=False, tracing=False)`: bookkeeping and checks only",
    "default": "`InstrumentedCache()`: Prometheus collector on cachescope's registry, tracing "
               "through the global OpenTelemetry API provider, which is the no-op one (no SDK)",
    "trace-all": "default + `tracer_provider=TracerProvider(sampler=ALWAYS_ON)` with a "
                 "`BatchSpanProcessor` over a counting no-op exporter (spans are built, ended, "
                 "queued and handed to the exporter, which only counts them)",
    "trace-spans": "trace-all with `cache.tracer.op_events = False`: step spans, no op events",
    "trace-10": "default + `TracerProvider(sampler=TraceIdRatioBased(0.1))`, same processor; the "
                "sampling unit is the trace: one `generate()` (reference model) or one step "
                "(labml's loop opens no generation)",
}

_serial = 0


class Modes:
    """Makes one cache per mode (each instrumented cache under a name of its own) and keeps the
    tracer providers to flush and shut them down."""

    def __init__(self, tag: str, plain: Callable[[], Any] = Cache) -> None:
        self.tag = tag
        self.plain = plain
        self.providers: dict[str, tuple[Any, CountingExporter]] = {}

    def make(self, mode: str, registry: Any = None) -> Any:
        global _serial
        _serial += 1
        name = f"bench-{self.tag}-{mode}-{_serial}"
        if mode in ("plain", "plain-aa"):
            return self.plain()
        if mode == "core":
            return InstrumentedCache(name=name, metrics=False, tracing=False)
        if mode == "default":
            return InstrumentedCache(name=name, registry=registry)
        if mode in ("trace-all", "trace-spans", "trace-10"):
            provider, exporter = sdk_provider(0.1 if mode == "trace-10" else None)
            self.providers[mode] = (provider, exporter)
            cache = InstrumentedCache(name=name, registry=registry, tracer_provider=provider)
            if mode == "trace-spans":
                cache.tracer.op_events = False
            return cache
        raise ValueError(f"unknown mode {mode!r}")

    def flush(self, mode: str | None = None) -> None:
        """Drain the BatchSpanProcessor queue(s) (of ``mode`` only, when given)."""
        for m, (provider, _) in self.providers.items():
            if mode is None or m == mode:
                provider.force_flush()

    def exported(self, mode: str) -> dict[str, Any] | None:
        """Spans (by name) and events the mode's exporter has been handed, after a flush."""
        entry = self.providers.get(mode)
        if entry is None:
            return None
        entry[0].force_flush()
        return {"spans": dict(entry[1].spans), "events": entry[1].events}

    def close(self) -> None:
        for provider, _ in self.providers.values():
            provider.shutdown()
        self.providers.clear()


def prompt_for(vocab_size: int, n: int = 16, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, (n,), generator=g).tolist()


# ----------------------------------------------------------------------------- garbage collector
class GCWatch:
    """Cyclic-GC collections (through ``gc.callbacks``) and the time spent in them, per label:
    the caller sets ``label`` to the arm that is running. ``total`` counts every collection, so
    a caller can tell whether one ran inside a window (see ``upstream._whole``)."""

    def __init__(self) -> None:
        self.label: str | None = None
        self.collections: Counter[tuple[str | None, int]] = Counter()
        self.seconds: Counter[str | None] = Counter()
        self.total = 0
        self._t0 = 0.0

    def __enter__(self) -> GCWatch:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: Any) -> None:
        gc.callbacks.remove(self._callback)
        self.label = None

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = PERF()
        else:
            self.seconds[self.label] += PERF() - self._t0
            self.collections[(self.label, info.get("generation", 0))] += 1
            self.total += 1

    def count(self, label: str) -> int:
        return sum(n for (lab, _), n in self.collections.items() if lab == label)

    def by_generation(self, label: str) -> list[int]:
        return [self.collections[(label, g)] for g in range(3)]


def gc_summary(watch: GCWatch, label: str, tokens: int, net: int | None = None,
               net_steps: int = 0) -> dict[str, Any]:
    """Collections an arm saw over ``tokens`` tokens, per 500 tokens; with ``net``, its net
    GC-tracked allocations per step (over ``net_steps`` steps in which no collection ran)."""
    n = watch.count(label)
    out: dict[str, Any] = {"collections": n, "by_generation": watch.by_generation(label),
                           "tokens": tokens, "per_500": n / tokens * 500 if tokens else 0.0,
                           "gc_ms": watch.seconds[label] * 1e3}
    if net is not None:
        out["net_allocs_per_token"] = net / net_steps if net_steps else float("nan")
        out["net_steps"] = net_steps
    return out


# ----------------------------------------------------------------------------- lockstep engine
class Run(Protocol):
    """One decode that can be driven a token at a time beside others on the same model."""

    tokens: list[int]

    def active(self) -> ContextManager[Any]:
        """Point the model (or labml's singleton) at this run's cache (not timed)."""

    def open(self) -> None: ...

    def step(self) -> None: ...

    def settle(self) -> None:
        """After a step (not timed): undo what the step left in the shared model that the next
        run's step would otherwise reuse."""

    def close(self) -> None: ...


def lockstep(runs: Sequence[Run], tokens: int, watch: GCWatch,
             labels: Sequence[str]) -> dict[str, Any]:
    """Drive ``runs`` in lockstep: token i of every run back to back, always in the order given.

    Returns each run's total seconds (opening, every step, closing) and its per-step seconds.
    Pointing the model at a run's cache between steps, and ``settle()`` after each step, are not
    timed; collections are charged to the run that was stepping (``watch.label``)."""
    n = len(runs)
    totals = [0.0] * n
    steps: list[list[float]] = [[] for _ in range(n)]
    for a, run in enumerate(runs):
        with run.active():
            watch.label = labels[a]
            t0 = PERF()
            run.open()
            totals[a] += PERF() - t0
    for _ in range(tokens):
        for a, run in enumerate(runs):
            with run.active():
                watch.label = labels[a]
                t0 = PERF()
                run.step()
                dt = PERF() - t0
                run.settle()
            totals[a] += dt
            steps[a].append(dt)
    for a in reversed(range(n)):
        with runs[a].active():
            watch.label = labels[a]
            t0 = PERF()
            runs[a].close()
            totals[a] += PERF() - t0
    watch.label = None
    return {"totals": totals, "steps": steps}


def lockstep_row(mode_s: list[float], a_s: list[float], b_s: list[float],
                 token_ratios: list[float]) -> dict[str, Any]:
    """One mode's lockstep figures from per-repetition seconds/token of its three arms."""
    q1, med, q3 = quantiles(mode_s)
    return {
        "plain_median_ms": statistics.median(b_s) * 1e3,
        "median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
        "plain_ms": [x * 1e3 for x in b_s], "mode_ms": [x * 1e3 for x in mode_s],
        "plain_after_mode_ms": [x * 1e3 for x in a_s],
        "overhead_wall": paired_overhead(b_s, mode_s),
        "plain_after_mode": paired_overhead(b_s, a_s),
        "extra_us_per_token": paired_diff(b_s, mode_s)["median"] * 1e6,
        "token_median_ratio": statistics.median(token_ratios) - 1,
    }


class LockstepTally:
    """Per mode, the per-repetition seconds/token of its three lockstep arms (mode, plain A,
    plain B) and the median per-token ratio mode / B; ``row(m)`` gives ``lockstep_row``."""

    def __init__(self, modes: Sequence[str]) -> None:
        self.arm: dict[str, list[list[float]]] = {m: [[], [], []] for m in modes}
        self.token_ratios: dict[str, list[float]] = {m: [] for m in modes}

    def add(self, mode: str, result: dict[str, Any], tokens: int) -> None:
        """One repetition's ``lockstep()`` result for ``mode``."""
        for i in range(3):
            self.arm[mode][i].append(result["totals"][i] / tokens)
        self.token_ratios[mode].append(statistics.median(
            x / b for x, b in zip(result["steps"][0], result["steps"][2])))

    def row(self, mode: str) -> dict[str, Any]:
        a = self.arm[mode]
        return lockstep_row(a[0], a[1], a[2], self.token_ratios[mode])


def shuffled_rounds(modes: Sequence[str], reps: int, rng: random.Random):
    """Each mode once per repetition, in a fresh random order each time."""
    for _ in range(reps):
        order = list(modes)
        rng.shuffle(order)
        yield from order
