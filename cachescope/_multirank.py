"""Multi-rank ``cachescope run``: argument checks and the launcher (the parent process).

``cachescope run --nproc N [--tp T] [--pp P] ...`` checks its arguments here (everything that
needs no rank: layout, heads, layers, faults, prompt, ports, output paths), then starts the
ranks with torch's own launcher as one subprocess::

    python -m torch.distributed.run --nproc_per_node N --nnodes 1 --master_addr 127.0.0.1
        --master_port <free> --monitor_interval 0.5 -m cachescope run <run options> --tp T --pp P

with ``CACHESCOPE_LAUNCHED=1`` and ``CACHESCOPE_RESULT_FILE=<file in a private temp dir>``
(the run options are spelt out in full: the launcher would read an abbreviation such as
``--nproc`` as one of its own). Each rank (``cachescope._rankrun``) decodes; rank 0 prints the
merged summary and writes the exit status into the result file; this process returns it.

Nothing is left running, whatever happens. The launcher runs in a session of its own and starts
each rank in another one, so this process keeps the ranks' pids (the launcher's descendants,
with their start times so that a reused pid is never touched) and, on every way out, kills the
launcher's group, then every rank still running (each wait bounded). On Linux the launcher and
the ranks also die with their parent (PR_SET_PDEATHSIG), for when this process is killed
outright. Files beside the result file tell the launcher about each rank:

* ``.rank{r}.ready``: the rank handles SIGINT/SIGTERM. Signals to this process are passed on to
  the ranks once all are ready (--serve: they stop after the generation and print the summary;
  otherwise they stop at once), never to torch's launcher (it answers with a traceback); a signal
  before then, or a second one, stops everything at once.
* ``.rank{r}.failed``: the rank could not start (a bad checkpoint shard, ...); its one-line
  message is printed here and the run stopped, before torch's launcher prints its banner.
* ``.rank{r}.ended``: the rank ends on its own. A rank process gone without it (SIGKILL, a
  crash below Python) is reported in one line and the run stopped.

``torchrun --nproc_per_node N -m cachescope run --tp T --pp P`` starts the ranks directly (also
over several machines, with torchrun's rendezvous options); ``run`` sees RANK/WORLD_SIZE in the
environment and runs as one rank.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["wanted", "run", "rank_path", "layout_of"]

#: Set in the ranks' environment by the launcher.
LAUNCHED_ENV = "CACHESCOPE_LAUNCHED"
RESULT_ENV = "CACHESCOPE_RESULT_FILE"
#: Default of ``--targets-file``.
DEFAULT_TARGETS = "cachescope-targets.json"
#: Seconds the ranks get to end once the result is written (or a signal was passed on).
END_GRACE_S = 10.0
SERVE_STOP_GRACE_S = 60.0
KILL_WAIT_S = 5.0
LOST_SETTLE_S = 1.5   # after a rank failure: how long to look for a rank that vanished
_POLL_S = 0.05
#: How often torch's launcher looks at its workers: slower than this process's poll, so a rank
#: that dies is reported (one line) and the run stopped here before the launcher's banner.
MONITOR_INTERVAL_S = 0.5
_TRACK_S = 0.5     # how often the launcher's descendants (the ranks) are looked up


def _usage(msg: str) -> Exception:
    from .cli import UsageError
    return UsageError(msg)


def in_rank_env() -> bool:
    """Whether this process was started by torch's launcher as one rank (RANK and WORLD_SIZE set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text)
    except ValueError:
        raise _usage(f"environment variable {name}={text!r} is not an integer; start the ranks "
                     "with torchrun (python -m torch.distributed.run), which sets it") from None


def wanted(ns: argparse.Namespace) -> bool:
    """Whether ``run`` is a multi-rank run: --nproc/--tp/--pp given, or a rank of a world of
    more than one started by torch's launcher. ``--targets-file`` outside one is a usage error."""
    multi = (ns.nproc is not None or ns.tp is not None or ns.pp is not None
             or (in_rank_env() and _env_int("WORLD_SIZE") > 1))
    if not multi and ns.targets_file is not None:
        raise _usage("--targets-file lists the ranks of a multi-rank run: add --nproc N "
                     "(or drop --targets-file)")
    return multi


