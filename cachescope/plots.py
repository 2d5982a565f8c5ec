"""Pictures of a recorded run: ``write_report("run.jsonl.gz", "report/")`` -> PNGs + index.html.

The record is replayed by ``cachescope.analyze`` (so the pictures show what the checker found),
then drawn with matplotlib's Agg canvas (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``: no
pyplot, no global backend switch, nothing imported until ``write_report`` runs):

- ``queues.png``: queue depth and bytes held (logical vs storage) per family, over steps;
- ``ops.png``: ops per step, stacked by op;
- ``violations.png``: violations on the step timeline, colored by kind;
- ``owners.png``: steps x consumers grid: correct / mismatch / failed pop, producer annotated;
- ``index.html``: one self-contained page (PNGs embedded), summary table, violation reports.

Long runs are aggregated into step bins so every picture stays readable.

The per-rank recordings of one multi-rank run (``write_rank_report(paths, out_dir)``,
``cachescope report run.rank*.jsonl.gz``) are replayed and compared by
``cachescope.analyze.replay_ranks`` and drawn side by side, one row per rank:

- ``ranks_queues.png``: queue depth per family over steps;
- ``ranks_ops.png``: ops per step, stacked by op;
- ``ranks_steps.png``: ranks x steps: agreeing, a rank's own violation, rank_divergence,
  rank_stalled, not recorded;
- ``index.html``: the per-rank table, the pictures, the cross-rank and per-rank reports.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from ._values import format_bytes
from .analyze import (AnalysisResult, RankAnalysis, RankSetError, RecordFormatError, replay,
                      replay_ranks)

__all__ = ["write_report", "write_rank_report", "main_report", "draw", "draw_ranks", "PNG_NAMES",
           "RANK_PNG_NAMES"]

PNG_NAMES = ("queues.png", "ops.png", "violations.png", "owners.png")
RANK_PNG_NAMES = ("ranks_queues.png", "ranks_ops.png", "ranks_steps.png")

_OPS = ("push", "pop", "set", "get", "clear", "clear_all")
_OP_COLORS = {"push": "#1f77b4", "pop": "#ff7f0e", "set": "#2ca02c", "get": "#bbbbbb",
              "clear": "#d62728", "clear_all": "#9467bd"}
_KIND_COLORS = {"owner_mismatch": "#d62728", "pop_empty": "#ff7f0e", "pop_missing": "#8c564b",
                "leftover": "#9467bd", "step_restarted": "#e377c2", "state_not_advanced": "#17becf",
                "bad_state_ids": "#7f7f7f"}
_FAMILY_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                  "#7f7f7f")
_MAX_FAMILIES = 8        # families drawn (the largest by peak bytes)
_MAX_POINTS = 2000       # points per line before binning (max per bin keeps the peaks)
_MAX_BARS = 120          # steps drawn as bars; more are binned into an area plot
_MAX_GRID_ROWS = 100     # grid rows before steps are binned
_DPI = 100

# grid cell states, in increasing severity (a binned cell shows the worst of its steps)
_NONE, _OK, _MISSING, _MISMATCH = 0, 1, 2, 3
_GRID_COLORS = ("#eeeeee", "#66bb6a", "#ffa726", "#e53935")
_GRID_LABELS = ("no pop", "own item (correct)", "failed pop (missing item)",
                "another owner's item (mismatch)")


# ------------------------------------------------------------------------------------- helpers
def _figure(width: float, height: float) -> Any:
    """A Figure on an Agg canvas (the backend is set here, per figure, never globally)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _bytes_formatter() -> Any:
    from matplotlib.ticker import FuncFormatter
    return FuncFormatter(lambda v, _pos: format_bytes(int(v)) if v >= 0 else "")


def _bytes_ticks(ax: Any, top: float) -> None:
    """Y ticks at round binary sizes (1 KiB, 2 KiB, 4 KiB, ...), about five of them."""
    from matplotlib.ticker import MultipleLocator
    if top <= 0:
        return
    base = 2 ** max(0, math.floor(math.log2(top / 4)))
    for nice in (1, 1.25, 2.5, 5):   # keep the unit round in decimal too: 1.0, 1.2, 2.5, 5.0 KiB
        if top / (base * nice) <= 6:
            base = base * nice
            break
    ax.yaxis.set_major_locator(MultipleLocator(base))
    ax.set_ylim(0, top * 1.08)


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _bin_width(n: int, limit: int) -> int:
    return max(1, math.ceil(n / limit))


