"""Tests for cachescope.analyze: replaying a recording reproduces the live run's reports."""

from __future__ import annotations

import argparse
import gzip
import io
import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from cachescope import InstrumentedCache, watch
from cachescope.analyze import RecordFormatError, analyze_file, main_analyze, read_record
from cachescope.neox import NeoXConfig, NeoXModel
from cachescope.record import record

from _helpers import make_cache

MODEL = NeoXModel(NeoXConfig(num_layers=4))
LAYERS = list(MODEL.layers)

Fault = Callable[[InstrumentedCache, int, Any, list], tuple[Any, list]]


def decode(cache: InstrumentedCache, steps: int = 6, fault: Fault | None = None) -> None:
    """A labml-style decode loop over the reference NeoX; ``fault`` may change state or layers."""
    tokens = [5, 6, 7]
    try:
        with torch.no_grad(), MODEL.using_cache(cache), cache.generation(prompt_tokens=3):
            cache.set("use_cache", True)
            for i in range(steps):
                state, layers = (None, 0) if i == 0 else (i - 1, i), LAYERS
                if fault is not None:
                    state, layers = fault(cache, i, state, layers)
                MODEL.layers = nn.ModuleList(layers)
                cache.set("state_ids", state)
                x = torch.tensor([tokens if i == 0 else tokens[-1:]])
                tokens.append(int(MODEL(x)[0, -1].argmax()))
                cache.end_step(tokens=1)
    finally:
        MODEL.layers = nn.ModuleList(LAYERS)


def swap(c, i, s, layers):
    return s, ([layers[0], layers[2], layers[1], layers[3]] if i == 3 else layers)


def skip_last(c, i, s, layers):
    return s, (layers[:3] if i == 5 else layers)


def repeat(c, i, s, layers):
    return s, ([layers[0], layers[1], layers[1], layers[2], layers[3]] if i == 3 else layers)


def wrong_state(c, i, s, layers):
    return ((7, 8) if i == 3 else s), layers


def clear_mid_run(c, i, s, layers):
    if i == 3:
        c.clear("attn_kv_2")
    return s, layers


def clear_all(c, i, s, layers):
    if i == 3:
        c.clear_all()
        c.set("use_cache", True)
    return s, layers


def not_advanced(c, i, s, layers):
    return ((1, 2) if i == 3 else s), layers


def bad_state(c, i, s, layers):
    if i == 3:
        c.set("state_ids", 5)
    return s, layers


def retry(c, i, s, layers):
    if i == 3:   # a first attempt dies after two layers, then the step is retried
        c.set("state_ids", s)
        MODEL.layers = nn.ModuleList(layers[:2])
        MODEL(torch.tensor([[1]]))
    return s, layers


def marked(c, i, s, layers):
    if i == 2:   # an explicit boundary that repeats the completed step's (prev, next)
        c.mark_step(0, 1)
    return s, layers


FAULTS = {
    "swap": (swap, {"owner_mismatch"}),
    "skip_last": (skip_last, {"leftover"}),
    "repeat": (repeat, {"owner_mismatch", "pop_empty"}),
    "wrong_state": (wrong_state, {"pop_missing"}),
    "clear": (clear_mid_run, {"pop_missing"}),
    "clear_all": (clear_all, {"pop_missing"}),
    "not_advanced": (not_advanced, {"state_not_advanced", "pop_empty"}),
    "bad_state": (bad_state, {"bad_state_ids"}),
    "retry": (retry, {"step_restarted", "owner_mismatch", "pop_empty"}),
    "mark_step": (marked, {"state_not_advanced"}),
}


def run_recorded(path: Path, fault: Fault | None, watched: bool = True, **options: Any) -> InstrumentedCache:
    cache = make_cache(name="live", **options)
    handle = watch(MODEL, cache) if watched else None
    try:
        with record(cache, path, model="tiny"):
            try:
                decode(cache, fault=fault)
            except (IndexError, KeyError):
                pass   # pop_empty / pop_missing: the loop dies, as it would without cachescope
    finally:
        if handle is not None:
            handle.remove()
    return cache