def run(ns: argparse.Namespace) -> int:
    """``cachescope run`` with more than one rank: one rank when started by torch's launcher,
    else the launcher of ``--nproc`` ranks on this machine."""
    if in_rank_env():
        from . import _rankrun
        return _rankrun.rank_main(ns)
    return _launch(ns)


# ----------------------------------------------------------------------------- checks

def layout_of(ns: argparse.Namespace, world: int | None = None) -> tuple[int, int, int]:
    """``(world size, tp, pp)`` from --nproc/--tp/--pp (``world``: the launcher's WORLD_SIZE).

    Only --nproc: --tp N --pp 1. Only --tp/--pp: N = T x P. Any two fix the third."""
    n = ns.nproc
    if world is not None:
        if n is not None and n != world:
            raise _usage(f"--nproc {n}, but torch's launcher started {world} rank(s) (WORLD_SIZE): "
                         "drop --nproc under torchrun; its --nproc_per_node/--nnodes set the world")
        n = world
    tp, pp = ns.tp, ns.pp
    if n is None:
        tp, pp = tp or 1, pp or 1
        return tp * pp, tp, pp
    if tp is None and pp is None:
        return n, n, 1
    if tp is None or pp is None:
        given, flag, other = (pp, "--pp", "--tp") if tp is None else (tp, "--tp", "--pp")
        if n % given:
            raise _usage(f"{flag} {given} does not divide the {n} rank(s) of the run: {other} x "
                         f"{flag} must equal the number of ranks (--nproc, or torchrun's WORLD_SIZE)")
        return (n, n // pp, pp) if tp is None else (n, tp, n // tp)
    if tp * pp != n:
        raise _usage(f"--tp {tp} x --pp {pp} = {tp * pp} rank(s), but the run has {n} (--nproc, or "
                     "torchrun's WORLD_SIZE): pick --tp and --pp whose product is the number of ranks")
    return n, tp, pp


def model_config(ns: argparse.Namespace) -> tuple[Any, str]:
    """The model's ``NeoXConfig`` (preset, or the checkpoint's config.json only) and its description."""
    from .neox import CheckpointError, NeoXConfig
    from .neox.hf import config_from_hf
    if not ns.checkpoint:
        return NeoXConfig.preset(ns.preset), f"preset {ns.preset}"
    root = Path(ns.checkpoint)
    if not root.is_dir():
        raise _usage(f"--checkpoint: {ns.checkpoint} is not a directory (expected a Hugging Face "
                     "GPT-NeoX checkpoint: config.json + weights)")
    path = root / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, expected an object")
        return config_from_hf(data, source=str(path)), f"checkpoint {ns.checkpoint}"
    except FileNotFoundError:
        raise _usage(f"--checkpoint: no config.json in {ns.checkpoint} (expected a Hugging Face "
                     "GPT-NeoX checkpoint: config.json + weights)") from None
    except (OSError, ValueError, RecursionError) as exc:   # CheckpointError is a ValueError
        raise _usage(f"--checkpoint: {_one_line(exc)}") from None


def check_layout(config: Any, tp: int, pp: int) -> None:
    """T must divide the heads (and the MLP width); every pipeline stage needs a layer."""
    heads = config.num_heads
    if heads % tp:
        fits = ", ".join(str(t) for t in range(1, heads + 1) if heads % t == 0)
        raise _usage(f"--tp {tp} does not divide the model's {heads} attention heads: tensor "
                     f"parallelism splits whole heads; pick --tp in {fits}")
    if config.intermediate_size % tp:
        raise _usage(f"--tp {tp} does not divide the model's MLP width {config.intermediate_size}: "
                     "pick a --tp that divides both the heads and the MLP width")
    if pp > config.num_layers:
        raise _usage(f"--pp {pp} is more pipeline stages than the model's {config.num_layers} "
                     f"layers: every stage needs at least one layer; use --pp <= {config.num_layers}")


def stage_sizes(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage: contiguous, the first stages get the extra layer."""
    base, extra = divmod(num_layers, pp)
    return [base + (1 if s < extra else 0) for s in range(pp)]


def rank_path(path: str, rank: int) -> str:
    """``run.jsonl.gz`` -> ``run.rank{r}.jsonl.gz`` (also ``.jsonl``; else before the last suffix)."""
    p = Path(path)
    name = p.name
    for suffix in (".jsonl.gz", ".jsonl", ".json.gz", ".gz"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return str(p.with_name(f"{name[:-len(suffix)]}.rank{rank}{suffix}"))
    stem, dot, ext = name.rpartition(".")
    if dot and stem:
        return str(p.with_name(f"{stem}.rank{rank}.{ext}"))
    return str(p.with_name(f"{name}.rank{rank}"))


def _check_faults(ns: argparse.Namespace, config: Any, n: int, tp: int, pp: int) -> None:
    """Steps that never come, ranks outside the world, layers outside a rank's own stage: each
    fault is tried (and undone) on a model of every stage's shape, on the meta device."""
    import dataclasses

    import torch

    from ._cache import Cache
    from .faults import check_ranks, inject
    from .neox import NeoXModel
    for f in ns.fault:
        if f.step >= ns.max_new_tokens:
            raise _usage(f"--fault {f}: step {f.step} never comes: the run has "
                         f"{ns.max_new_tokens} step(s), 0..{ns.max_new_tokens - 1} (step 0 is "
                         "the prompt); raise --max-new-tokens or pick an earlier step")
    if not ns.fault:
        return
    try:
        check_ranks(ns.fault, n)
    except ValueError as exc:
        raise _usage(_fault_msg(exc)) from None
    sizes = stage_sizes(config.num_layers, pp)
    models: dict[int, Any] = {}
    resolved: list[Any] | None = None
    for rank in range(n):
        size = sizes[rank // tp]
        if size not in models:
            with torch.device("meta"):
                models[size] = NeoXModel(dataclasses.replace(config, num_layers=size),
                                         init_weights=False)
        model = models[size]
        try:
            with inject(ns.fault, model.layers, Cache(), model=model, rank=rank) as handle:
                if resolved is None:
                    resolved = list(handle.faults)
        except ValueError as exc:
            where = f" (rank {rank} holds {size} of the {config.num_layers} layers)" if pp > 1 else ""
            raise _usage(_fault_msg(exc) + where) from None


def _fault_msg(exc: BaseException) -> str:
    msg = str(exc)
    return f"--{msg}" if msg.startswith("fault ") else f"--fault: {msg}"


def _check_device(ns: argparse.Namespace, n: int) -> None:
    """cpu, or cuda with one GPU per rank on this machine (``n``: ranks here)."""
    import torch
    name = ns.device
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise _usage(f"--device: unknown device {name!r}; use cpu or cuda") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise _usage(f"--device: {name!r} is not supported; use cpu or cuda")
    if device.index is not None:
        raise _usage(f"--device {name}: in a multi-rank run each rank uses cuda:LOCAL_RANK; "
                     "pass --device cuda")
    if not torch.cuda.is_available():
        raise _usage(f"--device {name}: CUDA is not available (torch {torch.__version__}"
                     f"{' has no CUDA support' if torch.version.cuda is None else ' sees no GPU'})")
    if torch.cuda.device_count() < n:
        raise _usage(f"--device cuda: {n} ranks on this machine need {n} GPUs (one per rank, "
                     f"cuda:LOCAL_RANK), torch sees {torch.cuda.device_count()}; start fewer ranks "
                     "here")


def _port_free(addr: str, port: int) -> OSError | None:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the metrics server does
        try:
            s.bind((addr, port))
        except OSError as exc:
            return exc
    return None


def _check_ports(ns: argparse.Namespace, n: int) -> None:
    """--metrics-port P: ranks serve on P..P+N-1 (local ranks); all must be free now."""
    if ns.metrics_port is None:
        if ns.targets_file is not None:
            raise _usage("--targets-file lists the ranks' /metrics endpoints: add --metrics-port "
                         "(0 for free ports)")
        return
    p = ns.metrics_port
    if p == 0:
        return
    if p + n - 1 > 65535:
        raise _usage(f"--metrics-port {p}: {n} ranks serve on ports {p}..{p + n - 1}, past 65535; "
                     "pick a lower port or 0 for free ports")
    for port in range(p, p + n):
        err = _port_free(ns.metrics_addr, port)
        if err is not None:
            import errno
            what = "is in use" if err.errno == errno.EADDRINUSE else f"cannot be bound ({err.strerror})"
            raise _usage(f"--metrics-port {p}: the {n} ranks serve on ports {p}..{p + n - 1} "
                         f"(one per local rank), and port {port} on {ns.metrics_addr} {what}; "
                         "pick another range or use 0 for free ports")


def _check_writable(flag: str, path: str) -> None:
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise _usage(f"{flag}: cannot write {path}: {exc.strerror or exc}") from None
    if not existed:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _check_outputs(ns: argparse.Namespace, n: int) -> None:
    if ns.record:
        for r in range(n):
            _check_writable("--record", rank_path(ns.record, r))
    if targets_path(ns) is not None:
        _check_writable("--targets-file", targets_path(ns) or "")


def targets_path(ns: argparse.Namespace) -> str | None:
    """Where the file_sd targets file goes: --targets-file, or the default with --serve and
    --metrics-port; None when no file is written."""
    if ns.metrics_port is None:
        return None
    if ns.targets_file is not None:
        return ns.targets_file
    return DEFAULT_TARGETS if ns.serve else None


def _check_tracing(ns: argparse.Namespace) -> None:
    from . import cli
    provider = cli.tracer_provider(ns)    # UsageError for a missing SDK or a bad endpoint
    if provider is not None:
        from . import _sdk
        _sdk.shutdown(provider)


def check_run_args(ns: argparse.Namespace, n: int, tp: int, pp: int) -> tuple[Any, str]:
    """Every check that needs no rank; returns ``(config, model description)``."""
    from . import cli
    config, desc = model_config(ns)
    check_layout(config, tp, pp)
    local = os.environ.get("LOCAL_WORLD_SIZE", "") if in_rank_env() else ""
    _check_device(ns, int(local) if local.isdigit() else n)   # GPUs needed on this machine
    cli.prompt_ids(ns, config)   # token ids in range, prompt + new tokens within the positions
    _check_faults(ns, config, n, tp, pp)
    return config, desc


# ----------------------------------------------------------------------------- the launcher

def _free_port(avoid: range) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
    raise _usage("could not find a free port on 127.0.0.1 for the ranks' rendezvous")


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[1])


def _child_env(result_file: str) -> dict[str, str]:
    env = dict(os.environ)
    env[LAUNCHED_ENV] = "1"
    env[RESULT_ENV] = result_file
    env.setdefault("OMP_NUM_THREADS", "1")   # what the launcher sets (with a banner) when unset
    env["TMPDIR"] = os.path.dirname(result_file)   # the launcher's own files go with ours
    root = _package_root()
    if Path(root).name not in ("site-packages", "dist-packages"):   # a source checkout
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(
            os.pathsep) if p and p != root])
    return env


