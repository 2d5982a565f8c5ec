#!/usr/bin/env python
"""cachescope's benchmarks: decode overhead of the instrumented cache, per-op costs, memory.

    python benchmarks/bench.py --presets tiny,pythia-70m --out benchmarks/RESULTS.md \\
                               --json benchmarks/results.json
    python benchmarks/bench.py --quick --sections labml
    python benchmarks/bench.py --from-json benchmarks/results.json --out benchmarks/RESULTS.md

Sections (``--sections``, default all, run in this order; code in ``benchmarks/benchkit/``):
  labml     upstream labml.ai NeoX layers (``labml_nn.neox.model``) at the presets' labml shapes,
            decoding through labml's own ``get_cache()``: a plain labml ``Cache`` vs
            ``cachescope.install()``, whole decodes interleaved ABBA and token-level lockstep side
            by side, with A/A controls and GC counts; the decode goals are judged here
  lockstep  the reference model (``cachescope.neox``): each mode decodes token by token beside two
            plain caches (mode, plain A, plain B per token); overhead = mode / B
  decode    the reference model: whole ``generate()`` calls, modes shuffled per repetition
  ops       per-op microbenchmarks (push+pop, set, get, step boundary), ns/op
  profile   where the time goes: push+pop per mode, cProfile of a decode, cold CPU caches, and
            every op timed inside a real decode
  loop      the reference model's KV cache vs no-cache recompute
  hf        cachescope ``generate`` vs Hugging Face ``generate`` on the same weights
  memory    RSS and Prometheus series over a long run; no tensor kept alive (weakrefs)
  ranks     the cross-rank checker (``cachescope.distributed``) on a TP=2 decode: two gloo ranks
            started by torch's launcher, plain / default / checked caches in lockstep and ABBA

``--quick`` runs every section at toy sizes (the smoke test; seconds, not minutes). ``--check``
exits 1 when a target FAILs (the verdicts are printed and written either way).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT / "benchmarks"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from benchkit import (costs, distributed, hf, memory, ops, recompute, reference,  # noqa: E402
                      upstream)
from benchkit.common import PERF, Context, loadavg, log, machine  # noqa: E402
from benchkit.report import write_markdown  # noqa: E402
from benchkit.targets import summary_line, verdicts  # noqa: E402

#: name -> (run(ctx) -> results, render(results, w)); results go to results.json under the name
SECTIONS: dict[str, tuple[Callable[[Context], Any], Callable[[Any, Callable[[str], None]], None]]] = {
    "labml": (upstream.run, upstream.render),
    "lockstep": (reference.run_lockstep, reference.render_lockstep),
    "decode": (reference.run_decode, reference.render_decode),
    "ops": (ops.run, ops.render),
    "profile": (costs.run, costs.render),
    "loop": (recompute.run, recompute.render),
    "hf": (hf.run, hf.render),
    "memory": (memory.run, memory.render),
    "ranks": (distributed.run, distributed.render),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join((__doc__ or "").split("\n\n")[2:]))
    p.add_argument("--quick", action="store_true", help="toy sizes (the smoke test)")
    p.add_argument("--presets", default=None,
                   help="comma-separated presets (default tiny,pythia-70m; --quick: tiny); the "
                        "labml section runs those of tiny, pythia-70m, pythia-160m")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--out", default=None, help="write the Markdown report here")
    p.add_argument("--json", default=None, help="write the raw results as JSON here")
    p.add_argument("--check", action="store_true", help="exit 1 if a target FAILs")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions of the whole-decode designs (labml ABBA, decode)")
    p.add_argument("--lockstep-reps", type=int, default=None,
                   help="repetitions of the lockstep designs (labml, lockstep)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per decode, every design")
    p.add_argument("--memory-steps", type=int, default=None)
    p.add_argument("--hf-preset", default=None, help="model shape of the HF comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-json", default=None,
                   help="do not measure: re-render --out from a --json file of an earlier run "
                        "(e.g. after editing benchmarks/analysis.md)")
    args = p.parse_args(argv)
    args.section_list = [s for s in args.sections.split(",") if s]
    for s in args.section_list:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
    if args.from_json and not args.out:
        p.error("--from-json needs --out")
    return args


def renderers(res: dict[str, Any]) -> list[tuple[str, Callable[[Any, Callable[[str], None]], None]]]:
    return [(name, render) for name, (_, render) in SECTIONS.items() if name in res]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        write_markdown(res, Path(args.out), res.get("command", "python benchmarks/bench.py"),
                       renderers(res))
        log(f"wrote {args.out} from {args.from_json}")
        return 1 if args.check and any(v["verdict"] == "FAIL" for v in res.get("verdicts", [])) else 0

    from cachescope.neox import NeoXConfig
    presets = [s for s in (args.presets or ("tiny" if args.quick else "tiny,pythia-70m")).split(",") if s]
    for preset in presets:
        NeoXConfig.preset(preset)  # validates the name
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    logging.getLogger("opentelemetry").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    ctx = Context(presets=presets, quick=args.quick, seed=args.seed, threads=args.threads,
                  tokens=args.tokens, reps=args.reps, lockstep_reps=args.lockstep_reps,
                  memory_steps=args.memory_steps, hf_preset=args.hf_preset)
    res: dict[str, Any] = {
        "args": {"quick": args.quick, "presets": presets, "sections": args.section_list,
                 "threads": args.threads, "seed": args.seed, "tokens": args.tokens,
                 "reps": args.reps, "lockstep_reps": args.lockstep_reps},
        "machine": machine(), "section_s": {}}
    t_all = PERF()
    log(f"cachescope bench: presets {presets}, threads {args.threads}, sections "
        f"{args.section_list}, {'quick' if args.quick else 'full'}; load average "
        f"{res['machine']['loadavg_start']}")
    for name in SECTIONS:              # the report's order, whatever the command line's
        if name in args.section_list:
            t0 = PERF()
            res[name] = SECTIONS[name][0](ctx)
            res["section_s"][name] = PERF() - t0
            log(f"  ({name}: {res['section_s'][name]:.0f} s)")
    res["elapsed_s"] = PERF() - t_all
    res["loadavg_end"] = loadavg()
    res["verdicts"] = verdicts(res)
    log("")
    for v in res["verdicts"]:
        log(summary_line(v))
    command = "python benchmarks/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res["command"] = command.strip()
    if args.out:
        write_markdown(res, Path(args.out), res["command"], renderers(res))
        log(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
        log(f"wrote {args.json}")
    failed = [v for v in res["verdicts"] if v["verdict"] == "FAIL"]
    if args.check and failed:
        log(f"{len(failed)} target(s) FAILED")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
