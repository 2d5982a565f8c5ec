"""Section ``labml``: labml.ai's unmodified GPT-NeoX layers (``labml_nn.neox.model``) decoding
through labml's own ``get_cache()``, plain labml ``Cache`` vs ``cachescope.install()``.

The model is ``nn.Sequential(Embedding, TransformerLayer x n, FinalNorm, ReadoutLayer)`` from
``labml_nn.neox.model`` with seeded random weights (nothing is downloaded), decoded greedily
with labml's cache protocol: ``set('use_cache', True)``, then ``state_ids`` ``(None, 0)`` with
the prompt and ``(i, i + 1)`` with each new token. The arms differ only in what
``labml_nn.neox.utils.cache.get_cache()`` returns: a plain labml ``Cache()`` put in labml's
singleton, or an ``InstrumentedCache`` put there by ``cachescope.install(cache)``.

Two designs, side by side in one run:

* **whole decodes, ABBA**: per repetition the arms in a shuffled order and then in the reverse
  order (A B C D D C B A), each cell one whole decode; an arm's time is the sum of its two cells,
  so a linear drift cancels. ``plain-aa`` is the A/A control.
* **lockstep**: per token the mode's step, then plain A's, then plain B's, on the same model,
  swapping labml's singleton between them (not timed). Overhead = mode / B; A / B is the control
  (how much the mode's step slows the plain step after it); ``plain-aa`` is the design's A/A.

No ``gc.collect()`` between cells: the collector runs when the decode's own allocations make it,
which is part of what is measured. Collections are charged to the arm that was running; in the
whole-decode design each arm's net GC-tracked allocations per step are counted too.
"""

from __future__ import annotations

import contextlib
import gc
import random
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import nn

import cachescope
from cachescope import InstrumentedCache

from .common import (PERF, Context, GCWatch, Modes, fmt_ci, gc_summary, loadavg, lockstep,
                     LockstepTally, log, paired_diff, paired_overhead, pct, prompt_for, quantiles,
                     shuffled_rounds)

#: labml model shapes (vocab, hidden, transformer layers, heads); FFN 4 x hidden, rotary 25 %
SHAPES = {
    "tiny": {"vocab": 1000, "hidden": 128, "layers": 2, "heads": 4},
    "pythia-70m": {"vocab": 50304, "hidden": 512, "layers": 6, "heads": 8},
    "pythia-160m": {"vocab": 50304, "hidden": 768, "layers": 12, "heads": 12},
}
WHOLE_MODES = ("plain", "plain-aa", "default", "trace-all")
LOCKSTEP_MODES = ("plain-aa", "default", "trace-all", "trace-spans")
#: (new tokens per decode, repetitions) per preset; ``quick`` under --quick
WHOLE_SIZES = {"tiny": (128, 24), "pythia-70m": (64, 10), "pythia-160m": (48, 6), "quick": (12, 2)}
LOCKSTEP_SIZES = {"tiny": (128, 30), "pythia-70m": (32, 16), "pythia-160m": (24, 8), "quick": (12, 2)}
PROMPT_TOKENS = 16


