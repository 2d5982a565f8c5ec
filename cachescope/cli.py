"""The ``cachescope`` command.

    cachescope run [options]          decode with the reference NeoX on an instrumented cache
    cachescope analyze FILE           replay a recording (``run --record FILE``) through the checker
    cachescope report FILE --out DIR  draw pictures of a recording

``main(argv)`` returns the exit status: 0 clean, 1 violations found (or the decode loop failed),
2 bad arguments (always a one-line message, never a traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

__all__ = ["main", "build_parser"]

PROG = "cachescope"
_MAX_FULL_REPORTS = 20


class UsageError(Exception):
    """A bad argument or environment problem: reported in one line, exit status 2."""


class _Stopped(Exception):
    """Raised from the step callback when SIGINT/SIGTERM asked ``--serve`` to stop."""


# ----------------------------------------------------------------------------- argument types

def _fault_arg(text: str) -> Any:
    """A fault of the reference model's catalogue, or else of the HF one (``--backend hf``);
    which backend may use it is checked once the backend is known."""
    from .faults import parse_fault
    try:
        return parse_fault(text)
    except ValueError as exc:
        try:
            from .hf import HF_FAULTS, parse_hf_fault
            return parse_hf_fault(text)
        except (ValueError, ImportError):
            msg = str(exc)
            if msg.startswith("unknown fault"):
                msg += f"; with --backend hf: {', '.join(HF_FAULTS)}"
            raise argparse.ArgumentTypeError(msg) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _port_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535 (0 picks a free one), got {value}")
    return value


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _ratio_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _prompt_ids_arg(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated token ids like 1,2,3, got {text!r}") from None
    if not ids or any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"token ids must be non-negative integers, got {text!r}")
    return ids


# ----------------------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise instead of exiting, so ``main`` returns 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    from .faults import FAULTS
    parser = _Parser(
        prog=PROG,
        description="Find out which layer got whose keys/values in a GPT-NeoX-style decode loop.",
        epilog="Run 'cachescope run' for the main job; 'cachescope COMMAND --help' for options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    faults_help = "; ".join(f"{name}: {spec.doc}" for name, spec in FAULTS.items())
    run = sub.add_parser(
        "run", help="decode with the reference NeoX model on an instrumented cache (the main job)",
        description="Decode with the reference GPT-NeoX model on an InstrumentedCache and print a "
                    "summary: tokens/s, ops by kind, peak queue depth and bytes, violations with "
                    "their reports. Exit status: 0 clean, 1 violations or a failed decode, 2 bad "
                    "arguments.")
    g = run.add_argument_group("model and decode")
    g.add_argument("--preset", choices=("tiny", "pythia-70m", "pythia-160m"), default="tiny",
                   help="model shape (random seeded weights; default: tiny)")
    g.add_argument("--checkpoint", metavar="DIR",
                   help="load a Hugging Face GPT-NeoX checkpoint directory instead of a preset")
    prompt = g.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-tokens", type=_positive_int, metavar="N", default=None,
                        help="random prompt of N token ids drawn with --seed (default: 8)")
    prompt.add_argument("--prompt-ids", type=_prompt_ids_arg, metavar="IDS",
                        help="explicit prompt, comma-separated token ids (e.g. 1,2,3)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N",
                   help="tokens to generate (default: 32)")
    g.add_argument("--seed", type=_int_arg, default=0, help="seed of the random prompt (default: 0)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    g.add_argument("--backend", choices=("neox", "hf"), default="neox",
                   help="neox: the reference model on an InstrumentedCache (default); hf: "
                        "transformers' GPTNeoXForCausalLM.generate on a cache checked by "
                        "cachescope.hf (presets: the reference model's seeded weights, converted)")
    g = run.add_argument_group("checking")
    g.add_argument("--fault", action="append", type=_fault_arg, default=[],
                   metavar="NAME[@STEP][:K=V,...]",
                   help="inject a named ordering fault (repeatable). " + faults_help)
    g.add_argument("--strict", action="store_true",
                   help="stop at the first violation (report it, exit 1)")
    g.add_argument("--cache-name", default="default", metavar="NAME",
                   help="name of the cache in metrics, traces and reports (default: default)")
    g = run.add_argument_group("output")
    g.add_argument("--quiet", action="store_true",
                   help="print only violation reports and errors (no progress, no summary)")
    g.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    g.add_argument("--progress", action="store_true",
                   help="show a progress line on stderr even when it is not a terminal")
    g = run.add_argument_group("exporters")
    g.add_argument("--metrics-port", type=_port_arg, metavar="PORT",
                   help="serve Prometheus metrics on this port (0: a free one)")
    g.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                   help="address the metrics server binds (default: 127.0.0.1)")
    g.add_argument("--serve", action="store_true",
                   help="keep generating until SIGINT/SIGTERM (for dashboards), then exit 0; "
                        "faults are injected in every generation")
    g.add_argument("--otlp-endpoint", metavar="URL",
                   help="export traces over OTLP/HTTP, e.g. http://localhost:4318")
    g.add_argument("--console-traces", action="store_true", help="print spans to stderr")
    g.add_argument("--trace-sample", type=_ratio_arg, default=1.0, metavar="RATIO",
                   help="fraction of generations traced (default: 1.0)")
    g.add_argument("--record", metavar="FILE",
                   help="record every cache op to a JSON-lines file (.gz to compress) for "
                        "'cachescope analyze' / 'report'")

    g = run.add_argument_group(
        "multi-rank (torch.distributed)",
        "Decode with a tensor/pipeline-parallel model on N ranks, each with its own checked cache, "
        "plus a cross-rank check. '--nproc N' launches the ranks on this machine with torch's "
        "launcher (python -m torch.distributed.run); under torchrun, 'cachescope run --tp T --pp P' "
        "is one rank. Per rank: metrics on --metrics-port + local rank, --record FILE -> "
        "FILE's name + '.rank{r}'.")
    g.add_argument("--nproc", type=_positive_int, metavar="N",
                   help="launch N ranks on this machine (default layout: --tp N --pp 1)")
    g.add_argument("--tp", type=_positive_int, metavar="T",
                   help="tensor-parallel ranks per pipeline stage (must divide the heads)")
    g.add_argument("--pp", type=_positive_int, metavar="P", help="pipeline stages (default: 1)")
    g.add_argument("--rank-check-every", type=_positive_int, default=1, metavar="K",
                   help="compare the ranks' fingerprints every K steps (default: 1)")
    g.add_argument("--stall-timeout", type=_seconds_arg, default=10.0, metavar="SECONDS",
                   help="a rank behind its peers this long is reported as rank_stalled and the "
                        "run ends (default: 10)")
    g.add_argument("--targets-file", metavar="PATH", default=None,
                   help="with --metrics-port: write a Prometheus file_sd file listing every "
                        "rank's /metrics (written with --serve, or whenever this is given; "
                        "default: ./cachescope-targets.json)")

    analyze = sub.add_parser("analyze", help="replay a recording through the checker",
                             description="Replay a recording made with 'cachescope run --record "
                                         "FILE' and report what the checker finds.")
    analyze.add_argument("file", metavar="FILE", nargs="+",
                         help="recording (.jsonl or .jsonl.gz); several: the per-rank recordings "
                              "of one multi-rank run (run.rank*.jsonl.gz), compared step by step")
    analyze.add_argument("--quiet", action="store_true", help="print only violations")
    analyze.add_argument("--out", metavar="FILE", default=None,
                         help="write the analysis to FILE instead of stdout ('-': stdout)")
    analyze.add_argument("--progress", action="store_true",
                         help="show a percentage on stderr while reading")

    report = sub.add_parser("report", help="draw pictures of a recording",
                            description="Draw queue depth, bytes and violation pictures of a "
                                        "recording into a directory.")
    report.add_argument("file", metavar="FILE", nargs="+",
                        help="recording (.jsonl or .jsonl.gz); several: the per-rank recordings "
                             "of one multi-rank run, drawn side by side")
    report.add_argument("--out", metavar="DIR", default=None,
                        help="output directory, created if needed (default: FILE's name + "
                             "'-report', next to it)")
    report.add_argument("--quiet", action="store_true", help="do not list the files written")
    report.add_argument("--progress", action="store_true",
                        help="show a percentage on stderr while reading")
    return parser


def _version() -> str:
    from . import __version__
    return __version__


# ----------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cachescope`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        try:
            ns = parser.parse_args(argv)
        except SystemExit as exc:   # --help / --version
            return exc.code if isinstance(exc.code, int) else 0
        if ns.command is None:
            parser.print_help(sys.stderr)
            return 2
        try:
            if ns.command == "run":
                return _cmd_run(ns)
            if ns.command == "analyze":
                return _cmd_delegate(ns, "analyze", "main_analyze")
            return _cmd_delegate(ns, "plots", "main_report")
        except UsageError as exc:
            msg = str(exc)
            raise UsageError(msg if msg.startswith(PROG) else f"{PROG} {ns.command}: error: {msg}") from None
    except UsageError as exc:
        msg = str(exc)
        if not msg.startswith(PROG):
            msg = f"{PROG}: error: {msg}"
        print(msg, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _cmd_delegate(ns: argparse.Namespace, module: str, func: str) -> int:
    """``analyze`` / ``report``: check the file(s), then hand over to the module that does the
    work (one file as a str, several as a list: the per-rank recordings of one run)."""
    paths = list(ns.file) if isinstance(ns.file, (list, tuple)) else [ns.file]
    for path in paths:
        if not os.path.exists(path):
            raise UsageError(f"no such file: {path}")
        if os.path.isdir(path):
            raise UsageError(f"{path} is a directory; expected a recording file")
    if len(set(map(os.path.abspath, paths))) < len(paths):
        raise UsageError(f"a recording is given twice: {' '.join(paths)}")
    ns.file = paths[0] if len(paths) == 1 else paths
    path = paths[0] if len(paths) == 1 else f"{len(paths)} recordings"
    import importlib
    try:
        mod = importlib.import_module(f"cachescope.{module}")
        fn = getattr(mod, func)
    except ImportError as exc:
        raise UsageError(f"'{PROG} {ns.command}' is not available: {exc} (install the extras: "
                         "pip install 'cachescope[cli]')") from None
    except AttributeError:
        raise UsageError(f"'{PROG} {ns.command}' is not available: cachescope.{module} has no "
                         f"{func}()") from None
    try:
        result = fn(ns)
    except (ValueError, OSError) as exc:
        raise UsageError(f"{path}: {_one_line(exc)}") from None
    except RecursionError:   # the reader refuses deep nesting; this is the last line of defence
        raise UsageError(f"{path}: a line nests lists/objects too deep to analyze; this is not a "
                         "recording cachescope wrote: record the run again") from None
    return int(result or 0)


def _one_line(exc: BaseException) -> str:
    """The first line of ``str(exc)`` (``...`` when more followed): messages stay one line."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0] + (" ..." if len(lines) > 1 else "")


