"""Map unbounded queue names to a bounded set of family labels (``attn_kv_17`` -> ``attn_kv``)."""

from __future__ import annotations

import re
from typing import Any, Callable

__all__ = ["default_family", "FamilyMap", "OTHER_FAMILY", "MAX_FAMILIES"]

OTHER_FAMILY = "other"
MAX_FAMILIES = 64  # distinct family labels per cache; later ones fold into OTHER_FAMILY
MAX_LABEL_LEN = 64

_TRAILING_IDS = re.compile(r"(?:[_.:/-]?\d+)+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


def default_family(name: Any) -> str:
    """Strip trailing numeric ids from a queue name: ``attn_kv_17`` -> ``attn_kv``, ``kv.3.1`` -> ``kv``."""
    if not isinstance(name, str):
        return f"<{type(name).__name__}>"
    family = _TRAILING_IDS.sub("", name)
    if not family:
        return "<numeric>"  # an all-digit name; like the <type> labels, not sanitised
    return _UNSAFE.sub("_", family)[:MAX_LABEL_LEN]


class FamilyMap:
    """Memoised, bounded normaliser: at most ``max_families`` labels, a bounded memo of names."""

    __slots__ = ("_fn", "_memo", "_families", "max_families", "_memo_limit")

    def __init__(self, fn: Callable[[Any], str] | None = None, max_families: int = MAX_FAMILIES,
                 memo_limit: int = 8192) -> None:
        self._fn = fn or default_family
        self._memo: dict[Any, str] = {}
        self._families: set[str] = set()
        self.max_families = max_families
        self._memo_limit = memo_limit

    def __call__(self, name: Any) -> str:
        try:
            return self._memo[name]
        except KeyError:
            pass
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
        if len(self._memo) >= self._memo_limit:
            self._memo.clear()  # queue names grow with every token; keep the memo bounded
        self._memo[name] = family
        return family

    @property
    def families(self) -> frozenset[str]:
        return frozenset(self._families)