def _downsample(xs: Sequence[int], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """At most ``_MAX_POINTS`` points: the max of each bin (peaks stay visible)."""
    n = len(xs)
    if n <= _MAX_POINTS:
        return list(xs), list(ys)
    w = _bin_width(n, _MAX_POINTS)
    out_x, out_y = [], []
    for i in range(0, n, w):
        out_x.append(xs[i])
        out_y.append(max(ys[i:i + w]))
    return out_x, out_y


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=12,
            color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def _title(result: AnalysisResult) -> str:
    return f"cache {result.header.get('cache')!r}"


def _families(result: AnalysisResult) -> list[str]:
    peaks = {f: max((max(p[2], p[3]) for p in pts), default=0) for f, pts in result.series.items()}
    return sorted(peaks, key=lambda f: (-peaks[f], f))[:_MAX_FAMILIES]


# ------------------------------------------------------------------------------------- pictures
def _queues_png(result: AnalysisResult, path: Path) -> Path:
    fig = _figure(11, 6.5)
    ax_depth, ax_bytes = fig.subplots(2, 1, sharex=True)
    families = _families(result)
    fig.suptitle(f"Queue depth and bytes held at the end of each step ({_title(result)})",
                 fontsize=13)
    if not families:
        _empty(ax_depth, "no queue ops recorded")
        _empty(ax_bytes, "")
        return _save(fig, path)
    top = 0
    for i, family in enumerate(families):
        color = _FAMILY_COLORS[i % len(_FAMILY_COLORS)]
        pts = result.series[family]
        top = max(top, max(max(p[2], p[3]) for p in pts))
        steps = [p[0] for p in pts]
        x, depth = _downsample(steps, [p[1] for p in pts])
        ax_depth.plot(x, depth, color=color, lw=1.5, label=family, drawstyle="steps-mid")
        x, logical = _downsample(steps, [p[2] for p in pts])
        ax_bytes.plot(x, logical, color=color, lw=1.5, label=f"{family} logical",
                      drawstyle="steps-mid")
        x, storage = _downsample(steps, [p[3] for p in pts])
        ax_bytes.plot(x, storage, color=color, lw=1.5, ls="--", label=f"{family} storage",
                      drawstyle="steps-mid")
    ax_depth.set_ylabel("items held in queues")
    ax_depth.set_title("queue depth (all queues of the family)", fontsize=10, loc="left")
    ax_depth.legend(title="family", loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    ax_depth.grid(alpha=0.3)
    ax_depth.set_ylim(0, max(1, ax_depth.get_ylim()[1]) * 1.05)
    ax_depth.yaxis.get_major_locator().set_params(integer=True)
    ax_bytes.set_ylabel("bytes held")
    ax_bytes.set_title("bytes held: logical (sum of tensor sizes, solid) vs storage (buffers kept "
                       "alive, dashed)", fontsize=10, loc="left")
    ax_bytes.yaxis.set_major_formatter(_bytes_formatter())
    _bytes_ticks(ax_bytes, top)
    ax_bytes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    ax_bytes.grid(alpha=0.3)
    ax_bytes.set_xlabel("decode step")
    _integer_x(ax_bytes)
    return _save(fig, path)


def _ops_png(result: AnalysisResult, path: Path) -> Path:
    fig = _figure(11, 4.5)
    ax = fig.subplots()
    counts: dict[int, dict[str, int]] = {s: dict(c) for s, c in result.ops_by_step.items()}
    for index, info in result.steps.items():
        if info.get("gets"):
            counts.setdefault(index, {})["get"] = int(info["gets"])
    if not counts:
        _empty(ax, "no ops recorded")
        fig.suptitle(f"Cache ops per step ({_title(result)})", fontsize=13)
        return _save(fig, path)
    lo, hi = min(counts), max(counts)
    n = hi - lo + 1
    ops = [op for op in _OPS if any(op in c for c in counts.values())]
    if n <= _MAX_BARS:
        steps = list(range(lo, hi + 1))
        bottom = [0] * n
        for op in ops:
            ys = [counts.get(s, {}).get(op, 0) for s in steps]
            ax.bar(steps, ys, bottom=bottom, color=_OP_COLORS[op], label=op, width=0.85)
            bottom = [b + y for b, y in zip(bottom, ys)]
        ax.set_ylabel("ops in the step")
        _integer_x(ax)
        ax.set_xlabel("decode step (-1: before the first step)")
        fig.suptitle(f"Cache ops per step, by op ({_title(result)})", fontsize=13)
    else:
        w = _bin_width(n, 400)
        starts = list(range(lo, hi + 1, w))
        series = []
        for op in ops:
            ys = []
            for s0 in starts:
                total = sum(counts.get(s, {}).get(op, 0) for s in range(s0, min(s0 + w, hi + 1)))
                ys.append(total / min(w, hi + 1 - s0))
            series.append(ys)
        ax.stackplot(starts, series, labels=ops, colors=[_OP_COLORS[op] for op in ops],
                     step="post")
        ax.set_ylabel(f"ops per step (mean over {w} steps)" if w > 1 else "ops per step")
        ax.set_xlabel("decode step")
        ax.set_xlim(lo, hi)
        fig.suptitle(f"Cache ops per step, by op ({_title(result)}; {n} steps"
                     f"{f', bins of {w}' if w > 1 else ''})", fontsize=13)
    ax.legend(title="op", loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _violations_png(result: AnalysisResult, path: Path) -> Path:
    from matplotlib.lines import Line2D

    fig = _figure(11, 5.5)
    ax, ax_kinds = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    marks = result.marks
    total = result.cache.stats.violations_by_kind()
    n_total = sum(total.values())
    fig.suptitle(f"Violations on the step timeline ({_title(result)}; {n_total} in all)",
                 fontsize=13)
    # context: total items held per step
    depth: dict[int, int] = {}
    for pts in result.series.values():
        for step, d, _l, _s in pts:
            depth[step] = depth.get(step, 0) + d
    if depth:
        xs = sorted(depth)
        x, y = _downsample(xs, [depth[s] for s in xs])
        ax.fill_between(x, y, step="mid", color="#dddddd", label="items held (all queues)")
        ax.plot(x, y, color="#999999", lw=1, drawstyle="steps-mid")
    ax.set_ylabel("items held in queues")
    ax.grid(alpha=0.3)
    if not marks:
        ax.text(0.5, 0.5, "no violations", ha="center", va="center", transform=ax.transAxes,
                fontsize=14, color="#2e7d32")
        _empty(ax_kinds, "")
        if depth:
            ax.legend(loc="upper left", fontsize=9)
        return _save(fig, path)
    kinds = [k for k in _KIND_COLORS if any(m[2] == k for m in marks)]
    kinds += sorted({m[2] for m in marks} - set(kinds))
    by_kind: dict[str, set[int]] = {k: set() for k in kinds}
    for step, _seq, kind, _queue in marks:
        by_kind[kind].add(step)
    handles = []
    for kind in kinds:
        color = _KIND_COLORS.get(kind, "#000000")
        steps = sorted(by_kind[kind])
        ax.vlines(steps, 0, 1, transform=ax.get_xaxis_transform(), colors=color, lw=1.6,
                  alpha=0.8)
        handles.append(Line2D([], [], color=color, lw=2, label=f"{kind} ({total.get(kind, 0)})"))
    ax.legend(handles=handles + ([Line2D([], [], color="#bbbbbb", lw=6, label="items held")]
                                 if depth else []),
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, title="violation kind")
    # one row per kind: every step with a violation of that kind
    for row, kind in enumerate(kinds):
        steps = sorted(by_kind[kind])
        ax_kinds.scatter(steps, [row] * len(steps), marker="|", s=200,
                         color=_KIND_COLORS.get(kind, "#000000"), linewidths=2)
    ax_kinds.set_yticks(range(len(kinds)), kinds, fontsize=9)
    ax_kinds.set_ylim(-0.7, len(kinds) - 0.3)
    ax_kinds.invert_yaxis()
    ax_kinds.grid(axis="x", alpha=0.3)
    ax_kinds.set_xlabel("decode step")
    _integer_x(ax_kinds)
    all_steps = [m[0] for m in marks] + list(depth)
    lo, hi = min(all_steps), max(all_steps)
    pad = max(0.5, (hi - lo) * 0.02)
    ax.set_xlim(lo - pad, hi + pad)
    if result.extra.get("marks_dropped"):
        ax_kinds.set_title(f"(only the first {len(marks)} violations are drawn)", fontsize=9,
                           loc="right")
    return _save(fig, path)


def _short(name: Any) -> str:
    text = "<no module>" if name is None else str(name)
    return text if len(text) <= 28 else "..." + text[-25:]


def _grid_png(result: AnalysisResult, path: Path) -> Path:
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    consumers = result.consumers
    cells = result.cells
    cols = len(consumers)
    if not cells or not cols:
        fig = _figure(8, 3)
        ax = fig.subplots()
        _empty(ax, "no pops recorded: nothing to attribute")
        fig.suptitle(f"Who popped whose item ({_title(result)})", fontsize=13)
        return _save(fig, path)
    lo, hi = min(cells), max(cells)
    n = hi - lo + 1
    w = _bin_width(n, _MAX_GRID_ROWS)
    rows = math.ceil(n / w)
    col_of = {c: i for i, c in enumerate(consumers)}
    grid = [[_NONE] * cols for _ in range(rows)]
    notes: dict[tuple[int, int], str] = {}
    for step, row in cells.items():
        r = (step - lo) // w
        for consumer, pops in row.items():
            c = col_of[consumer]
            state = _OK
            for producer, violation in pops:
                if violation in ("pop_empty", "pop_missing"):
                    state = max(state, _MISSING)
                elif violation == "owner_mismatch":
                    state = max(state, _MISMATCH)
                    notes.setdefault((r, c), _short_label(producer, col_of))
            grid[r][c] = max(grid[r][c], state)
    width = min(18.0, max(9.0, 4.5 + 0.45 * cols))
    height = min(13.0, max(4.0, 2.6 + 0.16 * rows))
    fig = _figure(width, height)
    ax = fig.subplots()
    cmap = ListedColormap(_GRID_COLORS)
    norm = BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5], cmap.N)
    ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(cols))
    step_x = max(1, math.ceil(cols / 48))
    ax.set_xticklabels([_short(c) if i % step_x == 0 else "" for i, c in enumerate(consumers)],
                       rotation=60, ha="right", fontsize=8 if cols > 12 else 9)
    tick_every = max(1, math.ceil(rows / 40))
    yticks = list(range(0, rows, tick_every))
    ax.set_yticks(yticks)
    ax.set_yticklabels([f"{lo + r * w}" if w == 1 else f"{lo + r * w}-{min(hi, lo + r * w + w - 1)}"
                        for r in yticks], fontsize=8)
    ax.set_xlabel("consumer (the owner that popped), in first-seen order")
    ax.set_ylabel("decode step" + (f" (bins of {w} steps: worst cell shown)" if w > 1 else ""))
    ax.set_xticks([x - 0.5 for x in range(cols + 1)], minor=True)
    if rows <= 80:
        ax.set_yticks([y - 0.5 for y in range(rows + 1)], minor=True)
    ax.grid(which="minor", color="white", lw=0.8)
    ax.tick_params(which="minor", length=0)
    if rows <= 80 and cols <= 40:
        size = 7 if cols > 16 or rows > 40 else 8
        for (r, c), text in notes.items():
            ax.text(c, r, text, ha="center", va="center", fontsize=size, color="white",
                    fontweight="bold")
    mismatches = sum(v.kind == "owner_mismatch" for v in result.cache.violations)
    fig.suptitle(f"Who popped whose item ({_title(result)}"
                 + (f"; {mismatches} mismatches)" if mismatches else ")"), fontsize=13)
    ax.set_title("red: the item of another owner, labelled with its column [n]"
                 if rows <= 80 and cols <= 40 else "red: the item of another owner",
                 fontsize=9, loc="left")
    handles = [Patch(facecolor=col, edgecolor="#999999", label=label)
               for col, label in zip(_GRID_COLORS, _GRID_LABELS)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    return _save(fig, path)


def _short_label(producer: Any, col_of: dict[Any, int]) -> str:
    """The producer as its column number when it is a consumer too (``[2]``), else its name."""
    if producer in col_of:
        return f"[{col_of[producer]}]"
    return "?" if producer is None else _short(producer)[-10:]


# ------------------------------------------------------------------------------------- ranks
_MAX_RANK_ROWS = 16      # ranks drawn one row each (the rest are left out, and the title says so)
_MAX_STEP_COLS = 200     # steps drawn as columns of the ranks x steps grid before binning
# ranks x steps cell states, in increasing severity (a binned cell shows the worst of its steps)
_R_NONE, _R_OK, _R_LOCAL, _R_DIVERGED, _R_STALLED = 0, 1, 2, 3, 4
_RANK_COLORS = ("#eeeeee", "#66bb6a", "#ffa726", "#e53935", "#8e24aa")
_RANK_LABELS = ("not recorded", "recorded, agrees with its peers", "a violation of the rank's own",
                "rank_divergence (first step found)", "rank_stalled (stopped before this step)")


def _rank_rows(analysis: RankAnalysis) -> tuple[list[Any], str]:
    rows = analysis.ranks[:_MAX_RANK_ROWS]
    left = len(analysis.ranks) - len(rows)
    return rows, (f"; the first {len(rows)} ranks drawn, {left} left out" if left else "")


def _rank_label(f: Any) -> str:
    return f"rank {f.rank}\ntp {f.tp_rank} pp {f.pp_rank}"


def _rank_axes(rows: list[Any], per_row: float) -> tuple[Any, list[Any]]:
    """A figure with one row of axes per rank, sharing the step axis."""
    fig = _figure(11, min(40.0, 1.2 + per_row * len(rows)))
    axes = fig.subplots(len(rows), 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _ranks_queues_png(analysis: RankAnalysis, path: Path) -> Path:
    rows, cut = _rank_rows(analysis)
    fig, axes = _rank_axes(rows, 1.7)
    peaks: dict[str, int] = {}
    for f in rows:
        for family, pts in f.result.series.items():
            peaks[family] = max(peaks.get(family, 0), max((p[1] for p in pts), default=0))
    families = sorted(peaks, key=lambda fam: (-peaks[fam], fam))[:_MAX_FAMILIES]
    color = {fam: _FAMILY_COLORS[i % len(_FAMILY_COLORS)] for i, fam in enumerate(families)}
    top = max(1, max(peaks.values(), default=1))
    for ax, f in zip(axes, rows):
        drawn = False
        for family in families:
            pts = f.result.series.get(family)
            if not pts:
                continue
            x, y = _downsample([p[0] for p in pts], [p[1] for p in pts])
            ax.plot(x, y, color=color[family], lw=1.5, label=family, drawstyle="steps-mid")
            drawn = True
        if not drawn:
            _empty(ax, "no queue ops recorded")
        ax.set_ylim(0, top * 1.1)
        ax.set_ylabel(_rank_label(f), rotation=0, ha="right", va="center", fontsize=9)
        ax.grid(alpha=0.3)
    if families:
        axes[0].legend(title="family", loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    axes[-1].set_xlabel("decode step")
    _integer_x(axes[-1])
    fig.suptitle(f"Items held in queues at the end of each step, per rank (world "
                 f"{analysis.world_size}: tp {analysis.tp} x pp {analysis.pp}{cut})", fontsize=13)
    return _save(fig, path)


def _ranks_ops_png(analysis: RankAnalysis, path: Path) -> Path:
    rows, cut = _rank_rows(analysis)
    fig, axes = _rank_axes(rows, 1.5)
    counts_by_rank = []
    for f in rows:
        counts = {s: dict(c) for s, c in f.result.ops_by_step.items()}
        for index, info in f.result.steps.items():
            if info.get("gets"):
                counts.setdefault(index, {})["get"] = int(info["gets"])
        counts_by_rank.append(counts)
    steps = [s for c in counts_by_rank for s in c]
    ops = [op for op in _OPS if any(op in v for c in counts_by_rank for v in c.values())]
    if not steps:
        for ax in axes:
            _empty(ax, "no ops recorded")
        fig.suptitle(f"Cache ops per step, per rank{cut}", fontsize=13)
        return _save(fig, path)
    lo, hi = min(steps), max(steps)
    w = _bin_width(hi - lo + 1, _MAX_BARS)
    starts = list(range(lo, hi + 1, w))
    top = 1.0
    for ax, f, counts in zip(axes, rows, counts_by_rank):
        bottom = [0.0] * len(starts)
        for op in ops:
            ys = [sum(counts.get(s, {}).get(op, 0) for s in range(s0, min(s0 + w, hi + 1)))
                  / min(w, hi + 1 - s0) for s0 in starts]
            ax.bar(starts, ys, bottom=bottom, width=0.85 * w, align="edge" if w > 1 else "center",
                   color=_OP_COLORS[op], label=op)
            bottom = [b + y for b, y in zip(bottom, ys)]
        top = max(top, max(bottom))
        ax.set_ylabel(_rank_label(f), rotation=0, ha="right", va="center", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes:
        ax.set_ylim(0, top * 1.1)
    axes[0].legend(title="op", loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    axes[-1].set_xlabel("decode step" + (f" (bins of {w}: mean ops per step)" if w > 1 else ""))
    _integer_x(axes[-1])
    fig.suptitle(f"Cache ops per step, by op, per rank{cut}", fontsize=13)
    return _save(fig, path)


def _ranks_steps_png(analysis: RankAnalysis, path: Path) -> Path:
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    rows, cut = _rank_rows(analysis)
    keys = sorted({k for f in analysis.ranks for k in f.result.fingerprints})
    cross = analysis.all_cross_rank
    title = (f"Ranks step by step (world {analysis.world_size}: tp {analysis.tp} x pp "
             f"{analysis.pp}; {len(cross)} cross-rank violation(s){cut})")
    if not keys:
        fig = _figure(9, 3)
        _empty(fig.subplots(), "no steps recorded")
        fig.suptitle(title, fontsize=13)
        return _save(fig, path)
    lo = min(s for _g, s in keys)
    hi = max([s for _g, s in keys] + [v.step for v in cross if isinstance(v.step, int)])
    w = _bin_width(hi - lo + 1, _MAX_STEP_COLS)
    cols = math.ceil((hi - lo + 1) / w)
    row_of = {f.rank: i for i, f in enumerate(rows)}
    grid = [[_R_NONE] * cols for _ in rows]

    def mark(rank: Any, step: Any, state: int) -> None:
        if rank in row_of and isinstance(step, int) and lo <= step <= hi:
            r, c = row_of[rank], (step - lo) // w
            grid[r][c] = max(grid[r][c], state)

    for f in rows:
        for _g, s in f.result.fingerprints:
            mark(f.rank, s, _R_OK)
        for step, _seq, _kind, _queue in f.result.marks:
            mark(f.rank, step, _R_LOCAL)
    for v in cross:
        mark(v.rank, v.step, _R_STALLED if v.kind == "rank_stalled" else _R_DIVERGED)
    fig = _figure(min(18.0, max(9.0, 3.5 + 0.12 * cols)), min(14.0, 2.4 + 0.45 * len(rows)))
    ax = fig.subplots()
    cmap = ListedColormap(_RANK_COLORS)
    norm = BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5, 4.5], cmap.N)
    ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(rows)), [f"rank {f.rank} (tp {f.tp_rank}, pp {f.pp_rank})"
                                     for f in rows], fontsize=9)
    every = max(1, math.ceil(cols / 30))
    ticks = list(range(0, cols, every))
    ax.set_xticks(ticks, [f"{lo + c * w}" if w == 1 else
                          f"{lo + c * w}-{min(hi, lo + c * w + w - 1)}" for c in ticks],
                  fontsize=8, rotation=0 if w == 1 else 60)
    ax.set_xlabel("decode step" + (f" (bins of {w} steps: worst cell shown)" if w > 1 else ""))
    if cols <= 80:
        ax.set_xticks([x - 0.5 for x in range(cols + 1)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(len(rows) + 1)], minor=True)
        ax.grid(which="minor", color="white", lw=1.0)
        ax.tick_params(which="minor", length=0)
    firsts: dict[int, int] = {}
    for g, s in keys:
        firsts[g] = min(firsts.get(g, s), s)
    for s in sorted(firsts.values())[1:]:   # generation boundaries
        ax.axvline((s - lo) / w - 0.5, color="#333333", lw=1.5, ls="--")
    if cols <= 80 and len(rows) <= 40:
        for v in cross:
            if v.rank in row_of and isinstance(v.step, int) and lo <= v.step <= hi:
                letter = "S" if v.kind == "rank_stalled" else "D"
                ax.text((v.step - lo) // w, row_of[v.rank], letter, ha="center", va="center",
                        fontsize=9, color="white", fontweight="bold")
    handles = [Patch(facecolor=c, edgecolor="#999999", label=label)
               for c, label in zip(_RANK_COLORS, _RANK_LABELS)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    ax.set_title("D: rank_divergence, S: rank_stalled; dashed line: a new generation",
                 fontsize=9, loc="left")
    fig.suptitle(title, fontsize=13)
    return _save(fig, path)


def _rank_index(analysis: RankAnalysis, pngs: Sequence[Path], path: Path) -> Path:
    """The self-contained page of a multi-rank report: table, pictures, reports."""
    import base64
    import html

    def e(x: Any) -> str:
        return html.escape("" if x is None else str(x), quote=True)

    n = len(analysis.violations)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>cachescope report: {len(analysis.ranks)} ranks</title>",
             "<style>body{font-family:sans-serif;margin:2em auto;max-width:1200px;padding:0 1em}"
             "table{border-collapse:collapse}th,td{border:1px solid #ddd;padding:.25em .6em;"
             "text-align:left}pre{background:#f8f8f8;border:1px solid #e5e5e5;padding:.8em;"
             "overflow-x:auto;font-size:12px}img{max-width:100%}.note{background:#fff8e1;"
             "padding:.5em}.bad{color:#c62828;font-weight:bold}.ok{color:#2e7d32;"
             "font-weight:bold}</style></head><body>",
             f"<h1>{e(analysis.title())}</h1>",
             f'<p class="bad">{n} violation(s)</p>' if n else '<p class="ok">No violations.</p>']
    parts += [f'<p class="note">{e(note)}</p>' for note in analysis.notes]
    parts.append("<h2>Ranks</h2><table><tr>" + "".join(
        f"<th>{h}</th>" for h in ("rank", "tp_rank", "pp_rank", "steps", "tokens", "ops",
                                  "violations", "recording")) + "</tr>")
    for f in analysis.ranks:
        kinds = ", ".join(f"{k}={c}" for k, c in sorted(analysis.by_kind(f.rank).items()))
        parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in (
            f.rank, f.tp_rank, f.pp_rank, f.steps, f.tokens, f.ops, kinds or "none",
            f.path)) + "</tr>")
    parts.append("</table><h2>Pictures</h2>")
    for p in pngs:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        parts.append(f'<figure><img alt="{e(p.name)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{e(p.name)}</figcaption></figure>")
    parts.append(f"<h2>{e(analysis.cross_rank_header())}</h2>")
    parts += [f"<pre>{e(v.report())}</pre>" for v in analysis.all_cross_rank]
    for f in analysis.ranks:
        parts.append(f"<h2>Rank {f.rank}: {len(f.violations)} violation(s) of its own</h2>")
        parts += [f'<p class="note">{e(note)}</p>' for note in f.result.notes]
        parts += [f"<pre>{e(v.report())}</pre>" for v in f.violations[:_MAX_RANK_REPORTS]]
        if len(f.violations) > _MAX_RANK_REPORTS:
            parts.append(f"<p>{len(f.violations) - _MAX_RANK_REPORTS} more: run <code>cachescope "
                         f"analyze {e(f.path)}</code>.</p>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


_MAX_RANK_REPORTS = 50   # a rank's own reports written in full on the page


# ------------------------------------------------------------------------------------- API
def draw(result: AnalysisResult, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write the PNGs and index.html for an ``AnalysisResult`` into ``out_dir``."""
    from . import _html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = [_queues_png(result, out / PNG_NAMES[0]), _ops_png(result, out / PNG_NAMES[1]),
            _violations_png(result, out / PNG_NAMES[2]), _grid_png(result, out / PNG_NAMES[3])]
    return pngs + [_html.write_index(result, pngs, out / "index.html")]


def draw_ranks(analysis: RankAnalysis, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write the side-by-side rank PNGs and index.html for a ``RankAnalysis`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = [_ranks_queues_png(analysis, out / RANK_PNG_NAMES[0]),
            _ranks_ops_png(analysis, out / RANK_PNG_NAMES[1]),
            _ranks_steps_png(analysis, out / RANK_PNG_NAMES[2])]
    return pngs + [_rank_index(analysis, pngs, out / "index.html")]


def write_rank_report(log_paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
                      *, progress: bool = False) -> list[Path]:
    """Replay and compare the per-rank recordings of one run (``replay_ranks``) and write
    ``ranks_queues.png``, ``ranks_ops.png``, ``ranks_steps.png`` and ``index.html`` into
    ``out_dir``. Raises ``RankSetError`` when the files are not the ranks of one run,
    ``RecordFormatError`` for an unreadable file, ``ImportError`` without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:  # pragma: no cover - matplotlib is in the cli extra
        raise ImportError("cachescope report needs matplotlib: pip install 'cachescope[cli]'") from exc
    return draw_ranks(replay_ranks(log_paths, progress=progress), out_dir)


def write_report(log_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                 progress: bool = False) -> list[Path]:
    """Replay the record at ``log_path`` and write ``queues.png``, ``ops.png``,
    ``violations.png``, ``owners.png`` and a self-contained ``index.html`` into ``out_dir``
    (created if needed). Returns the paths written. Raises ``RecordFormatError`` for a file that
    is not a readable record, ``ImportError`` when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:  # pragma: no cover - matplotlib is in the cli extra
        raise ImportError("cachescope report needs matplotlib: pip install 'cachescope[cli]'") from exc
    return draw(replay(log_path, progress=progress), out_dir)


def _default_out(path: str, ranks: bool = False) -> Path:
    p = Path(path)
    name = p.name
    for suffix in (".gz", ".jsonl", ".json", ".log"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if ranks:   # run.rank0.jsonl.gz -> run-report
        head, dot, tail = name.rpartition(".rank")
        if dot and tail.isdigit():
            name = head
    return p.with_name(f"{name or 'cachescope'}-report")


def main_report(args: Any) -> int:
    """``cachescope report`` entry point. ``args`` (an argparse Namespace) fields:

    - ``file``: path of the record (``.jsonl`` or ``.jsonl.gz``), or a list of paths: several
      are the per-rank recordings of one run, drawn side by side (``write_rank_report``).
    - ``out``: output directory (created); None for ``<file name>-report`` next to the file
      (for rank files ``run.rank0.jsonl.gz``: ``run-report``).
    - ``progress``: show a percentage on stderr while reading.
    - ``quiet``: do not list the files written.

    Returns 0 when the report was written, 2 when the record could not be read or the report
    could not be written (the reason goes to stderr).
    """
    path = getattr(args, "file", None)
    paths = [p for p in path] if isinstance(path, (list, tuple)) else ([path] if path else [])
    if not paths:
        sys.stderr.write("cachescope report: no record file given\n")
        return 2
    several = len(paths) > 1
    out = getattr(args, "out", None) or _default_out(str(paths[0]), ranks=several)
    progress = bool(getattr(args, "progress", False))
    try:
        if several:
            written = write_rank_report(paths, out, progress=progress)
        else:
            written = write_report(paths[0], out, progress=progress)
    except (RecordFormatError, RankSetError) as exc:
        sys.stderr.write(f"cachescope report: {exc}\n")
        return 2
    except ImportError as exc:
        sys.stderr.write(f"cachescope report: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"cachescope report: {exc}\n")
        return 2
    if not getattr(args, "quiet", False):
        for p in written:
            sys.stdout.write(f"{p}\n")
    return 0
