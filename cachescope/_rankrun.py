"""One rank of a multi-rank ``cachescope run`` (started by torch's launcher: RANK/WORLD_SIZE set).

Each rank: ``init_process_group`` (gloo on the CPU, NCCL on ``cuda:LOCAL_RANK``), its
``ParallelLayout`` and ``ParallelNeoX`` shard, its own ``InstrumentedCache`` (named
``--cache-name`` on every rank, so dashboards compare the ranks of one cache; the constant labels
rank/tp_rank/pp_rank tell them apart), the cross-rank checker
(``cachescope.distributed.attach``), its faults (``inject(..., rank=)`` + ``rank_hooks``), and
``parallel_generate``. Then it publishes its result to the process group's store
(``cachescope/result/{rank}``); rank 0 waits for every rank's (bounded), prints the one merged
summary and sets ``cachescope/result/done``; the other ranks print nothing on stdout.

A stall (``rank_stalled``) ends the run from the checker's watcher thread, since the main thread
may be blocked in a collective for good: the rank publishes from there, rank 0 merges and prints,
and the processes end with ``os._exit``. A rank still running once rank 0 set ``done`` (asleep
in a stall, blocked on a dead peer) ends itself the same way.

Under ``cachescope run --nproc`` (``CACHESCOPE_LAUNCHED``) ranks exit 0 when they finished
(``os._exit`` once everything is closed: the interpreter's teardown with torch and a process
group takes seconds), and rank 0 writes the run's exit status to ``CACHESCOPE_RESULT_FILE``; a
rank that fails writes its one-line message beside it and waits for the launcher to stop the run
(see ``_multirank`` for these files). Under a plain ``torchrun`` rank 0 exits with the run's
status and a failing rank prints its one line (rank 0 alone for a usage error).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator

from . import _multirank as mr
from . import _rankmerge

__all__ = ["rank_main"]

_POLL_S = 0.05
#: Seconds rank 0 waits, beyond --stall-timeout, for every rank's result.
RESULT_WAIT_EXTRA_S = 10.0
#: Seconds rank 0 waits for a rank the checker reported stalled (it may still answer).
STALLED_RANK_WAIT_S = 1.0
#: Seconds a failed launched rank waits for the launcher to stop the run.
FAILED_WAIT_S = 30.0
_KEY_RESULT = "cachescope/result/{rank}"
_KEY_DONE = "cachescope/result/done"
_KEY_EXITED = "cachescope/exited/{rank}"
_KEY_ENDPOINT = "cachescope/endpoint/{rank}"
_KEY_TRACE = "cachescope/traceparent/{generation}"
_KEY_SECRET = "cachescope/inputs_key"


class _RankFailure(Exception):
    """A failure of this rank before its decode (bad shard, port in use): one line, exit 1."""


def rank_main(ns: argparse.Namespace) -> int:
    """Run this process as one rank; returns its exit status (see the module docstring)."""
    from .cli import PROG
    rank = mr._env_int("RANK")
    launched = bool(os.environ.get(mr.LAUNCHED_ENV))
    if launched:
        mr.die_with_parent()        # torch's launcher killed outright takes this rank along
        if os.getppid() == 1:
            return 1
    stop = threading.Event()
    with _signals(stop, ns.serve):
        _mark(rank, "ready")        # the launcher passes SIGINT/SIGTERM on from now on
        code = _rank_main(ns, rank, stop, launched, PROG)
    return code


def _rank_main(ns: argparse.Namespace, rank: int, stop: threading.Event, launched: bool,
               prog: str) -> int:
    from .cli import UsageError
    try:
        world = mr._env_int("WORLD_SIZE")
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        n, tp, pp = mr.layout_of(ns, world)
        if not launched:          # the launcher checked all this before starting the ranks
            mr.check_run_args(ns, n, tp, pp)
            mr._check_tracing(ns)
        code = _Rank(ns, rank=rank, world=world, local_rank=local_rank, tp=tp, pp=pp,
                     launched=launched, stop=stop).run()
        _mark(rank, "ended")
        if launched:      # everything is closed: skip the interpreter's teardown (seconds
            _exit(code)   # with torch and a process group), the launcher waits for it
        return code
    except UsageError as exc:
        return _fail(rank, str(exc), 2, launched, prog=prog)
    except _RankFailure as exc:
        return _fail(rank, str(exc), 1, launched, prog=prog)
    except KeyboardInterrupt:
        if launched:
            _mark(rank, "ended")
            return 0          # the launcher passed a signal on; it reports the interruption
        if rank == 0:
            print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:   # anything else: one line, never a traceback
        return _fail(rank, f"{type(exc).__name__}: {mr._one_line(exc)}", 1, launched, prog=prog)


@contextlib.contextmanager
def _signals(stop: threading.Event, serve: bool) -> Iterator[None]:
    """For the whole rank: with --serve SIGINT/SIGTERM set ``stop`` (every rank stops after the
    generation); otherwise both raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def set_stop(_signum: int, _frame: Any) -> None:
        stop.set()

    handler: Any = set_stop if serve else signal.default_int_handler
    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def _exit(code: int) -> None:
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _mark(rank: int, what: str) -> None:
    """Tell the launcher this rank is ``ready`` (takes signals) or ``ended`` on its own (it is
    not lost when its process is gone)."""
    path = mr.marker_file(rank, what)
    if path is not None:
        with contextlib.suppress(OSError):
            open(path, "w").close()


