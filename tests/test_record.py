"""Tests for cachescope.record: the JSON-lines recorder sink."""

from __future__ import annotations

import gzip
import io
import json
import logging
import tracemalloc
from typing import Any

import pytest
import torch
from torch import nn

from cachescope import InstrumentedCache, OpRecord, watch
from cachescope._values import measure
from cachescope.record import FORMAT, VERSION, Recorder, encode_value, record, record_to

from _helpers import make_cache
from _kvloop import KVLayer, filled_kv, zeros_input, decode as kv_decode

SENTINEL = 12345.678   # a tensor value that must never reach the file


def sentinel_layers(cache: InstrumentedCache, n: int) -> nn.ModuleList:
    """``n`` labml-style layers pushing ``(k, v)`` pairs filled with ``SENTINEL`` (growing along dim 2)."""
    return nn.ModuleList([KVLayer(cache, kv=filled_kv(SENTINEL), cat=2) for _ in range(n)])


def decode(cache: InstrumentedCache, layers: nn.ModuleList, steps: int) -> None:
    """Run ``steps`` decode steps of ``layers`` the labml way, inside ``cache.generation()``."""
    with cache.generation(prompt_tokens=3):
        kv_decode(layers, cache, steps - 1, inputs=zeros_input(3))


def read_lines(path: Any) -> list[dict[str, Any]]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def walk(x: Any):
    if isinstance(x, dict):
        for v in x.values():
            yield from walk(v)
    elif isinstance(x, list):
        for v in x:
            yield from walk(v)
    else:
        yield x


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_header_then_one_valid_line_per_event(tmp_path, suffix):
    """The file starts with a versioned header, then op/step/generation lines with every field."""
    cache = make_cache(name="rec")
    layers = sentinel_layers(cache, 3)
    handle = watch(layers, cache, prefix="model.")
    path = tmp_path / f"run{suffix}"
    with record(cache, path, model="toy", prompt_len=3) as rec:
        decode(cache, layers, 4)
    handle.remove()
    assert cache not in () and rec not in cache.sinks and rec.closed
    lines = read_lines(path)
    header = lines[0]
    assert header["type"] == "header" and header["format"] == FORMAT and header["version"] == VERSION
    assert header["cache"] == "rec" and header["run"] == {"model": "toy", "prompt_len": 3}
    for key in ("created", "host", "cachescope_version", "state_key", "timeline_size", "start_seq"):
        assert key in header
    types = [d["type"] for d in lines[1:]]
    assert types[0] == "generation_start" and "generation_end" in types
    ops = [d for d in lines if d["type"] == "op"]
    assert [d["seq"] for d in ops] == list(range(1, len(ops) + 1))
    assert sum(d["op"] == "push" for d in ops) == 12 and sum(d["op"] == "pop" for d in ops) == 9
    for d in ops:
        assert set(d) >= {"seq", "time", "step", "op", "queue", "family", "owner", "site", "depth",
                          "logical_bytes", "storage_bytes", "value", "violation", "producer"}
    push = next(d for d in ops if d["op"] == "push")
    assert push["owner"] == "model.0" and push["family"] == "attn_kv"
    assert push["value"]["kind"] == "tuple[2]" and push["value"]["truncated"] is False
    assert push["value"]["tensors"][0] == {"shape": [1, 2, 3, 4], "dtype": "float32", "device": "cpu"}
    assert push["logical_bytes"] == 2 * 96 and push["storages"]
    sets = [d for d in ops if d["op"] == "set"]
    assert [d["state"] for d in sets] == [{"tuple": [None, 0]}, {"tuple": [0, 1]},
                                          {"tuple": [1, 2]}, {"tuple": [2, 3]}]
    steps = [d for d in lines if d["type"] == "step"]
    assert [s["index"] for s in steps] == [0, 1, 2, 3]
    assert all(s["tokens"] == 1 and s["duration"] >= 0 and s["closed"] == "end_step" for s in steps)
    assert lines[-1]["type"] == "stats"
    assert SENTINEL not in set(walk(lines)), "tensor contents were written"


def test_violations_and_mark_step_are_logged(tmp_path):
    """Violation lines carry Violation.to_dict(); mark_step() boundaries get a 'mark' line."""
    cache = make_cache()
    path = tmp_path / "v.jsonl"
    with record(cache, path):
        cache.mark_step(None, 0)
        with cache.owner("a"):
            cache.push("q_0", 1)
        with cache.owner("b"):
            cache.push("q_0", 2)
        cache.mark_step(0, 1)
        with cache.owner("b"):
            cache.pop("q_0")
    lines = read_lines(path)
    marks = [d for d in lines if d["type"] == "mark"]
    assert [(m["prev"], m["next"], m["seq"]) for m in marks] == [(None, 0, 1), (0, 1, 4)]
    (v,) = [d for d in lines if d["type"] == "violation"]
    assert v == {"type": "violation", **cache.violations[0].to_dict()}
    assert v["kind"] == "owner_mismatch" and v["consumer"] == "b" and v["producer"] == "a"


