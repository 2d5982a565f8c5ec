"""cachescope for Hugging Face transformers' KV cache (``transformers.Cache``).

    import cachescope.hf

    rec = cachescope.hf.install()          # every transformers.Cache is checked from now on
    cachescope.hf.watch(model)             # optional: owners named gpt_neox.layers.3.attention
    model.generate(ids, max_new_tokens=32)
    print(rec.report())                    # the run summary; rec.violations: Violation objects
    cachescope.hf.uninstall()              # restores exactly what install replaced

Each top-level model gets a view, an ``InstrumentedCache``: a forward of the model is a step, and
``update(k, v, layer_idx)`` is a pop then a push of the view's queue ``layer_{layer_idx}``, so the
core checker's owner rule, reports, counters, Prometheus metrics and OpenTelemetry spans apply
unchanged. The checks proper to this cache (``layer_skipped``, ``layer_repeated``,
``seq_len_mismatch``, ``position_gap``, ``structural_op_mid_step``, ``stale_reuse``) are in
``cachescope/hf/_checks.py``; docs/hf.md describes them.

``inject_faults(spec, model)`` plants those bugs on any ``*ForCausalLM`` whose decoder layers are
an ``nn.ModuleList`` (``HF_FAULTS``: prune, dup-layer-idx, skip, partial-crop, stale-reuse; see
docs/faults.md).

transformers is optional: ``import cachescope.hf`` works without it, ``install()`` then raises an
ImportError that says what to install.
"""

from __future__ import annotations

import contextlib
import re
import threading
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from ._faults import (HF_FAULTS, HFFault, HFFaultEvent, HFFaultHandle, inject_faults,
                          parse_hf_fault)
    from ._recorder import HFRecorder, HFWatch

__all__ = ["install", "uninstall", "installed", "paused", "watch", "HFRecorder", "HFWatch", "HFCacheError",
           "MIN_TRANSFORMERS", "TESTED_TRANSFORMERS", "inject_faults", "parse_hf_fault", "HFFault",
           "HFFaultEvent", "HFFaultHandle", "HF_FAULTS"]

#: Names served by ``cachescope.hf._faults`` (imported on first use: it needs torch).
_FAULT_NAMES = ("inject_faults", "parse_hf_fault", "HFFault", "HFFaultEvent", "HFFaultHandle",
                "HF_FAULTS")

#: The oldest transformers release cachescope.hf accepts: the layered ``Cache`` API of v5 with
#: ``update(key_states, value_states, layer_idx, *args, **kwargs)`` (5.5; before it, the models
#: pass a ``cache_position`` that cannot disagree with the cache, so ``position_gap`` is blind, and
#: static layers have no length counter). docs/hf.md lists the releases checked.
MIN_TRANSFORMERS = "5.5"
#: The releases CI tests: the whole suite on the first, the HF tests also on the second (the
#: oldest they all pass on; scripts/test_transformers.sh).
TESTED_TRANSFORMERS = ("5.25.0", "5.18.0")

_lock = threading.Lock()
_installed: dict[str, Any] | None = None


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string (``5.25.0.dev0`` -> (5, 25), ``5.10rc1`` ->
    (5, 10)); (0, 0) where it cannot be read."""
    m = re.match(r"(\d+)(?:\.(\d+))?", version)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else (0, 0)


def _import_transformers() -> dict[str, Any]:
    """transformers' modules the patches need, or a one-line ImportError saying what to install."""
    hint = (f"cachescope.hf needs Hugging Face transformers>={MIN_TRANSFORMERS}: "
            f"pip install 'transformers>={MIN_TRANSFORMERS}'")
    try:
        import transformers
        from transformers import cache_utils
        from transformers.generation.utils import GenerationMixin
    except ImportError:
        raise ImportError(hint) from None
    version = getattr(transformers, "__version__", "0")
    if _release(version) < _release(MIN_TRANSFORMERS) or not hasattr(cache_utils, "DynamicLayer"):
        raise ImportError(f"{hint} (found transformers {version})")
    return {"cache_utils": cache_utils, "GenerationMixin": GenerationMixin, "version": version}


