"""Text for people: violation reports (ThreadSanitizer/lockdep style) and the run summary.

Reads the records' public fields only; imports nothing of cachescope but byte formatting, so the
records module can use it without an import circle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._records import OpRecord, Violation

__all__ = ["format_bytes", "format_violation", "one_line", "format_op", "format_run"]

_RULE = "=" * 78


def format_bytes(n: int) -> str:
    """Human-readable bytes: ``3.0 KiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(size) < 1024 or unit == "EiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover
_MAX_NAME = 120   # queue names longer than this are cut in reports


def _name(queue: Any) -> str:
    """A queue name as shown in reports: at most ``_MAX_NAME`` characters, control characters
    escaped (a name is user data: it must not flood a report or forge lines in it)."""
    text = queue if isinstance(queue, str) else str(queue)
    if len(text) > _MAX_NAME:
        text = text[:_MAX_NAME - 3] + "..."
    return text if text.isprintable() else repr(text)[1:-1]


def _quoted(queue: Any) -> str:
    return f"'{_name(queue)}'"


def _step(step: int | None) -> str:
    if step is None:
        return "step ?"
    return "before the first step" if step < 0 else f"step {step}"


def _at(step: int | None) -> str:
    """``at step 3``, or ``before the first step``."""
    text = _step(step)
    return text if text.startswith("before") else f"at {text}"


def one_line(v: "Violation") -> str:
    who = {
        "owner_mismatch": f"{v.consumer} popped the item pushed by {v.producer}",
        "pop_empty": f"{v.consumer} popped an empty queue",
        "pop_missing": f"{v.consumer} popped a queue that does not exist",
        "leftover": f"{v.depth} item(s) never popped ({v.detail})" if v.detail else "items never popped",
        "step_restarted": v.detail or "step restarted with items still queued",
        "state_not_advanced": v.detail or "state_ids not advanced",
        "bad_state_ids": v.detail or "state_ids is not a (prev, next) pair",
    }.get(v.kind, v.detail)
    rank = "" if getattr(v, "rank", None) is None else f" [rank {v.rank}]"
    return f"{v.kind} on {_quoted(v.queue)} {_at(v.step)}{rank}: {who}"


def format_op(rec: "OpRecord", mark: bool = False) -> str:
    arrow = "  >" if mark else "   "
    who = rec.owner or "-"
    extra = ""
    if rec.op == "pop" and rec.producer is not None and rec.producer != rec.owner:
        extra = f" (item of {rec.producer})"
    depth = "" if rec.depth is None else f" depth={rec.depth}"
    flag = f"  <-- {rec.violation}" if rec.violation else ""
    return (f"{arrow} #{rec.seq:<6} {_step(rec.step):<14} {rec.op:<9} {_name(rec.queue):<14} "
            f"{who}{extra}{depth}{flag}")


def format_violation(v: "Violation") -> str:
    rank = getattr(v, "rank", None)
    where = f"cache {v.cache}" + ("" if rank is None else f", rank {rank}")
    lines = [_RULE, f"cachescope: {v.kind} on queue {_quoted(v.queue)} (family {v.family}) "
             f"{_at(v.step)}  [{where}]", f"  {v.description}", ""]
    if v.kind in ("owner_mismatch", "pop_empty", "pop_missing"):
        nth = f" (pop #{v.position} of this queue)" if v.position else ""
        lines.append(f"  Pop by   {v.consumer or '<no module>'} {_at(v.step)}{nth}")
        lines.append(f"           at {v.consumer_site or '<unknown site>'}")
    if v.producer is not None or v.producer_site is not None:
        lines.append(f"  Push by  {v.producer or '<no module>'} {_at(v.producer_step)}"
                     f" (op #{v.producer_seq})")
        lines.append(f"           at {v.producer_site or '<unknown site>'}")
    if v.value:
        lines.append(f"           value: {v.value}")
    if v.kind == "owner_mismatch":
        lines += ["", f"  Expected the pop to come from {v.producer} (it made the matching push);",
                  f"  got {v.consumer}. {v.consumer} now computes attention with {v.producer}'s "
                  "keys/values, silently."]
    if v.detail and v.kind not in ("owner_mismatch",):
        lines += ["", f"  {v.detail}"]
    side = getattr(v, "peer_side", "")
    if side:
        lines += [""] + [f"  {line}" for line in side.splitlines()]
    if v.timeline:
        lines += ["", f"  Recent ops on {_quoted(v.queue)} and its step (oldest first):"]
        lines += [format_op(rec, mark=(rec.seq == v.seq)) for rec in v.timeline]
    lines += ["", f"  Hint: {v.hint}" if v.hint else "", _RULE]
    return "\n".join(line for line in lines if line is not None)


def format_run(cache: Any) -> str:
    """Whole-run summary: steps, tokens, ops by kind, peaks, violations grouped by kind."""
    stats = cache.stats
    lines = [f"cachescope summary for cache {cache.name!r}",
             f"  steps: {stats.steps}   tokens: {stats.tokens}   ops: {stats.total_ops()}"]
    ops = stats.ops_by_op()
    lines.append("  ops by kind: " + ", ".join(f"{op}={n}" for op, n in ops.items() if n))
    for fam, fs in sorted(stats.families.items()):
        if fs.push or fs.pop:
            lines.append(
                f"  family {fam}: depth now {fs.depth} (peak {fs.peak_depth}), queues live "
                f"{fs.live} / empty {fs.empty}, bytes held {format_bytes(fs.logical)} logical / "
                f"{format_bytes(fs.storage)} storage (peak {format_bytes(fs.peak_logical)} / "
                f"{format_bytes(fs.peak_storage)})")
    violations = cache.violations
    if not violations:
        lines.append("  violations: none")
    else:
        by_kind: dict[str, int] = {}
        for v in violations:
            by_kind[v.kind] = by_kind.get(v.kind, 0) + 1
        lines.append(f"  violations: {len(violations)} (" +
                     ", ".join(f"{k}={n}" for k, n in sorted(by_kind.items())) + ")")
        if stats.violations_dropped:
            lines.append(f"  ({stats.violations_dropped} more not kept: raise max_violations)")
        for v in violations[:20]:
            lines.append(f"    - {v.summary()}")
        if len(violations) > 20:
            lines.append(f"    ... and {len(violations) - 20} more")
    return "\n".join(lines)
