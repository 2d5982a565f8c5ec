"""The C fast path's raw tensor size reader (``cachescope/_layout.py``, ``raw_sizes`` in C).

It reads logical bytes, the storage's address and its bytes from torch's C++ objects instead of
eight Python binding calls per push. Its layout is probed at start and checked against the API;
these tests hold it to the API on many tensors, check that it refuses what it was not probed for,
that a wrong layout is caught before use, and that decodes measure the same bytes with and
without it. With the CI variable set the reader must be on (this torch is the one CI pins).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from cachescope import InstrumentedCache
from cachescope import _hot as hotpath
from cachescope import _layout

from _kvloop import require_fast_path
from _loop import run_decode

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64)


@pytest.fixture()
def speedups():
    """The extension, with the reader enabled the way a new cache enables it (restored after)."""
    require_fast_path()
    InstrumentedCache(registry=CollectorRegistry())   # configures the fast path once
    from cachescope import _speedups
    on = _layout.enable(_speedups)
    if not on:
        msg = "the raw tensor size reader did not enable on this torch"
        if os.environ.get("CI"):
            pytest.fail(f"{msg}; CI pins torch 2.13.0, where it must")
        pytest.skip(msg)
    yield _speedups
    _layout.enable(_speedups)


def api_sizes(t: torch.Tensor) -> tuple[int, int, int]:
    s = t.untyped_storage()
    return t.nbytes, int(s._cdata), s.nbytes()


def test_reader_matches_the_api_on_views_offsets_and_dtypes(speedups) -> None:
    """Views, slices with offsets, transposes, empty and 0-d tensors, meta tensors and inference
    tensors of every common dtype read the same three numbers as torch's Python API."""
    base = torch.randn(2, 6, 10, 8)
    qkv = torch.randn(1, 7, 4, 24)
    tensors = [base, base[1], base[:, 2:5], base.transpose(1, 2), base[..., ::3], base[0, 0, 0, 0],
               *qkv.split(8, dim=-1), torch.empty(0), torch.empty(4, 0), torch.tensor(1),
               torch.empty(3, 9, device="meta"), torch.empty(3, 9, device="meta")[1:].t()]
    tensors += [torch.ones(5, 3, dtype=dt)[2:] for dt in DTYPES]
    with torch.inference_mode():
        x = torch.randn(1, 4, 9, 16)
        tensors += [x, torch.cat([x, x], dim=2), x.transpose(1, 2)]
    for t in tensors:
        assert speedups.raw_sizes(t) == api_sizes(t), (t.shape, t.dtype, t.device)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=4), dtype=st.sampled_from(DTYPES),
       start=st.integers(0, 3))
def test_reader_matches_the_api_on_random_tensors(speedups, shape, dtype, start) -> None:
    """Random shapes and dtypes, sliced along the first dimension: reader == API."""
    t = torch.zeros(shape, dtype=dtype)
    if t.dim() > 0:
        t = t[min(start, t.shape[0]):]
    assert speedups.raw_sizes(t) == api_sizes(t)


def test_reader_refuses_what_it_was_not_probed_for(speedups) -> None:
    """Subclasses, sparse and nested tensors and non-tensors go to the Python API (None)."""
    others = [torch.nn.Parameter(torch.ones(3)), torch.eye(3).to_sparse(), object(), 3, None,
              torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)])]
    for obj in others:
        assert speedups.raw_sizes(obj) is None, type(obj)


def test_a_wrong_layout_is_caught_before_use(speedups, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the probe got a field wrong, the check against the API turns the reader off."""
    good = _layout.probe()
    for field, bad in ((2, good[2] + 8), (4, good[4] + 8), (3, good[3] + 2)):
        layout = list(good)
        layout[field] = bad
        monkeypatch.setattr(_layout, "probe", lambda layout=layout: tuple(layout))
        assert _layout.enable(speedups) is False
        assert speedups.raw_sizes(torch.ones(3)) is None


def test_environment_turns_the_reader_off(speedups, monkeypatch: pytest.MonkeyPatch) -> None:
    """CACHESCOPE_RAW_SIZES=0 keeps the Python API."""
    monkeypatch.setenv("CACHESCOPE_RAW_SIZES", "0")
    assert _layout.enable(speedups) is False
    assert speedups.raw_sizes(torch.ones(3)) is None


def _bytes_seen(cache: InstrumentedCache) -> tuple:
    """Records' bytes and storage sizes (addresses differ between runs), and the peaks."""
    recs = [(r.op, r.queue, r.logical_bytes, r.storage_bytes,
             tuple(n for _, n in r.value.storages) if r.value else None) for r in cache.timeline()]
    stats = {f: (fs.peak_logical, fs.peak_storage, fs.logical, fs.storage)
             for f, fs in cache.stats.families.items()}
    return recs, stats


def test_decodes_measure_the_same_bytes_with_and_without_the_reader(speedups) -> None:
    """A decode (prompt step with v a view of qkv, then fresh tensors) records the same bytes,
    storages and peaks whether the reader or the API measured each push."""
    seen = []
    for on in (True, False):
        if not on:
            speedups.set_tensor_layout(None)
        cache = InstrumentedCache(registry=CollectorRegistry(), tracing=False)
        assert cache.speedups_active and hotpath.AVAILABLE
        run_decode(cache, new_tokens=6, cleanup=False)
        seen.append(_bytes_seen(cache))
    assert seen[0] == seen[1]
    recs, stats = seen[0]
    assert any(r[0] == "push" and r[3] > r[2] for r in recs)   # the prompt step's view is seen
    assert stats["attn_kv"][1] > 0
