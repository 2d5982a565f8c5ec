"""The cross-rank checker: ranks that decode one sequence must agree on every step.

Under tensor parallelism (TP) and pipeline parallelism (PP) every rank has its own process-wide
cache, and the worst cache bugs span ranks: one rank samples another token, skips or retries a
layer, or finishes early while the others wait in a collective. ``attach`` makes a rank publish a
compact fingerprint of each step to the key-value store its process group already has, and a
watcher thread compares the ranks' fingerprints and watches their progress::

    dist.init_process_group("gloo")
    cache = cachescope.install()
    check = cachescope.distributed.attach(cache, tp=2, pp=1)
    ...decode...                  # check.note_inputs(ids) each step, if the loop can
    check.flush(); check.detach()

What is compared (``compare_step``), per step:

* every rank of the run: the step's ``state_ids``, the kv lengths its layers pushed, and the digest
  of the step's input token ids (``note_inputs``; token ids themselves never leave the rank);
* TP peers (ranks of one pipeline stage) also: the ordered (op, queue, owner, kv length) of every
  cache op of the step.

A rank outside the majority (every rank of the group, when there is none) records a
``rank_divergence``. A rank whose progress stays behind its peers' for ``stall_timeout`` seconds,
or that ended its generation before a step its peers reached, is reported as ``rank_stalled`` by
every rank that sees it: on the watcher thread, while the main thread may be blocked in a
collective. The checker adds no collective of its own, so it can never add a hang; the store is
only written and polled from the watcher thread. The main thread's share per checked step is one
``ops_since`` read and a few tuples (``every=K`` checks one step in K).

Rank layout: ``rank = pp_rank * tp + tp_rank`` within ``group`` (the layout of
``cachescope.neox.parallel``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import threading
import time
import weakref
from array import array
from typing import Any, Callable, Iterable, Mapping, Sequence

from ._families import strip_ids
from ._records import OpRecord, Violation

__all__ = ["attach", "RankCheck", "step_fingerprint", "compare_step", "kv_length",
           "inputs_digest", "format_fingerprint", "fingerprint_ops"]

log = logging.getLogger("cachescope")

#: Ops per step kept in a fingerprint for reports (the digest covers all of them).
MAX_FP_OPS = 128
#: Steps a rank keeps its fingerprints in the store before deleting them.
KEEP_STEPS = 256
#: Seconds (at least) a rank may take to reach its first step before it counts as stalled.
STARTUP_GRACE = 30.0
_CHECKED_OPS = frozenset(("push", "pop", "clear", "clear_all"))
_attaches = 0    # attaches in this process: every rank attaches in the same order
_live: "weakref.WeakSet[RankCheck]" = weakref.WeakSet()
_atexit_registered = False


def _stop_all_at_exit() -> None:
    """Stop every watcher still running when the interpreter exits: a thread still inside a
    store call while torch tears its process group down can abort the process."""
    for check in list(_live):
        try:
            check.detach()
        except Exception:
            pass


# ----------------------------------------------------------------------------- fingerprints

def kv_length(value: Any) -> int | None:
    """The sequence length of a queued KV item: ``shape[-2]`` of the first tensor-like in
    ``value`` (a ``(k, v)`` pair of ``(B, heads, T, head_dim)`` tensors gives ``T``), else None.
    Never raises."""
    try:
        x = value
        for _ in range(4):
            if isinstance(x, (tuple, list)):
                if not x:
                    return None
                x = x[0]
            else:
                break
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) < 2:
            return None
        n = shape[-2]
        return n if type(n) is int else int(n)
    except Exception:
        return None


def inputs_digest(ids: Iterable[int]) -> str:
    """A short digest of token ids (the ids themselves are never published)."""
    try:
        data = array("q", ids).tobytes()
    except (TypeError, OverflowError, ValueError):
        data = repr(list(ids)).encode("utf-8", "replace")
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _state(x: Any) -> str:
    try:
        return repr(x)[:80]
    except Exception:
        return f"<{type(x).__name__}>"


_FS, _RS = "\x1f", "\x1e"     # field and record separators of a fingerprint's op text


def _text(x: Any) -> str:
    if x is None:
        return ""
    t = x if type(x) is str else str(x)
    if _FS in t or _RS in t:
        t = t.replace(_FS, " ").replace(_RS, " ")
    return t


def step_fingerprint(records: Sequence[OpRecord], *, step: int, state_ids: Any = None,
                     inputs_digest: str | None = None,
                     kv_lengths: Sequence[int | None] | None = None,
                     state_key: str = "state_ids", rank: int | None = None,
                     generation: int = 0) -> dict[str, Any]:
    """The fingerprint of one step from its op records (the live checker and ``analyze`` of
    per-rank recordings build it the same way).

    ``kv_lengths``: one entry per push in ``records`` (None where unknown); without it the pushed
    bytes stand in for lengths. Returns a JSON-able dict of strings and ints (so a rank's
    fingerprints and its peers' cost the cyclic GC next to nothing): ``s`` step, ``g``
    generation, ``ids`` state ids, ``n`` number of checked ops, ``d`` digest of the ordered (op,
    queue, owner, kv length), ``kv`` the distinct kv lengths pushed (comma-separated), ``in``
    the inputs digest, ``ops`` / ``sites`` the first ``MAX_FP_OPS`` checked ops and their call
    sites as text (``fingerprint_ops`` reads them back).
    """
    keys: list[str] = []
    sites: list[str] = []
    kvs: set[str] = set()
    lengths = iter(kv_lengths) if kv_lengths is not None else None
    for rec in records:
        op = rec.op
        if op in _CHECKED_OPS:
            kv = ""
            if op == "push":
                n = next(lengths, None) if lengths is not None else None
                if n is not None:
                    kv = str(n)
                elif rec.logical_bytes:
                    kv = f"{rec.logical_bytes}B"
                if kv:
                    kvs.add(kv)
        elif op == "set" and rec.queue == state_key:
            kv = ""
        else:
            continue
        keys.append(f"{op}{_FS}{_text(rec.queue)}{_FS}{_text(rec.owner)}{_FS}{kv}")
        sites.append(_text(rec.site))
    text = _RS.join(keys)
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).hexdigest()
    if len(keys) > MAX_FP_OPS:
        text, sites = _RS.join(keys[:MAX_FP_OPS]), sites[:MAX_FP_OPS]
    return {"r": rank, "g": generation, "s": step, "ids": _state(state_ids), "n": len(keys),
            "d": digest, "kv": ",".join(sorted(kvs)), "in": inputs_digest, "ops": text,
            "sites": _RS.join(sites), "t": time.time()}


def fingerprint_ops(fp: Mapping[str, Any]) -> list[tuple[str, str, str | None, str | None, str | None]]:
    """A fingerprint's ops as ``(op, queue, owner, site, kv)`` (None where empty)."""
    text = fp.get("ops") or ""
    if not isinstance(text, str) or not text:
        return []
    sites = (fp.get("sites") or "").split(_RS)
    out = []
    for i, entry in enumerate(text.split(_RS)):
        op, queue, owner, kv = (entry.split(_FS) + ["", "", "", ""])[:4]
        site = sites[i] if i < len(sites) else ""
        out.append((op, queue, owner or None, site or None, kv or None))
    return out


def _kv_text(fp: Mapping[str, Any]) -> str:
    kv = fp.get("kv")
    if isinstance(kv, (list, tuple)):
        kv = ",".join(map(str, kv))
    return kv.replace(",", ", ") if kv else "-"


def format_fingerprint(fp: Mapping[str, Any], mark: int | None = None) -> list[str]:
    """A fingerprint's ops as report lines (``mark``: index of the op to point at)."""
    lines = []
    ops = fingerprint_ops(fp)
    for i, (op, queue, owner, site, kv) in enumerate(ops):
        arrow = "  >" if i == mark else "   "
        kv_text = "" if kv is None else f" kv={kv}"
        lines.append(f"{arrow} {i + 1:>3} {op:<9} {str(queue)[:40]:<14} {owner or '-'}{kv_text}"
                     f"  at {site or '?'}")
    if fp.get("n", 0) > len(ops):
        lines.append(f"      ... {fp['n'] - len(ops)} more op(s)")
    return lines


# ----------------------------------------------------------------------------- comparison

def _majority(values: Mapping[int, Any]) -> tuple[Any, bool]:
    """The value most ranks hold, and whether it is a strict majority (ties: the lowest rank's)."""
    counts: dict[Any, int] = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    best = max(counts.values())
    leaders = [v for v, n in counts.items() if n == best]
    strict = len(leaders) == 1 and best * 2 > len(values)
    if len(leaders) == 1:
        return leaders[0], strict
    lowest = min(values)
    return values[lowest], False


def _first_diff(a: Sequence[Any], b: Sequence[Any]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x[0] != y[0] or x[1] != y[1] or x[2] != y[2] or x[4] != y[4]:
            return i
    return min(len(a), len(b))


def _owners(fp: Mapping[str, Any]) -> list[str]:
    return [str(o[2]) for o in fingerprint_ops(fp) if o[0] == "pop" or o[0] == "push"]


def _ops_hint(rank: int, peer: int, mine: Mapping[str, Any], theirs: Mapping[str, Any],
              step: int, strict: bool = True) -> str:
    a, b = _owners(mine), _owners(theirs)
    missing = [o for o in dict.fromkeys(b) if a.count(o) < b.count(o)]
    extra = [o for o in dict.fromkeys(a) if a.count(o) > b.count(o)]
    names = ", ".join(map(str, (missing or extra)[:3]))
    if (missing and not extra) or (extra and not missing):
        few, many = (rank, peer) if missing else (peer, rank)
        if not strict:
            return (f"rank {many} ran {names} more often than rank {few} at step {step}: rank "
                    f"{few} skipped it or rank {many} repeated or retried it (two ranks: no "
                    "majority to tell which). Layers that run on some TP ranks only also "
                    "desynchronise the collectives")
        if missing:
            return (f"rank {rank} skipped {names} at step {step}: rank {peer} ran it. A layer that "
                    "runs on some TP ranks only also desynchronises the collectives; check what "
                    "skips layers on that rank")
        how = "ran again" if mine.get("n", 0) > theirs.get("n", 0) else "ran"
        return (f"rank {rank} {how} {names} more often than rank {peer} at step {step} (a retried "
                "or repeated layer): its cache now holds entries its peers do not; make a retried "
                "step re-run on every rank or on none")
    if sorted(a) == sorted(b):
        return (f"rank {rank} ran its layers in another order than rank {peer} at step {step}; TP "
                "peers must run the same layers in the same order")
    return (f"ranks {rank} and {peer} made different cache ops at step {step}; compare the two "
            "op lists above")


def _divergence(rank: int, peer: int, fp: Mapping[str, Any], ref: Mapping[str, Any],
                field: str, strict: bool, queue_default: str = "state_ids") -> Violation:
    step = int(fp.get("s", -1))
    queue, consumer, producer = queue_default, None, None
    consumer_site = producer_site = None
    mark = None
    if field == "in":
        what = (f"rank {rank} fed other token ids into step {step} than rank {peer} (input "
                f"digest {fp.get('in')} vs {ref.get('in')})")
        who = (f"rank {rank} sampled a different token at step {step - 1}" if strict else
               f"ranks {rank} and {peer} continued with different tokens after step {step - 1} "
               "(one of them sampled a different token)")
        hint = (f"{who}: the input to step {step} differs. Pick the token on one rank and "
                "broadcast it (dist.broadcast), or seed every rank's sampler identically")
        queue = "<inputs>"
    elif field == "ids":
        what = (f"rank {rank} ran step {step} with state_ids {fp.get('ids')} where rank {peer} "
                f"ran {ref.get('ids')}")
        hint = (f"rank {rank} counts steps differently from rank {peer}: a step that was retried "
                "or restarted on one rank only (state_ids set again) shifts every later step. "
                "Retry a failed step on every rank or on none")
    elif field == "kv":
        what = (f"rank {rank}'s layers pushed kv length(s) {_kv_text(fp)} at step {step} where "
                f"rank {peer}'s pushed {_kv_text(ref)}")
        hint = (f"rank {rank}'s cache holds a different number of positions than rank {peer}'s: "
                "a token was missed or added on one rank (sizing or batch differs between ranks?)")
    else:   # the ordered ops of TP peers
        mine, theirs = fingerprint_ops(fp), fingerprint_ops(ref)
        i = _first_diff(mine, theirs)
        mark = i
        a = mine[i] if i < len(mine) else None
        b = theirs[i] if i < len(theirs) else None
        if a is not None:
            queue, consumer, consumer_site = str(a[1]), a[2], a[3]
        elif b is not None:
            queue = str(b[1])
        if b is not None:
            producer, producer_site = b[2], b[3]

        def show(o: Any) -> str:
            if o is None:
                return "nothing (its step ended)"
            kv = "" if o[4] is None else f" (kv {o[4]})"
            return f"{o[0]} {o[1]!r} by {o[2] or '<no module>'}{kv}"

        what = (f"rank {rank} and rank {peer} disagree at op {i + 1} of step {step}: rank {rank} "
                f"made {show(a)}, rank {peer} made {show(b)} (ops in the step: {fp.get('n')} vs "
                f"{ref.get('n')})")
        hint = _ops_hint(rank, peer, fp, ref, step, strict)
    if not strict:
        what += "; no majority among the ranks compared, so each side is reported"
    side = [f"Rank {rank}'s step {step} (state_ids {fp.get('ids')}, {fp.get('n')} cache ops, "
            f"inputs {fp.get('in') or '?'}):"]
    side += format_fingerprint(fp, mark) or ["      (no cache ops)"]
    side += ["", f"Rank {peer}'s step {step} (state_ids {ref.get('ids')}, {ref.get('n')} cache ops, "
                 f"inputs {ref.get('in') or '?'}):"]
    side += format_fingerprint(ref, mark) or ["      (no cache ops)"]
    return Violation(
        kind="rank_divergence", queue=queue, family=strip_ids(queue) or queue, step=step,
        consumer=consumer, producer=producer, consumer_site=consumer_site,
        producer_site=producer_site, hint=hint, detail=what, rank=rank, peer=peer,
        peer_side="\n".join(side))


def compare_step(fps_by_rank: Mapping[int, Mapping[str, Any]], *, tp: int,
                 pp: int = 1) -> list[Violation]:
    """Compare one step's fingerprints of the ranks in ``fps_by_rank`` (rank -> fingerprint);
    returns a ``rank_divergence`` for every rank outside the majority, at most one per rank
    (the first field that differs: inputs, state ids, kv lengths, then the TP peers' ops)."""
    out: list[Violation] = []
    blamed: set[int] = set()
    ranks = sorted(fps_by_rank)
    if len(ranks) < 2:
        return out
    # Every rank of the run: inputs (when all know them), state ids, kv lengths.
    for field in ("in", "ids", "kv"):
        values = {}
        for r in ranks:
            v = fps_by_rank[r].get(field)
            values[r] = tuple(v) if isinstance(v, list) else v
        if field == "in" and any(v is None for v in values.values()):
            continue
        if field == "kv" and any(not v for v in values.values()):
            values = {r: v for r, v in values.items() if v}   # stages without cache layers
            if len(values) < 2:
                continue
        _blame(values, fps_by_rank, field, blamed, out)
    # TP peers: the ordered ops.
    stages: dict[int, list[int]] = {}
    for r in ranks:
        stages.setdefault(r // tp, []).append(r)
    for members in stages.values():
        members = [r for r in members if r not in blamed]   # their difference is explained
        if len(members) < 2:
            continue
        _blame({r: fps_by_rank[r].get("d") for r in members}, fps_by_rank, "ops", blamed, out)
    return out


def _blame(values: Mapping[int, Any], fps_by_rank: Mapping[int, Mapping[str, Any]], field: str,
           blamed: set[int], out: list[Violation]) -> None:
    """A ``rank_divergence`` for each rank whose ``values`` entry is outside the majority (each
    rank, when there is none), compared with a rank of the majority; at most one per rank."""
    if len(set(values.values())) <= 1:
        return
    ref_value, strict = _majority(values)
    ref_rank = min(r for r, v in values.items() if v == ref_value)
    for r, v in values.items():
        if (v != ref_value or not strict) and r not in blamed:
            peer = ref_rank if r != ref_rank else min(x for x in values if values[x] != v)
            out.append(_divergence(r, peer, fps_by_rank[r], fps_by_rank[peer], field, strict))
            blamed.add(r)


# ----------------------------------------------------------------------------- the live checker

def _store_from_env(timeout: float) -> Any:
    import datetime

    import torch.distributed as dist
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise ValueError(
            "cachescope.distributed.attach() needs the process group's key-value store: set "
            "MASTER_ADDR/MASTER_PORT (torchrun and init_method='env://' do), or pass store= (the "
            "dist.Store your init_process_group used)")
    try:
        return dist.TCPStore(addr, int(port), is_master=False, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=timeout))
    except Exception as exc:
        raise ValueError(f"cachescope.distributed.attach(): cannot connect to the store at "
                         f"{addr}:{port} ({exc}); pass store= explicitly") from None


class RankCheck:
    """What ``attach`` returns: a sink on the rank's cache plus a watcher thread. See the module
    docstring; ``detach()`` stops both.

    The main thread's share (sink methods) is one ``ops_since`` read at the end of a checked step
    and its fingerprint (a dict of strings: one object for the cyclic GC); the watcher talks to
    the store in batches, a few round trips per ``poll`` seconds whatever the step rate:

    * one ``multi_set``: this rank's new fingerprints and its heartbeat (generation, step, op
      count, last op, the last step it published, whether it ended its generation);
    * one ``check`` + ``multi_get`` of every rank's heartbeat;
    * one ``multi_get`` of the fingerprints of the steps every rank has published.

    Fingerprints sit in a bounded ring of keys (``fp/{generation % 2}/{step % KEEP_STEPS}/{rank}``)
    and carry their own step, so a long run keeps the store's size flat.
    """

    def __init__(self, cache: Any, *, rank: int, world_size: int, tp: int, pp: int,
                 store: Any, stall_timeout: float, every: int,
                 on_stall: Callable[[Violation], Any] | None,
                 length: Callable[[Any], int | None], poll: float | None = None) -> None:
        import torch.distributed as dist
        self.rank, self.world_size, self.tp, self.pp = rank, world_size, tp, pp
        self.tp_rank, self.pp_rank = rank % tp, rank // tp
        self.stall_timeout = float(stall_timeout)
        self.every = int(every)
        self.on_stall = on_stall
        self._length = length
        self._cache_ref = weakref.ref(cache)
        self.cache_name = getattr(cache, "name", "default")
        self._state_key = str(getattr(cache, "state_key", "state_ids"))
        global _attaches
        n = _attaches
        _attaches += 1
        prefix = f"cachescope/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/a{n}/"
        #: The store for the caller's own bookkeeping (e.g. publishing results); the watcher
        #: thread uses its own connection when the store can clone one.
        self.store = dist.PrefixStore(prefix, store)
        try:
            wstore = store.clone()
        except Exception:
            wstore = store
        self._wstore = dist.PrefixStore(prefix, wstore)
        self._hb_keys = [f"hb/{r}" for r in range(world_size)]
        self.violations: list[Violation] = []
        self._lock = threading.Lock()
        self._outbox: collections.deque[dict[str, Any]] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._poll = poll if poll is not None else max(0.02, min(0.5, self.stall_timeout / 8))
        # main-thread state (written by the sink methods; read by the watcher)
        self.generation = 0
        self._step = -1
        self._progress: tuple[int, int, bool, str | None] = (0, -1, False, None)
        self._step_seq0 = 0
        self._sampled = False
        self._inputs: str | None = None
        # watcher state
        self._published = (0, -1)                        # (generation, step) last published
        self._pending: dict[tuple[int, int], float] = {}
        self._diverged: set[tuple[int, int]] = set()     # (generation, rank) already reported
        self._changed: dict[int, tuple[Any, float]] = {}  # rank -> (progress state, since)
        self._behind: dict[int, tuple[Any, float]] = {}   # rank -> (state, first seen behind)
        self._stalled: set[tuple[int, Any]] = set()
        self._stuck_reported: set[Any] = set()
        self._failed_once = False
        cache.add_sink(self)
        global _atexit_registered
        if not _atexit_registered:
            import atexit
            atexit.register(_stop_all_at_exit)
            _atexit_registered = True
        _live.add(self)
        self._thread = threading.Thread(target=self._run, name=f"cachescope-rankcheck-{rank}",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ sink (main thread)
    # The watcher reads this rank's progress as one tuple (generation, step, ended, error),
    # replaced whole by the main thread: never a torn (generation, step) pair.
    def on_generation_start(self, cache: Any, info: Any) -> None:
        self.generation += 1
        self._step = -1
        self._progress = (self.generation, -1, False, None)

    def on_generation_end(self, cache: Any, info: Any) -> None:
        err = info.get("error") if isinstance(info, dict) else None
        error = None if err is None else f"{type(err).__name__}: {str(err)[:200]}"
        self._progress = (self.generation, self._step, True, error)
        self._wake.set()

    def on_violation(self, cache: Any, violation: Violation) -> None:
        if violation.rank is None:
            violation.rank = self.rank      # the cache's own checks: they concern this rank

    def on_step_start(self, cache: Any, step: Any) -> None:
        index = step.index
        self._step = index
        self._step_seq0 = cache.seq - 1          # the boundary op (the state_ids set) included
        self._progress = (self.generation, index, False, None)
        self._sampled = index % self.every == 0
        self._inputs = None

    def note_inputs(self, ids: Iterable[int]) -> None:
        """The token ids fed to the current step (call after the step's ``state_ids`` set).
        Only a digest is kept and published."""
        if self._sampled:
            self._inputs = inputs_digest(ids)

    def on_step_end(self, cache: Any, step: Any) -> None:
        if not self._sampled or step.index != self._step:
            return
        self._sampled = False
        _first, records = cache.ops_since(self._step_seq0)
        lengths: list[int | None] | None = None
        pushed = [r.queue for r in records if r.op == "push"]
        if pushed:
            lengths = []
            taken: dict[str, int] = {}
            for q in pushed:
                taken[q] = taken.get(q, 0) + 1
            values: dict[str, list[Any]] = {}
            for q, n in taken.items():
                items = cache.get_quiet(q)
                values[q] = items[-n:] if type(items) is list and len(items) >= n else []
            pos = dict.fromkeys(taken, 0)
            length = self._length
            for q in pushed:
                items = values[q]
                i = pos[q]
                pos[q] = i + 1
                lengths.append(length(items[i]) if i < len(items) else None)
        fp = step_fingerprint(records, step=step.index, state_ids=(step.prev, step.next),
                              inputs_digest=self._inputs, kv_lengths=lengths,
                              state_key=self._state_key, rank=self.rank,
                              generation=self.generation)
        self._idle.clear()
        self._outbox.append(fp)

    # ------------------------------------------------------------------ public
    def flush(self, timeout: float = 5.0) -> bool:
        """Publish what is waiting and wait until every published step was compared with the
        peers' (or ``timeout`` passed); returns whether everything was compared."""
        deadline = time.monotonic() + timeout
        while True:
            self._wake.set()
            left = deadline - time.monotonic()
            if self._idle.wait(max(0.0, min(0.05, left))) and not self._outbox \
                    and not self._pending:
                return True
            if left <= 0:
                return not self._outbox and not self._pending

    def detach(self) -> None:
        """Stop the watcher and take the sink off the cache (idempotent)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(2.0, self._poll * 4))
        cache = self._cache_ref()
        if cache is not None:
            try:
                cache.remove_sink(self)
            except Exception:
                pass

    def __enter__(self) -> RankCheck:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def __repr__(self) -> str:
        return (f"RankCheck(rank={self.rank}, tp={self.tp}, pp={self.pp}, every={self.every}, "
                f"stall_timeout={self.stall_timeout}, violations={len(self.violations)})")

    # ------------------------------------------------------------------ watcher thread
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._poll)
            self._wake.clear()
            try:
                beats = self._exchange()
                if beats is not None:
                    self._compare(beats)
                    self._watch_progress(beats)
            except Exception:
                if not self._failed_once:
                    self._failed_once = True
                    log.warning("cachescope: the cross-rank checker on rank %d failed to reach the "
                                "store; it keeps trying (the decode loop is not affected)",
                                self.rank, exc_info=True)
            if not self._outbox and not self._pending:
                self._idle.set()

    @staticmethod
    def _fp_key(gen: int, step: int, rank: int) -> str:
        return f"fp/{gen % 2}/{step % KEEP_STEPS}/{rank}"

    def _exchange(self) -> dict[int, dict[str, Any] | None] | None:
        """Publish new fingerprints and this rank's heartbeat; read every rank's heartbeat."""
        keys: list[str] = []
        values: list[str] = []
        while self._outbox:
            fp = self._outbox.popleft()
            g, s = fp["g"], fp["s"]
            keys.append(self._fp_key(g, s, self.rank))
            values.append(json.dumps(fp, separators=(",", ":")))
            self._pending[(g, s)] = time.monotonic()
            self._published = (g, s)
        cache = self._cache_ref()
        seq, last = 0, None
        if cache is not None:
            seq = cache.seq
            try:
                _f, recs = cache.ops_since(seq - 1)
                if recs:
                    r = recs[-1]
                    last = [r.op, r.queue, r.owner, r.site, r.step]
            except Exception:
                last = None
        g, step, ended, error = self._progress
        hb = {"g": g, "s": step, "ended": ended, "err": error,
              "seq": seq, "last": last, "pub": list(self._published), "t": time.time()}
        keys.append(self._hb_keys[self.rank])
        values.append(json.dumps(hb, separators=(",", ":")))
        store = self._wstore
        store.multi_set(keys, values)
        if store.check(self._hb_keys):
            raw = store.multi_get(self._hb_keys)
            return {r: json.loads(bytes(b).decode("utf-8")) for r, b in enumerate(raw)}
        beats: dict[int, dict[str, Any] | None] = {}
        for r, key in enumerate(self._hb_keys):
            beats[r] = json.loads(bytes(store.get(key)).decode("utf-8")) \
                if store.check([key]) else None
        return beats

    def _compare(self, beats: dict[int, dict[str, Any] | None]) -> None:
        if not self._pending:
            return
        pubs = [tuple(b["pub"]) if b is not None else (0, -1) for b in beats.values()]
        ready = sorted(k for k in self._pending if all(p >= k for p in pubs))
        now = time.monotonic()
        for k, since in list(self._pending.items()):
            if k not in ready and now - since > max(self.stall_timeout * 2, 5.0):
                del self._pending[k]        # a peer never published it: the progress watch's
        if not ready:
            return
        store = self._wstore
        keys = [self._fp_key(g, s, r) for g, s in ready for r in range(self.world_size)]
        if not store.check(keys):
            return                          # a rank skipped a step it passed: wait or time out
        raw = store.multi_get(keys)
        n = self.world_size
        for i, (g, s) in enumerate(ready):
            del self._pending[(g, s)]
            fps = {}
            for r in range(n):
                fp = json.loads(bytes(raw[i * n + r]).decode("utf-8"))
                if fp.get("g") == g and fp.get("s") == s:
                    fps[r] = fp              # else the slot holds another step: not comparable
            if (g, self.rank) in self._diverged or len(fps) < 2:
                continue
            for v in compare_step(fps, tp=self.tp, pp=self.pp):
                if v.rank != self.rank:
                    continue
                self._diverged.add((g, self.rank))
                v.detail = f"generation {g}: {v.detail}"
                self._record(v)

    def _watch_progress(self, beats: dict[int, dict[str, Any] | None]) -> None:
        now = time.monotonic()
        states = {}
        for r, b in beats.items():
            state = (b["g"], b["s"], bool(b.get("ended")), b.get("seq")) if b is not None else None
            states[r] = state
            seen = self._changed.get(r)
            if seen is None or seen[0] != state:
                self._changed[r] = (state, now)
        running = [(st[0], st[1]) for st in states.values() if st is not None and not st[2]]
        if not running:
            return                      # nobody waits for anybody
        lead = max(running)
        behind_any = False
        for r, b in beats.items():
            st = states[r]
            pos = (st[0], st[1]) if st is not None else (0, -1)
            ended = st is not None and st[2]
            if ended and pos[0] == lead[0]:
                # Ended this generation while peers still run it: they will wait for it in
                # their next collective. At once when they are past its last step.
                waiting = [p for p in running if p[0] == pos[0]]
                if not waiting:
                    continue
                past = max(waiting) > pos
            elif pos < lead and lead[1] >= 0:
                past = False
            else:
                self._behind.pop(r, None)
                continue
            behind_any = True
            # Timed from when this rank was first seen behind in this state (not from its last
            # change: ranks idle together, then one moves on first).
            seen = self._behind.get(r)
            if seen is None or seen[0] != st:
                self._behind[r] = seen = (st, now)
            since = seen[1]
            # Before its first step a rank may still be loading its shard: set-up times differ
            # more than step times do, so it gets longer before it counts as stalled.
            limit = self.stall_timeout if pos[1] >= 0 or pos[0] > 1 else \
                max(3 * self.stall_timeout, STARTUP_GRACE)
            if not past and now - since < limit:
                continue
            key = (r, st)
            if key in self._stalled:
                continue
            self._stalled.add(key)
            self._record(self._stall_violation(r, b, pos, lead, ended, past, now - since),
                         stall=True)
        if not behind_any and lead[1] >= 0:
            self._watch_stuck(beats, states, lead, now)

    def _watch_stuck(self, beats: dict[int, dict[str, Any] | None], states: dict[int, Any],
                     lead: tuple[int, int], now: float) -> None:
        """Every rank in the same step, none has made a cache op for ``stall_timeout``: they are
        blocked together (a collective that does not match across ranks). Compare what each
        did in the unfinished step."""
        if any(st is None or st[2] or (st[0], st[1]) != lead for st in states.values()):
            return
        quiet = min(now - self._changed[r][1] for r in states)
        if quiet < self.stall_timeout:
            return
        episode = tuple(sorted(states.items()))
        if episode in self._stuck_reported:
            return
        store = self._wstore
        mine = states[self.rank]
        part_key = f"part/{self.rank}"
        cache = self._cache_ref()
        if cache is None:
            return
        _f, records = cache.ops_since(self._step_seq0)
        fp = step_fingerprint(records, step=lead[1], state_ids=None, rank=self.rank,
                              generation=lead[0])
        fp["seq"] = mine[3]
        store.set(part_key, json.dumps(fp, separators=(",", ":")))
        keys = [f"part/{r}" for r in range(self.world_size)]
        if not store.check(keys):
            return
        parts = {r: json.loads(bytes(b).decode("utf-8")) for r, b in enumerate(store.multi_get(keys))}
        if any(parts[r].get("seq") != states[r][3] or parts[r].get("s") != lead[1] for r in parts):
            return                      # a peer's part is from another episode: next poll
        self._stuck_reported.add(episode)
        for p in parts.values():
            p["ids"] = "?"              # the boundary's value is not in a partial step
        for v in compare_step(parts, tp=self.tp, pp=self.pp):
            if v.rank == self.rank and (lead[0], self.rank) not in self._diverged:
                self._diverged.add((lead[0], self.rank))
                v.detail = (f"generation {lead[0]}: step {lead[1]} never completed (every rank "
                            f"is blocked in it): {v.detail}")
                self._record(v)
        last = (beats.get(self.rank) or {}).get("last")
        where = f"; its last cache op: {last[0]} {last[1]!r} by {last[2]}" if last else ""
        self._record(Violation(
            kind="rank_stalled", queue=str(last[1]) if last else "<progress>",
            family=strip_ids(str(last[1])) if last else "<progress>", step=lead[1],
            consumer=last[2] if last else None, producer=None,
            consumer_site=last[3] if last else None,
            detail=(f"no rank made a cache op for {quiet:.1f} s: all {self.world_size} ranks are "
                    f"blocked in step {lead[1]} of generation {lead[0]} (rank {self.rank}{where})"),
            hint=("the ranks wait in collectives that do not match: one rank ran a different "
                  "number of layers or collectives in this step (see rank_divergence, if "
                  "reported), or a collective outside the cache is stuck"),
            rank=self.rank), stall=True)

    def _stall_violation(self, r: int, b: dict[str, Any] | None, pos: tuple[int, int],
                         lead: tuple[int, int], ended_early: bool, past: bool,
                         waited: float) -> Violation:
        g, s = pos
        step = s + 1 if g == lead[0] else 0
        last = (b or {}).get("last")
        if b is None:
            what = (f"rank {r} has not reached step {lead[1]} of generation {lead[0]} (its peers "
                    f"are there): no progress from it at all for {waited:.1f} s (not started, "
                    "crashed before attaching, or not attached)")
        elif ended_early:
            err = f" with {b['err']}" if b.get("err") else ""
            where = (f"while its peers reached step {lead[1]}" if past else
                     f"while its peers still run step {lead[1]} ({waited:.1f} s later)")
            what = (f"rank {r} ended generation {g}{err} after step {s} {where}: they wait for it "
                    "in a collective that will never complete")
        else:
            what = (f"rank {r} has not reached step {step} of generation {lead[0]} for "
                    f"{waited:.1f} s while its peers are at step {lead[1]}")
        side = ""
        if last:
            op, queue, owner, site, lstep = (list(last) + [None] * 5)[:5]
            side = (f"Rank {r}'s last cache op: {op} {queue!r} by {owner or '<no module>'} at "
                    f"step {lstep}\n  at {site or '<unknown site>'}")
        hint = ((f"rank {r}'s decode loop failed ({b['err']}); its peers cannot finish without it: "
                 "see its own violations and errors" if b and b.get("err") else
                 f"rank {r} finished early: every rank must run the same number of steps (stop on "
                 "an agreed condition, e.g. broadcast the stop flag; HF's synced_gpus)")
                if ended_early else
                f"rank {r} is stuck before step {step} (a slow or hung rank, a data-dependent "
                "branch that skips a collective, or a crash); its peers are blocked in a "
                f"collective waiting for it. Reported by rank {self.rank} after "
                f"{waited:.1f} s (stall_timeout={self.stall_timeout:g})")
        queue, consumer, site = (str(last[1]), last[2], last[3]) if last else ("<progress>", None, None)
        return Violation(
            kind="rank_stalled", queue=queue, family=strip_ids(queue) or queue, step=step,
            consumer=consumer, producer=None, consumer_site=site, hint=hint,
            detail=f"{what} (seen by rank {self.rank})", rank=r, peer=self.rank,
            peer_side=side)

    def _record(self, v: Violation, stall: bool = False) -> None:
        v.cache = self.cache_name
        with self._lock:
            self.violations.append(v)
        cache = self._cache_ref()
        if cache is not None:
            try:
                cache.add_violation(v)
            except Exception:
                log.warning("cachescope: could not record a cross-rank violation", exc_info=True)
        log.warning("cachescope: %s", v.summary())
        if stall and self.on_stall is not None:
            try:
                self.on_stall(v)
            except Exception:
                log.warning("cachescope: on_stall callback failed", exc_info=True)


def attach(cache: Any = None, group: Any = None, *, stall_timeout: float = 10.0, every: int = 1,
           tp: int | None = None, pp: int = 1, store: Any = None,
           on_stall: Callable[[Violation], Any] | None = None,
           length: Callable[[Any], int | None] = kv_length) -> RankCheck:
    """Check this rank's decode against its peers'. Call on every rank after
    ``init_process_group`` (the same calls in the same order on every rank).

    cache: the rank's ``InstrumentedCache`` (default: the installed one).
    group: the process group whose ranks decode one sequence (default: the world).
    stall_timeout: seconds a rank may stay behind its peers before ``rank_stalled``.
    every: compare one step in ``every`` (progress is watched on every step).
    tp, pp: the layout (default: every rank is a TP peer of every other, ``pp=1``);
      ``tp * pp`` must be the group's size; ``rank = pp_rank * tp + tp_rank``.
    store: the ``dist.Store`` to publish to (default: a new connection to the one torchrun /
      ``env://`` made, at MASTER_ADDR:MASTER_PORT).
    on_stall: called (on the watcher thread) with each ``rank_stalled`` violation, e.g. to end
      a run whose main thread is blocked in a collective.
    length: kv length of a queued item (default ``kv_length``: ``shape[-2]``).
    """
    import torch.distributed as dist
    if cache is None:
        from ._install import installed
        cache = installed()
        if cache is None:
            raise ValueError("cachescope.distributed.attach(): no cache given and none installed; "
                             "call cachescope.install() first or pass cache=")
    if not hasattr(cache, "add_violation") or not hasattr(cache, "ops_since"):
        raise TypeError(f"attach() needs a cachescope InstrumentedCache, got {type(cache).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("cachescope.distributed.attach() needs an initialised process group: "
                         "call torch.distributed.init_process_group(...) first")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an int >= 1 (check one step in every), got {every!r}")
    if not (isinstance(stall_timeout, (int, float)) and stall_timeout > 0):
        raise ValueError(f"stall_timeout must be a positive number of seconds, got {stall_timeout!r}")
    rank = dist.get_rank(group)
    size = dist.get_world_size(group)
    tp = size // pp if tp is None else tp
    if tp < 1 or pp < 1 or tp * pp != size:
        raise ValueError(f"tp * pp must equal the group's size: tp={tp} x pp={pp} = {tp * pp}, "
                         f"but the group has {size} rank(s); pass tp= and pp= of your layout")
    if store is None:
        store = _store_from_env(timeout=max(30.0, 3 * float(stall_timeout)))
    return RankCheck(cache, rank=rank, world_size=size, tp=tp, pp=pp, store=store,
                     stall_timeout=stall_timeout, every=every, on_stall=on_stall, length=length)
