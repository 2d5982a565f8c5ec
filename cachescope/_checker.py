"""The pop-order checker: one state machine fed by the live cache and by ``analyze``'s replay.

Rule: for each queue, the k-th pop must be made by the same owner that made the k-th push.
Every layer of a NeoX decode loop pops ``attn_kv_{prev}`` and pushes ``attn_kv_{next}``; nothing
else ties an item to the layer that pushed it, so a reordered, skipped, repeated or retried layer
silently hands one layer another layer's keys/values.

The checker sees attributed ops (who, where, the queue's length after the op, the bytes a push
holds), never values: the front end (``InstrumentedCache`` over the seed's dict, or the replay
over a recorded log) does the op itself and tells the checker what happened. Data flows one way:
op -> checker -> counters (``_accounting``) -> a bounded ring of compact entries (``Timeline``).
The checker builds ``Violation``s; ``_report`` turns them into text.

Callers serialise calls (the cache holds its lock); nothing here calls user code except a value
``peek`` and the family normaliser, both guarded.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from typing import Any, Callable, Iterable

from ._accounting import FamilyStats, Stats
from ._families import FamilyMap
from ._records import OpRecord, StepInfo, Violation
from ._values import Measure, format_summary, measure, measure_bytes

__all__ = ["PopOrderChecker", "Timeline", "mismatch_hint", "safe_str", "safe_repr"]

_TIMELINE_PER_VIOLATION = 12
_CLEARED_MEMORY = 256
_STEP_MEMORY = 4096    # queue names remembered per step (a loop with no step boundaries stays bounded)
_FS_MEMO = 4096
_NOTHING = object()

# Positions in a compact entry: OpRecord's fields, then the storages a push holds (or a pop
# released) and, for a push, whether the queue existed before it (for a pop: whether it took an
# item whose push the checker saw).
SEQ, TIME, STEP, OP, QUEUE, FAMILY, OWNER, SITE, DEPTH, LOGICAL, STORAGE, VALUE, VIOLATION, \
    PRODUCER, STORAGES, EXISTED = range(16)
_RECORD_FIELDS = len(OpRecord._fields)
_new_record = tuple.__new__
_time = time.time
_perf = time.perf_counter


def _record(entry: tuple[Any, ...]) -> OpRecord:
    return _new_record(OpRecord, entry[:_RECORD_FIELDS])


class Timeline:
    """A bounded ring of the most recent ops as compact entries (plain tuples holding no tensor);
    ``OpRecord``s are built only when read."""

    __slots__ = ("_ring", "append")

    def __init__(self, maxlen: int) -> None:
        self._ring: deque[tuple[Any, ...]] = deque(maxlen=max(1, int(maxlen)))
        #: Add an entry (the deque's own method: no Python frame per op).
        self.append: Callable[[tuple[Any, ...]], None] = self._ring.append

    @property
    def maxlen(self) -> int:
        return self._ring.maxlen or 0

    def clear(self) -> None:
        self._ring.clear()

    def __len__(self) -> int:
        return len(self._ring)

    def last(self) -> OpRecord | None:
        return _record(self._ring[-1]) if self._ring else None

    def records(self) -> list[OpRecord]:
        """Every op still in the ring, oldest first."""
        return [_record(e) for e in self._ring]

    def since(self, seq: int) -> tuple[int, list[OpRecord]]:
        """``(first, records)``: the ops numbered above ``seq``, oldest first, and the number of
        the oldest op the ring still holds above ``seq`` (``first > seq + 1`` means ops were lost)."""
        out = []
        for e in reversed(self._ring):
            if e[SEQ] <= seq:
                break
            out.append(e)
        out.reverse()
        return (out[0][SEQ] if out else seq + 1), [_record(e) for e in out]

    def entries(self) -> Iterable[tuple[Any, ...]]:
        return reversed(self._ring)


def safe_str(x: Any) -> str:
    """``str(x)`` bounded to 200 characters, never raising."""
    try:
        s = x if type(x) is str else str(x)
    except Exception:
        s = f"<{type(x).__name__}>"
    if type(s) is not str:
        s = f"<{type(x).__name__}>"
    return s if len(s) <= 200 else s[:197] + "..."


def safe_repr(x: Any) -> str:
    """repr() for reports that never prints data (tensors show as shape and dtype)."""
    try:
        s = _repr_no_data(x, 0)
    except Exception:
        s = f"<{type(x).__name__}>"
    return s if len(s) <= 120 else s[:117] + "..."


_PLAIN = (int, float, complex, str, bytes, bool, type(None))


def _repr_no_data(x: Any, depth: int) -> str:
    if hasattr(type(x), "shape") and hasattr(type(x), "dtype") and type(x) not in _PLAIN:
        try:
            return f"<Tensor {list(x.shape)} {str(x.dtype).replace('torch.', '')}>"
        except Exception:
            return f"<{type(x).__name__}>"
    if type(x) in _PLAIN:
        return repr(x)
    if type(x) in (tuple, list, dict) and depth < 3:
        items = list(x.items())[:8] if type(x) is dict else list(x[:8])
        more = ", ..." if len(x) > 8 else ""
        if type(x) is dict:
            return "{" + ", ".join(f"{_repr_no_data(k, depth + 1)}: {_repr_no_data(v, depth + 1)}"
                                   for k, v in items) + more + "}"
        inner = ", ".join(_repr_no_data(i, depth + 1) for i in items) + more
        return f"({inner},)" if type(x) is tuple and len(x) == 1 else (
            f"({inner})" if type(x) is tuple else f"[{inner}]")
    return f"<{type(x).__name__}>"


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors or odd objects in state_ids
        return a is b


def _step_key(name: Any) -> Any:
    """How a step remembers a non-str queue name: weakly where the object allows it, so that a
    tensor or object used as a name is not kept alive until the step ends."""
    try:
        return weakref.ref(name)
    except TypeError:
        return name


def _step_names(names: Iterable[Any]) -> list[Any]:
    """The live names of a step's set (weakly remembered names that are gone are left out)."""
    out = []
    for n in names:
        if type(n) is weakref.ref:
            n = n()
            if n is None:
                continue
        out.append(n)
    return out


