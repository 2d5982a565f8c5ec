"""Record a decode loop's cache ops to a JSON-lines file, for ``cachescope analyze`` / ``report``.

    with cachescope.record.record(cache, "run.jsonl.gz", model="pythia-70m"):
        generate(model, prompt, 64, cache=cache)

or, for any loop, ``rec = record_to("run.jsonl")`` ... ``rec.close()`` (also a context manager).

A ``Recorder`` is a sink (docs/DESIGN.md): the cache calls it after every op, violation, step
and generation. It writes one header line, then one line per event; the format is documented,
field by field, in docs/record-format.md. No token ids and no tensor contents are written: only
shapes, dtypes, devices, byte counts, storage identities and the ``state_ids`` values.

Lines are buffered (``buffer_ops`` lines) and written at flush points (a full buffer, the end
of a generation, ``flush()``, ``close()``). Writing never breaks the decode loop: the first
write error is logged once, recording stops, and later lines are dropped (counted in
``lines_dropped``). Paths ending in ``.gz`` are gzip-compressed.

In a multi-rank run each rank records its own cache to its own file (``run.rank{r}.jsonl.gz``,
``run_info`` with ``rank``, ``tp_rank``, ``pp_rank``, ``tp``, ``pp``, ``world_size``); the header
also gets a ``dist`` block when ``torch.distributed`` is initialised. ``note_inputs(ids)`` adds a
keyed digest of the step's input token ids (never the ids), so ``cachescope analyze`` of all the
ranks' files can compare the ranks' inputs as the live cross-rank checker does.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import hashlib
import io
import json
import logging
import os
import platform
import socket
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

__all__ = ["FORMAT", "VERSION", "Recorder", "record", "record_to", "encode_value", "inputs_digest"]

log = logging.getLogger("cachescope")

FORMAT = "cachescope-record"
VERSION = 1

_MAX_REPR = 1000          # characters kept of repr() of a state value that is not plain JSON
_MAX_SEQ_ITEMS = 64       # tuples/lists longer than this are written as their repr
_VALUE_MEMO = 1024        # distinct value summaries whose JSON text is kept
_STR_MEMO = 4096          # distinct (op, queue, family, owner, site, ...) whose JSON text is kept


def _jsonable(x: Any) -> Any:
    """``default=`` for json: anything not JSON is written as its (bounded) repr."""
    try:
        s = repr(x)
    except Exception:
        s = f"<{type(x).__name__}>"
    return s if len(s) <= _MAX_REPR else s[:_MAX_REPR - 3] + "..."


_dumps = json.JSONEncoder(separators=(",", ":"), default=_jsonable).encode


def encode_value(x: Any, _depth: int = 0) -> Any:
    """A ``state_ids`` value as JSON that ``analyze`` turns back into an equal-looking value.

    None, bools, ints, floats and strings are written as themselves; lists as JSON arrays;
    tuples as ``{"tuple": [...]}``; anything else as ``{"repr": repr(x), "type": type name}``.
    """
    t = type(x)
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    if (t is tuple or t is list) and len(x) <= _MAX_SEQ_ITEMS and _depth < 4:
        items = [encode_value(e, _depth + 1) for e in x]
        return {"tuple": items} if t is tuple else items
    return {"repr": _jsonable(x), "type": t.__name__}


def _key(k: Any) -> Any:
    """A storage key as JSON: an int (the storage's address), else its repr as a string."""
    return k if type(k) is int else _dumps(repr(k))


def _host() -> dict[str, Any]:
    info: dict[str, Any] = {"pid": os.getpid()}
    for key, fn in (("hostname", socket.gethostname), ("platform", platform.platform),
                    ("python", platform.python_version)):
        try:
            info[key] = fn()
        except Exception:  # pragma: no cover - exotic platforms
            info[key] = None
    torch = sys.modules.get("torch")    # never import it: only report the one in use
    info["torch"] = getattr(torch, "__version__", None) if torch is not None else None
    return info


def _dist() -> dict[str, Any] | None:
    """This process's place in an initialised ``torch.distributed`` world, else None. Never
    imports torch (only reads a ``torch.distributed`` the process already imported)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return None
    try:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        info: dict[str, Any] = {"rank": int(dist.get_rank()),
                                "world_size": int(dist.get_world_size())}
        info["backend"] = str(dist.get_backend())
    except Exception:
        return None
    env = os.environ
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    info["master"] = f"{addr}:{port}" if addr and port else None
    info["run_id"] = env.get("TORCHELASTIC_RUN_ID")
    local = env.get("LOCAL_RANK")
    info["local_rank"] = int(local) if local and local.isdigit() else None
    return info


def inputs_digest(ids: Iterable[int], key: bytes) -> str:
    """The digest ``note_inputs`` writes: BLAKE2b-64 of the ids as int64s, keyed with ``key``
    (without the key, a digest of a few token ids could be inverted by trying every token)."""
    try:
        data = array("q", ids).tobytes()
    except (TypeError, OverflowError, ValueError):
        data = repr(list(ids)).encode("utf-8", "replace")
    return hashlib.blake2b(data, digest_size=8, key=key).hexdigest()


def _is_binary(f: Any) -> bool:
    if isinstance(f, io.TextIOBase):
        return False
    if isinstance(f, (io.RawIOBase, io.BufferedIOBase)):
        return True
    return "b" in str(getattr(f, "mode", ""))


class Recorder:
    """A sink that writes every op, violation, step and generation of one cache as JSON lines.

    It is the one exporter that needs every op as it happens (``on_op``) and value summaries
    (``needs_values``): attaching it makes the cache build a record and measure shapes per op.

    ``path_or_file``: a path (``.gz`` for gzip; the file is created or truncated now, so a bad
    path fails here, before the decode loop) or an open file object (text or binary; flushed
    but not closed by ``close()``). ``run_info``: JSON-able facts about the run, written to the
    header (model, prompt length, ...; a rank of a multi-rank run: ``rank``, ``tp_rank``,
    ``pp_rank``, ``tp``, ``pp``, ``world_size``). ``buffer_ops``: lines held in memory between
    writes. ``inputs_key``: the secret (bytes or str, up to 64 bytes, the same on every rank of a
    run, never written) that keys ``note_inputs`` digests; without it ``note_inputs`` writes
    nothing.

    Attach with ``recorder.attach(cache)`` (writes the header with the cache's exact state) or
    ``cache.add_sink(recorder)`` (the header is written at the first event). ``close()``
    detaches, flushes and closes; a ``with`` block does the same on exit.
    """

    #: The cache measures shapes, dtypes and devices of pushed values for this sink.
    needs_values = True

    def __init__(self, path_or_file: str | os.PathLike[str] | IO[Any], *,
                 run_info: dict[str, Any] | None = None, buffer_ops: int = 1024,
                 inputs_key: bytes | str | None = None) -> None:
        self.run_info = dict(run_info or {})
        key = inputs_key.encode("utf-8") if isinstance(inputs_key, str) else inputs_key
        if key is not None and not (isinstance(key, bytes) and 0 < len(key) <= 64):
            size = f" of {len(key)} bytes" if isinstance(key, bytes) else ""
            raise ValueError(f"inputs_key must be 1 to 64 bytes or a str (one secret shared by "
                             f"every rank of the run), got {type(inputs_key).__name__}{size}")
        self._inputs_key = key
        self.buffer_ops = max(1, int(buffer_ops))
        self.path: Path | None = None
        self.failed: BaseException | None = None   # the write error that stopped recording
        self.lines_written = 0
        self.lines_dropped = 0
        self.closed = False
        self._buf: list[str] = []
        self._lock = threading.Lock()
        self._cache: Any = None
        self._header = False
        self._boundary_pending = False   # a state_ids set was logged; its on_step_start follows
        self._aliases = 0
        self._gets = 0
        self._stats_at = -1
        self._values: dict[Any, str] = {}
        self._strs: dict[Any, str] = {}
        self._names: dict[Any, str] = {}
        if isinstance(path_or_file, (str, os.PathLike)):
            self.path = Path(path_or_file)
            raw = open(self.path, "wb")  # noqa: SIM115 - closed in close()
            self._file: Any = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) \
                if self.path.name.endswith(".gz") else raw
            self._raw: Any = raw
            self._own = True
            self._binary = True
        else:
            self._file = self._raw = path_or_file
            self._own = False
            self._binary = _is_binary(path_or_file)

    # ------------------------------------------------------------------ lifecycle
    def attach(self, cache: Any) -> "Recorder":
        """Write the header (if not yet written) and add this recorder as a sink of ``cache``."""
        with self._lock:
            if self._cache is not None and self._cache is not cache:
                raise ValueError(f"this Recorder already records cache {self._cache.name!r}; "
                                 "use one Recorder per cache")
            self._cache = cache
            if not self._header:
                self._write_header(cache, getattr(cache, "seq", 0))
        cache.add_sink(self)
        return self

    def detach(self) -> None:
        """Stop receiving events (the file stays open until ``close()``)."""
        cache = self._cache
        if cache is not None:
            with contextlib.suppress(Exception):
                cache.remove_sink(self)

    def flush(self) -> None:
        """Write the buffered lines now."""
        with self._lock:
            self._flush()

    def close(self) -> None:
        """Detach, write the remaining lines (and final counters), close the file. Idempotent."""
        if self.closed:
            return
        self.detach()
        with self._lock:
            if self.closed:
                return
            cache = self._cache
            if not self._header:
                self._write_header(cache, getattr(cache, "seq", 0))
            if cache is not None and self._stats_at != self._lines():
                self._write_stats(cache)   # final get counts (gets are not sent to sinks)
            self._flush()
            self.closed = True
            try:
                if self._own:
                    self._file.close()
                    if self._raw is not self._file:
                        self._raw.close()
                elif self.failed is None and hasattr(self._file, "flush"):
                    self._file.flush()
            except Exception as exc:
                self._fail(exc)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else type(self._file).__name__
        return (f"Recorder({where!r}, lines_written={self.lines_written}, "
                f"failed={self.failed is not None})")

    # ------------------------------------------------------------------ writing
    def _fail(self, exc: BaseException) -> None:
        if self.failed is None:
            self.failed = exc
            log.warning("cachescope: recorder could not write to %s (%s: %s); recording stopped, "
                        "the decode loop continues", self.path or type(self._file).__name__,
                        type(exc).__name__, exc)

    def _add(self, line: str) -> None:
        """Buffer one line (lock held)."""
        if self.failed is not None or self.closed:
            self.lines_dropped += 1
            return
        buf = self._buf
        buf.append(line)
        if len(buf) >= self.buffer_ops:
            self._flush()

    def _flush(self) -> None:
        buf = self._buf
        if not buf:
            return
        self._buf = []
        if self.failed is not None or self.closed:
            self.lines_dropped += len(buf)
            return
        text = "\n".join(buf) + "\n"
        try:
            self._file.write(text.encode("utf-8") if self._binary else text)
        except Exception as exc:
            self.lines_dropped += len(buf)
            self._fail(exc)
            return
        self.lines_written += len(buf)

    def _write_header(self, cache: Any, start_seq: int) -> None:
        self._header = True
        from . import __version__
        attributor = getattr(cache, "attributor", None)
        header = {
            "type": "header", "format": FORMAT, "version": VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "cache": getattr(cache, "name", None),
            "run": self.run_info,
            "host": _host(),
            "cachescope_version": __version__,
            "state_key": getattr(cache, "state_key", "state_ids"),
            "timeline_size": getattr(cache, "timeline_size", None),
            "max_violations": getattr(cache, "max_violations", None),
            "attribution": getattr(attributor, "mode", None),
            "start_seq": int(start_seq or 0),
            "start_step": getattr(cache, "step", -1),
        }
        dist = _dist()
        if dist is not None:
            header["dist"] = dist
        self._add(_dumps(header))
        aliases = getattr(attributor, "aliases", None)
        if aliases:
            self._write_aliases(aliases)

    def _write_aliases(self, aliases: dict[str, str]) -> None:
        self._aliases = len(aliases)
        self._add(_dumps({"type": "alias", "aliases": dict(aliases)}))

    def _write_stats(self, cache: Any) -> None:
        families = getattr(getattr(cache, "stats", None), "families", {})
        gets = {name: fs.get for name, fs in list(families.items()) if fs.get}
        self._add(_dumps({"type": "stats", "gets": gets}))
        self._stats_at = self._lines()

    def _lines(self) -> int:
        return self.lines_written + self.lines_dropped + len(self._buf)

    def _first(self, cache: Any, start_seq: int) -> bool:
        """Bind to the first cache seen (header at the first event); False for other caches."""
        if self._cache is None:
            self._cache = cache
        elif self._cache is not cache:
            return False
        if not self._header:
            self._write_header(cache, start_seq)
        return True

    def _value(self, m: Any) -> str:
        """JSON text of a ``Measure``'s summary (memoised by content, never by identity)."""
        key = (m.kind, m.summary, m.truncated)
        try:
            return self._values[key]
        except KeyError:
            pass
        except TypeError:  # unhashable summary (never for torch shapes/dtypes/devices)
            key = None
        strs = self._names
        tensors = []
        for shape, dtype, device in m.summary:
            d = strs.get(dtype)
            if d is None:
                d = strs[dtype] = str(dtype).replace("torch.", "")
            dev = strs.get(device)
            if dev is None:
                dev = strs[device] = str(device)
            tensors.append({"shape": list(shape), "dtype": d, "device": dev})
        text = _dumps({"kind": m.kind, "tensors": tensors, "truncated": bool(m.truncated)})
        if key is not None:
            if len(self._values) >= _VALUE_MEMO:
                self._values.clear()
            self._values[key] = text
        return text

    # ------------------------------------------------------------------ sink protocol
    def on_op(self, cache: Any, rec: Any) -> None:
        with self._lock:
            if self._cache is not cache and not self._first(cache, rec.seq - 1):
                return
            op = rec.op
            m = rec.value
            extra = ""
            if op == "push":
                if m is not None:
                    st = m.storages
                    if len(st) == 1:
                        extra = f',"storages":[[{_key(st[0][0])},{int(st[0][1])}]]'
                    elif len(st) == 2:
                        (k0, n0), (k1, n1) = st
                        extra = f',"storages":[[{_key(k0)},{int(n0)}],[{_key(k1)},{int(n1)}]]'
                    else:
                        extra = ',"storages":[' + ",".join([f"[{_key(k)},{int(n)}]" for k, n in st]) + "]"
            elif op == "pop":
                aliases = getattr(getattr(cache, "attributor", None), "aliases", None)
                if aliases and len(aliases) != self._aliases:
                    self._write_aliases(aliases)   # before the pop that may depend on them
            elif op == "set":
                if rec.family == "mark_step" and rec.queue in ("<mark_step>", "<end>"):
                    return   # a boundary's own record: replayed from the mark / generation_end line
                if rec.queue == cache.state_key:
                    extra = ',"state":' + _dumps(encode_value(cache.get_quiet(cache.state_key)))
                    self._boundary_pending = True
            # Fields that repeat from op to op, as JSON text, memoised (queue names change every
            # step but each is used by every layer, so it has a memo of its own).
            memo = self._strs
            queue = rec.queue
            qtext = memo.get(queue)
            if qtext is None:
                qtext = _dumps(queue)
                if len(memo) >= _STR_MEMO:
                    memo.clear()
                memo[queue] = qtext
            key = (op, rec.family, rec.owner, rec.site, rec.violation, rec.producer)
            names = memo.get(key)
            if names is None:
                names = _dumps({"op": op, "family": rec.family, "owner": rec.owner,
                                "site": rec.site, "violation": rec.violation,
                                "producer": rec.producer})[1:-1]
                if len(memo) >= _STR_MEMO:
                    memo.clear()
                memo[key] = names
            depth = rec.depth
            self._add(
                f'{{"type":"op","seq":{int(rec.seq)},"time":{float(rec.time)!r},"step":{int(rec.step)},'
                f'"queue":{qtext},{names},"depth":{"null" if depth is None else int(depth)},'
                f'"logical_bytes":{int(rec.logical_bytes)},"storage_bytes":{int(rec.storage_bytes)}'
                f'{extra},"value":{"null" if m is None else self._value(m)}}}')

    def on_violation(self, cache: Any, v: Any) -> None:
        with self._lock:
            if self._cache is not cache and not self._first(cache, v.seq - 1):
                return
            d = {"type": "violation", **v.to_dict()}
            side = getattr(v, "peer_side", "")
            if side:
                d["peer_side"] = side    # the other rank's side of a cross-rank violation
            self._add(_dumps(d))

    def note_inputs(self, ids: Iterable[int]) -> bool:
        """Write a keyed digest of the token ids fed to the current step (call after the step's
        ``state_ids`` set, like ``RankCheck.note_inputs``). Returns False (and writes nothing)
        without an ``inputs_key``, before the first event, or once closed."""
        key = self._inputs_key
        if key is None:
            return False
        digest = inputs_digest(ids, key)
        with self._lock:
            cache = self._cache
            if cache is None or not self._header or self.closed:
                return False
            step = getattr(cache, "current_step", None)
            index = step.index if step is not None else getattr(cache, "step", -1)
            self._add(_dumps({"type": "inputs", "step": index, "seq": getattr(cache, "seq", None),
                              "digest": digest}))
        return True

    def on_step_start(self, cache: Any, step: Any) -> None:
        with self._lock:
            if self._cache is not cache and not self._first(cache, getattr(cache, "seq", 1) - 1):
                return
            if self._boundary_pending:      # the state_ids set just logged opened this step
                self._boundary_pending = False
                return
            # mark_step(): its boundary record is not sent to on_op; log it so replay repeats it
            self._add(_dumps({"type": "mark", "seq": getattr(cache, "seq", None),
                              "step": step.index, "time": step.start_time,
                              "prev": encode_value(step.prev), "next": encode_value(step.next)}))

    def on_step_end(self, cache: Any, step: Any) -> None:
        with self._lock:
            if self._cache is not cache and not self._first(cache, getattr(cache, "seq", 0)):
                return
            current = cache.current_step
            closed = "end_step" if current is step else ("boundary" if current is not None
                                                          else "generation_end")
            families = cache.stats.families
            gets = 0
            for fs in list(families.values()):
                gets += fs.get
            delta, self._gets = gets - self._gets, gets
            self._add(_dumps({"type": "step", "index": step.index, "prev": encode_value(step.prev),
                              "next": encode_value(step.next), "start": step.start_time,
                              "duration": step.duration, "tokens": step.tokens, "ops": step.ops,
                              "violations": step.violations, "gets": delta, "closed": closed}))

    def on_generation_start(self, cache: Any, info: dict[str, Any]) -> None:
        with self._lock:
            if self._cache is not cache and not self._first(cache, getattr(cache, "seq", 0)):
                return
            self._add(_dumps({"type": "generation_start", "time": time.time(), "info": info}))

    def on_generation_end(self, cache: Any, info: dict[str, Any]) -> None:
        with self._lock:
            if self._cache is not cache and not self._first(cache, getattr(cache, "seq", 0)):
                return
            info = dict(info)
            error = info.pop("error", None)
            self._add(_dumps({"type": "generation_end", "time": time.time(),
                              "seq": getattr(cache, "seq", None),
                              "error": None if error is None else _jsonable(error),
                              "info": info}))
            self._write_stats(cache)
            self._flush()


def _resolve(cache: Any) -> Any:
    from ._instrumented import InstrumentedCache
    if cache is None:
        from ._install import installed
        cache = installed()
        if cache is None:
            from ._cache import get_cache
            cache = get_cache()
    if not isinstance(cache, InstrumentedCache):
        raise TypeError(f"recording needs an InstrumentedCache, got {type(cache).__name__}: call "
                        "cachescope.install() first or pass cache=InstrumentedCache(...)")
    return cache


@contextlib.contextmanager
def record(cache: Any, path: str | os.PathLike[str] | IO[Any], *, buffer_ops: int = 1024,
           **info: Any) -> Iterator[Recorder]:
    """Record ``cache`` to ``path`` for the ``with`` block; ``info`` goes to the header's ``run``.

    The recorder is always detached and closed on exit, also when the block raises.
    """
    recorder = Recorder(path, run_info=info, buffer_ops=buffer_ops)
    try:
        recorder.attach(_resolve(cache))
        yield recorder
    finally:
        recorder.close()


def record_to(path: str | os.PathLike[str] | IO[Any], cache: Any = None, *,
              run_info: dict[str, Any] | None = None, buffer_ops: int = 1024,
              inputs_key: bytes | str | None = None) -> Recorder:
    """Start recording ``cache`` (default: the installed one) to ``path``; returns the attached
    ``Recorder``. Call ``close()`` when the loop is done, or use it as a context manager."""
    cache = _resolve(cache)
    recorder = Recorder(path, run_info=run_info, buffer_ops=buffer_ops, inputs_key=inputs_key)
    try:
        return recorder.attach(cache)
    except BaseException:
        recorder.close()
        raise