def _run_parser() -> argparse.ArgumentParser:
    from .cli import build_parser
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["run"]
    raise RuntimeError("cachescope's parser has no 'run' command")


#: Options the launcher sets itself: never forwarded as given.
_NOT_FORWARDED = ("help", "nproc", "tp", "pp")


def _forwarded(ns: argparse.Namespace, tp: int, pp: int) -> list[str]:
    """The run options of ``ns`` spelt out in full (torch's launcher parses the command line it
    passes on, and would take an abbreviation such as ``--nproc`` for one of its own options),
    with the layout made explicit and without --nproc (the ranks get WORLD_SIZE)."""
    out: list[str] = []
    for action in _run_parser()._actions:
        if not action.option_strings or action.dest in _NOT_FORWARDED:
            continue
        value = getattr(ns, action.dest, action.default)
        if value is None or value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            out.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                out += [flag, str(item)]
        elif isinstance(value, (list, tuple)):
            out += [flag, ",".join(str(v) for v in value)]
        else:
            out += [flag, str(value)]
    return out + ["--tp", str(tp), "--pp", str(pp)]


def _launch(ns: argparse.Namespace) -> int:
    n, tp, pp = layout_of(ns)
    check_run_args(ns, n, tp, pp)
    _check_ports(ns, n)
    _check_outputs(ns, n)
    _check_tracing(ns)
    avoid = range(ns.metrics_port, ns.metrics_port + n) if ns.metrics_port else range(0)
    master_port = _free_port(avoid)
    with tempfile.TemporaryDirectory(prefix="cachescope-run-") as tmp:
        result_file = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
               "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(master_port),
               "--monitor_interval", str(MONITOR_INTERVAL_S),
               "-m", "cachescope", "run", *_forwarded(ns, tp, pp)]
        launch = _Launch(cmd, _child_env(result_file), result_file, nproc=n, serve=ns.serve)
        return launch.run()


