"""The pop-order rule and the violations it reports.

Rule: for each queue, the k-th pop must be made by the same owner that made the k-th push.
Every layer of a NeoX decode loop pops ``attn_kv_{prev}`` and pushes ``attn_kv_{next}``; nothing
else ties an item to the layer that pushed it, so a reordered, skipped, repeated or retried layer
silently hands one layer another layer's keys/values. This module decides *whether* an op broke
the rule and *why*; ``_report`` turns a violation into text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._records import OpRecord

__all__ = ["Violation", "PopOrderError", "KINDS"]

#: Violation kinds and what each means (documented in the README).
KINDS: dict[str, str] = {
    "owner_mismatch": "an owner popped an item that another owner pushed",
    "pop_empty": "pop on an existing queue that is empty",
    "pop_missing": "pop on a queue that was never pushed to, or was cleared",
    "leftover": "at a step boundary, a queue popped during the step still holds items",
    "step_restarted": "a step began again with the same state_ids while the queues it pushed still hold items",
    "state_not_advanced": "a completed step's state_ids were set again instead of advancing",
    "bad_state_ids": "state_ids was set to something other than a (prev, next) pair",
}


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

    def report(self) -> str:
        """A ThreadSanitizer-style report: title, both sides, expected vs actual, timeline, hint."""
        from ._report import format_violation
        return format_violation(self)

    def summary(self) -> str:
        """One line: ``owner_mismatch attn_kv_3 step 4: layers.2.attention popped layers.1.attention's item``."""
        from ._report import one_line
        return one_line(self)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in (
            "kind", "queue", "family", "step", "consumer", "producer", "seq", "consumer_site",
            "producer_site", "producer_step", "producer_seq", "value", "depth", "position",
            "hint", "detail", "cache")}
        return d

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
    if violation.kind == "pop_empty":
        return PopEmptyError(violation)
    if violation.kind == "pop_missing":
        return PopMissingError(violation)
    return PopOrderError(violation)


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
