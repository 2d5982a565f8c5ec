"""One multi-rank run from its per-rank recordings: replay each, then compare the ranks.

    result = analyze_ranks(["run.rank0.jsonl.gz", "run.rank1.jsonl.gz"])   # prints; RankAnalysis

Each rank of a run records its own cache (``run.rank{r}.jsonl.gz``, its header naming the rank
and the layout). Every file is replayed alone (``cachescope.analyze.replay``: its own violations,
reports and summary, as the live rank printed them), building the fingerprint of each step as
the live cross-rank checker does. The ranks are then aligned by (generation, step) and compared
with ``cachescope.distributed.compare_step``, so ``rank_divergence`` comes out as the live checker
reported it; a rank whose recording stops before its peers' (it ended early, crashed, or hung
and was killed) is reported as ``rank_stalled``. Cross-rank violations that the live checker
recorded and the files cannot show again (a stall seen by time, a token difference when the
inputs were not recorded) are carried over as recorded.

Nothing here imports ``cachescope.analyze`` at import time (``analyze`` re-exports this module).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Sequence

from ._families import strip_ids
from ._records import Violation
from .distributed import compare_step

if TYPE_CHECKING:
    from .analyze import AnalysisResult

__all__ = ["RankLayout", "RankFile", "RankAnalysis", "RankSetError", "rank_layout",
           "replay_ranks", "analyze_ranks"]

#: Facts of the run every rank's header repeats (``run_info``): files that differ in one of
#: them are not from one run.
RUN_FACTS = ("model", "prompt_tokens", "max_new_tokens", "faults", "seed", "temperature",
             "top_k", "run_id")
_SPREAD_NOTE_S = 3600.0    # headers created further apart than this get a note


class RankSetError(ValueError):
    """The files given are not the per-rank recordings of one run (mixed runs or layouts, a
    rank twice, a file that names no rank)."""


# ------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class RankLayout:
    """A recording's place in a multi-rank run, from its header (``run`` and ``dist``)."""

    rank: int
    world_size: int
    tp: int
    pp: int
    run_id: str | None = None     # TORCHELASTIC_RUN_ID, or run_info's run_id
    master: str | None = None     # MASTER_ADDR:MASTER_PORT of the process group

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    def describe(self) -> str:
        """``rank 1 of 4, tp_rank 1, pp_rank 0``."""
        return (f"rank {self.rank} of {self.world_size}, tp_rank {self.tp_rank}, pp_rank "
                f"{self.pp_rank}")


def _int(x: Any) -> int | None:
    return x if type(x) is int else None


