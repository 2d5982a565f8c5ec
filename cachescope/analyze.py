"""Replay a recorded run (``cachescope.record``) through the same checker, after the fact.

    result = analyze_file("run.jsonl.gz")          # prints the reports; returns AnalysisResult

The file is read line by line (gzip is detected by its magic bytes, whatever the name). Every
recorded op, already attributed, is fed to the same pop-order checker the live cache used,
through ``ReplayCache`` (a front end that keeps queue lengths instead of values), so the
violations, their reports (op numbers included) and the run summary come out as the live run
printed them. Only times differ.

On top of the live output, the analysis prints which owner popped which owner's item in every
step (a consumers x steps table), and collects per-step series that ``cachescope.plots`` draws.

The recordings of a multi-rank run (one file per rank, ``run.rank{r}.jsonl.gz``) are analyzed
together with ``analyze_ranks(paths)`` (``cachescope analyze run.rank*.jsonl.gz``): each file is
replayed as above, then the ranks are aligned step by step and compared the way the live
cross-rank checker (``cachescope.distributed``) compares them; see ``cachescope._ranks``.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from ._families import default_family
from ._ranks import RankAnalysis, RankFile, RankSetError, analyze_ranks, rank_layout, replay_ranks
from ._records import RANK_KINDS, Violation
from ._replay import ReplayCache
from ._values import Measure
from .distributed import step_fingerprint
from .record import FORMAT, VERSION

__all__ = ["AnalysisResult", "RankAnalysis", "RankFile", "RankSetError", "RecordFormatError",
           "analyze_file", "analyze_ranks", "decode_value", "main_analyze", "read_record", "replay",
           "replay_ranks"]

_STDOUT: Any = object()
_PROGRESS_EVERY = 1024        # lines between progress checks
_MAX_MARKS = 100_000          # violation markers kept for the plots
_GZIP_MAGIC = b"\x1f\x8b"


class RecordFormatError(ValueError):
    """The file is not a cachescope record this version can read."""


class ReplayedError(Exception):
    """Stands in for the exception that ended a recorded generation (its repr is the message)."""


# ---------------------------------------------------------------------------------------- values
class _Opaque:
    """A recorded non-JSON value: compares and prints like the original did (by repr)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


_OPAQUE_TYPES: dict[str, type] = {}
_MAX_NESTING = 100   # deepest list/object nesting a line may have (cachescope.record writes < 20)


