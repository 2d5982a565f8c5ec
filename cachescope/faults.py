"""A catalogue of named faults that reproduce real decode-loop ordering bugs at a chosen step.

Each fault changes, for exactly one decode step, what a labml-style decode loop does with its
layers or its cache, on any model whose layers live in an ``nn.ModuleList`` or ``nn.Sequential``
that the model iterates at call time::

    from cachescope.faults import inject, parse_fault

    fault = parse_fault("swap@3:layer=1,other=2")
    with inject(fault, model.layers, cache, model=model) as handle:
        generate(model, prompt, 8, cache=cache)     # any loop that sets state_ids each step
    print(handle.events)                            # what was done, at which step

Steps count the ``set(state_ids, ...)`` calls made inside the ``with`` block, from 0 (the prompt
step); for a fresh ``InstrumentedCache`` and one generation this is ``cache.step``. Layer
indices are positions in the container. Everything is restored on exit, also on error.

``RANK_FAULTS`` are faults of one rank of a multi-rank run (``cachescope.neox.parallel``): each
names the ``rank`` it acts on. ``rank-skip``/``rank-retry`` go through ``inject(..., rank=R)``
like ``skip``/``retry``; ``rank-diverge``/``rank-stall``/``rank-exit`` act outside the model,
through the decoder hooks that ``rank_hooks(...)`` returns.
See docs/faults.md for the semantics of each fault and the violations it produces.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from torch import nn

__all__ = ["parse_spec", "FAULTS", "RANK_FAULTS", "DEFAULT_STEP", "Fault", "FaultEvent", "FaultHandle",
           "FaultSpec", "InjectedFault", "RankHooks", "check_ranks", "inject", "parse_fault",
           "rank_hooks"]

#: Step a fault fires at when the spec names none (``swap`` = ``swap@2``).
DEFAULT_STEP = 2


class InjectedFault(RuntimeError):
    """Raised by the ``retry`` fault inside a layer, half-way through a step."""


@dataclass(frozen=True)
class FaultSpec:
    """What a named fault does, which parameters it takes and which violations it must produce."""

    name: str
    doc: str                                   # one line
    expected_kinds: tuple[str, ...]           # violation kinds it produces (see ``kinds_note``)
    params: Mapping[str, tuple[type, str]]     # parameter -> (type, one-line doc); float: > 0
    min_step: int = 0
    kinds_note: str = ""
    required: tuple[str, ...] = ()             # parameters the spec must name


FAULTS: dict[str, FaultSpec] = {spec.name: spec for spec in (
    FaultSpec(
        "swap", "two layers run in each other's place for one step",
        ("owner_mismatch",),
        {"layer": (int, "first layer (default: the first layer that uses the cache)"),
         "other": (int, "the layer it trades places with (default: the next cache layer)")},
        kinds_note="owner_mismatch at the step (not at step 0, which pops nothing) and again at the "
                   "next step, both ways round"),
    FaultSpec(
        "skip", "one layer is not run for one step",
        ("leftover", "owner_mismatch", "pop_empty"),
        {"layer": (int, "the layer skipped (default: the first layer that uses the cache)")},
        kinds_note="leftover at the step (not at step 0); at the next step every layer from the "
                   "skipped one on pops its successor's item (owner_mismatch) and the last pops "
                   "an empty queue (pop_empty, the IndexError ends the loop); skipping the last "
                   "layer gives no owner_mismatch"),
    FaultSpec(
        "repeat", "one layer runs twice in a row for one step",
        ("owner_mismatch", "pop_empty"),
        {"layer": (int, "the layer run twice (default: the first layer that uses the cache)")},
        kinds_note="the second run pops the next layer's item (owner_mismatch), the last layer "
                   "pops an empty queue (pop_empty, the IndexError ends the loop); at step 0 the "
                   "extra push shows up one step later"),
    FaultSpec(
        "retry", "the step raises half-way and the loop retries it with the same state_ids",
        ("step_restarted", "owner_mismatch", "pop_empty"),
        {"layer": (int, "the layer that raises InjectedFault on the first attempt; the layers "
                        "before it have run (default: the second layer that uses the cache)")},
        kinds_note="step_restarted when state_ids is set again, then the retried layers pop the "
                   "items the failed attempt left (owner_mismatch) and run dry (pop_empty)"),
    FaultSpec(
        "stale-state", "the loop sets the previous step's state_ids again instead of advancing",
        ("state_not_advanced", "pop_empty"),
        {}, min_step=1,
        kinds_note="state_not_advanced at the step, then the first layer pops the already drained "
                   "queue (pop_empty); at step 1 the prompt state (None, 0) is re-used, which "
                   "pops nothing, and the next step pops a queue that never existed (pop_missing)"),
    FaultSpec(
        "clear", "a KV queue is cleared mid-step, before a layer pops it",
        ("pop_missing",),
        {"layer": (int, "the queue is cleared just before this layer runs (default: the second "
                        "layer that uses the cache)"),
         "queue": (str, "the queue to clear, with {prev}/{next} from state_ids (default "
                        "attn_kv_{prev}: the queue the step pops)")},
        min_step=1,
        kinds_note="pop_missing (the KeyError ends the loop) with a hint naming who cleared it"),
)}

_RANK_PARAM = (int, "the rank it acts on, 0..world size - 1")

#: Faults of one rank in a multi-rank run; each needs ``rank=``. Kept apart from ``FAULTS`` (the
#: faults of one decode loop) because they need a multi-rank run.
RANK_FAULTS: dict[str, FaultSpec] = {spec.name: spec for spec in (
    FaultSpec(
        "rank-skip", "on one rank only, one layer is not run for one step (like skip)",
        ("owner_mismatch", "rank_divergence", "rank_stalled"),
        {"rank": _RANK_PARAM,
         "layer": (int, "the layer skipped, a position in that rank's own layer container "
                        "(default: its first layer that uses the cache)")},
        required=("rank",),
        kinds_note="with tp = 1 (pipeline stages only) the rank gets the local kinds of skip "
                   "(leftover at the step; owner_mismatch and pop_empty at the next, whose "
                   "IndexError ends its loop) and its peers are left waiting for it; with tp >= 2 "
                   "the skipped layer's all_reduces are missing on the rank, so its collectives "
                   "no longer pair with its TP peers': on gloo the ranks block inside the step "
                   "(the rank in the token broadcast, its peers in the all_reduce), before the "
                   "step's leftover is checked: the cross-rank checker sees every rank blocked "
                   "in the step, compares the unfinished step's ops (rank_divergence on the "
                   "rank, at the step) and reports rank_stalled on every rank; the rank's own "
                   "owner_mismatch comes first"),
    FaultSpec(
        "rank-retry", "on one rank only, the step raises half-way and is retried with the same "
                      "state_ids (like retry)",
        ("step_restarted", "owner_mismatch", "pop_empty", "rank_stalled"),
        {"rank": _RANK_PARAM,
         "layer": (int, "the layer that raises InjectedFault on the first attempt, a position in "
                        "that rank's own layer container (default: its second cache layer)")},
        required=("rank",),
        kinds_note="on the rank, the local kinds of retry (step_restarted, then owner_mismatch "
                   "and pop_empty, whose IndexError ends its loop; seen with tp=2 on gloo); the "
                   "re-set state_ids counts as a step, so the retry is the rank's step S+1; its "
                   "loop ends while its peers wait for it in the step: rank_stalled concerning "
                   "the rank (its error named), reported by every rank"),
    FaultSpec(
        "rank-diverge", "one rank continues with another token than its peers after the step",
        ("rank_divergence",),
        {"rank": _RANK_PARAM},
        required=("rank",),
        kinds_note="rank_divergence at the next step (its input token differs from its peers'); "
                   "a diverge at the last step changes only that rank's last token, which no "
                   "step reads"),
    FaultSpec(
        "rank-stall", "one rank stops for some seconds before the step begins",
        ("rank_stalled",),
        {"rank": _RANK_PARAM,
         "seconds": (float, "how long the rank stops, a number of seconds > 0")},
        required=("rank", "seconds"),
        kinds_note="rank_stalled when seconds exceeds the stall timeout (--stall-timeout); a "
                   "shorter stall only delays the step"),
    FaultSpec(
        "rank-exit", "one rank ends its generation before the step; its peers wait for it",
        ("rank_stalled",),
        {"rank": _RANK_PARAM},
        required=("rank",),
        kinds_note="rank_stalled: the peers reach the step, the rank never does"),
)}

#: The rank faults that ``inject`` carries out, and the single-process fault each acts like.
_INJECTED_RANK = {"rank-skip": "skip", "rank-retry": "retry"}
#: The rank faults that ``rank_hooks`` carries out.
_HOOK_FAULTS = ("rank-diverge", "rank-stall", "rank-exit")
_CATALOGUE: dict[str, FaultSpec] = {**FAULTS, **RANK_FAULTS}

_SPEC_RE = re.compile(r"^\s*(?P<name>[A-Za-z][A-Za-z_-]*)\s*(?:@\s*(?P<step>[^:]*?)\s*)?"
                      r"(?::(?P<params>.*))?$")


def _valid_names() -> str:
    return ", ".join(_CATALOGUE)


def _base(name: str) -> str:
    """The single-process fault a rank fault acts like (``rank-skip`` -> ``skip``), else ``name``."""
    return _INJECTED_RANK.get(name, name)


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


@dataclass(frozen=True)
class Fault:
    """One fault to inject: a catalogue ``name``, the ``step`` it fires at, and its parameters."""

    name: str
    step: int = DEFAULT_STEP
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = _canonical(self.name)
        if name not in _CATALOGUE:
            raise ValueError(f"unknown fault {self.name!r}; valid faults: {_valid_names()}")
        object.__setattr__(self, "name", name)
        spec = _CATALOGUE[name]
        if isinstance(self.step, bool) or not isinstance(self.step, int):
            raise ValueError(f"fault {name}: step must be an int, got {self.step!r}")
        if self.step < spec.min_step:
            raise ValueError(f"fault {name}: step must be >= {spec.min_step}, got {self.step}"
                             + (" (step 0 is the prompt: there is no earlier state)"
                                if spec.min_step == 1 else ""))
        params = dict(self.params)
        for key, value in params.items():
            if key not in spec.params:
                valid = ", ".join(spec.params) or "none"
                raise ValueError(f"fault {name} has no parameter {key!r}; its parameters: {valid}")
            typ = spec.params[key][0]
            if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"fault {name}: {key} must be an int, got {value!r}")
            if typ is str and not isinstance(value, str):
                raise ValueError(f"fault {name}: {key} must be a string, got {value!r}")
            if typ is float:
                if (isinstance(value, bool) or not isinstance(value, (int, float))
                        or not math.isfinite(value) or value <= 0):
                    raise ValueError(f"fault {name}: {key} must be a positive finite number, "
                                     f"got {value!r}")
                params[key] = float(value)
        for key in spec.required:
            if key not in params:
                raise ValueError(f"fault {name} needs {key}= ({spec.params[key][1]}), e.g. "
                                 f"{_example(name)}")
        if "rank" in params and params["rank"] < 0:
            raise ValueError(f"fault {name}: rank must be >= 0, got {params['rank']}")
        if name == "swap" and "layer" in params and params.get("other") == params["layer"]:
            raise ValueError(f"fault swap: layer and other must differ, both are {params['layer']}")
        object.__setattr__(self, "params", params)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def spec(self) -> FaultSpec:
        return _CATALOGUE[self.name]

    @property
    def rank(self) -> int | None:
        """The rank a rank fault acts on; None for the faults of ``FAULTS``."""
        return self.params["rank"] if self.name in RANK_FAULTS else None

    @property
    def expected_kinds(self) -> tuple[str, ...]:
        return self.spec.expected_kinds

    def __str__(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}@{self.step}" + (f":{params}" if params else "")


def _example(name: str) -> str:
    return {"rank-stall": "rank-stall@2:rank=1,seconds=5"}.get(name, f"{name}@2:rank=1")


_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def parse_spec(text: str, catalogue: Mapping[str, FaultSpec], *, example: str,
               unknown: str = "fault") -> tuple[str, int | None, dict[str, Any]]:
    """Read ``NAME[@STEP][:KEY=VALUE,...]`` against ``catalogue``: the canonical name, the step
    (None when the spec names none) and the parameters typed as the spec declares (int, float
    or str). Raises a one-line ``ValueError`` naming the problem and what is valid. Shared by
    ``parse_fault`` and the Hugging Face catalogue (``cachescope.hf``)."""
    valid = ", ".join(catalogue)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty fault spec; expected NAME[@STEP][:KEY=VALUE,...] with NAME one of "
                         f"{valid}")
    m = _SPEC_RE.match(text)
    if m is None:
        raise ValueError(f"bad fault spec {text!r}: expected NAME[@STEP][:KEY=VALUE,...], e.g. "
                         f"{example}")
    name = _canonical(m.group("name"))
    if name not in catalogue:
        raise ValueError(f"unknown {unknown} {m.group('name')!r} in {text!r}; valid faults: {valid}")
    spec = catalogue[name]
    step = None
    raw_step = m.group("step")
    if raw_step is not None:
        if not re.fullmatch(r"\d+", raw_step):
            raise ValueError(f"bad step {raw_step!r} in fault spec {text!r}: expected a "
                             f"non-negative integer, e.g. {example.split(' ')[0]}")
        step = int(raw_step)
    params: dict[str, Any] = {}
    raw_params = m.group("params")
    if raw_params is not None:
        for part in raw_params.split(","):
            key, eq, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not key or not value:
                raise ValueError(f"bad parameter {part.strip()!r} in fault spec {text!r}: expected "
                                 "KEY=VALUE, e.g. skip@2:layer=1")
            if key not in spec.params:
                names = ", ".join(spec.params) or "none"
                raise ValueError(f"fault {name} has no parameter {key!r}; its parameters: {names}")
            if key in params:
                raise ValueError(f"parameter {key!r} given twice in fault spec {text!r}")
            typ = spec.params[key][0]
            if typ is int:
                if not re.fullmatch(r"-?\d+", value):
                    what = "a rank number" if key == "rank" else "an integer layer index"
                    raise ValueError(f"bad value {value!r} for {key} in fault spec {text!r}: "
                                     f"expected {what}")
                params[key] = int(value)
            elif typ is float:
                if not _NUMBER_RE.fullmatch(value):
                    raise ValueError(f"bad value {value!r} for {key} in fault spec {text!r}: "
                                     "expected a number, e.g. 2.5")
                params[key] = float(value)
            else:
                params[key] = value
    return name, step, params


def parse_fault(text: str) -> Fault:
    """``"swap@3"``, ``"skip@2:layer=1"``, ``"clear@4:layer=2,queue=attn_kv_{prev}"`` -> ``Fault``;
    also the rank faults, e.g. ``"rank-stall@3:rank=1,seconds=2.5"``.

    Syntax: ``NAME[@STEP][:KEY=VALUE,...]``. Raises ``ValueError`` naming the problem (and the
    valid faults or parameters) for anything else.
    """
    name, step, params = parse_spec(text, _CATALOGUE, example="swap@3 or skip@2:layer=1")
    return Fault(name, DEFAULT_STEP if step is None else step, params)


# ---------------------------------------------------------------------------- injection

@dataclass(frozen=True)
class FaultEvent:
    """Something a fault did: at which step (counted in the block) and cache step, and what."""

    fault: Fault
    step: int
    cache_step: int | None
    what: str

    def __str__(self) -> str:
        return f"{self.fault} fired at step {self.step}: {self.what}"


class FaultHandle:
    """What ``inject`` yields: the resolved faults and ``events`` (what was done, when).

    ``faults`` holds every fault given (defaults resolved for those ``inject`` acts on);
    ``active`` the ones ``inject`` acts on in this process: all but the rank faults of other ranks
    and the hook faults (``rank-diverge``/``rank-stall``/``rank-exit``, whose events are in the
    ``RankHooks``). ``fired`` and ``not_fired()`` concern ``active`` only.
    """

    def __init__(self, faults: Sequence[Fault], layer_names: Sequence[str],
                 active: Sequence[Fault] | None = None, rank: int | None = None) -> None:
        self.faults = tuple(faults)
        self.active = self.faults if active is None else tuple(active)
        self.rank = rank
        self.layer_names = tuple(layer_names)
        self.events: list[FaultEvent] = []
        self.steps_seen = 0

    @property
    def fired(self) -> bool:
        """Whether every fault of ``active`` fired."""
        return not self.not_fired()

    def not_fired(self) -> list[Fault]:
        """The faults of ``active`` that did nothing (their step never came, or nothing to act on)."""
        done = {id(e.fault) for e in self.events}
        return [f for f in self.active if id(f) not in done]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(faults={[str(f) for f in self.faults]}, "
                f"events={len(self.events)})")


def _acts_here(fault: Fault, rank: int | None) -> bool:
    """Whether ``inject`` carries ``fault`` out in the process of ``rank``."""
    if fault.name in FAULTS:
        return True
    return fault.name in _INJECTED_RANK and fault.params["rank"] == rank


def _as_faults(faults: Fault | str | Sequence[Fault | str], who: str) -> list[Fault]:
    items = [faults] if isinstance(faults, (Fault, str)) else list(faults)
    resolved = [parse_fault(f) if isinstance(f, str) else f for f in items]
    for f in resolved:
        if not isinstance(f, Fault):
            raise TypeError(f"{who} takes Fault objects or spec strings, got {type(f).__name__}")
    return resolved


def _check_rank_arg(rank: Any, who: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"{who}: rank must be an int >= 0 (this process's global rank), "
                         f"got {rank!r}")


def _touches_cache_deep(module: nn.Module) -> bool:
    from ._owners import _touches_cache
    return any(_touches_cache(m) for m in module.modules())


class _Injector:
    def __init__(self, faults: Sequence[Fault], layers: nn.Module, cache: Any,
                 model: nn.Module | None, rank: int | None = None) -> None:
        if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
            raise TypeError(f"inject() needs the model's layer container (an nn.ModuleList or "
                            f"nn.Sequential), got {type(layers).__name__}")
        self.layers = layers
        self.cache = cache
        self.state_key = getattr(cache, "state_key", "state_ids")
        self.modules = list(layers)   # in order, a module listed twice included
        n = len(self.modules)
        if n == 0:
            raise ValueError("inject(): the layer container is empty")
        cache_layers = [i for i, m in enumerate(self.modules) if _touches_cache_deep(m)] or list(range(n))
        # Only the faults acted on here are resolved: another rank's layer= may not fit this
        # rank's container (pipeline stages hold different numbers of layers).
        resolved = [self._resolve(f, n, cache_layers) if _acts_here(f, rank) else f for f in faults]
        self.handle = FaultHandle(resolved, [type(m).__name__ for m in self.modules],
                                  [f for f in resolved if _acts_here(f, rank)], rank)
        self.faults = list(self.handle.active)   # what the machinery below acts on
        self.runner: nn.Module | None = None
        retry = next((f for f in self.faults if _base(f.name) == "retry"), None)
        if retry is not None:
            runner = model if model is not None else (layers if isinstance(layers, nn.Sequential) else None)
            if runner is None:
                raise ValueError(f"the {retry.name} fault needs model=: the module whose forward "
                                 "runs the layers (the loop retries by calling it again); an "
                                 "nn.Sequential container is its own runner")
            self.runner = runner
        self._count = 0            # state_ids sets seen in the block
        self._step = -1
        self._last_state: Any = None
        self._have_state = False
        self._orig_modules = layers._modules
        self._reordered = False
        self._hooks: list[Any] = []
        self._fired: set[int] = set()   # id() of the faults that fired
        self._saved_set: tuple[bool, Any] | None = None
        self._saved_forward: tuple[bool, Any] | None = None

    @staticmethod
    def _resolve(fault: Fault, n: int, cache_layers: list[int]) -> Fault:
        """Fill in default layer indices and check them against the container."""
        params = dict(fault.params)

        def norm(key: str, value: int) -> int:
            idx = value + n if value < 0 else value
            if not 0 <= idx < n:
                raise ValueError(f"fault {fault}: {key}={value} is out of range for a container "
                                 f"of {n} layers (valid: 0..{n - 1})")
            return idx

        def nth(k: int) -> int:
            return cache_layers[min(k, len(cache_layers) - 1)]

        name = _base(fault.name)
        if name == "swap":
            a = norm("layer", params["layer"]) if "layer" in params else nth(0)
            if "other" in params:
                b = norm("other", params["other"])
            else:
                later = [i for i in cache_layers if i > a] or [i for i in range(n) if i > a]
                if not later:
                    raise ValueError(f"fault {fault}: no layer after layer {a} to swap with; "
                                     "give other=")
                b = later[0]
            if a == b:
                raise ValueError(f"fault {fault}: layer and other must differ, both are {a}")
            params["layer"], params["other"] = a, b
        elif name in ("skip", "repeat"):
            params["layer"] = norm("layer", params["layer"]) if "layer" in params else nth(0)
        elif name in ("retry", "clear"):
            params["layer"] = norm("layer", params["layer"]) if "layer" in params else nth(1)
            if name == "clear":
                params.setdefault("queue", "attn_kv_{prev}")
        return Fault(fault.name, fault.step, params)

    # -- set wrapper: step counting, stale-state, per-step layer order -----------------------
    def _plain_set(self) -> Callable[[Any, Any], None]:
        saved = self._saved_set
        assert saved is not None
        if saved[0]:
            return saved[1]
        return type(self.cache).set.__get__(self.cache)

    def _set(self, key: Any, value: Any) -> None:
        if not (type(key) is str and key == self.state_key):
            return self._forward_set(key, value)
        k = self._count
        self._count += 1
        self.handle.steps_seen = self._count
        self._restore_order()
        stale = [f for f in self.faults if f.name == "stale-state" and f.step == k
                 and id(f) not in self._fired and self._have_state]
        meant = value
        if stale:
            value = self._last_state
        try:
            self._forward_set(key, value)   # may raise in strict mode; the value is set anyway
        finally:
            self._last_state = value
            self._have_state = True
            self._step = k
            for f in stale:
                self._fire(f, k, f"set state_ids to the previous step's {value!r} instead of "
                                 f"{meant!r}")
        self._apply_order(k)

    def _forward_set(self, key: Any, value: Any) -> None:
        """Call the real ``set`` (an ``InstrumentedCache`` skips this wrapper's frames when it
        attributes the op, so it keeps the loop's call site)."""
        self._plain_set()(key, value)

    def _cache_step(self) -> int | None:
        step = getattr(self.cache, "step", None)
        return step if isinstance(step, int) else None

    def _fire(self, fault: Fault, step: int, what: str) -> None:
        self._fired.add(id(fault))
        self.handle.events.append(FaultEvent(fault, step, self._cache_step(), what))

    def _apply_order(self, k: int) -> None:
        todo = [f for f in self.faults if f.step == k and _base(f.name) in ("swap", "skip", "repeat")
                and id(f) not in self._fired]
        if not todo:
            return
        order = list(range(len(self.modules)))
        for f in todo:
            layer = f.params["layer"]
            if f.name == "swap":
                other = f.params["other"]
                order = [other if i == layer else layer if i == other else i for i in order]
                what = f"layers {layer} and {other} run in each other's place"
            elif _base(f.name) == "skip":
                order = [i for i in order if i != layer]
                what = f"layer {layer} not run"
            else:
                order = [j for i in order for j in ((i, i) if i == layer else (i,))]
                what = f"layer {layer} run twice"
            self._fire(f, k, f"{what} (order {','.join(map(str, order))})")
        new = OrderedDict((str(pos), self.modules[i]) for pos, i in enumerate(order))
        self.layers.__dict__["_modules"] = new
        self._reordered = True

    def _restore_order(self) -> None:
        if self._reordered:
            self.layers.__dict__["_modules"] = self._orig_modules
            self._reordered = False

    # -- per-layer hooks: retry raises, clear clears ------------------------------------------
    def _make_hook(self, fault: Fault) -> Callable[..., None]:
        layer = fault.params["layer"]

        def hook(_module: nn.Module, _args: Any) -> None:
            if self._step != fault.step or id(fault) in self._fired:
                return
            if _base(fault.name) == "retry":
                self._fire(fault, self._step, f"raised InjectedFault before layer {layer} "
                                              f"(layers before it ran); the step is retried")
                raise InjectedFault(f"injected fault {fault}: step {self._step} failed before "
                                    f"layer {layer} ran")
            prev, nxt = (self._last_state if isinstance(self._last_state, (tuple, list))
                         and len(self._last_state) == 2 else (None, None))
            name = fault.params["queue"].format(prev=prev, next=nxt)
            if self.cache.q_size(name) is None:
                return     # nothing to clear: the fault does not fire (see handle.not_fired())
            self._fire(fault, self._step, f"cleared queue {name!r} before layer {layer} ran")
            self.cache.clear(name)

        return hook

    def _retrying_forward(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def retrying(*args: Any, **kwargs: Any) -> Any:
            try:
                return forward(*args, **kwargs)
            except InjectedFault:
                # The loop's retry: set the same state_ids again, run the step again.
                self._set(self.state_key, self._last_state)
                return forward(*args, **kwargs)

        return retrying

    # -- enter / exit -------------------------------------------------------------------------
    def __enter__(self) -> FaultHandle:
        cache = self.cache
        had = "set" in vars(cache)
        self._saved_set = (had, vars(cache).get("set"))
        cache.set = self._set
        attributor = getattr(cache, "attributor", None)
        if attributor is not None and hasattr(attributor, "make_transparent"):
            attributor.make_transparent(type(self)._set, type(self)._forward_set)
        try:
            for f in self.faults:
                if _base(f.name) in ("retry", "clear"):
                    module = self.modules[f.params["layer"]]
                    self._hooks.append(module.register_forward_pre_hook(self._make_hook(f),
                                                                        prepend=True))
            if self.runner is not None:
                had_fwd = "forward" in vars(self.runner)
                self._saved_forward = (had_fwd, vars(self.runner).get("forward"))
                self.runner.__dict__["forward"] = self._retrying_forward(self.runner.forward)
        except BaseException:
            self.__exit__()
            raise
        return self.handle

    def __exit__(self, *exc: Any) -> None:
        self._restore_order()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._saved_forward is not None and self.runner is not None:
            had, fwd = self._saved_forward
            if had:
                self.runner.__dict__["forward"] = fwd
            else:
                self.runner.__dict__.pop("forward", None)
            self._saved_forward = None
        if self._saved_set is not None:
            had, fn = self._saved_set
            if had:
                self.cache.set = fn
            else:
                vars(self.cache).pop("set", None)
            self._saved_set = None


@contextlib.contextmanager
def inject(faults: Fault | str | Sequence[Fault | str], layers: nn.ModuleList | nn.Sequential,
           cache: Any = None, *, model: nn.Module | None = None,
           rank: int | None = None) -> Iterator[FaultHandle]:
    """Inject ``faults`` (a ``Fault``, a spec string, or several) into the decode loop(s) run
    inside the block.

    ``layers``: the container the model iterates (``model.layers``; an ``nn.Sequential`` model
    itself). ``cache``: the cache the loop and the layers use (default: ``get_cache()``), a plain
    ``Cache`` or an ``InstrumentedCache``. ``model``: the module whose forward runs the layers,
    needed by ``retry`` unless ``layers`` is an ``nn.Sequential`` run directly.

    Layer order is changed by swapping the container's module dict for the faulty step only;
    ``state_ids`` sets are seen by wrapping ``cache.set`` on the instance; ``retry``/``clear``
    use forward pre-hooks on the chosen layer; ``retry`` also wraps ``model.forward`` so the
    step is re-run with the same ``state_ids`` after ``InjectedFault``. All undone on exit.

    ``rank``: this process's global rank in a multi-rank run. ``rank-skip``/``rank-retry`` act
    (as ``skip``/``retry``) only where ``rank`` is their ``rank=``; the hook faults
    (``rank-diverge``/``rank-stall``/``rank-exit``) are left to ``rank_hooks``. Any rank fault
    with ``rank=None`` is a ``ValueError``.
    """
    resolved = _as_faults(faults, "inject()")
    if rank is None:
        for f in resolved:
            if f.name in RANK_FAULTS:
                raise ValueError(f"fault {f}: rank faults need a multi-rank run, e.g. cachescope "
                                 f"run --nproc 2 --fault {f}")
    else:
        _check_rank_arg(rank, "inject()")
    if cache is None:
        from ._cache import get_cache
        cache = get_cache()
    injector = _Injector(resolved, layers, cache, model, rank)
    handle = injector.__enter__()
    try:
        yield handle
    finally:
        injector.__exit__()


# ---------------------------------------------------------------------------- rank faults

def check_ranks(faults: Fault | str | Sequence[Fault | str], world_size: int) -> None:
    """Raise ``ValueError`` when a rank fault names a rank outside a world of ``world_size`` ranks.

    The caller checks this once it knows the world size (``rank=`` itself is checked >= 0 when the
    fault is built); the faults of ``FAULTS`` are not concerned.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"check_ranks(): world_size must be an int >= 1, got {world_size!r}")
    for f in _as_faults(faults, "check_ranks()"):
        r = f.rank
        if r is not None and r >= world_size:
            raise ValueError(f"fault {f}: rank={r} is out of range for a world of {world_size} "
                             f"rank(s) (valid: 0..{world_size - 1}); pick a lower rank or launch "
                             "more (--nproc)")


class RankHooks:
    """Decoder hooks that carry out this rank's ``rank-diverge``, ``rank-stall`` and ``rank-exit``
    faults (``ParallelDecoder(hooks=...)``); made by ``rank_hooks``.

    ``faults``: the hook faults that act on this rank (each fires at most once); ``events``: what
    was done, at which step (``FaultEvent.cache_step`` is None: the hooks do not see the cache).
    ``close()`` (also on leaving a ``with`` block) wakes a stall that is sleeping and makes later
    stalls return at once. Use one ``RankHooks`` per generation, like one ``inject`` block.
    """

    def __init__(self, faults: Sequence[Fault], *, rank: int, vocab_size: int) -> None:
        self.rank = rank
        self.vocab_size = vocab_size
        self.faults = tuple(f for f in faults if f.name in _HOOK_FAULTS and f.params["rank"] == rank)
        self.events: list[FaultEvent] = []
        self._fired: set[int] = set()
        self._closed = threading.Event()

    def _due(self, name: str, step: int) -> list[Fault]:
        return [f for f in self.faults if f.name == name and f.step == step
                and id(f) not in self._fired]

    def _fire(self, fault: Fault, step: int, what: str) -> None:
        self._fired.add(id(fault))
        self.events.append(FaultEvent(fault, step, None, what))

    def before_step(self, step: int) -> bool:
        """Called before the step sets ``state_ids``: sleeps for a ``rank-stall`` of this step;
        returns False for a ``rank-exit`` of this step (the rank ends its generation now)."""
        for f in self._due("rank-stall", step):
            asked = f.params["seconds"]
            t0 = time.monotonic()
            cut = self._closed.wait(asked)
            slept = time.monotonic() - t0
            self._fire(f, step, f"rank {self.rank} stopped for {slept:.2f} s before step {step} "
                                f"(before its state_ids set)"
                                + (f"; cut short by close() ({asked:g} s asked)" if cut else ""))
        exits = self._due("rank-exit", step)
        for f in exits:
            self._fire(f, step, f"rank {self.rank} ended its generation before step {step}; its "
                                "peers wait for it")
        return not exits

    def token(self, step: int, token: int) -> int:
        """Called after the step's token was broadcast: the token this rank continues with
        (another id for a ``rank-diverge`` of this step, ``token`` otherwise)."""
        out = int(token)
        for f in self._due("rank-diverge", step):
            new = (out + 1) % self.vocab_size
            self._fire(f, step, f"rank {self.rank} continues with token {new} instead of {out} "
                                f"(its peers' token) after step {step}")
            out = new
        return out

    @property
    def fired(self) -> bool:
        """Whether every fault of ``faults`` fired."""
        return not self.not_fired()

    def not_fired(self) -> list[Fault]:
        """The faults of ``faults`` that did nothing (their step never came)."""
        return [f for f in self.faults if id(f) not in self._fired]

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Wake a sleeping ``rank-stall`` now; later stalls do not sleep. Safe from any thread."""
        self._closed.set()

    def __enter__(self) -> RankHooks:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"RankHooks(rank={self.rank}, faults={[str(f) for f in self.faults]}, "
                f"events={len(self.events)})")


def rank_hooks(faults: Fault | str | Sequence[Fault | str], *, rank: int,
               vocab_size: int) -> RankHooks:
    """The decoder hooks of this ``rank`` for ``faults`` (a ``Fault``, a spec string, or several):
    ``rank-diverge``/``rank-stall``/``rank-exit`` whose ``rank=`` is ``rank``; other faults are
    ``inject``'s business and ignored here. ``vocab_size``: the model's, for the other token id
    that ``rank-diverge`` picks (``(token + 1) % vocab_size``).
    """
    resolved = _as_faults(faults, "rank_hooks()")
    _check_rank_arg(rank, "rank_hooks()")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"rank_hooks(): vocab_size must be an int >= 2 (rank-diverge picks "
                         f"another token id), got {vocab_size!r}")
    return RankHooks(resolved, rank=rank, vocab_size=vocab_size)
