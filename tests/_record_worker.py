"""One rank of a recorded multi-rank decode, for tests/test_rank_records.py (started by torch's
launcher, gloo on 127.0.0.1).

    python -m torch.distributed.run --nproc_per_node 4 tests/_record_worker.py OUT --tp 2 --pp 2

Every rank builds the same seeded 4-layer reference NeoX and keeps the layers of its pipeline
stage (``rank = pp_rank * tp + tp_rank``; contiguous layers, the first stages get the extra one),
watched under their global names (``layers.{g}.attention``), like ``cachescope.neox.parallel``
does. Each step every rank sets ``state_ids``, runs its layers, and takes rank 0's token
(``dist.broadcast``: the step's collective). The rank records its cache to OUT/run.rank{r}.jsonl.gz
(header ``run`` with rank, tp_rank, pp_rank, tp, pp, world_size; keyed input digests) with the
live cross-rank checker attached, so the recording also holds what the live checker found.

Two generations:

1. 6 tokens; ``--skip R:SPEC`` breaks rank R's layer order with ``cachescope.faults.inject``
   (e.g. ``1:skip@2:layer=1``); ``--diverge R:S`` makes rank R continue with another token than
   rank 0's after step S.
2. 4 tokens; ``--crash R:I`` makes rank R's decode loop raise before its I-th step of this
   generation (its generation ends with the error); it still joins the remaining collectives, so
   its peers finish.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import cachescope
import cachescope.distributed as csd
from cachescope.faults import inject
from cachescope.neox import NeoXConfig, NeoXModel
from cachescope.record import Recorder

NUM_LAYERS = 4
PROMPTS = ([5, 9, 2, 7], [3, 1, 4])
TOKENS = (6, 4)


def stage_layers(n: int, pp: int, stage: int) -> range:
    sizes = [n // pp + (1 if i < n % pp else 0) for i in range(pp)]
    start = sum(sizes[:stage])
    return range(start, start + sizes[stage])


def _pair(text: str | None) -> tuple[int, str] | None:
    if not text:
        return None
    rank, _, rest = text.partition(":")
    return int(rank), rest


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--skip", default=None)
    ap.add_argument("--diverge", default=None)
    ap.add_argument("--crash", default=None)
    args = ap.parse_args()
    skip, diverge, crash = _pair(args.skip), _pair(args.diverge), _pair(args.crash)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tp, pp = args.tp, args.pp
    assert tp * pp == world, f"tp {tp} x pp {pp} != world {world}"
    stage = rank // tp

    config = NeoXConfig.preset("tiny", num_layers=NUM_LAYERS)
    model = NeoXModel(config)
    local = stage_layers(NUM_LAYERS, pp, stage)
    cache = cachescope.InstrumentedCache(name=f"rank{rank}", metrics=False, tracing=False)
    watches = [cachescope.watch(model.layers[g], cache, prefix=f"layers.{g}.") for g in local]
    model.layers = nn.ModuleList([model.layers[g] for g in local])

    key = [os.urandom(16) if rank == 0 else None]   # one secret for the input digests of the run
    dist.broadcast_object_list(key, src=0)
    recorder = Recorder(os.path.join(args.out, f"run.rank{rank}.jsonl.gz"), inputs_key=key[0],
                        run_info={"model": f"tiny-{NUM_LAYERS}", "rank": rank,
                                  "tp_rank": rank % tp, "pp_rank": stage, "tp": tp, "pp": pp,
                                  "world_size": world})
    recorder.attach(cache)
    check = csd.attach(cache, tp=tp, pp=pp, stall_timeout=5.0)

    faults = [skip[1]] if skip is not None and skip[0] == rank else []
    errors: list[str] = []
    with torch.no_grad(), model.using_cache(cache):
        broken = inject(faults, model.layers, cache, model=model) if faults else None
        with broken or contextlib.nullcontext():
            errors += decode(model, cache, recorder, check, 0, rank, diverge=diverge)
        check.flush(timeout=20)
        errors += decode(model, cache, recorder, check, 1, rank, crash=crash)
    check.flush(timeout=1)
    recorder.close()
    check.detach()
    for w in watches:
        w.remove()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "errors": errors,
                   "checker": [v.to_dict() for v in check.violations]}, f)
    dist.destroy_process_group()
    return 0


def decode(model: NeoXModel, cache: cachescope.InstrumentedCache, recorder: Recorder,
           check: csd.RankCheck, gen: int, rank: int, *, diverge: tuple[int, str] | None = None,
           crash: tuple[int, str] | None = None) -> list[str]:
    """One generation; returns the error that ended it on this rank, if any."""
    prompt, n = PROMPTS[gen], TOKENS[gen]
    tokens: list[int] = []
    done = 0
    try:
        with cache.generation(prompt_tokens=len(prompt), max_new_tokens=n):
            cache.set("use_cache", True)
            for i in range(n):
                if crash is not None and crash[0] == rank and i == int(crash[1]):
                    raise RuntimeError(f"rank {rank} crashed before step {i} of generation "
                                       f"{gen + 1}")
                cache.set("state_ids", (None, 0) if i == 0 else (i - 1, i))
                ids = prompt if i == 0 else tokens[-1:]
                check.note_inputs(ids)
                recorder.note_inputs(ids)
                logits = model(torch.tensor([ids]))[0, -1]
                token = torch.tensor([int(torch.argmax(logits))])
                dist.broadcast(token, src=0)          # the step's collective: rank 0 picks
                t = int(token)
                if diverge is not None and diverge[0] == rank and i == int(diverge[1]):
                    t = (t + 1) % model.config.vocab_size
                tokens.append(t)
                done += 1
                cache.end_step(tokens=1)
    except Exception as exc:   # a crashed or faulted rank: its peers must still finish
        for _ in range(done, n):
            dist.broadcast(torch.zeros(1, dtype=torch.long), src=0)
        return [f"{type(exc).__name__}: {exc}"]
    return []


if __name__ == "__main__":
    sys.exit(main())
