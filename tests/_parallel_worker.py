"""Real multi-rank runs of ``cachescope.neox.parallel`` for tests/test_parallel_model.py.

Two halves:

* ``launch(nproc, scenarios, workdir)`` (imported by the tests) starts this file under torch's own
  launcher, ``python -m torch.distributed.run --nproc_per_node N --master_addr 127.0.0.1
  --master_port <free>``, with a timeout after which the launcher's whole process group is killed,
  and returns each rank's results: ``{rank: {scenario name: result}}``.
* run as a script (by the launcher), each rank joins a gloo process group on 127.0.0.1, runs every
  scenario of the plan in order (all ranks run the same ones: they are collective) and writes
  ``rank{R}.json`` into the output folder.

A scenario is a dict: ``name``, ``tp``, ``pp``, the model (``config``: NeoXConfig.preset("tiny")
overrides, or ``hf``: a checkpoint folder), ``prompt``, ``new_tokens`` and optional ``sampling``
(temperature/top_k/seed), ``use_cache``, ``hooks`` (``stop_at``: before_step returns False from that
step; ``diverge``: {rank, step, token} for hooks.token). ``expect_error`` scenarios call
``ParallelLayout.from_env`` (and build the model from ``config`` when given) and record the message
of the ValueError they must raise.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

_TIMEOUT_S = 180.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(nproc: int, scenarios: list[dict[str, Any]], workdir: Path,
           timeout: float = _TIMEOUT_S) -> dict[int, dict[str, Any]]:
    """Run ``scenarios`` on ``nproc`` real ranks; per-rank results. Raises AssertionError with the
    launcher's output when it fails or times out (its process group is killed then)."""
    workdir.mkdir(parents=True, exist_ok=True)
    plan = workdir / "plan.json"
    plan.write_text(json.dumps(scenarios))
    out = workdir / "out"
    out.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from _torchrun import torchrun   # (not at the top: this file is also the ranks' script)

    output, returncode = "", None
    for attempt in range(3):  # a free port can be taken between the probe and the launcher's bind
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(Path(__file__).resolve()), str(plan), str(out)]
        returncode, output = torchrun(cmd[3:], env=env, timeout=timeout)
        if returncode is None:   # the launcher and every rank it started were killed
            raise AssertionError(f"the {nproc}-rank launch did not finish in {timeout:.0f} s (killed); "
                                 f"its output:\n{output[-6000:]}")
        if returncode == 0:
            break
        if "address already in use" not in output.lower() and "EADDRINUSE" not in output:
            break
    if returncode != 0:
        raise AssertionError(f"the {nproc}-rank launch exited with {returncode}; its output:\n"
                             f"{output[-6000:]}")
    results = {}
    for rank in range(nproc):
        path = out / f"rank{rank}.json"
        assert path.is_file(), f"rank {rank} wrote no results; launcher output:\n{output[-6000:]}"
        results[rank] = json.loads(path.read_text())
    return results


# -- the rank side ------------------------------------------------------------------------------


class _Hooks:
    """hooks for ParallelDecoder: stop at ``stop_at``; change the token of ``diverge``'s rank."""

    def __init__(self, spec: dict[str, Any], rank: int) -> None:
        self.stop_at = spec.get("stop_at")
        diverge = spec.get("diverge")
        self.diverge = diverge if diverge and diverge["rank"] == rank else None
        self.calls: list[list[Any]] = []

    def before_step(self, step: int) -> bool:
        self.calls.append(["before_step", step])
        return self.stop_at is None or step < self.stop_at

    def token(self, step: int, token: int) -> int:
        self.calls.append(["token", step, token])
        if self.diverge is not None and self.diverge["step"] == step:
            return int(self.diverge["token"])
        return token


class _RankCheck:
    """A stand-in for a cachescope.distributed handle: records note_inputs and the state_ids
    the cache held at that moment."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.notes: list[list[Any]] = []

    def note_inputs(self, ids: list[int]) -> None:
        state = self.cache.get("state_ids")
        self.notes.append([list(ids), None if state is None else list(state)])


def _run(scenario: dict[str, Any]) -> dict[str, Any]:
    import torch

    from cachescope import InstrumentedCache
    from cachescope.neox import NeoXConfig
    from cachescope.neox.parallel import ParallelLayout, ParallelNeoX, parallel_generate

    def build(layout: ParallelLayout) -> ParallelNeoX:
        if "hf" in scenario:
            return ParallelNeoX.from_hf_checkpoint(scenario["hf"], layout)
        return ParallelNeoX.from_config(NeoXConfig.preset("tiny", **scenario.get("config", {})), layout)

    if scenario.get("expect_error"):
        try:
            layout = ParallelLayout.from_env(scenario["tp"], scenario["pp"])
            if "config" in scenario:
                build(layout)
        except ValueError as e:
            return {"error": str(e)}
        return {"error": None}

    layout = ParallelLayout.from_env(scenario["tp"], scenario["pp"])
    model = build(layout)
    cache = InstrumentedCache(metrics=False, tracing=False)
    watch = model.watch(cache)
    hooks = _Hooks(scenario["hooks"], layout.rank) if "hooks" in scenario else None
    rank_check = _RankCheck(cache)
    from cachescope.neox.parallel import ParallelDecoder

    sampling = scenario.get("sampling", {})
    new_tokens = scenario["new_tokens"]
    decoder = ParallelDecoder(model, scenario["prompt"], new_tokens, cache=cache,
                              use_cache=scenario.get("use_cache", True), hooks=hooks,
                              rank_check=rank_check, **sampling)
    with torch.no_grad(), model.using_cache(cache), decoder:
        while not decoder.done:
            decoder.step()
    # the same run through parallel_generate (fresh cache) must give the same tokens
    again = parallel_generate(model, scenario["prompt"], new_tokens, cache=InstrumentedCache(
        metrics=False, tracing=False), use_cache=scenario.get("use_cache", True), hooks=(
            _Hooks(scenario["hooks"], layout.rank) if "hooks" in scenario else None), **sampling)
    hooked = watch.hooked
    watch.remove()
    timeline = cache.timeline()
    leftover = [f"attn_kv_{i}" for i in range(new_tokens + 1) if cache.q_size(f"attn_kv_{i}") is not None]
    leftover += [k for k in ("state_ids", "use_cache") if cache.get(k) is not None]
    return {
        "tp_rank": layout.tp_rank, "pp_rank": layout.pp_rank,
        "layer_range": list(model.layer_range),
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": decoder.tokens, "generate_tokens": again, "stopped": decoder.stopped,
        "logits": None if decoder.logits is None else decoder.logits.tolist(),
        "owners": sorted({r.owner for r in timeline if r.op in ("push", "pop") and r.owner}),
        "producers": sorted({r.producer for r in timeline if r.op == "pop" and r.producer}),
        "pushes": sum(1 for r in timeline if r.op == "push"),
        "hooked": hooked,
        "violations": [f"{v.kind}: {v}" for v in cache.violations],
        "leftover": leftover,
        "hook_calls": None if hooks is None else hooks.calls,
        "notes": rank_check.notes,
    }


def main(plan_path: str, out_dir: str) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        results = {s["name"]: _run(s) for s in json.loads(Path(plan_path).read_text())}
        dist.barrier()
    finally:
        rank = dist.get_rank()
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
