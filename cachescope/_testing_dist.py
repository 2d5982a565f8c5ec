"""``cachescope.testing.run_ranks``: run a function on N real ranks (gloo on 127.0.0.1), each with
an isolated cache and the cross-rank checker, and assert on what the ranks recorded.

    from cachescope.testing import run_ranks

    def decode(ctx):                  # module-level: each rank is a new process that imports it
        ...                           # ctx.rank, ctx.tp_rank, ctx.cache, ctx.check, ctx.watch(model)
        return tokens

    results = run_ranks(decode, nproc=3)
    results.assert_no_violations()

The ranks are started by torch's elastic launcher (``torch.distributed.launcher.api.elastic_launch``,
the launcher ``torchrun`` runs): one spawned process per rank, rendezvous on 127.0.0.1 with a
port the system picks. In each rank: ``init_process_group("gloo")``, a ``CacheProbe`` installed
as the singleton (private metrics registry, no server), ``cachescope.distributed.attach`` with the
layout, then ``fn(ctx, *args)``, ``check.flush()``. What each rank recorded comes back to the
parent through files in a temporary directory (results as pickles, violations as they happen as
JSON lines, so a run that has to be killed still tells what its ranks saw).

A rank that raises stops the run (the launcher stops the other ranks) and ``run_ranks`` raises
``RankFailed`` with its traceback. Ranks that have not returned ``timeout`` seconds after they
all started ``fn`` (or have not all started it within ``startup_timeout``) are killed and
``run_ranks`` raises ``RanksTimedOut``, naming the ranks that had not returned, the last step
each one started and the checker's ``rank_stalled`` reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["run_ranks", "RankContext", "RankResults", "RankViolation", "RankFailed",
           "RanksTimedOut"]

_FULL_REPORTS = 5
_STDERR_TAIL = 30           # lines of a failed rank's stderr in the message, when it left no traceback
_SUMMARY_LINES = 10
_KILL_POLL_S = 0.2
_SHUTDOWN_S = 3             # the launcher's grace before SIGKILL when it stops the other ranks


# --------------------------------------------------------------------------- what a rank gets
@dataclasses.dataclass(frozen=True)
class RankContext:
    """What ``fn`` gets as its first argument on each rank."""

    rank: int                 # global rank, 0 .. world_size - 1
    world_size: int
    tp: int                   # ranks per pipeline stage
    pp: int                   # pipeline stages
    tp_rank: int              # rank % tp
    pp_rank: int              # rank // tp
    probe: Any                # the rank's cachescope.testing.CacheProbe (installed as the singleton)
    check: Any                # the rank's cachescope.distributed.RankCheck

    @property
    def cache(self) -> Any:
        """The rank's ``InstrumentedCache`` (also ``cachescope.get_cache()`` on this rank)."""
        return self.probe.cache

    def watch(self, model: Any, *, prefix: str = "") -> Any:
        """``cachescope.watch(model, ctx.cache, prefix=prefix)``: owners are named after the model's
        modules; the hooks are removed when ``fn`` returns."""
        return self.probe.watch(model, prefix=prefix)


# --------------------------------------------------------------------------- what comes back
@dataclasses.dataclass(eq=False)
class RankViolation:
    """A violation a rank recorded, as it came back to the parent process (``kind``, ``rank``,
    ``step``, ... as on ``cachescope.Violation``; ``report()`` and ``summary()`` give the texts
    the rank formatted; ``data`` holds every field of ``Violation.to_dict()``)."""

    kind: str
    rank: int | None          # the rank it concerns
    step: int
    queue: str
    family: str
    consumer: str | None
    producer: str | None
    peer: int | None          # the rank it was compared with (cross-rank kinds)
    hint: str | None
    detail: str | None
    cache: str                # name of the cache that recorded it
    reported_by: tuple[int, ...]   # the ranks that recorded it (a rank_stalled: every observer)
    data: dict[str, Any] = dataclasses.field(repr=False)
    text: str = dataclasses.field(repr=False, default="")
    line: str = dataclasses.field(repr=False, default="")

    @classmethod
    def _from_dict(cls, d: dict[str, Any], recorded_by: int) -> RankViolation:
        rank = d.get("rank")
        return cls(kind=str(d.get("kind")), rank=recorded_by if rank is None else int(rank),
                   step=int(d.get("step", -1)), queue=str(d.get("queue")),
                   family=str(d.get("family")), consumer=d.get("consumer"),
                   producer=d.get("producer"), peer=d.get("peer"), hint=d.get("hint"),
                   detail=d.get("detail"), cache=str(d.get("cache")), reported_by=(recorded_by,),
                   data=d, text=str(d.get("report", "")), line=str(d.get("summary", "")))

    def report(self) -> str:
        """The full report, as the rank that recorded it formatted it."""
        return self.text

    def summary(self) -> str:
        """One line: kind, queue, step, who."""
        return self.line

    def __str__(self) -> str:
        return self.line


