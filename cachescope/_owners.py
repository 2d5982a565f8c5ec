"""Who made a cache op: the owning ``nn.Module``.

Two ways, cheapest first:
- ``watch(model)`` puts forward hooks on the modules that touch the cache; the hooks keep a
  per-thread stack of owner names, so an op costs one thread-local read.
- Otherwise the call stack is walked a few frames up to the first frame whose ``self`` is an
  ``nn.Module``; it is named ``ClassName#n`` (n numbers instances in the order first seen).
The call site (``file.py:line`` of the caller of the cache method) is read from one frame.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ._lazytorch import LazyClass

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Attributor", "WatchHandle", "watch"]

_MAX_FRAMES = 6      # frames walked above the cache method when looking for a module
_CACHE_API = frozenset({"push", "pop", "get_cache", "q_size"})


def _short_path(path: str, _memo: dict[str, str] = {}) -> str:
    try:
        return _memo[path]
    except KeyError:
        parts = path.replace(os.sep, "/").split("/")
        short = "/".join(parts[-2:]) if len(parts) > 1 else path
        if len(_memo) < 4096:
            _memo[path] = short
        return short


_MODES = ("off", "auto", "stack")


_MODULE = LazyClass("torch.nn", "Module")


def module_type() -> type:
    """``torch.nn.Module`` once the application has imported torch, else a class with no instances."""
    return _MODULE.get()


_TYPE_NAME = type.__dict__["__name__"]


def _type_name(cls: type) -> str:
    """A class's name read from the type itself: a metaclass's ``__name__`` (user code, which
    may raise) is not consulted."""
    try:
        return _TYPE_NAME.__get__(cls, type)
    except Exception:  # pragma: no cover - every class has a name
        return "object"


def _is_module(obj: Any) -> bool:
    """Whether ``obj`` is an ``nn.Module``, judged by its real type: no code of the object runs
    (``isinstance`` would read a ``__class__`` that the object may override, or that may raise)."""
    return issubclass(type(obj), module_type())


class Attributor:
    """Finds the owner and call site of a cache op. One per ``InstrumentedCache``."""

    def __init__(self, mode: str = "auto") -> None:
        if mode not in _MODES:
            raise ValueError(f"attribution must be 'auto', 'stack' or 'off', got {mode!r}")
        self._mode = mode
        self.watching = 0       # active WatchHandles (the per-thread owner stack may be in use)
        self._local = threading.local()
        self._labels: dict[int, tuple[weakref.ref[Any], str]] = {}   # id(module) -> (ref, label)
        self._counters: dict[str, int] = {}
        # Memos keyed by id(code): hashing a code object is not cached by CPython and costs
        # O(size of its constants), recursively (a module's code hashes every function in it).
        # The value holds the code object, so its id cannot be reused while the entry exists.
        self._method_codes: dict[int, tuple[Any, bool]] = {}  # id(code) -> (code, first arg is self)
        self._sites: dict[tuple[int, int], tuple[Any, str]] = {}  # (id(code), lasti) -> (code, "file.py:line")
        self._watched: dict[int, tuple[WatchHandle, str]] = {}  # id(module) -> (handle, qualname)
        self.aliases: dict[str, str] = {}  # old stack label -> qualified name after watch()
        self._transparent: dict[int, Any] = {}   # id(code) -> code of frames lookup() skips
        self._lock = threading.Lock()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in _MODES:
            raise ValueError(f"attribution must be 'auto', 'stack' or 'off', got {mode!r}")
        self._mode = mode

    # -- owner stack maintained by watch() hooks ------------------------------------------------
    def _stack(self) -> list[tuple[int, str]]:
        try:
            return self._local.stack
        except AttributeError:
            self._local.stack = stack = []
            return stack

    def enter(self, module_id: int, name: str) -> None:
        self._stack().append((module_id, name))

    def exit(self, module_id: int) -> None:
        stack = self._stack()
        # Pop this module's entry (and any entries above it left by a hook that never ran).
        for i in range(len(stack) - 1, -1, -1):
            if stack[i][0] == module_id:
                del stack[i:]
                return

    def size(self) -> int:
        """Modules labelled so far (bounded)."""
        return len(self._labels)

    def make_transparent(self, *functions: Any) -> None:
        """Attribute ops made from inside ``functions`` (wrappers of the cache's methods, such
        as the fault injector's) to their callers: their frames are skipped."""
        for fn in functions:
            code = getattr(fn, "__code__", None)
            if code is not None:
                self._transparent[id(code)] = code

    @contextlib.contextmanager
    def acting_as(self, name: str) -> Iterator[None]:
        """Ops on this thread are made by ``name`` until the block ends."""
        token = object()
        self.watching += 1
        self.enter(id(token), name)
        try:
            yield
        finally:
            self.exit(id(token))
            self.watching = max(0, self.watching - 1)

    def after_fork(self) -> None:
        """In a forked child: a fresh lock (another thread may have held this one at fork())."""
        self._lock = threading.Lock()

    # -- lookup -----------------------------------------------------------------------------------
    def lookup(self, depth: int) -> tuple[str | None, str | None]:
        """(owner, site) for the frame ``depth`` levels above the caller of this method."""
        if self._mode == "off":   # only owners named explicitly (``cache.owner(name)``)
            if self.watching:
                stack = getattr(self._local, "stack", None)
                if stack:
                    return stack[-1][1], None
            return None, None
        try:
            frame = sys._getframe(depth + 1)
            if self._transparent:
                while id(frame.f_code) in self._transparent:
                    frame = frame.f_back
        except (ValueError, AttributeError):
            return None, None
        code = frame.f_code
        key = (id(code), frame.f_lasti)
        entry = self._sites.get(key)
        if entry is None or entry[0] is not code:
            entry = (code, f"{_short_path(code.co_filename)}:{frame.f_lineno}",
                     code.co_argcount > 0 and code.co_varnames[0] == "self")
            if len(self._sites) >= 16384:
                self._sites.clear()
            self._sites[key] = entry
        site = entry[1]
        if self.watching and self._mode == "auto":
            stack = getattr(self._local, "stack", None)
            if stack:
                return stack[-1][1], site
        if entry[2]:
            # Fast path: the caller is a method of an already-labelled module (the usual case:
            # an attention layer's forward). Anything else takes the full walk below.
            obj = frame.f_locals.get("self")
            known = self._labels.get(id(obj))
            if known is not None and known[0]() is obj:
                return known[1], site
            del obj
        return self._from_frames(frame), site

    def _from_frames(self, frame: Any) -> str | None:
        codes = self._method_codes
        for _ in range(_MAX_FRAMES):
            if frame is None:
                return None
            code = frame.f_code
            entry = codes.get(id(code))
            if entry is None or entry[0] is not code:
                entry = (code, code.co_argcount > 0 and code.co_varnames[0] == "self")
                if len(codes) < 65536:
                    codes[id(code)] = entry
            if entry[1]:
                obj = frame.f_locals.get("self")
                if _is_module(obj):
                    return self.label(obj)
            frame = frame.f_back
        return None

    def same_owner(self, a: str, b: str) -> bool:
        """Whether two labels name the same module (a label may predate ``watch()``)."""
        aliases = self.aliases
        return aliases.get(a, a) == aliases.get(b, b)

    def label(self, module: nn.Module) -> str:
        """``layers.3.attention`` for a watched module, else ``ClassName#n``."""
        key = id(module)
        entry = self._labels.get(key)
        if entry is not None and entry[0]() is module:
            return entry[1]
        watched = self._watched.get(key)
        if watched is not None:
            handle, name = watched
            handle._discovered(module, name)
            label = name
        else:
            cls = _type_name(type(module))
            with self._lock:
                n = self._counters.get(cls, 0)
                self._counters[cls] = n + 1
            label = f"{cls}#{n}"
        try:
            ref = weakref.ref(module)
        except TypeError:
            return label
        if len(self._labels) > 65536:
            for k in [k for k, v in self._labels.items() if v[0]() is None]:
                del self._labels[k]
        self._labels[key] = (ref, label)
        return label


class WatchHandle:
    """Returned by ``watch``: ``remove()`` detaches every hook (idempotent); also a context manager."""

    def __init__(self, attributor: Attributor, model: nn.Module, prefix: str) -> None:
        self._attributor = attributor
        self._hooks: list[Any] = []
        self._hooked: set[int] = set()
        self.names: dict[int, str] = {}
        for qualname, module in model.named_modules():
            name = f"{prefix}{qualname}" if qualname else (prefix.rstrip(".") or type(module).__name__)
            self.names[id(module)] = name
            attributor._watched[id(module)] = (self, name)
            old = attributor._labels.pop(id(module), None)
            if old is not None and old[0]() is module:
                attributor.aliases[old[1]] = name  # items pushed before watch() keep matching
            if _touches_cache(module):
                self._hook(module, name)
        self.active = True
        attributor.watching += 1

    @property
    def hooked(self) -> list[str]:
        """Qualified names of the modules carrying hooks."""
        return sorted(self.names[i] for i in self._hooked)

    def _hook(self, module: nn.Module, name: str) -> None:
        if id(module) in self._hooked:
            return
        attributor, key = self._attributor, id(module)

        def pre(_module: nn.Module, _args: Any) -> None:
            attributor.enter(key, name)

        def post(_module: nn.Module, _args: Any, _out: Any) -> None:
            attributor.exit(key)

        self._hooks.append(module.register_forward_pre_hook(pre))
        self._hooks.append(module.register_forward_hook(post, always_call=True))
        self._hooked.add(key)

    def _discovered(self, module: nn.Module, name: str) -> None:
        """An op came from a watched module without hooks: hook it for next time."""
        if self.active:
            self._hook(module, name)

    def remove(self) -> None:
        if not self.active:
            return
        self.active = False
        self._attributor.watching = max(0, self._attributor.watching - 1)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for key in self.names:
            entry = self._attributor._watched.get(key)
            if entry is not None and entry[0] is self:
                del self._attributor._watched[key]
            self._attributor._labels.pop(key, None)
        self._hooked.clear()

    def __enter__(self) -> "WatchHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _touches_cache(module: nn.Module) -> bool:
    """Whether the module's own ``forward`` names the cache API (push/pop/get_cache)."""
    forward: Callable[..., Any] | None = getattr(type(module), "forward", None)
    code = getattr(forward, "__code__", None)
    return code is not None and not _CACHE_API.isdisjoint(code.co_names)


def watch(model: nn.Module, cache: Any = None, *, prefix: str = "") -> WatchHandle:
    """Attribute cache ops to modules of ``model`` by qualified name (``layers.3.attention``).

    ``cache`` defaults to the installed singleton (``cachescope.get_cache()``), which must be an
    ``InstrumentedCache``.
    """
    if cache is None:
        from ._cache import get_cache
        cache = get_cache()
    attributor = getattr(cache, "attributor", None)
    if not isinstance(attributor, Attributor):
        raise TypeError(
            f"watch() needs an InstrumentedCache, got {type(cache).__name__}: "
            "call cachescope.install() first or pass cache=InstrumentedCache(...)")
    return WatchHandle(attributor, model, prefix)
