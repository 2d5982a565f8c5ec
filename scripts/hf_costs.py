#!/usr/bin/env python
"""Where cachescope.hf's time goes at pythia-70m shapes: the lockstep of ``benchmarks/benchkit/hf.py``
(one model, three caches, per-token paired ratios) run with one component of the default mode
stubbed out at a time. A diagnostic, not a benchmark of working configurations: it replaces
private methods of ``cachescope.hf`` (which the benchmarks, on the public API only, cannot do).

    .venv/bin/python scripts/hf_costs.py [--rounds 6] [--json benchmarks/results-hf-costs.json]

Each configuration must still decode the same tokens as the plain arms and find no violation;
the script exits 1 if one does not (a stub that broke the run would measure nothing useful).

Configurations, each measured ``--rounds`` times, interleaved (ABBA order across rounds):
  full            the default mode as shipped
  no-end-work     the checks and the view's ops at the forward's end skipped (updates still noted)
  const-owner     the owner look-up of each update replaced by a constant
  no-update-work  nothing done per update (no notes; forward hooks and steps still run)
  interception    forward hooks and the patched ``update`` call cachescope, which does nothing:
                  the floor of intercepting a forward and its updates from Python
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import torch  # noqa: E402

from cachescope.hf import _recorder, _state  # noqa: E402

H = _recorder.HFRecorder


@contextlib.contextmanager
def _patched(obj: Any, **attrs: Any) -> Iterator[None]:
    old = {k: obj.__dict__[k] for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


@contextlib.contextmanager
def _const_owner() -> Iterator[None]:
    init = _state.Forward.__init__
    by = ("GPTNeoXAttention#0", "modeling_gpt_neox.py:203")

    def patched(self: Any, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        self.lookup = lambda depth: by

    with _patched(_state.Forward, __init__=patched):
        yield


def _nothing(*_: Any) -> None:
    return None


CONFIGS: dict[str, Callable[[], Any]] = {
    "full": contextlib.nullcontext,
    "no-end-work": lambda: _patched(H, _flush_fast=lambda self, ctx, pending: True),
    "const-owner": _const_owner,
    "no-update-work": lambda: _patched(H, _on_update=_nothing),
    "interception": lambda: _patched(H, _on_update=_nothing, _begin_forward=_nothing,
                                     _end_forward=_nothing),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--reps", type=int, default=2, help="lockstep repetitions per round")
    p.add_argument("--tokens", type=int, default=48, help="tokens per repetition")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--json", default=None)
    p.add_argument("--tiny", action="store_true",
                   help="a toy shape (vocab 256, hidden 32, 2 layers): the smoke test, not a figure")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from benchkit.hf import lockstep_hf

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.tiny:
        cfg = GPTNeoXConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64, max_position_embeddings=256)
    else:   # pythia-70m's shape
        cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6,
                            num_attention_heads=8, intermediate_size=2048,
                            max_position_embeddings=2048)
    model = GPTNeoXForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    names = [n for n in args.configs.split(",") if n]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    t0 = time.time()
    for r in range(args.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            with CONFIGS[n]():
                out = lockstep_hf(model, ids, args.tokens, args.reps, 1000 + r)
            runs[n].append(out)
            print(f"round {r} {n:15s} {out['overhead'] * 100:+.2f} % (A/A {out['aa'] * 100:+.2f} %)",
                  flush=True)
    broken = [n for n in names for x in runs[n] if not x["same_tokens"] or x["violations"]]
    rows = []
    print("\n| configuration | overhead, median of rounds | rounds (min..max) | A/A, median | plain ms/forward |")
    print("|---|---|---|---|---|")
    for n in names:
        o = [x["overhead"] * 100 for x in runs[n]]
        aa = [x["aa"] * 100 for x in runs[n]]
        ms = statistics.median(x["ms"]["plain"] for x in runs[n])
        rows.append({"config": n, "overhead": statistics.median(o), "min": min(o), "max": max(o),
                     "aa": statistics.median(aa), "plain_ms": ms, "rounds": o})
        print(f"| {n} | {statistics.median(o):+.2f} % | {min(o):+.2f} .. {max(o):+.2f} % | "
              f"{statistics.median(aa):+.2f} % | {ms:.2f} |")
    print(f"\n({time.time() - t0:.0f} s; {args.rounds} rounds x {args.reps} x {args.tokens} tokens)")
    if args.json:
        import transformers
        Path(args.json).write_text(json.dumps(
            {"shape": "tiny" if args.tiny else "pythia-70m", "rounds": args.rounds,
             "reps": args.reps, "tokens": args.tokens, "rows": rows,
             "transformers": transformers.__version__, "torch": torch.__version__,
             "python": sys.version.split()[0], "elapsed_s": time.time() - t0}, indent=1))
    if broken:
        print(f"configurations that changed tokens or found violations: {sorted(set(broken))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
