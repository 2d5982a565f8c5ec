"""Shared helpers for the core/reliability/thread tests: labml-style attention layers and loops.

Each ``Attention`` uses the queue cache exactly like labml's NeoX: read ``state_ids``, pop
``attn_kv_{prev}`` when ``prev`` is not None, push ``attn_kv_{next}`` with a ``(k, v)`` pair.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
from typing import Any, Sequence

import pytest
import torch
from torch import nn

import cachescope
from cachescope import InstrumentedCache

DIM = 4
_names = itertools.count()


def exporters_available() -> bool:
    """Whether ``cachescope.metrics`` and ``cachescope.tracing`` exist (default construction works)."""
    return all(importlib.util.find_spec(f"cachescope.{m}") is not None for m in ("metrics", "tracing"))


def make_cache(exporters: bool = False, **options: Any) -> InstrumentedCache:
    """An ``InstrumentedCache``; without ``exporters`` no metrics/tracing sinks are attached."""
    if exporters:
        options.setdefault("name", f"test-{next(_names)}")
        return InstrumentedCache(**options)
    return InstrumentedCache(metrics=False, tracing=False, **options)


# Cache constructions every behavioural test should hold for: without exporters always, and the
# default construction (metrics + tracing sinks attached) once those modules exist.
CONSTRUCTIONS = ["bare"] + (["default"] if exporters_available() else [])


def construct(kind: str, **options: Any) -> InstrumentedCache:
    return make_cache(exporters=(kind == "default"), **options)


class Attention(nn.Module):
    """A labml-style attention layer: pops ``attn_kv_{prev}``, pushes ``attn_kv_{next}``."""

    def __init__(self, cache: Any = None, dim: int = DIM, seed: int = 0, fail: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Parameter(torch.randn(dim, 3 * dim, generator=g) / dim ** 0.5)
        self.cache = cache
        self.fail = fail   # raise after pushing (a step that dies half-way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.cache if self.cache is not None else cachescope.get_cache()
        q, k, v = (x @ self.proj).chunk(3, dim=-1)          # each (T, dim)
        prev, nxt = cache.get("state_ids")
        if prev is not None:
            k_past, v_past = cache.pop(f"attn_kv_{prev}")
            k, v = torch.cat([k_past, k]), torch.cat([v_past, v])
        cache.push(f"attn_kv_{nxt}", (k, v))
        if self.fail:
            raise RuntimeError("layer failed mid-forward")
        att = torch.softmax(q @ k.T / k.shape[-1] ** 0.5, dim=-1)
        return x + att @ v


class Block(nn.Module):
    """A transformer block whose own forward never touches the cache."""

    def __init__(self, cache: Any = None, seed: int = 0) -> None:
        super().__init__()
        self.attention = Attention(cache, seed=seed)
        self.mlp = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return x + self.mlp(x)


class Net(nn.Module):
    """``layers.{i}.attention`` naming, like GPT-NeoX."""

    def __init__(self, n_layers: int, cache: Any = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(cache, seed=i) for i in range(n_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def layers(n: int, cache: Any = None) -> nn.ModuleList:
    return nn.ModuleList([Attention(cache, seed=i) for i in range(n)])


def run(modules: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for m in modules:
        x = m(x)
    return x


def decode(modules: Sequence[nn.Module], cache: Any, steps: int, *, order=None,
           end_steps: bool = True) -> list[torch.Tensor]:
    """Prompt step ``(None, 0)`` then ``steps`` steps ``(i, i + 1)``; returns each step's output.

    ``order(step) -> list of module indices`` overrides the layer order of a step (for faults).
    """
    outs = []
    x = torch.linspace(-1, 1, 3 * DIM).reshape(3, DIM)
    with torch.no_grad():
        for i in range(steps + 1):
            cache.set("state_ids", (None, 0) if i == 0 else (i - 1, i))
            idx = order(i) if order is not None else range(len(modules))
            y = x
            for j in idx:
                y = modules[j](y)
            outs.append(y)
            if end_steps and hasattr(cache, "end_step"):
                cache.end_step(tokens=1)
            x = y[-1:]
    return outs
