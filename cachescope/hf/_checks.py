"""The Hugging Face-specific checks: from facts the recorder observed to ``Violation``s.

Pure functions over plain data (no torch, no transformers): the recorder measures lengths,
positions and update counts, and feeds the violations these build to the view through its
public ``add_violation``. The owner rule itself (a layer extended by another module than the one
that wrote it) is the core checker's: the recorder maps an update to a pop then a push.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

from .._records import OpRecord, PopOrderError, Violation

__all__ = ["HFCacheError", "LayerFacts", "end_of_forward", "position_gap", "structural", "stale_reuse",
           "cross_model", "OWNER_HINT", "span", "queue_timeline"]

FAMILY = "layer"


class HFCacheError(PopOrderError):
    """Raised in strict mode at the first violation found on a Hugging Face cache (``.violation``
    holds it). A ``PopOrderError``, so code that catches cachescope's strict errors catches it."""

_TIMELINE = 12

#: The hint of an owner_mismatch on a layer queue (the core checker's hints speak of pop order).
OWNER_HINT = ("two modules extend the same layer of the cache: a layer copied or added without "
              "its own layer_idx, a layer removed without renumbering the ones after it, or a "
              "cache built by another model; each now attends to the other's keys/values, "
              "silently")


def span(layers: Iterable[int]) -> str:
    """``0-3, 5`` for [0, 1, 2, 3, 5]."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(set(layers)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [i]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ", ".join(out) or "none"


def queue_timeline(records: Sequence[OpRecord], queue: str) -> tuple[OpRecord, ...]:
    """The last ops on ``queue`` (``layer_3``) among ``records`` (a view's op ring)."""
    out = [r for r in records if r.queue == queue]
    return tuple(out[-_TIMELINE:])


class LayerFacts:
    """What one forward did to one layer of the cache it extends."""

    __slots__ = ("index", "sliding", "updates", "length", "cls")

    def __init__(self, index: int, sliding: bool, updates: int, length: int | None, cls: str) -> None:
        self.index = index
        self.sliding = sliding
        self.updates = updates
        self.length = length       # tokens after the forward (sliding: tokens ever added)
        self.cls = cls


def _violation(kind: str, layer: int | None, step: int, cache: str, *, consumer: str | None = None,
               site: str | None = None, detail: str = "", hint: str = "", side: str = "",
               timeline: tuple[OpRecord, ...] = ()) -> Violation:
    queue = "cache" if layer is None else f"layer_{layer}"
    return Violation(kind, queue, FAMILY, step, consumer, None, 0, site, detail=detail, hint=hint,
                     timeline=timeline, cache=cache, peer_side=side)


def end_of_forward(layers: Sequence[LayerFacts], *, step: int, view: str, model: str, q: int | None,
                   cache_cls: str, skipped: set[int], repeated: set[int],
                   skew: dict[int, int]) -> list[Violation]:
    """``layer_skipped`` / ``layer_repeated`` / ``seq_len_mismatch`` after a forward that updated
    ``layers`` (known layer types only). ``skipped``, ``repeated`` and ``skew`` are the cache's
    reported conditions: a condition is reported when it begins (or changes), not every step."""
    out: list[Violation] = []
    once = [f for f in layers if f.updates == 1]
    updated = [f.index for f in layers if f.updates]
    n = len(layers)
    new = f" ({q} new token{'s' if q != 1 else ''} per row)" if q is not None else ""
    for f in layers:
        if f.updates != 1 and q:   # the layer drifts from the others by this forward's tokens
            skew[f.index] = skew.get(f.index, 0) + (f.updates - 1) * q
        if f.updates == 0:
            if f.index not in skipped:
                skipped.add(f.index)
                never = f.length == 0
                out.append(_violation(
                    "layer_skipped", f.index, step, view,
                    detail=(f"no module updated layer {f.index} of the {cache_cls} in this forward of "
                            f"{model}; layers {span(updated)} were updated{new}"),
                    side=(f"Forward  {model}, step {step}: updated layers {span(updated)} of {n}\n"
                          f"Layer    {f.index} ({f.cls}): {f.length if f.length is not None else '?'} "
                          f"token(s), {'never written' if never else 'not extended this step'}"),
                    hint=(f"layer {f.index} is in the cache but no attention module wrote it: a layer "
                          "was removed (or skipped) without renumbering the layer_idx of the ones "
                          "after it; the cache now reads lengths and masks from layers that lag"
                          if never else
                          f"a module skipped its layer in this step: layer {f.index} lags the others "
                          "by this step's tokens from now on")))
            continue
        skipped.discard(f.index)
        if f.updates >= 2:
            if f.index not in repeated:
                repeated.add(f.index)
                out.append(_violation(
                    "layer_repeated", f.index, step, view,
                    detail=(f"layer {f.index} of the {cache_cls} was updated {f.updates} times in this "
                            f"forward of {model}{new}"),
                    side=(f"Forward  {model}, step {step}: {len(updated)} of {n} layers updated\n"
                          f"Layer    {f.index} ({f.cls}): {f.updates} updates, "
                          f"{f.length if f.length is not None else '?'} token(s) now"),
                    hint=("two modules share this layer_idx (a copied layer), or one module ran "
                          "twice: the layer holds each token twice and the other module's keys/"
                          "values mixed with its own")))
            continue
        repeated.discard(f.index)
    for sliding in (False, True):
        group = [f for f in once if f.sliding == sliding and f.length is not None]
        if len(group) < 2:
            for f in group:
                skew.pop(f.index, None)
            continue
        counts = Counter(f.length for f in group)
        top = max(counts.values())
        ref = min(length for length, c in counts.items() if c == top)
        odd = []
        for f in group:
            d = f.length - ref
            if d == 0:
                skew.pop(f.index, None)
            elif skew.get(f.index) != d:
                skew[f.index] = d
                odd.append((f, d))
        if not odd:
            continue
        what = "sliding-window layers (tokens ever added)" if sliding else "full-attention layers"
        first, d = odd[0]
        lengths = ", ".join(f"layer {f.index}: {f.length}" for f, _ in odd[:8])
        out.append(_violation(
            "seq_len_mismatch", first.index, step, view,
            detail=(f"after this forward of {model} the {what} of the {cache_cls} disagree: "
                    f"{lengths}; the other {len(group) - len(odd)} hold {ref}"),
            side=(f"Layers   {span(f.index for f, _ in odd)}: {lengths}\n"
                  f"Others   {len(group) - len(odd)} layer(s) at {ref} token(s)"),
            hint=("a layer was extended with more or fewer keys than the forward's tokens, or "
                  "cropped/reset on its own: masks and positions come from layer 0, so the "
                  "layers that disagree attend to the wrong past")))
    return out


def position_gap(layer: int, *, step: int, view: str, model: str, consumer: str | None,
                 site: str | None, before: int, positions: Sequence[int], rows: Sequence[int],
                 new: int | None, source: str, cache_cls: str, layer_cls: str,
                 writer: str | None, timeline: tuple[OpRecord, ...]) -> Violation:
    """New keys of ``layer`` do not start at the layer's length."""
    where = ", ".join(f"row {r}: {p}" for r, p in list(zip(rows, positions))[:4])
    more = f" (and {len(rows) - 4} more rows)" if len(rows) > 4 else ""
    keys = f"{new} new key(s)" if new is not None else "new keys"
    return _violation(
        "position_gap", layer, step, view, consumer=consumer, site=site,
        detail=(f"layer {layer} holds {before} token(s) but the {keys} start at position "
                f"{where}{more} ({source})"),
        side=(f"Update   by {consumer or '<no module>'} at step {step} ({keys}, {source})\n"
              f"         at {site or '<unknown site>'}\n"
              f"Layer    {layer} ({layer_cls} of a {cache_cls}): {before} token(s), written by "
              f"{writer or '<unknown>'}"),
        hint=("the positions of this forward do not continue the cache: position_ids / "
              "cache_position computed for another cache or prompt, a cache that was cropped, "
              "reset or extended without them, or tokens fed twice; the keys get the wrong "
              "rotary phase and the mask the wrong length"),
        timeline=timeline)


def structural(op: str, *, layer: int | None, n_layers: int, step: int, view: str, model: str,
               consumer: str | None, site: str | None, cache_cls: str, mid_step: bool,
               updated: Sequence[int], timeline: tuple[OpRecord, ...]) -> Violation:
    """A crop/reorder/select/reset during a forward, or of one layer only."""
    if mid_step:
        detail = (f"{op}() on the {cache_cls} while step {step} of {model} was running "
                  f"(layers {span(updated)} already updated in this forward)")
        side = (f"Op       {op}() by {consumer or '<no module>'}\n"
                f"         at {site or '<unknown site>'}\n"
                f"Step     {step} of {model}: layers {span(updated)} of {n_layers} updated so far")
        hint = (f"structural ops must run between forwards (generate() crops after the forward "
                f"that verified the candidates, reorders after the step): {op} in the middle of a "
                "forward leaves the layers before it and after it in different states")
    else:
        detail = (f"{op}() on layer {layer} of the {cache_cls} only (the other {n_layers - 1} "
                  "layer(s) were left as they were)")
        side = (f"Op       {op}() by {consumer or '<no module>'} on layer {layer} only\n"
                f"         at {site or '<unknown site>'}\n"
                f"Cache    {cache_cls} with {n_layers} layer(s); last extended at step {step} of "
                f"{model}")
        hint = (f"call {op} on the cache (cache.{op}(...)), which applies it to every layer: on "
                "one layer, its length (or row order) no longer matches the others'")
    return _violation("structural_op_mid_step", layer, step, view, consumer=consumer, site=site,
                      detail=detail, side=side, hint=hint, timeline=timeline)


def stale_reuse(*, step: int, view: str, model: str, cache_cls: str, length: int,
                rows: Sequence[int], cached: Sequence[int], prompt: Sequence[int] | None,
                prompt_len: int, site: str | None) -> Violation:
    """A cache handed to a generation whose prompt does not start with the cache's tokens
    (digests only: never token ids)."""
    pairs = []
    for i, r in enumerate(rows[:4]):
        got = "shorter prompt" if prompt is None else f"{prompt[i]:016x}"
        pairs.append(f"row {r}: cache {cached[i]:016x} / prompt {got}")
    more = f" (and {len(rows) - 4} more rows)" if len(rows) > 4 else ""
    if prompt is None:
        detail = (f"the {cache_cls} holds {length} token(s) per row but the prompt has only "
                  f"{prompt_len}")
    else:
        detail = (f"the {cache_cls} holds {length} token(s) per row that are not the first "
                  f"{length} tokens of the prompt (rows {span(rows)} differ)")
    return _violation(
        "stale_reuse", None, step, view, site=site, detail=detail,
        side=(f"Cache    {cache_cls}: {length} token(s) per row; digests (never ids):\n"
              f"         {'; '.join(pairs)}{more}\n"
              f"Prompt   generate() of {model} with {prompt_len} token(s) per row\n"
              f"         at {site or '<unknown site>'}"),
        hint=("a cache keeps the keys/values of the tokens it was built from: reuse it only for "
              "a prompt that starts with exactly those tokens (the previous sequences, or the "
              "shared prefix it was filled with), or pass a fresh cache; otherwise the new "
              "tokens attend to another text's past"))


def cross_model(layer: int, *, step: int, view: str, consumer: str | None, site: str | None,
                writer: tuple[str, str | None, str | None, int], cache_cls: str,
                timeline: tuple[OpRecord, ...]) -> Violation:
    """Layer ``layer`` of a cache written by a module of another model is extended here."""
    wview, wowner, wsite, wstep = writer
    v = Violation("owner_mismatch", f"layer_{layer}", FAMILY, step, consumer, wowner, 0, site,
                  wsite, wstep, None, hint=(
                      f"the {cache_cls} was built by another model ({wview}) and is extended "
                      "by this one: each model needs its own cache"),
                  detail=f"layer {layer} was written by {wowner or '<no module>'} of {wview}",
                  timeline=timeline, cache=view)
    return v
