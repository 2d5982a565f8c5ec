"""The parts of ``benchmarks/bench.py``: one module per section, plus shared helpers.

- ``common``     machine facts, statistics, the cache modes, GC accounting, the lockstep engine
- ``reference``  sections ``lockstep`` and ``decode``: the reference model (``cachescope.neox``)
- ``upstream``   section ``labml``: labml.ai's unmodified NeoX layers, plain labml cache vs
                 ``cachescope.install()``
- ``ops``        section ``ops``: per-op microbenchmarks
- ``costs``      section ``profile``: where the instrumentation's time goes
- ``recompute``  section ``loop``: KV cache vs recompute
- ``hf``         section ``hf``: cachescope ``generate`` vs Hugging Face ``generate``
- ``memory``     section ``memory``: RSS and series over a long run, the weakref check
- ``distributed`` section ``ranks``: the cross-rank checker on a TP=2 decode (two ranks started
                 by torch's launcher running ``_rank_bench_worker.py``)
- ``targets``    the goals and their verdicts
- ``report``     RESULTS.md

Every section module has ``run(ctx) -> dict`` (what goes to results.json) and
``render(res, w)`` (its part of RESULTS.md, from results.json alone, so ``--from-json``
re-renders a report without measuring). Only cachescope's public API is used.
"""