def _no_peek(name: Any) -> Any:
    return _NOTHING


class PopOrderChecker:
    """Checks pop order and keeps the counters and the op ring of one cache.

    ``peek(name)``: the oldest value still queued under ``name`` (for a leftover's value summary),
    or any object that is not a value when the front end has none. ``same_owner(a, b)``: whether
    two owner labels name the same module (a label may predate ``watch()``).
    """

    def __init__(self, *, name: str = "default", family: Callable[[Any], str] | None = None,
                 timeline_size: int = 256, max_violations: int = 1000,
                 state_key: Any = "state_ids", peek: Callable[[Any], Any] = _no_peek,
                 same_owner: Callable[[str, str], bool] | None = None) -> None:
        self.name = name
        self.state_key = state_key
        self.max_violations = max_violations
        self.families = FamilyMap(family)
        self._stats = Stats()
        self.violations: list[Violation] = []
        self.timeline = Timeline(timeline_size)
        self.peek = peek
        self.same_owner = same_owner or (lambda a, b: a == b)
        self.seq = 0
        self.step_index = -1
        self.step: StepInfo | None = None
        self.loop_ends_steps = False      # set once the decode loop calls end_step()
        self.pending_step_end: StepInfo | None = None
        self.state_value: Any = None      # the value of state_key, as last set
        # name -> [pops so far, push entries not yet popped...] (a list: cheaper to make than a
        # deque for a new queue name every token; a queue holds about one item per layer)
        self._queues: dict[Any, list[Any]] = {}
        self._fs_memo: dict[str, FamilyStats] = {}
        self._ring_append = self.timeline.append
        # str keys read by get() since they were last counted: appended without the lock (a
        # decode reads 'use_cache' and 'state_ids' in every layer) and counted when the
        # counters are read or the next op that changes them runs
        self._gets: list[Any] = []
        self._weak_names = False   # a step set holds a weakly remembered non-str name
        self._cleared: dict[Any, tuple[int, int, str | None, str | None]] = {}
        self._cleared_all: tuple[int, int, str | None, str | None] | None = None
        self._restarted_step: int | None = None

    # ------------------------------------------------------------------ counters, folded
    @property
    def stats(self) -> Stats:
        """The counters, up to date (counts the gets not counted yet)."""
        if self._gets:
            self.fold()
        return self._stats

    def fold(self) -> None:
        """Count the gets made since the last fold (callers hold the lock)."""
        gets = self._gets
        if gets:
            n = len(gets)
            for key in gets[:n]:
                self.family_stats(key).get += 1
            del gets[:n]                 # appends made meanwhile stay for the next fold

    def note_get(self, key: str) -> bool:
        """A ``get`` of the str key ``key``, counted at the next fold. Safe without the lock (a
        list append); returns True when enough are waiting that the caller should fold (with
        the lock held)."""
        gets = self._gets
        gets.append(key)
        return len(gets) > 4096

    def count_get(self, key: Any) -> None:
        """A ``get`` of any key, counted now (callers hold the lock; non-str keys are never kept
        for later: that would keep them alive)."""
        self.family_stats(key).get += 1

    # ------------------------------------------------------------------ small helpers
    def family_stats(self, name: Any) -> FamilyStats:
        """The counters of ``name``'s family (memoised for str names)."""
        if type(name) is str:
            fs = self._fs_memo.get(name)
            if fs is not None:
                return fs
            fs = self._stats.family(self.families(name))
            if len(self._fs_memo) >= _FS_MEMO:
                self._fs_memo.clear()
            self._fs_memo[name] = fs
            return fs
        return self._stats.family(self.families(name))

    def _append(self, op: str, queue: Any, family: str, owner: str | None, site: str | None,
                depth: int | None, violation: str | None = None) -> tuple[Any, ...]:
        self.seq = seq = self.seq + 1
        entry = (seq, _time(), self.step_index, op, queue if type(queue) is str else safe_str(queue),
                 family, owner, site, depth, 0, 0, None, violation, None, (), False)
        self._ring_append(entry)
        if self.step is not None:
            self.step.ops += 1
        return entry

    def _keep(self, v: Violation) -> Violation:
        fs = self._stats.family(v.family)
        fs.violations[v.kind] = fs.violations.get(v.kind, 0) + 1
        if self.step is not None:
            self.step.violations += 1
        if len(self.violations) < self.max_violations:
            self.violations.append(v)
        else:
            self._stats.violations_dropped += 1
        return v

    def keep(self, v: Violation) -> Violation:
        """Count and keep a violation found outside this checker (e.g. by comparing ranks)."""
        return self._keep(v)

    def _timeline_for(self, queue: str, seq: int) -> tuple[OpRecord, ...]:
        out = []
        for e in self.timeline.entries():
            if e[QUEUE] == queue or e[SEQ] == seq:
                out.append(e)
                if len(out) >= _TIMELINE_PER_VIOLATION:
                    break
        out.reverse()
        return tuple(_record(e) for e in out)

    def pending(self, name: Any) -> list[OpRecord]:
        """Push records of the items still queued under ``name``, oldest first."""
        q = self._queues.get(name)
        return [_record(e) for e in q[1:]] if q else []

    def live_queues(self) -> list[Any]:
        return list(self._queues)

    def _step_key(self, name: Any) -> Any:
        self._weak_names = True
        return _step_key(name)

    def refresh_held(self, values: Callable[[Any], Any]) -> None:
        """Re-measure the items queued now (``values(name)``: the queue's list) so that held
        bytes follow storages resized in place since their push; a later pop releases what was
        measured last. Called when counters are read, never per op."""
        by_family: dict[str, list[tuple[int, tuple[tuple[Any, int], ...]]]] = {}
        for name, q in self._queues.items():
            queue = values(name)
            n = len(q) - 1
            if type(queue) is not list or len(queue) < n:
                continue
            items = queue[len(queue) - n:]
            fresh = [q[0]]
            for entry, value in zip(q[1:], items):
                logical, storage, storages = measure_bytes(value)
                if logical != entry[LOGICAL] or storages != entry[STORAGES]:
                    entry = entry[:LOGICAL] + (logical, storage) + entry[STORAGE + 1:STORAGES] \
                        + (storages,) + entry[STORAGES + 1:]
                fresh.append(entry)
                by_family.setdefault(entry[FAMILY], []).append((entry[LOGICAL], entry[STORAGES]))
            q[:] = fresh
        for family, held in by_family.items():
            self._stats.family(family).set_held(held)

    def sizes(self) -> dict[str, int]:
        """How many entries each bookkeeping structure holds now (all are bounded)."""
        return {"queues": len(self._queues), "timeline": len(self.timeline),
                "family_memo": len(self._fs_memo), "families": len(self.families.families),
                "stat_families": len(self._stats.families),
                "cleared": len(self._cleared), "violations": len(self.violations)}

    # ------------------------------------------------------------------ queue ops
    def push(self, name: Any, owner: str | None, site: str | None, existed: bool,
             depth: int | None, logical: int, storage: int, storages: tuple[tuple[Any, int], ...],
             value: Measure | None = None) -> None:
        """An item was appended to queue ``name``, which now holds ``depth`` items; it holds
        ``logical`` tensor bytes in ``storages`` (``storage`` bytes in all)."""
        if type(name) is str:
            qname = name
            family = self.families.memo.get(name) or self.families(name)
        else:
            qname, family = safe_str(name), self.families(name)
        self.seq = seq = self.seq + 1
        entry = (seq, _time(), self.step_index, "push", qname, family, owner, site, depth, logical,
                 storage, value, None, None, storages, existed)
        self._ring_append(entry)
        q = self._queues.get(name)
        if q is None:
            self._queues[name] = [0, entry]  # provenance: the push entry itself
        else:
            q.append(entry)
        fs = self._stats.families.get(family) or self._stats.family(family)
        fs.push += 1
        if depth == 1:
            if existed and fs.empty:
                fs.empty -= 1
            fs.live += 1
        fs.hold(logical, storages)
        step = self.step
        if step is not None:
            step.ops += 1
            pushed = step.pushed
            if len(pushed) < _STEP_MEMORY:
                pushed.add(name if type(name) is str else self._step_key(name))

    def pop(self, name: Any, owner: str | None, site: str | None, depth: int | None,
            value: Any = _NOTHING) -> Violation | None:
        """The oldest item of queue ``name`` was removed (``depth`` left; ``value``: the item, for
        a violation's value summary). Returns the violation, if the pop broke the rule."""
        if type(name) is str:
            qname = name
            family = self.families.memo.get(name) or self.families(name)
        else:
            qname, family = safe_str(name), self.families(name)
        q = self._queues.get(name)
        self.seq = seq = self.seq + 1
        fs = self._stats.families.get(family) or self._stats.family(family)
        fs.pop += 1
        if depth == 0:
            if fs.live:
                fs.live -= 1
            fs.empty += 1
        step = self.step
        if step is not None:
            step.ops += 1
            popped = step.popped
            if len(popped) < _STEP_MEMORY:
                popped.add(name if type(name) is str else self._step_key(name))
        if q is None:                        # pushed before a clear_all / reset: no provenance
            self._ring_append((seq, _time(), self.step_index, "pop", qname, family, owner, site,
                               depth, 0, 0, None, None, None, (), False))
            return None
        item = q.pop(1)
        q[0] += 1
        if len(q) == 1:
            del self._queues[name]           # drained: free the bookkeeping
        fs.release(item[LOGICAL], item[STORAGES])
        producer = item[OWNER]
        # the rule: the k-th pop is made by the owner of the k-th push
        kind = None if (producer == owner or producer is None or owner is None
                        or self.same_owner(owner, producer)) else "owner_mismatch"
        self._ring_append((seq, _time(), self.step_index, "pop", qname, family, owner, site, depth,
                           item[LOGICAL], item[STORAGE], item[VALUE], kind, producer,
                           item[STORAGES], True))
        if kind is None:
            return None
        measured = item[VALUE]
        if measured is None:
            measured = measure(value) if value is not _NOTHING else None
        return self._keep(Violation(
            kind, qname, family, self.step_index, owner, producer, seq, site,
            item[SITE], item[STEP], item[SEQ],
            format_summary(measured) if measured is not None else None, depth, q[0],
            mismatch_hint(owner, _record(item), [_record(e) for e in q[1:]],
                          self._popped_before(qname, owner, seq), self.step_index,
                          taken_by=self._taken_by(qname, owner, seq),
                          restarted=self._restarted_step == self.step_index),
            timeline=self._timeline_for(qname, seq), cache=self.name))

    def _popped_before(self, queue: str, owner: str | None, seq: int) -> bool:
        """Whether ``owner`` popped ``queue`` earlier in this step (violation path only: read
        from the op ring)."""
        for e in self.timeline.entries():
            if e[STEP] != self.step_index:
                break
            if e[OP] == "pop" and e[SEQ] < seq and e[QUEUE] == queue and e[OWNER] == owner:
                return True
        return False

    def pop_failed(self, kind: str, name: Any, owner: str | None, site: str | None) -> Violation:
        """A pop of a missing (``pop_missing``) or empty (``pop_empty``) queue."""
        if self._gets:
            self.fold()
        family = self.families(name)
        fs = self.stats.family(family)
        fs.pop += 1
        depth = 0 if kind == "pop_empty" else None
        entry = self._append("pop", name, family, owner, site, depth, violation=kind)
        queue, seq = entry[QUEUE], entry[SEQ]
        popped_before = self._popped_before(queue, owner, seq)
        if kind == "pop_empty":
            pushers = [e[OWNER] for e in self.timeline.entries() if e[QUEUE] == queue and e[OP] == "push"]
            pushers.reverse()
            if popped_before:
                hint = (f"{owner} already popped this queue in this step: the layer ran twice, or "
                        "the loop did not advance state_ids before running the layers again")
            elif pushers and owner not in pushers:
                hint = (f"{owner} never pushed to this queue (its pushes came from "
                        f"{', '.join(dict.fromkeys(p or '<no module>' for p in pushers))}): it was "
                        "skipped in the step that filled the queue, so the layers after it are off by one")
            else:
                hint = ("more pops than pushes: a layer ran twice, a layer before it was repeated, or "
                        "state_ids points at a state whose items were already consumed")
            detail = ""
        else:
            cleared = self._cleared.get(name) if type(name) is str else None
            if cleared is not None:
                cseq, cstep, by, at = cleared
                hint = (f"the queue was cleared by {by or '<no module>'} at op #{cseq} ({at}), "
                        f"{'before the first step' if cstep < 0 else f'step {cstep}'}, while items "
                        "were still expected: do not clear KV queues mid-step")
            elif self._cleared_all is not None:
                cseq, cstep, by, at = self._cleared_all
                hint = (f"clear_all() ran at op #{cseq} ({at}) by {by or '<no module>'}; nothing was "
                        "pushed to this queue since")
            else:
                hint = ("nothing was ever pushed under this name: state_ids probably points at a "
                        "state that no step produced (check the (prev, next) the loop sets)")
            detail = f"state_ids is {safe_repr(self.state_value)}"
        return self._keep(Violation(
            kind, queue, family, self.step_index, owner, None, seq, site, depth=depth, hint=hint,
            detail=detail, timeline=self._timeline_for(queue, seq), cache=self.name))


    # ------------------------------------------------------------------ value ops
    def set(self, key: Any, owner: str | None, site: str | None, old_len: int | None,
            new_len: int | None, value: Any = None) -> list[Violation]:
        """``key`` was set: ``old_len``/``new_len``: lengths when the old/new value is a list
        (a queue), else None. Setting ``state_key`` is a step boundary: returns its violations."""
        if self._gets:
            self.fold()
        fs = self.family_stats(key)
        fs.set += 1
        if old_len is not None:
            self._forget_queue(key, fs, old_len)
        if new_len is not None:
            fs.queue_added(new_len)
        entry = self._append("set", key, fs.family, owner, site, new_len)
        if type(key) is str and key == self.state_key:
            self.state_value = value
            return self.boundary(value, entry, explicit=False)
        return []

    def clear(self, key: Any, owner: str | None, site: str | None, old_len: int | None) -> None:
        """``key`` was removed (``old_len``: its length when it was a queue)."""
        if self._gets:
            self.fold()
        fs = self.family_stats(key)
        fs.clear += 1
        if old_len is not None:
            self._forget_queue(key, fs, old_len)
        entry = self._append("clear", key, fs.family, owner, site, None)
        if type(key) is str:
            if len(self._cleared) >= _CLEARED_MEMORY:
                self._cleared.pop(next(iter(self._cleared)))
            self._cleared[key] = (entry[SEQ], self.step_index, owner, site)
            if key == self.state_key:
                self.state_value = None

    def clear_all(self, owner: str | None, site: str | None) -> None:
        if self._gets:
            self.fold()
        self._queues.clear()
        self._cleared.clear()
        for fs in self.stats.families.values():
            fs.drop_all()
        fs = self.stats.family("all")
        fs.clear_all += 1
        entry = self._append("clear_all", "*", "all", owner, site, None)
        self._cleared_all = (entry[SEQ], self.step_index, owner, site)
        self.state_value = None

    def _forget_queue(self, name: Any, fs: FamilyStats, length: int) -> None:
        """A queue vanished (clear/set over it): release what its items held."""
        fs.queue_removed(length)
        q = self._queues.pop(name, None)
        if q is not None:
            for item in q[1:]:
                fs.release(item[LOGICAL], item[STORAGES])

    # ------------------------------------------------------------------ steps
    def mark_step(self, prev: Any = None, next: Any = None) -> list[Violation]:  # noqa: A002
        """An explicit step boundary (loops that do not set ``state_ids``)."""
        entry = self._append("set", "<mark_step>", "mark_step", None, None, None)
        return self.boundary((prev, next), entry, explicit=True)

    def end_step(self, tokens: int = 0) -> StepInfo | None:
        """Close the current step; returns it (None when no step was open)."""
        if self._gets:
            self.fold()
        self.loop_ends_steps = True
        step = self.step
        if step is None or step.end is not None:
            return None
        self._close_step(step, tokens)
        return step

    def _close_step(self, step: StepInfo, tokens: int) -> None:
        step.end = _perf()
        step.tokens = tokens
        self.stats.steps += 1
        self.stats.tokens += tokens

    def boundary(self, value: Any, entry: tuple[Any, ...], explicit: bool) -> list[Violation]:
        """A new step begins: check the step that ended, then open the next. The step that this
        closed is left in ``pending_step_end`` for the front end to announce."""
        violations: list[Violation] = []
        pair = value if type(value) in (tuple, list) and len(value) == 2 else None
        cur = self.step
        ended: StepInfo | None = None
        if cur is not None:
            if pair is not None and _same(cur.prev, pair[0]) and _same(cur.next, pair[1]):
                violations += self._restart_check(cur, entry)
            else:
                violations += self._leftover_check(cur, entry)
            if cur.end is None:
                self._close_step(cur, 0)
                ended = cur
        if pair is None:
            violations.append(self._keep(Violation(
                "bad_state_ids", entry[QUEUE], entry[FAMILY], self.step_index + 1, entry[OWNER], None,
                entry[SEQ], entry[SITE],
                hint="set state_ids to a (prev_state, next_state) tuple, e.g. (None, 0) for the "
                     "prompt and (i, i + 1) for each later token",
                detail=f"state_ids was set to {safe_repr(value)} (a {type(value).__name__})",
                timeline=self._timeline_for(entry[QUEUE], entry[SEQ]), cache=self.name)))
        self.step_index += 1
        prev, nxt = pair if pair is not None else (None, None)
        self.step = StepInfo(self.step_index, prev, nxt, _perf(), _time())
        self.pending_step_end = ended
        return violations

    def _leftover_check(self, step: StepInfo, entry: tuple[Any, ...]) -> list[Violation]:
        # Items pushed during the step itself are the next step's (a queue popped then pushed in
        # one step, as a layer's slot in cachescope.hf); FIFO: the oldest item says whether any
        # older one is held.
        queues = self._queues
        index = step.index
        held = []
        for n in (_step_names(step.popped) if self._weak_names else step.popped):
            q = queues.get(n)
            if q is not None and len(q) > 1 and q[1][STEP] < index:
                held.append(n)
        if not held:
            return []   # the usual case: every queue the step popped was drained
        out = []
        for name in sorted(held, key=safe_str):
            items = [e for e in queues[name][1:] if e[STEP] < index]
            owners = [e[OWNER] or "<no module>" for e in items]
            first = items[0]
            m = first[VALUE]
            if m is None:
                try:
                    value = self.peek(name)
                except Exception:
                    value = _NOTHING
                m = measure(value) if value is not _NOTHING else Measure(
                    first[LOGICAL], first[STORAGES], (), "value")
            qname = safe_str(name)
            out.append(self._keep(Violation(
                "leftover", qname, self.families(name), step.index, None, first[OWNER], entry[SEQ],
                producer_site=first[SITE], producer_step=first[STEP], producer_seq=first[SEQ],
                value=format_summary(m), depth=len(items),
                detail=f"pushed by {', '.join(owners)}",
                hint=(f"{len(owners)} item(s) pushed by {', '.join(owners)} were never popped in "
                      f"step {step.index}: a layer was skipped, or fewer layers ran than pushed"),
                timeline=self._timeline_for(qname, entry[SEQ]), cache=self.name)))
        return out

    def _taken_by(self, queue: str, owner: str | None, seq: int) -> str | None:
        """Who popped ``owner``'s item of ``queue`` earlier in this step (violation path only)."""
        for e in self.timeline.entries():
            if e[STEP] != self.step_index:
                break
            if (e[OP] == "pop" and e[QUEUE] == queue and e[SEQ] != seq and e[PRODUCER] == owner
                    and e[OWNER] != owner):
                return e[OWNER]
        return None

    def _restart_check(self, step: StepInfo, entry: tuple[Any, ...]) -> list[Violation]:
        if not step.pushed and not step.popped:
            return []  # nothing ran under these state_ids: setting them again is harmless
        queues = self._queues
        unconsumed = [n for n in _step_names(step.popped) if n in queues]
        pushed = [n for n in _step_names(step.pushed) if n in queues]
        state = f"({safe_repr(step.prev)}, {safe_repr(step.next)})"
        # A loop that closes its steps (end_step) tells us whether this one finished; otherwise
        # only unconsumed items in a queue the step popped show that it stopped half-way.
        unfinished = self.loop_ends_steps and step.end is None
        if unconsumed or (pushed and unfinished):
            names = sorted(set(pushed + unconsumed), key=safe_str)
            held = ", ".join(f"{safe_str(n)!r} holds {len(queues[n]) - 1}" for n in names)
            kind = "step_restarted"
            self._restarted_step = step.index + 1
            detail = (f"state_ids {state} was set again before step {step.index} finished; {held} "
                      "item(s) from the failed attempt")
            hint = ("the retried step will pop the wrong items and queue its pushes behind stale "
                    "ones: restore the queues (or clear them and re-run the prompt) before retrying")
            queue = safe_str(names[0])
            family = self.families(names[0])
        else:
            kind = "state_not_advanced"
            detail = f"state_ids {state} was set again after step {step.index} completed"
            hint = ("advance state_ids every step: (i, i + 1), so each step pops what the "
                    "previous one pushed")
            queue = entry[QUEUE]
            family = entry[FAMILY]
        return [self._keep(Violation(
            kind, queue, family, step.index + 1, entry[OWNER], None, entry[SEQ], entry[SITE],
            detail=detail, hint=hint, timeline=self._timeline_for(queue, entry[SEQ]),
            cache=self.name))]

    def finish(self, error: BaseException | None = None) -> tuple[list[Violation], StepInfo | None]:
        """The end of a generation: a clean end checks the last step for leftovers. Returns the
        violations and the step this closed (if it was still open)."""
        if self._gets:
            self.fold()
        violations: list[Violation] = []
        ended = None
        step = self.step
        if step is not None:
            if error is None:
                entry = self._append("set", "<end>", "mark_step", None, None, None)
                violations = self._leftover_check(step, entry)
            if step.end is None:
                self._close_step(step, 0)
                ended = step
        self.step = None
        return violations, ended

    def reset(self, live: Iterable[tuple[Any, int]]) -> None:
        """Forget violations, counters and provenance; ``live``: (name, length) of the queues
        the front end holds now."""
        self.violations.clear()
        self._stats = Stats()
        self._gets.clear()
        self._fs_memo.clear()
        self._queues.clear()
        self.timeline.clear()
        for name, length in live:
            self._stats.family(self.families(name)).queue_added(length)


