"""Per-layer KV lengths of Hugging Face caches, for Prometheus: read at scrape time.

    cachescope_layer_kv_tokens{cache, layer, attention}   tokens each layer holds after the
                                                          view's last forward (sliding layers:
                                                          tokens ever added)
    cachescope_layer_kv_skew_tokens{cache}                longest minus shortest layer, full and
                                                          sliding layers each among themselves
                                                          (0 on a correct run)

One collector per registry, shared by every recorder exporting there (a recorder re-installed into
the same registry joins it instead of registering the names twice); it holds recorders weakly and
asks each for ``layer_lengths()`` when scraped, so nothing here runs per op or per step.

The ``layer`` label is bounded: layers 0..``MAX_LAYER_LABELS - 1`` are exported one by one, any
layer past them is folded into ``layer="other"`` (the longest of them).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Iterator

from prometheus_client.core import GaugeMetricFamily

from ._state import layer_skew

__all__ = ["MAX_LAYER_LABELS", "export_layers", "unexport_layers"]

#: layers exported with their own ``layer`` label; the rest are ``layer="other"``
MAX_LAYER_LABELS = 256

_lock = threading.Lock()
_collectors: "weakref.WeakKeyDictionary[Any, _LayerCollector]" = weakref.WeakKeyDictionary()


class _LayerCollector:
    """The registry's per-layer collector: the recorders exporting to it, held weakly."""

    def __init__(self, const_names: tuple[str, ...]) -> None:
        self.const_names = const_names
        self._recorders: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
        self._const: dict[int, tuple[str, ...]] = {}

    def add(self, recorder: Any, const_values: tuple[str, ...]) -> None:
        self._recorders[id(recorder)] = recorder
        self._const[id(recorder)] = const_values

    def remove(self, recorder: Any) -> None:
        self._recorders.pop(id(recorder), None)
        self._const.pop(id(recorder), None)

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        base = ("cache",) + self.const_names
        return (
            GaugeMetricFamily(
                "cachescope_layer_kv_tokens",
                "Tokens each layer of a Hugging Face cache holds after the model's last forward "
                "(sliding-window layers: tokens ever added); layer past "
                f"{MAX_LAYER_LABELS - 1}: layer=\"other\", the longest of them.",
                labels=base + ("layer", "attention")),
            GaugeMetricFamily(
                "cachescope_layer_kv_skew_tokens",
                "Longest minus shortest layer of a Hugging Face cache after the model's last "
                "forward (full-attention and sliding layers each among themselves); 0 when the "
                "layers agree.", labels=base))

    def describe(self) -> Iterator[Any]:
        return iter(self._families())

    def collect(self) -> Iterator[Any]:
        tokens, skew = self._families()
        for key, recorder in sorted(self._recorders.items()):
            const = list(self._const.get(key, ()))
            try:
                views = recorder.layer_lengths()
            except Exception:   # a scrape never fails because of one recorder
                continue
            for view, lengths in sorted(views.items()):
                other: dict[bool, int] = {}
                for layer, (n, sliding) in sorted(lengths.items()):
                    if layer < MAX_LAYER_LABELS:
                        tokens.add_metric([view, *const, str(layer), _kind(sliding)], n)
                    else:
                        other[sliding] = max(n, other.get(sliding, 0))
                for sliding, n in sorted(other.items()):
                    tokens.add_metric([view, *const, "other", _kind(sliding)], n)
                if lengths:
                    skew.add_metric([view, *const], layer_skew(lengths))
        yield tokens
        yield skew


def _kind(sliding: bool) -> str:
    return "sliding" if sliding else "full"


def export_layers(recorder: Any, registry: Any, const_labels: dict[str, str] | None) -> None:
    """Export ``recorder``'s per-layer lengths to ``registry`` (joining its collector if it has
    one). Different constant label names than the registry's collector raise ValueError."""
    const = tuple(sorted((const_labels or {}).items()))
    names = tuple(n for n, _ in const)
    with _lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _LayerCollector(names)
            registry.register(collector)
            _collectors[registry] = collector
        elif collector.const_names != names:
            if len(collector._recorders):
                raise ValueError(
                    f"cachescope.hf: every recorder exporting to one registry must use the same "
                    f"const_labels names (this registry's use {list(collector.const_names) or 'none'}, "
                    f"got {list(names) or 'none'}); use a separate registry")
            collector.const_names = names
        collector.add(recorder, tuple(v for _, v in const))


def unexport_layers(recorder: Any, registry: Any) -> None:
    """Stop exporting ``recorder``'s per-layer lengths (idempotent)."""
    with _lock:
        collector = _collectors.get(registry)
        if collector is not None:
            collector.remove(recorder)
