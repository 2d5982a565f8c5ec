"""What cachescope keeps about each Hugging Face cache and each forward: plain data, no torch.

- ``layer_queue(i)``: the queue name of layer ``i`` in a model's view (``layer_3``): an update
  pops the layer's item and pushes the next one to the same queue (the checker's leftover rule
  counts only items pushed before the step).
- ``LayerKV``: the queued item; measures the layer's keys/values when the counters are read and
  holds no tensor (a weak reference to the layer).
- ``TokenTrail``: rolling digests of the tokens a cache was built from, per row (never the ids).
- ``CacheState``: per ``transformers.Cache`` object (kept in a weak map by the recorder).
- ``Forward``: one forward of a top-level model (a step of its view).
"""

from __future__ import annotations

import weakref
from typing import Any

from .._values import TensorPair

__all__ = ["layer_queue", "layer_skew", "LayerKV", "TokenTrail", "CacheState", "Forward"]

_MASK = (1 << 63) - 1
#: interned queue names of the first layers (``layer_3``); larger indices are made on use
_NAMES = tuple(f"layer_{i}" for i in range(256))


def layer_queue(layer: int) -> str:
    """The queue of layer ``layer`` in a model's view: ``layer_3`` (family ``layer``)."""
    return _NAMES[layer] if 0 <= layer < len(_NAMES) else f"layer_{layer}"


def layer_skew(lengths: dict[int, tuple[int, bool]]) -> int:
    """Longest minus shortest layer of ``{layer: (tokens, sliding)}``, full-attention and sliding
    layers each among themselves (the larger of the two); 0 for none."""
    spread = 0
    for sliding in (False, True):
        ns = [n for n, s in lengths.values() if s is sliding]
        if ns:
            spread = max(spread, max(ns) - min(ns))
    return spread


class LayerKV(TensorPair):
    """What a layer queue holds: ``pair()`` is the layer's current ``keys`` and ``values`` (so
    cachescope's byte counters measure the layer as it is when they are read), while it keeps
    only a weak reference to the layer: no tensor outlives the cache because of cachescope."""

    __slots__ = ("_ref",)

    def __init__(self, layer: Any) -> None:
        try:
            self._ref: Any = weakref.ref(layer)
        except TypeError:
            self._ref = lambda: None

    def pair(self) -> tuple[Any, Any]:
        layer = self._ref()
        if layer is None:
            return None, None
        return getattr(layer, "keys", None), getattr(layer, "values", None)

    def __repr__(self) -> str:
        return "LayerKV()"


class TokenTrail:
    """Digests of the tokens a cache was built from: per row a chain of rolling hashes (one node
    per token, ``(digest, parent)``), so a prefix's digest is found by walking back and beams
    share the nodes of their common prefix. Holds no token id."""

    __slots__ = ("heads", "length", "nodes")

    #: nodes (tokens x rows) followed per cache; past this the cache is no longer followed
    MAX_NODES = 1 << 17

    def __init__(self) -> None:
        self.heads: list[Any] | None = None   # per row: (digest, parent) or None (no token)
        self.length = 0
        self.nodes = 0

    @property
    def rows(self) -> int | None:
        return None if self.heads is None else len(self.heads)

    def extend(self, rows: list[list[int]]) -> bool:
        """Append one token row per cache row; False (stop following) when the shapes disagree."""
        if not rows:
            return False
        width = len(rows[0])
        if any(len(r) != width for r in rows):
            return False
        heads = self.heads
        if heads is None:
            if self.length:
                return False
            heads = [None] * len(rows)
        elif len(heads) != len(rows):
            return False
        if self.nodes + width * len(rows) > self.MAX_NODES:
            return False
        new = []
        for node, row in zip(heads, rows):
            h = node[0] if node is not None else 0
            for tok in row:
                h = hash((h, tok)) & _MASK
                node = (h, node)
            new.append(node)
        self.heads = new
        self.length += width
        self.nodes += width * len(rows)
        return True

    def crop_to(self, length: int) -> bool:
        """Keep the first ``length`` tokens of every row."""
        if length > self.length or length < 0:
            return False
        back = self.length - length
        if back and self.heads is not None:
            heads = []
            for node in self.heads:
                for _ in range(back):
                    node = node[1] if node is not None else None
                heads.append(node)
            self.heads = heads
        self.length = length
        return True

    def select(self, rows: list[int]) -> bool:
        """Keep/reorder rows (beam search's reorder, batch selection)."""
        if self.heads is None:
            return self.length == 0
        n = len(self.heads)
        if any(type(r) is not int or not 0 <= r < n for r in rows):
            return False
        self.heads = [self.heads[r] for r in rows]
        return True

    def repeat(self, times: int) -> bool:
        if self.heads is None:
            return self.length == 0
        if type(times) is not int or times < 1:
            return False
        self.heads = [node for node in self.heads for _ in range(times)]
        return True

    def digest(self, row: int) -> int:
        node = self.heads[row] if self.heads is not None else None
        return node[0] if node is not None else 0