# ----------------------------------------------------------------------------- run

class Progress:
    """A single self-rewriting stderr line: step, tokens/s, violations."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self._last = 0.0
        self._shown = False

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        sys.stderr.write(f"\r{PROG}: {text}\x1b[K" if sys.stderr.isatty() else f"{PROG}: {text}\n")
        sys.stderr.flush()
        self._shown = True

    def done(self) -> None:
        if self.enabled and self._shown and sys.stderr.isatty():
            sys.stderr.write("\n")
            sys.stderr.flush()
        self._shown = False


def _check_device(name: str) -> Any:
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: unknown device {name!r}; use cpu or cuda[:N]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available (torch {torch.__version__}"
                             f"{' has no CUDA support' if torch.version.cuda is None else ' sees no GPU'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"--device: {name!r} is not supported; use cpu or cuda[:N]")
    return device


def _build_model(ns: argparse.Namespace, device: Any) -> tuple[Any, str]:
    from .neox import CheckpointError, NeoXConfig, NeoXModel, load_hf_checkpoint
    if ns.checkpoint:
        if not os.path.isdir(ns.checkpoint):
            raise UsageError(f"--checkpoint: {ns.checkpoint} is not a directory (expected a Hugging "
                             "Face GPT-NeoX checkpoint: config.json + weights)")
        try:
            model = load_hf_checkpoint(ns.checkpoint, device=device)
        except CheckpointError as exc:
            raise UsageError(f"--checkpoint: {_one_line(exc)}") from None
        return model, f"checkpoint {ns.checkpoint}"
    model = NeoXModel(NeoXConfig.preset(ns.preset)).to(device)
    return model, f"preset {ns.preset}"


def prompt_ids(ns: argparse.Namespace, config: Any) -> list[int]:
    import torch
    if ns.prompt_ids is not None:
        bad = [i for i in ns.prompt_ids if i >= config.vocab_size]
        if bad:
            raise UsageError(f"--prompt-ids: token id(s) {', '.join(map(str, bad))} out of range "
                             f"for a vocabulary of {config.vocab_size} (valid: 0..{config.vocab_size - 1})")
        ids = list(ns.prompt_ids)
    else:
        n = ns.prompt_tokens if ns.prompt_tokens is not None else 8
        g = torch.Generator().manual_seed(ns.seed)
        ids = torch.randint(0, config.vocab_size, (n,), generator=g).tolist()
    limit = config.max_position_embeddings
    if len(ids) + ns.max_new_tokens > limit:
        raise UsageError(f"prompt ({len(ids)} tokens) + --max-new-tokens ({ns.max_new_tokens}) "
                         f"exceeds the model's max_position_embeddings ({limit})")
    return ids


def _check_faults(ns: argparse.Namespace, model: Any) -> None:
    from ._cache import Cache
    from .faults import inject
    for f in ns.fault:
        if f.step >= ns.max_new_tokens:
            raise UsageError(f"--fault {f}: step {f.step} never comes: the run has "
                             f"{ns.max_new_tokens} step(s), 0..{ns.max_new_tokens - 1} (step 0 is "
                             "the prompt); raise --max-new-tokens or pick an earlier step")
    if ns.fault:
        try:   # resolves default layers and checks indices against the model, changes nothing
            with inject(ns.fault, model.layers, Cache(), model=model) as handle:
                ns.fault = list(handle.faults)
        except ValueError as exc:
            msg = str(exc)
            raise UsageError(f"--{msg}" if msg.startswith("fault ") else f"--fault: {msg}") from None


@contextlib.contextmanager
def _signals(stop: threading.Event, enabled: bool) -> Iterator[None]:
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        stop.set()

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def serve_metrics(ns: argparse.Namespace, metrics_mod: Any) -> Any:
    """``--metrics-port``: start the ``/metrics`` server and say where on stderr; returns the
    server (``shutdown()``). A port that cannot be used is a one-line UsageError."""
    try:
        server, _thread, port = metrics_mod.start_metrics_server(ns.metrics_port, ns.metrics_addr)
    except (metrics_mod.MetricsServerError, OSError, ValueError) as exc:
        raise UsageError(f"--metrics-port: {exc}") from None
    print(f"{PROG}: serving metrics on http://{url_host(ns.metrics_addr)}:{port}/metrics",
          file=sys.stderr, flush=True)
    return server


def stop_telemetry(server: Any, provider: Any) -> None:
    """The end of a run: stop the ``/metrics`` server and flush and shut down the tracer provider
    the run made (either may be None); never raises for the server."""
    if server is not None:
        with contextlib.suppress(Exception):
            server.shutdown()
            server.server_close()
    if provider is not None:
        from . import _sdk
        _sdk.shutdown(provider)


def open_recorder(ns: argparse.Namespace, cache: Any, run_info: dict[str, Any]) -> Any:
    """``--record FILE``: a ``cachescope.record.Recorder`` attached to ``cache`` (one-line
    UsageErrors for a missing module or a file that cannot be written)."""
    try:
        from .record import Recorder
    except ImportError as exc:
        raise UsageError(f"--record is not available: {exc}") from None
    try:
        recorder = Recorder(ns.record, run_info=run_info)
    except OSError as exc:
        raise UsageError(f"--record: cannot write {ns.record}: {exc.strerror or exc}") from None
    recorder.attach(cache)
    return recorder


def tracer_provider(ns: argparse.Namespace) -> Any:
    """The OpenTelemetry SDK ``TracerProvider`` that ``--otlp-endpoint`` / ``--console-traces``
    ask for (None without them; shut it down with ``_sdk.shutdown``). ``UsageError`` when the SDK
    is missing or the endpoint is bad."""
    if not (ns.otlp_endpoint or ns.console_traces):
        return None
    try:
        from . import _sdk
    except ImportError as exc:
        raise UsageError(f"tracing needs the OpenTelemetry SDK ({exc}): pip install "
                         "'cachescope[cli]'") from None
    try:
        return _sdk.configure_tracing(ns.otlp_endpoint, ns.console_traces, ns.trace_sample)
    except ValueError as exc:
        raise UsageError(f"--otlp-endpoint: {exc}") from None


def url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def _cmd_run(ns: argparse.Namespace) -> int:
    if ns.backend == "hf":
        from . import _hfrun
        return _hfrun.run(ns)
    from .faults import Fault
    for f in ns.fault:
        if not isinstance(f, Fault):
            raise UsageError(f"--fault {f}: a fault of transformers' cache (cachescope.hf), not "
                             "of the reference model; run it with --backend hf")
    from . import _multirank
    if _multirank.wanted(ns):   # --nproc/--tp/--pp, or a rank started by torchrun
        return _multirank.run(ns)

    import cachescope
    from .faults import inject
    from .neox import generate

    device = _check_device(ns.device)
    model, model_desc = _build_model(ns, device)
    config = model.config
    prompt = prompt_ids(ns, config)
    _check_faults(ns, model)

    provider = tracer_provider(ns)
    metrics_mod = None
    if ns.metrics_port is not None:
        try:
            from . import metrics as metrics_mod
        except ImportError as exc:
            raise UsageError(f"metrics need prometheus_client ({exc}): pip install cachescope") from None

    if cachescope.installed() is not None:
        raise UsageError("another InstrumentedCache is already installed in this process")
    try:
        cache = cachescope.InstrumentedCache(
            name=ns.cache_name, strict=ns.strict, metrics=metrics_mod is not None,
            tracing=provider is not None, tracer_provider=provider)
    except ValueError as exc:
        raise UsageError(f"--cache-name: {exc}") from None

    server = None
    recorder = None
    watch = None
    cachescope.install(cache)
    try:
        if metrics_mod is not None:
            server = serve_metrics(ns, metrics_mod)
        if ns.record:
            recorder = open_recorder(ns, cache, {
                "model": model_desc, "prompt_tokens": len(prompt),
                "max_new_tokens": ns.max_new_tokens, "faults": [str(f) for f in ns.fault],
                "device": str(device)})
        watch = cachescope.watch(model, cache)
        return _decode(ns, model, model_desc, cache, prompt, inject, generate)
    finally:
        if watch is not None:
            watch.remove()
        if recorder is not None:
            recorder.close()
        cachescope.uninstall()
        stop_telemetry(server, provider)
        for sink in (cache.metrics, cache.tracer):
            close = getattr(sink, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()


class GenerationLoop:
    """The run loop of ``cachescope run`` (both backends): one generation, or with ``--serve`` one
    after another until SIGINT/SIGTERM; progress on stderr; the first generation's fault events;
    what ended the run; then the summary (``finish``).

    ``violations()``: how many violations the run's cache holds now (progress line, and whether an
    exception of the model is explained by them)."""

    def __init__(self, ns: argparse.Namespace, violations: Callable[[], int]) -> None:
        self.ns = ns
        self._violations = violations
        self.stop = threading.Event()
        self.progress = Progress((sys.stderr.isatty() and not ns.quiet) or ns.progress,
                                 ns.max_new_tokens)
        self.events: list[Any] = []
        self.not_fired: list[str] = []
        self.error: str | None = None
        self.generations = 0
        self.tokens_total = 0
        self.last_tokens: list[int] = []
        self.t0 = time.perf_counter()
        self.elapsed = 0.0

    def on_token(self, i: int) -> bool:
        """Token ``i`` (0-based) of the current generation was made; True when ``--serve`` was
        asked to stop."""
        self.tokens_total += 1
        elapsed = time.perf_counter() - self.t0
        gen = f"generation {self.generations}, " if self.ns.serve else ""
        self.progress.update(f"{gen}step {i + 1}/{self.ns.max_new_tokens}, {self.tokens_total} "
                             f"tokens, {self.tokens_total / elapsed if elapsed > 0 else 0:.1f} "
                             f"tokens/s, {self._violations()} violation(s)")
        return self.stop.is_set()

    def run(self, generate_once: Callable[[], list[int]], inject: Callable[[], Any] | None,
            fault_events: Callable[[Any], list[Any]], errors: tuple[type[BaseException], ...],
            what: str, always: tuple[type[BaseException], ...] = ()) -> None:
        """Run the generations. ``inject()``: the fault context of one generation (None: no
        fault); ``fault_events(handle)``: its events as the summary lists them; an exception in
        ``errors`` ends the generation as "``what`` raised ..." when the cache holds violations
        that explain it (or it is one of ``always``), else it propagates."""
        from ._records import PopOrderError
        ns = self.ns
        with _signals(self.stop, ns.serve):
            while True:
                self.generations += 1
                tokens: list[int] = []
                try:
                    with (inject() if inject is not None else contextlib.nullcontext()) as handle:
                        try:
                            tokens = generate_once()
                        finally:
                            if handle is not None and self.generations == 1:
                                self.events = fault_events(handle)
                                self.not_fired = [str(f) for f in handle.not_fired()]
                except _Stopped:
                    break
                except PopOrderError as exc:
                    self.error = (f"stopped at the first violation (--strict): "
                                  f"{exc.violation.summary()}")
                    if not ns.serve:
                        break
                except errors as exc:
                    if not self._violations() and not isinstance(exc, always):
                        raise
                    self.error = f"{what} raised {type(exc).__name__}: {exc_text(exc)}"
                self.last_tokens = tokens or self.last_tokens
                if not ns.serve or self.stop.is_set():
                    break
        self.elapsed = time.perf_counter() - self.t0
        self.progress.done()

    def finish(self, model: Any, model_desc: str, cache: Any, prompt: list[int],
               violations: list[Any], extra: dict[str, Any] | None = None) -> int:
        """Print the summary (``--json`` or human) and return the exit status."""
        ns = self.ns
        exit_code = 1 if (violations or self.error) and not ns.serve else 0
        summary = run_summary(ns, model, model_desc, cache, prompt, self.generations,
                              self.tokens_total, self.elapsed, self.events, self.not_fired,
                              self.error, self.last_tokens, exit_code)
        summary.update(extra or {})
        if ns.json:
            print(json.dumps(summary, indent=2, default=str))
        else:
            _print_human(ns, cache, summary, violations)
        return exit_code


def _decode(ns: argparse.Namespace, model: Any, model_desc: str, cache: Any, prompt: list[int],
            inject: Any, generate: Any) -> int:
    from .faults import InjectedFault
    from .neox import logits_for
    logits_for(model, prompt)   # warm-up on a throwaway cache, so tokens/s measures decoding
    loop = GenerationLoop(ns, lambda: len(cache.violations))

    def on_step(i: int, _token: int) -> None:
        if loop.on_token(i):
            raise _Stopped()

    loop.run(lambda: generate(model, prompt, ns.max_new_tokens, cache=cache, on_step=on_step),
             (lambda: inject(ns.fault, model.layers, cache, model=model)) if ns.fault else None,
             lambda handle: list(handle.events), (IndexError, KeyError, InjectedFault),
             "the decode loop", always=(InjectedFault,))
    return loop.finish(model, model_desc, cache, prompt, list(cache.violations))


def exc_text(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def run_summary(ns: argparse.Namespace, model: Any, model_desc: str, cache: Any, prompt: list[int],
             generations: int, tokens: int, elapsed: float, events: list[Any],
             not_fired: list[str], error: str | None, last_tokens: list[int],
             exit_code: int) -> dict[str, Any]:
    stats = cache.stats
    families = {
        fam: {"depth": fs.depth, "peak_depth": fs.peak_depth,
              "logical_bytes": fs.logical, "storage_bytes": fs.storage,
              "peak_logical_bytes": fs.peak_logical, "peak_storage_bytes": fs.peak_storage,
              "queues_live": fs.live, "queues_empty": fs.empty, "ops": fs.ops(),
              "violations": dict(fs.violations)}
        for fam, fs in sorted(stats.families.items()) if fs.push or fs.pop}
    config = model.config
    return {
        "model": model_desc, "layers": config.num_layers, "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size, "device": str(next(model.parameters()).device),
        "cache": cache.name, "prompt_tokens": len(prompt), "max_new_tokens": ns.max_new_tokens,
        "generations": generations, "tokens": tokens, "steps": stats.steps,
        "elapsed_s": round(elapsed, 6), "tokens_per_s": round(tokens / elapsed, 3) if elapsed > 0 else None,
        "ops": stats.ops_by_op(), "total_ops": stats.total_ops(),
        "peak_queue_depth": stats.peak_depth(),
        "peak_bytes": {"logical": max((f["peak_logical_bytes"] for f in families.values()), default=0),
                       "storage": max((f["peak_storage_bytes"] for f in families.values()), default=0)},
        "families": families,
        "faults": [{"spec": str(f), "expected_kinds": list(f.expected_kinds)} for f in ns.fault],
        "fault_events": [{"fault": str(e.fault), "step": e.step, "cache_step": e.cache_step,
                          "what": e.what} for e in events],
        "faults_not_fired": not_fired,
        "violations_by_kind": stats.violations_by_kind(),
        "violations_dropped": stats.violations_dropped,
        "violations": [dict(v.to_dict(), report=v.report()) for v in cache.violations],
        "error": error, "output_tokens": last_tokens, "exit_code": exit_code,
    }


def _print_human(ns: argparse.Namespace, cache: Any, s: dict[str, Any], violations: list[Any]) -> None:
    from ._values import format_bytes
    out: list[str] = []
    if not ns.quiet:
        out.append(f"{PROG} run: {s['model']} ({s['layers']} layers, hidden {s['hidden_size']}, "
                   f"vocab {s['vocab_size']}) on {s['device']}; prompt {s['prompt_tokens']} tokens, "
                   f"{s['max_new_tokens']} new tokens"
                   + (f", {s['generations']} generation(s)" if ns.serve else ""))
        rate = f"{s['tokens_per_s']:.1f}" if s["tokens_per_s"] is not None else "n/a"
        out.append(f"generated {s['tokens']} tokens in {s['elapsed_s']:.2f} s ({rate} tokens/s)")
        for e in s["fault_events"]:
            out.append(f"fault {e['fault']} fired at step {e['step']}: {e['what']}")
        for f in s["faults_not_fired"]:
            out.append(f"fault {f} did not fire (its step did not come, or it had nothing to act on)")
        out.append(cache.report())
        out.extend(f"  {line}" for line in s.get("notes", ()))
        out.append(f"  peak queue depth: {s['peak_queue_depth']}   peak bytes held: "
                   f"{format_bytes(s['peak_bytes']['logical'])} logical / "
                   f"{format_bytes(s['peak_bytes']['storage'])} storage")
    if s["error"]:
        out.append(f"{PROG}: {s['error']}")
    for v in violations[:_MAX_FULL_REPORTS]:
        out.append(v.report())
    if len(violations) > _MAX_FULL_REPORTS:
        out.append(f"... {len(violations) - _MAX_FULL_REPORTS} more violation report(s) not shown "
                   "(use --json for all)")
    if not ns.quiet:
        if violations:
            out.append(f"result: {len(violations)} violation(s) "
                       f"({', '.join(f'{k}={n}' for k, n in sorted(s['violations_by_kind'].items()))})")
        elif s["error"]:
            out.append("result: the decode loop failed")
        else:
            out.append("result: no violations")
    if out:
        print("\n".join(out))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
