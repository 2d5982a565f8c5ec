"""Map unbounded queue names to a bounded set of family labels (``attn_kv_17`` -> ``attn_kv``)."""

from __future__ import annotations

import re
from typing import Any, Callable

__all__ = ["default_family", "strip_ids", "FamilyMap", "OTHER_FAMILY", "MAX_FAMILIES"]

OTHER_FAMILY = "other"
MAX_FAMILIES = 64  # distinct family labels per cache; later ones fold into OTHER_FAMILY
MAX_LABEL_LEN = 64

_SEPARATORS = frozenset("_.:/-")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


def strip_ids(name: str) -> str:
    """``name`` without its trailing numeric ids: runs of decimal digits, each optionally after
    one separator (``_.:/-``). One backward scan: linear in ``len(name)`` for any input (a
    backtracking regex for the same language is exponential on names like ``kv-0000-1111-2a``)."""
    end = len(name)
    while end:
        j = end
        while j and name[j - 1].isdecimal():
            j -= 1
        if j == end:
            break                      # no digits at the end: done
        if j and name[j - 1] in _SEPARATORS:
            j -= 1
        end = j
    return name[:end]


def default_family(name: Any) -> str:
    """Strip trailing numeric ids from a queue name: ``attn_kv_17`` -> ``attn_kv``, ``kv.3.1`` -> ``kv``."""
    if not isinstance(name, str):
        return f"<{type(name).__name__}>"
    family = strip_ids(name)
    if not family:
        return "<numeric>"  # an all-digit name; like the <type> labels, not sanitised
    return _UNSAFE.sub("_", family)[:MAX_LABEL_LEN]


class FamilyMap:
    """Memoised, bounded normaliser: at most ``max_families`` labels, a bounded memo of names."""

    __slots__ = ("_fn", "_memo", "memo", "_families", "max_families", "_memo_limit")

    def __init__(self, fn: Callable[[Any], str] | None = None, max_families: int = MAX_FAMILIES,
                 memo_limit: int = 8192) -> None:
        self._fn = fn or default_family
        self._memo: dict[Any, str] = {}
        #: name -> family of the str names seen recently (read-only for callers: a hit skips
        #: a Python call on the hot path)
        self.memo = self._memo
        self._families: set[str] = set()
        self.max_families = max_families
        self._memo_limit = memo_limit

    def __call__(self, name: Any) -> str:
        if type(name) is str:
            family = self._memo.get(name)
            if family is not None:
                return family
        else:
            # Only str names are memoised: a memo would keep other keys (tensors, objects) alive.
            try:
                hash(name)
            except TypeError:  # unhashable name: the cache op itself will raise; just label it
                return f"<{type(name).__name__}>"
        try:
            family = str(self._fn(name))[:MAX_LABEL_LEN]
        except Exception:  # a user normaliser must never break the decode loop
            family = OTHER_FAMILY
        if family not in self._families:
            if len(self._families) >= self.max_families:
                family = OTHER_FAMILY
            else:
                self._families.add(family)
        if type(name) is str:
            if len(self._memo) >= self._memo_limit:
                self._memo.clear()  # queue names grow with every token; keep the memo bounded
            self._memo[name] = family
        return family

    @property
    def families(self) -> frozenset[str]:
        return frozenset(self._families)
