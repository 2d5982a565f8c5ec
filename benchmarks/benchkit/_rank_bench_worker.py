"""One rank of the ``ranks`` section (``benchkit/distributed.py`` starts two with torch's launcher).

    python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \\
        --master_port PORT benchmarks/benchkit/_rank_bench_worker.py CONFIG.json OUT_DIR

Every rank builds its shard of ``ParallelNeoX`` (TP over the world, PP=1) and runs the same arms in
the same order, so every collective is shared: both ranks step the same arm at the same time. The
arms differ only in the cache the attention layers use and in the cross-rank checker attached to
it. Phases (the same on both ranks): warm-up; lockstep (all arms token by token, order shuffled per
repetition); whole decodes ABBA; solo decodes (one arm at a time, for GC counts, the watcher
thread's CPU time and its store traffic). Each rank writes raw timings to OUT_DIR/rank{r}.json;
the parent computes the statistics.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT / "benchmarks"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import cachescope.distributed as csd  # noqa: E402
from cachescope.neox import NeoXConfig  # noqa: E402
from cachescope.neox.parallel import ParallelDecoder, ParallelLayout, ParallelNeoX  # noqa: E402

from benchkit.common import (PERF, GCWatch, Modes, loadavg, lockstep, prompt_for,  # noqa: E402
                             shuffled_rounds)

#: the arms, and the cross-rank check (``every``) of those that have one
ARMS = ("plain", "plain-aa", "default", "rankcheck", "rankcheck-every-8")
EVERY = {"rankcheck": 1, "rankcheck-every-8": 8}


class ParallelRun:
    """A ``ParallelDecoder`` as a run of ``common.lockstep`` (collective: both ranks step it);
    ``cpu_s`` sums this thread's CPU time in ``open``, ``step`` and ``close``."""

    def __init__(self, model: ParallelNeoX, prompt: list[int], tokens: int, cache: Any,
                 check: Any = None) -> None:
        self.model, self.cache = model, cache
        self.decoder = ParallelDecoder(model, prompt, tokens, cache=cache, rank_check=check)
        self.tokens = self.decoder.tokens
        self.cpu_s = 0.0

    def active(self) -> Any:
        return self.model.using_cache(self.cache)

    def open(self) -> None:
        c0 = time.thread_time()
        self.decoder.__enter__()
        self.cpu_s += time.thread_time() - c0

    def step(self) -> None:
        c0 = time.thread_time()
        self.decoder.step()
        self.cpu_s += time.thread_time() - c0

    def settle(self) -> None:
        pass   # the model keeps nothing between steps

    def close(self) -> None:
        c0 = time.thread_time()
        self.decoder.__exit__(None, None, None)
        self.cpu_s += time.thread_time() - c0