def mismatch_hint(consumer: str | None, head: OpRecord, items: Any, popped_by_consumer: bool,
                  step: int, *, taken_by: str | None = None, restarted: bool = False) -> str:
    """Explain an owner mismatch from the queue's remaining provenance.

    ``taken_by``: who popped the consumer's own item earlier in this step, if anyone (a swap
    when it is the owner of the item the consumer got);
    ``restarted``: this step re-ran the previous one with the same state_ids (step_restarted).
    """
    if popped_by_consumer:
        return (f"{consumer} already popped this queue in step {step}: the layer ran twice "
                "(a repeated call, or a retry without a new state_ids); every later pop is now shifted")
    if restarted:
        return (f"step {step} is a retry of step {step - 1} with the same state_ids: the layers that "
                f"ran before the failure already popped their items, so {consumer} gets "
                f"{head.owner}'s; restore the queues (or clear them and re-run the prompt) before retrying")
    if taken_by is not None and taken_by == head.owner:
        return (f"layers ran in a different order than when the items were pushed (step {head.step}): "
                f"{taken_by} ran in {consumer}'s place and popped its item earlier in step {step}")
    own = next((i for i in items if i.owner == consumer), None)
    if own is not None and own.step != head.step:
        return (f"the queue mixes items from steps {head.step} and {own.step}: a step was retried "
                "without clearing what the failed attempt pushed; clear the next-state queue before retrying")
    if own is not None:
        return (f"layers ran in a different order than when the items were pushed (step {head.step}), "
                f"or a layer was skipped: {consumer}'s own item is queued behind {head.owner}'s")
    return (f"{consumer} has no item in this queue: it (or a layer before it) was skipped or added "
            f"in step {head.step}, so every later layer is off by one")
