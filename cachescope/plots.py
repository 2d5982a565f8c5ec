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
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from ._values import format_bytes
from .analyze import AnalysisResult, RecordFormatError, replay

__all__ = ["write_report", "main_report", "draw", "PNG_NAMES"]

PNG_NAMES = ("queues.png", "ops.png", "violations.png", "owners.png")

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


# ------------------------------------------------------------------------------------- API
def draw(result: AnalysisResult, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write the PNGs and index.html for an ``AnalysisResult`` into ``out_dir``."""
    from . import _html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = [_queues_png(result, out / PNG_NAMES[0]), _ops_png(result, out / PNG_NAMES[1]),
            _violations_png(result, out / PNG_NAMES[2]), _grid_png(result, out / PNG_NAMES[3])]
    return pngs + [_html.write_index(result, pngs, out / "index.html")]


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


def _default_out(path: str) -> Path:
    p = Path(path)
    name = p.name
    for suffix in (".gz", ".jsonl", ".json", ".log"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return p.with_name(f"{name or 'cachescope'}-report")


def main_report(args: Any) -> int:
    """``cachescope report`` entry point. ``args`` (an argparse Namespace) fields:

    - ``file``: path of the record (``.jsonl`` or ``.jsonl.gz``).
    - ``out``: output directory (created); None for ``<file name>-report`` next to the file.
    - ``progress``: show a percentage on stderr while reading.
    - ``quiet``: do not list the files written.

    Returns 0 when the report was written, 2 when the record could not be read or the report
    could not be written (the reason goes to stderr).
    """
    path = getattr(args, "file", None)
    if not path:
        sys.stderr.write("cachescope report: no record file given\n")
        return 2
    out = getattr(args, "out", None) or _default_out(str(path))
    try:
        written = write_report(path, out, progress=bool(getattr(args, "progress", False)))
    except RecordFormatError as exc:
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