class CountingStore(dist.Store):
    """A ``dist.Store`` that forwards to ``inner`` and counts the calls (one round trip each, for
    a ``TCPStore`` client) and the fingerprint keys written. Its clones share the counts."""

    def __init__(self, inner: Any, counts: Counter[str] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.counts: Counter[str] = Counter() if counts is None else counts
        self.clones: list[CountingStore] = []   # torch keeps only the C++ half of a clone

    def set(self, key: str, value: Any) -> None:
        self.counts["set"] += 1
        self.inner.set(key, value)

    def get(self, key: str) -> Any:
        self.counts["get"] += 1
        return self.inner.get(key)

    def add(self, key: str, amount: int) -> int:
        self.counts["add"] += 1
        return self.inner.add(key, amount)

    def check(self, keys: list[str]) -> bool:
        self.counts["check"] += 1
        return self.inner.check(keys)

    def wait(self, *args: Any) -> None:
        self.counts["wait"] += 1
        self.inner.wait(*args)

    def delete_key(self, key: str) -> bool:
        self.counts["delete_key"] += 1
        return self.inner.delete_key(key)

    def multi_set(self, keys: list[str], values: list[Any]) -> None:
        self.counts["multi_set"] += 1
        self.counts["fingerprints"] += sum(1 for k in keys if "/fp/" in k)
        self.inner.multi_set(keys, values)

    def multi_get(self, keys: list[str]) -> list[Any]:
        self.counts["multi_get"] += 1
        return self.inner.multi_get(keys)

    def clone(self) -> CountingStore:
        twin = CountingStore(self.inner.clone(), self.counts)
        self.clones.append(twin)
        return twin


def store_client() -> Any:
    """A new client of the launcher's store (what ``attach`` connects to by default)."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=60))


def attach(cache: Any, every: int, tp: int, pp: int,
           store: Any = None) -> tuple[Any, Callable[[], float]]:
    """``cachescope.distributed.attach`` (default: its own store connection, as users get it;
    every rank attaches in the same order) and a reader of its watcher thread's CPU seconds (the
    thread ``attach`` started, found by difference)."""
    before = set(threading.enumerate())
    check = csd.attach(cache, tp=tp, pp=pp, every=every, store=store)
    started = [t for t in threading.enumerate() if t not in before]
    clocks = [time.pthread_getcpuclockid(t.ident) for t in started if t.ident is not None]

    def cpu() -> float:
        total = 0.0
        for clock in clocks:
            try:
                total += time.clock_gettime(clock)
            except OSError:   # the thread ended
                pass
        return total

    return check, cpu


def main() -> int:
    config = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tp, pp = world, 1
    layout = ParallelLayout.from_env(tp=tp, pp=pp)
    cfg = NeoXConfig.preset(config["preset"])
    model = ParallelNeoX.from_config(cfg, layout)
    prompt = prompt_for(cfg.vocab_size)
    mk = Modes(f"ranks-{config['preset']}-r{rank}")
    caches = {a: mk.make("default" if a in EVERY else a) for a in ARMS}
    checks: dict[str, Any] = {}
    cpu: dict[str, Callable[[], float]] = {}
    for a, every in EVERY.items():
        checks[a], cpu[a] = attach(caches[a], every, tp, pp)
    res: dict[str, Any] = {"rank": rank, "world_size": world, "tp": tp, "pp": pp,
                           "preset": config["preset"], "arms": list(ARMS), "every": EVERY,
                           "threads": torch.get_num_threads(), "gc_threshold": list(gc.get_threshold())}
    with torch.inference_mode(), GCWatch() as watch:
        res["warmup_tokens"] = _warm_up(model, prompt, config, caches, checks)
        res["lockstep"] = _lockstep(model, prompt, config, caches, checks, cpu, watch)
        res["whole"] = _whole(model, prompt, config, caches, checks, cpu)
        for a, check in checks.items():
            check.detach()
        res["solo"] = _solo(model, prompt, config, caches, tp, pp, watch)
    res["violations"] = {a: len(caches[a].violations) for a in ARMS if a not in ("plain", "plain-aa")}
    res["checker_violations"] = {a: [v.summary() for v in c.violations] for a, c in checks.items()}
    res["loadavg_end"] = loadavg()
    tmp = out / f".rank{rank}.json"
    tmp.write_text(json.dumps(res))
    os.replace(tmp, out / f"rank{rank}.json")
    mk.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _flush(check: Any, arm: str) -> bool:
    """``check.flush()``, which must compare every published step with the peer's: a checker
    that cannot see its peer would be measured doing less than its work."""
    if not check.flush(timeout=10.0):
        raise RuntimeError(f"arm {arm}: the cross-rank checker did not compare its steps with the "
                           "peer's within 10 s (flush() returned False); the ranks' checkers do "
                           "not share a key prefix, or the store is unreachable")
    return True


def _decode(model: ParallelNeoX, prompt: list[int], tokens: int, cache: Any, check: Any) -> list[int]:
    run = ParallelRun(model, prompt, tokens, cache, check)
    with run.active():
        run.open()
        for _ in range(tokens):
            run.step()
        run.close()
    return run.tokens


def _warm_up(model: ParallelNeoX, prompt: list[int], config: dict[str, Any],
             caches: dict[str, Any], checks: dict[str, Any]) -> list[int]:
    """A short decode on every arm's cache (labels the modules); all arms give the same tokens."""
    n = min(8, config["lockstep"][0])
    expected = None
    for a in ARMS:
        out = _decode(model, prompt, n, caches[a], checks.get(a))
        expected = expected or out
        if out != expected:
            raise AssertionError(f"arm {a} changed the generated tokens: {out} vs {expected}")
    for a, check in checks.items():
        _flush(check, a)
    return expected or []


def _lockstep(model: ParallelNeoX, prompt: list[int], config: dict[str, Any],
              caches: dict[str, Any], checks: dict[str, Any], cpu: dict[str, Callable[[], float]],
              watch: GCWatch) -> dict[str, Any]:
    """Per repetition every arm decodes ``tokens`` tokens, token i of every arm back to back in
    an order shuffled per repetition (the same on every rank); ``gc.collect()`` before each
    repetition; the checkers' ``flush()`` after it, timed apart."""
    tokens, reps = config["lockstep"]
    rng = random.Random(config["seed"])
    totals: dict[str, list[float]] = {a: [] for a in ARMS}
    main_cpu: dict[str, list[float]] = {a: [] for a in ARMS}
    steps: dict[str, list[list[float]]] = {a: [] for a in ARMS}
    flush_s: dict[str, list[float]] = {a: [] for a in checks}
    orders: list[list[str]] = []
    cpu0 = {a: f() for a, f in cpu.items()}
    t_start = PERF()
    rounds = list(shuffled_rounds(ARMS, reps, rng))
    for r in range(reps):
        order = rounds[r * len(ARMS):(r + 1) * len(ARMS)]
        orders.append(order)
        gc.collect()
        runs = [ParallelRun(model, prompt, tokens, caches[a], checks.get(a)) for a in order]
        got = lockstep(runs, tokens, watch, [f"ls:{a}" for a in order])
        for a, check in checks.items():
            t0 = PERF()
            _flush(check, a)
            flush_s[a].append(PERF() - t0)
        for i, a in enumerate(order):
            totals[a].append(got["totals"][i] / tokens)
            main_cpu[a].append(runs[i].cpu_s / tokens)
            steps[a].append(got["steps"][i])
        if any(run.tokens != runs[0].tokens for run in runs):
            raise AssertionError(f"lockstep: the arms generated different tokens ({order})")
    elapsed = PERF() - t_start
    return {"tokens": tokens, "reps": reps, "elapsed_s": elapsed, "orders": orders,
            "seconds_per_token": totals, "main_cpu_per_token": main_cpu, "step_s": steps,
            "flush_s": flush_s,
            "watcher_cpu_s": {a: f() - cpu0[a] for a, f in cpu.items()},
            "gc": {a: {"collections": watch.count(f"ls:{a}"),
                       "by_generation": watch.by_generation(f"ls:{a}")} for a in ARMS}}


