"""The self-contained ``index.html`` of ``cachescope report``: PNGs inlined, text escaped."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ._values import format_bytes

if TYPE_CHECKING:
    from .analyze import AnalysisResult

__all__ = ["write_index", "render_index"]

_MAX_REPORTS = 200   # violation reports written in full; the rest are listed in the summary

_CAPTIONS = {
    "queues.png": "Queue depth and bytes held per family at the end of each step.",
    "ops.png": "Cache ops per step, stacked by op.",
    "violations.png": "Violations on the step timeline, colored by kind.",
    "owners.png": "Who popped whose item: one row per step, one column per consumer.",
}

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.sub { padding-left: 1.8em; color: #444; }
pre { background: #f8f8f8; border: 1px solid #e5e5e5; padding: .8em; overflow-x: auto;
      font-size: 12px; line-height: 1.35; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
.ok { color: #2e7d32; font-weight: bold; } .bad { color: #c62828; font-weight: bold; }
.note { background: #fff8e1; border: 1px solid #ffe082; padding: .5em .8em; }
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _row(*cells: Any, head: bool = False, num: Sequence[int] = ()) -> str:
    """A table row; a first cell starting with two spaces is drawn indented (a sub-item)."""
    tag = "th" if head else "td"
    out = []
    for i, c in enumerate(cells):
        classes = ["num"] if i in num else []
        if i == 0 and isinstance(c, str) and c.startswith("  "):
            classes.append("sub")
            c = c.strip()
        attr = f' class="{" ".join(classes)}"' if classes else ""
        out.append(f"<{tag}{attr}>{_e(c)}</{tag}>")
    return "<tr>" + "".join(out) + "</tr>"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = _CAPTIONS.get(path.name, path.name)
    return (f'<figure><img alt="{_e(path.name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def render_index(result: "AnalysisResult", pngs: Sequence[Path]) -> str:
    """The HTML page as a string."""
    h = result.header
    cache = result.cache
    stats = cache.stats
    violations = cache.violations
    by_kind = stats.violations_by_kind()
    n_violations = sum(by_kind.values())
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>cachescope report: cache {_e(h.get('cache'))}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>cachescope report: cache {_e(repr(h.get('cache')))}</h1>"]
    verdict = (f'<p class="bad">{n_violations} violation(s): '
               + _e(", ".join(f"{k}={n}" for k, n in sorted(by_kind.items()))) + "</p>"
               if n_violations else '<p class="ok">No violations.</p>')
    parts.append(verdict)
    for note in result.notes:
        parts.append(f'<p class="note">{_e(note)}</p>')

    parts.append("<h2>Run</h2><table>")
    run = h.get("run") or {}
    host = h.get("host") or {}
    meta = [("record", str(result.path)), ("recorded", h.get("created")),
            ("cachescope", h.get("cachescope_version")), ("format", f"{h.get('format')} v{h.get('version')}"),
            ("host", ", ".join(f"{k}={v}" for k, v in host.items()) if isinstance(host, dict) else host)]
    meta += [(f"run: {k}", v if isinstance(v, str) else json.dumps(v, default=repr))
             for k, v in (run.items() if isinstance(run, dict) else [("info", run)])]
    parts += [_row(k, v) for k, v in meta]
    parts.append("</table>")

    parts.append("<h2>Summary</h2><table>")
    ops = stats.ops_by_op()
    durations = [s["duration"] for s in result.steps.values() if isinstance(s.get("duration"), (int, float))]
    summary = [("steps", stats.steps), ("tokens", stats.tokens), ("generations", result.generations),
               ("ops recorded", result.ops), ("ops counted (with get)", stats.total_ops())]
    summary += [(f"  {op}", n) for op, n in ops.items() if n]
    if durations:
        durations.sort()
        summary.append(("step duration (median / max)",
                        f"{durations[len(durations) // 2] * 1e3:.2f} ms / {durations[-1] * 1e3:.2f} ms"))
    summary.append(("violations", n_violations))
    summary += [(f"  {k}", n) for k, n in sorted(by_kind.items())]
    parts += [_row(k, v, num=(1,)) for k, v in summary]
    parts.append("</table>")

    fams = [(name, fs) for name, fs in sorted(stats.families.items()) if fs.push or fs.pop]
    if fams:
        parts.append("<table>")
        parts.append(_row("family", "push", "pop", "peak depth", "depth at end", "peak logical",
                          "peak storage", "held at end (logical / storage)", "violations", head=True))
        for name, fs in fams:
            parts.append(_row(name, fs.push, fs.pop, fs.peak_depth, fs.depth,
                              format_bytes(fs.peak_logical), format_bytes(fs.peak_storage),
                              f"{format_bytes(fs.logical)} / {format_bytes(fs.storage)}",
                              sum(fs.violations.values()), num=(1, 2, 3, 4, 5, 6, 8)))
        parts.append("</table>")

    parts.append("<h2>Pictures</h2>")
    parts += [_img(p) for p in pngs]

    parts.append(f"<h2>Violations ({n_violations})</h2>")
    if not violations:
        parts.append('<p class="ok">None.</p>')
    for v in violations[:_MAX_REPORTS]:
        parts.append(f"<pre>{_e(v.report())}</pre>")
    if len(violations) > _MAX_REPORTS:
        parts.append(f"<p>{len(violations) - _MAX_REPORTS} more reports not shown here: run "
                     "<code>cachescope analyze</code> on the record for all of them.</p>")

    parts.append("<h2>Who popped whose item</h2>")
    parts.append(f"<pre>{_e(result.owner_table())}</pre>")
    parts.append("<h2>Run summary (as the live run printed it)</h2>")
    parts.append(f"<pre>{_e(result.summary())}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_index(result: "AnalysisResult", pngs: Sequence[Path], path: Path) -> Path:
    path.write_text(render_index(result, pngs), encoding="utf-8")
    return path