def digest_tokens(row: list[int]) -> int:
    """The digest ``TokenTrail`` has after ``row`` (the same rolling hash)."""
    h = 0
    for tok in row:
        h = hash((h, tok)) & _MASK
    return h


class CacheState:
    """What the recorder knows about one ``transformers.Cache`` object."""

    __slots__ = ("checked", "cls_name", "writers", "skipped", "repeated", "skew", "gap", "trail",
                 "kv", "view", "kinds", "__weakref__")

    def __init__(self, checked: bool, cls_name: str) -> None:
        self.checked = checked
        self.cls_name = cls_name
        #: layer -> (view name, owner label, site, step) of the module that wrote it first
        self.writers: dict[int, tuple[str, str | None, str | None, int]] = {}
        self.skipped: set[int] = set()      # layers reported as skipped, until updated again
        self.repeated: set[int] = set()     # layers reported as repeated, until updated once
        self.skew: dict[int, int] = {}      # layer -> length offset already reported
        self.gap: dict[int, int] = {}       # layer -> position offset already reported
        self.trail: TokenTrail | None = None
        self.kv: dict[int, LayerKV] = {}    # layer -> the queued item (one per layer object)
        self.view: Any = None               # the view that wrote it last
        self.kinds: tuple[bool | None, ...] | None = None   # per layer: sliding? (None: unknown type)

    def forget(self) -> None:
        """The cache was reset: its layers start empty."""
        self.writers.clear()
        self.skipped.clear()
        self.repeated.clear()
        self.skew.clear()
        self.gap.clear()
        self.trail = TokenTrail()


class Forward:
    """One forward of a top-level model: a step of its view."""

    __slots__ = ("view", "step", "cache", "state", "explicit", "orphan", "depth", "batch", "q",
                 "input_ids", "position_ids", "mask", "counts", "added", "start", "pos_memo",
                 "gap_skews", "disturbed", "first_layer", "pending", "fast", "uniform", "lookup")

    def __init__(self, view: Any, step: int, *, orphan: bool = False) -> None:
        self.view = view
        self.step = step
        self.cache: Any = None          # the cache this forward extends (checked if known)
        self.state: Any = None          # its CacheState
        self.explicit = False           # ``cache`` came from the forward's arguments
        self.orphan = orphan            # found from the stack mid-forward: no end hook
        self.depth = 0                  # nested calls of the same view's root
        self.batch = 0
        self.q: int | None = None       # new tokens per row (input length)
        self.input_ids: Any = None
        self.position_ids: Any = None
        self.mask: Any = None
        self.counts: dict[int, int] = {}    # layer -> updates in this forward
        self.added: dict[int, int] = {}     # layer -> keys added in this forward
        self.start: dict[int, int | None] | None = None   # layer -> length before the forward
        self.pos_memo: dict[Any, Any] = {}
        self.gap_skews: set[int] = set()
        self.disturbed = False          # a structural op ran on the cache during the forward
        self.first_layer: int | None = None
        #: updates noted in this forward, checked and applied when it ends:
        #: (layer, keys added, cache_position, position_ids, (owner, site))
        self.pending: list[Any] = []
        self.fast: Any = None           # the cache whose updates are noted (set at its first)
        #: (full, sliding) lengths when the updates were applied in one pass (``_flush_fast``)
        self.uniform: tuple[int | None, int | None] | None = None
        #: the view's owner look-up (``Attributor.lookup``), for the update wrapper's hot path
        self.lookup: Any = view.cache.attributor.lookup if view is not None else None

    def drop_inputs(self) -> None:
        self.input_ids = self.position_ids = self.mask = None
        self.pos_memo.clear()
