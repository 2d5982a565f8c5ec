"""The values that flow from the cache to the checker's readers: op records, steps, violations.

Everything here is plain data. ``_report`` turns a ``Violation`` into text; nothing in this module
decides whether an op broke a rule (that is ``_checker``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import _report

__all__ = ["OPS", "OpRecord", "StepInfo", "KINDS", "RANK_KINDS", "HF_KINDS", "Violation", "PopOrderError", "PopEmptyError",
           "PopMissingError", "strict_error"]

OPS = ("push", "pop", "set", "get", "clear", "clear_all")


class OpRecord(NamedTuple):
    """One cache operation as the instrumentation saw it. Holds no tensor references.

    The cache keeps compact entries in a bounded ring and builds records only when something
    reads them (``cache.timeline()``, ``cache.ops_since()``, a sink's ``on_op``).
    """

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
    value: Any               # push/pop: a ``Measure`` when a reader asked for value summaries, else None
    violation: str | None    # violation kind raised by this op, if any
    producer: str | None = None  # for pops: owner that pushed the popped item


@dataclass(slots=True)
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
    popped: set[Any] = field(default_factory=set)   # queues popped during the step
    pushed: set[Any] = field(default_factory=set)   # queues pushed during the step

    @property
    def duration(self) -> float | None:
        return None if self.end is None else self.end - self.start


#: Violation kinds and what each means (documented in the README).
KINDS: dict[str, str] = {
    "owner_mismatch": "an owner popped an item that another owner pushed",
    "pop_empty": "pop on an existing queue that is empty",
    "pop_missing": "pop on a queue that was never pushed to, or was cleared",
    "leftover": "at a step boundary, a queue popped during the step still holds items pushed "
                "before the step",
    "step_restarted": "a step began again with the same state_ids while the queues it pushed still hold items",
    "state_not_advanced": "a completed step's state_ids were set again instead of advancing",
    "bad_state_ids": "state_ids was set to something other than a (prev, next) pair",
    "rank_divergence": "ranks that decode the same sequence disagree on a step (its ops, owners, "
                       "kv lengths, state ids or input tokens)",
    "rank_stalled": "a rank has not reached a step its peers are past (stuck, or ended its "
                    "generation early)",
    # Hugging Face transformers' Cache (cachescope.hf); owner_mismatch there: a layer extended
    # by another module than the one that wrote it
    "layer_skipped": "a forward left a layer of the cache without its update (zero updates)",
    "layer_repeated": "a forward updated a layer of the cache two or more times",
    "seq_len_mismatch": "after a forward, the cache's layers hold different lengths (sliding "
                        "layers compared on their own counter)",
    "position_gap": "new keys do not start at the layer's length (their positions skip or "
                    "overlap what the layer holds)",
    "structural_op_mid_step": "crop/reorder/select/reset of the cache during a forward, or of "
                              "only some of its layers",
    "stale_reuse": "a cache handed to a new generation whose prompt does not start with the "
                   "tokens the cache was built from",
}

#: The kinds found by comparing ranks (``cachescope.distributed``), not by one cache's ops.
RANK_KINDS = ("rank_divergence", "rank_stalled")
#: The kinds of ``cachescope.hf``'s own checks (lengths, positions, structural ops, reuse).
HF_KINDS = ("layer_skipped", "layer_repeated", "seq_len_mismatch", "position_gap",
            "structural_op_mid_step", "stale_reuse")


@dataclass
class Violation:
    """One broken invariant, with both sides of the story and the recent op timeline."""

    kind: str                        # one of KINDS
    queue: str                       # queue name
    family: str                      # bounded family label
    step: int                        # step in which the violation happened
    consumer: str | None             # who popped (None where not applicable)
    producer: str | None             # who pushed the item involved (None where unknown)
    seq: int = 0                     # op number that triggered it
    consumer_site: str | None = None
    producer_site: str | None = None
    producer_step: int | None = None
    producer_seq: int | None = None
    value: str | None = None         # value summary of the item involved
    depth: int | None = None         # queue depth after the op
    position: int | None = None      # k: which pop of the queue this was (1-based)
    hint: str = ""
    detail: str = ""                 # extra facts (e.g. leftover owners, state ids)
    timeline: tuple[OpRecord, ...] = field(default=(), repr=False)
    cache: str = "default"
    rank: int | None = None          # the rank it concerns (multi-rank runs; None otherwise)
    peer: int | None = None          # rank_divergence: the rank it was compared with
    peer_side: str = ""              # rank_divergence/rank_stalled: the other rank's side, as text

    @property
    def description(self) -> str:
        """What this kind of violation means (``KINDS``)."""
        return KINDS.get(self.kind, "")

    def report(self) -> str:
        """A ThreadSanitizer-style report: title, both sides, expected vs actual, timeline, hint."""
        return _report.format_violation(self)

    def summary(self) -> str:
        """One line: ``owner_mismatch on 'attn_kv_3' at step 4: layers.2 popped the item pushed by layers.1``."""
        return _report.one_line(self)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "kind", "queue", "family", "step", "consumer", "producer", "seq", "consumer_site",
            "producer_site", "producer_step", "producer_seq", "value", "depth", "position",
            "hint", "detail", "cache", "rank", "peer")}

    def __str__(self) -> str:
        return self.summary()


class PopOrderError(RuntimeError):
    """Raised in strict mode at the first violation. ``.violation`` holds the details."""

    def __init__(self, violation: Violation) -> None:
        super().__init__(violation.report())
        self.violation = violation


class PopEmptyError(PopOrderError, IndexError):
    """Strict-mode ``pop_empty``: still an ``IndexError``, as the plain cache raises."""


class PopMissingError(PopOrderError, KeyError):
    """Strict-mode ``pop_missing``: still a ``KeyError``, as the plain cache raises."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0] if self.args else ""


def strict_error(violation: Violation) -> PopOrderError:
    """The exception strict mode raises for ``violation``."""
    if violation.kind == "pop_empty":
        return PopEmptyError(violation)
    if violation.kind == "pop_missing":
        return PopMissingError(violation)
    return PopOrderError(violation)