class RankFailed(AssertionError):
    """A rank raised or died, so the run did not complete. ``failures``: rank -> traceback text
    (or how the process ended); ``results``: what the ranks recorded up to the end."""

    def __init__(self, message: str, failures: dict[int, str], results: RankResults) -> None:
        super().__init__(message)
        self.failures = failures
        self.results = results


class RanksTimedOut(RankFailed):
    """The run was not over in time and was killed. ``pending``: the ranks that had not returned;
    ``steps``: rank -> the last step it started (None: none); ``phase``: ``"fn"`` (``timeout``)
    or ``"startup"`` (``startup_timeout``: not every rank reached ``fn``)."""

    def __init__(self, message: str, failures: dict[int, str], results: RankResults,
                 pending: list[int], steps: dict[int, int | None], phase: str) -> None:
        super().__init__(message, failures, results)
        self.pending = pending
        self.steps = steps
        self.phase = phase


class RankResults:
    """What ``run_ranks`` brings back from the ranks.

    ``returns[r]``: what ``fn`` returned on rank r; ``by_rank[r]``: the violations rank r's cache
    recorded (its own checks and the cross-rank checker's); ``violations``: all of them, merged
    (a ``rank_stalled`` that several ranks observed counts once, with every observer in
    ``reported_by``); ``output[r]``: rank r's stdout and stderr.
    """

    def __init__(self, *, nproc: int, tp: int, pp: int, returns: list[Any],
                 by_rank: dict[int, list[RankViolation]], violations: list[RankViolation],
                 dropped: int, output: dict[int, str], steps: dict[int, int | None],
                 seconds: float) -> None:
        self.nproc, self.tp, self.pp = nproc, tp, pp
        self.returns = returns
        self.by_rank = by_rank
        self.violations = violations
        self.dropped = dropped            # violations the ranks' caches counted but did not keep
        self.output = output
        self.steps = steps                # rank -> last step started (None: none)
        self.seconds = seconds
        self._expected: dict[int, RankViolation] = {}

    def __repr__(self) -> str:
        return (f"<RankResults {self.nproc} rank(s) tp={self.tp} pp={self.pp}: "
                f"{len(self.violations)} violation(s), {self.seconds:.1f} s>")

    @property
    def unexpected_violations(self) -> list[RankViolation]:
        """Violations that no ``assert_violation`` matched."""
        return [v for v in self.violations if id(v) not in self._expected]

    def assert_no_violations(self, *, max_reports: int = _FULL_REPORTS) -> None:
        """No rank recorded a violation (other than those ``assert_violation`` matched)."""
        from .testing import _kinds, format_violations
        found = self.unexpected_violations
        if not found and not self.dropped:
            return
        head = (f"the {self.nproc} rank(s) recorded {len(found)} violation(s) ({_kinds(found)})"
                if found else f"the {self.nproc} rank(s) recorded violations")
        if self.dropped:
            head += f", and {self.dropped} more not kept (max_violations)"
        raise AssertionError(
            f"{head}; expected none. {_meaning(found)} The first report below says which rank, "
            "at which step, and what its peers did.\n\n" + format_violations(found, max_reports))

    def assert_violation(self, kind: str, *, rank: int | None = None,
                         step: int | None = None) -> list[RankViolation]:
        """At least one violation of ``kind`` concerning ``rank`` (any rank when None) at
        ``step`` (any step when None) was recorded; returns them. They count as expected from
        then on: ``assert_no_violations`` and the pytest plugin's strict mode ignore them."""
        from ._records import KINDS
        from . import testing
        if kind not in KINDS:
            raise ValueError(f"unknown violation kind {kind!r}; kinds are {', '.join(KINDS)}")
        matched = [v for v in self.violations if v.kind == kind
                   and (rank is None or v.rank == rank) and (step is None or v.step == step)]
        if not matched:
            want = kind + (f" on rank {rank}" if rank is not None else "") + (
                f" at step {step}" if step is not None else "")
            got = ("; ".join(f"{v.kind} on rank {v.rank} at step {v.step}"
                             for v in self.violations[:_SUMMARY_LINES]) or "none")
            raise AssertionError(
                f"expected a {want}, but the {self.nproc} rank(s) recorded: {got}. The ranks did "
                "not break the way the test expects (check the rank and step: a token picked at "
                "step S shows up as other inputs at step S+1), or the loop does not reach the "
                "checker (the rank's cache is ctx.cache; ctx.check.note_inputs(ids) each step).")
        for v in matched:
            self._expected[id(v)] = v
        for tracker in testing._trackers:
            tracker.expect(matched)
        return matched