def _whole(model: ParallelNeoX, prompt: list[int], config: dict[str, Any], caches: dict[str, Any],
           checks: dict[str, Any], cpu: dict[str, Callable[[], float]]) -> dict[str, Any]:
    """Whole decodes, ABBA: per repetition the arms in a shuffled order and then reversed, one
    decode per cell; a checked arm's ``flush()`` right after its cell, timed apart, and its
    watcher thread's CPU time from the cell's start to the flush's end (its work for the cell's
    steps, and its polling at the rate of a decode running alone)."""
    tokens, reps = config["whole"]
    rng = random.Random(config["seed"] + 1)
    times: dict[str, list[float]] = {a: [] for a in ARMS}
    main_cpu: dict[str, list[float]] = {a: [] for a in ARMS}   # this thread's CPU seconds/token
    flush_s: dict[str, list[float]] = {a: [] for a in checks}
    cell_cpu: dict[str, list[float]] = {a: [] for a in checks}
    cpu0 = {a: f() for a, f in cpu.items()}
    t_start = PERF()
    for _ in range(reps):
        order = list(ARMS)
        rng.shuffle(order)
        cell = dict.fromkeys(ARMS, 0.0)
        cell_main = dict.fromkeys(ARMS, 0.0)
        for a in order + order[::-1]:
            c0 = cpu[a]() if a in cpu else 0.0
            m0, t0 = time.thread_time(), PERF()
            out = _decode(model, prompt, tokens, caches[a], checks.get(a))
            cell[a] += PERF() - t0
            cell_main[a] += time.thread_time() - m0
            if a in checks:
                t0 = PERF()
                _flush(checks[a], a)
                flush_s[a].append(PERF() - t0)
                cell_cpu[a].append(cpu[a]() - c0)
            if len(out) != tokens:
                raise AssertionError(f"whole: arm {a} produced {len(out)} of {tokens} tokens")
        for a in ARMS:
            times[a].append(cell[a] / (2 * tokens))
            main_cpu[a].append(cell_main[a] / (2 * tokens))
    elapsed = PERF() - t_start
    return {"tokens": tokens, "reps": reps, "elapsed_s": elapsed, "seconds_per_token": times,
            "main_cpu_per_token": main_cpu,
            "flush_s": flush_s, "watcher_cpu_s": {a: f() - cpu0[a] for a, f in cpu.items()},
            "watcher_cpu_cell_s": cell_cpu}


def _solo(model: ParallelNeoX, prompt: list[int], config: dict[str, Any], caches: dict[str, Any],
          tp: int, pp: int, watch: GCWatch) -> dict[str, Any]:
    """One decode per arm, alone (no other checker attached): GC collections, the watcher's CPU
    time, and (arm ``rankcheck-counted``: the ``rankcheck`` cache with a counting store) the store
    round trips."""
    tokens = config["solo_tokens"]
    out: dict[str, Any] = {"tokens": tokens, "arms": {}}
    for a in ("plain", "default", "rankcheck", "rankcheck-every-8", "rankcheck-counted"):
        base = "rankcheck" if a == "rankcheck-counted" else a
        cache = caches[base]
        check, cpu, store = None, None, None
        if base in EVERY:
            store = CountingStore(store_client()) if a != base else None
            check, cpu = attach(cache, EVERY[base], tp, pp, store)
        gc.collect()
        label = f"solo:{a}"
        cpu0 = cpu() if cpu else 0.0
        calls0 = Counter(store.counts) if isinstance(store, CountingStore) else Counter()
        watch.label = label
        t0 = PERF()
        produced = _decode(model, prompt, tokens, cache, check)
        wall = PERF() - t0
        watch.label = None
        row: dict[str, Any] = {"tokens": len(produced), "wall_s": wall,
                               "collections": watch.count(label),
                               "by_generation": watch.by_generation(label),
                               "gc_ms": watch.seconds[label] * 1e3}
        if check is not None and cpu is not None:
            t1 = PERF()
            row["flushed"] = _flush(check, a)
            row["flush_s"] = PERF() - t1
            row["watcher_cpu_s"] = cpu() - cpu0
            row["violations"] = [v.summary() for v in check.violations]
            check.detach()
            if isinstance(store, CountingStore):
                row["store_calls"] = dict(store.counts - calls0)
                row["store_s"] = wall + row["flush_s"]
        out["arms"][a] = row
    return out


if __name__ == "__main__":
    sys.exit(main())