class _Launch:
    """One torch launcher subprocess in its own session, watched until it ends; see the module
    docstring for what happens on signals, rank failures and stragglers."""

    def __init__(self, cmd: list[str], env: dict[str, str], result_file: str, *, nproc: int,
                 serve: bool) -> None:
        self.cmd, self.env, self.result_file, self.serve = cmd, env, result_file, serve
        self.nproc = nproc
        self.signals: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        #: every process the launcher started: pid -> (start time, rank or None)
        self.ranks: dict[int, tuple[str, int | None]] = {}
        self.lost: list[tuple[int, int | None]] = []   # (pid, rank) gone without ending

    def run(self) -> int:
        from .cli import PROG
        with self._signals():
            try:
                self.proc = subprocess.Popen(self.cmd, env=self.env, stdin=subprocess.DEVNULL,
                                             start_new_session=True, preexec_fn=_pdeathsig())
            except OSError as exc:
                print(f"{PROG} run: cannot start torch's launcher ({self.cmd[0]} -m "
                      f"torch.distributed.run): {exc}", file=sys.stderr)
                return 1
            try:
                launcher_rc = self._watch()
            finally:
                self._end_all()
        code = self._result()
        if code is not None:
            return code
        if self.signals:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        failed = self._failures()
        if self.lost:
            # A rank that vanished comes first: its peers' collectives fail because of it.
            pid, rank = self.lost[0]
            who = f"rank {rank} (pid {pid})" if rank is not None else f"a rank (pid {pid})"
            after = (f" (then rank(s) {', '.join(str(r) for r, _ in failed)} failed: their "
                     "collectives lost it)" if failed else "")
            print(f"{PROG} run: {who} died before the run's result (killed, or crashed below "
                  f"Python){after}; the run was stopped", file=sys.stderr)
            return 1
        if failed:
            rank, msg = failed[0]
            others = (f" (and rank(s) {', '.join(str(r) for r, _ in failed[1:])})"
                      if failed[1:] else "")
            print(f"{PROG} run: rank {rank} failed{others}: {msg}; the run was stopped",
                  file=sys.stderr)
            return 1
        print(f"{PROG} run: the ranks ended without a result (torch.distributed.run exit status "
              f"{launcher_rc}): a rank crashed or was killed; see the messages above",
              file=sys.stderr)
        return 1

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: Any) -> None:
            self.signals.append(signum)

        saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in saved.items():
                signal.signal(sig, old)

    def _watch(self) -> int | None:
        """Wait for the launcher; returns its exit status, or None when the run had to be
        stopped (a failed or lost rank, a second signal, ranks that did not end in time)."""
        proc = self.proc
        assert proc is not None
        deadline: float | None = None
        forwarded = 0
        next_track = 0.0
        while True:
            try:
                return proc.wait(timeout=_POLL_S)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now >= next_track:
                self._track()
                next_track = now + _TRACK_S
            if len(self.signals) > forwarded:
                if forwarded or not self._all_ready():   # a second signal, or ranks that do not
                    return None                           # take signals yet: stop now
                forwarded = len(self.signals)
                self._to_ranks(self.signals[0])
                grace = SERVE_STOP_GRACE_S if self.serve else KILL_WAIT_S
                deadline = now + grace if deadline is None else min(deadline, now + grace)
            if self._failures():
                # A peer that died makes the others' collectives fail at once: give the watch
                # a moment to see the dead rank, so the run names the cause, not the echo.
                settle = time.monotonic() + LOST_SETTLE_S
                while time.monotonic() < settle and not self._check_lost():
                    self._track()
                    time.sleep(_POLL_S)
                return None
            done = os.path.exists(self.result_file)
            if not done and not self.signals and self._check_lost():
                return None
            if deadline is None and done:
                deadline = now + END_GRACE_S
            if deadline is not None and now > deadline:
                return None

    def _track(self) -> None:
        """Remember the launcher's descendants (the ranks) and their RANK: torch's launcher
        starts each in a session of its own, so the launcher's process group does not hold them."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            for pid, start in descendants(proc.pid).items():
                if pid not in self.ranks:
                    self.ranks[pid] = (start, _rank_of(pid))

    def _live_ranks(self) -> list[int]:
        """Tracked processes still running (same pid and start time: never a reused pid)."""
        return [pid for pid, (start, _) in self.ranks.items() if _start_time(pid) == start]

    def _all_ready(self) -> bool:
        """Whether every rank handles SIGINT/SIGTERM (wrote its ``.ready`` file)."""
        folder, base = os.path.split(self.result_file)
        try:
            ready = [n for n in os.listdir(folder) if n.startswith(base + ".rank")
                     and n.endswith(".ready")]
        except OSError:
            return False
        return len(ready) >= self.nproc

    def _check_lost(self) -> bool:
        """Whether a rank process is gone without having ended (no ``.ended``/``.failed`` file
        of its rank): killed or crashed below Python. Stop the run before torch's launcher
        prints its failure banner."""
        live = set(self._live_ranks())
        for pid, (_, rank) in self.ranks.items():
            if pid in live or rank is None:
                continue
            if not os.path.exists(f"{self.result_file}.rank{rank}.ended"):
                self.lost.append((pid, rank))
        return bool(self.lost)

    def _to_ranks(self, sig: int) -> None:
        self._track()
        for pid in self._live_ranks():
            with contextlib.suppress(OSError):
                os.kill(pid, sig)

    def _end_all(self) -> None:
        """Kill what is left: the launcher's process group first (it would report the ranks'
        deaths), then every process it started; reap the launcher. Each wait is bounded."""
        proc = self.proc
        if proc is None:
            return
        self._track()
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=KILL_WAIT_S)
        deadline = time.monotonic() + KILL_WAIT_S
        while time.monotonic() < deadline:
            left = self._live_ranks()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(_POLL_S)

    def _result(self) -> int | None:
        try:
            with open(self.result_file, encoding="utf-8") as f:
                code = json.load(f)["exit_code"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return code if isinstance(code, int) and not isinstance(code, bool) else 1

    def _failures(self) -> list[tuple[int, str]]:
        folder, base = os.path.split(self.result_file)
        out = []
        try:
            names = os.listdir(folder)
        except OSError:
            return []
        for name in names:
            if name.startswith(base + ".rank") and name.endswith(".failed"):
                try:
                    with open(os.path.join(folder, name), encoding="utf-8") as f:
                        data = json.load(f)
                    out.append((int(data["rank"]), str(data["message"])))
                except (OSError, ValueError, KeyError, TypeError):
                    continue   # still being written
        return sorted(out)


def _rank_of(pid: int) -> int | None:
    """RANK from a process's environment (None: not a rank, or not readable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            try:
                return int(item[5:])
            except ValueError:
                return None
    return None


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _start_time(pid: int) -> str | None:
    """The start time of a live (not zombie) process, which tells it from a later one that
    reuses its pid; None when it is gone."""
    fields = _stat(pid)
    if fields is None or len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def descendants(root: int) -> dict[int, str]:
    """Live descendants of process ``root`` -> their start times (Linux /proc; {} elsewhere)."""
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return {}
    parent: dict[int, int] = {}
    for pid in entries:
        fields = _stat(pid)
        if fields is not None and len(fields) > 1 and fields[0] not in ("Z", "X"):
            parent[pid] = int(fields[1])
    out: dict[int, str] = {}
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier and pid not in out}
        for pid in frontier:
            start = _start_time(pid)
            if start is not None:
                out[pid] = start
    return out


def _pdeathsig() -> Callable[[], None] | None:
    """A function making the kernel SIGKILL the calling process when its parent (thread) dies:
    Linux's PR_SET_PDEATHSIG; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def apply() -> None:
        prctl(1, int(signal.SIGKILL), 0, 0, 0)    # PR_SET_PDEATHSIG = 1

    return apply


def die_with_parent() -> None:
    """End this process with its parent (Linux), so that a launcher killed outright (SIGKILL,
    which it cannot pass on) leaves no rank behind."""
    apply = _pdeathsig()
    if apply is not None:
        apply()


def marker_file(rank: int, what: str) -> str | None:
    """Where a launched rank tells the launcher it ``ended`` (normally) or ``failed`` (with its
    message); None outside ``cachescope run --nproc``."""
    result = os.environ.get(RESULT_ENV)
    if not os.environ.get(LAUNCHED_ENV) or not result:
        return None
    return f"{result}.rank{rank}.{what}"


def write_json(path: str, data: Any) -> None:
    """Write ``data`` to ``path`` atomically (a temp file renamed over it)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0] + (" ..." if len(lines) > 1 else "")