def _meaning(violations: Sequence[Any]) -> str:
    kinds = {v.kind for v in violations}
    parts = []
    if "rank_divergence" in kinds:
        parts.append("A rank_divergence means ranks that decode one sequence disagreed at a step "
                     "(input tokens, state_ids, kv lengths, or the cache ops of TP peers).")
    if "rank_stalled" in kinds:
        parts.append("A rank_stalled means a rank fell behind its peers or ended early while "
                     "they waited for it.")
    if kinds - {"rank_divergence", "rank_stalled"}:
        parts.append("A pop-order violation on a rank means a layer read another layer's "
                     "keys/values (or found nothing to read).")
    return " ".join(parts)


# --------------------------------------------------------------------------- the job a rank runs
@dataclasses.dataclass(frozen=True)
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    run_dir: str
    tp: int
    pp: int
    stall_timeout: float
    every: int
    timeout: float
    cache_options: dict[str, Any]


def _violation_dict(v: Any, rank: int) -> dict[str, Any]:
    d = v.to_dict()
    if d.get("rank") is None:
        d["rank"] = rank
    d["peer_side"] = getattr(v, "peer_side", None)
    try:
        d["report"], d["summary"] = v.report(), v.summary()
    except Exception as exc:   # a report must never cost the rank its result
        d["report"] = d["summary"] = f"{d.get('kind')} (report failed: {exc!r})"
    return d


class _RankFiles:
    """A sink on a rank's cache: appends each violation to ``rank{r}.violations.jsonl`` as it is
    recorded (also from the checker's thread) and keeps the last started step in ``rank{r}.step``,
    so the parent can tell what a rank saw even when it has to kill it."""

    def __init__(self, run_dir: str, rank: int) -> None:
        self.rank = rank
        self._lock = threading.Lock()
        base = Path(run_dir)
        self._violations = open(base / f"rank{rank}.violations.jsonl", "a", encoding="utf-8")
        self._step_fd = os.open(base / f"rank{rank}.step", os.O_WRONLY | os.O_CREAT, 0o600)
        self._generation = 0

    def on_violation(self, cache: Any, violation: Any) -> None:
        line = json.dumps(_violation_dict(violation, self.rank), default=repr)
        with self._lock:
            self._violations.write(line + "\n")
            self._violations.flush()

    def on_generation_start(self, cache: Any, info: Any) -> None:
        self._generation += 1

    def on_step_start(self, cache: Any, step: Any) -> None:
        os.pwrite(self._step_fd, f"{self._generation} {step.index}".ljust(40).encode(), 0)

    def close(self) -> None:
        with self._lock:
            self._violations.close()
        os.close(self._step_fd)


