"""torch's classes, found only once the application has imported torch.

cachescope never imports torch itself (the core runs without it). Until torch is imported no
tensor or module can exist, so a class that nothing is an instance of stands in for it.
"""

from __future__ import annotations

import sys

__all__ = ["LazyClass"]


class _Nothing:
    """Stands in for a torch class before torch is imported: nothing is an instance of it."""


class LazyClass:
    """``module.name`` once ``module`` is in ``sys.modules``; ``cls`` is None until then (a hot
    path reads ``lazy.cls or lazy.get()``)."""

    __slots__ = ("module", "name", "cls")

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name
        self.cls: type | None = None

    def get(self) -> type:
        """The class, or a class with no instances while the module is not imported."""
        if self.cls is None:
            found = getattr(sys.modules.get(self.module), self.name, None)
            if isinstance(found, type):
                self.cls = found
                return found
            return _Nothing
        return self.cls
