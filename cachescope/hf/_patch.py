"""The class-level patches on transformers: what ``install`` replaces and ``uninstall`` restores.

Patched (each the function found in the class's own ``__dict__``, restored exactly):

- ``Cache.update`` and the whole-cache structural ops ``crop``, ``reorder_cache``,
  ``batch_select_indices``, ``batch_repeat_interleave``, ``reset``;
- the same structural ops of the layer classes cachescope knows (a call on one layer outside a
  whole-cache op is ``structural_op_mid_step``);
- ``GenerationMixin.generate`` (a generation per call; the model gets its forward hooks; a cache
  passed in is checked for ``stale_reuse``).

Each wrapper calls the original with the caller's ``*args, **kwargs`` and returns what it
returns; the original's exceptions pass through unchanged. The recorder's work around it never
raises, except ``HFCacheError`` in strict mode. Inside ``torch.compile``/``torch.export`` tracing
the wrappers call the original only.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from ._recorder import HFRecorder, _quiet

__all__ = ["ACTIVE", "CACHE_OPS", "LAYER_CLASSES", "apply", "restore", "transparent"]

#: ``ACTIVE[0]``: the installed recorder, or None (the wrappers then only call the original).
ACTIVE: list[HFRecorder | None] = [None]

CACHE_OPS = ("crop", "reorder_cache", "batch_select_indices", "batch_repeat_interleave", "reset")
#: Layer classes whose structural ops are watched (those defined in this transformers).
LAYER_CLASSES = ("CacheLayerMixin", "DynamicLayer", "DynamicSlidingWindowLayer", "StaticLayer",
                 "StaticSlidingWindowLayer")


def _wrap_update(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def update(self: Any, *args: Any, **kwargs: Any) -> Any:
        rec = ACTIVE[0]
        if rec is None or _quiet():
            return orig(self, *args, **kwargs)
        out = orig(self, *args, **kwargs)
        # The hot path, inline: in a forward whose updates are noted (``Forward.fast``), a call
        # ``update(key_states, value_states, layer_idx)`` with an int layer index and keys of
        # two or more dimensions is noted as (layer, keys added, no position source, owner);
        # anything else goes to ``_on_update``, which understands every form.
        noted = False
        try:
            stack = rec._local.__dict__.get("stack")
            if stack and stack[-1].fast is self and len(args) == 3 and not kwargs \
                    and type(args[2]) is int:
                shape = args[0].shape
                if len(shape) >= 2:
                    ctx = stack[-1]
                    ctx.pending.append((args[2], shape[-2], None, None,
                                        ctx.lookup(1)))   # (the frame that called update)
                    noted = True
        except Exception:
            pass
        if not noted:
            try:
                rec._on_update(self, args, kwargs)
            except Exception:
                rec._failed("Cache.update")
        if rec.strict:
            rec._raise_pending()
        return out
    return update


def _wrap_cache_op(op: str, orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def cache_op(self: Any, *args: Any, **kwargs: Any) -> Any:
        rec = ACTIVE[0]
        if rec is None or _quiet():
            return orig(self, *args, **kwargs)
        try:
            token = rec._enter_op(self, op, args, kwargs)
        except Exception:
            rec._failed(f"Cache.{op}")
            token = None
        try:
            out = orig(self, *args, **kwargs)
        except BaseException:
            try:
                rec._exit_op(token, ok=False)
            except Exception:
                rec._failed(f"Cache.{op} (after)")
            raise
        try:
            rec._exit_op(token, ok=True)
        except Exception:
            rec._failed(f"Cache.{op} (after)")
        if rec.strict:
            rec._raise_pending()
        return out
    return cache_op


def _wrap_layer_op(op: str, orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def layer_op(self: Any, *args: Any, **kwargs: Any) -> Any:
        rec = ACTIVE[0]
        if rec is None or _quiet() or rec._in_op():
            return orig(self, *args, **kwargs)
        local = rec._local
        try:
            token = rec._layer_op(self, op)
        except Exception:
            rec._failed(f"layer {op}")
            token = None
        local.in_op = rec._in_op() + 1          # the layer's own super() calls are not reported
        try:
            out = orig(self, *args, **kwargs)
        finally:
            local.in_op = max(0, rec._in_op() - 1)
        try:
            rec._after_layer_op(token)
        except Exception:
            rec._failed(f"layer {op} (after)")
        if rec.strict:
            rec._raise_pending()
        return out
    return layer_op


def _wrap_generate(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        rec = ACTIVE[0]
        if rec is None:
            return orig(self, *args, **kwargs)
        try:
            view = rec._begin_generation(self, args, kwargs)
        except Exception:
            rec._failed("generate (start)")
            view = None
        error: BaseException | None = None
        try:
            if rec.strict:
                rec._raise_pending()
            return orig(self, *args, **kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if view is not None:
                try:
                    rec._end_generation(view, error)
                except Exception:
                    rec._failed("generate (end)")
    return generate


def transparent(recorder_cls: type = HFRecorder) -> tuple[Callable[..., Any], ...]:
    """Functions whose frames attribution skips (an op made there is the caller's)."""
    fns: list[Callable[..., Any]] = [
        _wrap_update(lambda *a, **k: None), _wrap_cache_op("crop", lambda *a, **k: None),
        _wrap_layer_op("crop", lambda *a, **k: None), _wrap_generate(lambda *a, **k: None)]
    for name in ("_on_update", "_cross_model", "_check_position", "_enter_op", "_layer_op",
                 "_begin_generation", "_stale_check", "_discover", "_flush_all", "_update",
                 "_apply"):
        fns.append(getattr(recorder_cls, name))
    return tuple(fns)


def apply(modules: dict[str, Any]) -> list[tuple[type, str, Any, Any]]:
    """Patch transformers' classes; returns ``(class, name, original, wrapper)`` per patch."""
    cu = modules["cache_utils"]
    gen = modules["GenerationMixin"]
    done: list[tuple[type, str, Any, Any]] = []

    def patch(cls: type, name: str, wrapper: Any) -> None:
        orig = cls.__dict__[name]
        setattr(cls, name, wrapper)
        done.append((cls, name, orig, wrapper))

    try:
        patch(cu.Cache, "update", _wrap_update(cu.Cache.__dict__["update"]))
        for op in CACHE_OPS:
            if op in cu.Cache.__dict__:
                patch(cu.Cache, op, _wrap_cache_op(op, cu.Cache.__dict__[op]))
        for cls_name in LAYER_CLASSES:
            cls = getattr(cu, cls_name, None)
            if cls is None:
                continue
            for op in CACHE_OPS:
                if op in cls.__dict__ and callable(cls.__dict__[op]):
                    patch(cls, op, _wrap_layer_op(op, cls.__dict__[op]))
        patch(gen, "generate", _wrap_generate(gen.__dict__["generate"]))
    except BaseException:
        restore(done)
        raise
    return done


def restore(done: list[tuple[type, str, Any, Any]]) -> None:
    """Put back what ``apply`` replaced (a patch someone else put over ours stays)."""
    for cls, name, orig, wrapper in reversed(done):
        if cls.__dict__.get(name) is wrapper:
            setattr(cls, name, orig)
    done.clear()
