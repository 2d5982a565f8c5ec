"""Named faults for Hugging Face ``*ForCausalLM`` models: the bugs of transformers' KV cache that
``cachescope.hf`` reports, injected on demand and undone on exit::

    import cachescope.hf as hf

    rec = hf.install()
    with hf.inject_faults("skip@2:layer=1", model) as handle:
        model.generate(ids, max_new_tokens=6)
    print(handle.events)         # what was done, at which forward
    print(rec.violations)        # layer_skipped at step 2 on queue layer_1

Works on any model whose decoder layers are an ``nn.ModuleList`` of modules holding an attention
submodule (``self_attn`` / ``attention``) with a ``layer_idx``. Steps count the forwards of the
model inside the block, from 0 (the prompt's forward): for a fresh model and one ``generate()``
this is the view's step. The spec syntax is ``cachescope.faults``': ``NAME[@STEP][:KEY=VALUE,...]``.
See docs/faults.md ("Faults for Hugging Face models").
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from torch import nn

from ..faults import DEFAULT_STEP, FaultHandle, FaultSpec, parse_spec
from ._checks import span

__all__ = ["HF_FAULTS", "HFFault", "HFFaultEvent", "HFFaultHandle", "parse_hf_fault",
           "inject_faults", "decoder_layers"]

#: The faults ``inject_faults`` carries out. ``min_step``: the first step the fault may name;
#: faults of the whole run (``prune``, ``dup-layer-idx``, ``stale-reuse``) take step 0 only.
HF_FAULTS: dict[str, FaultSpec] = {spec.name: spec for spec in (
    FaultSpec(
        "prune", "a decoder layer is removed from the ModuleList without renumbering the "
                 "layer_idx of the layers after it (transformers #30508), for the whole block",
        ("layer_skipped",),
        {"layer": (int, "the layer removed (default: the middle layer)")},
        kinds_note="layer_skipped at the block's first forward (step 0) on the cache layer of the "
                   "removed index, never written, once; removing the last layer is not seen on a "
                   "cache grown lazily (without a config)"),
    FaultSpec(
        "dup-layer-idx", "a layer's attention uses another layer's layer_idx (a copied layer), "
                         "for the whole block",
        ("owner_mismatch", "layer_repeated", "layer_skipped"),
        {"layer": (int, "the layer whose attention gets the wrong layer_idx (default: 1)"),
         "as": (int, "the layer_idx it uses (default: layer - 1)")},
        kinds_note="at step 0: owner_mismatch and layer_repeated on layer_AS, layer_skipped on "
                   "layer_LAYER; then owner_mismatch on layer_AS at every step"),
    FaultSpec(
        "skip", "a decoder layer is not run in one forward",
        ("layer_skipped",),
        {"layer": (int, "the layer skipped (default: 1)")},
        kinds_note="layer_skipped at the step on that layer, once; the lag it leaves is not "
                   "reported again"),
    FaultSpec(
        "partial-crop", "at the start of one forward, only the first layers of the cache lose "
                        "their last token (layers[i].crop(-1) instead of cache.crop())",
        ("structural_op_mid_step",),
        {"layers": (int, "how many layers, from layer 0, are cropped (default: 1); fewer than "
                         "the model's layers")},
        min_step=1,
        kinds_note="structural_op_mid_step at the step on each cropped layer (layer_0.."
                   "layer_K-1); when at least half the layers are cropped, seq_len_mismatch at the "
                   "step on the first layer left whole (layer_K); the offset is reported once"),
    FaultSpec(
        "stale-reuse", "the cache of the block's last generate() is handed to its next "
                       "generate() (one that passes no cache), whatever its prompt",
        ("stale_reuse",),
        {},
        kinds_note="stale_reuse on queue cache at the second generation's first forward, when its "
                   "prompt does not start with the tokens the cache holds; a continuation of the "
                   "same sequence is a correct reuse and reports nothing"),
)}

_WHOLE_RUN = ("prune", "dup-layer-idx", "stale-reuse")
_DEFAULT_STEPS = {name: 0 for name in _WHOLE_RUN}

def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _valid() -> str:
    return ", ".join(HF_FAULTS)


@dataclass(frozen=True)
class HFFault:
    """One fault of ``HF_FAULTS``: its ``name``, the ``step`` (forward of the block) it fires at
    and its parameters. ``step=None``: the default (0 for faults of the whole run, else 2)."""

    name: str
    step: int | None = None
    params: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = _canonical(self.name) if isinstance(self.name, str) else self.name
        if name not in HF_FAULTS:
            raise ValueError(f"unknown HF fault {self.name!r}; valid faults: {_valid()}")
        object.__setattr__(self, "name", name)
        spec = HF_FAULTS[name]
        step = _DEFAULT_STEPS.get(name, DEFAULT_STEP) if self.step is None else self.step
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"fault {name}: step must be an int, got {step!r}")
        if name in _WHOLE_RUN and step != 0:
            raise ValueError(f"fault {name} acts on the whole block: its step must be 0, got {step}")
        if step < spec.min_step:
            raise ValueError(f"fault {name}: step must be >= {spec.min_step}, got {step}")
        object.__setattr__(self, "step", step)
        params = dict(self.params)
        for key, value in params.items():
            if key not in spec.params:
                raise ValueError(f"fault {name} has no parameter {key!r}; its parameters: "
                                 f"{', '.join(spec.params) or 'none'}")
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"fault {name}: {key} must be an int, got {value!r}")
        if name == "partial-crop" and params.get("layers", 1) < 1:
            raise ValueError(f"fault partial-crop: layers must be >= 1, got {params['layers']}")
        object.__setattr__(self, "params", params)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def spec(self) -> FaultSpec:
        return HF_FAULTS[self.name]

    @property
    def expected_kinds(self) -> tuple[str, ...]:
        return self.spec.expected_kinds

    def __str__(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}@{self.step}" + (f":{params}" if params else "")


def parse_hf_fault(text: str) -> HFFault:
    """``"skip@2:layer=1"``, ``"prune:layer=2"``, ``"dup-layer-idx:layer=2,as=0"`` -> ``HFFault``.

    Syntax: ``NAME[@STEP][:KEY=VALUE,...]`` (``cachescope.faults.parse_spec``, as
    ``parse_fault``); raises a one-line ``ValueError`` naming the problem for anything else.
    """
    name, step, params = parse_spec(text, HF_FAULTS, example="skip@2:layer=1",
                                    unknown="HF fault")
    return HFFault(name, step, params)


@dataclass(frozen=True)
class HFFaultEvent:
    """Something a fault did: at which forward of the block (``step``), and what."""

    fault: HFFault
    step: int
    what: str

    def __str__(self) -> str:
        return f"{self.fault} fired at step {self.step}: {self.what}"


class HFFaultHandle(FaultHandle):
    """What ``inject_faults`` yields: the ``faults`` (defaults resolved), ``events`` (what was
    done, when), ``steps_seen`` (forwards of the model in the block) and ``not_fired()``
    (``cachescope.faults.FaultHandle``'s, over every fault given)."""

    def __init__(self, faults: Sequence[HFFault]) -> None:
        super().__init__(faults, ())


def _attention(layer: nn.Module) -> nn.Module | None:
    for name in ("self_attn", "attention", "attn"):
        sub = getattr(layer, name, None)
        if isinstance(sub, nn.Module) and isinstance(getattr(sub, "layer_idx", None), int):
            return sub
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: the first ``nn.ModuleList`` whose children each hold an
    attention submodule (``self_attn`` / ``attention`` / ``attn``) with an int ``layer_idx``."""
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
                _attention(child) is not None for child in module):
            return module
    raise TypeError(f"inject_faults() needs a model whose decoder layers are an nn.ModuleList of "
                    f"layers with a self_attn/attention module that has a layer_idx; found none in "
                    f"{type(model).__name__}")


def _cache_of(kwargs: Mapping[str, Any]) -> Any:
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


class _Injector:
    def __init__(self, faults: Sequence[HFFault], model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"inject_faults() needs the model (an nn.Module), got "
                            f"{type(model).__name__}")
        self.model = model
        self.layers = decoder_layers(model)
        self.n = len(self.layers)
        self.handle = HFFaultHandle([self._resolve(f) for f in faults])
        self.faults = list(self.handle.faults)
        self.step = -1                 # the block's forward in progress
        self.cache: Any = None         # the cache of the forward in progress
        self.kept: Any = None          # the last generation's cache (stale-reuse)
        self.generations = 0
        self.hooks: list[Any] = []
        self.undo: list[Any] = []
        self.skipped: list[nn.Module] = []
        self.fired: set[int] = set()
        # skip@S:layer=L names a position in the container as given (before any prune)
        self.targets = {id(f): self.layers[f.params["layer"]] for f in self.faults
                        if f.name == "skip"}

    def _resolve(self, fault: HFFault) -> HFFault:
        n = self.n
        params = dict(fault.params)

        def norm(key: str, value: int) -> int:
            idx = value + n if value < 0 else value
            if not 0 <= idx < n:
                raise ValueError(f"fault {fault}: {key}={value} is out of range for a model of "
                                 f"{n} decoder layers (valid: 0..{n - 1})")
            return idx

        if fault.name == "prune":
            params["layer"] = norm("layer", params.get("layer", n // 2))
        elif fault.name == "skip":
            params["layer"] = norm("layer", params.get("layer", min(1, n - 1)))
        elif fault.name == "dup-layer-idx":
            if n < 2:
                raise ValueError(f"fault {fault}: needs a model of 2 decoder layers or more")
            layer = norm("layer", params.get("layer", 1))
            other = norm("as", params.get("as", layer - 1 if layer else 1))
            if other == layer:
                raise ValueError(f"fault dup-layer-idx: layer and as must differ, both are {layer}")
            params = {"layer": layer, "as": other}
        elif fault.name == "partial-crop":
            k = params.get("layers", 1)
            if k >= n:
                raise ValueError(f"fault {fault}: layers={k} must be fewer than the model's {n} "
                                 "decoder layers (cropping them all is cache.crop())")
            params["layers"] = k
        return HFFault(fault.name, fault.step, params)

    def _event(self, fault: HFFault, what: str) -> None:
        self.fired.add(id(fault))
        self.handle.events.append(HFFaultEvent(fault, max(self.step, 0), what))

    # ------------------------------------------------------------------ enter / exit
    def __enter__(self) -> HFFaultHandle:
        try:
            self._apply()
        except BaseException:
            self._restore()
            raise
        return self.handle

    def _apply(self) -> None:
        model = self.model
        self.hooks.append(model.register_forward_pre_hook(self._before_forward, with_kwargs=True,
                                                          prepend=True))
        self.hooks.append(model.register_forward_hook(self._after_forward, with_kwargs=True))
        for f in self.faults:
            if f.name == "dup-layer-idx":
                attn = _attention(self.layers[f.params["layer"]])
                old = attn.layer_idx
                attn.layer_idx = f.params["as"]
                self.undo.append(lambda attn=attn, old=old: setattr(attn, "layer_idx", old))
        prunes = sorted({f.params["layer"] for f in self.faults if f.name == "prune"})
        if prunes:
            original = self.layers._modules
            kept = [m for i, m in enumerate(original.values()) if i not in prunes]
            self.layers._modules = type(original)((str(i), m) for i, m in enumerate(kept))
            self.undo.append(lambda: setattr(self.layers, "_modules", original))
        if any(f.name == "partial-crop" for f in self.faults):
            self.hooks.append(self.layers[0].register_forward_pre_hook(self._before_first_layer,
                                                                       prepend=True))
        if any(f.name == "stale-reuse" for f in self.faults):
            had = "generate" in model.__dict__
            saved = model.__dict__.get("generate")
            cls_generate = type(model).generate

            def generate(*args: Any, **kwargs: Any) -> Any:
                return self._generate(cls_generate, args, kwargs)

            model.generate = generate

            def put_back() -> None:
                if had:
                    model.generate = saved
                else:
                    model.__dict__.pop("generate", None)

            self.undo.append(put_back)

    def _restore(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        for layer in self.skipped:
            layer.__dict__.pop("forward", None)
        self.skipped.clear()
        while self.undo:
            self.undo.pop()()
        self.cache = self.kept = None

    # ------------------------------------------------------------------ hooks
    def _before_forward(self, _m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        self.step += 1
        self.handle.steps_seen = self.step + 1
        self.cache = _cache_of(kwargs)
        for f in self.faults:
            if f.name == "skip" and f.step == self.step and id(f) not in self.fired:
                target = self.targets[id(f)]
                target.forward = lambda hidden_states, *a, **k: hidden_states
                self.skipped.append(target)
                self._event(f, f"decoder layer {f.params['layer']} not run in this forward")
        if self.step == 0:
            for f in self.faults:
                if f.name == "prune":
                    self._event(f, f"decoder layer {f.params['layer']} removed from the ModuleList "
                                   "without renumbering the layers after it")
                elif f.name == "dup-layer-idx":
                    self._event(f, f"layer {f.params['layer']}'s attention uses layer_idx "
                                   f"{f.params['as']}")

    def _after_forward(self, _m: Any, _args: Any, kwargs: dict[str, Any], output: Any) -> None:
        cache = getattr(output, "cache", None)
        if cache is None:
            cache = getattr(output, "past_key_values", None)
        if cache is None:
            cache = self.cache
        if cache is not None:
            self.kept = cache
        for layer in self.skipped:
            layer.__dict__.pop("forward", None)
        self.skipped.clear()

    def _before_first_layer(self, _m: Any, _args: Any) -> None:
        for f in self.faults:
            if f.step != self.step or id(f) in self.fired:
                continue
            if f.name == "partial-crop":
                layers = getattr(self.cache, "layers", None)
                k = f.params["layers"]
                if layers is None or len(layers) < k:
                    continue
                for i in range(k):
                    layers[i].crop(-1)
                self._event(f, f"layer(s) {span(range(k))} of the {type(self.cache).__name__} cropped by "
                               "one token (layers[i].crop(-1)), the others not")

    def _cache_kwarg(self) -> str:
        """``cache`` (transformers >= 5.x's name) where the model's forward takes it, else
        ``past_key_values``."""
        try:
            params = inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return "cache"
        return "cache" if "cache" in params or "past_key_values" not in params else "past_key_values"

    def _generate(self, cls_generate: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fault = next((f for f in self.faults if f.name == "stale-reuse"), None)
        passed = _cache_of(kwargs) is not None
        if (fault is not None and self.generations and self.kept is not None and not passed
                and id(fault) not in self.fired):
            kwargs = {**kwargs, self._cache_kwarg(): self.kept}
            self.fired.add(id(fault))
            self.handle.events.append(HFFaultEvent(
                fault, self.step + 1, f"generation {self.generations} handed the cache of the "
                                      f"previous generation ({type(self.kept).__name__})"))
        self.generations += 1
        return cls_generate(self.model, *args, **kwargs)

    def __exit__(self, *exc: Any) -> None:
        self._restore()


def _as_faults(faults: HFFault | str | Sequence[HFFault | str]) -> list[HFFault]:
    items = [faults] if isinstance(faults, (HFFault, str)) else list(faults)
    out = [parse_hf_fault(f) if isinstance(f, str) else f for f in items]
    for f in out:
        if not isinstance(f, HFFault):
            raise TypeError(f"inject_faults() takes HFFault objects or spec strings, got "
                            f"{type(f).__name__}")
    return out


@contextlib.contextmanager
def inject_faults(faults: HFFault | str | Sequence[HFFault | str],
                  model: nn.Module) -> Iterator[HFFaultHandle]:
    """Inject ``faults`` (``HFFault``s or spec strings such as ``"skip@2:layer=1"``) into
    ``model``, a ``*ForCausalLM`` whose decoder layers are an ``nn.ModuleList``, for the ``with``
    block; yields an ``HFFaultHandle``. Everything is restored on exit, also on error."""
    injector = _Injector(_as_faults(faults), model)
    with injector as handle:
        yield handle
