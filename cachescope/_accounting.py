"""Per-family counters the exporters read: ops, depth, bytes held, queue counts, violations.

Plain integers updated under the cache's lock; the Prometheus collector copies them at scrape
time (``InstrumentedCache.stats_snapshot``), so no metric object is touched per op.
"""

from __future__ import annotations

from typing import Any, Iterable

from ._records import OPS

__all__ = ["FamilyStats", "Stats"]

_COUNTERS = ("push", "pop", "set", "get", "clear", "clear_all", "depth", "peak_depth", "logical",
             "storage", "peak_logical", "peak_storage", "live", "empty")


class _Counters:
    """Queue depth and the bytes its items hold, with peaks; storages shared by several queued
    items (a view and its base, k and v of one projection) are counted once."""

    __slots__ = _COUNTERS + ("_storages",)

    def __init__(self) -> None:
        # storage key -> nbytes while one queued item holds it, [holders, nbytes] once shared
        self._storages: dict[Any, int | list[int]] = {}

    def hold(self, logical: int, storages: Iterable[tuple[Any, int]]) -> None:
        """An item entered a queue of this family."""
        self.depth += 1
        if self.depth > self.peak_depth:
            self.peak_depth = self.depth
        self._add_bytes(logical, storages)

    def _add_bytes(self, logical: int, storages: Iterable[tuple[Any, int]]) -> None:
        self.logical += logical
        if self.logical > self.peak_logical:
            self.peak_logical = self.logical
        held = self._storages
        for key, nbytes in storages:
            entry = held.get(key)
            if entry is None:
                held[key] = nbytes          # one holder: just its byte count
                self.storage += nbytes
            elif type(entry) is int:
                held[key] = [2, entry]      # shared: [holders, nbytes]
            else:
                entry[0] += 1
        if self.storage > self.peak_storage:
            self.peak_storage = self.storage

    def release(self, logical: int, storages: Iterable[tuple[Any, int]]) -> None:
        """An item left a queue of this family (popped or cleared)."""
        self.depth = max(0, self.depth - 1)
        self.logical = max(0, self.logical - logical)
        held = self._storages
        for key, _ in storages:
            entry = held.get(key)
            if entry is None:
                continue
            if type(entry) is int:
                del held[key]
                self.storage -= entry
            else:
                entry[0] -= 1
                if entry[0] <= 0:
                    del held[key]
                    self.storage -= entry[1]
        if self.storage < 0:
            self.storage = 0

    def set_held(self, items: Iterable[tuple[int, Iterable[tuple[Any, int]]]]) -> None:
        """The items held now, measured afresh: ``(logical, storages)`` each (depth unchanged)."""
        self.logical = self.storage = 0
        self._storages.clear()
        for logical, storages in items:
            self._add_bytes(logical, storages)

    def drop_all(self) -> None:
        """``clear_all``: nothing is held any more."""
        self.depth = self.logical = self.storage = self.live = self.empty = 0
        self._storages.clear()

    def held_storages(self) -> list[tuple[int, int]]:
        """Sorted ``(holders, nbytes)`` of the storages held now."""
        return sorted((1, e) if type(e) is int else (e[0], e[1]) for e in self._storages.values())


class FamilyStats(_Counters):
    """Everything counted for one queue family (``attn_kv``)."""

    __slots__ = ("family", "violations")
    #: Every public field.
    FIELDS = ("family",) + _COUNTERS + ("violations",)

    def __init__(self, family: str) -> None:
        super().__init__()
        self.family = family
        self.push = self.pop = self.set = self.get = self.clear = self.clear_all = 0
        self.depth = self.peak_depth = 0
        self.logical = self.storage = self.peak_logical = self.peak_storage = 0
        self.live = self.empty = 0
        self.violations: dict[str, int] = {}

    def ops(self) -> dict[str, int]:
        return {op: getattr(self, op) for op in OPS}

    def queue_added(self, length: int) -> None:
        if length:
            self.live += 1
        else:
            self.empty += 1

    def queue_removed(self, length: int) -> None:
        if length:
            self.live = max(0, self.live - 1)
        else:
            self.empty = max(0, self.empty - 1)


class Stats:
    """Counters for one cache, by family, plus decode-loop totals."""

    def __init__(self) -> None:
        self.families: dict[str, FamilyStats] = {}
        self.steps = 0                 # completed decode steps
        self.tokens = 0                # tokens the decode loop reported
        self.violations_dropped = 0    # violations counted but not kept (max_violations)
        self.telemetry_errors: dict[str, int] = {}

    def copy(self) -> "Stats":
        """A copy whose counters no later op changes."""
        out = Stats()
        out.steps, out.tokens = self.steps, self.tokens
        out.violations_dropped = self.violations_dropped
        out.telemetry_errors = dict(self.telemetry_errors)
        for name, fs in self.families.items():
            c = out.families[name] = FamilyStats(name)
            for f in _COUNTERS:
                setattr(c, f, getattr(fs, f))
            c.violations = dict(fs.violations)
        return out

    def family(self, family: str) -> FamilyStats:
        fs = self.families.get(family)
        if fs is None:
            fs = self.families[family] = FamilyStats(family)
        return fs

    def total_ops(self) -> int:
        return sum(sum(fs.ops().values()) for fs in self.families.values())

    def ops_by_op(self) -> dict[str, int]:
        out = dict.fromkeys(OPS, 0)
        for fs in self.families.values():
            for op, n in fs.ops().items():
                out[op] += n
        return out

    def violations_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for fs in self.families.values():
            for kind, n in fs.violations.items():
                out[kind] = out.get(kind, 0) + n
        return out

    def peak_depth(self) -> int:
        return max((fs.peak_depth for fs in self.families.values()), default=0)
