"""Measure what a cached value holds without keeping any reference to it.

Values are any nesting of tuples, lists and dicts of tensors and other objects. For each push the
cache computes once, through torch's public API: logical bytes (sum of ``nbytes``) and the
storages involved (a view keeps its whole buffer alive, so ``storage`` bytes can exceed
``logical``); the pop reuses them. Shapes, dtypes and devices (``measure``) are read only when a
reader wants value summaries (a recorder) or a report is written.

Nothing here reads tensor data (CUDA tensors are never synchronised, meta tensors work), nothing
imports torch (no tensor can exist before torch is imported, so a value is only checked against
``torch.Tensor`` once the application has imported it), nothing forces a symbolic size (a
``SymInt`` under ``make_fx``/``torch.export`` counts as 0 bytes instead of adding a shape guard),
and nothing raises.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._lazytorch import LazyClass
from ._report import format_bytes

__all__ = ["Measure", "measure", "measure_bytes", "format_bytes", "format_summary", "EMPTY",
           "tensor_type", "TensorPair"]

_MAX_ITEMS = 4096   # tensors/containers visited per value; deeper nests are counted as truncated
_MAX_DEPTH = 32
#: Byte counts at or above this are not believed (an expanded view of 2**63 bytes and more): they
#: count as 0, so that sums stay meaningful and every exporter sees a non-negative int64.
MAX_BYTES = 1 << 62


class Measure(NamedTuple):
    logical: int                                  # sum of tensor.nbytes
    storages: tuple[tuple[Any, int], ...]          # distinct (storage key, storage nbytes)
    summary: tuple[tuple[tuple[int, ...], Any, Any], ...]   # (shape, dtype, device) per tensor
    kind: str                                      # outer container kind: 'tuple[2]', 'Tensor', ...
    truncated: bool = False

    @property
    def storage(self) -> int:
        return sum(n for _, n in self.storages)


EMPTY = Measure(0, (), (), "NoneType")
_ATOMIC = frozenset({int, float, bool, str, bytes, complex})   # values that hold no tensor
NO_STORAGES: tuple[tuple[Any, int], ...] = ()


_TENSOR = LazyClass("torch", "Tensor")


class TensorPair:
    """Base of a queued item that stands for two tensors without holding them (a cache layer's
    keys and values, read through a weak reference): ``pair()`` returns them when the item is
    measured, so the counters follow the layer as it is and the item keeps nothing alive. Measured
    like a ``(k, v)`` tuple."""

    __slots__ = ()

    def pair(self) -> tuple[Any, Any]:
        return None, None


def tensor_type() -> type:
    """``torch.Tensor`` once the application has imported torch, else a class with no instances."""
    return _TENSOR.get()


def _count(n: Any) -> int:
    """A byte count as an int: symbolic sizes (never forced) and absurd ones count as 0."""
    return n if type(n) is int and 0 <= n < MAX_BYTES else 0


def _storage_of(t: Any) -> tuple[Any, int]:
    """(key, nbytes) of the storage behind ``t``; a tensor without one (sparse, nested, exotic
    subclasses) is a storage of its own, measured by its ``nbytes``."""
    try:
        s = t.untyped_storage()
        return s._cdata, _count(s.nbytes())
    except Exception:
        return id(t), _tensor_nbytes(t)


def _tensor_nbytes(t: Any) -> int:
    try:
        return _count(t.nbytes)
    except Exception:
        return 0


def measure_bytes(value: Any) -> tuple[int, int, tuple[tuple[Any, int], ...]]:
    """``(logical bytes, storage bytes, storages)`` of ``value``: what the cache counts per
    push. Never raises."""
    # The labml convention pushes a (k, v) tuple of tensors: measured inline, because this runs
    # once per push right after the model's matmuls have evicted the CPU caches.
    if type(value) is not tuple and isinstance(value, TensorPair):
        try:
            value = value.pair()
        except Exception:
            return 0, 0, NO_STORAGES
    if type(value) is tuple and len(value) == 2:
        a, b = value
        tensor = _TENSOR.cls or _TENSOR.get()
        if isinstance(a, tensor) and isinstance(b, tensor):
            try:
                ua, ub = a.untyped_storage(), b.untyped_storage()
                ka, kb = ua._cdata, ub._cdata
                na, nb = ua.nbytes(), ub.nbytes()
                la, lb = a.nbytes, b.nbytes
                if (type(na) is int and type(nb) is int and type(la) is int and type(lb) is int
                        and 0 <= la < MAX_BYTES and 0 <= lb < MAX_BYTES
                        and 0 <= na < MAX_BYTES and 0 <= nb < MAX_BYTES):
                    if ka == kb:
                        return la + lb, na, ((ka, na),)
                    return la + lb, na + nb, ((ka, na), (kb, nb))
            except Exception:
                pass
    elif value is None or type(value) in _ATOMIC:
        return 0, 0, NO_STORAGES
    m = measure(value, summary=False)
    return m.logical, m.storage, m.storages


def measure(value: Any, summary: bool = True) -> Measure:
    """Bytes, storages and (with ``summary``) shapes of the tensors in ``value``. Never raises,
    never touches tensor data."""
    tensor = tensor_type()
    try:
        if isinstance(value, TensorPair):
            return measure(value.pair(), summary)._replace(kind=type(value).__name__)
        if isinstance(value, tensor):
            return Measure(_tensor_nbytes(value), (_storage_of(value),),
                           (_describe(value),) if summary else (), "Tensor")
        if type(value) is tuple and len(value) == 2 and isinstance(value[0], tensor) \
                and isinstance(value[1], tensor):
            a, b = value
            sa, sb = _storage_of(a), _storage_of(b)
            return Measure(_tensor_nbytes(a) + _tensor_nbytes(b), (sa,) if sa[0] == sb[0] else (sa, sb),
                           (_describe(a), _describe(b)) if summary else (), "tuple[2]")
        return _measure_nested(value, tensor, summary)
    except Exception:  # pathological containers (broken __iter__, __len__...): count nothing
        return Measure(0, (), (), _kind_name(value), True)


def _describe(t: Any) -> tuple[tuple[int, ...], Any, Any]:
    """(shape, dtype, device) of a tensor; symbolic dims are kept as they are (never forced)."""
    try:
        shape = tuple(t.shape)
    except Exception:   # nested tensors have no single shape
        shape = ()
    return shape, getattr(t, "dtype", None), getattr(t, "device", None)


def _kind_name(value: Any) -> str:
    try:
        return type(value).__name__
    except Exception:  # pragma: no cover - every object has a type
        return "object"


def _measure_nested(value: Any, tensor: type, summary: bool) -> Measure:
    logical = 0
    storages: dict[Any, int] = {}
    shapes: list[tuple[Any, Any, Any]] = []
    seen: set[int] = set()
    budget = _MAX_ITEMS
    truncated = False
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        obj, depth = stack.pop()
        if isinstance(obj, tensor):
            logical += _tensor_nbytes(obj)
            key, nbytes = _storage_of(obj)
            storages[key] = nbytes
            if summary and len(shapes) < 16:
                shapes.append(_describe(obj))
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
    kind = _kind_name(value)
    if isinstance(value, (tuple, list, dict)):
        kind = f"{kind}[{len(value)}]"
    return Measure(min(logical, MAX_BYTES), tuple(storages.items()), tuple(shapes), kind, truncated)


def format_summary(m: Measure) -> str:
    """``tuple[2](Tensor[1, 8, 7, 16] float32 cpu, ...) 7.0 KiB logical / 14.0 KiB storage``."""
    parts = [f"Tensor[{', '.join(map(str, shape))}] {str(dtype).replace('torch.', '')} {device}"
             for shape, dtype, device in (m.summary or ())]
    inner = f"({', '.join(parts)})" if parts else ""
    more = " (truncated)" if m.truncated else ""
    return (f"{m.kind}{inner} {format_bytes(m.logical)} logical / "
            f"{format_bytes(m.storage)} storage{more}")
