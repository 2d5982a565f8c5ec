"""Small immutable value types that flow from the cache to checkers and exporters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["OpRecord", "StepInfo", "OPS", "_Queue"]

OPS = ("push", "pop", "set", "get", "clear", "clear_all")


class OpRecord(NamedTuple):
    """One cache operation as the instrumentation saw it. Holds no tensor references."""

    seq: int                 # op number within this cache, from 1
    time: float              # time.time() of the op
    step: int                # decode step index (-1 before the first step boundary)
    op: str                  # one of OPS (``get`` is counted but not recorded)
    queue: str               # queue name or key, as str
    family: str              # bounded family label
    owner: str | None        # who made the op (module name), None when outside any module
    site: str | None         # call site "file.py:123"
    depth: int | None        # queue length after the op (None for non-queue keys)
    logical_bytes: int       # tensor bytes of the pushed/popped value
    storage_bytes: int       # distinct storage bytes of the value
    value: Any               # push/pop: a ``Measure`` (shapes, dtypes, devices, bytes); else None
    violation: str | None    # violation kind raised by this op, if any
    producer: str | None = None  # for pops: owner that pushed the popped item


@dataclass(slots=True)   # slots: the C fast path updates ops/pushed/popped in place
class StepInfo:
    """A decode step: from one step boundary (``state_ids`` set / ``mark_step``) to the next."""

    index: int
    prev: Any
    next: Any
    start: float                   # time.perf_counter() at the boundary
    start_time: float              # time.time() at the boundary
    end: float | None = None
    tokens: int = 0
    ops: int = 0
    violations: int = 0
    popped: set[str] = field(default_factory=set)   # queues popped during the step
    pushed: set[str] = field(default_factory=set)   # queues pushed during the step

    @property
    def duration(self) -> float | None:
        return None if self.end is None else self.end - self.start


class _Queue:
    """Provenance of one live queue: the pushes not yet popped, and how many pops it has seen.

    With the C extension, ``_speedups.Queue`` (compact entries) has the same interface; ``items``
    is then a copy, so the cache changes provenance only through ``append`` and ``popleft``.
    """

    __slots__ = ("items", "pops")

    def __init__(self) -> None:
        self.items: list[OpRecord] = []   # push records not yet popped (a few per queue)
        self.pops = 0

    def append(self, rec: OpRecord) -> None:
        self.items.append(rec)

    def popleft(self) -> OpRecord:
        return self.items.pop(0)

    def __len__(self) -> int:
        return len(self.items)