def read_layout(header: Any) -> tuple[RankLayout | None, str | None]:
    """``(layout, None)``; ``(None, None)`` when the header names no rank; ``(None, why)`` when
    it names one inconsistently. ``run`` (the recorder's run_info) wins over ``dist`` (what the
    recorder saw of torch.distributed)."""
    if not isinstance(header, dict):
        return None, None
    run = header.get("run") if isinstance(header.get("run"), dict) else {}
    dist = header.get("dist") if isinstance(header.get("dist"), dict) else {}
    raw_rank = run.get("rank", dist.get("rank"))
    if raw_rank is None:
        return None, None
    rank = _int(raw_rank)
    world = _int(run.get("world_size", dist.get("world_size")))
    tp, pp = _int(run.get("tp")), _int(run.get("pp"))
    if rank is None or rank < 0:
        return None, f"its header's rank is {raw_rank!r}, not an int >= 0"
    if world is None and tp is not None and pp is not None:
        world = tp * pp
    if world is None or world < 1:
        return None, (f"its header names rank {rank} but no world size (run.world_size, "
                      "dist.world_size, or run.tp and run.pp)")
    if tp is None and pp is None:
        tp, pp = world, 1
    elif tp is None:
        tp = world // pp if pp and pp > 0 else 0
    elif pp is None:
        pp = world // tp if tp > 0 else 0
    if not tp or not pp or tp < 1 or pp < 1 or tp * pp != world:
        return None, (f"its header's layout is inconsistent: tp={run.get('tp')!r} x "
                      f"pp={run.get('pp')!r} must equal world_size={world}")
    if rank >= world:
        return None, f"its header names rank {rank}, outside the world of {world} rank(s)"
    for name, want in (("tp_rank", rank % tp), ("pp_rank", rank // tp)):
        got = run.get(name)
        if got is not None and got != want:
            return None, (f"its header says {name}={got!r} for rank {rank}, but the layout "
                          f"rank = pp_rank * tp + tp_rank (tp={tp}) gives {name}={want}")
    run_id = run.get("run_id", dist.get("run_id"))
    master = dist.get("master")
    return RankLayout(rank, world, tp, pp, None if run_id is None else str(run_id),
                      None if master is None else str(master)), None


def rank_layout(header: Any) -> RankLayout | None:
    """The header's ``RankLayout``; None for a single-process recording (or an inconsistent
    one: ``replay_ranks`` says why)."""
    return read_layout(header)[0]


# ------------------------------------------------------------------------------------ results
@dataclass
class RankFile:
    """One rank's recording, replayed: ``result`` is its ``AnalysisResult``."""

    path: Path
    layout: RankLayout
    result: AnalysisResult

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def tp_rank(self) -> int:
        return self.layout.tp_rank

    @property
    def pp_rank(self) -> int:
        return self.layout.pp_rank

    @property
    def steps(self) -> int:
        return self.result.cache.stats.steps

    @property
    def tokens(self) -> int:
        return self.result.cache.stats.tokens

    @property
    def ops(self) -> int:
        """Ops the cache counted (gets included), as its summary prints them."""
        return self.result.cache.stats.total_ops()

    @property
    def violations(self) -> list[Violation]:
        """The rank's own violations (its cache's checks), each with ``rank`` set."""
        return self.result.cache.violations


@dataclass
class RankAnalysis:
    """What ``replay_ranks`` found in the recordings of one multi-rank run."""

    ranks: list[RankFile]              # by rank
    world_size: int
    tp: int
    pp: int
    cross_rank: list[Violation]        # rank_divergence / rank_stalled, found again from the files
    recorded: list[Violation]          # recorded live and not found again from the files
    notes: list[str] = field(default_factory=list)
    steps_compared: int = 0            # (generation, step) pairs that two ranks or more recorded
    inputs_compared: bool = False      # every file recorded its steps' input digests
    missing: list[int] = field(default_factory=list)   # ranks of the world without a file

    @property
    def violations(self) -> list[Violation]:
        """Every violation: each rank's own (with ``rank``), then the cross-rank ones."""
        out = [v for f in self.ranks for v in f.violations]
        return out + self.cross_rank + self.recorded

    @property
    def all_cross_rank(self) -> list[Violation]:
        return self.cross_rank + self.recorded

    def by_kind(self, rank: int) -> dict[str, int]:
        """Violations that concern ``rank``, counted by kind."""
        counts: dict[str, int] = {}
        for f in self.ranks:
            if f.rank == rank:
                for v in f.violations:
                    counts[v.kind] = counts.get(v.kind, 0) + 1
        for v in self.all_cross_rank:
            if v.rank == rank:
                counts[v.kind] = counts.get(v.kind, 0) + 1
        return counts

    def dropped(self) -> int:
        return sum(f.result.cache.stats.violations_dropped for f in self.ranks)

    def title(self) -> str:
        first = self.ranks[0].result.header
        run = first.get("run") if isinstance(first.get("run"), dict) else {}
        model = f", model {run['model']!r}" if run.get("model") is not None else ""
        return (f"cachescope analyze: {len(self.ranks)} rank recording(s) of one run: world "
                f"{self.world_size} (tp {self.tp} x pp {self.pp}){model}, recorded "
                f"{first.get('created')}")

    def table(self) -> str:
        """One row per rank: layout, steps, tokens, ops, violations by kind."""
        heads = ["rank", "tp_rank", "pp_rank", "steps", "tokens", "ops", "violations"]
        rows = []
        for f in self.ranks:
            kinds = self.by_kind(f.rank)
            text = ", ".join(f"{k}={n}" for k, n in sorted(kinds.items())) or "none"
            rows.append([str(f.rank), str(f.tp_rank), str(f.pp_rank), str(f.steps),
                         str(f.tokens), str(f.ops), text])
        for r in self.missing:
            rows.append([str(r), str(r % self.tp), str(r // self.tp), "-", "-", "-",
                         "(no recording given)"])
        rows.sort(key=lambda row: int(row[0]))
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = ["Per-rank summary", fmt.format(*heads).rstrip()]
        lines += [fmt.format(*r).rstrip() for r in rows]
        return "\n".join(lines)

    def cross_rank_header(self) -> str:
        inputs = ("inputs compared" if self.inputs_compared else
                  "inputs not compared (not recorded)")
        n = len(self.all_cross_rank)
        found = "no cross-rank violations" if not n else f"{n} cross-rank violation(s)"
        return (f"Cross-rank check: {len(self.ranks)} ranks aligned by (generation, step), "
                f"{self.steps_compared} step(s) compared ({inputs}): {found}")

    def reports(self) -> list[str]:
        """Every violation report: each rank's own, then the cross-rank ones."""
        return [v.report() for v in self.violations]

    def text(self, quiet: bool = False) -> str:
        """Everything ``analyze_ranks`` prints; ``quiet``: only the notes and the violation
        reports (or one line when there are none)."""
        parts = [] if quiet else [self.title()]
        parts += [f"note: {n}" for n in self.notes]
        for f in self.ranks:
            if quiet:
                parts += [f"note: rank {f.rank}: {n}" for n in f.result.notes]
                parts += f.result.reports()
            else:
                parts.append(f"--- rank {f.rank} (tp_rank {f.tp_rank}, pp_rank {f.pp_rank}): "
                             f"{f.path} ---")
                parts.append(f.result.text().rstrip("\n"))
        if not quiet:
            parts.append(self.cross_rank_header())
        parts += [v.report() for v in self.cross_rank]
        if self.recorded:
            parts.append("Recorded live by the cross-rank checker, not found again from the "
                         "files (seen by time, or from inputs that were not recorded):")
            parts += [v.report() for v in self.recorded]
        if quiet:
            if not self.violations:
                parts.append(f"cachescope analyze: {len(self.ranks)} ranks: no violations")
        else:
            parts.append(self.table())
        return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------ checks
def _headers(paths: Sequence[Path]) -> list[tuple[Path, dict[str, Any]]]:
    from .analyze import read_record

    out = []
    for p in paths:
        header, lines = read_record(p)
        with contextlib.suppress(Exception):
            next(lines, None)   # starts the reader, so that close() closes the file
        lines.close()
        out.append((p, header))
    return out


def _created(header: dict[str, Any]) -> datetime.datetime | None:
    text = header.get("created")
    if type(text) is not str:
        return None
    try:
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        return None


def _check_set(headers: list[tuple[Path, dict[str, Any]]]
               ) -> tuple[dict[Path, RankLayout], list[str]]:
    """The layout of every file; RankSetError when they are not the ranks of one run."""
    layouts: dict[Path, RankLayout] = {}
    for p, h in headers:
        layout, why = read_layout(h)
        if layout is None:
            why = why or ("its header names no rank (header.run.rank / header.dist.rank): it is "
                          "not one rank's recording of a multi-rank run")
            raise RankSetError(f"{p}: {why}; analyze it alone, or give the per-rank recordings "
                               "of one run (run.rank*.jsonl.gz)")
        layouts[p] = layout
    (p0, h0), l0 = headers[0], layouts[headers[0][0]]
    by_rank: dict[int, Path] = {}
    for p, h in headers:
        lay = layouts[p]
        if (lay.world_size, lay.tp, lay.pp) != (l0.world_size, l0.tp, l0.pp):
            raise RankSetError(
                f"files from different runs or layouts: {p0} is rank {l0.rank} of a world of "
                f"{l0.world_size} (tp {l0.tp} x pp {l0.pp}), {p} is rank {lay.rank} of a world of "
                f"{lay.world_size} (tp {lay.tp} x pp {lay.pp}); give the per-rank files of one run")
        for name, a, b in (("process group", l0.master, lay.master),
                           ("run id", l0.run_id, lay.run_id)):
            if a is not None and b is not None and a != b:
                raise RankSetError(f"files from different runs: {p0} and {p} were recorded by "
                                   f"different {name}s ({a!r} vs {b!r}); give the per-rank "
                                   "files of one run")
        run0 = h0.get("run") if isinstance(h0.get("run"), dict) else {}
        run = h.get("run") if isinstance(h.get("run"), dict) else {}
        for key in RUN_FACTS:
            if key in run0 and key in run and run0[key] != run[key]:
                raise RankSetError(f"files from different runs: {p0} and {p} differ in {key} "
                                   f"({run0[key]!r} vs {run[key]!r}); give the per-rank files "
                                   "of one run")
        if lay.rank in by_rank:
            raise RankSetError(f"rank {lay.rank} is recorded twice: {by_rank[lay.rank]} and {p} "
                               "(files of two runs?); give one file per rank")
        by_rank[lay.rank] = p
    notes = []
    missing = [r for r in range(l0.world_size) if r not in by_rank]
    if missing:
        notes.append(f"rank(s) {', '.join(map(str, missing))} of the world of {l0.world_size} "
                     f"have no recording here: the {len(by_rank)} given are compared with each "
                     "other only (a missing rank's divergence or stall cannot be seen)")
    times = [t for t in (_created(h) for _, h in headers) if t is not None]
    with contextlib.suppress(TypeError):   # naive and aware times mixed: no note
        if times and (max(times) - min(times)).total_seconds() > _SPREAD_NOTE_S:
            notes.append(f"the recordings were started {max(times) - min(times)} apart: are they "
                         "from one run?")
    return layouts, notes


# ------------------------------------------------------------------------------------ compare
def _divergences(files: list[RankFile], tp: int, pp: int) -> tuple[list[Violation], int]:
    """``rank_divergence`` of every (generation, step) two ranks or more recorded, at most one
    per rank and generation (as the live checker reports them). Returns (violations, steps
    compared)."""
    keys = sorted(set().union(*(f.result.fingerprints for f in files)))
    caches = {f.rank: f.result.header.get("cache") or "default" for f in files}
    diverged: set[tuple[int, int]] = set()
    found: list[tuple[int, int, int, Violation]] = []
    compared = 0
    for g, s in keys:
        fps = {f.rank: f.result.fingerprints[(g, s)] for f in files
               if (g, s) in f.result.fingerprints}
        if len(fps) < 2:
            continue
        compared += 1
        for v in compare_step(fps, tp=tp, pp=pp):
            if v.rank is None or (g, v.rank) in diverged:
                continue
            diverged.add((g, v.rank))
            v.detail = f"generation {g}: {v.detail}"    # worded as the live checker words it
            v.cache = str(caches.get(v.rank, "default"))
            found.append((g, s, v.rank, v))
    found.sort(key=lambda t: t[:3])
    return [t[3] for t in found], compared


def _progress(f: RankFile) -> dict[int, tuple[int, int]]:
    """generation -> (distinct state ids run, last step index) of one rank. A retried step
    repeats its state ids, so it adds no progress (its extra step index is not a lead)."""
    ids: dict[int, set[str]] = {}
    last: dict[int, int] = {}
    for (g, s), fp in f.result.fingerprints.items():
        ids.setdefault(g, set()).add(str(fp.get("ids")))
        last[g] = max(last.get(g, s), s)
    return {g: (len(ids[g]), last[g]) for g in ids}


def _stalls(files: list[RankFile]) -> list[Violation]:
    """``rank_stalled`` for every rank whose recording of a generation stops before the step
    its peers reached."""
    progress = {f.rank: _progress(f) for f in files}
    gens = sorted({g for p in progress.values() for g in p})
    out = []
    for g in gens:
        here = {r: p[g] for r, p in progress.items() if g in p}
        lead_rank = max(here, key=lambda r: (here[r][0], -r))
        lead_n, lead_step = here[lead_rank]
        first = min(min(s for (gg, s) in f.result.fingerprints if gg == g)
                    for f in files if f.rank in here)
        for f in files:
            n, last = here.get(f.rank, (0, None))
            if n >= lead_n:
                continue
            out.append(_stall(f, g, last, first, lead_rank, lead_step))
    return out


def _stall(f: RankFile, g: int, last: int | None, first: int, peer: int,
           peer_step: int) -> Violation:
    r = f.rank
    ends = f.result.extra.get("generation_ends") or {}
    op = (f.result.extra.get("last_op") or {}).get(g)
    step = first if last is None else last + 1
    if last is None:
        what = (f"rank {r}'s recording has no step of generation {g}, which rank {peer} ran up to "
                f"step {peer_step}")
        ended = False
    elif g in ends:
        err = f" with {ends[g]}" if ends[g] else ""
        what = (f"rank {r} ended generation {g}{err} after step {last} while rank {peer} reached "
                f"step {peer_step}: its peers wait for it in a collective that never completes")
        ended = True
    else:
        what = (f"rank {r}'s recording of generation {g} stops after step {last} (no generation "
                f"end: killed, crashed or hung) while rank {peer} reached step {peer_step}")
        ended = False
    side = ""
    queue, consumer, site = "<progress>", None, None
    if op is not None:
        side = (f"Rank {r}'s last cache op: {op.op} {op.queue!r} by {op.owner or '<no module>'} "
                f"at step {op.step}\n  at {op.site or '<unknown site>'}")
        queue, consumer, site = str(op.queue), op.owner, op.site
    err = ends.get(g) if ended else None
    if err:
        hint = (f"rank {r}'s decode loop failed ({err}); its peers cannot finish without it: see "
                "its own violations and errors")
    elif ended:
        hint = (f"rank {r} finished early: every rank must run the same number of steps (stop on "
                "an agreed condition, e.g. broadcast the stop flag; HF's synced_gpus)")
    else:
        hint = (f"rank {r} stopped before step {step} (a hung or crashed rank, or a run ended "
                "because of it); its peers were blocked in a collective waiting for it")
    return Violation(
        kind="rank_stalled", queue=queue, family=strip_ids(queue) or queue, step=step,
        consumer=consumer, producer=None, consumer_site=site, hint=hint,
        detail=f"generation {g}: {what} (found from the recordings)",
        cache=str(f.result.header.get("cache") or "default"), rank=r, peer=peer, peer_side=side)


def _carried(files: list[RankFile], derived: list[Violation]) -> list[Violation]:
    """The cross-rank violations recorded live that the files do not show again, once each
    (every rank that saw a stall recorded it)."""
    seen = {(v.kind, v.rank, v.step) for v in derived}
    stalled = {v.rank for v in derived if v.kind == "rank_stalled"}
    out = []
    for f in files:
        for v in f.result.recorded_cross_rank:
            key = (v.kind, v.rank, v.step)
            if key in seen or (v.kind == "rank_stalled" and v.rank in stalled):
                continue
            seen.add(key)
            out.append(v)
    return out


# ------------------------------------------------------------------------------------ API
def replay_ranks(paths: Sequence[str | os.PathLike[str]],
                 progress: bool | Callable[[float], None] = False) -> RankAnalysis:
    """Replay the per-rank recordings of one run and compare the ranks, printing nothing.

    Raises ``RankSetError`` when the files are not the ranks of one run (a file that names no
    rank, files of different runs or layouts, a rank twice), ``RecordFormatError`` for a file
    that is not a readable record, ``OSError`` when one cannot be opened."""
    from .analyze import replay

    files = [Path(p) for p in paths]
    if not files:
        raise RankSetError("no recordings given")
    layouts, notes = _check_set(_headers(files))
    ranks = [RankFile(p, layouts[p], replay(p, progress=progress, ranks=True)) for p in files]
    ranks.sort(key=lambda f: f.rank)
    l0 = ranks[0].layout
    divergences, compared = _divergences(ranks, l0.tp, l0.pp)
    derived = divergences + _stalls(ranks)
    inputs = all(f.result.extra.get("inputs_seen") for f in ranks)
    if not inputs:
        notes.append("the steps' inputs were not recorded by every rank (Recorder(..., "
                     "inputs_key=...) and recorder.note_inputs(ids)): the ranks were compared on "
                     "state ids, kv lengths and the TP peers' cache ops only, so a rank that "
                     "continued with another token is not seen here unless the live checker "
                     "recorded it")
    return RankAnalysis(
        ranks=ranks, world_size=l0.world_size, tp=l0.tp, pp=l0.pp, cross_rank=derived,
        recorded=_carried(ranks, derived), notes=notes, steps_compared=compared,
        inputs_compared=inputs,
        missing=[r for r in range(l0.world_size) if r not in {f.rank for f in ranks}])


_STDOUT: Any = object()


def analyze_ranks(paths: Sequence[str | os.PathLike[str]], out: IO[str] | None = _STDOUT,
                  progress: bool = False, *, quiet: bool = False) -> RankAnalysis:
    """Replay and compare the per-rank recordings of one run (``replay_ranks``) and print (to
    ``out``; default stdout, None for silence) each rank's analysis, labelled with its rank, the
    cross-rank reports and a per-rank table. ``quiet`` prints only the violation reports."""
    if out is _STDOUT:
        out = sys.stdout
    result = replay_ranks(paths, progress=progress)
    if out is not None:
        out.write(result.text(quiet=quiet))
        with contextlib.suppress(Exception):
            out.flush()
    return result