def test_recorder_memory_is_bounded(tmp_path):
    """Lines are flushed every buffer_ops; per-recorder memos stay bounded over 20k distinct ops."""
    writes: list[int] = []

    class Sink(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b: Any) -> int:
            writes.append(len(b))
            return len(b)

    cache = make_cache()
    rec = Recorder(Sink(), buffer_ops=64).attach(cache)
    m = measure((torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)))
    tracemalloc.start()
    try:
        for i in range(20_000):
            # a new queue name and site every op: the worst case for the memos
            rec.on_op(cache, OpRecord(i + 1, 1.0, i // 48, "push", f"attn_kv_{i}", "attn_kv",
                                      f"layers.{i % 48}", f"m.py:{i}", 1, 192, 192, m, None, None))
            assert len(rec._buf) < 64
            if i == 2_000:
                base, _ = tracemalloc.get_traced_memory()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 4 * 1024 * 1024, f"recorder memory grew by {grown} bytes"
    assert len(writes) >= 20_000 // 64
    rec.close()
    assert rec.lines_written == 20_001 + 1   # header + ops + the final stats line


def test_failing_writer_does_not_break_decode_and_logs_once(caplog):
    """A file whose write raises: the decode finishes, one warning is logged, lines are dropped."""

    class Broken:
        calls = 0

        def write(self, data: Any) -> int:
            Broken.calls += 1
            raise OSError(28, "No space left on device")

        def flush(self) -> None:
            pass

    cache = make_cache()
    layers = sentinel_layers(cache, 4)
    with caplog.at_level(logging.WARNING, logger="cachescope"):
        with record(cache, Broken(), buffer_ops=8) as rec:
            decode(cache, layers, 10)
    warnings = [r for r in caplog.records if "recorder" in r.getMessage()]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()
    assert isinstance(rec.failed, OSError) and Broken.calls == 1
    assert rec.lines_dropped > 50 and rec.lines_written == 0
    assert cache.stats.steps == 10 and not cache.violations
    assert not cache.stats.telemetry_errors, "the recorder must swallow its own errors"


def test_record_always_detaches_and_closes(tmp_path):
    """The record() context manager detaches and closes even when the loop raises."""
    cache = make_cache()
    path = tmp_path / "err.jsonl"
    with pytest.raises(RuntimeError):
        with record(cache, path) as rec:
            cache.set("x", 1)
            raise RuntimeError("loop died")
    assert rec.closed and rec not in cache.sinks
    assert [d["type"] for d in read_lines(path)] == ["header", "op", "stats"]


def test_record_to_uses_the_installed_cache(tmp_path):
    """record_to() attaches to the installed cache by default and is its own context manager."""
    import cachescope

    cache = cachescope.install(make_cache(name="installed"))
    try:
        with record_to(tmp_path / "r.jsonl") as rec:
            assert rec in cache.sinks
            cache.set("state_ids", (None, 0))
    finally:
        cachescope.uninstall()
    assert rec not in cache.sinks
    lines = read_lines(tmp_path / "r.jsonl")
    assert lines[0]["cache"] == "installed" and lines[1]["state"] == {"tuple": [None, 0]}
    with pytest.raises(TypeError, match="InstrumentedCache"):
        record_to(tmp_path / "x.jsonl", cache=object())


def test_add_sink_writes_header_at_first_event(tmp_path):
    """A recorder attached with cache.add_sink() writes its header lazily, with the cache's name."""
    cache = make_cache(name="lazy")
    cache.set("before", 1)
    rec = cache.add_sink(Recorder(tmp_path / "l.jsonl"))
    cache.set("after", 2)
    rec.close()
    lines = read_lines(tmp_path / "l.jsonl")
    assert lines[0]["cache"] == "lazy" and lines[0]["start_seq"] == 1
    assert lines[1]["seq"] == 2 and rec not in cache.sinks


def test_encode_value_keeps_types():
    """State values are written so that tuples, lists and odd objects can be told apart."""
    assert encode_value((None, 0)) == {"tuple": [None, 0]}
    assert encode_value([1, "a"]) == [1, "a"]
    assert encode_value(torch.tensor(3)) == {"repr": "tensor(3)", "type": "Tensor"}
    assert encode_value(((1, 2), 3)) == {"tuple": [{"tuple": [1, 2]}, 3]}
