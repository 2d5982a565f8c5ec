"""The queue cache, exactly as labml.ai's NeoX defines it (``labml_nn/neox/utils/cache.py``).

One dict holds both FIFO queues (``push``/``pop``) and plain values (``set``/``get``).
Behaviour, including which exception each misuse raises, is the seed's on purpose:
``InstrumentedCache`` must be a drop-in replacement for it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Cache", "get_cache", "set_cache"]


class Cache:
    """A process-wide store of queues and values shared by the attention layers of a decode loop."""

    def __init__(self) -> None:
        self._cache: dict[Any, Any] = {}

    def clear_all(self) -> None:
        """Drop every queue and value."""
        self._cache = {}

    def push(self, name: str, value: Any) -> None:
        """Append ``value`` to the queue ``name``, creating the queue if needed."""
        if name not in self._cache:
            self._cache[name] = []
        self._cache[name].append(value)

    def q_size(self, name: str) -> int | None:
        """Length of queue ``name``; None when it does not exist or holds a plain value."""
        if name not in self._cache:
            return None
        if type(self._cache[name]) != list:  # noqa: E721 - the seed's exact check
            return None
        return len(self._cache[name])

    def pop(self, name: str) -> Any:
        """Remove and return the oldest item of queue ``name``.

        Raises ``KeyError`` for a name never pushed and ``IndexError`` for an empty queue.
        """
        return self._cache[name].pop(0)

    def set(self, key: str, value: Any) -> None:
        """Store a plain value under ``key``."""
        self._cache[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        return self._cache.get(key, default)

    def clear(self, key: str) -> None:
        """Remove ``key`` (a queue or a value). Raises ``KeyError`` when missing."""
        del self._cache[key]


_INSTANCE: Cache | None = None


def get_cache() -> Cache:
    """The process-wide cache singleton (created on first use)."""
    global _INSTANCE
    if _INSTANCE is None:
        _INSTANCE = Cache()
    return _INSTANCE


def set_cache(cache: Cache | None) -> Cache | None:
    """Replace the singleton (None resets it); returns the previous one. Used by ``install``."""
    global _INSTANCE
    previous, _INSTANCE = _INSTANCE, cache
    return previous
