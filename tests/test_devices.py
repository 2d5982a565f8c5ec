"""Byte accounting, reports and exporters never read tensor data (so never sync or copy a GPU tensor)."""

from __future__ import annotations

import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from torch import nn

from cachescope import InstrumentedCache, watch
from cachescope.record import record

_DATA_ACCESS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__",
                "__repr__", "__str__", "__format__", "__array__")


class MetaAttention(nn.Module):
    """labml-style cache use with meta-device keys/values: reading their data raises."""

    def __init__(self, cache: InstrumentedCache) -> None:
        super().__init__()
        self.cache = cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prev, nxt = self.cache.get("state_ids")
        qkv = torch.empty(1, 3, 4, 48, device="meta")
        k, v = qkv[..., :16], qkv[..., 32:]             # views: storage 3x their size
        if prev is not None:
            k_past, v_past = self.cache.pop(f"attn_kv_{prev}")
            k, v = torch.cat([k_past, k], 1), torch.cat([v_past, v], 1)
        self.cache.push(f"attn_kv_{nxt}", (k, v))
        return x


@pytest.fixture
def no_tensor_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way of reading a tensor's data raise for the duration of the test."""
    def forbidden(self: torch.Tensor, *args: object, **kwargs: object) -> None:
        raise AssertionError("the instrumentation read tensor data")

    for name in _DATA_ACCESS:
        monkeypatch.setattr(torch.Tensor, name, forbidden)


def test_instrumented_run_with_violations_reads_no_tensor_data(tmp_path, no_tensor_data) -> None:
    """A decode with swapped layers, reports, metrics, traces and a recording never reads tensor data."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    cache = InstrumentedCache(name="meta", registry=registry, tracer_provider=provider)
    layers = nn.ModuleList([MetaAttention(cache) for _ in range(3)])
    x = torch.empty(1, device="meta")
    with watch(layers, cache), record(cache, tmp_path / "meta.jsonl"), cache.generation():
        for step in range(4):
            cache.set("state_ids", (None, 0) if step == 0 else (step - 1, step))
            order = [layers[0], layers[2], layers[1]] if step == 2 else list(layers)
            for layer in order:
                layer(x)
            cache.end_step(tokens=1)
    kinds = {v.kind for v in cache.violations}
    assert kinds == {"owner_mismatch"}
    for v in cache.violations:
        assert "Tensor[1, " in v.report() and "meta" in v.report()
    assert "storage" in cache.report()
    first_push = next(r for r in cache.timeline() if r.op == "push")
    assert first_push.storage_bytes > first_push.logical_bytes   # the views' whole buffer counted
    assert b"cachescope_violations_total" in generate_latest(registry)
    assert exporter.get_finished_spans()