def _write_result(run_dir: str, rank: int, result: dict[str, Any]) -> None:
    path = Path(run_dir) / f"rank{rank}.result"
    try:
        data = pickle.dumps(result)
    except Exception as exc:
        value = result.pop("value", None)
        result.update(
            status="error", failed_at=time.time(),
            what=f"returned an object that cannot be pickled ({type(value).__name__})",
            error=(f"fn returned an object that cannot be pickled ({type(exc).__name__}: {exc}): "
                   f"{type(value).__name__}. run_ranks() sends each rank's return value back to "
                   "the parent process: return plain data (lists, dicts, numbers, tensors)."))
        data = pickle.dumps(result)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load_job(run_dir: str, rank: int, job_bytes: bytes) -> _Job:
    try:
        return pickle.loads(job_bytes)
    except BaseException as exc:
        _write_result(run_dir, rank, {
            "rank": rank, "status": "error", "failed_at": time.time(),
            "what": f"could not load fn ({type(exc).__name__}: {exc})",
            "error": traceback.format_exc() + (
                "\nThe rank is a new process that imports fn's module by name (with the "
                "parent's sys.path). A module the parent built at run time, or a test module "
                "pytest imported under a name other processes cannot import "
                "(--import-mode=importlib), is not found there: put fn in an importable "
                "module.")})
        raise


def _rank_main(run_dir: str, job_bytes: bytes) -> None:
    """Entry point of one rank (in a process the launcher spawned; RANK etc. in the environment)."""
    import datetime

    import torch
    import torch.distributed as dist

    from . import distributed
    from .testing import CacheProbe

    with contextlib.suppress(Exception):
        sys.stdout.reconfigure(line_buffering=True)   # type: ignore[union-attr]
    rank = int(os.environ["RANK"])
    job = _load_job(run_dir, rank, job_bytes)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)      # ranks share the host's cores (torchrun does the same)
    started = time.monotonic()
    files = _RankFiles(job.run_dir, rank)
    probe = check = None
    result: dict[str, Any] = {"rank": rank}
    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=job.timeout))
        options = dict(job.cache_options)
        name = options.pop("name", None)
        options["name"] = f"{name}-rank{rank}" if name else f"rank{rank}"
        options.setdefault("tracing", False)
        probe = CacheProbe(**options)
        probe.install()
        check = distributed.attach(probe.cache, tp=job.tp, pp=job.pp,
                                   stall_timeout=job.stall_timeout, every=job.every)
        probe.cache.add_sink(files)   # after attach: the checker stamps the rank first
        ctx = RankContext(rank=rank, world_size=dist.get_world_size(), tp=job.tp, pp=job.pp,
                          tp_rank=check.tp_rank, pp_rank=check.pp_rank, probe=probe, check=check)
        dist.barrier()                # fn starts together on every rank (spawn skew is no stall)
        Path(job.run_dir, f"rank{rank}.started").touch()   # the parent's timeout starts
        value = job.fn(ctx, *job.args)
        check.flush(timeout=job.stall_timeout + 5.0)
        result.update(status="ok", value=value)
    except BaseException as exc:
        tb = exc.__traceback__
        text = "".join(traceback.format_exception(type(exc), exc, tb.tb_next if tb else None))
        result.update(status="error", error=text, failed_at=time.time(),   # from fn's frame on
                      what=f"raised {type(exc).__name__}: {exc}")
        raise      # the launcher sees the failure and stops the other ranks
    finally:
        cache = probe.cache if probe is not None else None
        result["violations"] = ([_violation_dict(v, rank) for v in cache.violations]
                                if cache is not None else [])
        result["dropped"] = cache.stats.violations_dropped if cache is not None else 0
        result["seconds"] = time.monotonic() - started
        _write_result(job.run_dir, rank, result)
        with contextlib.suppress(Exception):
            if check is not None:
                check.detach()
            if probe is not None:
                probe.cache.remove_sink(files)
                probe.close()
            files.close()
            if result.get("status") == "ok" and dist.is_initialized():
                dist.destroy_process_group()