def _nesting_exceeds(x: Any, limit: int) -> bool:
    """True when ``x`` nests lists, tuples and dicts more than ``limit`` levels deep. Iterative,
    so it answers for any depth."""
    stack = [(x, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        v, depth = pop()
        t = type(v)
        if t is dict:
            children: Any = v.values()
        elif t is list or t is tuple:
            children = v
        else:
            continue
        if depth > limit:
            return True
        for c in children:
            if type(c) in (dict, list, tuple):
                push((c, depth + 1))
    return False


def _too_deep(limit: int) -> ValueError:
    return ValueError(
        f"a recorded value nests more than {limit} lists/objects deep (cachescope.record writes "
        "at most 5 levels); this was not written by cachescope.record: re-record the run")


def decode_value(x: Any, _depth: int = 0) -> Any:
    """Inverse of ``cachescope.record.encode_value``: tuples stay tuples, reprs come back as
    objects whose ``repr()`` and type name are the original's. Raises ``ValueError`` for a
    value nested more than 100 levels deep (no recording has one) or a malformed tuple."""
    if _depth > _MAX_NESTING:
        raise _too_deep(_MAX_NESTING)
    if type(x) is list:
        return [decode_value(e, _depth + 1) for e in x]
    if type(x) is dict:
        if "tuple" in x:
            items = x["tuple"]
            if type(items) is not list:
                raise ValueError(f"a recorded tuple must hold a JSON array, got {_short(items)}; "
                                 "this was not written by cachescope.record")
            return tuple([decode_value(e, _depth + 1) for e in items])
        if "repr" in x:
            text = x["repr"]
            if type(text) is not str:
                if _nesting_exceeds(text, _MAX_NESTING - _depth):
                    raise _too_deep(_MAX_NESTING)
                text = str(text)
            name = x.get("type") or "object"
            if type(name) is not str:
                if _nesting_exceeds(name, _MAX_NESTING - _depth):
                    raise _too_deep(_MAX_NESTING)
                name = str(name)
            cls = _OPAQUE_TYPES.get(name)
            if cls is None:
                cls = _OPAQUE_TYPES[name] = type(name, (_Opaque,), {"__slots__": ()})
            return cls(text)
        return {k: decode_value(v, _depth + 1) for k, v in x.items()}
    return x


def _short(x: Any, limit: int = 60) -> str:
    """``repr(x)`` cut to ``limit`` characters, for messages."""
    text = repr(x) if not _nesting_exceeds(x, 20) else f"<{type(x).__name__} nested over 20 deep>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------- reading
_READ_CHUNK = 1 << 13          # compressed bytes inflated at a time (corrupt data loses at most
                               # the lines of one such piece)
_INFLATE_CHUNK = 1 << 20       # most bytes one call inflates (bounds memory on very compressible data)
_GZIP_CUT = "Compressed file ended before the end-of-stream marker was reached"   # gzip's words


def _gzip_lines(raw: IO[bytes]) -> Iterator[bytes]:
    """The lines of a gzip stream (concatenated members too, as ``gzip`` reads them), each
    yielded as soon as it is complete. A stream cut short yields every complete line before the
    cut and then raises ``EOFError``; corrupt data raises ``gzip.BadGzipFile`` (an ``OSError``)
    after the lines before it. (``gzip.GzipFile`` behind a read buffer drops the lines of the
    buffer it was filling when the cut came: a file cut in its first 64 KiB was rejected whole.)"""
    import zlib

    inflater = zlib.decompressobj(wbits=31)
    in_member = False      # inside a gzip member whose end has not been seen
    parts: list[bytes] = []  # the incomplete line so far
    while True:
        chunk = raw.read(_READ_CHUNK)
        if not chunk:
            break
        capped = False     # the last call filled its output limit: more output may be waiting
        while chunk or capped:
            if not in_member:
                chunk = chunk.lstrip(b"\x00")   # padding between members, as gzip allows
                if not chunk:
                    break
                in_member = True
            try:
                data = inflater.decompress(chunk, _INFLATE_CHUNK)
            except zlib.error as exc:
                raise gzip.BadGzipFile(f"corrupt gzip data ({exc})") from None
            if inflater.eof:
                chunk = inflater.unused_data
                inflater = zlib.decompressobj(wbits=31)
                in_member = capped = False
            else:
                chunk = inflater.unconsumed_tail
                capped = len(data) >= _INFLATE_CHUNK
            if not data:
                continue
            if b"\n" not in data:
                parts.append(data)
                continue
            parts.append(data)
            lines = b"".join(parts).split(b"\n")
            tail = lines.pop()
            parts = [tail] if tail else []
            yield from lines
    if in_member:
        left = sum(len(p) for p in parts)
        raise EOFError(_GZIP_CUT + (f"; an incomplete last line of {left} bytes is skipped"
                                    if left else ""))
    if parts:
        yield b"".join(parts)


def read_record(path: str | os.PathLike[str],
                progress: Callable[[float], None] | None = None) -> tuple[dict[str, Any], Iterator[tuple[int, Any]]]:
    """Open a record: returns ``(header, lines)`` where ``lines`` yields ``(line_number, dict or
    None)`` for every later line (None for a line that is not valid JSON, or that nests lists
    and objects more than 100 levels deep). Streaming; gzip aware: a gzip stream cut short
    yields every complete line before the cut, then raises ``EOFError``. Raises
    ``RecordFormatError`` when the file is not a readable cachescope record.
    ``progress(fraction)`` is called now and then with the share of the file's bytes read."""
    import json

    path = Path(path)
    raw = open(path, "rb")  # noqa: SIM115 - closed by the generator / on error
    try:
        size = os.fstat(raw.fileno()).st_size
        magic = raw.read(2)
        raw.seek(0)
        source: Iterator[bytes] = _gzip_lines(raw) if magic == _GZIP_MAGIC else iter(raw)
        try:
            first = next(source, b"")
        except EOFError as exc:
            raise RecordFormatError(
                f"{path}: the file ends inside its first line, the header ({exc}); nothing to "
                "analyze: record the run again and let it finish") from exc
        except OSError as exc:
            raise RecordFormatError(f"{path}: not a cachescope record (cannot decompress: {exc})") from exc
        if not first.strip():
            raise RecordFormatError(f"{path}: empty file, not a cachescope record")
        try:
            header = json.loads(first)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            why = "nested too deep to parse" if isinstance(exc, RecursionError) else str(exc)
            raise RecordFormatError(
                f"{path}: not a cachescope record (the first line is not JSON: {why}); "
                "record a run with cachescope.record or `cachescope run --record`") from None
        if not isinstance(header, dict) or header.get("type") != "header" \
                or header.get("format") != FORMAT:
            found = header.get("format") or header.get("type") if isinstance(header, dict) \
                else type(header).__name__
            raise RecordFormatError(
                f"{path}: not a cachescope record (the first line is not a {FORMAT!r} header; "
                f"found {_short(found)})")
        if _nesting_exceeds(header, _MAX_NESTING):
            raise RecordFormatError(
                f"{path}: invalid {FORMAT} header: it nests more than {_MAX_NESTING} lists/objects "
                "deep (cachescope.record writes a flat header); record the run again")
        version = header.get("version")
        if type(version) is not int or version < 1:
            raise RecordFormatError(f"{path}: invalid {FORMAT} header: version {_short(version)}")
        if version > VERSION:
            raise RecordFormatError(
                f"{path}: {FORMAT} version {version} was written by a newer cachescope "
                f"({_short(header.get('cachescope_version'))}); this one reads version {VERSION}: "
                "upgrade cachescope to analyze it")
    except BaseException:
        raw.close()
        raise

    def lines() -> Iterator[tuple[int, Any]]:
        loads = json.loads
        limit = _MAX_NESTING
        n = 1
        try:
            if progress is not None:
                progress(raw.tell() / size if size else 1.0)
            for line in source:
                n += 1
                if n % _PROGRESS_EVERY == 0 and progress is not None:
                    progress(raw.tell() / size if size else 1.0)
                try:
                    d = loads(line)
                except (ValueError, RecursionError):   # not JSON, or nested past the parser's depth
                    if line.strip():
                        yield n, None
                    continue
                # A line can only nest as deep as it has brackets: walk the rare ones with many.
                if line.count(b"[") + line.count(b"{") > limit and _nesting_exceeds(d, limit):
                    yield n, None
                    continue
                yield n, d
            if progress is not None:
                progress(1.0)
        finally:
            raw.close()

    return header, lines()


# ---------------------------------------------------------------------------------------- replay
class _Collector:
    """A sink on the replaying cache: per-step data for the owner table and the plots."""

    def __init__(self) -> None:
        self.ops_by_step: dict[int, dict[str, int]] = {}
        self.consumers: dict[Any, None] = {}        # first-seen order
        self.cells: dict[int, dict[Any, list[tuple[Any, str | None]]]] = {}
        self.marks: list[tuple[int, int, str, str]] = []   # (step, seq, kind, queue)
        self.marks_dropped = 0
        self.series: dict[str, list[tuple[int, int, int, int]]] = {}  # family -> (step, depth, logical, storage)
        self.last_snapshot = -2

    def on_op(self, cache: Any, rec: Any) -> None:
        counts = self.ops_by_step.get(rec.step)
        if counts is None:
            counts = self.ops_by_step[rec.step] = {}
        counts[rec.op] = counts.get(rec.op, 0) + 1
        if rec.op == "pop":
            owner = rec.owner
            if owner not in self.consumers:
                self.consumers[owner] = None
            row = self.cells.get(rec.step)
            if row is None:
                row = self.cells[rec.step] = {}
            cell = row.get(owner)
            if cell is None:
                row[owner] = [(rec.producer, rec.violation)]
            else:
                cell.append((rec.producer, rec.violation))

    def on_violation(self, cache: Any, v: Any) -> None:
        if len(self.marks) < _MAX_MARKS:
            self.marks.append((v.step, v.seq, v.kind, v.queue))
        else:
            self.marks_dropped += 1

    def on_step_end(self, cache: Any, step: Any) -> None:
        self.snapshot(cache, step.index)

    def snapshot(self, cache: Any, index: int) -> None:
        if index == self.last_snapshot:
            return
        self.last_snapshot = index
        for name, fs in cache.stats.families.items():
            if fs.push or fs.pop:
                series = self.series.get(name)
                if series is None:
                    series = self.series[name] = []
                series.append((index, fs.depth, fs.logical, fs.storage))


def _kv_length(m: Any) -> int | None:
    """``cachescope.distributed.kv_length`` of a recorded push: ``shape[-2]`` of the value's first
    tensor, from its summary (the tensors themselves were never recorded)."""
    summary = getattr(m, "summary", None)
    if not summary:
        return None
    shape = summary[0][0]
    if len(shape) < 2 or type(shape[-2]) is not int:
        return None
    return shape[-2]


class _StepPrints:
    """A sink on the replaying cache of one rank's recording: each step's fingerprint
    (``cachescope.distributed.step_fingerprint``), built from the replayed op records the way the
    live ``RankCheck`` builds it from the live ones: the ops from the step's boundary to its
    end, the kv lengths of the pushed values, the digest of its inputs when it was recorded."""

    def __init__(self, state_key: Any, rank: int | None) -> None:
        self.state_key = str(state_key)
        self.rank = rank
        self.generation = 0
        self.fps: dict[tuple[int, int], dict[str, Any]] = {}
        self.last_op: dict[int, Any] = {}          # generation -> its last op record
        self.ends: dict[int, str | None] = {}      # generation -> error that ended it (None: clean)
        self.local: dict[tuple[int, int], list[str]] = {}   # (generation, step) -> violation kinds
        self.inputs_seen = 0
        self._records: list[Any] | None = None
        self._step: Any = None
        self._last: Any = None
        self._inputs: str | None = None

    def on_op(self, cache: Any, rec: Any) -> None:
        self._last = rec
        self.last_op[self.generation] = rec
        if self._records is not None:
            self._records.append(rec)

    def on_violation(self, cache: Any, v: Any) -> None:
        self.local.setdefault((self.generation, v.step), []).append(v.kind)

    def on_step_start(self, cache: Any, step: Any) -> None:
        last = self._last   # the boundary (the state_ids set) belongs to the step it opens
        self._records = [last] if last is not None and last.seq == cache.seq else []
        self._step = step
        self._inputs = None

    def note_inputs(self, index: Any, digest: Any) -> None:
        step = self._step
        if step is not None and step.index == index and self._records is not None \
                and type(digest) is str:
            self._inputs = digest
            self.inputs_seen += 1

    def on_step_end(self, cache: Any, step: Any) -> None:
        if self._records is None or self._step is None or step.index != self._step.index:
            return
        records, self._records = self._records, None
        lengths = [_kv_length(r.value) for r in records if r.op == "push"]
        fp = step_fingerprint(records, step=step.index, state_ids=(step.prev, step.next),
                              inputs_digest=self._inputs, kv_lengths=lengths,
                              state_key=self.state_key, rank=self.rank,
                              generation=self.generation)
        fp.pop("t", None)
        self.fps[(self.generation, step.index)] = fp


_VIOLATION_TEXT = ("queue", "family", "consumer", "producer", "consumer_site", "producer_site",
                   "value", "hint", "detail", "cache", "peer_side")
_VIOLATION_INT = ("seq", "producer_step", "producer_seq", "depth", "position", "rank", "peer")


def recorded_violation(d: dict[str, Any]) -> Violation:
    """A ``Violation`` from a recorded ``violation`` line (no op timeline: it was not recorded).
    Raises ``KeyError`` / ``TypeError`` / ``ValueError`` for a malformed line."""
    kw: dict[str, Any] = {}
    for k in _VIOLATION_TEXT:
        x = d.get(k)
        if x is not None:
            kw[k] = x if type(x) is str else str(x)
    for k in _VIOLATION_INT:
        x = d.get(k)
        if x is not None:
            if type(x) is not int:
                raise TypeError(f"{k} must be an int, got {_short(x)}")
            kw[k] = x
    kind = d["kind"]
    if type(kind) is not str:
        raise TypeError(f"kind must be a str, got {_short(kind)}")
    step = d.get("step")
    if type(step) is not int:
        raise TypeError(f"step must be an int, got {_short(step)}")
    queue = kw.pop("queue", "?")
    return Violation(kind=kind, queue=queue, family=kw.pop("family", queue), step=step,
                     consumer=kw.pop("consumer", None), producer=kw.pop("producer", None), **kw)


class _Replayer:
    """Feeds recorded lines to a fresh ``ReplayCache``.

    ``ranks``: the file is one rank's recording analyzed with the other ranks' files: build the
    step fingerprints and keep the recorded cross-rank violations apart (``rank_violations``)
    instead of carrying them into the cache (they are re-derived from all the files)."""

    def __init__(self, header: dict[str, Any], ranks: bool = False) -> None:
        self.header = header
        self.families: dict[str, str] = {}
        families = self.families
        self.cache = cache = ReplayCache(
            name=header.get("cache") or "default",
            timeline_size=int(header.get("timeline_size") or 256),
            max_violations=int(header.get("max_violations") or 1000),
            state_key=header.get("state_key") or "state_ids",
            family=lambda name: families.get(name) or default_family(name))
        self.collector = _Collector()
        cache.add_sink(self.collector)
        self.layout = rank_layout(header)
        self.prints: _StepPrints | None = None
        if ranks:
            self.prints = _StepPrints(cache.state_key,
                                      None if self.layout is None else self.layout.rank)
            cache.add_sink(self.prints)
        self.rank_violations: list[Violation] = []   # recorded live by the cross-rank checker
        self.front_end_violations = 0   # recorded live by a front end's checks, carried through
        self.notes: list[str] = []
        self.diverged: str | None = None
        self.divergences = 0
        self.ops = 0
        self.lines = 1
        self.bad_lines = 0
        self.logged_violations = 0
        self.generations = 0
        self.steps: dict[int, dict[str, Any]] = {}
        self.unknown: dict[str, int] = {}
        start_seq = int(header.get("start_seq") or 0)
        start_step = header.get("start_step")
        cache.start_at(start_seq, start_step if isinstance(start_step, int) and start_step >= 0 else -1)
        if start_seq:
            self.notes.append(
                f"the recording started at op #{start_seq + 1} of the live cache: items pushed "
                "before it are unknown, so reports involving them can differ from the live run")
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "op": self._op, "step": self._step, "mark": self._mark, "violation": self._violation,
            "generation_start": self._generation_start, "generation_end": self._generation_end,
            "alias": self._alias, "stats": self._stats, "header": self._header,
            "inputs": self._inputs}

    # -- bookkeeping
    def _sync(self, seq: Any, what: str) -> None:
        """Make the next record the cache makes get op number ``seq``; note any gap."""
        if type(seq) is not int:
            return
        cache = self.cache
        if cache.seq != seq - 1:
            self.divergences += 1
            if self.diverged is None:
                self.diverged = (f"the replay diverged from the recording at {what} #{seq} (replay "
                                 f"was at op #{cache.seq + 1}): lines are missing from the log, or "
                                 "it was edited; later op numbers follow the log")
            cache.sync(seq - 1)

    def feed(self, n: int, d: Any) -> None:
        self.lines = n
        if type(d) is not dict:
            self.bad_lines += 1
            if self.bad_lines == 1:
                self.notes.append(f"line {n} is not a JSON object (a truncated last line of a killed "
                                  "run?); skipped")
            return
        t = d.get("type")
        handler = self._handlers.get(t) if type(t) is str else None
        if handler is None:
            label = t if type(t) is str else f"<{type(t).__name__}>"
            self.unknown[label] = self.unknown.get(label, 0) + 1
            return
        try:
            handler(d)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.bad_lines += 1
            if self.bad_lines == 1:
                self.notes.append(f"line {n} ({t}) is malformed ({type(exc).__name__}: {exc}); skipped")

    # -- handlers
    def _op(self, d: dict[str, Any]) -> None:
        seq = d["seq"]
        op = d["op"]
        queue = d["queue"]
        owner = d.get("owner")
        site = d.get("site")
        cache = self.cache
        self._sync(seq, "op")
        self.ops += 1
        family = d.get("family")
        if family is not None:
            self.families[queue] = family
        if op == "push":
            value = d.get("value") or {}
            storages = d.get("storages")
            if storages is None:   # not recorded: one storage of its own per push
                nbytes = d.get("storage_bytes") or 0
                storages = ((("push", seq), nbytes),) if nbytes else ()
            else:
                storages = tuple((k if type(k) is not list else tuple(k), b) for k, b in storages)
            summary = tuple((tuple(t["shape"]), t["dtype"], t["device"])
                            for t in value.get("tensors") or ())
            m = Measure(d.get("logical_bytes") or 0, storages, summary,
                        value.get("kind") or "NoneType", bool(value.get("truncated")))
            cache.push(queue, owner, site, m)
        elif op == "pop":
            cache.pop(queue, owner, site)
        elif op == "set":
            if "state" in d:
                value = decode_value(d["state"])
            elif d.get("depth") is not None:
                value = [None] * int(d["depth"])
            else:
                value = _PLAIN
            cache.set(queue, value, owner, site)
        elif op == "clear":
            cache.clear(queue, owner, site)   # False for an unknown key: the next op shows the gap
        elif op == "clear_all":
            cache.clear_all(owner, site)
        else:
            self.unknown[f"op {op}"] = self.unknown.get(f"op {op}", 0) + 1
            cache.sync(seq)

    def _mark(self, d: dict[str, Any]) -> None:
        self._sync(d.get("seq"), "step mark")
        self.cache.mark_step(decode_value(d.get("prev")), decode_value(d.get("next")))

    def _step(self, d: dict[str, Any]) -> None:
        index = d["index"]
        self.steps[index] = {"duration": d.get("duration"), "tokens": d.get("tokens") or 0,
                             "gets": d.get("gets") or 0, "start": d.get("start")}
        if d.get("closed", "end_step") == "end_step":
            cur = self.cache.current_step
            if cur is not None and cur.index == index and cur.end is None:
                self.cache.end_step(tokens=int(d.get("tokens") or 0))

    def _violation(self, d: dict[str, Any]) -> None:
        self.logged_violations += 1
        if d.get("kind") in RANK_KINDS:
            # Found by comparing ranks, not by this file's ops: the replay cannot re-derive it.
            v = recorded_violation(d)
            self.rank_violations.append(v)
            if self.prints is None:
                self.cache.add_violation(v)   # carried through, as the live cache kept it
        elif d.get("seq") == 0:
            # Found by a front end's own checks (cachescope.hf: layer_skipped, position_gap...),
            # not by one of the cache's ops (those have op numbers from 1): carried through, with
            # the replayed ops of its queue as its timeline.
            v = recorded_violation(d)
            v.timeline = tuple(r for r in self.cache.timeline() if r.queue == v.queue)[-12:]
            self.front_end_violations += 1
            self.cache.add_violation(v)
        else:
            # Re-derived by the replay; a front end may have given it its own hint (cachescope.hf
            # does for owner mismatches on layers): the recorded hint wins.
            hint, seq, kind = d.get("hint"), d.get("seq"), d.get("kind")
            if type(hint) is str and hint:
                for v in reversed(self.cache.violations[-8:]):
                    if v.seq == seq and v.kind == kind:
                        v.hint = hint
                        break

    def _inputs(self, d: dict[str, Any]) -> None:
        if self.prints is not None:
            self.prints.note_inputs(d.get("step"), d.get("digest"))

    def _generation_start(self, d: dict[str, Any]) -> None:
        self.generations += 1
        if self.prints is not None:
            self.prints.generation = self.generations

    def _generation_end(self, d: dict[str, Any]) -> None:
        error = d.get("error")
        if self.prints is not None:
            self.prints.ends[self.prints.generation] = None if error is None else str(error)
        self.cache.finish_generation(None if error is None else ReplayedError(error))
        seq = d.get("seq")
        if type(seq) is int and seq != self.cache.seq:
            self._sync(seq + 1, "generation end at op")

    def _alias(self, d: dict[str, Any]) -> None:
        self.cache.attributor.aliases.update(d.get("aliases") or {})

    def _stats(self, d: dict[str, Any]) -> None:
        for family, n in (d.get("gets") or {}).items():
            self.cache.stats.family(family).get = int(n)

    def _header(self, d: dict[str, Any]) -> None:
        self.notes.append(f"line {self.lines} is a second header (files concatenated?); the "
                          "replay goes on as if it were one run")

    def finish(self) -> None:
        cur = self.cache.current_step
        if cur is not None:
            self.collector.snapshot(self.cache, cur.index)
        if self.diverged:
            self.notes.append(self.diverged + (f" ({self.divergences} gaps)" if self.divergences > 1 else ""))
        if self.unknown:
            self.notes.append("ignored unknown lines: " + ", ".join(
                f"{k} x{n}" for k, n in sorted(self.unknown.items())))
        if self.front_end_violations:
            self.notes.append(f"{self.front_end_violations} violation(s) found live by the front "
                              "end's own checks (cachescope.hf: lengths, positions, structural "
                              "ops) are carried through from the recording, not re-derived")
        if self.bad_lines > 1:
            self.notes.append(f"{self.bad_lines} unreadable lines skipped in all")
        if self.layout is not None:
            rank = self.layout.rank   # the cache's own violations concern this rank, as live
            for v in self.cache.violations:
                if v.rank is None:
                    v.rank = rank
        if self.rank_violations and self.prints is None:
            n = len(self.rank_violations)
            self.notes.append(
                f"{n} cross-rank violation(s) ({', '.join(sorted({v.kind for v in self.rank_violations}))})"
                " recorded live are shown as recorded: one rank's file cannot re-check them; "
                "analyze every rank's file together (cachescope analyze run.rank*.jsonl.gz) to "
                "compare the ranks again")


_PLAIN = object()   # stands in for a plain (non-list, non-state) value that was set


# ---------------------------------------------------------------------------------------- result
@dataclass
class AnalysisResult:
    """What ``analyze_file`` found. ``cache`` is the ``ReplayCache`` the log was fed to."""

    path: Path
    header: dict[str, Any]
    cache: ReplayCache
    ops: int
    lines: int
    generations: int
    logged_violations: int
    notes: list[str]
    consumers: list[Any]
    cells: dict[int, dict[Any, list[tuple[Any, str | None]]]]
    ops_by_step: dict[int, dict[str, int]]
    steps: dict[int, dict[str, Any]]
    series: dict[str, list[tuple[int, int, int, int]]]
    marks: list[tuple[int, int, str, str]]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    #: Multi-rank replays (``replay(..., ranks=True)``): (generation, step) -> the step's
    #: fingerprint (``cachescope.distributed.step_fingerprint``); empty otherwise.
    fingerprints: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    #: Cross-rank violations (``rank_divergence``, ``rank_stalled``) recorded live in this file.
    recorded_cross_rank: list[Violation] = field(default_factory=list)

    @property
    def layout(self) -> Any:
        """The recording's place in a multi-rank run (``cachescope._ranks.RankLayout``: rank,
        tp_rank, pp_rank, tp, pp, world_size), None for a single-process recording."""
        return rank_layout(self.header)

    @property
    def violations(self) -> list[Any]:
        return self.cache.violations

    def reports(self) -> list[str]:
        """The violation reports, as ``v.report()`` printed them in the live run."""
        return [v.report() for v in self.cache.violations]

    def summary(self) -> str:
        """The run summary, as ``cache.report()`` printed it in the live run."""
        return self.cache.report()

    def title(self) -> str:
        h = self.header
        steps = len(self.steps) or self.cache.stats.steps
        layout = self.layout
        where = "" if layout is None else f"{layout.describe()}, "
        return (f"cachescope analyze: {self.path} ({where}cache {h.get('cache')!r}, recorded "
                f"{h.get('created')}, cachescope {h.get('cachescope_version')}; {self.ops} ops, "
                f"{steps} steps)")

    def owner_labels(self) -> dict[Any, str]:
        """Column label per consumer: ``[0]``, ``[1]``, ... in first-seen order."""
        return {c: f"[{i}]" for i, c in enumerate(self.consumers)}

    def owner_table(self, max_rows: int = 200) -> str:
        """Which owner popped which owner's item, per step (identical consecutive rows folded)."""
        if not self.cells:
            return "Who popped whose item: no pops were recorded."
        labels = self.owner_labels()
        lines = ["Who popped whose item, per step (columns: consumers in first-seen order)",
                 "  '=' its own item; [n] the item pushed by consumer [n]; * an owner_mismatch;",
                 "  !empty / !missing a failed pop; ? an item of unknown origin; blank: no pop",
                 ""]
        lines += [f"  {labels[c]} {_name(c)}" for c in self.consumers]
        lines.append("")
        rows: list[tuple[int, int, tuple[str, ...]]] = []
        for step in sorted(self.cells):
            row = self.cells[step]
            cells = tuple(_cell(c, row.get(c), labels) if c in row else "" for c in self.consumers)
            if rows and rows[-1][2] == cells and rows[-1][1] == step - 1:
                rows[-1] = (rows[-1][0], step, cells)
            else:
                rows.append((step, step, cells))
        heads = ["step"] + [labels[c] for c in self.consumers]
        text_rows = [[(f"{a}" if a == b else f"{a}-{b}")] + list(cells) for a, b, cells in rows]
        widths = [max(len(h), *(len(r[i]) for r in text_rows)) for i, h in enumerate(heads)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines.append(fmt.format(*heads).rstrip())
        shown = text_rows if len(text_rows) <= max_rows else text_rows[:max_rows // 2] + [None] + \
            text_rows[-(max_rows // 2):]
        for r in shown:
            if r is None:
                lines.append(f"... {len(text_rows) - 2 * (max_rows // 2)} row(s) not shown ...")
            else:
                lines.append(fmt.format(*r).rstrip())
        return "\n".join(lines)

    def text(self, quiet: bool = False) -> str:
        """Everything ``analyze_file`` prints; ``quiet``: only the violation reports (or one
        line saying there were none) and the notes."""
        parts = [] if quiet else [self.title()]
        parts += [f"note: {n}" for n in self.notes]
        parts += self.reports()
        if quiet:
            if not self.cache.violations:
                parts.append(f"cachescope analyze: {self.path}: no violations")
        else:
            parts.append(self.summary())
            parts.append(self.owner_table())
        return "\n\n".join(parts) + "\n"


def _name(owner: Any) -> str:
    return "<no module>" if owner is None else str(owner)


def _cell(consumer: Any, pops: list[tuple[Any, str | None]] | None, labels: dict[Any, str]) -> str:
    out = []
    for producer, violation in pops or ():
        if violation in ("pop_empty", "pop_missing"):
            out.append("!" + violation[4:])
            continue
        if producer is None:
            text = "?"
        elif producer == consumer:
            text = "="
        else:
            text = labels.get(producer) or str(producer)
        out.append(("*" + text) if violation == "owner_mismatch" else text)
    return "+".join(out)


# ---------------------------------------------------------------------------------------- API
def replay(path: str | os.PathLike[str], progress: bool | Callable[[float], None] = False, *,
           ranks: bool = False) -> AnalysisResult:
    """Read and replay a record without printing anything.

    ``ranks``: the file is one rank's recording, to be compared with the other ranks' files
    (``replay_ranks``): also build each step's fingerprint (``result.fingerprints``), and keep
    the cross-rank violations recorded live apart (``result.recorded_cross_rank``) instead of
    adding them to the replayed cache. Without it they are added to the cache as recorded."""
    path = Path(path)
    started = time.perf_counter()
    report_progress = _progress_printer(path) if progress is True else (progress or None)
    header, lines = read_record(path, report_progress)  # type: ignore[arg-type]
    r = _Replayer(header, ranks=ranks)
    feed = r.feed
    try:
        for n, d in lines:
            feed(n, d)
    except (OSError, EOFError) as exc:   # a gzip stream cut short by a killed run
        r.notes.append(f"the file ends early after line {r.lines} ({type(exc).__name__}: {exc}); "
                       "analyzed what was there")
    finally:
        if progress is True:
            sys.stderr.write("\n")
            sys.stderr.flush()
    r.finish()
    c = r.collector
    return AnalysisResult(
        path=path, header=header, cache=r.cache, ops=r.ops, lines=r.lines,
        generations=r.generations, logged_violations=r.logged_violations, notes=r.notes,
        consumers=list(c.consumers), cells=c.cells, ops_by_step=c.ops_by_step, steps=r.steps,
        series=c.series, marks=c.marks, seconds=time.perf_counter() - started,
        extra=_extra(r), fingerprints=r.prints.fps if r.prints is not None else {},
        recorded_cross_rank=r.rank_violations)


def _extra(r: _Replayer) -> dict[str, Any]:
    extra: dict[str, Any] = {"marks_dropped": r.collector.marks_dropped, "bad_lines": r.bad_lines}
    p = r.prints
    if p is not None:
        extra.update(last_op=p.last_op, generation_ends=p.ends, local_by_step=p.local,
                     inputs_seen=p.inputs_seen)
    return extra


def _progress_printer(path: Path) -> Callable[[float], None]:
    last = [-1]

    def show(fraction: float) -> None:
        pct = int(min(1.0, max(0.0, fraction)) * 100)
        if pct != last[0]:
            last[0] = pct
            sys.stderr.write(f"\ranalyzing {path.name}: {pct:3d}%")
            sys.stderr.flush()
    return show


def analyze_file(path: str | os.PathLike[str], out: IO[str] | None = _STDOUT, progress: bool = False,
                 *, quiet: bool = False) -> AnalysisResult:
    """Replay the record at ``path`` and print (to ``out``; default stdout, None for silence) the
    violation reports and run summary the live run printed, plus the per-step owner table.
    ``progress`` shows a percentage on stderr; ``quiet`` prints only the violation reports.
    Raises ``RecordFormatError`` for a file that is not a readable record, ``OSError`` when
    it cannot be opened."""
    if out is _STDOUT:
        out = sys.stdout
    result = replay(path, progress=progress)
    if out is not None:
        out.write(result.text(quiet=quiet))
        with contextlib.suppress(Exception):
            out.flush()
    return result


def main_analyze(args: Any) -> int:
    """``cachescope analyze`` entry point. ``args`` (an argparse Namespace) fields:

    - ``file``: path of the record (``.jsonl`` or ``.jsonl.gz``), or a list of paths: one is
      analyzed as above; several are the per-rank recordings of one multi-rank run
      (``analyze_ranks``).
    - ``out``: where to write the text; None or ``'-'`` for stdout.
    - ``progress``: show a percentage on stderr while reading.
    - ``quiet``: print only the violation reports (one line when there are none): no title,
      run summary or owner table.

    Returns 0 when the run had no violations, 1 when it had, 2 when a file could not be read or
    the files are not the ranks of one run (the reason goes to stderr).
    """
    path = getattr(args, "file", None)
    paths = [p for p in path] if isinstance(path, (list, tuple)) else ([path] if path else [])
    if not paths:
        sys.stderr.write("cachescope analyze: no record file given\n")
        return 2
    if len(paths) > 1:
        return _main_ranks(args, paths)
    path = paths[0]
    dest = getattr(args, "out", None)
    progress = bool(getattr(args, "progress", False))
    quiet = bool(getattr(args, "quiet", False))
    try:
        if dest in (None, "-"):
            result = analyze_file(path, out=sys.stdout, progress=progress, quiet=quiet)
        else:
            with open(dest, "w", encoding="utf-8") as f:
                result = analyze_file(path, out=f, progress=progress, quiet=quiet)
            sys.stderr.write(f"cachescope analyze: wrote {dest}\n")
    except RecordFormatError as exc:
        sys.stderr.write(f"cachescope analyze: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"cachescope analyze: cannot read {path}: {exc}\n")
        return 2
    return 1 if result.cache.violations or result.cache.stats.violations_dropped else 0


def _main_ranks(args: Any, paths: list[Any]) -> int:
    dest = getattr(args, "out", None)
    progress = bool(getattr(args, "progress", False))
    quiet = bool(getattr(args, "quiet", False))
    try:
        if dest in (None, "-"):
            result = analyze_ranks(paths, out=sys.stdout, progress=progress, quiet=quiet)
        else:
            result = replay_ranks(paths, progress=progress)   # nothing written for bad files
            with open(dest, "w", encoding="utf-8") as f:
                f.write(result.text(quiet=quiet))
            sys.stderr.write(f"cachescope analyze: wrote {dest}\n")
    except (RankSetError, RecordFormatError) as exc:
        sys.stderr.write(f"cachescope analyze: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"cachescope analyze: cannot read {exc.filename or 'a recording'}: "
                         f"{exc.strerror or exc}\n")
        return 2
    return 1 if result.violations or result.dropped() else 0
