"""Tests for cachescope.plots: report pictures and the self-contained HTML page."""

from __future__ import annotations

import argparse
import html
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")

from cachescope import InstrumentedCache, watch  # noqa: E402
from cachescope._values import measure  # noqa: E402
from cachescope.plots import PNG_NAMES, main_report, write_report  # noqa: E402
from cachescope.record import record  # noqa: E402

from _kvloop import KVLayer, decode, filled_kv, zeros_input  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def recorded_run(path: Path, steps: int = 8, swap_at: int | None = 4, name: str = "plots") -> InstrumentedCache:
    """Decode ``steps`` steps of a 4-layer loop; layers 1 and 2 swap places at ``swap_at``."""
    cache = InstrumentedCache(metrics=False, tracing=False, name=name)
    layers = nn.ModuleList([KVLayer(cache, prefix="kv_", kv=filled_kv(0.0), cat=2) for _ in range(4)])
    with watch(layers, cache, prefix="layers."), record(cache, path):
        with cache.generation():
            decode(layers, cache, steps - 1, inputs=zeros_input(5),
                   order=lambda i: [0, 2, 1, 3] if i == swap_at else [0, 1, 2, 3])
    return cache


def test_report_writes_pngs_and_html_with_the_violations(tmp_path):
    """write_report writes the four PNGs and an index.html that embeds them and the reports."""
    path = tmp_path / "run.jsonl.gz"
    live = recorded_run(path)
    assert live.violations
    out = tmp_path / "report"
    written = write_report(path, out)
    assert [p.name for p in written] == [*PNG_NAMES, "index.html"]
    for p in written[:-1]:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "<img" in page and 'src="queues.png"' not in page   # self-contained
    for v in live.violations:
        assert html.escape(v.report()) in page
    assert "owner_mismatch" in page and "Who popped whose item" in page


def test_report_of_a_clean_run(tmp_path):
    """A run without violations still gets every picture and says so on the page."""
    path = tmp_path / "clean.jsonl"
    recorded_run(path, swap_at=None)
    written = write_report(path, tmp_path / "r")
    assert len(written) == 5
    assert "No violations." in (tmp_path / "r" / "index.html").read_text()


def test_long_run_is_binned(tmp_path):
    """A run of 1500 steps is drawn aggregated (bins) and the page stays small."""
    cache = InstrumentedCache(metrics=False, tracing=False, name="long", attribution="off")
    kv = (torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    path = tmp_path / "long.jsonl.gz"
    with record(cache, path):
        for s in range(1500):
            cache.mark_step(None if s == 0 else s - 1, s)
            owners = ["a", "b", "c"] if s != 700 else ["b", "a", "c"]
            for owner in owners:
                with cache.owner(owner):
                    if s:
                        cache.pop(f"kv_{s - 1}")
                    cache.push(f"kv_{s}", kv)
            cache.end_step(1)
    written = write_report(path, tmp_path / "long")
    page = written[-1]
    assert page.stat().st_size < 2_000_000
    assert "owner_mismatch" in page.read_text()


def test_main_report_entry_point(tmp_path, capsys):
    """main_report writes next to the file by default, lists the files, and returns 2 for a bad file."""
    path = tmp_path / "run.jsonl"
    recorded_run(path)
    assert main_report(argparse.Namespace(file=str(path), out=None, progress=False, quiet=False)) == 0
    listed = capsys.readouterr().out.split()
    assert listed and all(Path(p).parent == tmp_path / "run-report" for p in listed)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    assert main_report(argparse.Namespace(file=str(bad), out=str(tmp_path / "x"), progress=False,
                                          quiet=True)) == 2
    assert "not a cachescope record" in capsys.readouterr().err


def test_matplotlib_is_not_imported_or_switched_globally(tmp_path):
    """Importing cachescope (and its report modules) loads no matplotlib; drawing keeps the backend."""
    code = ("import sys, cachescope, cachescope.record, cachescope.analyze, cachescope.plots; "
            "print('matplotlib' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    import matplotlib
    before = matplotlib.get_backend()
    path = tmp_path / "run.jsonl"
    recorded_run(path)
    write_report(path, tmp_path / "r")
    assert matplotlib.get_backend() == before