@pytest.mark.parametrize("watched", [True, False], ids=["watch", "stack"])
@pytest.mark.parametrize("name", sorted(FAULTS))
def test_replay_reports_equal_live_reports(tmp_path, name, watched):
    """Replaying the recording gives the live violation reports (op numbers included) and summary."""
    fault, kinds = FAULTS[name]
    path = tmp_path / f"{name}.jsonl{'.gz' if watched else ''}"
    live = run_recorded(path, fault, watched)
    assert {v.kind for v in live.violations} == kinds
    result = analyze_file(path, out=None)
    assert result.notes == []
    assert result.reports() == [v.report() for v in live.violations]
    assert result.summary() == live.report()
    assert result.logged_violations == len(live.violations)


def test_replay_keeps_non_default_cache_options(tmp_path):
    """timeline_size, max_violations and state_key come from the header, so reports still match."""
    cache = make_cache(name="opts", timeline_size=5, max_violations=2, state_key="ids")
    path = tmp_path / "opts.jsonl"
    with record(cache, path):
        cache.set("ids", (None, 0))
        for owner in "abc":
            with cache.owner(owner):
                cache.push("kv_0", torch.zeros(3))
        cache.set("ids", (0, 1))
        for owner in "bca":
            with cache.owner(owner):
                cache.pop("kv_0")
    assert len(cache.violations) == 2 and cache.stats.violations_dropped == 1
    result = analyze_file(path, out=None)
    assert result.reports() == [v.report() for v in cache.violations]
    assert result.summary() == cache.report()


def test_owner_table_marks_the_mismatches(tmp_path):
    """The printed per-step table shows '=' for own items and marks who got whose item."""
    path = tmp_path / "swap.jsonl"
    run_recorded(path, swap)
    out = io.StringIO()
    analyze_file(path, out=out)
    text = out.getvalue()
    assert "[1] layers.1.attention" in text
    table = text[text.index("Who popped whose item"):].splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in table if line[:1].isdigit()}
    assert rows["1-2"] == ["=", "=", "=", "="]
    assert rows["3-4"] == ["=", "*[2]", "*[1]", "="]
    assert rows["5"] == ["=", "=", "=", "="]


def test_clean_run_prints_no_violations(tmp_path):
    """Analyzing a clean run prints the summary with 'violations: none' and no report."""
    path = tmp_path / "clean.jsonl"
    live = run_recorded(path, None)
    out = io.StringIO()
    result = analyze_file(path, out=out)
    text = out.getvalue()
    assert not result.violations and not live.violations
    assert "violations: none" in text and "=" * 78 not in text
    assert main_analyze(argparse.Namespace(file=str(path), out=None, progress=False, quiet=True)) == 0


def test_main_analyze_exit_codes_and_output_file(tmp_path, capsys):
    """main_analyze returns 1 for a run with violations (report written to --out), 2 for a bad file."""
    path = tmp_path / "swap.jsonl.gz"
    run_recorded(path, swap)
    dest = tmp_path / "report.txt"
    assert main_analyze(argparse.Namespace(file=str(path), out=str(dest), progress=False,
                                           quiet=False)) == 1
    assert "owner_mismatch" in dest.read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main_analyze(argparse.Namespace(file=str(bad), out=None, progress=False, quiet=False)) == 2
    assert "not a cachescope record" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "message"), [
    (b"", "empty file"),
    (b"hello world\n", "first line is not JSON"),
    (b'{"type": "op", "seq": 1}\n', "not a 'cachescope-record' header"),
    (b'[1, 2]\n', "not a 'cachescope-record' header"),
    (b'{"type": "header", "format": "cachescope-record", "version": 99}\n', "newer cachescope"),
    (b'{"type": "header", "format": "cachescope-record", "version": "1"}\n', "invalid"),
    (gzip.compress(b"plain text, gzipped\n"), "first line is not JSON"),
    (b"\x1f\x8b garbage that is not gzip", "cannot decompress"),
])
def test_wrong_file_gives_a_clear_error(tmp_path, content, message):
    """A file that is not a readable record raises RecordFormatError naming the problem."""
    path = tmp_path / "wrong.jsonl"
    path.write_bytes(content)
    with pytest.raises(RecordFormatError, match=message):
        analyze_file(path, out=None)


