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

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Attention(nn.Module):
    """A labml-style layer over a plain ModuleList loop: pop ``kv_{prev}``, push ``kv_{next}``."""

    def __init__(self, cache: InstrumentedCache) -> None:
        super().__init__()
        self.cache = cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prev, nxt = self.cache.get("state_ids")
        k = v = x.new_zeros(1, 2, x.shape[1], 4)
        if prev is not None:
            k_past, v_past = self.cache.pop(f"kv_{prev}")
            k, v = torch.cat([k_past, k], 2), torch.cat([v_past, v], 2)
        self.cache.push(f"kv_{nxt}", (k, v))
        return x


def recorded_run(path: Path, steps: int = 8, swap_at: int | None = 4, name: str = "plots") -> InstrumentedCache:
    """Decode ``steps`` steps of a 4-layer loop; layers 1 and 2 swap places at ``swap_at``."""
    cache = InstrumentedCache(metrics=False, tracing=False, name=name)
    layers = nn.ModuleList([Attention(cache) for _ in range(4)])
    with watch(layers, cache, prefix="layers."), record(cache, path):
        with cache.generation():
            for i in range(steps):
                cache.set("state_ids", (None, 0) if i == 0 else (i - 1, i))
                order = list(layers)
                if i == swap_at:
                    order[1], order[2] = order[2], order[1]
                x = torch.zeros(1, 5 if i == 0 else 1, 4)
                for layer in order:
                    x = layer(x)
                cache.end_step(tokens=1)
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
