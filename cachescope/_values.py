"""Measure what a cached value holds without keeping any reference to it.

Values are any nesting of tuples, lists and dicts of tensors and other objects. For each push we
compute once: logical bytes (sum of ``nbytes``), the storages involved (a view keeps its whole
buffer alive, so ``storage`` bytes can exceed ``logical``) and a short summary for reports.
Nothing here reads tensor data, so CUDA tensors are never synchronised and meta tensors work.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = ["Measure", "measure", "format_bytes", "format_summary", "EMPTY"]

_MAX_ITEMS = 4096   # tensors/containers visited per value; deeper nests are counted as truncated
_MAX_DEPTH = 32
_Tensor = torch.Tensor


class Measure(NamedTuple):
    logical: int                                  # sum of tensor.nbytes
    storages: tuple[tuple[int, int], ...]          # distinct (storage key, storage nbytes)
    # (shape, dtype, device) per tensor; None when the C fast path measured only the bytes
    # (a (k, v) push with no sink that needs shapes: reports re-measure the value they hold)
    summary: tuple[tuple[tuple[int, ...], Any, Any], ...] | None
    kind: str                                      # outer container kind, e.g. 'tuple[2]', 'Tensor', 'NoneType'
    truncated: bool = False

    @property
    def storage(self) -> int:
        s = self.storages
        if len(s) == 2:                      # the (k, v) fast path: no generator frame
            return s[0][1] + s[1][1]
        return sum(n for _, n in s)


EMPTY = Measure(0, (), (), "NoneType")
_new_measure = tuple.__new__   # builds a Measure without the NamedTuple's Python-level __new__


def _storage_of(t: torch.Tensor) -> tuple[int, int]:
    try:
        s = t.untyped_storage()
        return s._cdata, s.nbytes()
    except Exception:  # sparse, nested or exotic subclasses: count the tensor itself
        return id(t), t.nbytes


def _tensor_nbytes(t: torch.Tensor) -> int:
    try:
        return t.nbytes
    except Exception:
        return 0


def measure(value: Any) -> Measure:
    """Bytes and shapes of the tensors in ``value``. Never raises, never touches tensor data."""
    # Fast path: the labml convention pushes a (k, v) tuple of tensors.
    if type(value) is tuple and len(value) == 2:
        a, b = value
        if isinstance(a, _Tensor) and isinstance(b, _Tensor):
            # _storage_of and Measure(...) inlined: this runs once per push, right after the
            # model's matmuls have evicted the CPU caches, where every Python call is costly.
            try:
                ua, ub = a.untyped_storage(), b.untyped_storage()
                ka, kb = ua._cdata, ub._cdata
                sa = (ka, ua.nbytes())
                storages = (sa,) if ka == kb else (sa, (kb, ub.nbytes()))
                return _new_measure(Measure, (
                    a.nbytes + b.nbytes, storages,
                    ((a.shape, a.dtype, a.device), (b.shape, b.dtype, b.device)), "tuple[2]", False))
            except Exception:  # exotic tensors: the same with _storage_of's per-tensor fallback
                try:
                    sa, sb = _storage_of(a), _storage_of(b)
                    storages = (sa,) if sa[0] == sb[0] else (sa, sb)
                    return Measure(a.nbytes + b.nbytes, storages,
                                   ((a.shape, a.dtype, a.device), (b.shape, b.dtype, b.device)),
                                   "tuple[2]")
                except Exception:
                    pass
    if isinstance(value, _Tensor):
        try:
            return Measure(_tensor_nbytes(value), (_storage_of(value),),
                           ((value.shape, value.dtype, value.device),), "Tensor")
        except Exception:
            return Measure(0, (), (), "Tensor")
    try:
        return _measure_nested(value)
    except Exception:  # pathological containers (broken __iter__ etc.): count nothing
        return Measure(0, (), (), type(value).__name__, True)


def _measure_nested(value: Any) -> Measure:
    logical = 0
    storages: dict[int, int] = {}
    summary: list[tuple[Any, Any, Any]] = []
    seen: set[int] = set()
    budget = _MAX_ITEMS
    truncated = False
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        obj, depth = stack.pop()
        if isinstance(obj, _Tensor):
            logical += _tensor_nbytes(obj)
            key, nbytes = _storage_of(obj)
            storages[key] = nbytes
            if len(summary) < 16:
                summary.append((obj.shape, obj.dtype, obj.device))
            continue
        if type(obj) in (tuple, list, dict) or isinstance(obj, (tuple, list, dict)):
            if id(obj) in seen:
                continue  # cycles and shared sub-containers are visited once
            if depth >= _MAX_DEPTH or budget <= 0:
                truncated = True
                continue
            seen.add(id(obj))
            items = obj.values() if isinstance(obj, dict) else obj
            for child in items:
                budget -= 1
                if budget <= 0:
                    truncated = True
                    break
                stack.append((child, depth + 1))
    kind = type(value).__name__
    if isinstance(value, (tuple, list, dict)):
        kind = f"{kind}[{len(value)}]"
    return Measure(logical, tuple(storages.items()), tuple(summary), kind, truncated)


def format_bytes(n: int) -> str:
    """Human-readable bytes: ``3.0 KiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def format_summary(m: Measure) -> str:
    """``tuple[2](Tensor[1, 8, 7, 16] float32 cpu, ...) 7.0 KiB logical / 14.0 KiB storage``."""
    parts = [f"Tensor[{', '.join(map(str, shape))}] {str(dtype).replace('torch.', '')} {device}"
             for shape, dtype, device in (m.summary or ())]
    inner = f"({', '.join(parts)})" if parts else ""
    more = " (truncated)" if m.truncated else ""
    return (f"{m.kind}{inner} {format_bytes(m.logical)} logical / "
            f"{format_bytes(m.storage)} storage{more}")