def test_truncated_last_line_is_skipped_with_a_note(tmp_path):
    """A run killed mid-write leaves half a line: it is skipped and the rest is analyzed."""
    path = tmp_path / "cut.jsonl"
    live = run_recorded(path, swap)
    with open(path, "a") as f:
        f.write('{"type":"op","seq":99,"ti')
    result = analyze_file(path, out=None)
    assert any("not a JSON object" in n for n in result.notes)
    assert result.reports() == [v.report() for v in live.violations]


def test_gap_in_the_log_is_reported(tmp_path):
    """Lines removed from a recording are detected: the replay says it diverged."""
    path = tmp_path / "gap.jsonl"
    run_recorded(path, None)
    lines = path.read_text().splitlines()
    drop = next(i for i, line in enumerate(lines) if '"op":"pop"' in line)
    path.write_text("\n".join(lines[:drop] + lines[drop + 1:]) + "\n")
    result = analyze_file(path, out=None)
    assert any("diverged" in n for n in result.notes)


def synthetic_run(path: Path, steps: int, layers: int = 24, fault_step: int | None = None) -> InstrumentedCache:
    """Drive a cache with explicitly named owners (fast), recording every op."""
    cache = make_cache(name="big", attribution="off")
    kv = (torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))
    owners = [f"layers.{i}.attention" for i in range(layers)]
    with record(cache, path, synthetic=True):
        with cache.generation():
            cache.set("use_cache", True)
            for s in range(steps):
                cache.set("state_ids", (None, 0) if s == 0 else (s - 1, s))
                order = owners
                if s == fault_step:
                    order = owners[:]
                    order[3], order[4] = order[4], order[3]
                for owner in order:
                    with cache.owner(owner):
                        if s:
                            cache.pop(f"attn_kv_{s - 1}")
                        cache.push(f"attn_kv_{s}", kv)
                cache.end_step(1)
    return cache


def test_100k_op_log_streams_with_progress(tmp_path, capsys):
    """A 100k-op recording is analyzed line by line, with a percentage on stderr, and matches live."""
    path = tmp_path / "big.jsonl.gz"
    live = synthetic_run(path, steps=2100, fault_step=1000)
    result = analyze_file(path, out=None, progress=True)
    assert result.ops >= 100_000
    assert "100%" in capsys.readouterr().err
    assert result.reports() == [v.report() for v in live.violations]
    assert result.summary() == live.report()
    assert len(result.steps) == 2100 and sorted(result.cells)[-1] == 2099


def test_read_record_is_lazy(tmp_path):
    """read_record validates the header and then yields lines one at a time."""
    path = tmp_path / "r.jsonl"
    live = run_recorded(path, None)
    header, lines = read_record(path)
    assert header["cache"] == "live"
    n, first = next(lines)
    assert n == 2 and first["type"] == "generation_start"
    rest = list(lines)
    assert sum(d["type"] == "op" for _, d in rest) == live.seq - 1   # minus the '<end>' record
    assert all(json.dumps(d) for _, d in rest)


def test_replay_with_default_exporters_attached(tmp_path):
    """With the metrics and tracing sinks attached (default construction) the replay still matches."""
    pytest.importorskip("cachescope.metrics")
    pytest.importorskip("cachescope.tracing")
    cache = InstrumentedCache(name="record-default-exporters")
    path = tmp_path / "default.jsonl"
    with watch(MODEL, cache), record(cache, path):
        decode(cache, fault=swap)
    result = analyze_file(path, out=None)
    assert result.notes == [] and cache.violations
    assert result.reports() == [v.report() for v in cache.violations]
    assert result.summary() == cache.report()