# --------------------------------------------------------------------------- the parent side
def run_ranks(fn: Callable[..., Any], nproc: int = 2, *, args: Sequence[Any] = (),
              timeout: float = 60.0, stall_timeout: float = 5.0, tp: int | None = None,
              pp: int = 1, every: int = 1, cache_options: dict[str, Any] | None = None,
              startup_timeout: float = 120.0, echo: bool = True) -> RankResults:
    """Run ``fn(ctx, *args)`` on ``nproc`` gloo ranks on 127.0.0.1 and return what they recorded.

    fn: a module-level function of an importable module (each rank is a new process that imports
      it by name); ``ctx`` is a ``RankContext``. Its return value must be picklable.
    timeout: seconds ``fn`` may run, counted from the moment every rank has started it (the ranks
      start it together, after a barrier); then every rank is killed and ``RanksTimedOut``
      raised. startup_timeout: the same for the start-up before (spawn, imports, rendezvous,
      ``init_process_group``, ``attach``), which takes seconds: each rank imports torch.
    stall_timeout, every, tp, pp: ``cachescope.distributed.attach`` options (``tp * pp == nproc``;
      ``rank = pp_rank * tp + tp_rank``).
    cache_options: ``InstrumentedCache`` options of each rank's cache (``name`` becomes
      ``{name}-rank{r}``; default names ``rank{r}``).
    echo: write each rank's output (stdout, then stderr) to this process's stdout afterwards,
      lines prefixed ``[rank{r}]``.

    Raises ``RankFailed`` when a rank raised or died, ``RanksTimedOut`` after ``timeout``.
    """
    nproc, tp, pp = _check_layout(nproc, tp, pp)
    for name, value in (("timeout", timeout), ("startup_timeout", startup_timeout)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if not (isinstance(stall_timeout, (int, float)) and stall_timeout > 0):
        raise ValueError(f"stall_timeout must be a positive number of seconds, got {stall_timeout!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an int >= 1 (check one step in every), got {every!r}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cachescope-ranks-") as run_dir:
        job = _Job(fn=fn, args=tuple(args), run_dir=run_dir, tp=tp, pp=pp,
                   stall_timeout=float(stall_timeout), every=every,
                   timeout=float(timeout) + float(startup_timeout),
                   cache_options=dict(cache_options or {}))
        job_bytes = _pickle_job(job)
        failure, timed_out = _launch(job_bytes, nproc, run_dir, float(timeout),
                                     float(startup_timeout))
        ranks = {r: _read_rank(run_dir, r) for r in range(nproc)}
        output = {r: _read_output(os.path.join(run_dir, "logs"), r) for r in range(nproc)}
    results = _results(ranks, output, nproc=nproc, tp=tp, pp=pp,
                       seconds=time.monotonic() - started)
    if echo:
        _echo(output)
    if timed_out:
        raise _timed_out(results, ranks, timed_out, timeout, startup_timeout, stall_timeout)
    failed = {r: info for r, info in ranks.items() if info.get("status") != "ok"}
    if failure is not None or failed:
        raise _failed(results, ranks, failure)
    from . import testing
    testing._results_created(results)
    return results


def _check_layout(nproc: Any, tp: Any, pp: Any) -> tuple[int, int, int]:
    for name, value in (("nproc", nproc), ("pp", pp)) + ((("tp", tp),) if tp is not None else ()):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if nproc % pp:
        raise ValueError(f"pp={pp} pipeline stages do not divide nproc={nproc} ranks; pass "
                         "nproc = tp * pp")
    tp = nproc // pp if tp is None else tp
    if tp * pp != nproc:
        raise ValueError(f"tp * pp must equal nproc: tp={tp} x pp={pp} = {tp * pp}, but "
                         f"nproc={nproc}; pass the layout of your ranks")
    return nproc, tp, pp


def _pickle_job(job: _Job) -> bytes:
    fn = job.fn
    if not callable(fn):
        raise TypeError(f"run_ranks() needs a function to run on each rank, got {type(fn).__name__}")
    try:
        pickle.dumps(fn)
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise TypeError(
            f"run_ranks() cannot send {name!r} to the ranks ({type(exc).__name__}: {exc}): each "
            "rank is a new process that imports fn by name, so fn must be a module-level function "
            "of an importable module (a test module is fine), not a lambda, a nested function or "
            "a method of a local class.") from None
    try:
        return pickle.dumps(job)
    except Exception as exc:
        raise TypeError(
            f"run_ranks() cannot send args or cache_options to the ranks ({type(exc).__name__}: "
            f"{exc}): they are pickled for the new processes; pass plain data (numbers, strings, "
            "lists, dicts, tensors) and build models or caches inside fn.") from None


@contextlib.contextmanager
def _host_state() -> Iterator[None]:
    """The launcher sets signal handlers (in the main thread) and one environment variable in the
    calling process; put them back afterwards."""
    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    sigs = [getattr(signal, n) for n in names if hasattr(signal, n)]
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in sigs} if main else {}
    env_key = "TORCHELASTIC_SIGNALS_TO_HANDLE"
    env = os.environ.get(env_key)
    try:
        yield
    finally:
        for s, handler in saved.items():
            if handler is not None:
                with contextlib.suppress(Exception):
                    signal.signal(s, handler)
        if env is None:
            os.environ.pop(env_key, None)
        else:
            os.environ[env_key] = env