def _fail(rank: int, message: str, code: int, launched: bool, *, prog: str) -> int:
    """Report this rank's failure: to the launcher (a file, then wait to be stopped), else on
    stderr (a usage error once, from rank 0)."""
    path = mr.marker_file(rank, "failed")
    if launched and path is not None:
        try:
            mr.write_json(path, {"rank": rank, "message": message})
        except OSError:
            print(f"{prog} run: rank {rank}: error: {message}", file=sys.stderr, flush=True)
            return code
        time.sleep(FAILED_WAIT_S)     # the launcher stops the whole run now
        return code
    if code != 2 or rank == 0:
        print(f"{prog} run: rank {rank}: error: {message}", file=sys.stderr, flush=True)
    return code


class _Inputs:
    """Passes each step's input ids (``note_inputs``) to several listeners."""

    def __init__(self, listeners: tuple[Callable[[list[int]], Any], ...]) -> None:
        self._listeners = listeners

    def note_inputs(self, ids: list[int]) -> None:
        for listen in self._listeners:
            listen(ids)


class _Rank:
    """The state of one rank's run, shared by the main thread and the watcher threads."""

    def __init__(self, ns: argparse.Namespace, *, rank: int, world: int, local_rank: int,
                 tp: int, pp: int, launched: bool, stop: threading.Event) -> None:
        self.ns = ns
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.tp, self.pp = tp, pp
        self.tp_rank, self.pp_rank = rank % tp, rank // tp
        self.launched = launched
        self.store: Any = None
        self.cache: Any = None
        self.model: Any = None
        self.model_desc = ""
        self.prompt: list[int] = []
        self.check: Any = None
        self.recorder: Any = None
        self.server: Any = None
        self.watch: Any = None
        self.tracer: Any = None
        self.provider: Any = None
        self.targets: str | None = None
        self.hooks: Any = None
        self.handle: Any = None
        self.events: list[Any] = []
        self.not_fired: list[str] = []
        self.error: str | None = None
        self.generations = 0
        self.tokens_total = 0
        self.last_tokens: list[int] = []
        self.tokens_now: list[int] = []
        self.t0 = time.perf_counter()
        self.elapsed: float | None = None
        self.progress: Any = None
        self._finishing = False
        self._answered: list[int] = []
        self._finish_lock = threading.Lock()
        self._stop = stop          # --serve: SIGINT/SIGTERM asked this rank to stop
        self._ended = threading.Event()

    # ------------------------------------------------------------------ main thread
    def run(self) -> int:
        import torch
        import torch.distributed as dist
        ns = self.ns
        if ns.device.startswith("cuda"):
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
        try:
            code = self._run(device)
        finally:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        return code

    def _run(self, device: Any) -> int:
        import cachescope
        from cachescope import distributed

        from .neox.parallel import ParallelLayout
        ns = self.ns
        layout = ParallelLayout.from_env(self.tp, self.pp, device=device)
        self.model, self.model_desc = self._build_model(layout, device)
        from . import cli
        self.prompt = cli.prompt_ids(ns, self.model.config)
        self._warm_up()
        metrics_mod = self._metrics_module()
        self.provider = self._tracing_provider()
        if cachescope.installed() is not None:
            raise _RankFailure("another InstrumentedCache is already installed in this process")
        labels = None
        if metrics_mod is not None:
            labels = metrics_mod.rank_labels(self.rank, self.tp_rank, self.pp_rank)
        try:
            self.cache = cachescope.InstrumentedCache(
                name=ns.cache_name, strict=ns.strict,
                metrics=metrics_mod is not None, tracing=False, const_labels=labels)
        except ValueError as exc:
            raise _RankFailure(f"--cache-name: {exc}") from None
        if self.provider is not None:
            from . import tracing
            self.tracer = tracing.trace(self.cache, tracer_provider=self.provider, on_error="log",
                                        attributes=tracing.rank_attributes(
                                            self.rank, self.tp_rank, self.pp_rank))
        cachescope.install(self.cache)
        try:
            port = self._serve_metrics(metrics_mod)
            self.watch = self.model.watch(self.cache)
            self.check = distributed.attach(
                self.cache, tp=self.tp, pp=self.pp, stall_timeout=ns.stall_timeout,
                every=ns.rank_check_every, on_stall=self._on_stall)
            self.store = self.check.store
            self._record(device)
            self._start_done_watcher()
            if port is not None:
                self._publish_endpoint(port)
            self._decode()
            self.check.flush(timeout=ns.stall_timeout + 2.0)
            code = self.finish(None)
            if code is None:          # another thread is ending this process (os._exit)
                time.sleep(2 * (ns.stall_timeout + RESULT_WAIT_EXTRA_S))
                return 0
            return self._end(code)
        finally:
            self._cleanup()

    def _build_model(self, layout: Any, device: Any) -> tuple[Any, str]:
        from .neox import CheckpointError
        from .neox.parallel import ParallelNeoX
        ns = self.ns
        config, desc = mr.model_config(ns)
        if ns.checkpoint:
            try:
                return ParallelNeoX.from_hf_checkpoint(ns.checkpoint, layout, device=device), desc
            except (CheckpointError, OSError) as exc:
                raise _RankFailure(f"--checkpoint: {mr._one_line(exc)}") from None
        return ParallelNeoX.from_config(config, layout, device=device), desc

    def _warm_up(self) -> None:
        """One collective step on a throwaway cache, so tokens/s measures decoding."""
        from ._cache import Cache
        from .neox.parallel import parallel_generate
        parallel_generate(self.model, self.prompt, 1, cache=Cache())

    def _metrics_module(self) -> Any:
        if self.ns.metrics_port is None:
            return None
        try:
            from . import metrics
        except ImportError as exc:
            raise _RankFailure(f"metrics need prometheus_client ({exc}): pip install cachescope") from None
        return metrics

    def _tracing_provider(self) -> Any:
        ns = self.ns
        if not (ns.otlp_endpoint or ns.console_traces):
            return None
        from . import _sdk
        return _sdk.configure_tracing(ns.otlp_endpoint, ns.console_traces, ns.trace_sample)

    def _serve_metrics(self, metrics_mod: Any) -> int | None:
        from .cli import PROG, url_host
        if metrics_mod is None:
            return None
        ns = self.ns
        want = ns.metrics_port + self.local_rank if ns.metrics_port else 0
        try:
            self.server, _thread, port = metrics_mod.start_metrics_server(want, ns.metrics_addr)
        except (metrics_mod.MetricsServerError, OSError, ValueError) as exc:
            raise _RankFailure(f"--metrics-port: {exc}") from None
        print(f"{PROG}: serving metrics on http://{url_host(ns.metrics_addr)}:{port}/metrics "
              f"(rank {self.rank}, tp_rank {self.tp_rank}, pp_rank {self.pp_rank})",
              file=sys.stderr, flush=True)
        return int(port)

    def _record(self, device: Any) -> None:
        ns = self.ns
        if not ns.record:
            return
        from .record import Recorder
        path = mr.rank_path(ns.record, self.rank)
        key = self._shared_secret()
        try:
            self.recorder = Recorder(path, inputs_key=key, run_info={
                "model": self.model_desc, "prompt_tokens": len(self.prompt),
                "max_new_tokens": ns.max_new_tokens, "faults": [str(f) for f in ns.fault],
                "seed": ns.seed, "device": str(device), "rank": self.rank,
                "tp_rank": self.tp_rank, "pp_rank": self.pp_rank, "tp": self.tp, "pp": self.pp,
                "world_size": self.world, "run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
                "layers": list(self.model.layer_range)})
        except OSError as exc:
            raise _RankFailure(f"--record: cannot write {path}: {exc.strerror or exc}") from None
        self.recorder.attach(self.cache)

    def _shared_secret(self) -> str:
        """The key of the recordings' input digests: one per run, made by rank 0 and shared
        through the store (the files can be compared, the token ids are not in them)."""
        key = _KEY_SECRET
        if self.rank == 0:
            import secrets
            self.store.set(key, secrets.token_hex(16))
        found = self._wait_keys([key], time.monotonic() + self.ns.stall_timeout + RESULT_WAIT_EXTRA_S)
        if key not in found:
            raise _RankFailure("--record: rank 0 did not share the recordings' key in time")
        return found[key].decode()

    def _publish_endpoint(self, port: int) -> None:
        """Every rank's /metrics address into the store; rank 0 writes the file_sd targets."""
        from . import metrics
        from .cli import PROG
        addr = self.ns.metrics_addr
        host = socket.getfqdn() if addr in ("", "0.0.0.0", "::") else addr
        self.store.set(_KEY_ENDPOINT.format(rank=self.rank), json.dumps({"host": host, "port": port}))
        path = mr.targets_path(self.ns)
        if self.rank != 0 or path is None:
            return
        found = self._wait_keys([_KEY_ENDPOINT.format(rank=r) for r in range(self.world)],
                                time.monotonic() + self.ns.stall_timeout + RESULT_WAIT_EXTRA_S)
        targets, labels = [], []
        for r in range(self.world):
            raw = found.get(_KEY_ENDPOINT.format(rank=r))
            if raw is None:
                continue
            ep = json.loads(raw)
            targets.append((ep["host"], int(ep["port"])))
            labels.append(metrics.rank_labels(r, r % self.tp, r // self.tp))
        from ._filesd import write_targets
        try:
            written = write_targets(path, targets, labels)
        except (OSError, ValueError) as exc:
            print(f"{PROG}: could not write the Prometheus targets file {path}: {exc}",
                  file=sys.stderr, flush=True)
            return
        self.targets = str(written)
        print(f"{PROG}: wrote Prometheus file_sd targets for {len(targets)} of {self.world} ranks "
              f"to {os.path.abspath(written)} (removed when the run ends)", file=sys.stderr,
              flush=True)

    def _decode(self) -> None:
        from contextlib import nullcontext

        from ._records import PopOrderError
        from .cli import exc_text, Progress
        from .faults import inject, rank_hooks
        from .neox.parallel import parallel_generate
        ns, model, cache = self.ns, self.model, self.cache
        self.progress = Progress(self.rank == 0 and ((sys.stderr.isatty() and not ns.quiet)
                                                      or ns.progress), ns.max_new_tokens)
        self.t0 = time.perf_counter()
        while True:
            self.generations += 1
            self.tokens_now = []
            tokens: list[int] = []
            hooks = rank_hooks(ns.fault, rank=self.rank, vocab_size=model.config.vocab_size)
            self.hooks = hooks
            root = self._join_trace()
            try:
                with (inject(ns.fault, model.layers, cache, model=model, rank=self.rank)
                      if ns.fault else nullcontext()) as handle, hooks:
                    self.handle = handle
                    try:
                        tokens = parallel_generate(model, self.prompt, ns.max_new_tokens,
                                                   cache=cache, on_step=self._on_step,
                                                   hooks=hooks, rank_check=self._inputs)
                    finally:
                        if self.generations == 1:
                            self.events = self._events()
                            self.not_fired = [str(f) for f in
                                              (handle.not_fired() if handle is not None else [])
                                              + hooks.not_fired()]
            except PopOrderError as exc:
                self.error = f"stopped at the first violation (--strict): {exc.violation.summary()}"
            except Exception as exc:   # a rank's loop may fail (pop_empty, a peer gone): report
                self.error = f"the decode loop raised {type(exc).__name__}: {exc_text(exc)}"
            finally:
                if root is not None:
                    root.end()
            self.last_tokens = tokens or self.tokens_now
            if not ns.serve or self.error or len(tokens) < ns.max_new_tokens:
                break               # done, or this rank left the run (its peers see a stall)
            if self._agree_stop():
                break
        self.elapsed = time.perf_counter() - self.t0
        self.progress.done()

    @property
    def _inputs(self) -> Any:
        """What the decoder tells each step's input ids: the checker, and the recording."""
        if self.recorder is None:
            return self.check
        return _Inputs((self.check.note_inputs, self.recorder.note_inputs))

    def _events(self) -> list[Any]:
        events = list(self.handle.events) if self.handle is not None else []
        events += list(self.hooks.events) if self.hooks is not None else []
        return sorted(events, key=lambda e: e.step)

    def _on_step(self, i: int, token: int) -> None:
        self.tokens_total += 1
        self.tokens_now.append(token)
        if self.rank == 0 and self.progress is not None:
            elapsed = time.perf_counter() - self.t0
            gen = f"generation {self.generations}, " if self.ns.serve else ""
            self.progress.update(
                f"{gen}step {i + 1}/{self.ns.max_new_tokens}, {self.tokens_total} tokens, "
                f"{self.tokens_total / elapsed if elapsed > 0 else 0:.1f} tokens/s, "
                f"{len(self.cache.violations)} violation(s) on rank 0")

    def _agree_stop(self) -> bool:
        """--serve, between generations: every rank stops when any rank was asked to."""
        import torch
        import torch.distributed as dist
        flag = torch.tensor([1 if self._stop.is_set() else 0], dtype=torch.int64,
                            device=next(self.model.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _join_trace(self) -> Any:
        """With tracing: rank 0 starts the generation's root span and shares its traceparent;
        every rank's generate span joins it. Returns rank 0's root (None elsewhere)."""
        if self.tracer is None:
            return None
        from . import tracing
        key = _KEY_TRACE.format(generation=self.generations)
        if self.rank == 0:
            root = tracing.start_rank_trace(self.provider, attributes={
                "cachescope.world_size": self.world, "cachescope.tp": self.tp,
                "cachescope.pp": self.pp})
            self.store.set(key, root.traceparent or "")
            self.tracer.traceparent = root.traceparent
            return root
        found = self._wait_keys([key], time.monotonic() + self.ns.stall_timeout)
        self.tracer.traceparent = (found.get(key) or b"").decode() or None
        return None

    # ------------------------------------------------------------------ the result
    def _result(self, stalled: str | None) -> dict[str, Any]:
        from . import cli
        elapsed = self.elapsed if self.elapsed is not None else time.perf_counter() - self.t0
        if self.generations <= 1 and self.hooks is not None and not self.events:
            self.events = self._events()
        summary = cli.run_summary(self.ns, self.model, self.model_desc, self.cache, self.prompt,
                               self.generations, self.tokens_total, elapsed, self.events,
                               self.not_fired, self.error, self.last_tokens or self.tokens_now, 0)
        return _rankmerge.rank_result(
            summary, rank=self.rank, tp_rank=self.tp_rank, pp_rank=self.pp_rank,
            local_rank=self.local_rank, host=socket.gethostname(),
            layers=list(self.model.layer_range), report=self.cache.report(), stalled=stalled)

    def finish(self, stall: Any) -> int | None:
        """Publish this rank's result; rank 0 merges and prints. Returns the run's exit status,
        or None when another thread of this rank is already finishing."""
        with self._finish_lock:
            if self._finishing:
                return None
            self._finishing = True
        ns = self.ns
        result = self._result(stall.summary() if stall is not None else None)
        self.store.set(_KEY_RESULT.format(rank=self.rank), json.dumps(result, default=str))
        if self.rank != 0:
            found = self._wait_keys([_KEY_DONE], time.monotonic() + 2 * ns.stall_timeout
                                    + 2 * RESULT_WAIT_EXTRA_S)
            raw = found.get(_KEY_DONE)
            return int(raw) if raw is not None else 1
        wait_s = ns.stall_timeout + RESULT_WAIT_EXTRA_S
        keys = {r: _KEY_RESULT.format(rank=r) for r in range(self.world)}
        found = self._wait_keys(list(keys.values()), time.monotonic() + wait_s,
                                give_up=self._stalled_keys)
        results = {r: (json.loads(found[k]) if k in found else None) for r, k in keys.items()}
        results[0] = result
        self._answered = [r for r in range(1, self.world) if results[r] is not None]
        merged = _rankmerge.merge(results, cache=ns.cache_name, world_size=self.world,
                                  tp=self.tp, pp=self.pp,
                                  serve=ns.serve, waited_s=wait_s)
        self._print(merged)
        code = int(merged["exit_code"])
        self.store.set(_KEY_DONE, str(code))
        return code

    def _stalled_keys(self) -> dict[str, float]:
        """Result keys of ranks the checker reported stalled: wait only briefly for those."""
        kinds = [v for v in list(self.cache.violations) if v.kind == "rank_stalled"]
        return {_KEY_RESULT.format(rank=v.rank): STALLED_RANK_WAIT_S for v in kinds
                if v.rank is not None}

    def _print(self, merged: dict[str, Any]) -> None:
        from ._values import format_bytes
        from .cli import PROG
        if self.progress is not None:
            self.progress.done()
        if self.ns.json:
            text = json.dumps(merged, indent=2, default=str)
        else:
            text = _rankmerge.format_human(merged, prog=PROG, quiet=self.ns.quiet,
                                           serve=self.ns.serve, format_bytes=format_bytes)
        if text:
            print(text, flush=True)

    def _end(self, code: int) -> int:
        """After a normal finish: let every rank close its files, then report the status."""
        self._close_outputs()
        if self.rank != 0:
            self.store.set(_KEY_EXITED.format(rank=self.rank), "1")
            return 0
        self._wait_keys([_KEY_EXITED.format(rank=r) for r in self._answered],
                        time.monotonic() + RESULT_WAIT_EXTRA_S)
        return self._report_code(code)

    def _report_code(self, code: int) -> int:
        path = os.environ.get(mr.RESULT_ENV)
        if self.launched and path:
            try:
                mr.write_json(path, {"exit_code": code})
            except OSError:
                return code
            return 0
        return code

    # ------------------------------------------------------------------ other threads
    def _on_stall(self, v: Any) -> None:
        """The checker found a stalled rank (watcher thread; the main thread may be blocked in
        a collective for good): publish, merge on rank 0, and end this process."""
        code = self.finish(v)
        if code is None:
            return
        self._exit_now(self._report_code(code) if self.rank == 0 else 0)

    def _start_done_watcher(self) -> None:
        """End this rank once rank 0 declared the run done while this rank is still running."""
        if self.rank == 0:
            return
        try:
            store = self.store.clone()
        except Exception:
            store = self.store

        def watch() -> None:
            while not self._ended.is_set():
                try:
                    done = store.check([_KEY_DONE])
                except Exception:
                    return
                if done:
                    with self._finish_lock:
                        if self._finishing:
                            return
                        self._finishing = True
                    self._exit_now(0)
                    return
                time.sleep(4 * _POLL_S)

        threading.Thread(target=watch, name=f"cachescope-done-{self.rank}", daemon=True).start()

    def _exit_now(self, code: int) -> None:
        self._close_outputs()
        _mark(self.rank, "ended")
        _exit(code)

    # ------------------------------------------------------------------ helpers
    def _wait_keys(self, keys: list[str], deadline: float,
                   give_up: Callable[[], dict[str, float]] | None = None) -> dict[str, bytes]:
        """Poll the store for ``keys`` until ``deadline``; returns those found. ``give_up()``
        names keys to wait for only so many seconds more."""
        found: dict[str, bytes] = {}
        short: dict[str, float] = {}
        while True:
            for key in keys:
                if key not in found and self.store.check([key]):
                    found[key] = self.store.get(key)
            missing = [k for k in keys if k not in found]
            now = time.monotonic()
            if not missing or now > deadline:
                return found
            if give_up is not None:
                for key, secs in give_up().items():
                    short.setdefault(key, now + secs)
                if all(k in short and now > short[k] for k in missing):
                    return found
            time.sleep(_POLL_S)

    def _close_outputs(self) -> None:
        """Close what must reach the disk (recording, targets file); safe from any thread, once."""
        recorder, self.recorder = self.recorder, None
        if recorder is not None:
            with contextlib.suppress(Exception):
                recorder.close()
        targets, self.targets = self.targets, None
        if targets is not None:
            from ._filesd import remove_targets
            with contextlib.suppress(OSError):
                remove_targets(targets)

    def _cleanup(self) -> None:
        import cachescope
        self._ended.set()
        if self.watch is not None:
            with contextlib.suppress(Exception):
                self.watch.remove()
        if self.check is not None:
            with contextlib.suppress(Exception):
                self.check.detach()
        self._close_outputs()
        if cachescope.installed() is self.cache and self.cache is not None:
            cachescope.uninstall()
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.shutdown()
                self.server.server_close()
        if self.tracer is not None:
            with contextlib.suppress(Exception):
                self.tracer.close(self.cache)
        if self.provider is not None:
            from . import _sdk
            _sdk.shutdown(self.provider)
        if self.cache is not None and self.cache.metrics is not None:
            with contextlib.suppress(Exception):
                self.cache.metrics.close()
