#!/usr/bin/env python
"""cachescope.hf on a CUDA device (run where a GPU is; CI has none). Exits 1 if a check fails.

    python scripts/hf_gpu_check.py [--json out.json] [--tokens 64] [--reps 3]

1. Correct runs on CUDA, tiny random GPT-NeoX and Llama: greedy, sampling, beam search, a padded
   batch, a static cache and assisted decoding, each with and without ``cachescope.hf.install()``:
   the same tokens, no violation, no telemetry error.
2. Faults on CUDA: prune, dup-layer-idx, skip@2 and partial-crop@2 give their kinds, steps and
   layers (the same as the CPU tests expect).
3. Overhead at pythia-70m shapes on the GPU: forward by forward in lockstep (the benchmark's
   ``lockstep_hf``: one model, three caches, the checked cache's forwards under cachescope.hf, the
   plain ones paused with the step hooks off; ``torch.cuda.synchronize()`` before each clock
   read), and whole ``generate()`` calls interleaved ABBA (checked cells installed, plain cells
   not).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import torch  # noqa: E402

import cachescope.hf as hf  # noqa: E402

DEV = "cuda"
FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        FAILED.append(what)


def _registry() -> Any:
    from prometheus_client import CollectorRegistry
    return CollectorRegistry()


def correct_runs() -> dict[str, Any]:
    from _hf_models import ids, llama, neox
    out: dict[str, Any] = {}
    for kind, build in (("neox", neox), ("llama", llama)):
        model = build(3).to(DEV)
        assistant = build(2, seed=3).to(DEV)
        prompt = ids().to(DEV)
        padded = ids([[0, 0, 7, 8, 9], [5, 6, 7, 8, 9]]).to(DEV)
        pad_mask = (padded != 0).long()
        modes: dict[str, Callable[[], Any]] = {
            "greedy": lambda: model.generate(prompt, max_new_tokens=8, do_sample=False),
            "sampling": lambda: model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=5),
            "beam": lambda: model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False),
            "padded": lambda: model.generate(padded, attention_mask=pad_mask, max_new_tokens=6,
                                             do_sample=False, pad_token_id=0),
            "static": lambda: model.generate(prompt, max_new_tokens=8, do_sample=False,
                                             cache_implementation="static"),
            "assisted": lambda: model.generate(prompt, max_new_tokens=8, do_sample=False,
                                               assistant_model=assistant),
        }
        for mode, run in modes.items():
            try:
                torch.manual_seed(0)
                plain = run().tolist()
            except Exception as exc:     # a mode this transformers cannot run on this model
                out[f"{kind}/{mode}"] = f"n/a ({type(exc).__name__})"
                print(f"n/a  {kind}/{mode}: {exc!r}"[:200])
                continue
            rec = hf.install(registry=_registry(), tracing=False)
            try:
                torch.manual_seed(0)
                checked = run().tolist()
            finally:
                hf.uninstall()
            lengths = rec.layer_lengths()
            out[f"{kind}/{mode}"] = {"same_tokens": checked == plain,
                                     "violations": [v.summary() for v in rec.violations],
                                     "telemetry_errors": rec.telemetry_errors,
                                     "layer_lengths": {k: {str(i): n for i, (n, _) in v.items()}
                                                       for k, v in lengths.items()}}
            check(checked == plain and not rec.violations and not rec.telemetry_errors
                  and bool(lengths),
                  f"{kind}/{mode}: same tokens {checked == plain}, {len(rec.violations)} "
                  f"violations, {rec.telemetry_errors} telemetry errors, lengths {lengths}")
    return out


def faults() -> dict[str, Any]:
    from _hf_models import ids, llama, neox
    expected = {
        "prune:layer=2": (4, [("layer_skipped", 0, "layer_2")]),
        "skip@2:layer=1": (3, [("layer_skipped", 2, "layer_1")]),
        "partial-crop@2": (3, [("structural_op_mid_step", 2, "layer_0")]),
    }
    out: dict[str, Any] = {}
    for kind, build in (("neox", neox), ("llama", llama)):
        for spec, (layers, want) in expected.items():
            model = build(layers).to(DEV)
            rec = hf.install(metrics=False, tracing=False)
            try:
                with hf.inject_faults(spec, model):
                    model.generate(ids().to(DEV), max_new_tokens=5)
            finally:
                hf.uninstall()
            found = [(v.kind, v.step, v.queue) for v in rec.violations]
            out[f"{kind}/{spec}"] = found
            check(found == want, f"{kind}/{spec}: {found}")
        model = build(3).to(DEV)
        try:                             # before 5.18 the model itself crashes on this fault
            with hf.inject_faults("dup-layer-idx:layer=2,as=0", model):
                model.generate(ids().to(DEV), max_new_tokens=5)
        except RuntimeError as exc:
            out[f"{kind}/dup-layer-idx"] = f"n/a: the model crashes without cachescope ({exc})"[:200]
            print(f"n/a  {kind}/dup-layer-idx: the model crashes without cachescope too")
            continue
        rec = hf.install(metrics=False, tracing=False)
        try:
            with hf.inject_faults("dup-layer-idx:layer=2,as=0", model):
                model.generate(ids().to(DEV), max_new_tokens=5)
        finally:
            hf.uninstall()
        found = [(v.kind, v.step, v.queue) for v in rec.violations]
        out[f"{kind}/dup-layer-idx"] = found
        check(found[:3] == [("owner_mismatch", 0, "layer_0"), ("layer_repeated", 0, "layer_0"),
                            ("layer_skipped", 0, "layer_2")],
              f"{kind}/dup-layer-idx:layer=2,as=0: {found[:4]} ...")
    return out


def _median_ci(xs: list[float]) -> tuple[float, float, float]:
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(2000))
    return statistics.median(xs), meds[49], meds[1949]


def overhead(tokens: int, reps: int) -> dict[str, Any]:
    from benchkit.hf import lockstep_hf
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6,
                        num_attention_heads=8, intermediate_size=2048, max_position_embeddings=2048)
    model = GPTNeoXForCausalLM(cfg).eval().to(DEV)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.randint(0, cfg.vocab_size, (1, 16), device=DEV)
    sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
    with torch.inference_mode():
        res = lockstep_hf(model, ids, tokens, reps, 0, sync=sync)
        # whole generate() calls, ABBA: checked cells under install(), plain ones uninstalled
        gen: dict[str, list[float]] = {"plain": [], "checked": []}
        for rep in range(reps * 2):
            for a in (("plain", "checked") if rep % 2 == 0 else ("checked", "plain")):
                if a == "checked":
                    hf.install(registry=_registry())
                try:
                    sync()
                    t0 = time.perf_counter()
                    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens,
                                   do_sample=False)
                    sync()
                    gen[a].append((time.perf_counter() - t0) / tokens)
                finally:
                    hf.uninstall()
    g = [c / p for c, p in zip(gen["checked"], gen["plain"])]
    go, glo, ghi = _median_ci(g)
    res.update({"device": torch.cuda.get_device_name() if DEV == "cuda" else DEV,
                "generate_ms": {a: statistics.median(v) * 1e3 for a, v in gen.items()},
                "generate_overhead": go - 1, "generate_lo": glo - 1, "generate_hi": ghi - 1})
    print(f"lockstep on {res['device']}: plain {res['ms']['plain']:.2f} ms, checked "
          f"{res['ms']['checked']:.2f} ms per forward: {res['overhead']:+.2%} "
          f"[{res['overhead_lo']:+.2%}, {res['overhead_hi']:+.2%}], A/A {res['aa']:+.2%}; "
          f"generate {res['generate_ms']['plain']:.2f} -> {res['generate_ms']['checked']:.2f} "
          f"ms/token: {go - 1:+.2%} [{glo - 1:+.2%}, {ghi - 1:+.2%}]", flush=True)
    check(res["same_tokens"] and res["violations"] == 0 and not res["measured_only"],
          f"overhead runs: same tokens, no violation, every update checked ({res['measured_only']})")
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    import transformers
    res: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": sys.version.split()[0]}
    t0 = time.time()
    res["correct"] = correct_runs()
    res["faults"] = faults()
    res["overhead"] = overhead(args.tokens, args.reps)
    res["failed"] = FAILED
    res["elapsed_s"] = time.time() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    print(f"{len(FAILED)} failed check(s) in {res['elapsed_s']:.0f} s")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
