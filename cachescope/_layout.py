"""Find where a plain ``torch.Tensor`` keeps its sizes, for the C fast path's raw size reader.

Measuring a ``(k, v)`` push through torch's Python API takes eight binding calls (``nbytes``,
``untyped_storage()``, ``_cdata``, ``nbytes()`` per tensor); inside a decode step they cost more
than the rest of the op. ``_speedups.raw_sizes`` reads the same three numbers (logical bytes,
storage address, storage bytes) straight from the tensor's ``TensorImpl`` and ``StorageImpl``.
Their layout is torch's private business and changes between releases, so this module does not
assume it: it *finds* each field on probe tensors whose values it chose (an element count that
no other field holds, storages of distinct sizes, every common dtype), then checks the reader
against the Python API on a battery of tensors (views, offsets, transposes, empty and 0-d
tensors, meta tensors, every probed dtype). Any doubt leaves the reader off, and the fast path
keeps using the API: results are identical either way, only the cost differs.

Set ``CACHESCOPE_RAW_SIZES=0`` to keep the reader off.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

import torch

__all__ = ["probe", "enable"]

log = logging.getLogger("cachescope")

_IMPL_WORDS = 24      # words of a TensorImpl searched (it is larger than this)
_STORAGE_WORDS = 10   # words of a StorageImpl searched
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
_SHAPE = (7, 1769)    # 12383 elements: a count no size, stride or flag of the probes equals


def _word(addr: int, i: int) -> int:
    return ctypes.c_int64.from_address(addr + 8 * i).value


def _u16(addr: int, offset: int) -> int:
    return ctypes.c_uint16.from_address(addr + offset).value


def _storage_addr(t: torch.Tensor) -> int:
    return int(t.untyped_storage()._cdata)


def _only(found: list[int], what: str) -> int:
    if len(found) != 1:
        raise LookupError(f"{what}: {len(found)} candidate offsets")
    return found[0]


def probe() -> tuple[Any, ...]:
    """The layout ``_speedups.set_tensor_layout`` takes. Raises LookupError when not certain."""
    numel = _SHAPE[0] * _SHAPE[1]
    a = torch.empty(_SHAPE, dtype=torch.float32)
    impl = int(a._cdata)                      # the TensorImpl's address
    words = type(a).__basicsize__ // 8
    off_impl = 8 * _only([i for i in range(2, words) if _word(id(a), i) == impl], "TensorImpl*")
    storage = _storage_addr(a)
    off_storage = 8 * _only([i for i in range(1, _IMPL_WORDS) if _word(impl, i) == storage],
                            "StorageImpl*")
    off_numel = 8 * _only([i for i in range(1, _IMPL_WORDS) if _word(impl, i) == numel], "numel")
    impl_vt = _word(impl, 0) & 0xFFFFFFFFFFFFFFFF
    storage_vt = _word(storage, 0) & 0xFFFFFFFFFFFFFFFF
    # storage bytes: the one word equal to nbytes() on two storages of different sizes
    b = torch.empty(numel + 3, dtype=torch.int8)
    sizes = [(storage, a.untyped_storage().nbytes()), (_storage_addr(b), b.untyped_storage().nbytes())]
    off_snbytes = 8 * _only([i for i in range(1, _STORAGE_WORDS)
                             if all(_word(s, i) == n for s, n in sizes)], "storage nbytes")
    # dtype: the 16-bit field that differs between every probed dtype and not between two
    # tensors of the same dtype
    probes = [(torch.empty(_SHAPE, dtype=dt), torch.empty(_SHAPE, dtype=dt)) for dt in _DTYPES]
    candidates = []
    for off in range(off_numel + 8, 8 * _IMPL_WORDS, 2):
        codes = [(_u16(int(x._cdata), off), _u16(int(y._cdata), off)) for x, y in probes]
        if all(c == d for c, d in codes) and len({c for c, _ in codes}) == len(_DTYPES):
            candidates.append(off)
    off_dtype = _only(candidates[:1], "dtype")   # the first such field: data_type_ precedes flags
    itemsize = bytearray(256)
    for (x, _), dt in zip(probes, _DTYPES):
        code = _u16(int(x._cdata), off_dtype)
        if code >= 256:
            raise LookupError("dtype: code out of range")
        itemsize[code] = x.element_size()
    return (off_impl, off_storage, off_numel, off_dtype, off_snbytes, impl_vt, storage_vt,
            bytes(itemsize))


def _battery() -> list[torch.Tensor]:
    base = torch.arange(2 * 3 * 20 * 16, dtype=torch.float32).reshape(2, 3, 20, 16)
    qkv = torch.zeros(1, 5, 4, 48)
    q, k, v = qkv.split(16, dim=-1)
    out = [base, base.transpose(1, 2), base[:, 1:], base[0, 0, 3], base[..., ::2], v, k.transpose(1, 2),
           torch.empty(0), torch.empty(3, 0, 2), torch.tensor(3.5), torch.ones(4, device="meta"),
           torch.empty(5, 6, device="meta")[1:]]
    out += [torch.zeros(3, 5, dtype=dt)[1:] for dt in _DTYPES]
    with torch.inference_mode():
        x = torch.randn(2, 8, 16)
        out += [x, x.view(2, 16, 8), torch.cat([x, x], 1)[:, 3:]]
    return out


def enable(speedups: Any) -> bool:
    """Probe the layout and turn the reader on when it agrees with the API on every test tensor."""
    if os.environ.get("CACHESCOPE_RAW_SIZES", "").strip().lower() in ("0", "false", "no", "off"):
        speedups.set_tensor_layout(None)
        return False
    try:
        layout = probe()
        if not speedups.set_tensor_layout(*layout):
            return False
        for t in _battery():
            got = speedups.raw_sizes(t)
            want = (t.nbytes, _storage_addr(t), t.untyped_storage().nbytes())
            if got != want:
                raise LookupError(f"reader gave {got} for a tensor the API measures as {want}")
        # what the reader must refuse: subclasses (their layout is not probed)
        if speedups.raw_sizes(torch.nn.Parameter(torch.ones(2))) is not None:
            raise LookupError("reader accepted a tensor subclass")
    except Exception as exc:   # any doubt: the Python API measures every push
        speedups.set_tensor_layout(None)
        log.debug("cachescope: raw tensor size reader off (%s); using torch's API", exc)
        return False
    return True
