"""Section ``hf``: cachescope's ``generate`` vs Hugging Face ``GPTNeoXForCausalLM.generate`` on
identical random weights (saved by HF, loaded with ``cachescope.neox.load_hf_checkpoint``)."""

from __future__ import annotations

import contextlib
import gc
import inspect
import io
import os
import random
import statistics
import tempfile
import warnings
from typing import Any, Callable

import torch

from cachescope import Cache
from cachescope.neox import NeoXConfig, generate

from .common import PERF, Context, Modes, bootstrap_ci, log, prompt_for


def _registry() -> Any:
    from prometheus_client import CollectorRegistry
    return CollectorRegistry()


def run(ctx: Context) -> dict[str, Any]:
    preset = ctx.hf_preset or ("tiny" if ctx.quick else "pythia-70m")
    log(f"hf: cachescope generate vs transformers generate, {preset}")
    res = bench_hf(preset, ctx.tokens or (16 if ctx.quick else 128),
                   ctx.reps or (2 if ctx.quick else 7), ctx.seed)
    if "skipped" in res:
        log(f"  skipped: {res['skipped']}")
    else:
        log(f"  hf {preset}: {res['ms']}, ratio {res['ratio']:.3f}, same tokens {res['same_tokens']}")
    return res


def bench_hf(preset: str, tokens: int, reps: int, seed: int) -> dict[str, Any]:
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
    prompt = prompt_for(cfg.vocab_size, seed=seed)
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    mk = Modes("hf")
    inst = mk.make("default")
    import cachescope.hf as cshf

    def hf_generate(n: int) -> list[int]:
        return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)[0, len(prompt):].tolist()

    def hf_checked(n: int) -> list[int]:
        # cachescope.hf in default mode (metrics on a private registry, no tracing SDK: the
        # global no-op provider), installed for the cell only: the "hf" cells run unpatched
        cshf.install(registry=_registry())
        try:
            return hf_generate(n)
        finally:
            cshf.uninstall()

    runs = {
        "hf": hf_generate,
        "hf+cachescope.hf": hf_checked,
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
    lock = lockstep_hf(hf, ids, tokens, max(3, reps // 2), seed)
    ratios = [c / h for c, h in zip(res["cachescope"], res["hf"])]
    lo, hi = bootstrap_ci(ratios, statistics.median)
    ratios_i = [c / h for c, h in zip(res["cachescope+default"], res["hf"])]
    ilo, ihi = bootstrap_ci(ratios_i, statistics.median)
    ratios_h = [c / h for c, h in zip(res["hf+cachescope.hf"], res["hf"])]
    hlo, hhi = bootstrap_ci(ratios_h, statistics.median)
    same = (out_tokens["hf"] == out_tokens["cachescope"] == out_tokens["cachescope+default"]
            == out_tokens["hf+cachescope.hf"])
    first_diff = None
    if not same:
        first_diff = next((i for i, (a, b) in enumerate(zip(out_tokens["hf"], out_tokens["cachescope"]))
                           if a != b), None)
    return {"preset": preset, "tokens": tokens, "reps": reps,
            "ms": {k: statistics.median(v) for k, v in res.items()}, "raw": res,
            "ratio": statistics.median(ratios), "ratio_lo": lo, "ratio_hi": hi,
            "ratio_inst": statistics.median(ratios_i), "ratio_inst_lo": ilo, "ratio_inst_hi": ihi,
            "ratio_hfcheck": statistics.median(ratios_h), "ratio_hfcheck_lo": hlo,
            "ratio_hfcheck_hi": hhi,
            "same_tokens": same, "first_diff": first_diff,
            "transformers": transformers.__version__, "lockstep": lock}


def lockstep_hf(model: Any, ids: Any, tokens: int, reps: int, seed: int,
                watch: bool = False, sync: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Forward by forward, in lockstep, on ONE model: three ``DynamicCache``s decode the same
    greedy tokens; per token, in rotating order, the ``checked`` cache's forward runs under
    ``cachescope.hf`` (installed, default mode, the model's step hooks in place) and the ``plain``
    and ``plain-aa`` caches' forwards run inside ``cachescope.hf.paused()`` with the model's step
    hooks taken off (put back, untimed, before the next checked forward), so a plain forward runs
    exactly as without cachescope but for the patched functions' flag check. One model for all
    arms, so that the arms differ in nothing but cachescope (copies of the model also differ in
    where their weights lie; session 8's design, whose A/A control of two copies showed no bias
    from it, used three). Per-token paired
    ratios checked/plain (and plain-aa/plain: the A/A control), median with a bootstrap CI over
    every token of every repetition. ``watch``: owners named by ``cachescope.hf.watch`` (forward
    hooks on every attention module, also taken off for the plain arms) instead of the stack
    look-up. ``sync``: called before each clock read (``torch.cuda.synchronize`` for a model on
    a GPU, whose forward only queues work)."""
    import cachescope.hf as cshf
    from transformers import DynamicCache

    arms = ("plain", "checked", "plain-aa")
    times: dict[str, list[float]] = {a: [] for a in arms}
    same = True
    # the forward's cache argument: ``cache`` from transformers 5.24, ``past_key_values`` before
    # (an unknown keyword would be swallowed by ``**kwargs``: the model would make its own cache)
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rec = cshf.install(registry=_registry())
    hooked = [True]

    def hooks(on: bool) -> None:
        # the step hooks (and watch()'s) of the model's view: off for a plain forward
        if on == hooked[0]:
            return
        if on:
            rec.hook(model)
            if watch:
                cshf.watch(model)
        else:
            rec.unhook()
        hooked[0] = on

    try:
        if watch:
            cshf.watch(model)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.generate(ids, max_new_tokens=2, do_sample=False)   # its view, hooks
            for rep in range(reps):
                caches = {a: DynamicCache(config=model.config) for a in arms}
                nxt: dict[str, Any] = {}
                for a in arms:                     # prefill (not timed)
                    hooks(a == "checked")
                    with (cshf.paused() if a != "checked" else contextlib.nullcontext()):
                        out = model(input_ids=ids, **{kw: caches[a]}, use_cache=True)
                    nxt[a] = out.logits[:, -1:].argmax(-1)
                order = list(arms)
                random.Random(seed + rep).shuffle(order)
                for t in range(tokens):
                    k = t % len(order)
                    for a in order[k:] + order[:k]:
                        hooks(a == "checked")
                        with (cshf.paused() if a != "checked" else contextlib.nullcontext()):
                            if sync is not None:
                                sync()
                            t0 = PERF()
                            out = model(input_ids=nxt[a], **{kw: caches[a]}, use_cache=True)
                            nxt[a] = out.logits[:, -1:].argmax(-1)
                            if sync is not None:
                                sync()
                            times[a].append(PERF() - t0)
                    same = same and nxt["checked"].tolist() == nxt["plain"].tolist()
    finally:
        cshf.uninstall()
        rec.close()
    checked = [c / p for c, p in zip(times["checked"], times["plain"])]
    aa = [c / p for c, p in zip(times["plain-aa"], times["plain"])]
    lo, hi = bootstrap_ci(checked, statistics.median)
    alo, ahi = bootstrap_ci(aa, statistics.median)
    return {"reps": reps, "tokens": tokens, "violations": len(rec.violations),
            "measured_only": dict(rec.measured_only),
            "ms": {a: statistics.median(v) * 1e3 for a, v in times.items()},
            "overhead": statistics.median(checked) - 1, "overhead_lo": lo - 1, "overhead_hi": hi - 1,
            "aa": statistics.median(aa) - 1, "aa_lo": alo - 1, "aa_hi": ahi - 1,
            "same_tokens": same}


def render(hf: dict[str, Any], w: Callable[[str], None]) -> None:
    w("## cachescope `generate` vs Hugging Face `generate`")
    w("")
    if "skipped" in hf:
        w(f"Skipped: {hf['skipped']}")
        w("")
        return
    w(f"Random `GPTNeoXForCausalLM` with the `{hf['preset']}` shape (transformers "
      f"{hf['transformers']}), saved with `save_pretrained` and loaded into cachescope with "
      f"`load_hf_checkpoint` (identical weights); {hf['tokens']} new tokens after a 16-token "
      "prompt, HF `generate(do_sample=False, min_new_tokens=max_new_tokens)` with its default "
      f"cache; {hf['reps']} interleaved repetitions, same threads.")
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
    if "ratio_hfcheck" in hf:
        w(f"**transformers' own cache checked** (`cachescope.hf.install()`, default mode: metrics on "
          f"a private registry, no tracing SDK; installed for its cells only, so the `hf` cells run "
          f"unpatched): HF `generate` takes **{(hf['ratio_hfcheck'] - 1) * 100:+.2f} %** "
          f"[{(hf['ratio_hfcheck_lo'] - 1) * 100:+.2f} %, {(hf['ratio_hfcheck_hi'] - 1) * 100:+.2f} %] "
          "longer (median of paired ratios over the repetitions; issue #20's goal: 1 %).")
        w("")
    lock = hf.get("lockstep")
    if lock:
        ms = lock["ms"]
        w(f"**Forward by forward, in lockstep** (one model, three `DynamicCache`s decoding the same "
          f"greedy tokens, {lock['reps']} x {lock['tokens']} tokens, rotating order; the `checked` "
          f"cache's forwards under `cachescope.hf.install()` in default mode, the `plain` and "
          f"`plain-aa` caches' forwards inside `cachescope.hf.paused()` with the model's step hooks "
          f"taken off): median forward "
          f"{ms['plain']:.2f} ms plain, {ms['checked']:.2f} ms checked; overhead "
          f"**{lock['overhead'] * 100:+.2f} %** [{lock['overhead_lo'] * 100:+.2f} %, "
          f"{lock['overhead_hi'] * 100:+.2f} %] (median of per-token paired ratios), A/A control "
          f"{lock['aa'] * 100:+.2f} % [{lock['aa_lo'] * 100:+.2f} %, {lock['aa_hi'] * 100:+.2f} %]; "
          f"same tokens: {'yes' if lock['same_tokens'] else 'no'}; violations: {lock['violations']}.")
        w("")
