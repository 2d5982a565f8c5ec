"""Shared helpers for tests that drive a real decode loop: the tiny reference NeoX model, an
injected layer swap, and an in-memory OpenTelemetry setup.

Import with ``sys.path.insert(0, str(Path(__file__).resolve().parent)); from _loop import ...``.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from cachescope.neox import NeoXConfig, NeoXModel, generate

__all__ = ["PROMPT", "NEW_TOKENS", "tiny_model", "run_decode", "swap_layers_after",
           "swapped_layers", "otel_memory", "require_tool"]

PROMPT = [1, 2, 3]
NEW_TOKENS = 4


@functools.lru_cache(maxsize=None)
def tiny_model(num_layers: int = 4) -> NeoXModel:
    """The ``tiny`` preset (4 layers, hidden 64), shared by every test of the session."""
    return NeoXModel(NeoXConfig.preset("tiny", num_layers=num_layers))


def run_decode(cache: Any, new_tokens: int = NEW_TOKENS, prompt: list[int] | None = None,
               model: NeoXModel | None = None, **kwargs: Any) -> list[int]:
    """Greedy decode of ``new_tokens`` tokens through ``cache`` with the tiny model."""
    return generate(model or tiny_model(), prompt or PROMPT, new_tokens, cache=cache, **kwargs)


@contextmanager
def swapped_layers(model: NeoXModel, i: int = 0, j: int = 1) -> Iterator[None]:
    """Swap layers ``i`` and ``j`` for the duration (restored on exit)."""
    layers = model.layers
    layers[i], layers[j] = layers[j], layers[i]
    try:
        yield
    finally:
        layers[i], layers[j] = layers[j], layers[i]


def swap_layers_after(model: NeoXModel, step: int) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """An ``on_step`` callback that swaps layers 0 and 1 after ``step`` (an owner_mismatch fault),
    and a function that undoes the swap if it happened."""
    state = {"swapped": False}

    def on_step(i: int, _token: int) -> None:
        if i == step and not state["swapped"]:
            layers = model.layers
            layers[0], layers[1] = layers[1], layers[0]
            state["swapped"] = True

    def restore() -> None:
        if state["swapped"]:
            layers = model.layers
            layers[0], layers[1] = layers[1], layers[0]
            state["swapped"] = False

    return on_step, restore


def otel_memory() -> tuple[Any, Any]:
    """A fresh SDK ``TracerProvider`` exporting synchronously to an ``InMemorySpanExporter``."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def require_tool(name: str, default: str | None = None) -> str:
    """Path of a command-line tool; skip when missing, but fail when the CI variable is set."""
    path = default if default and os.access(default, os.X_OK) else shutil.which(name)
    if path:
        return path
    reason = f"{name} not found (Debian: apt-get install -y prometheus)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip")
    pytest.skip(reason)
