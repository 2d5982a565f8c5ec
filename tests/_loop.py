"""Shared helpers for tests that drive a real decode loop: the tiny reference NeoX model, an
injected layer swap, and an in-memory OpenTelemetry setup.

Import with ``from _loop import ...`` (tests/conftest.py's directory is on ``sys.path``). Imports
torch (through cachescope.neox): tests/conftest.py must not import it at module level.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cachescope.neox import NeoXConfig, NeoXModel, generate

__all__ = ["PROMPT", "NEW_TOKENS", "tiny_model", "run_decode", "run_decode_swapped",
           "swap_layers_after", "swapped_layers", "otel_memory"]

PROMPT = [1, 2, 3]
NEW_TOKENS = 4


@functools.lru_cache(maxsize=None)
def tiny_model(num_layers: int = 4) -> NeoXModel:
    """The ``tiny`` preset (4 layers, hidden 64) in eval mode, shared by every test of the session
    (tests that swap its layers put them back)."""
    return NeoXModel(NeoXConfig.preset("tiny", num_layers=num_layers)).eval()


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


def run_decode_swapped(cache: Any, step: int = 1, **kwargs: Any) -> list[int]:
    """``run_decode`` on the tiny model with layers 0 and 1 swapped after ``step`` (an
    owner_mismatch fault); the layers are put back afterwards, also when the decode raises."""
    on_step, restore = swap_layers_after(tiny_model(), step)
    try:
        return run_decode(cache, on_step=on_step, **kwargs)
    finally:
        restore()


def otel_memory() -> tuple[Any, Any]:
    """A fresh SDK ``TracerProvider`` exporting synchronously to an ``InMemorySpanExporter``."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter
