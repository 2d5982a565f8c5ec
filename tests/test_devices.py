"""Byte accounting, reports and exporters never read tensor data (so never sync or copy a GPU tensor)."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from torch import nn

from cachescope import InstrumentedCache, watch
from cachescope.record import record

from _kvloop import KVLayer, decode
from _loop import otel_memory

_DATA_ACCESS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__",
                "__repr__", "__str__", "__format__", "__array__")


def meta_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(k, v)`` pair of meta-device tensors, for labml-style layers: reading their data raises."""
    qkv = torch.empty(1, 3, 4, 48, device="meta")
    return qkv[..., :16], qkv[..., 32:]             # views: storage 3x their size


@pytest.fixture
def no_tensor_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way of reading a tensor's data raise for the duration of the test."""
    def forbidden(self: torch.Tensor, *args: object, **kwargs: object) -> None:
        raise AssertionError("the instrumentation read tensor data")

    for name in _DATA_ACCESS:
        monkeypatch.setattr(torch.Tensor, name, forbidden)


def test_instrumented_run_with_violations_reads_no_tensor_data(tmp_path, no_tensor_data) -> None:
    """A decode with swapped layers, reports, metrics, traces and a recording never reads tensor data."""
    provider, exporter = otel_memory()
    registry = CollectorRegistry()
    cache = InstrumentedCache(name="meta", registry=registry, tracer_provider=provider)
    layers = nn.ModuleList([KVLayer(cache, kv=meta_kv, cat=1) for _ in range(3)])
    x = torch.empty(1, device="meta")
    with watch(layers, cache), record(cache, tmp_path / "meta.jsonl"), cache.generation():
        decode(layers, cache, 3, order=lambda step: [0, 2, 1] if step == 2 else [0, 1, 2],
               inputs=lambda step: x)
    kinds = {v.kind for v in cache.violations}
    assert kinds == {"owner_mismatch"}
    for v in cache.violations:
        assert "Tensor[1, " in v.report() and "meta" in v.report()
    assert "storage" in cache.report()
    first_push = next(r for r in cache.timeline() if r.op == "push")
    assert first_push.storage_bytes > first_push.logical_bytes   # the views' whole buffer counted
    assert b"cachescope_violations_total" in generate_latest(registry)
    assert exporter.get_finished_spans()