def labml() -> tuple[Any, Any]:
    """(``labml_nn.neox.model``, ``labml_nn.neox.utils.cache``); raises when not importable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from labml_nn.neox import model as labml_model
        from labml_nn.neox.utils import cache as labml_cache
    return labml_model, labml_cache


def build_model(shape: dict[str, int], seed: int) -> nn.Sequential:
    """labml's layers at ``shape``, seeded random weights (torch's default initialisation)."""
    lm, _ = labml()
    torch.manual_seed(seed)
    v, h = shape["vocab"], shape["hidden"]
    layers = [lm.Embedding(v, h)]
    layers += [lm.TransformerLayer(h, shape["heads"]) for _ in range(shape["layers"])]
    layers += [lm.FinalNorm(h), lm.ReadoutLayer(h, v)]
    return nn.Sequential(*layers).eval()


class LabmlRun:
    """One greedy decode with labml's cache protocol, on whatever labml's ``get_cache()``
    returns, a token per ``step()``; ``active()`` puts this run's cache in labml's singleton."""

    def __init__(self, model: nn.Sequential, prompt: list[int], tokens: int, cache: Any) -> None:
        self.model, self.cache, self.n = model, cache, tokens
        self.prompt = torch.tensor([prompt], dtype=torch.long)
        self.tokens: list[int] = []
        _, self.lc = labml()
        self.attentions = [m for m in model.modules() if hasattr(m, "causal_mask")]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self.lc._INSTANCE = self.cache      # labml's singleton: what its get_cache() returns
        yield

    def settle(self) -> None:
        # labml's AttentionLayer keeps the causal mask of the last key length it saw and rebuilds
        # it when the length changes, which in a decode is every step. Runs stepped side by side
        # are at the same length: drop the mask so the next run's step builds its own, as it
        # would decoding alone.
        for a in self.attentions:
            a.causal_mask = None

    def open(self) -> None:
        self.lc.get_cache().set("use_cache", True)

    def step(self) -> None:
        cache = self.lc.get_cache()
        tokens = self.tokens
        i = len(tokens)
        if i == 0:
            cache.set("state_ids", (None, 0))
            x = self.prompt
        else:
            cache.set("state_ids", (i - 1, i))
            x = torch.tensor([tokens[-1:]], dtype=torch.long)
        tokens.append(int(self.model(x)[0, -1].argmax()))

    def close(self) -> None:
        pass   # labml's loop leaves the cache as it is

    def decode(self) -> list[int]:
        self.open()
        for _ in range(self.n):
            self.step()
        return self.tokens

    def cleanup(self) -> None:
        """Empty the cache for the next decode (labml would keep the last step's queue forever)."""
        self.cache.clear_all()


@contextlib.contextmanager
def labml_singleton(cache: Any) -> Iterator[Any]:
    """``cache`` as labml's singleton for the block: ``cachescope.install(cache)`` for an
    instrumented cache (``uninstall()`` after), else put in ``_INSTANCE`` and restored after."""
    _, lc = labml()
    if isinstance(cache, InstrumentedCache):
        cachescope.install(cache)
        try:
            yield cache
        finally:
            lc._INSTANCE = cache       # lockstep swapped it: give uninstall() its own cache back
            cachescope.uninstall()
    else:
        previous, lc._INSTANCE = lc._INSTANCE, cache
        try:
            yield cache
        finally:
            lc._INSTANCE = previous


def run(ctx: Context) -> dict[str, Any]:
    try:
        labml()
    except Exception as exc:   # labml_nn (or labml) missing: the test extra installs both
        log(f"labml: skipped ({exc!r})")
        return {"skipped": f"labml_nn.neox is not importable: {exc!r}"}
    presets = [p for p in ctx.presets if p in SHAPES]
    out: dict[str, Any] = {"presets": [], "gc_threshold": list(gc.get_threshold())}
    for preset in presets:
        whole = ctx.size(WHOLE_SIZES, preset)
        lock = ctx.size(LOCKSTEP_SIZES, preset, lockstep=True)
        log(f"labml {preset}: whole decodes {whole[1]} reps x {len(WHOLE_MODES)} arms x 2 (ABBA) x "
            f"{whole[0]} tokens; lockstep {lock[1]} reps x {len(LOCKSTEP_MODES)} modes x 3 arms x "
            f"{lock[0]} tokens")
        d = bench_labml(preset, whole, lock, ctx.seed)
        for m, r in d["whole"]["arms"].items():
            o = "" if m == "plain" else f"  overhead {fmt_ci(r['overhead'])}"
            log(f"  whole    {m:11s} {r['median_ms']:8.3f} ms/token{o}  GC/500 tokens "
                f"{r['gc']['per_500']:.2f}, net allocs/token {r['gc']['net_allocs_per_token']:+.2f}")
        for m, r in d["lockstep"]["modes"].items():
            log(f"  lockstep {m:11s} {r['median_ms']:8.3f} ms/token  overhead "
                f"{fmt_ci(r['overhead_wall'])}  (plain step after it {fmt_ci(r['plain_after_mode'])})")
        out["presets"].append(d)
    return out


def bench_labml(preset: str, whole: tuple[int, int], lock: tuple[int, int], seed: int) -> dict[str, Any]:
    _, lc = labml()
    shape = SHAPES[preset]
    model = build_model(shape, seed)
    prompt = prompt_for(shape["vocab"], PROMPT_TOKENS, seed)
    mk = Modes(f"labml-{preset}", plain=lc.Cache)
    modes = sorted(set(WHOLE_MODES) | set(LOCKSTEP_MODES), key=(WHOLE_MODES + LOCKSTEP_MODES).index)
    caches = {m: mk.make(m) for m in modes}
    saved = lc._INSTANCE
    try:
        with torch.inference_mode(), warnings.catch_warnings(), GCWatch() as watch:
            warnings.simplefilter("ignore")   # labml's attention enters the deprecated cuda autocast
            # warm-up: every cache decodes once (labels the modules), same tokens everywhere
            n_check = max(whole[0], lock[0])
            expected = _decode(model, prompt, n_check, caches["plain"])
            installed_ok = True
            for m in modes:
                with labml_singleton(caches[m]):
                    installed_ok &= lc.get_cache() is caches[m]
                    run_ = LabmlRun(model, prompt, n_check, caches[m])
                    if run_.decode() != expected:
                        raise AssertionError(f"labml {preset}: mode {m} changed the generated tokens")
                    run_.cleanup()
                mk.flush(m)
            gc.collect()
            res_whole = _whole(model, prompt, whole, caches, mk, watch, expected, seed)
            res_lock = _lockstep(model, prompt, lock, caches, mk, watch, expected, seed)
    finally:
        lc._INSTANCE = saved
        mk.close()
    del caches
    gc.collect()
    return {"preset": preset, "shape": shape, "prompt_tokens": PROMPT_TOKENS,
            "install_replaces_singleton": installed_ok, "tokens_match": True,
            "sample_tokens": expected[:8], "whole": res_whole, "lockstep": res_lock,
            "loadavg_end": loadavg()}


def _decode(model: nn.Sequential, prompt: list[int], tokens: int, cache: Any) -> list[int]:
    with labml_singleton(cache):
        run_ = LabmlRun(model, prompt, tokens, cache)
        out = run_.decode()
        run_.cleanup()
    return out


def _whole(model: nn.Sequential, prompt: list[int], size: tuple[int, int], caches: dict[str, Any],
           mk: Modes, watch: GCWatch, expected: list[int], seed: int) -> dict[str, Any]:
    """Whole decodes, ABBA: per repetition a shuffled order and its reverse."""
    tokens, reps = size
    times: dict[str, list[float]] = {m: [] for m in WHOLE_MODES}
    net = {m: [0, 0] for m in WHOLE_MODES}
    rng = random.Random(seed)
    get_count = gc.get_count
    t_start = PERF()
    for _ in range(reps):
        order = list(WHOLE_MODES)
        rng.shuffle(order)
        cell: dict[str, float] = {m: 0.0 for m in WHOLE_MODES}
        for m in order + order[::-1]:
            cache = caches[m]
            with labml_singleton(cache):
                run_ = LabmlRun(model, prompt, tokens, cache)
                with run_.active():
                    watch.label = m
                    t0 = PERF()
                    run_.open()
                    for _ in range(tokens):
                        seen, c0 = watch.total, get_count()[0]
                        run_.step()
                        if watch.total == seen:
                            net[m][0] += get_count()[0] - c0
                            net[m][1] += 1
                    mk.flush(m)   # a traced arm pays for its span processor's backlog
                    cell[m] += PERF() - t0
                    run_.cleanup()
                    watch.label = None
            if run_.tokens != expected[:tokens]:
                raise AssertionError(f"mode {m} changed the generated tokens")
        for m in WHOLE_MODES:
            times[m].append(cell[m] / (2 * tokens))
    elapsed = PERF() - t_start
    arms: dict[str, Any] = {}
    for m in WHOLE_MODES:
        q1, med, q3 = quantiles(times[m])
        row: dict[str, Any] = {"ms": [x * 1e3 for x in times[m]], "median_ms": med * 1e3,
                               "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
                               "gc": gc_summary(watch, m, 2 * tokens * reps, *net[m])}
        if m != "plain":
            row["overhead"] = paired_overhead(times["plain"], times[m])
            row["extra_us_per_token"] = paired_diff(times["plain"], times[m])["median"] * 1e6
        arms[m] = row
    return {"tokens": tokens, "reps": reps, "elapsed_s": elapsed, "arms": arms,
            "exported": {m: mk.exported(m) for m in WHOLE_MODES if m in mk.providers}}


def _lockstep(model: nn.Sequential, prompt: list[int], size: tuple[int, int],
              caches: dict[str, Any], mk: Modes, watch: GCWatch, expected: list[int],
              seed: int) -> dict[str, Any]:
    """Per repetition and mode: the mode, plain A and plain B in lockstep, labml's singleton
    swapped before every step."""
    _, lc = labml()
    tokens, reps = size
    plain_a, plain_b = lc.Cache(), lc.Cache()
    tally = LockstepTally(LOCKSTEP_MODES)
    rng = random.Random(seed + 1)
    t_start = PERF()
    for m in shuffled_rounds(LOCKSTEP_MODES, reps, rng):
        runs = [LabmlRun(model, prompt, tokens, c) for c in (caches[m], plain_a, plain_b)]
        with labml_singleton(caches[m]):
            r = lockstep(runs, tokens, watch, (f"ls:{m}", f"ls:{m}/A", f"ls:{m}/B"))
            t0 = PERF()
            mk.flush(m)
            r["totals"][0] += PERF() - t0
        for run_ in runs:
            run_.cleanup()
            if run_.tokens != expected[:tokens]:
                raise AssertionError(f"mode {m} changed the generated tokens")
        tally.add(m, r, tokens)
    elapsed = PERF() - t_start
    modes: dict[str, Any] = {}
    for m in LOCKSTEP_MODES:
        row = tally.row(m)
        row["gc"] = {name: gc_summary(watch, label, tokens * reps)
                     for name, label in (("mode", f"ls:{m}"), ("plain_a", f"ls:{m}/A"),
                                         ("plain", f"ls:{m}/B"))}
        modes[m] = row
    return {"tokens": tokens, "reps": reps, "elapsed_s": elapsed, "modes": modes}


# ----------------------------------------------------------------------------- report
def render(res: dict[str, Any], w: Callable[[str], None]) -> None:
    if "skipped" in res:
        w("## Upstream labml NeoX")
        w("")
        w(f"Skipped: {res['skipped']}")
        w("")
        return
    for d in res["presets"]:
        s = d["shape"]
        wh, ls = d["whole"], d["lockstep"]
        w(f"## Upstream labml NeoX, decode overhead: `{d['preset']}` shapes")
        w("")
        w(f"labml.ai's unmodified `labml_nn.neox.model` layers (`Embedding`, {s['layers']} x "
          f"`TransformerLayer`, `FinalNorm`, `ReadoutLayer`; vocab {s['vocab']}, hidden "
          f"{s['hidden']}, {s['heads']} heads), seeded random weights, greedy decode of a "
          f"{d['prompt_tokens']}-token prompt with labml's cache protocol (`use_cache`, then "
          "`state_ids` (None, 0) and (i, i + 1)) through labml's own `get_cache()`. Plain arms: "
          "a labml `Cache()` in labml's singleton; instrumented arms: `cachescope.install(cache)` "
          f"(labml's singleton replaced: {'yes' if d['install_replaces_singleton'] else 'NO'}). "
          f"Every arm generated the same tokens (first: {d['sample_tokens']}). No `gc.collect()` "
          "between cells: collections happen where the decode's allocations cause them and are "
          "charged to the arm that was running.")
        w("")
        w(f"**Whole decodes, ABBA**: {wh['reps']} repetitions; in each, the arms in a shuffled "
          f"order and then in the reverse order, one decode of {wh['tokens']} new tokens per cell, "
          "so an arm's time (the sum of its two cells) cancels a linear drift. Overhead = median "
          "of the per-repetition ratios to `plain` [95% bootstrap CI]; `plain-aa` is the A/A "
          "control. A traced arm's time includes flushing its span processor. "
          f"Wall time {wh['elapsed_s']:.0f} s.")
        w("")
        w("| arm | median ms/token | IQR | overhead vs plain [95% CI] | mean-ratio overhead "
          "[95% CI] | sd of the ratios | extra us/token |")
        w("|---|---|---|---|---|---|---|")
        for m, r in wh["arms"].items():
            cells = (["-"] * 4 if m == "plain" else
                     [fmt_ci(r["overhead"]), fmt_ci(r["overhead"], "mean"),
                      f"{r['overhead']['sd'] * 100:.2f}%", f"{r['extra_us_per_token']:.0f}"])
            w(f"| {m} | {r['median_ms']:.3f} | {r['q1_ms']:.3f}-{r['q3_ms']:.3f} | "
              f"{' | '.join(cells)} |")
        w("")
        w(f"**Lockstep**: {ls['reps']} repetitions x {len(ls['modes'])} modes; per repetition and "
          f"mode three decodes of {ls['tokens']} new tokens on the same model, the mode's and two "
          "plain labml caches' (A, B): for every token the mode's step, then A's, then B's, "
          "labml's singleton swapped before each (not timed). Overhead = mode / B (pessimistic: "
          "the mode's step always follows another cache's); A / B = how much the mode's step "
          f"slows the plain step right after it. Wall time {ls['elapsed_s']:.0f} s.")
        w("")
        w("| mode | plain B median ms/token | mode median ms/token | overhead: mode / plain B "
          "[95% CI] | mean-ratio overhead [95% CI] | sd of the ratios | median per-token ratio | "
          "extra us/token | plain A / plain B [95% CI] |")
        w("|---|---|---|---|---|---|---|---|---|")
        for m, r in ls["modes"].items():
            w(f"| {m} | {r['plain_median_ms']:.3f} | {r['median_ms']:.3f} | "
              f"{fmt_ci(r['overhead_wall'])} | {fmt_ci(r['overhead_wall'], 'mean')} | "
              f"{r['overhead_wall']['sd'] * 100:.2f}% | {pct(r['token_median_ratio'])} | "
              f"{r['extra_us_per_token']:.0f} | {fmt_ci(r['plain_after_mode'])} |")
        w("")
        w("**Garbage collector, steady state** (after a warm-up decode per cache, no "
          "`gc.collect()` between cells): cyclic-GC collections that started while the arm ran "
          "(`gc.callbacks`), per 500 tokens. Whole decodes also count each arm's net GC-tracked "
          "allocations per step (`gc.get_count()[0]` after minus before, over the steps in which "
          f"no collection ran): generation-0 collections come one per {_threshold(res)} of them. "
          "They are what the step adds toward the next collection in this loop (decodes emptied "
          "with `clear_all()` between them, so the list and tuple free lists are warm), not a "
          "count of objects created; in lockstep, arms take each other's free-list entries, so "
          "it is not counted there.")
        w("")
        w("| design | arm | tokens | collections (gen 0/1/2) | per 500 tokens | ms in GC | net "
          "tracked allocs / step |")
        w("|---|---|---|---|---|---|---|")
        rows = [("whole", m, r["gc"]) for m, r in wh["arms"].items()]
        for m, r in ls["modes"].items():
            rows += [("lockstep", m, r["gc"]["mode"]),
                     ("lockstep", f"plain A after {m}", r["gc"]["plain_a"]),
                     ("lockstep", f"plain B after {m}", r["gc"]["plain"])]
        for design, m, g in rows:
            gens = "/".join(str(x) for x in g["by_generation"])
            net = g.get("net_allocs_per_token")
            w(f"| {design} | {m} | {g['tokens']} | {g['collections']} ({gens}) | "
              f"{g['per_500']:.2f} | {g['gc_ms']:.1f} | "
              f"{'-' if net is None else f'{net:+.2f}'} |")
        exported = wh.get("exported") or {}
        for m, e in exported.items():
            if e:
                w("")
                w(f"`{m}` (whole decodes and warm-up): {sum(e['spans'].values())} spans exported "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(e['spans'].items()))}), "
                  f"{e['events']} events.")
        w("")


def _threshold(res: dict[str, Any]) -> int:
    return int(res.get("gc_threshold", [700])[0])