def install(**options: Any) -> "HFRecorder":
    """Instrument every ``transformers.Cache`` (also those ``generate()`` and the models make)
    and return the recorder that collects what they do. Idempotent: while installed, returns the
    installed recorder (options of a later call are ignored).

    Options: ``name`` (view names: 'hf', 'hf-2'... one per model), ``registry`` (Prometheus
    ``CollectorRegistry``; default cachescope's own), ``tracer_provider`` (OpenTelemetry; default
    the global one), ``strict`` (raise ``HFCacheError`` at the first violation), ``metrics`` /
    ``tracing`` (False: leave that exporter out), ``const_labels``, ``attribution``,
    ``timeline_size``, ``max_violations``.
    """
    global _installed
    with _lock:
        if _installed is not None:
            return _installed["recorder"]
        modules = _import_transformers()
        from . import _patch
        from ._recorder import HFRecorder
        cu = modules["cache_utils"]
        known_caches = tuple(c for c in (getattr(cu, "DynamicCache", None),
                                         getattr(cu, "StaticCache", None)) if c is not None)
        layers: dict[type, bool] = {}
        for name, sliding in (("DynamicLayer", False), ("DynamicSlidingWindowLayer", True),
                              ("StaticLayer", False), ("StaticSlidingWindowLayer", True)):
            cls = getattr(cu, name, None)
            if cls is not None:
                layers[cls] = sliding
        recorder = HFRecorder(known_caches=known_caches, known_layers=layers,
                              cache_base=cu.Cache, layer_base=getattr(cu, "CacheLayerMixin", None),
                              **options)
        recorder._transparent = _patch.transparent()
        if recorder._metrics:
            recorder.export_layer_metrics()
        done = _patch.apply(modules)
        _patch.ACTIVE[0] = recorder
        recorder.active = True
        _installed = {"recorder": recorder, "patches": done, "version": modules["version"]}
        return recorder


def uninstall() -> None:
    """Restore every function ``install`` replaced and remove the forward hooks it added.
    Idempotent. The recorder keeps what it collected (``violations``, ``report()``)."""
    global _installed
    with _lock:
        if _installed is None:
            return
        from . import _patch
        recorder = _installed["recorder"]
        _patch.ACTIVE[0] = None
        _patch.restore(_installed["patches"])
        recorder.unhook()
        recorder.active = False
        _installed = None


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """While the block runs, cachescope.hf sees nothing (transformers runs as if it were not
    installed; its wrappers only read a flag): e.g. a warm-up, or a model compared with a checked
    one. Pause between forwards, not inside one. Without ``install()``, does nothing."""
    from . import _patch
    recorder = installed()
    if recorder is None:
        yield
        return
    _patch.ACTIVE[0] = None
    recorder.paused = True
    try:
        yield
    finally:
        recorder.paused = False
        if installed() is recorder:
            _patch.ACTIVE[0] = recorder


def installed() -> "HFRecorder | None":
    """The installed recorder, or None."""
    return None if _installed is None else _installed["recorder"]


def watch(model: Any, *, name: str | None = None, prefix: str = "") -> "HFWatch":
    """Name the owners of ``model``'s cache updates by qualified module name
    (``gpt_neox.layers.3.attention``: the modules that carry a ``layer_idx``) and make each
    forward of ``model`` a step of its view (``name``: the view's name, for a model seen for the
    first time). Needs ``install()`` first. Returns the handle whose ``remove()`` stops the
    naming (the step hooks stay until ``uninstall()``)."""
    recorder = installed()
    if recorder is None:
        raise RuntimeError("cachescope.hf.watch() needs cachescope.hf.install() first")
    from ._recorder import HFWatch
    view = recorder._view_for(model, name=name)
    handle = HFWatch(view.cache.attributor, model, prefix)
    recorder._watches.append(handle)
    return handle


def __getattr__(name: str) -> Any:
    if name == "HFCacheError":
        from ._checks import HFCacheError
        return HFCacheError
    if name in _FAULT_NAMES:
        from . import _faults
        return getattr(_faults, name)
    if name in ("HFRecorder", "HFWatch"):
        from . import _recorder
        return getattr(_recorder, name)
    raise AttributeError(f"module 'cachescope.hf' has no attribute {name!r}")
