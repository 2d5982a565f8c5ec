"""One rank of a replicated decode for the cross-rank checker's tests (started by torch's launcher).

Every rank runs the same single-process reference NeoX on the same prompt (the ranks are "TP peers"
that must agree), with one all_reduce per step standing for the model's collectives. A scenario
from argv breaks one rank the way the rank faults do; the rank writes what its cache and checker
saw to OUT/rank{r}.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/_rank_worker.py OUT SCENARIO [ARG...]

Scenarios: clean | idle | skip S R | diverge S R | stall S R SECONDS | exit S R | retry S R
(idle: two generations with every rank idle longer than the stall timeout between them)
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

import cachescope
import cachescope.distributed as csd
from cachescope.faults import inject
from cachescope.neox import NeoXConfig, NeoXModel


def main() -> int:
    out, scenario, *args = sys.argv[1:]
    step_arg = int(args[0]) if args else -1
    bad_rank = int(args[1]) if len(args) > 1 else -1
    stall_s = float(args[2]) if len(args) > 2 else 0.0
    stall_timeout = float(os.environ.get("RANKCHECK_STALL_TIMEOUT", "2.0"))
    every = int(os.environ.get("RANKCHECK_EVERY", "1"))
    tokens_n = int(os.environ.get("RANKCHECK_TOKENS", "6"))
    pp = int(os.environ.get("RANKCHECK_PP", "1"))

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = NeoXModel(NeoXConfig.preset("tiny", num_layers=3))
    cache = cachescope.InstrumentedCache(name=f"rank{rank}", metrics=False, tracing=False)
    cachescope.install(cache)
    watch = cachescope.watch(model, cache)
    stalls: list[str] = []
    done = {"ended": False}

    def on_stall(v: cachescope.Violation) -> None:
        stalls.append(v.summary())
        _write(out, rank, cache, check, tokens, error="stalled", stalls=stalls)
        done["ended"] = True
        # The main thread is blocked in a collective: end the run here, once every rank wrote
        # (exiting earlier would break the peers' collective before their watchers report).
        deadline = time.monotonic() + stall_timeout * 3
        world = dist.get_world_size()
        while time.monotonic() < deadline and not all(
                os.path.exists(os.path.join(out, f"rank{r}.json")) for r in range(world)):
            time.sleep(0.05)
        os._exit(0)

    check = csd.attach(cache, tp=dist.get_world_size() // pp, pp=pp, stall_timeout=stall_timeout,
                       every=every, on_stall=on_stall)
    prompt = [5, 9, 2, 7]
    tokens: list[int] = []
    faults = []
    if scenario in ("skip", "retry") and rank == bad_rank:
        faults = [f"{scenario}@{step_arg}:layer=1"]
    error = None
    generations = 2 if scenario == "idle" else 1
    for gen in range(generations):
        if gen:
            # every rank idles longer than the stall timeout, then rank 0 moves on first
            time.sleep(stall_timeout * 1.5 + (0.5 if rank == 1 else 0.0))
            tokens.clear()
            for i in range(tokens_n):
                cache.clear(f"attn_kv_{i}") if cache.q_size(f"attn_kv_{i}") is not None else None
        with torch.no_grad(), model.using_cache(cache), \
                (inject(faults, model.layers, cache, model=model) if faults else _null()), \
                cache.generation(prompt_tokens=len(prompt), max_new_tokens=tokens_n):
            cache.set("use_cache", True)
            try:
                for i in range(tokens_n):
                    if rank == bad_rank and i == step_arg:
                        if scenario == "stall":
                            time.sleep(stall_s)
                        elif scenario == "exit":
                            break
                    cache.set("state_ids", (None, 0) if i == 0 else (i - 1, i))
                    ids = prompt if i == 0 else tokens[-1:]
                    check.note_inputs(ids)
                    logits = model(torch.tensor([ids]))[0, -1]
                    sync = torch.ones(1)
                    dist.all_reduce(sync)           # the step's collective
                    token = int(torch.argmax(logits))
                    if scenario == "diverge" and rank == bad_rank and i == step_arg:
                        token = (token + 1) % 512
                    tokens.append(token)
                    cache.end_step(tokens=1)
            except Exception as exc:   # a faulted rank's loop may fail (pop_empty): report, go on
                error = f"{type(exc).__name__}: {exc}"
                print(f"rank {rank}: the loop raised {error}", file=sys.stderr, flush=True)
    check.flush(timeout=stall_timeout + 5)
    if scenario == "exit" and rank == bad_rank:
        time.sleep(stall_timeout * 3)     # stay alive: the peers must report us, not crash on us
    _write(out, rank, cache, check, tokens, error=error, stalls=stalls)
    watch.remove()
    check.detach()
    cachescope.uninstall()
    dist.destroy_process_group()
    return 0


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _write(out: str, rank: int, cache: object, check: csd.RankCheck, tokens: list[int],
           error: str | None, stalls: list[str]) -> None:
    data = {
        "rank": rank, "tokens": tokens, "error": error, "stalls": stalls,
        "violations": [dict(v.to_dict(), report=v.report()) for v in cache.violations],
        "checker": [v.to_dict() for v in check.violations],
    }
    tmp = os.path.join(out, f".rank{rank}.json")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, os.path.join(out, f"rank{rank}.json"))


if __name__ == "__main__":
    sys.exit(main())