def _launch(job_bytes: bytes, nproc: int, run_dir: str, timeout: float,
            startup_timeout: float) -> tuple[Any, str | None]:
    """Run the ranks under torch's elastic launcher; kill them all when they are not all in fn
    after ``startup_timeout`` or still there ``timeout`` after that. Returns (the launcher's
    ChildFailedError or None, the phase that timed out: None, "startup" or "fn")."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"cachescope-{uuid.uuid4().hex}",
        rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", local_addr="127.0.0.1",
        rdzv_configs={"timeout": max(1, int(startup_timeout))}, max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn", shutdown_timeout=_SHUTDOWN_S,
        logs_specs=DefaultLogsSpecs(log_dir=os.path.join(run_dir, "logs"), redirects=Std.ALL))
    before = {p.pid for p in multiprocessing.active_children()}
    done = threading.Event()
    timed_out: list[str] = []
    started = [Path(run_dir, f"rank{r}.started") for r in range(nproc)]

    def watchdog() -> None:
        deadline = time.monotonic() + startup_timeout
        phase = "startup"
        while not done.wait(_KILL_POLL_S):
            if phase == "startup" and all(p.exists() for p in started):
                phase, deadline = "fn", time.monotonic() + timeout
            if time.monotonic() > deadline:
                break
        else:
            return
        timed_out.append(phase)
        while not done.is_set():      # the ranks (spawned by the launcher, our children)
            for p in multiprocessing.active_children():
                if p.pid not in before:
                    with contextlib.suppress(Exception):
                        p.kill()
            done.wait(_KILL_POLL_S)

    thread = threading.Thread(target=watchdog, name="cachescope-run-ranks-timeout", daemon=True)
    failure = signal_received = None
    with _host_state():
        thread.start()
        try:
            elastic_launch(config, _rank_main)(run_dir, job_bytes)
        except ChildFailedError as exc:
            failure = exc
        except SignalException as exc:     # the launcher stopped the ranks; pass the signal on
            signal_received = exc.sigval
        finally:
            done.set()
            thread.join()
    if failure is None and signal_received is not None:
        signal.raise_signal(signal_received)
        raise RuntimeError(f"run_ranks() was stopped by {signal_received.name}")
    return failure, (timed_out[0] if timed_out else None)


def _read_rank(run_dir: str, rank: int) -> dict[str, Any]:
    base = Path(run_dir)
    info: dict[str, Any] = {"rank": rank, "status": "missing"}
    path = base / f"rank{rank}.result"
    if path.exists():
        with contextlib.suppress(Exception):
            info = pickle.loads(path.read_bytes())
    if "violations" not in info:      # killed before its result: what it recorded meanwhile
        violations = []
        path = base / f"rank{rank}.violations.jsonl"
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    violations.append(json.loads(line))
        info["violations"] = violations
    info["started"] = (base / f"rank{rank}.started").exists()
    step_text = ""
    with contextlib.suppress(OSError):
        step_text = (base / f"rank{rank}.step").read_text().strip()
    info["step"] = int(step_text.split()[1]) if len(step_text.split()) == 2 else None
    return info


def _read_output(log_dir: str, rank: int) -> str:
    parts = []
    for stream in ("stdout", "stderr"):
        for path in sorted(Path(log_dir).glob(f"*/attempt_*/{rank}/{stream}.log")):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "".join(parts)


def _echo(output: dict[int, str]) -> None:
    for rank, text in output.items():
        lines = text.splitlines()
        if lines:
            sys.stdout.write("".join(f"[rank{rank}] {line}\n" for line in lines))
    sys.stdout.flush()


def _results(ranks: dict[int, dict[str, Any]], output: dict[int, str], *, nproc: int, tp: int,
             pp: int, seconds: float) -> RankResults:
    by_rank: dict[int, list[RankViolation]] = {}
    merged: list[RankViolation] = []
    stalls: dict[tuple[str, int | None, int], RankViolation] = {}
    for r in range(nproc):
        mine = []
        for d in ranks[r].get("violations") or ():
            v = RankViolation._from_dict(d, r)
            if v.kind == "rank_stalled":
                key = (v.kind, v.rank, v.step)
                first = stalls.get(key)
                if first is not None:
                    if r not in first.reported_by:
                        first.reported_by += (r,)
                    mine.append(first)
                    continue
                stalls[key] = v
            mine.append(v)
            merged.append(v)
        by_rank[r] = mine
    merged.sort(key=lambda v: (v.step, -1 if v.rank is None else v.rank))
    return RankResults(
        nproc=nproc, tp=tp, pp=pp, returns=[ranks[r].get("value") for r in range(nproc)],
        by_rank=by_rank, violations=merged,
        dropped=sum(int(ranks[r].get("dropped") or 0) for r in range(nproc)), output=output,
        steps={r: ranks[r].get("step") for r in range(nproc)}, seconds=seconds)


def _ranks_text(ranks: Sequence[int]) -> str:
    ranks = list(ranks)
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(map(str, ranks[:-1])) + f" and {ranks[-1]}"


def _step_text(step: int | None) -> str:
    return "had started no step" if step is None else f"last started step {step}"


def _context(results: RankResults, first: Sequence[int] = ()) -> str:
    """The ranks' violations, as a tail for a failure message: stalls first (those concerning
    the ranks in ``first`` before the others), then the rest."""
    from .testing import format_violations
    found = results.violations
    if not found:
        return ""
    stalls = sorted((v for v in found if v.kind == "rank_stalled"),
                    key=lambda v: (v.rank not in first, v.step))
    others = [v for v in found if v.kind != "rank_stalled"]
    return ("\n\nWhat the ranks' caches recorded before the end:\n\n"
            + format_violations(stalls + others, 3))


def _tail(text: str, n: int = _STDERR_TAIL) -> str:
    lines = text.splitlines()[-n:]
    return "\n".join("    " + line for line in lines) or "    (no output)"


def _failed(results: RankResults, ranks: dict[int, dict[str, Any]], failure: Any) -> RankFailed:
    raised = {r: info for r, info in ranks.items() if info.get("status") == "error"}
    failures: dict[int, str] = {r: str(info.get("error")) for r, info in raised.items()}
    died: dict[int, str] = {}
    for r, pf in (getattr(failure, "failures", None) or {}).items():
        if r in raised:
            continue
        how = (f"was killed by {pf.signal_name()}" if getattr(pf, "exitcode", 0) < 0
               else f"exited with code {pf.exitcode}")
        if ranks[r].get("status") == "ok":
            how += " after fn returned"
        died[r] = how
    if raised:
        # The first to raise is the cause; peers blocked in a collective with it raise next
        # ("Connection closed by peer").
        order = sorted(raised, key=lambda r: (raised[r].get("failed_at") or 0.0, r))
        first, others = order[0], order[1:]
        head = f"rank {first} of {results.nproc} {raised[first].get('what')}; the run was stopped"
        if others:
            head += f" ({_ranks_text(others)} failed after it: see below)"
        body = "".join(f"\n\n--- rank {r} ---\n{failures[r].rstrip()}" for r in order)
        stopped = [r for r in range(results.nproc) if r not in raised
                   and ranks[r].get("status") != "ok"]
        if stopped:
            head += f"; {_ranks_text(stopped)} did not finish and were stopped with it"
    else:
        lost = sorted(died) or [r for r in range(results.nproc) if ranks[r].get("status") != "ok"]
        first = lost[0] if lost else 0
        head = (f"rank {first} of {results.nproc} {died.get(first, 'ended without a result')} "
                "and left no Python traceback (a crash, os._exit, or a signal); the run was "
                "stopped")
        for r in lost:
            failures[r] = died.get(r, "ended without a result")
        body = "".join(f"\n\n--- rank {r}: last lines of its output ---\n{_tail(results.output[r])}"
                       for r in lost)
    return RankFailed(head + "." + body + _context(results), failures, results)


def _timed_out(results: RankResults, ranks: dict[int, dict[str, Any]], phase: str,
               timeout: float, startup_timeout: float, stall_timeout: float) -> RanksTimedOut:
    pending = [r for r in range(results.nproc) if ranks[r].get("status") != "ok"]
    steps = results.steps
    if phase == "startup":
        late = [r for r in range(results.nproc) if not ranks[r].get("started")]
        head = (f"not every rank reached fn within startup_timeout={startup_timeout:g} s, and all "
                f"were killed: {_ranks_text(late or pending)} did not get there (spawn, imports, "
                "rendezvous, init_process_group or attach hung or was too slow; see the output "
                "below)")
        body = "".join(f"\n\n--- rank {r}: last lines of its output ---\n"
                       f"{_tail(results.output[r])}" for r in (late or pending))
        failures = {r: f"did not reach fn within {startup_timeout:g} s" for r in late or pending}
        return RanksTimedOut(head + "." + body, failures, results, pending, dict(steps), phase)
    reached = [steps[r] for r in pending if steps.get(r) is not None]
    lead = max(reached) if reached else None
    behind = [r for r in pending if lead is not None and (steps.get(r) is None or steps[r] < lead)]
    stalled = sorted({v.rank for v in results.violations if v.kind == "rank_stalled"
                      and v.rank is not None and v.rank in pending})
    head = (f"the ranks did not return from fn within timeout={timeout:g} s and were all killed; "
            f"{_ranks_text(pending)} had not returned")
    if behind and len(behind) < len(pending):
        waiting = [r for r in pending if r not in behind]
        head += (f". {_ranks_text(behind).capitalize()} fell behind: "
                 f"{_ranks_text(waiting)} reached step {lead} and "
                 f"{'is' if len(waiting) == 1 else 'are'} most likely blocked in a collective "
                 f"waiting for {'it' if len(behind) == 1 else 'them'}")
    elif stalled:
        head += f". The cross-rank checker reported {_ranks_text(stalled)} as stalled"
    else:
        head += (". Every rank was still running (no rank fell behind the others): a loop that "
                 "does not end, or fn needs more than the timeout (raise timeout=)")
    lines = [head + "."]
    for r in range(results.nproc):
        state = "returned" if r not in pending else "had not returned"
        lines.append(f"  rank {r}: {state}, {_step_text(steps.get(r))}")
    if behind and not stalled:
        lines.append(f"No rank_stalled was reported before the end (stall_timeout="
                     f"{stall_timeout:g} s).")
    failures = {r: f"did not return within {timeout:g} s ({_step_text(steps.get(r))})"
                for r in pending}
    return RanksTimedOut("\n".join(lines) + _context(results, behind), failures, results,
                         pending, dict(steps), phase)
